r"""Chapter 9 -- sparse attention: each query reads a small, structured or data-chosen set of keys.

**Factorised patterns** (Child et al., "Generating Long Sequences with Sparse
Transformers", 2019). Query :math:`i` attends to a set :math:`S_i` of keys,

.. math::

    \operatorname{attend}(X, S)_i = \sum_{j \in S_i}
        \frac{\exp(q_i^\top k_j / \sqrt{d})}{\sum_{j' \in S_i} \exp(q_i^\top k_{j'} / \sqrt{d})}\, v_j ,

with :math:`S_i = A^{(1)}_i \cup A^{(2)}_i` (the paper's *merged head*):

* **strided**, stride :math:`l`: :math:`A^{(1)}_i = \{j : 0 \le i - j \le l\}` (the
  previous :math:`l` positions) and :math:`A^{(2)}_i = \{j \le i : (i - j) \bmod l = 0\}`;
* **fixed**, block :math:`l`, :math:`c` summary positions:
  :math:`A^{(1)}_i = \{j \le i : \lfloor j/l \rfloor = \lfloor i/l \rfloor\}` and
  :math:`A^{(2)}_i = \{j \le i : j \bmod l \ge l - c\}`.

Neither is computed with an ``n x n`` matrix. The union is split into two
*disjoint* parts, each an ordinary dense attention on a reshaped sequence:

* strided: a banded part (queries of block :math:`b` against keys of blocks
  :math:`b-1, b`: ``(n/l, l, 2l)`` scores) and a column part (view the sequence
  as ``(n/l, l)`` and attend along the block axis: ``(l, n/l, n/l)`` scores);
* fixed: a within-block part (``(n/l, l, l)`` scores) and a summary part (every
  query against the ``c`` last keys of each earlier block: ``(n, c n/l)`` scores).

Each part returns its normalised output and its log-sum-exp; one softmax over
the union is recovered exactly by weighting part :math:`p` with
:math:`\exp(\mathrm{lse}_p - \mathrm{lse})`, :math:`\mathrm{lse} = \log\sum_p e^{\mathrm{lse}_p}`
(as blockwise / flash attention merges blocks). With :math:`l \approx \sqrt n`
time and memory are :math:`O(n\sqrt n\, d)`.

**Top-k** (Zhao et al., "Explicit Sparse Transformer", 2019): keep the
:math:`k` largest scores of each query, softmax over those only. The scores
are still computed densely (:math:`O(n^2 d)`): choosing the top :math:`k`
needs all of them.

Shapes: ``q, k, v`` are ``(batch, [heads,] n, d)``; outputs ``(batch, [heads,] n, d_v)``;
weights, when asked for, ``(batch, [heads,] n, n)`` (materialised: small ``n`` only).
Boolean masks: ``True`` = may attend (:mod:`attn.masks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import Attention, AttentionBase, register_kernel
from .checks import check_int, check_same_dtype, empty_batch
from .core import AttentionOutput, build_mask, check_qkv, masked_softmax, scaled_dot_product_attention
from .masks import causal_mask, check_key_mask
from .registry import register

__all__ = [
    "strided_mask",
    "fixed_mask",
    "default_stride",
    "strided_attention",
    "fixed_attention",
    "topk_mask",
    "topk_attention",
    "strided_kernel",
    "fixed_kernel",
    "topk_kernel",
    "SparseAttention",
    "TopKAttention",
]

Pattern = Literal["strided", "fixed"]


# ----------------------------------------------------------------------------- dense reference masks


def _rows(n: int, keep: Callable[[Tensor, Tensor], Tensor], device: torch.device | str | None, chunk: int = 1024) -> Tensor:
    """Build an ``(n, n)`` boolean mask ``keep(i (rows, 1), j (1, n))`` a slab of rows at a time (bounded temporaries)."""
    out = torch.empty(n, n, dtype=torch.bool, device=device)
    j = torch.arange(n, device=device)[None, :]
    for start in range(0, n, chunk):
        i = torch.arange(start, min(start + chunk, n), device=device)[:, None]
        out[start : start + chunk] = keep(i, j)
    return out


def strided_mask(n: int, stride: int, causal: bool = True, device: torch.device | str | None = None) -> Tensor:
    r"""Dense ``(n, n)`` mask of the strided pattern, literally :math:`A^{(1)}_i \cup A^{(2)}_i`.

    Query ``i`` may attend to key ``j`` when ``|i - j| <= stride`` or
    ``(i - j) mod stride == 0``; with ``causal`` only ``j <= i``. This is the
    labelled *reference*: the efficient code never builds it.
    """
    check_int("n", n, 0)
    ell = check_int("stride", stride)

    def keep(i: Tensor, j: Tensor) -> Tensor:
        a = ((j >= i - ell) & (j <= i + ell)) | (i % ell == j % ell)  # A1 | A2: (i - j) mod ell = 0 iff same residue
        return a & (j <= i) if causal else a

    return _rows(n, keep, device)


def fixed_mask(n: int, block: int, c: int, causal: bool = True, device: torch.device | str | None = None) -> Tensor:
    r"""Dense ``(n, n)`` mask of the fixed pattern: same block, or a summary column.

    Query ``i`` may attend to key ``j`` when ``j // block == i // block`` or
    ``j mod block >= block - c`` (the last ``c`` positions of every block);
    with ``causal`` only ``j <= i``. The labelled reference for
    :func:`fixed_attention`.
    """
    check_int("n", n, 0)
    ell = check_int("block", block)
    check_int("c", c)
    if c > ell:
        raise ValueError(f"c (summary positions per block) must be <= block, got c={c}, block={ell}")

    def keep(i: Tensor, j: Tensor) -> Tensor:
        a = (i // ell == j // ell) | (j % ell >= ell - c)  # A1 | A2 (i and j are a column and a row of indices)
        return a & (j <= i) if causal else a

    return _rows(n, keep, device)


def default_stride(n: int) -> int:
    r"""The paper's choice :math:`l \approx \sqrt n`: ``ceil(sqrt(n))``."""
    return math.isqrt(n - 1) + 1 if n > 1 else 1


