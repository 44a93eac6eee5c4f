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
segment and a given memory. The chapter's language model
(:class:`attn.experiments.transformer_xl.TransformerXLLM`) evaluates a stream
with the cache (each segment computed once) or by recomputing each segment's
whole context from scratch; the outputs are equal.

Dai, Yang, Yang, Carbonell, Le, Salakhutdinov, "Transformer-XL: Attentive
Language Models Beyond a Fixed-Length Context", ACL 2019.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .checks import check_heads, check_int, check_layer_dtype, check_same_dtype, check_tensor, check_tokens, empty_batch
from .core import AttentionOutput, masked_softmax, scaled_dot_product_attention
from .masks import check_key_mask
from .positions import sinusoidal_embedding
from .registry import register

__all__ = [
    "rel_shift",
    "relative_sinusoids",
    "relative_scores_explicit",
    "TransformerXLAttention",
    "transformer_xl_dense",
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
    check_tensor(x, "x", "(..., L, K)")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., L, K), at least 2-D, got {x.ndim}-D shape {tuple(x.shape)}")
    *lead, length, keys = x.shape
    if keys < length:
        raise ValueError(f"rel_shift needs at least as many keys as queries (K >= L), got L={length}, K={keys}")
    padded = F.pad(x, (1, 0))  # (..., L, K + 1): a zero column in front
    padded = padded.reshape(*lead, keys + 1, length)  # reread the same numbers as K + 1 rows of L
    return padded[..., 1:, :].reshape(*lead, length, keys)  # drop the first row, read back as (L, K)


