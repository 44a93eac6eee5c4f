"""Chapter 30's experiments: a small rotary LM that streams through an attention-sink cache, and its data.

:class:`CopyBurstStream` makes streams with stretches of unpredictable tokens (a fresh random segment, then its
copy): where the next token cannot be read from the context, a softmax head has nothing to attend to, the
situation in which a sink forms (chapter 20's copy task, made stationary so that it can be streamed).
:class:`SinkLogitAttention` is rotary attention with a learned per-head sink logit
(:func:`attn.differential.sink_logit_attention`); ``RotaryLM(sink_logit=True)`` uses it in every block.

:class:`RotaryLM` is :class:`attn.models.TokenLM` (pre-norm blocks, no learned positions) with a causal
:class:`attn.attention.Attention` with rotary positions (``position="rope"``, the package's one RoPE) in every
block; :meth:`RotaryLM.stream` decodes token by token through an :class:`attn.differential.SinkCache` (Xiao et
al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024). :class:`MotifStream` makes its
token streams; :func:`window_recompute_logits` is the baseline a streaming cache replaces.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import Attention
from ..checks import check_int
from ..core import AttentionOutput
from ..differential import SinkCache, sink_logit_attention
from ..models import TokenLM, TransformerBlock
from ..positions import RotaryEmbedding, apply_rotary

__all__ = ["CopyBurstStream", "MotifStream", "RotaryLM", "SinkLogitAttention", "window_recompute_logits",
           "stream_lm_loss", "first_tokens_mass", "uniform_first_tokens_mass", "query_row_shares", "sink_lm_run"]


@dataclass
class MotifStream:
    """Token streams for a small LM: ``BOS`` then a random motif of ``min_period..max_period`` tokens, repeated, with noise.

    Token 0 is ``BOS``. Each position copies the token one period back, except
    that with probability ``noise`` it is a fresh random token. Predicting it
    needs the last period of context (a few tokens), never the distant past:
    a sliding window should lose nothing, which is what makes an attention
    sink's eviction visible.
    """

    vocab: int = 24
    min_period: int = 3
    max_period: int = 8
    noise: float = 0.1

    def __post_init__(self) -> None:
        if self.vocab < 3 or not 1 <= self.min_period <= self.max_period or not 0 <= self.noise < 1:
            raise ValueError(f"need vocab >= 3, 1 <= min_period <= max_period, 0 <= noise < 1; got {self}")

    def stream(self, batch: int, length: int, generator: torch.Generator | None = None) -> Tensor:
        """``(batch, length)`` tokens, ``BOS`` first."""
        period = torch.randint(self.min_period, self.max_period + 1, (batch, 1), generator=generator)
        motif = torch.randint(1, self.vocab, (batch, self.max_period), generator=generator)
        pos = torch.arange(length - 1)[None, :] % period  # (B, length - 1)
        body = motif.gather(1, pos)
        fresh = torch.randint(1, self.vocab, body.shape, generator=generator)
        body = torch.where(torch.rand(body.shape, generator=generator) < self.noise, fresh, body)
        return torch.cat([torch.zeros(batch, 1, dtype=torch.long), body], 1)


@dataclass
class CopyBurstStream:
    """``BOS``, then blocks of a fresh random segment of ``min_segment..max_segment`` tokens followed by its copy.

    Token 0 is ``BOS``. Within a block, the first copy of the segment is
    unpredictable (uniform over ``1..vocab-1``): nothing in the context helps, so
    attention has nothing to read; its copy is predictable by looking one segment
    back (an induction lookup, which needs two layers). Each block draws its own
    length, so block boundaries are not at fixed positions (and the first copied
    token, which follows the last fresh one, cannot be predicted). ``sample`` returns
    the tokens and ``copy``, True where the token can be predicted from the context:
    the copied tokens after the first of each copy.
    """

    vocab: int = 64
    min_segment: int = 4
    max_segment: int = 8

    def __post_init__(self) -> None:
        if self.vocab < 3 or not 1 <= self.min_segment <= self.max_segment:
            raise ValueError(f"need vocab >= 3 and 1 <= min_segment <= max_segment; got {self}")

    def sample(self, batch: int, length: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``x (batch, length)`` tokens (``BOS`` first) and ``copy (batch, length)`` boolean."""
        check_int("batch", batch)
        check_int("length", length, low=2)
        body = length - 1
        most = body // (2 * self.min_segment) + 1  # blocks enough to fill the body
        seg = torch.randint(self.min_segment, self.max_segment + 1, (batch, most), generator=generator)
        ends = torch.cumsum(2 * seg, 1)  # (batch, most): where each block ends (exclusive)
        pos = torch.arange(body)
        block_of = (ends[:, None, :] <= pos[None, :, None]).sum(-1)  # (batch, body): the block of each position
        offset = pos[None, :] - (ends - 2 * seg).gather(1, block_of)  # position inside its block
        m = seg.gather(1, block_of)  # that block's segment length
        fresh = torch.randint(1, self.vocab, (batch, body), generator=generator)
        copy = offset >= m
        src = torch.where(copy, pos - m, pos)
        predictable = offset > m  # the first copied token follows the segment's last fresh one: not predictable  # a copied token takes the token a segment back
        tokens = fresh.gather(1, src)
        bos = torch.zeros(batch, 1, dtype=torch.long)
        return {"x": torch.cat([bos, tokens], 1),
                "copy": torch.cat([torch.zeros(batch, 1, dtype=torch.bool), predictable], 1)}