# ----------------------------------------------------------------------------- blockwise pieces


def _with_heads(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Validate; return 4-D ``(B, H, n, d)`` views and whether a head dim was added."""
    check_qkv(q, k, v)
    check_same_dtype(("q", q), ("k", k), ("v", v))
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"factorised sparse attention is self-attention: query and key lengths must match, "
            f"got {q.shape[-2]} and {k.shape[-2]}"
        )
    if q.ndim == 3:
        return q[:, None], k[:, None], v[:, None], True
    return q, k, v, False


def _key_valid(key_mask: Tensor | None, batch: int, n: int, total: int, device: torch.device) -> Tensor:
    """``(B, total)`` bool: real keys (``j < n`` and not padding)."""
    if key_mask is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=device)
    else:
        check_key_mask(key_mask, batch, n)
        valid = key_mask
    return F.pad(valid, (0, total - n), value=False)


def _pad_seq(x: Tensor, total: int) -> Tensor:
    """Zero-pad ``(B, H, n, d)`` to length ``total``."""
    return F.pad(x, (0, 0, 0, total - x.shape[-2]))


def _partial(
    scores: Tensor, mask: Tensor, v: Tensor, dropout_p: float, need_weights: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""One part of the key set: softmax over its allowed keys, kept with its log-sum-exp.

    ``scores`` ``(..., q, s)``, ``mask`` broadcastable to it, ``v`` ``(..., s, d_v)``.
    Returns ``(out (..., q, d_v), lse (..., q, 1), p (..., q, s) or None)`` where
    ``out = softmax(scores | mask) v``. A query with no allowed key in this part
    gets ``lse = -inf`` (the merge gives it weight 0) and ``out = 0``, never NaN.
    """
    s = scores.masked_fill(~mask, float("-inf"))
    del scores
    top = s.detach().amax(-1, keepdim=True)  # stabiliser (no gradient needed: the result does not depend on it)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = (s - top).exp_()  # exp(s - max); exactly 0 on blocked keys
    del s
    den = e.sum(-1, keepdim=True)  # (..., q, 1)
    ok = den > 0
    den = torch.where(ok, den, torch.ones_like(den))
    ed = F.dropout(e, p=dropout_p) if dropout_p > 0 else e
    out = torch.matmul(ed, v) / den  # (..., q, d_v)
    lse = torch.where(ok, top + den.log(), torch.full_like(den, float("-inf")))
    return out, lse, (e / den if need_weights else None)


def _merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    r"""Combine normalised partial outputs into one softmax over the union of their keys.

    With :math:`\mathrm{lse} = \log \sum_p e^{\mathrm{lse}_p}`, the output is
    :math:`\sum_p e^{\mathrm{lse}_p - \mathrm{lse}}\, o_p`. Returns the output and the
    coefficients :math:`e^{\mathrm{lse}_p - \mathrm{lse}}` (0 for queries with no key at all).
    """
    lses = torch.stack([lse for _, lse in parts])  # (P, ..., q, 1)
    top = lses.max(0).values.detach()  # a stabiliser only: the result does not depend on it
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lses - top)  # (P, ..., q, 1), 0 where a part is empty
    denom = w.sum(0)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # fully masked query: all w are 0
    coefs = [w[i] / denom for i in range(len(parts))]
    out = sum(c * o for c, (o, _) in zip(coefs, parts, strict=True))
    assert isinstance(out, Tensor)  # parts is never empty, so the sum is a tensor, not sum()'s start 0
    return out, coefs


