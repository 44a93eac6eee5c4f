"""Chapter 14's experiments: a small Transformer-XL language model and the lag-copy task.

:class:`TransformerXLLM` stacks pre-norm blocks around
:class:`~attn.transformer_xl.TransformerXLAttention` and runs a stream in the parallel
form (:meth:`~TransformerXLLM.forward`), segment by segment with the cached memories
(:meth:`~TransformerXLLM.step`, :meth:`~TransformerXLLM.evaluate_cached`), or by
recomputing each segment's context (:meth:`~TransformerXLLM.evaluate_recompute`).

Why not :class:`attn.models.TransformerBlock` / :class:`attn.models.TokenLM`: their block
hands the mixer ``LN(x)``, so the memory a Transformer-XL layer reads would be
``SG(LN(m))``; Dai et al.'s code (``pre_lnorm``) stores the block's raw inputs and
normalises inside the layer, ``LN(SG(m))``, so that ``LN``'s parameters learn through the
memory path too (the chapter's reference test checks that gradient). The block here passes
its norm to the layer (``norm=``) instead. And the memory is a stream of hidden states, not
a key/value cache (relative positions: nothing to re-rotate), so ``TokenLM``'s ``caches`` do not fit.

:class:`LagCopyTask` and :func:`lag_copy_loss`: predict the token ``lag`` positions back,
in the previous segment, which only a memory reaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int, check_same_dtype, check_tensor
from ..train import History, set_seed, train
from ..transformer_xl import TransformerXLAttention

__all__ = [
    "TransformerXLLM",
    "AbsoluteSegmentAttention",
    "LagCopyTask",
    "lag_copy_loss",
    "set_memory",
    "train_lag_copy",
    "lag_copy_accuracy",
]

Positions = Literal["relative", "absolute"]


class AbsoluteSegmentAttention(TransformerXLAttention):
    """The same layer with the relative terms (b) and (d) removed: scores ``(q_i + u)^T k_j`` only.

    Used with absolute position embeddings added to the token embeddings
    (:class:`TransformerXLLM` with ``positions="absolute"``): position ``t mod L``,
    reset at every segment, so a state of the memory and the state of the
    current segment at the same offset carry the same position code. This is
    the "naive" combination of a memory with absolute positions that Dai et al.
    (2019, section 3.3) argue cannot tell ``x_{tau, j}`` from ``x_{tau+1, j}``.
    ``r_net`` and ``v`` stay (unused) so that parameter counts differ only by the
    position table.
    """

    def _scores_bias(self, q: Tensor, keys: int, table: Tensor | None = None) -> Tensor:
        """No position term: zeros ``(B, h, L, K)``."""
        return q.new_zeros(*q.shape[:-1], keys)


class _Block(nn.Module):
    """Pre-norm block: ``h + Attn(LN([SG(m) | h]))`` then ``h + FF(LN(h))``.

    The memory ``m`` holds the block's raw inputs; the stop-gradient comes first and the
    norm second, ``LN(SG(m))``, so ``LN``'s parameters learn through the memory path as
    ``W_k, W_v`` do (Dai et al. 2019's code, ``pre_lnorm``).
    """

    def __init__(
        self, embed_dim: int, num_heads: int, segment: int, mem_len: int, ff_mult: int, positions: Positions = "relative"
    ) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        layer = TransformerXLAttention if positions == "relative" else AbsoluteSegmentAttention
        self.attn = layer(embed_dim, num_heads, segment, mem_len)
        self.ff = nn.Sequential(nn.Linear(embed_dim, ff_mult * embed_dim), nn.GELU(), nn.Linear(ff_mult * embed_dim, embed_dim))

    def forward(self, h: Tensor, memory: Tensor | None = None, need_weights: bool = False, parallel: bool = True) -> tuple[Tensor, Tensor | None]:
        # the memory is stored raw and normalised here, after its stop-gradient: LN1(SG(m)) (Dai et al.'s code)
        if parallel:
            a, w = self.attn(h, need_weights=need_weights, norm=self.norm1)
        else:
            a, w = self.attn.attend_segment(h, memory=memory, need_weights=need_weights, norm=self.norm1)
        h = h + a
        return h + self.ff(self.norm2(h)), w


def _describe(obj: object) -> str:
    """``len`` and type of a would-be list, for messages."""
    return f"{type(obj).__name__} of length {len(obj)}" if isinstance(obj, (list, tuple)) else type(obj).__name__


class TransformerXLLM(nn.Module):
    """A small causal Transformer-XL language model: embeddings, ``layers`` blocks, a linear head.

    Memory of layer ``n`` = the last ``M`` *inputs* of block ``n`` (``h^{n-1}``),
    detached. :meth:`forward` runs a whole sequence in the parallel form;
    :meth:`step` runs one segment given the memories (the cache);
    :meth:`evaluate_cached` and :meth:`evaluate_recompute` evaluate a long
    stream the two ways.

    ``positions="absolute"``: the relative terms are removed
    (:class:`AbsoluteSegmentAttention`) and a learned embedding of the position
    within the segment, ``t mod L`` (reset at every segment), is added to the
    token embedding, the baseline of Dai et al. (2019, section 3.3).

    ``num_outputs``: classes of the head (default ``vocab``).

    Shapes: ``tokens`` ``(B, n)`` integer ids -> logits ``(B, n, num_outputs)``.
    """

    def __init__(
        self,
        vocab: int,
        embed_dim: int = 32,
        num_heads: int = 2,
        layers: int = 1,
        segment: int = 8,
        mem_len: int = 8,
        ff_mult: int = 2,
        positions: Positions = "relative",
        num_outputs: int | None = None,
    ) -> None:
        super().__init__()
        check_int("layers", layers, 1)
        if positions not in ("relative", "absolute"):
            raise ValueError(f"positions must be 'relative' or 'absolute', got {positions!r}")
        self.vocab, self.segment, self.mem_len, self.positions = vocab, segment, mem_len, positions
        self.embed = nn.Embedding(vocab, embed_dim)
        self.position_embed = nn.Embedding(segment, embed_dim) if positions == "absolute" else None
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, segment, mem_len, ff_mult, positions) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab if num_outputs is None else num_outputs)

    def _check_tokens(self, tokens: object) -> Tensor:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of shape (batch, n), got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be integer ids (torch.long) of shape (batch, n), got {tokens.dtype}")
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape (batch, n) with n >= 1, got {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise ValueError(f"token ids must lie in [0, {self.vocab}), got min {int(tokens.min())}, max {int(tokens.max())}")
        return tokens

    def _embed(self, tokens: Tensor) -> Tensor:
        """Token embeddings ``(B, n, E)``, plus the position ``t mod L`` when ``positions="absolute"``.

        ``tokens`` must start at a segment boundary (every caller cuts at multiples of ``L``).
        """
        h = self.embed(self._check_tokens(tokens))
        if self.position_embed is not None:
            h = h + self.position_embed(torch.arange(tokens.shape[1], device=tokens.device) % self.segment)
        return h

    def forward(self, tokens: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor | None]]:
        """Parallel form: logits ``(B, n, V)`` and per-layer weights ``(B, h, n, n)`` (when asked)."""
        h = self._embed(tokens)
        weights = []
        for block in self.blocks:
            h, w = block(h, need_weights=need_weights)
            weights.append(w)
        return self.head(self.norm(h)), weights

    def step(self, tokens: Tensor, mems: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Recurrent form: one segment ``(B, L)`` with the cached memories -> logits ``(B, L, V)``, new memories.

        ``mems[n]`` is ``(B, M', E)`` (``M' <= M``), the last inputs of block ``n``; the
        new memory keeps the last ``M`` of ``[mems[n] | this segment's inputs]``, detached.
        """
        h = self._embed(tokens)
        if mems is not None:
            if not isinstance(mems, (list, tuple)) or len(mems) != len(self.blocks):
                raise ValueError(f"mems must be a list of one tensor per layer ({len(self.blocks)}), got {_describe(mems)}")
            E = h.shape[-1]
            for n, mem in enumerate(mems):
                check_tensor(mem, f"mems[{n}]", f"(batch={h.shape[0]}, mem_len, embed_dim={E})", 3)
                if mem.shape[0] != h.shape[0] or mem.shape[-1] != E:
                    raise ValueError(f"mems[{n}] must have shape (batch={h.shape[0]}, mem_len, embed_dim={E}), got {tuple(mem.shape)}")
                check_same_dtype(("the model's states", h), (f"mems[{n}]", mem))
        new_mems = []
        for n, block in enumerate(self.blocks):
            block_mem = None if mems is None or mems[n].shape[1] == 0 else mems[n]
            context = h if block_mem is None else torch.cat([block_mem, h], 1)
            new_mems.append(context[:, max(0, context.shape[1] - self.mem_len) :].detach())
            h, _ = block(h, block_mem, parallel=False)
        return self.head(self.norm(h)), new_mems

    @torch.no_grad()
    def evaluate_cached(self, tokens: Tensor) -> Tensor:
        """Logits of a stream ``(B, n)``, segment by segment, each computed once with the cache."""
        self._check_tokens(tokens)
        mems, out = None, []
        for start in range(0, tokens.shape[1], self.segment):
            logits, mems = self.step(tokens[:, start : start + self.segment], mems)
            out.append(logits)
        return torch.cat(out, 1)

    @property
    def context_segments(self) -> int:
        """How many earlier segments one segment's output depends on: ``layers * ceil(M / L)``."""
        return len(self.blocks) * -(-self.mem_len // self.segment)

    @torch.no_grad()
    def evaluate_recompute(self, tokens: Tensor) -> Tensor:
        """Logits of a stream ``(B, n)`` with no cache: each segment recomputes its whole context.

        Segment ``tau`` depends on segments ``tau - c .. tau`` with ``c`` =
        :attr:`context_segments` (each layer reaches ``M`` states further
        back). Running the parallel form on them from an empty memory gives
        exactly the cached result for segment ``tau``, at about ``c + 1`` times the work.
        """
        self._check_tokens(tokens)
        c, L = self.context_segments, self.segment
        out = []
        for start in range(0, tokens.shape[1], L):
            first = max(0, start - c * L)
            end = min(start + L, tokens.shape[1])
            h = self._embed(tokens[:, first:end])
            for block in self.blocks:
                h, _ = block(h)
            out.append(self.head(self.norm(h[:, start - first :])))
        return torch.cat(out, 1)


# --------------------------------------------------------------------------- the chapter's task


@dataclass
class LagCopyTask:
    """Predict the token seen ``lag`` positions earlier: with ``lag = L``, always in the *previous* segment.

    ``sample`` gives ``x (B, n)`` random tokens, ``n = segments * segment``, and
    ``y (B, n)`` with ``y[t] = x[t - lag]`` for ``t >= lag`` and ``-100``
    (ignored) before. A model that sees only its own segment can only guess
    (accuracy ``1 / vocab``); one with a memory of ``M >= lag`` states can copy.

    ``near`` (optional, ``< lag``): a second, nearer lag; the target is then the
    *pair* ``y[t] = x[t - near] + vocab * x[t - lag]`` (``vocab**2`` classes,
    :attr:`classes`), for ``t >= lag``. The near copy gives a lower layer its own
    reason to keep ``x[s - near]`` in state ``s``, which a layer above can then read
    from the memory (the two-layer path to a lag longer than ``M``).
    """

    vocab: int = 16
    segment: int = 8
    segments: int = 4
    lag: int | None = None
    near: int | None = None

    def __post_init__(self) -> None:
        self.lag = self.segment if self.lag is None else self.lag
        if self.vocab < 2 or self.segment < 1 or self.segments < 2 or not 1 <= self.lag < self.length:
            raise ValueError(f"need vocab >= 2, segment >= 1, segments >= 2 and 1 <= lag < n, got {self}")
        if self.near is not None and not 1 <= self.near < self.lag:
            raise ValueError(f"near must satisfy 1 <= near < lag, got near={self.near}, lag={self.lag}")

    @property
    def length(self) -> int:
        return self.segment * self.segments

    @property
    def classes(self) -> int:
        """Classes of the target: ``vocab``, or ``vocab**2`` for the pair target."""
        return self.vocab if self.near is None else self.vocab**2

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x = torch.randint(0, self.vocab, (batch_size, self.length), generator=generator)
        lag = self.lag
        assert lag is not None  # set in __post_init__
        y = torch.full_like(x, -100)
        y[:, lag:] = x[:, :-lag]
        if self.near is not None:
            y[:, lag:] = x[:, lag - self.near : self.length - self.near] + self.vocab * y[:, lag:]
        return {"x": x, "y": y}


def lag_copy_loss(model: TransformerXLLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy over the positions that have an answer, and their accuracy."""
    logits, _ = model(batch["x"])
    y = batch["y"]
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    real = y != -100
    acc = (logits.argmax(-1) == y)[real].float().mean()
    return loss, {"acc": float(acc)}


def set_memory(model: TransformerXLLM, mem_len: int) -> None:
    """Give ``model`` (and every layer of it) a memory of ``mem_len`` states, e.g. a longer one for evaluation.

    Relative positions make this possible: the sinusoid table has a code for any distance,
    so nothing in the trained weights is tied to the ``M`` used in training.
    """
    check_int("mem_len", mem_len, 0)
    model.mem_len = mem_len
    for block in model.blocks:
        assert isinstance(block, _Block)
        block.attn.mem_len = mem_len


def train_lag_copy(
    task: LagCopyTask,
    *,
    seed: int,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-2,
    layers: int = 1,
    segment: int | None = None,
    mem_len: int | None = None,
    positions: Positions = "relative",
    embed_dim: int = 32,
    num_heads: int = 2,
    ff_mult: int = 1,
    log_every: int = 5,
    device: torch.device | str = "cpu",
) -> tuple[TransformerXLLM, History]:
    """Train a :class:`TransformerXLLM` on ``task`` in the parallel form (seeded: same batches for every arm).

    ``segment`` (default: the task's ``L``) and ``mem_len`` (default ``L``) set the model's
    ``L`` and ``M``; ``segment=2L, mem_len=0`` is a vanilla model with twice the context.
    """

    L = task.segment if segment is None else segment
    M = task.segment if mem_len is None else mem_len
    set_seed(seed)
    model = TransformerXLLM(
        task.vocab, embed_dim, num_heads, layers=layers, segment=L, mem_len=M, ff_mult=ff_mult, positions=positions,
        num_outputs=task.classes,
    )
    hist = train(model, task.sample, lag_copy_loss, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                 log_every=log_every, progress=False, device=device)
    return model.cpu(), hist


@torch.no_grad()
def lag_copy_accuracy(
    model: TransformerXLLM, task: LagCopyTask, *, seed: int, batch_size: int = 512, mem_len: int | None = None
) -> float:
    """Held-out accuracy over the positions with an answer (``t >= lag``), optionally with another memory ``M``.

    The batch is drawn from ``seed`` (use one seed per training seed, the same for every arm).
    The model's own ``M`` is restored afterwards.
    """
    batch = task.sample(batch_size, torch.Generator().manual_seed(seed))
    before = model.mem_len
    was_training = model.training
    model.eval()
    try:
        if mem_len is not None:
            set_memory(model, mem_len)
        return lag_copy_loss(model, batch)[1]["acc"]
    finally:
        set_memory(model, before)
        model.train(was_training)