def relative_sinusoids(distances: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """Dai et al.'s ``R_d = [sin(d w_0), ..., sin(d w_{dim/2-1}), cos(d w_0), ...]``, ``w_k = 10000^{-2k/dim}``.

    ``distances (K,)`` -> ``(K, dim)``: the book's one sinusoid table
    (:func:`attn.positions.sinusoidal_embedding`, Vaswani et al. 2017, indexed by a distance
    instead of a position), its interleaved ``sin, cos`` pairs regrouped into the two halves of
    Transformer-XL's code, so that ``W_R`` has the layout of the paper's weights. Computed in
    float64 and returned in ``dtype`` (default ``torch.get_default_dtype()``), as the positions module does.
    """
    if not isinstance(distances, Tensor) or distances.ndim != 1 or distances.dtype == torch.bool or distances.is_complex():
        got = f"shape {tuple(distances.shape)}, dtype {distances.dtype}" if isinstance(distances, Tensor) else type(distances).__name__
        raise TypeError(f"distances must be a 1-D real torch.Tensor (K,), got {got}")
    check_int("dim", dim, 2)
    if dim % 2:
        raise ValueError(f"the sinusoid table needs an even width, got {dim}")
    table = sinusoidal_embedding(distances, dim, dtype=dtype)  # (K, dim): sin, cos interleaved
    return rearrange(table, "k (half two) -> k (two half)", two=2)


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
    causal=True,
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

    def __init__(self, embed_dim: int, num_heads: int, segment: int = 8, mem_len: int = 8, *, dropout: float = 0.0) -> None:
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
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
        table = relative_sinusoids(distances, self.embed_dim, dtype)
        return rearrange(self.r_net(table), "k (h d) -> k h d", h=self.num_heads)

    def _position_table(self, keys: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``W_R R_d`` for ``d = K-1 .. 0`` (the order :func:`rel_shift` expects): ``(K, h, d_h)``."""
        return self.projected_positions(torch.arange(keys - 1, -1, -1, device=device), dtype)

    def _scores_bias(self, q: Tensor, keys: int, table: Tensor | None = None) -> Tensor:
        """Terms (b) + (d), shifted into place: ``q (B, h, L, d) -> (B, h, L, K)``.

        ``table``: a :meth:`_position_table` of ``K' >= K`` distances to reuse (its last ``K`` rows are ``K-1 .. 0``).
        """
        r = self._position_table(keys, q.dtype, q.device) if table is None else table[table.shape[0] - keys :]  # (K, h, d)
        bd = torch.einsum("bhid,khd->bhik", q + self.v[:, None, :], r)  # (B, h, L, K), column c = distance K-1-c
        return rel_shift(bd)

    def attend_segment(
        self,
        x: Tensor,
        *,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        need_weights: bool = False,
        norm: nn.Module | None = None,
    ) -> AttentionOutput:
        r"""The recurrent form: one segment ``x (B, L, E)`` attends to ``[SG(memory) (B, M, E) | x]``, causally.

        Args:
            x: the current segment.
            memory: the states before it (``None`` or ``M = 0``: no memory). Detached here (stop-gradient).
            memory_mask: ``(B, M)`` boolean, ``True`` = the memory slot holds a real state.
            need_weights: also return the weights ``(B, h, L, M + L)`` over ``[memory | segment]``.
            norm: the pre-norm of a block (a ``LayerNorm``), applied *after* the stop-gradient:
                the layer reads ``norm([SG(memory) | x])``, as in Dai et al.'s code, so the norm's
                parameters get gradient through the memory path too (``LN(SG(m))``, not ``SG(LN(m))``).
            key_mask: ``(B, L)`` boolean, ``True`` = real token of this segment; padded tokens are
                never attended to (a query with no visible key gets a zero row).

        Returns:
            ``(output (B, L, E), weights or None)``.
        """
        x = check_tokens(x, self.embed_dim)
        check_layer_dtype(x, self.qkv.weight)
        mem_len = 0
        if memory is not None:
            memory = check_tensor(memory, "memory", f"(batch, mem_len, embed_dim={self.embed_dim})", 3)
            if memory.shape[0] != x.shape[0] or memory.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"memory must have shape (batch={x.shape[0]}, mem_len, embed_dim={self.embed_dim}), got {tuple(memory.shape)}"
                )
            check_same_dtype(("x", x), ("memory", memory))
            mem_len = memory.shape[1]
        if memory_mask is not None:
            if not isinstance(memory_mask, Tensor) or memory_mask.dtype != torch.bool:
                raise TypeError(f"memory_mask must be a torch.bool tensor (True = real state), got {getattr(memory_mask, 'dtype', type(memory_mask).__name__)}")
            if memory_mask.shape != (x.shape[0], mem_len):
                raise ValueError(f"memory_mask must have shape (batch={x.shape[0]}, mem_len={mem_len}), got {tuple(memory_mask.shape)}")
        check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="L")
        if empty_batch(x):
            w = x.new_zeros(0, self.num_heads, x.shape[1], mem_len + x.shape[1]) if need_weights else None
            return AttentionOutput(x.new_zeros(0, x.shape[1], self.embed_dim), w)
        memory_kv = None
        if memory is None or mem_len == 0:
            memory_mask = None
        else:
            memory = memory.detach()  # SG(m) ...
            memory_kv = self._project_kv(memory if norm is None else norm(memory))  # ... then the norm: LN(SG(m))
        return self._attend(x if norm is None else norm(x), memory_kv, memory_mask, need_weights, key_mask=key_mask)

    def _project_kv(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``states (B, T, E)``: ``(B, h, T, d)`` each (``W_k``, ``W_v``)."""
        wkv = self.qkv.weight[self.embed_dim :]
        k, v = rearrange(states @ wkv.T, "b t (two h d) -> two b h t d", two=2, h=self.num_heads)
        return k, v

    def _attend(
        self,
        x: Tensor,
        memory_kv: tuple[Tensor, Tensor] | None,
        memory_mask: Tensor | None,
        need_weights: bool,
        table: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> AttentionOutput:
        """The attention of :meth:`attend_segment` on checked inputs.

        ``x (B, L, E)``: the (normalised) segment; ``memory_kv``: keys and values ``(B, h, M, d)``
        of the memory, already projected from ``SG(m)``; they enter as given. ``table``: a
        position table to share between calls (see :meth:`_scores_bias`). ``memory_mask (B, M)``
        and ``key_mask (B, L)``: ``True`` = a real state / token (``None``: all real); a key that
        is ``False`` in either is hidden from every query.
        """
        batch, length, _ = x.shape
        mem_len = 0 if memory_kv is None else memory_kv[0].shape[2]
        keys = mem_len + length
        wq = self.qkv.weight[: self.embed_dim]
        q = rearrange(x @ wq.T, "b l (h d) -> b h l d", h=self.num_heads)  # (B, h, L, d)
        k, v = self._project_kv(x)  # (B, h, L, d)
        if memory_kv is not None:  # keys and values of SG(m) o h: (B, h, K, d)
            k, v = torch.cat([memory_kv[0], k], 2), torch.cat([memory_kv[1], v], 2)
        scale = 1.0 / math.sqrt(self.head_dim)
        bias = self._scores_bias(q, keys, table) * scale  # terms (b) + (d), scaled: (B, h, L, K)
        # causal: query i (key-axis position M + i) sees keys j <= M + i
        visible = torch.ones(length, keys, dtype=torch.bool, device=x.device).tril(mem_len)
        if memory_mask is not None or key_mask is not None:
            mem_part = visible.new_ones(batch, mem_len) if memory_mask is None else memory_mask
            seg_part = visible.new_ones(batch, length) if key_mask is None else key_mask
            visible = visible & torch.cat([mem_part, seg_part], 1)[:, None, None, :]  # (B, 1, L, K)
        additive = bias.masked_fill(~visible, float("-inf"))
        # terms (a) + (c) = (q + u)^T k in the attention core; (b) + (d) enter as an additive mask
        out, weights = scaled_dot_product_attention(
            q + self.u[:, None, :], k, v, attn_mask=additive, scale=scale,
            dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights,
        )
        return AttentionOutput(self.out_proj(rearrange(out, "b h l d -> b l (h d)")), weights)

    # ------------------------------------------------------------------ the parallel form

    def effective_sizes(self, n: int) -> tuple[int, int]:
        """``(L, M)`` used on a sequence of ``n`` tokens: ``L' = min(L, n)``, ``M' = min(M, (ceil(n / L') - 1) L')``.

        A segment longer than the sequence is the sequence; memory slots before position 0
        are always masked, so at most the ``(ceil(n / L') - 1) L'`` states before the last
        segment are ever read. The result is the same whatever ``L`` and ``M`` were set to.
        """
        L = max(1, min(self.segment, n))
        return L, min(self.mem_len, (-(-n // L) - 1) * L)

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        norm: nn.Module | None = None,
    ) -> AttentionOutput:
        """The parallel form over a whole sequence ``x (B, n, E)``: every segment at once.

        The sequence is cut into ``ceil(n / L)`` segments; segment ``b`` attends
        to ``[SG(x[bL - M : bL]) | x[bL : bL + L]]`` (memory slots before
        position 0 are masked). Equal to running :meth:`attend_segment` segment
        by segment with the previous ``M`` states as memory, in ``O(n (M + L) d)``.

        Never more work than dense attention over ``n``: ``L`` and ``M`` are clamped to the
        sequence (:meth:`effective_sizes`), the full segments run as one batch and a shorter
        last segment runs on its own (no padding), and the memory's keys and values are
        projected once per position, not once per segment that reads them.

        Args:
            is_causal: ``None`` or ``True``: Transformer-XL is always causal (a query sees its own segment up
                to itself and the memory before it); ``False`` is a ``ValueError``.
            need_weights: also return the weights over the ``S = n`` positions of ``x``.
            norm: a block's pre-norm, applied after the stop-gradient (see :meth:`attend_segment`):
                queries from ``norm(x)``, memory from ``norm(SG(x))``.
            key_mask: ``(B, n)`` boolean, ``True`` = real token (keyword only). A padded position
                ``p`` is never attended to: neither as a key of its own segment nor as a memory
                slot of a later segment (the memory is read from ``x``, so the same mask hides it
                there). A query with no visible key (e.g. a left-padded first token) gets a zero
                row of weights and the output ``out_proj(0)``. ``None``: every token is real, and
                the work is exactly that of the unmasked form.

        Returns:
            ``(output (B, n, E), weights (B, h, n, S=n) | None)``: the key axis is the
            sequence itself (memory slots are earlier positions of ``x``); the weights are
            scattered from the segments into a dense matrix (small ``n`` only).
        """
        if is_causal is not None and not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
        if is_causal is False:
            raise ValueError(
                "TransformerXLAttention is always causal (each query sees the memory and its segment up to itself; "
                "the memory holds earlier positions only): is_causal=False is not supported; pass None or True"
            )
        x = check_tokens(x, self.embed_dim)
        check_layer_dtype(x, self.qkv.weight)
        batch, n, _ = x.shape
        check_key_mask(key_mask, batch, n, length_name="n")
        if empty_batch(x):
            return AttentionOutput(x.new_zeros(0, n, self.embed_dim), x.new_zeros(0, self.num_heads, n, n) if need_weights else None)
        L, M = self.effective_sizes(n)
        nb, tail = divmod(n, L)  # nb full segments, then a last one of `tail` tokens (if any)
        n_full = nb * L
        cur = x if norm is None else norm(x)
        mem_kv: Tensor | None = None
        if M > 0:
            # the memory is read from SG(x), normalised after the stop-gradient, and projected
            # once per position: (B, n, 2E) keys and values of SG(x), O(n E^2) like dense attention
            source = x.detach() if norm is None else norm(x.detach())
            mem_kv = source @ self.qkv.weight[self.embed_dim :].T
        split = lambda t: tuple(rearrange(t, "b m (two h d) -> two b h m d", two=2, h=self.num_heads))  # noqa: E731
        # one table of W_R R_d for the longest key axis below, shared by the calls
        table = self._position_table(max(M + L, L if nb else 0, M + tail), x.dtype, x.device)
        outs, weights = [], []
        # segment 0 has no memory: it runs alone when the others have one (no M masked slots)
        first = 1 if M > 0 and nb > 0 else 0
        if first:
            km0 = None if key_mask is None else key_mask[:, :L]
            out, w0 = self._attend(cur[:, :L], None, None, need_weights, table, km0)
            outs.append(out)
            if w0 is not None:
                weights.append(F.pad(w0, (0, n - L)))
        if nb > first:
            m = nb - first  # segments first .. nb - 1, as one batch
            blocks = rearrange(cur[:, first * L : n_full], "b (m l) e -> (b m) l e", l=L)  # (B*m, L, E)
            memory_kv = mask = block_mask = None
            if key_mask is not None:  # the segments' own tokens: (B*m, L)
                block_mask = rearrange(key_mask[:, first * L : n_full], "b (m l) -> (b m) l", l=L)
            if M > 0:
                assert mem_kv is not None  # projected above whenever M > 0
                # slot c of segment b holds position bL - M + c; before position 0: padding, masked
                front = F.pad(mem_kv[:, :n_full], (0, 0, M, 0))  # (B, M + n_full, 2E)
                windows = front.unfold(1, M, L)[:, first:nb]  # (B, m, 2E, M): a view
                memory_kv = split(rearrange(windows, "b m e c -> (b m) c e"))
                pos = torch.arange(first, nb, device=x.device)[:, None] * L - M + torch.arange(M, device=x.device)[None, :]
                mask = (pos >= 0).repeat(batch, 1)  # (B*m, M)
                if key_mask is not None:  # a slot that holds a padded position stays hidden in every later segment
                    padded_front = F.pad(key_mask[:, :n_full], (M, 0), value=False)  # (B, M + n_full), same windows
                    mask = mask & rearrange(padded_front.unfold(1, M, L)[:, first:nb], "b m c -> (b m) c")
            out, wb = self._attend(blocks, memory_kv, mask, need_weights, table, block_mask)
            outs.append(rearrange(out, "(b m) l e -> b (m l) e", b=batch))
            if wb is not None:
                dense = _scatter_segments(wb, batch, m, L, M)  # (B, h, mL, M + mL): column c = position first*L - M + c
                offset = first * L - M  # < 0: the columns before position 0 hold masked slots (zero weight)
                weights.append(F.pad(dense[..., max(0, -offset) :], (max(0, offset), tail)))
        if tail:
            # the last, shorter segment: its M memory slots all hold real states (M <= n_full)
            memory_kv = tail_mem_mask = tail_mask = None
            if M > 0:
                assert mem_kv is not None  # projected above whenever M > 0
                memory_kv = split(mem_kv[:, n_full - M : n_full])
            if key_mask is not None:
                tail_mem_mask = key_mask[:, n_full - M : n_full] if M > 0 else None
                tail_mask = key_mask[:, n_full:]
            out, wt = self._attend(cur[:, n_full:], memory_kv, tail_mem_mask, need_weights, table, tail_mask)
            outs.append(out)
            if wt is not None:
                weights.append(F.pad(wt, (n_full - M, 0)))  # (B, h, tail, n): columns n_full - M .. n - 1
        return AttentionOutput(torch.cat(outs, 1), torch.cat(weights, 2) if need_weights else None)


def _scatter_segments(wb: Tensor, batch: int, nb: int, L: int, M: int) -> Tensor:
    """Segment weights ``(B*nb, h, L, M + L)`` -> dense ``(B, h, nb*L, M + nb*L)`` (zeros outside ``[memory | segment]``).

    Column ``c`` is the ``c``-th position counted from ``M`` before the first segment's start.
    """
    wb = rearrange(wb, "(b nb) h l k -> b h nb l k", b=batch)
    width = M + nb * L  # key axis shifted by M: position p sits at column p + M
    cols = torch.arange(nb, device=wb.device)[:, None] * L + torch.arange(M + L, device=wb.device)[None, :]  # (nb, M+L)
    dense = wb.new_zeros(*wb.shape[:-1], width)
    dense = dense.scatter(-1, cols[:, None, :].expand(nb, L, M + L).expand_as(wb), wb)
    return rearrange(dense, "b h nb l p -> b h (nb l) p")


def transformer_xl_dense(
    layer: TransformerXLAttention, x: Tensor, need_weights: bool = False, positions: str = "gather", *, key_mask: Tensor | None = None
) -> AttentionOutput:
    """Baseline: the parallel form as one dense ``n x n`` computation with a mask (the reference, ``O(n^2 d)``).

    Every score ``(q_i + u)^T k_j + (q_i + v)^T W_R R_{i-j}`` is formed for all
    ``n^2`` pairs; query ``i`` in segment ``s = i // L`` may see keys
    ``sL - M <= j <= i``; keys before ``sL`` come from ``SG(x)``
    (stop-gradient), as in the memory. ``positions="gather"`` looks up
    ``W_R R_{i-j}`` for each pair (the independent reference, an
    ``(n, n, h, d)`` tensor: small ``n`` only); ``positions="shift"`` uses
    :func:`rel_shift` on the ``n x n`` matrix (the dense baseline of the
    benchmark, ``O(n^2)`` memory). ``key_mask (B, n)`` (``True`` = real token)
    hides the padded keys from every query, in the segment and in the memory alike.
    Use it to check :meth:`TransformerXLAttention.forward`, never to run a model.
    """
    if positions not in ("gather", "shift"):
        raise ValueError(f"positions must be 'gather' or 'shift', got {positions!r}")
    x = check_tokens(x, layer.embed_dim)
    check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="n")
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
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]  # (B, 1, n, n)
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