def _scatter_weights(dense: Tensor, weights: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
    """Add part weights ``(B, H, *idx)`` at (query ``qi``, key ``kj``) of ``dense`` ``(B, H, N, N)``.

    ``qi``/``kj`` broadcast to ``weights.shape[2:]``; out-of-range keys carry weight 0 and are clamped.
    """
    B, H, N, _ = dense.shape
    shape = weights.shape[2:]
    flat = (qi.expand(shape) * N + kj.clamp(0, N - 1).expand(shape)).reshape(1, 1, -1)
    return dense.reshape(B, H, N * N).scatter_add(-1, flat.expand(B, H, -1), weights.reshape(B, H, -1)).view(B, H, N, N)


def _check_blockwise(blockwise: object) -> None:
    if blockwise is not None and not isinstance(blockwise, bool):
        raise TypeError(f"blockwise must be None, True or False, got {blockwise!r}")


def _dense(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, key_mask: Tensor | None, scale: float, dropout_p: float,
           need_weights: bool, squeeze: bool) -> AttentionOutput:
    """The pattern's ``(n, n)`` ``mask`` on the dense scores: used when that is cheaper than the blocks."""
    out, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask, key_mask=key_mask, scale=scale,
                                                dropout_p=dropout_p, need_weights=need_weights)
    return _finish(out, weights, q.shape[-2], squeeze)


def _finish(out: Tensor, weights: Tensor | None, n: int, squeeze: bool) -> AttentionOutput:
    out = out[..., :n, :]
    if weights is not None:
        weights = weights[..., :n, :n]
    if squeeze:
        out = out[:, 0]
        weights = weights[:, 0] if weights is not None else None
    return AttentionOutput(out, weights)