class SinkLogitAttention(Attention):
    """Causal rotary :class:`~attn.attention.Attention` with a learned sink logit ``b_h`` per head.

    The kernel is :func:`attn.differential.sink_logit_attention` (a virtual key with value zero in every
    head's softmax; the dense reference). ``b_h`` starts at 0 (softmax plus one, Miller 2023) and is learned.
    """

    def __init__(self, embed_dim: int, num_heads: int, rope_base: float = 10000.0) -> None:
        super().__init__(embed_dim, num_heads, causal=True, position="rope", rope_base=rope_base, bias=False)
        self.sink_logit = torch.nn.Parameter(torch.zeros(num_heads))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None, key_mask: Tensor | None,
               is_causal: bool, dropout_p: float, scale: float, need_weights: bool) -> AttentionOutput:
        """``q`` ``(B, h, L, d)``, ``k, v`` ``(B, h, S, d)`` -> output ``(B, h, L, d)`` and the weights."""
        out, weights = sink_logit_attention(q, k, v, self.sink_logit, causal=is_causal, attn_mask=attn_mask,
                                            key_mask=key_mask, scale=scale)
        return AttentionOutput(out, weights if need_weights else None)


class RotaryLM(TokenLM):
    """A small pre-norm causal LM with rotary positions (Su et al. 2021), for streaming past its training length.

    :class:`~attn.models.TokenLM` whose blocks mix with ``Attention(E, h, causal=True, position="rope",
    bias=False)``. ``forward(tokens (B, n), *, need_weights=False) -> LMOutput(logits (B, n, vocab), weights)``
    with positions ``0..n-1``; :meth:`stream` decodes token by token with a :class:`~attn.differential.SinkCache`.
    ``sink_logit=True``: every block's attention is a :class:`SinkLogitAttention` (a learned sink logit per head).
    """

    def __init__(self, vocab: int, embed_dim: int = 32, num_heads: int = 4, num_layers: int = 2,
                 rope_base: float = 10000.0, sink_logit: bool = False) -> None:
        check_int("vocab", vocab)
        if embed_dim % num_heads or (embed_dim // num_heads) % 2:
            raise ValueError(f"embed_dim ({embed_dim}) / num_heads ({num_heads}) must be an even integer")

        def mixer(i: int) -> Attention:
            if sink_logit:
                return SinkLogitAttention(embed_dim, num_heads, rope_base)
            return Attention(embed_dim, num_heads, causal=True, position="rope", rope_base=rope_base, bias=False)

        super().__init__(vocab, embed_dim, num_layers, mixer=mixer)
        self.embed_dim, self.num_heads, self.head_dim, self.rope_base = (
            embed_dim, num_heads, embed_dim // num_heads, rope_base)
        self.sink_logit = sink_logit

    def _layers(self) -> Iterator[tuple[TransformerBlock, Attention]]:
        """Each block and its attention, typed."""
        for block in self.blocks:
            assert isinstance(block, TransformerBlock) and isinstance(block.mixer, Attention)
            yield block, block.mixer

    @torch.no_grad()
    def stream(self, tokens: Tensor, window: int | None, sinks: int | Tensor = 0) -> Tensor:
        """Logits ``(B, n, vocab)`` of decoding ``tokens`` one at a time through a :class:`~attn.differential.SinkCache`.

        Each token's keys and values are computed once, when it arrives, and
        stored un-rotated; at each step the cached keys get positions
        ``0..size-1`` and the new query position ``size - 1``. ``sinks`` may be
        a ``(B,)`` tensor: one cache policy per row.
        """
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a (batch, n) long tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}")
        n = tokens.shape[1]
        cache = SinkCache(len(self.blocks), window, sinks)
        longest = n if window is None else min(n, window)
        rope = RotaryEmbedding(self.head_dim, self.rope_base)
        cos, sin = rope.cos_sin(torch.arange(longest, device=tokens.device), self.embed.weight.dtype)  # in-cache positions
        out = []
        for t in range(n):
            h = self.embed(tokens[:, t : t + 1])  # (B, 1, E)
            for i, (block, attn) in enumerate(self._layers()):
                x = block.norm1(h)
                q, k, v = (attn.split_heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # (B, h, 1, d)
                ks, vs = cache.append(i, k, v)
                size = ks.shape[2]
                att = attn.attend(apply_rotary(q, cos[size - 1 : size], sin[size - 1 : size]),
                                  apply_rotary(ks, cos[:size], sin[:size]), vs, attn_mask=None, key_mask=None,
                                  is_causal=False, dropout_p=0.0, scale=self.head_dim ** -0.5,
                                  need_weights=False).output  # the layer's own kernel (a sink logit if it has one)
                h = h + attn.out_proj(attn.merge_heads(att))
                if block.ffn is not None and block.norm2 is not None:
                    h = h + block.ffn(block.norm2(h))
            cache.seen += 1
            out.append(h)
        return self.head(self.norm(torch.cat(out, 1)))


@torch.no_grad()
def window_recompute_logits(model: RotaryLM, tokens: Tensor, window: int, start: int) -> Tensor:
    """The baseline a streaming cache replaces: for each position ``t >= start``, re-encode ``BOS`` + the last ``window - 1`` tokens.

    Returns the logits at positions ``start..n-1``, ``(B, n - start, vocab)``.
    """
    B, n = tokens.shape
    if not window - 1 <= start < n:
        raise ValueError(f"need window - 1 <= start < n, got window={window}, start={start}, n={n}")
    ctx = tokens[:, 1:].unfold(1, window - 1, 1)[:, start - window + 1 :]  # (B, n - start, window - 1): ends at t
    bos = tokens[:, :1, None].expand(B, ctx.shape[1], 1)
    seqs = torch.cat([bos, ctx], -1).reshape(-1, window)  # (B (n - start), window)
    return model(seqs).logits[:, -1].view(B, n - start, -1)


def stream_lm_loss(model: RotaryLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy on every position; ``acc`` and ``copy_acc`` (accuracy where ``copy`` is True)."""
    x = batch["x"]
    logits = model(x[:, :-1]).logits
    target = x[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    hit = logits.argmax(-1) == target
    metrics = {"acc": float(hit.float().mean())}
    if "copy" in batch:
        metrics["copy_acc"] = float(hit[batch["copy"][:, 1:]].float().mean())
    return loss, metrics


def first_tokens_mass(weights: Tensor, tokens: int = 1, first_query: int = 1) -> Tensor:
    """Mean attention weight on keys ``0..tokens-1`` over queries ``first_query..n-1``: ``(..., n, n) -> (...)``.

    Query ``t`` of a causal map sees ``t + 1`` keys; query 0 sees only key 0 and is left out by default.
    """
    if weights.ndim < 2 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"weights must have shape (..., n, n), got {tuple(weights.shape)}")
    check_int("tokens", tokens)
    if not 0 <= first_query < weights.shape[-2]:
        raise ValueError(f"first_query must be in [0, {weights.shape[-2]}), got {first_query}")
    return weights[..., first_query:, :tokens].sum(-1).mean(-1)


def uniform_first_tokens_mass(n: int, tokens: int = 1, first_query: int = 1) -> float:
    """What a uniform causal row puts on keys ``0..tokens-1``, averaged over queries ``first_query..n-1``: ``min(tokens, t+1)/(t+1)``."""
    t = torch.arange(first_query, n, dtype=torch.float64)
    return float((torch.clamp(t + 1, max=tokens) / (t + 1)).mean())


def query_row_shares(row: Tensor, answer: Tensor) -> dict[str, Tensor]:
    r"""Shares of a query's attention row on the answer, the distractors and the query token, per example.

    ``row`` ``(B, n_pairs + 1)``: the query's row (keys: the pairs, then the query token itself), e.g. a
    differential head's ``A_1 - \lambda A_2``, which sums to ``1 - \lambda`` and may be negative; ``answer``
    ``(B,)`` the answer pair's index. Each share is the mass divided by the row's sum (so a standard and a
    differential row compare as distributions: the shares sum to 1 in both); ``abs distractor share`` is the
    distractors' absolute weight over the row's absolute weight. Returns ``(B,)`` tensors.
    """
    if row.ndim != 2 or answer.shape != row.shape[:1]:
        raise ValueError(f"row must be (B, n_pairs + 1) and answer (B,), got {tuple(row.shape)} and {tuple(answer.shape)}")
    is_answer = torch.zeros_like(row, dtype=torch.bool)
    is_answer[torch.arange(len(row)), answer] = True
    distractor = ~is_answer
    distractor[:, -1] = False  # the query token itself
    total = row.sum(-1)
    return {
        "row sum": total,
        "answer share": (row * is_answer).sum(-1) / total,
        "distractor share": (row * distractor).sum(-1) / total,
        "query share": row[:, -1] / total,
        "abs distractor share": (row.abs() * distractor).sum(-1) / row.abs().sum(-1),
    }


def sink_lm_run(seed: int, *, sink_logit: bool, task: CopyBurstStream, held: dict[str, Tensor], window: int,
                steps: int, lr: float = 1e-2, batch_size: int = 32, embed_dim: int = 32, num_heads: int = 2,
                sinks_kept: int = 4, device: torch.device | str = "cpu") -> tuple[RotaryLM, dict[str, float]]:
    """Train one :class:`RotaryLM` on ``task`` (sequences of ``window`` tokens), then measure its sink and stream it.

    Returns the model (on the CPU, in eval mode) and one row of measurements on the held-out streams ``held``
    (``x``, ``copy`` of :meth:`CopyBurstStream.sample`, longer than ``window``):

    * ``copy accuracy``: next-token accuracy on the predictable positions inside the window (competence);
    * ``first-token mass, layer i`` / ``tokens 0-3 mass, layer i``: attention on key 0 / keys 0..3, mean over
      queries ``t >= 1``, heads and examples (:func:`first_tokens_mass`); ``virtual-sink mass, layer i``: the
      mass a sink logit takes (0 without one);
    * ``beyond: <policy>``: accuracy on the predictable positions beyond the window, streaming through a
      :class:`~attn.differential.SinkCache` of ``window`` tokens that keeps 0, 1 (``BOS``) or ``sinks_kept``
      first tokens (policies ``window``, ``window + BOS``, ``window + <sinks_kept> sinks``).
    The data seed is ``seed`` (same batches for both arms of a seed); the initialisation is seeded by ``seed`` too.
    """
    from ..train import set_seed, train

    set_seed(seed)
    lm = RotaryLM(task.vocab, embed_dim, num_heads, 2, sink_logit=sink_logit)
    train(lm, lambda b, g: task.sample(b, window, g), stream_lm_loss, steps=steps, batch_size=batch_size, lr=lr,
          seed=seed, progress=False, device=device)
    lm = lm.cpu().eval()
    x, copy = held["x"], held["copy"]
    if x.shape[1] <= window + 1:
        raise ValueError(f"held-out streams must be longer than window + 1 = {window + 1}, got {x.shape[1]}")
    row: dict[str, float] = {}
    with torch.no_grad():
        out = lm(x[:, :window], need_weights=True)
        hit = out.logits[:, :-1].argmax(-1) == x[:, 1:window]
        row["copy accuracy"] = float(hit[copy[:, 1:window]].float().mean())
        for i, w in enumerate(out.weights):
            assert w is not None
            row[f"first-token mass, layer {i}"] = float(first_tokens_mass(w, 1).mean())
            row[f"tokens 0-3 mass, layer {i}"] = float(first_tokens_mass(w, 4).mean())
            row[f"virtual-sink mass, layer {i}"] = float(1 - w[..., 1:, :].sum(-1).mean())
        B = len(x)
        policies = {"window": 0, "window + BOS": 1, f"window + {sinks_kept} sinks": sinks_kept}
        logits = lm.stream(x.repeat(len(policies), 1), window=window,
                           sinks=torch.tensor([k for k in policies.values() for _ in range(B)]))
        for j, name in enumerate(policies):
            beyond = (logits[j * B : (j + 1) * B, :-1].argmax(-1) == x[:, 1:])[:, window:]
            row[f"beyond: {name}"] = float(beyond[copy[:, window + 1 :]].float().mean())
    return lm, row
