r"""Chapter 14 -- Transformer-XL recurrence: segment memory with stop-gradient and relative positions.

**Segment-level recurrence** (Dai et al. 2019, section 3.2). A long text is cut
into segments of ``L`` tokens. Layer ``n`` of segment ``tau + 1`` reads, as
extra keys and values, the ``M`` hidden states of layer ``n - 1`` that came
just before it (the *memory*), with the gradient stopped:

.. math::

    \tilde h^{n-1}_{\tau+1} = [\operatorname{SG}(m^{n-1}_{\tau}) \circ h^{n-1}_{\tau+1}], \qquad
    q = h^{n-1}_{\tau+1} W_q^\top, \quad k = \tilde h^{n-1}_{\tau+1} W_{k}^\top, \quad
    v = \tilde h^{n-1}_{\tau+1} W_v^\top

Shapes: current segment ``(B, L, E)``, memory ``(B, M, E)``, so ``K = M + L``
keys per query; query ``i`` (position ``M + i`` on the key axis) sees keys
``j <= M + i``.

**Relative positions** (section 3.3). The score of query ``i`` and key ``j``
depends on the distance ``i - j`` only, through four terms:

.. math::

    A^{\mathrm{rel}}_{i,j} =
    \underbrace{q_i^\top k_j}_{(a)} + \underbrace{q_i^\top W_R R_{i-j}}_{(b)}
    + \underbrace{u^\top k_j}_{(c)} + \underbrace{v^\top W_R R_{i-j}}_{(d)}
    = (q_i + u)^\top k_j + (q_i + v)^\top W_R R_{i-j}

with ``R`` the sinusoid table (no learned absolute positions), ``W_R`` a
learned projection and ``u, v`` learned per-head biases; the weights are
``softmax(A / sqrt(d_h))`` over the visible keys.

**The rel-shift trick** (appendix B). ``(q_i + v)^T W_R R_d`` is computed for
every query and every distance ``d = K-1, ..., 0`` as one ``(L, K)`` matrix
product; :func:`rel_shift` then moves row ``i`` left by ``L - 1 - i`` places
with a pad and two reshapes (no gather), so that column ``j`` holds distance
``M + i - j``. :func:`relative_scores_explicit` computes the same by indexing
each distance: the reference.

**Two ways to run the same model.** :meth:`TransformerXLAttention.forward`
(the *parallel* form, used for training and by the comparison) cuts a whole
sequence into blocks of ``L`` and attends every block to ``[memory | block]``
at once: ``O(n (M + L) d)`` time and memory, never an ``n x n`` matrix.
:meth:`TransformerXLAttention.attend_segment` is the *recurrent* form: one
segment and a given memory. :class:`TransformerXLLM` evaluates a stream with
the cache (:meth:`~TransformerXLLM.evaluate_cached`, each segment computed
once) or by recomputing each segment's whole context from scratch
(:meth:`~TransformerXLLM.evaluate_recompute`); the outputs are equal.

Dai, Yang, Yang, Carbonell, Le, Salakhutdinov, "Transformer-XL: Attentive
Language Models Beyond a Fixed-Length Context", ACL 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .checks import check_int, check_heads, check_tensor, check_tokens, empty_batch
from .core import AttentionOutput, masked_softmax, scaled_dot_product_attention
from .registry import register

__all__ = [
    "rel_shift",
    "sinusoid_table",
    "relative_scores_explicit",
    "TransformerXLAttention",
    "transformer_xl_dense",
    "TransformerXLLM",
    "LagCopyTask",
    "lag_copy_loss",
]


def rel_shift(x: Tensor) -> Tensor:
    r"""The rel-shift of Transformer-XL (appendix B): ``out[..., i, j] = x[..., i, j + L - 1 - i]``.

    ``x`` ``(..., L, K)`` holds, in column ``c``, the score for distance
    ``K - 1 - c`` (distances in *descending* order, ``K - 1 .. 0``). After the
    shift, column ``j`` of row ``i`` holds distance ``K - L + i - j`` (that is
    ``M + i - j``, the distance from query ``i`` to key ``j``) for every
    ``j <= K - L + i``; the entries right of that (future keys) are
    meaningless and must be masked. Cost: one pad and two reshapes, ``O(L K)``.
    """
    *lead, length, keys = x.shape
    if keys < length:
        raise ValueError(f"rel_shift needs at least as many keys as queries (K >= L), got L={length}, K={keys}")
    padded = F.pad(x, (1, 0))  # (..., L, K + 1): a zero column in front
    padded = padded.reshape(*lead, keys + 1, length)  # reread the same numbers as K + 1 rows of L
    return padded[..., 1:, :].reshape(*lead, length, keys)  # drop the first row, read back as (L, K)


def sinusoid_table(distances: Tensor, dim: int) -> Tensor:
    """Sinusoid embeddings ``R_d = [sin(d w_0), ..., sin(d w_{dim/2-1}), cos(d w_0), ...]``, ``w_k = 10000^{-2k/dim}``.

    ``distances (K,)`` -> ``(K, dim)`` (the same table as Vaswani et al. 2017,
    indexed by a distance instead of a position).
    """
    if dim % 2:
        raise ValueError(f"the sinusoid table needs an even width, got {dim}")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float64) / dim))
    angles = distances.to(torch.float64)[:, None] * inv_freq[None, :]  # (K, dim/2)
    return torch.cat([angles.sin(), angles.cos()], -1)


def relative_scores_explicit(q: Tensor, k: Tensor, r_proj: Tensor, u: Tensor, v: Tensor, mem_len: int) -> Tensor:
    r"""Reference: the four terms (a)-(d) with each distance looked up, no shift.

    Args:
        q: ``(B, h, L, d)`` queries; ``k`` ``(B, h, K, d)`` keys, ``K = mem_len + L``.
        r_proj: ``(D, h, d)``: ``W_R R_dist`` for distances ``dist = 0 .. D-1`` (ascending), ``D >= K``.
        u, v: ``(h, d)``.

    Returns:
        ``(B, h, L, K)`` unscaled scores; entries of future keys (``j > mem_len + i``) are 0.
    """
    L, K = q.shape[-2], k.shape[-2]
    i = torch.arange(L, device=q.device)[:, None]
    j = torch.arange(K, device=q.device)[None, :]
    dist = mem_len + i - j  # (L, K): distance from query i to key j
    visible = dist >= 0
    r_ij = r_proj[dist.clamp(min=0)]  # (L, K, h, d): R_{i-j} projected, looked up per pair
    a = torch.einsum("bhid,bhjd->bhij", q, k)
    b = torch.einsum("bhid,ijhd->bhij", q, r_ij)
    c = torch.einsum("hd,bhjd->bhj", u, k)[:, :, None, :]
    d = torch.einsum("hd,ijhd->hij", v, r_ij)[None]
    return (a + b + c + d) * visible


@register(
    "transformer_xl",
    paper="Dai et al. 2019",
    complexity="O(n (L + M) d)",
    chapter=14,
    summary="segments of L tokens attend to [stop-gradient memory of M states | segment] with relative positions (u, v, rel-shift)",
    build=lambda embed_dim, num_heads: TransformerXLAttention(embed_dim, num_heads, segment=8, mem_len=8),
)
class TransformerXLAttention(nn.Module):
    """Transformer-XL attention: relative positions, memory of the previous states with stop-gradient.

    Args:
        embed_dim: model width ``E`` (even: the sinusoid table splits it into sin and cos).
        num_heads: heads ``h`` (must divide ``E``).
        segment: ``L``, tokens per segment in the parallel form :meth:`forward`.
        mem_len: ``M``, states kept as memory (0: no memory, a vanilla segment model).
            The registry's ``build`` uses ``L = M = 8``.
        dropout: dropout on the attention weights during training.

    Parameters: ``qkv`` (``W_q; W_k; W_v``), ``r_net`` (``W_R``), ``u`` and
    ``v`` ``(h, d_h)`` (the biases of terms (c) and (d)), ``out_proj``.
    """

    def __init__(self, embed_dim: int, num_heads: int, segment: int = 8, mem_len: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads)
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (sinusoid table), got {embed_dim}")
        check_int("segment", segment, 1)
        check_int("mem_len", mem_len, 0)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.segment, self.mem_len, self.dropout = segment, mem_len, dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)  # [W_q; W_k,E; W_v]
        self.r_net = nn.Linear(embed_dim, embed_dim, bias=False)  # W_k,R
        self.u = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # bias of term (c): content
        self.v = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # bias of term (d): position
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.normal_(self.u, std=0.02)
        nn.init.normal_(self.v, std=0.02)

    # ------------------------------------------------------------------ pieces shared by both forms

    def projected_positions(self, distances: Tensor, dtype: torch.dtype) -> Tensor:
        """``W_R R_d`` for the given distances: ``(K,) -> (K, h, d_h)``."""
        table = sinusoid_table(distances, self.embed_dim).to(dtype)
        return rearrange(self.r_net(table), "k (h d) -> k h d", h=self.num_heads)

    def _scores_bias(self, q: Tensor, keys: int) -> Tensor:
        """Terms (b) + (d), shifted into place: ``q (B, h, L, d) -> (B, h, L, K)``."""
        distances = torch.arange(keys - 1, -1, -1, device=q.device)  # K-1 .. 0: the order rel_shift expects
        r = self.projected_positions(distances, q.dtype)  # (K, h, d)
        bd = torch.einsum("bhid,khd->bhik", q + self.v[:, None, :], r)  # (B, h, L, K), column c = distance K-1-c
        return rel_shift(bd)

    def attend_segment(
        self, x: Tensor, memory: Tensor | None = None, memory_mask: Tensor | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """The recurrent form: one segment ``x (B, L, E)`` attends to ``[SG(memory) (B, M, E) | x]``, causally.

        Args:
            x: the current segment.
            memory: the states before it (``None`` or ``M = 0``: no memory). Detached here (stop-gradient).
            memory_mask: ``(B, M)`` boolean, ``True`` = the memory slot holds a real state.
            need_weights: also return the weights ``(B, h, L, M + L)`` over ``[memory | segment]``.

        Returns:
            ``(output (B, L, E), weights or None)``.
        """
        x = check_tokens(x, self.embed_dim)
        mem_len = 0
        if memory is not None:
            memory = check_tensor(memory, "memory", f"(batch, mem_len, embed_dim={self.embed_dim})", 3)
            if memory.shape[0] != x.shape[0] or memory.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"memory must have shape (batch={x.shape[0]}, mem_len, embed_dim={self.embed_dim}), got {tuple(memory.shape)}"
                )
            mem_len = memory.shape[1]
        if memory_mask is not None:
            if not isinstance(memory_mask, Tensor) or memory_mask.dtype != torch.bool:
                raise TypeError(f"memory_mask must be a torch.bool tensor (True = real state), got {getattr(memory_mask, 'dtype', type(memory_mask).__name__)}")
            if memory_mask.shape != (x.shape[0], mem_len):
                raise ValueError(f"memory_mask must have shape (batch={x.shape[0]}, mem_len={mem_len}), got {tuple(memory_mask.shape)}")
        batch, length, _ = x.shape
        keys = mem_len + length
        if empty_batch(x):
            w = x.new_zeros(0, self.num_heads, length, keys) if need_weights else None
            return AttentionOutput(x.new_zeros(0, length, self.embed_dim), w)
        context = x if mem_len == 0 else torch.cat([memory.detach(), x], 1)  # (B, K, E): SG(m) o h
        wq = self.qkv.weight[: self.embed_dim]
        wkv = self.qkv.weight[self.embed_dim :]
        q = rearrange(x @ wq.T, "b l (h d) -> b h l d", h=self.num_heads)  # (B, h, L, d)
        k, v = rearrange(context @ wkv.T, "b k (two h d) -> two b h k d", two=2, h=self.num_heads)  # (B, h, K, d)
        scale = 1.0 / math.sqrt(self.head_dim)
        bias = self._scores_bias(q, keys) * scale  # terms (b) + (d), scaled: (B, h, L, K)
        # causal: query i (key-axis position M + i) sees keys j <= M + i
        visible = torch.ones(length, keys, dtype=torch.bool, device=x.device).tril(mem_len)
        if memory_mask is not None:
            visible = visible & torch.cat([memory_mask, memory_mask.new_ones(batch, length)], 1)[:, None, None, :]
        additive = bias.masked_fill(~visible, float("-inf"))
        # terms (a) + (c) = (q + u)^T k in the attention core; (b) + (d) enter as an additive mask
        out, weights = scaled_dot_product_attention(
            q + self.u[:, None, :], k, v, attn_mask=additive, scale=scale,
            dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights,
        )
        return AttentionOutput(self.out_proj(rearrange(out, "b h l d -> b l (h d)")), weights)

    # ------------------------------------------------------------------ the parallel form

    def forward(self, x: Tensor, need_weights: bool = False) -> AttentionOutput:
        """The parallel form over a whole sequence ``x (B, n, E)``: every segment at once.

        The sequence is cut into ``ceil(n / L)`` segments; segment ``b`` attends
        to ``[SG(x[bL - M : bL]) | x[bL : bL + L]]`` (memory slots before
        position 0 are masked). Equal to running :meth:`attend_segment` segment
        by segment with the previous ``M`` states as memory, in ``O(n (M + L) d)``.

        Returns:
            ``(output (B, n, E), weights (B, h, n, n) | None)``; the weights are
            scattered from the segments into a dense matrix (small ``n`` only).
        """
        x = check_tokens(x, self.embed_dim)
        batch, n, _ = x.shape
        if empty_batch(x):
            return AttentionOutput(x.new_zeros(0, n, self.embed_dim), x.new_zeros(0, self.num_heads, n, n) if need_weights else None)
        L, M = self.segment, self.mem_len
        nb = -(-n // L)
        n_pad = nb * L
        cur = rearrange(F.pad(x, (0, 0, 0, n_pad - n)), "b (nb l) e -> (b nb) l e", l=L)  # (B*nb, L, E)
        memory = mask = None
        if M > 0:
            # position bL - M + c of x for slot c of segment b; before position 0: padding, masked
            front = F.pad(x.detach(), (0, 0, M, n_pad - n))  # (B, M + n_pad, E)
            memory = rearrange(front.unfold(1, M, L)[:, :nb], "b nb e m -> (b nb) m e")  # (B*nb, M, E)
            pos = torch.arange(nb, device=x.device)[:, None] * L - M + torch.arange(M, device=x.device)[None, :]
            mask = (pos >= 0).repeat(batch, 1)  # (B*nb, M)
        out, wb = self.attend_segment(cur, memory, mask, need_weights=need_weights)
        out = rearrange(out, "(b nb) l e -> b (nb l) e", b=batch)[:, :n]
        weights = None
        if wb is not None:
            weights = _scatter_segments(wb, batch, nb, L, M)[:, :, :n, :n]
        return AttentionOutput(out, weights)


def _scatter_segments(wb: Tensor, batch: int, nb: int, L: int, M: int) -> Tensor:
    """Segment weights ``(B*nb, h, L, M + L)`` -> dense ``(B, h, nb*L, nb*L)`` (zeros outside ``[memory | segment]``)."""
    wb = rearrange(wb, "(b nb) h l k -> b h nb l k", b=batch)
    width = M + nb * L  # key axis shifted by M: position p sits at column p + M
    cols = torch.arange(nb, device=wb.device)[:, None] * L + torch.arange(M + L, device=wb.device)[None, :]  # (nb, M+L)
    dense = wb.new_zeros(*wb.shape[:-1], width)
    dense = dense.scatter(-1, cols[:, None, :].expand(nb, L, M + L).expand_as(wb), wb)
    return rearrange(dense, "b h nb l p -> b h (nb l) p")[..., M:]


def transformer_xl_dense(
    layer: TransformerXLAttention, x: Tensor, need_weights: bool = False, positions: str = "gather"
) -> AttentionOutput:
    """Baseline: the parallel form as one dense ``n x n`` computation with a mask (the reference, ``O(n^2 d)``).

    Every score ``(q_i + u)^T k_j + (q_i + v)^T W_R R_{i-j}`` is formed for all
    ``n^2`` pairs; query ``i`` in segment ``s = i // L`` may see keys
    ``sL - M <= j <= i``; keys before ``sL`` come from ``SG(x)``
    (stop-gradient), as in the memory. ``positions="gather"`` looks up
    ``W_R R_{i-j}`` for each pair (the independent reference, an
    ``(n, n, h, d)`` tensor: small ``n`` only); ``positions="shift"`` uses
    :func:`rel_shift` on the ``n x n`` matrix (the dense baseline of the
    benchmark, ``O(n^2)`` memory). Use it to check
    :meth:`TransformerXLAttention.forward`, never to run a model.
    """
    if positions not in ("gather", "shift"):
        raise ValueError(f"positions must be 'gather' or 'shift', got {positions!r}")
    x = check_tokens(x, layer.embed_dim)
    n, E, h = x.shape[1], layer.embed_dim, layer.num_heads
    split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=h)  # noqa: E731
    wq, wk, wv = layer.qkv.weight.split(E)
    q = split(x @ wq.T)
    k, v = split(x @ wk.T), split(x @ wv.T)
    k_sg, v_sg = split(x.detach() @ wk.T), split(x.detach() @ wv.T)  # what the memory holds
    i = torch.arange(n, device=x.device)[:, None]
    j = torch.arange(n, device=x.device)[None, :]
    start = (i // layer.segment) * layer.segment
    visible = (j <= i) & (j >= start - layer.mem_len)  # (n, n)
    in_memory = j < start
    content_cur = torch.einsum("bhid,bhjd->bhij", q + layer.u[:, None, :], k)
    content_mem = torch.einsum("bhid,bhjd->bhij", q + layer.u[:, None, :], k_sg)
    if positions == "gather":
        r = layer.projected_positions(torch.arange(n, device=x.device), x.dtype)  # (n, h, d), ascending distances
        r_ij = r[(i - j).clamp(min=0)]  # (n, n, h, d)
        position = torch.einsum("bhid,ijhd->bhij", q + layer.v[:, None, :], r_ij)
    else:
        position = layer._scores_bias(q, n)  # rel_shift over all n keys (M = 0 in its terms)
    scores = (torch.where(in_memory, content_mem, content_cur) + position) / math.sqrt(layer.head_dim)
    w = masked_softmax(scores, visible)
    out = torch.where(in_memory, w, 0) @ v_sg + torch.where(in_memory, 0, w) @ v
    return AttentionOutput(layer.out_proj(rearrange(out, "b h n d -> b n (h d)")), w if need_weights else None)


# --------------------------------------------------------------------------- a small Transformer-XL language model


class _Block(nn.Module):
    """Pre-norm block: ``h + Attn(LN(h))`` then ``h + FF(LN(h))``."""

    def __init__(self, embed_dim: int, num_heads: int, segment: int, mem_len: int, ff_mult: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.attn = TransformerXLAttention(embed_dim, num_heads, segment, mem_len)
        self.ff = nn.Sequential(nn.Linear(embed_dim, ff_mult * embed_dim), nn.GELU(), nn.Linear(ff_mult * embed_dim, embed_dim))

    def forward(self, h: Tensor, memory: Tensor | None = None, need_weights: bool = False, parallel: bool = True) -> tuple[Tensor, Tensor | None]:
        if parallel:
            a, w = self.attn(self.norm1(h), need_weights=need_weights)
        else:
            mem = None if memory is None else self.norm1(memory)
            a, w = self.attn.attend_segment(self.norm1(h), mem, need_weights=need_weights)
        h = h + a
        return h + self.ff(self.norm2(h)), w


class TransformerXLLM(nn.Module):
    """A small causal Transformer-XL language model: embeddings, ``layers`` blocks, a linear head.

    Memory of layer ``n`` = the last ``M`` *inputs* of block ``n`` (``h^{n-1}``),
    detached. :meth:`forward` runs a whole sequence in the parallel form;
    :meth:`step` runs one segment given the memories (the cache);
    :meth:`evaluate_cached` and :meth:`evaluate_recompute` evaluate a long
    stream the two ways.

    Shapes: ``tokens`` ``(B, n)`` integer ids -> logits ``(B, n, vocab)``.
    """

    def __init__(
        self, vocab: int, embed_dim: int = 32, num_heads: int = 2, layers: int = 1, segment: int = 8, mem_len: int = 8, ff_mult: int = 2
    ) -> None:
        super().__init__()
        check_int("layers", layers, 1)
        self.vocab, self.segment, self.mem_len = vocab, segment, mem_len
        self.embed = nn.Embedding(vocab, embed_dim)
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, segment, mem_len, ff_mult) for _ in range(layers))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab)

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

    def forward(self, tokens: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor | None]]:
        """Parallel form: logits ``(B, n, V)`` and per-layer weights ``(B, h, n, n)`` (when asked)."""
        h = self.embed(self._check_tokens(tokens))
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
        h = self.embed(self._check_tokens(tokens))
        if mems is not None and len(mems) != len(self.blocks):
            raise ValueError(f"mems must hold one tensor per layer ({len(self.blocks)}), got {len(mems)}")
        new_mems = []
        for n, block in enumerate(self.blocks):
            mem = None if mems is None or mems[n].shape[1] == 0 else mems[n]
            context = h if mem is None else torch.cat([mem, h], 1)
            new_mems.append(context[:, max(0, context.shape[1] - self.mem_len) :].detach())
            h, _ = block(h, mem, parallel=False)
        return self.head(self.norm(h)), new_mems

    @torch.no_grad()
    def evaluate_cached(self, tokens: Tensor) -> Tensor:
        """Logits of a stream ``(B, n)``, segment by segment, each computed once with the cache."""
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
        c, L = self.context_segments, self.segment
        out = []
        for start in range(0, tokens.shape[1], L):
            first = max(0, start - c * L)
            end = min(start + L, tokens.shape[1])
            h = self.embed(self._check_tokens(tokens[:, first:end]))
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
    """

    vocab: int = 16
    segment: int = 8
    segments: int = 4
    lag: int | None = None

    def __post_init__(self) -> None:
        self.lag = self.segment if self.lag is None else self.lag
        if self.vocab < 2 or self.segment < 1 or self.segments < 2 or not 1 <= self.lag < self.length:
            raise ValueError(f"need vocab >= 2, segment >= 1, segments >= 2 and 1 <= lag < n, got {self}")

    @property
    def length(self) -> int:
        return self.segment * self.segments

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x = torch.randint(0, self.vocab, (batch_size, self.length), generator=generator)
        y = torch.full_like(x, -100)
        y[:, self.lag :] = x[:, : -self.lag]
        return {"x": x, "y": y}


def lag_copy_loss(model: TransformerXLLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy over the positions that have an answer, and their accuracy."""
    logits, _ = model(batch["x"])
    y = batch["y"]
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    real = y != -100
    acc = (logits.argmax(-1) == y)[real].float().mean()
    return loss, {"acc": float(acc)}