def strided_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    stride: int | None = None,
    causal: bool = True,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    *,
    blockwise: bool | None = None,
) -> AttentionOutput:
    r"""Strided factorised self-attention (Child et al. 2019), without an ``n x n`` matrix.

    Query ``i`` reads keys ``j`` with ``|i - j| <= l`` or ``(i - j) mod l = 0``
    (``j <= i`` when ``causal``), in one softmax: exactly
    ``softmax(QK^T * scale, mask=strided_mask(n, l, causal)) V``.

    Computed as two disjoint parts merged by log-sum-exp:

    * *band*: ``0 <= i - j < l`` (two-sided ``|i - j| < l``): the sequence is cut into
      ``n/l`` blocks of ``l``; block ``b`` attends to blocks ``b-1, b`` (``, b+1``):
      scores ``(B, H, n/l, l, 2l)``;
    * *column*: ``i - j`` a non-zero multiple of ``l``: viewed as ``(n/l, l)``, the
      sequence attends along the block axis, one column at a time:
      scores ``(B, H, l, n/l, n/l)``.

    Args:
        q, k, v: ``(B, [H,] n, d)`` (``v`` may have its own width ``d_v``).
        stride: ``l``; default ``ceil(sqrt(n))``. A stride of ``n`` or more is
            clamped to ``n`` (every key is then in the band: the same pattern).
        causal: autoregressive (the paper's setting); ``False`` for the two-sided pattern.
        key_mask: ``(B, n)`` bool, ``True`` = real token.
        scale: score scale, default ``1/sqrt(d)``.
        dropout_p: dropout on the attention weights.
        need_weights: also return the ``(B, [H,] n, n)`` weights (materialised: small ``n`` only).
        blockwise: ``None`` (default) takes the cheaper of the two parts above and
            dense attention under :func:`strided_mask` (the same output): the blocks
            score ``(n/l) l (2l or 3l) + l (n/l)^2`` pairs, dense ``n^2``, so at small
            ``n`` or large ``l`` dense is cheaper and its ``n x n`` mask no larger
            than the blocks. ``True``/``False`` forces one.

    Returns:
        :class:`~attn.core.AttentionOutput` ``(output (B, [H,] n, d_v), weights or None)``.
    """
    q, k, v, squeeze = _with_heads(q, k, v, dropout_p)
    _check_blockwise(blockwise)
    B, H, n, d = q.shape
    ell = default_stride(n) if stride is None else min(check_int("stride", stride), n)  # ell >= n: every key in the band
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    m = -(-n // ell)  # number of blocks
    N = m * ell
    if blockwise is None:  # scores per (batch, head): band + column parts, against dense attention's n^2
        blockwise = m * ell * (2 if causal else 3) * ell + ell * m * m < n * n
    if not blockwise:
        check_key_mask(key_mask, B, n)
        return _dense(q, k, v, strided_mask(n, ell, causal, q.device), key_mask, scale, dropout_p, need_weights, squeeze)
    dev = q.device
    valid = _key_valid(key_mask, B, n, N, dev)  # (B, N)
    qb, kb, vb = (_pad_seq(t, N).unflatten(2, (m, ell)) for t in (q, k, v))  # (B, H, m, ell, d)

    # --- band part: block b against blocks b-1, b (, b+1)
    after = 0 if causal else 1
    nb = 2 + after
    kp = F.pad(kb, (0, 0, 0, 0, 1, after))  # (B, H, m + 1 + after, ell, d): a zero block before (and after)
    vp = F.pad(vb, (0, 0, 0, 0, 1, after))
    vap = F.pad(valid.view(B, m, ell), (0, 0, 1, after), value=False)  # (B, m + 1 + after, ell)
    kw = torch.cat([kp[:, :, o : o + m] for o in range(nb)], dim=3)  # (B, H, m, nb*ell, d)
    vw = torch.cat([vp[:, :, o : o + m] for o in range(nb)], dim=3)  # (B, H, m, nb*ell, d_v)
    valw = torch.cat([vap[:, o : o + m] for o in range(nb)], dim=2)  # (B, m, nb*ell)
    r = torch.arange(ell, device=dev).view(ell, 1)  # query offset in its block
    off = torch.arange(nb * ell, device=dev).view(1, nb * ell)  # key offset from the start of block b-1
    diff = ell + r - off  # (ell, nb*ell): i - j, the same for every block
    band = (diff >= 0) & (diff < ell) if causal else diff.abs() < ell
    band_mask = band & valw[:, None, :, None, :]  # (B, 1, m, ell, nb*ell); keys before 0 or padded are not valid
    o_band, lse_band, p_band = _partial(
        torch.matmul(qb * scale, kw.transpose(-1, -2)), band_mask, vw, dropout_p, need_weights
    )  # scores (B, H, m, ell, nb*ell)

    # --- column part: same offset r = i mod ell, other blocks (earlier ones if causal)
    qc, kc, vc = (x.transpose(2, 3) for x in (qb, kb, vb))  # (B, H, ell, m, d)
    blk = torch.arange(m, device=dev)
    other = blk[:, None] > blk[None, :] if causal else blk[:, None] != blk[None, :]  # (m, m): query, key block
    col_mask = other & valid.view(B, m, ell).transpose(1, 2)[:, None, :, None, :]  # (B, 1, ell, m, m)
    o_col, lse_col, p_col = _partial(
        torch.matmul(qc * scale, kc.transpose(-1, -2)), col_mask, vc, dropout_p, need_weights
    )  # scores (B, H, ell, m, m)

    out, (c_band, c_col) = _merge([(o_band, lse_band), (o_col.transpose(2, 3), lse_col.transpose(2, 3))])
    out = out.flatten(2, 3)  # (B, H, N, d_v)

    weights = None
    if need_weights:
        assert p_band is not None and p_col is not None
        dense = q.new_zeros(B, H, N, N)
        qi = torch.arange(N, device=dev).view(m, ell, 1)  # absolute query index
        kj = (torch.arange(m, device=dev).view(m, 1, 1) - 1) * ell + off.view(1, 1, nb * ell)  # absolute key index
        dense = _scatter_weights(dense, p_band * c_band, qi, kj)
        r = r.view(ell, 1, 1)
        col_q = blk.view(1, m, 1) * ell + r  # (ell, m, 1)
        col_k = blk.view(1, 1, m) * ell + r  # (ell, 1, m)
        dense = _scatter_weights(dense, p_col * c_col.transpose(2, 3), col_q, col_k)
        weights = dense
    return _finish(out, weights, n, squeeze)


def fixed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block: int | None = None,
    c: int = 8,
    causal: bool = True,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    *,
    blockwise: bool | None = None,
) -> AttentionOutput:
    r"""Fixed factorised self-attention (Child et al. 2019), without an ``n x n`` matrix.

    Query ``i`` reads the keys of its own block of ``l`` and the last ``c``
    positions ("summary" columns) of every other block (``j <= i`` when
    ``causal``), in one softmax: exactly
    ``softmax(QK^T * scale, mask=fixed_mask(n, l, c, causal)) V``.

    Two disjoint parts merged by log-sum-exp:

    * *block*: within-block attention, scores ``(B, H, n/l, l, l)``;
    * *summary*: every query against the ``c`` last keys of each *other* block
      (earlier blocks if ``causal``), scores ``(B, H, n, c n/l)``. Own-block
      summaries are already in the block part and are not counted twice.

    Args:
        q, k, v: ``(B, [H,] n, d)``.
        block: ``l``; default ``ceil(sqrt(n))``. A block of ``n`` or more is
            clamped to ``n`` (one block holding every key: the same pattern).
        c: summary positions per block (clipped to ``l`` when ``block`` is defaulted or clamped).
        causal, key_mask, scale, dropout_p, need_weights: as in :func:`strided_attention`.
        blockwise: ``None`` (default) takes the cheaper of the two parts (``n l + n c n/l``
            scores) and dense attention under :func:`fixed_mask` (``n^2``); same output.
    """
    q, k, v, squeeze = _with_heads(q, k, v, dropout_p)
    _check_blockwise(blockwise)
    B, H, n, d = q.shape
    c = check_int("c", c)
    if block is None:
        ell = default_stride(n)
    else:
        ell = check_int("block", block)
        if c > ell:
            raise ValueError(f"c (summary positions per block) must be <= block, got c={c}, block={ell}")
        ell = min(ell, n)  # one block of n already holds every key
    c = min(c, ell)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    m = -(-n // ell)
    N = m * ell
    if blockwise is None:  # scores per (batch, head): within-block + summary parts, against n^2
        blockwise = m * ell * ell + N * m * c < n * n
    if not blockwise:
        check_key_mask(key_mask, B, n)
        return _dense(q, k, v, fixed_mask(n, ell, c, causal, q.device), key_mask, scale, dropout_p, need_weights, squeeze)
    dev = q.device
    valid = _key_valid(key_mask, B, n, N, dev)
    qb, kb, vb = (_pad_seq(t, N).unflatten(2, (m, ell)) for t in (q, k, v))  # (B, H, m, ell, d)
    validb = valid.view(B, m, ell)

    # --- block part
    inside = causal_mask(ell, device=dev) if causal else torch.ones(ell, ell, dtype=torch.bool, device=dev)
    blk_mask = inside & validb[:, None, :, None, :]  # (B, 1, m, ell, ell)
    o_blk, lse_blk, p_blk = _partial(
        torch.matmul(qb * scale, kb.transpose(-1, -2)), blk_mask, vb, dropout_p, need_weights
    )  # scores (B, H, m, ell, ell)

    # --- summary part: the last c keys of every block, gathered once
    ks = kb[:, :, :, ell - c :].flatten(2, 3)  # (B, H, m*c, d)
    vs = vb[:, :, :, ell - c :].flatten(2, 3)  # (B, H, m*c, d_v)
    vals = validb[:, :, ell - c :].flatten(1, 2)  # (B, m*c)
    q_blk = torch.arange(N, device=dev) // ell  # (N,)
    k_blk = torch.arange(m, device=dev).repeat_interleave(c)  # (m*c,)
    other = q_blk[:, None] > k_blk[None, :] if causal else q_blk[:, None] != k_blk[None, :]  # (N, m*c)
    sum_mask = other & vals[:, None, None, :]  # (B, 1, N, m*c)
    o_sum, lse_sum, p_sum = _partial(
        torch.matmul(qb.flatten(2, 3) * scale, ks.transpose(-1, -2)), sum_mask, vs, dropout_p, need_weights
    )  # scores (B, H, N, m*c)

    out, (c_blk, c_sum) = _merge([(o_blk.flatten(2, 3), lse_blk.flatten(2, 3)), (o_sum, lse_sum)])

    weights = None
    if need_weights:
        assert p_blk is not None and p_sum is not None
        dense = q.new_zeros(B, H, N, N)
        pos = torch.arange(N, device=dev).view(m, ell)
        dense = _scatter_weights(dense, p_blk * c_blk.unflatten(2, (m, ell)), pos[:, :, None], pos[:, None, :])
        k_pos = pos[:, ell - c :].flatten()  # (m*c,)
        dense = _scatter_weights(dense, p_sum * c_sum, torch.arange(N, device=dev)[:, None], k_pos[None, :])
        weights = dense
    return _finish(out, weights, n, squeeze)


# ----------------------------------------------------------------------------- top-k


def topk_mask(scores: Tensor, topk: int, mask: Tensor | None = None) -> Tensor:
    r"""Boolean mask of the ``topk`` largest allowed scores of each row (last dim).

    Exactly ``min(topk, #allowed)`` entries per row are ``True``. Ties at the
    ``k``-th value go to the lower key index (deterministic): with ``t`` the
    ``k``-th largest score, keep ``s > t``, then the first ``k - #(s > t)``
    entries equal to ``t`` in key order.
    """
    topk = check_int("topk", topk)
    s = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
    kk = min(topk, s.shape[-1])
    t = s.topk(kk, dim=-1).values[..., -1:]  # (..., 1) k-th largest
    above = s > t
    tied = s == t
    room = kk - above.sum(-1, keepdim=True)  # how many tied entries still fit
    keep = above | (tied & (tied.cumsum(-1) <= room))
    return keep if mask is None else keep & mask


def topk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    topk: int,
    attn_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> AttentionOutput:
    r"""Top-k attention (Zhao et al. 2019): softmax over the ``topk`` largest scores of each query.

    .. math::

        S = QK^\top \cdot \text{scale},\qquad
        \mathcal{M}(S, k)_{ij} = \begin{cases} S_{ij} & j \in \operatorname{top}_k(S_{i,:}) \\ -\infty & \text{otherwise}\end{cases},
        \qquad \operatorname{softmax}(\mathcal{M}(S, k))\,V

    Masked keys are never selected; ties are broken towards the lower key index
    (:func:`topk_mask`). The scores are dense: time and memory ``O(n^2)``.

    Args:
        q: ``(B, [H,] n_q, d)``; k: ``(B, [H,] n_k, d)``; v: ``(B, [H,] n_k, d_v)``.
        topk: keys kept per query (all when ``>= n_k``).
        attn_mask, key_mask, is_causal: as in :func:`attn.core.scaled_dot_product_attention`
            (boolean ``attn_mask``, ``True`` = may attend).
    """
    check_qkv(q, k, v)
    check_same_dtype(("q", q), ("k", k), ("v", v))
    topk = check_int("topk", topk)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if attn_mask is not None and (not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool):
        got = getattr(attn_mask, "dtype", type(attn_mask).__name__)
        raise TypeError(f"attn_mask must be a torch.bool tensor (True = may attend), got {got}")
    mask = build_mask(q, k, attn_mask, key_mask, is_causal)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, [H,] n_q, n_k): dense, inherent to top-k
    if mask is not None:
        mask = mask.expand(scores.shape)
    keep = topk_mask(scores.detach(), topk, mask)
    weights = masked_softmax(scores, keep)
    attn = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return AttentionOutput(torch.matmul(attn, v), weights if need_weights else None)


# ----------------------------------------------------------------------------- kernels (attn.attention's one signature)


def _no_attn_mask(name: str, attn_mask: Tensor | None) -> None:
    if attn_mask is not None:
        raise ValueError(
            f"the {name} kernel takes its pattern, key_mask and is_causal only, not a general attn_mask "
            f"(it never builds an n x n mask); got attn_mask of shape {tuple(getattr(attn_mask, 'shape', ()))}"
        )


@register_kernel("strided", summary="Sparse Transformer strided pattern (band + every l-th key), blockwise, one softmax",
                 attn_mask=False, dense=False)
def strided_kernel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    stride: int | None = None,
    blockwise: bool | None = None,
) -> AttentionOutput:
    """:func:`strided_attention` as a kernel: ``q, k, v`` ``(B, h, n, d)``; ``is_causal`` picks the one-sided pattern.

    Options: ``stride`` (default ``ceil(sqrt(n))``), ``blockwise``. A general ``attn_mask`` is refused (ValueError).
    """
    _no_attn_mask("strided", attn_mask)
    return strided_attention(q, k, v, stride=stride, causal=is_causal, key_mask=key_mask, scale=scale,
                             dropout_p=dropout_p, need_weights=need_weights, blockwise=blockwise)


@register_kernel("fixed", summary="Sparse Transformer fixed pattern (own block + summary columns), blockwise, one softmax",
                 attn_mask=False, dense=False)
def fixed_kernel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    block: int | None = None,
    c: int = 8,
    blockwise: bool | None = None,
) -> AttentionOutput:
    """:func:`fixed_attention` as a kernel: ``q, k, v`` ``(B, h, n, d)``; ``is_causal`` picks the one-sided pattern.

    Options: ``block`` (default ``ceil(sqrt(n))``), ``c`` summary positions per block, ``blockwise``.
    """
    _no_attn_mask("fixed", attn_mask)
    return fixed_attention(q, k, v, block=block, c=c, causal=is_causal, key_mask=key_mask, scale=scale,
                           dropout_p=dropout_p, need_weights=need_weights, blockwise=blockwise)


@register_kernel("topk", summary="softmax over the k largest scores of each query (dense scores); boolean attn_mask")
def topk_kernel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    topk: int = 8,
) -> AttentionOutput:
    """:func:`topk_attention` as a kernel (option ``topk``, default 8)."""
    return topk_attention(q, k, v, topk, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal, scale=scale,
                          dropout_p=dropout_p, need_weights=need_weights)


# ----------------------------------------------------------------------------- modules


def _build_sparse(pattern: Pattern) -> Callable[[int, int], SparseAttention]:
    return lambda embed_dim, num_heads: SparseAttention(embed_dim, num_heads, pattern=pattern)


@register(
    "sparse-strided",
    paper="Child et al. 2019",
    complexity="O(n sqrt(n) d)",
    chapter=9,
    summary="Sparse Transformer strided pattern (band + every l-th key), blockwise, causal",
    build=_build_sparse("strided"),
    kernel="strided",
    causal=True,
)
@register(
    "sparse-fixed",
    paper="Child et al. 2019",
    complexity="O(n sqrt(n) d)",
    chapter=9,
    summary="Sparse Transformer fixed pattern (own block + summary columns), blockwise, causal",
    build=_build_sparse("fixed"),
    kernel="fixed",
    causal=True,
)
class SparseAttention(AttentionBase):
    """Multi-head self-attention with a Sparse Transformer factorised pattern (Child et al. 2019).

    :class:`~attn.attention.AttentionBase` around the ``"strided"`` or ``"fixed"`` kernel
    (:func:`strided_kernel`, :func:`fixed_kernel`): the projections ``q_proj, k_proj, v_proj,
    out_proj`` are those of :class:`~attn.multihead.MultiHeadAttention` (state dicts are
    interchangeable); each head attends over the union of the pattern's two key sets in one
    softmax (the paper's merged head), computed blockwise. Self-attention only (the pattern
    is defined on one sequence), hence ``forward(x, *, ...)``.

    Args:
        embed_dim, num_heads: as in :class:`~attn.multihead.MultiHeadAttention`.
        pattern: ``"strided"`` or ``"fixed"`` (the kernel's name).
        stride: ``l`` (stride, or block size for ``"fixed"``); default ``ceil(sqrt(n))`` per call.
        summary: ``c``, the summary positions per block of the fixed pattern.
        causal: autoregressive (default, as in the paper) or two-sided; ``forward(is_causal=)`` overrides it.
        dropout, bias: as in :class:`~attn.attention.AttentionBase`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        pattern: Pattern = "strided",
        stride: int | None = None,
        summary: int = 8,
        causal: bool = True,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        if pattern not in ("strided", "fixed"):
            raise ValueError(f"pattern must be 'strided' or 'fixed', got {pattern!r}")
        if stride is not None:
            check_int("stride", stride)
        check_int("summary", summary)
        if stride is not None and pattern == "fixed" and summary > stride:
            raise ValueError(f"summary ({summary}) must be <= the block size stride ({stride})")
        if pattern == "strided":  # the kernel's options: stride l
            super().__init__(embed_dim, num_heads, kernel="strided", dropout=dropout, bias=bias, causal=causal,
                             stride=stride)
        else:  # block l and c summary positions
            super().__init__(embed_dim, num_heads, kernel="fixed", dropout=dropout, bias=bias, causal=causal,
                             block=stride, c=summary)
        self.pattern, self.stride, self.summary = pattern, stride, summary

    def mask(self, n: int, device: torch.device | str | None = None, causal: bool | None = None) -> Tensor:
        """The dense ``(n, n)`` mask this layer's pattern equals at length ``n`` (the reference)."""
        causal = self.causal if causal is None else causal
        ell = self.stride or default_stride(n)
        if self.pattern == "strided":
            return strided_mask(n, ell, causal, device)
        return fixed_mask(n, ell, min(self.summary, ell), causal, device)

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """Self-attention of ``x`` ``(B, n, E)``; ``key_mask`` ``(B, n)`` bool, ``True`` = real token.

        ``is_causal``: ``None`` keeps the layer's ``causal``. Returns ``(output (B, n, E), weights
        (B, h, n, n) or None)``; the weights are materialised from the blockwise parts (small ``n`` only).
        """
        self.check_inputs(x, x, x)
        if empty_batch(x):
            w = x.new_zeros(0, self.num_heads, x.shape[1], x.shape[1]) if need_weights else None
            return AttentionOutput(self.out_proj(x), w)
        return self.mix(x, x, x, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights)


@register(
    "topk",
    paper="Zhao et al. 2019",
    complexity="O(n^2 d)",
    chapter=9,
    summary="Explicit Sparse Transformer: softmax over the k largest scores of each query",
    build=lambda embed_dim, num_heads: TopKAttention(embed_dim, num_heads, topk=8),
    kernel="topk",
    causal=False,
)
class TopKAttention(Attention):
    """Multi-head attention keeping only the ``topk`` largest scores per query (Zhao et al. 2019).

    :class:`~attn.attention.Attention` with the ``"topk"`` kernel (:func:`topk_kernel`).

    Args:
        embed_dim, num_heads, dropout, bias, kdim, vdim: as in :class:`~attn.multihead.MultiHeadAttention`.
        topk: keys kept per query and head (the paper uses ``k`` around 8).
        causal: the layer's default ``is_causal``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, topk: int = 8, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, causal: bool = False) -> None:
        topk = check_int("topk", topk)
        super().__init__(embed_dim, num_heads, kernel="topk", dropout=dropout, bias=bias, kdim=kdim, vdim=vdim,
                         causal=causal, topk=topk)
        self.topk = topk
