r"""Chapter 27 -- grouped-query attention and the KV cache: fewer key/value heads, cached for decoding.

**Grouped-query attention** (Ainslie et al. 2023). ``h`` query heads share
``g`` key/value heads (``g`` divides ``h``; ``r = h / g`` query heads per
group). Query head ``i`` reads key/value head ``\lfloor i / r \rfloor``:

.. math::

    \text{head}_i = \operatorname{softmax}\!\Big(\frac{(x W^Q_i)(x W^K_{\lfloor i/r \rfloor})^\top}{\sqrt{d}} + M\Big)\, x W^V_{\lfloor i/r \rfloor},
    \qquad y = \operatorname{Concat}(\text{head}_1, \dots, \text{head}_h)\, W^O

``g = h`` is multi-head attention (MHA, Vaswani et al. 2017), ``g = 1``
multi-query attention (MQA, Shazeer 2019). The same convention as
``F.scaled_dot_product_attention(enable_gqa=True)`` and ``transformers``'
``repeat_kv``: key/value head ``j`` serves query heads ``j r .. j r + r - 1``.

The keys and values are never repeated. Without weights (the inference path),
one fused ``F.scaled_dot_product_attention(..., enable_gqa=True)`` call pairs
the ``h`` query heads with the ``g`` key/value heads, and the causal mask is the
kernel's own ``is_causal``: no ``n x n`` score or mask tensor exists, and the
peak memory grows linearly in ``n`` (:func:`fused_attention`). A key padding
mask, or a chunk of queries after cached tokens, is applied to blocks of
queries, so the largest mask is ``(block, m)``. With ``need_weights=True`` the
``r`` query heads of a group are folded into the query-length axis,
``(B, h, t, d) -> (B, g, r t, d)``, and the weights are formed explicitly.

**KV cache.** In autoregressive decoding the keys and values of past tokens do
not change, so they are stored (:class:`KVCache`, preallocated to
``max_len``) and each new token computes only its own ``q, k, v``. Step ``t``
then costs ``O(t d)`` per head instead of ``O(t^2 d)`` for recomputing the
prefix. The cache holds, per token and per layer, ``2 g d`` numbers:

.. math::

    \text{bytes per token} = 2 \cdot L \cdot g \cdot d \cdot \text{bytes per number},

which is what GQA shrinks by ``h / g`` (:func:`kv_cache_bytes_per_token`).
The cache is written in place under ``torch.no_grad()`` (inference); when
gradients are recorded it is updated out of place, so that backpropagation
through cached decoding works (each step then copies the cache once).

**Uptraining** (Ainslie et al. 2023, section 2.1): a trained MHA becomes a GQA
by mean-pooling the key and value projection heads of each group
(:func:`mha_to_gqa`), then training briefly.

Shapes: ``x`` ``(B, t, E)``; output ``(B, t, E)``; weights ``(B, h, t, m)``
with ``m`` = cached length + ``t``.

Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need", arXiv 2019.
Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints", EMNLP 2023.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, KVStore, Position, causal_offset_mask, register_kernel
from .checks import (
    autocast_active,
    check_int,
    check_layer_dtype,
    check_same_dtype,
    check_tensor,
    empty_batch,
)
from .core import AttentionOutput, scaled_dot_product_attention
from .masks import check_key_mask
from .registry import register

__all__ = [
    "KVCache", "GroupedQueryAttention", "grouped_attention", "grouped_kernel", "fused_attention",
    "kv_cache_bytes_per_token", "mha_to_gqa",
]


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_number: int = 2) -> int:
    """Bytes the KV cache grows by per token: ``2 (K and V) * L * g * d * bytes``."""
    for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                      ("bytes_per_number", bytes_per_number)):
        check_int(name, val)
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_number


def _check_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    return dtype


def _cache_write(store: Tensor, new: Tensor, dim: int, start: int) -> Tensor:
    """``store`` with ``new`` written at ``start..`` along ``dim``: in place (inference), or out of place.

    Out of place (``slice_scatter``, a copy of ``store``) when autograd records the step: the new
    keys carry gradient, or ``store`` already holds some. An in-place write would overwrite a tensor
    that an earlier step saved for its backward ("modified by an inplace operation").
    """
    if (torch.is_grad_enabled() and new.requires_grad) or store.requires_grad:
        return store.slice_scatter(new, dim, start, start + new.shape[dim])
    store.narrow(dim, start, new.shape[dim]).copy_(new)
    return store


class KVCache:
    """Keys and values of one attention layer, preallocated: ``(batch, num_kv_heads, max_len, head_dim)`` each.

    :meth:`append` writes the new tokens' keys and values after the ``length``
    stored ones and returns views of everything stored so far; nothing is
    copied again as the cache grows (a ``torch.cat`` per step would copy the
    whole prefix every time: quadratic).

    The cache is meant for inference (``torch.no_grad()``). When autograd
    records the step (the new keys require grad), :meth:`append` writes out of
    place instead, a copy of the ``max_len`` slots per step, so that
    backpropagation through cached decoding gives the gradients of the full
    forward.

    ``dtype`` and ``device`` must be the layer's (:meth:`GroupedQueryAttention.new_cache`
    takes them from the layer); a cache of another dtype is rejected with a
    ``TypeError``, not converted.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        check_int("batch", batch, 0)
        for name, val in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("max_len", max_len)):
            check_int(name, val)
        shape = (batch, num_kv_heads, max_len, head_dim)
        dtype = _check_dtype(dtype)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values stored so far (not the preallocated room)."""
        return 2 * self.k[:, :, : self.length].numel() * self.k.element_size()

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` ``(B, g, t, d)`` after the cached tokens; return all keys and values ``(B, g, length, d)``."""
        shape = "(batch, num_kv_heads, t, head_dim)"
        check_tensor(k, "k", shape, 4)
        check_tensor(v, "v", shape, 4)
        want = (self.k.shape[0], self.k.shape[1], k.shape[2], self.k.shape[3])
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"cache expects keys and values of shape (batch, num_kv_heads, t, head_dim) = {want}, "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"KVCache dtype {self.dtype} != keys/values dtype {k.dtype}/{v.dtype}: create the cache "
                            f"with the layer's dtype (layer.new_cache(...) does), or cast the layer")
        if k.device != self.k.device or v.device != self.k.device:
            raise ValueError(f"KVCache is on {self.k.device}, keys/values on {k.device}/{v.device}")
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} cached + {k.shape[2]} new > max_len {self.max_len}")
        self.k = _cache_write(self.k, k, 2, self.length)
        self.v = _cache_write(self.v, v, 2, self.length)
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def _check_grouped(q: Tensor, k: Tensor, v: Tensor, past: int, causal: bool, key_mask: Tensor | None) -> int:
    """Shapes, dtypes, ``past`` and ``key_mask`` of a grouped attention call (checked at run time, whatever the
    caller passed); returns ``past``."""
    shape = "(batch, heads, seq, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name, shape, 4)
    check_same_dtype(("q", q), ("k", k), ("v", v))
    B, h, t, d = q.shape
    g, m = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[0] != B or v.shape[1] != g or v.shape[2] != m or k.shape[3] != d:
        raise ValueError(f"expected q (B, h, t, d), k (B, g, m, d), v (B, g, m, d_v), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if g == 0 or h % g:
        raise ValueError(f"the number of query heads ({h}) must be a multiple of the key/value heads ({g})")
    if t == 0 or m == 0:
        raise ValueError(f"empty sequence: t={t} queries, m={m} keys; both must be >= 1")
    past = check_int("past", past, 0)
    if causal and past + t != m:
        raise ValueError(f"causal attention needs past + t == m (the queries are the newest tokens), got past {past}, "
                         f"t {t}, m {m}")
    check_key_mask(key_mask, B, m)
    return past


_BLOCK_ELEMENTS = 2**20  # queries per block x keys: bounds each block's mask (1 MiB of booleans per example)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, past: int = 0, causal: bool = True,
                    key_mask: Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    r"""``softmax(s\, q k^\top + M)\, v`` through the fused SDPA kernel, without an ``n x n`` score or mask tensor.

    .. math::

        o_{i} = \sum_{j} \operatorname{softmax}_j\big(s\, q_i^\top k_{j} + M_{ij}\big)\, v_{j},
        \qquad M_{ij} = 0 \text{ if key } j \text{ is real and } (\text{not causal or } j \le \text{past} + i),
        \ -\infty \text{ otherwise}.

    Args:
        q: ``(B, h, t, D)`` queries at positions ``past .. past + t - 1``.
        k: ``(B, g, m, D)``; ``g`` divides ``h``, query head ``i`` reads key/value head ``i // (h / g)``
            (``enable_gqa``: the keys are not repeated).
        v: ``(B, g, m, D_v)``.
        past: cached tokens before the queries (causal: bottom-right aligned, ``m = past + t``).
        causal: hide keys after each query's position.
        key_mask: ``(B, m)`` boolean, True = real token.
        scale: ``s``; default ``1 / sqrt(D)``.
        dropout_p: dropout on the weights (training only; pass 0 in eval).

    Returns:
        ``(B, h, t, D_v)``; a query that sees no real key gets zeros (not NaN).

    One query per head (``t = 1``, a decoding step) with ``g < h``: the ``r = h / g`` query heads of a group
    are folded into ``r`` rows of one head, ``(B, h, 1, D) -> (B, g, r, D)`` (the fold of chapter 27), so each
    cached key/value head is read once; PyTorch's CPU kernel with ``enable_gqa`` expands the keys to ``h`` heads
    instead (measured in chapter 27). The newest query sees every cached key, so no mask is needed but the
    key mask. No mask but causality: one SDPA call with ``is_causal`` (``past = 0``) or no
    mask (one query after the cache). Otherwise the queries go in blocks of
    ``b`` with a ``(b, m)`` mask each (``b m`` about ``2^20``), and a causal block
    reads only the keys up to its last position. The CPU's fused kernel needs
    ``D_v = D``: the narrower side is padded with zeros (zero columns of ``q``
    and ``k`` add nothing to a score; zero columns of ``v`` give output columns
    that are dropped).
    """
    past = _check_grouped(q, k, v, past, causal, key_mask)
    B, h, t, d = q.shape
    g, m, dv = k.shape[1], k.shape[2], v.shape[-1]
    if t == 1 and g != h:  # decoding: fold the r query heads of each group into rows, read each K/V head once
        out = fused_attention(q.reshape(B, g, h // g, d), k, v, 0, False, key_mask, scale, dropout_p)  # (B, g, r, dv)
        return out.reshape(B, h, 1, dv)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if dv < d:
        v = F.pad(v, (0, d - dv))
    elif dv > d:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    gqa = g != h
    if key_mask is None and not (causal and past > 0 and t > 1):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and t > 1, scale=scale, dropout_p=dropout_p,
                                             enable_gqa=gqa)
        return out[..., :dv]
    km = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, m)
    # a causal mask differs per query: blocks of queries; a key mask alone is (B, 1, 1, m): one call
    block = max(1, min(t, _BLOCK_ELEMENTS // m)) if causal else t
    outs = []
    for a in range(0, t, block):
        b = min(a + block, t)
        hi = min(m, past + b) if causal else m  # a causal block never sees keys after its last query
        mask = None
        if causal:
            pos = torch.arange(past + a, past + b, device=q.device)
            mask = torch.arange(hi, device=q.device)[None, :] <= pos[:, None]  # (b - a, hi)
        if km is not None:
            mask = km[..., :hi] if mask is None else mask & km[..., :hi]  # (B, 1, b - a, hi)
        assert mask is not None
        row_ok = mask.any(-1, keepdim=True) if km is not None else None  # a causal row always sees key 0
        safe = mask if row_ok is None else mask | ~row_ok  # fully masked rows read every key, then are zeroed
        o = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :hi], v[:, :, :hi], attn_mask=safe, scale=scale,
                                           dropout_p=dropout_p, enable_gqa=gqa)
        outs.append(o if row_ok is None else o * row_ok.to(o.dtype))
    return torch.cat(outs, 2)[..., :dv]


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, past: int = 0, causal: bool = True,
                      need_weights: bool = False, key_mask: Tensor | None = None, scale: float | None = None,
                      dropout_p: float = 0.0) -> AttentionOutput:
    r"""Attention of ``h`` query heads over ``g`` key/value heads, without repeating the keys.

    Args:
        q: ``(B, h, t, d)`` queries of the ``t`` newest tokens (absolute positions ``past .. past + t - 1``).
        k: ``(B, g, m, d)`` keys of positions ``0 .. m - 1`` (``g`` divides ``h``).
        v: ``(B, g, m, d_v)`` values (``d_v`` may differ from ``d``).
        past: number of tokens before the queries (``m = past + t`` with a cache).
        causal: query at position ``p`` sees keys ``j <= p`` (bottom-right aligned when ``past > 0``).
        need_weights: also return the weights ``(B, h, t, m)``.
        key_mask: ``(B, m)`` boolean, True = real token; a query with no real key visible gets zeros.
        scale: the score scale; default ``1 / sqrt(d)``.
        dropout_p: dropout on the weights (training only).

    Returns:
        ``(output (B, h, t, d_v), weights or None)``. Without weights: :func:`fused_attention`
        (linear memory); with weights: the query heads of a group folded into rows, explicit scores.
    """
    past = _check_grouped(q, k, v, past, causal, key_mask)
    B, h, t, d = q.shape
    g, m, dv = k.shape[1], k.shape[2], v.shape[-1]
    if not need_weights:
        return AttentionOutput(fused_attention(q, k, v, past, causal, key_mask, scale, dropout_p), None)
    r = h // g
    qg = q.reshape(B, g, r * t, d)  # query heads of a group stacked along the length: row = r_idx * t + i
    mask = None
    if causal and t > 1:  # a single new token sees every cached key
        pos = torch.arange(past, past + t, device=q.device)
        mask = torch.arange(m, device=q.device)[None, :] <= pos[:, None]  # (t, m), True = may attend
        mask = mask.repeat(r, 1)  # (r t, m): the same pattern for each query head of the group
    out, w = scaled_dot_product_attention(qg, k, v, attn_mask=mask, key_mask=key_mask, scale=scale,
                                          dropout_p=dropout_p, need_weights=True)  # (B, g, r t, d_v)
    assert w is not None, "need_weights=True returns the weights"
    return AttentionOutput(out.reshape(B, h, t, dv), w.reshape(B, h, t, m))


@register_kernel(
    "grouped",
    summary="softmax(q k^T * scale + mask) v with h query heads over h_kv <= h key/value heads, never repeated",
    grouped=True,
)
def grouped_kernel(
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
) -> AttentionOutput:
    r"""Grouped-query attention as a kernel: ``q`` ``(B, h, L, d)``, ``k, v`` ``(B, h_kv, S, d)``, ``h_kv`` divides ``h``.

    .. math::

        o_i = \operatorname{softmax}\big(s\, q_i k_{\lfloor i / r \rfloor}^\top + M\big)\, v_{\lfloor i / r \rfloor},
        \qquad r = h / h_{kv}.

    Without an ``attn_mask`` this is :func:`grouped_attention` (one fused ``enable_gqa`` SDPA call, or blocks of
    queries with a key mask: memory linear in ``L``; ``is_causal`` top-left aligned, as the ``"sdpa"`` kernel).
    A general ``attn_mask`` (broadcastable to ``(B, h, L, S)``, e.g. the ``(L, S)`` causal mask of new tokens
    after a cache) is applied with the ``r`` query heads of a group folded into rows,
    ``(B, h, L, d) -> (B, h_kv, r L, d)``: the keys are still read once per group.
    """
    t, m = q.shape[-2], k.shape[-2]
    if attn_mask is None and (not is_causal or t == m):
        return grouped_attention(q, k, v, past=0, causal=is_causal, need_weights=need_weights, key_mask=key_mask,
                                 scale=scale, dropout_p=dropout_p)
    if (attn_mask is not None and not is_causal and attn_mask.dtype == torch.bool and attn_mask.shape == (t, m)
            and t <= m and torch.equal(attn_mask, causal_offset_mask(t, m, attn_mask.device))):
        # the causal mask of t new tokens after m - t cached ones (what Attention passes when decoding):
        # grouped_attention's bottom-right causal path (no mask at all for one new token; blocks otherwise)
        return grouped_attention(q, k, v, past=m - t, causal=True, need_weights=need_weights, key_mask=key_mask,
                                 scale=scale, dropout_p=dropout_p)
    _check_grouped(q, k, v, 0, False, key_mask)
    B, h, _, d = q.shape
    g, dv = k.shape[1], v.shape[-1]
    r = h // g
    mask = attn_mask
    if is_causal:  # top-left aligned, like F.scaled_dot_product_attention(is_causal=True)
        tril = torch.ones(t, m, dtype=torch.bool, device=q.device).tril()
        if mask is None or mask.dtype == torch.bool:
            mask = tril if mask is None else mask & tril
        else:
            mask = mask.masked_fill(~tril, float("-inf"))
    assert mask is not None
    while mask.ndim < 4:
        mask = mask[None]
    rows = mask.expand(mask.shape[0], h, t, m).reshape(mask.shape[0], g, r * t, m)  # query heads of a group as rows
    out, w = scaled_dot_product_attention(q.reshape(B, g, r * t, d), k, v, attn_mask=rows, key_mask=key_mask,
                                          scale=scale, dropout_p=dropout_p, need_weights=need_weights)
    return AttentionOutput(out.reshape(B, h, t, dv), None if w is None else w.reshape(B, h, t, m))


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
    for name, val in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
        if val <= 0:
            raise ValueError(f"{name} must be positive, got {val}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")


def _default_kv_heads(num_heads: int) -> int:
    return num_heads // 2 if num_heads % 2 == 0 else num_heads


@register(
    "gqa",
    paper="Ainslie et al. 2023",
    complexity="O(n^2 d + n d^2)",
    chapter=27,
    summary="h query heads share h/2 key/value heads (grouped-query attention); KV cache for decoding",
    build=lambda embed_dim, num_heads: GroupedQueryAttention(embed_dim, num_heads, _default_kv_heads(num_heads)),
    kernel="grouped",
    causal=True,
)
class GroupedQueryAttention(Attention):
    """MHA (``num_kv_heads = num_heads``), GQA (``1 < num_kv_heads < num_heads``) and MQA (``num_kv_heads = 1``).

    :class:`~attn.attention.Attention` with the ``"grouped"`` kernel (:func:`grouped_kernel`: the ``h_kv`` key/value
    heads are read without copies), causal and without biases by default (a decoder layer, as Llama).

    Args:
        embed_dim: model width ``E``.
        num_heads: query heads ``h``.
        num_kv_heads: key/value heads ``g`` (divides ``h``); default ``h`` (MHA).
        head_dim: width ``d`` of each head (default ``E / h``).
        causal: hide future tokens (a decoder); ``False`` for bidirectional attention.
        bias: biases on the projections (Llama has none).
        dropout: on the attention weights while training.
        position: ``None`` or ``"rope"``/``"alibi"`` (see :class:`~attn.attention.AttentionBase`).
        rope_base: the rotary frequency base.

    ``forward(x (B, t, E), *, key_mask=None, is_causal=None, need_weights=False, cache=None)`` (the
    :class:`~attn.attention.Attention` forward): with a :class:`KVCache` (see :meth:`new_cache`), ``x`` holds only
    the new tokens; their keys and values are appended and the queries read the whole cache. ``key_mask``
    ``(B, m)``, True = real token, covers every key the queries read: ``m = t`` without a cache, ``m`` = cached +
    new tokens with one (pass the mask of the whole sequence so far at each step, e.g. for left-padded prompts).
    The parameters are ``q_proj, k_proj, v_proj, out_proj``, as every :class:`~attn.attention.Attention`.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, causal: bool = True, bias: bool = False, dropout: float = 0.0,
                 position: Position | None = None, rope_base: float = 10000.0) -> None:
        _check_heads(num_heads, num_heads if num_kv_heads is None else num_kv_heads)
        super().__init__(embed_dim, num_heads, kernel="grouped", num_kv_heads=num_kv_heads, head_dim=head_dim,
                         dropout=dropout, bias=bias, causal=causal, position=position, rope_base=rope_base)

    def new_cache(self, batch: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for this layer (the layer's device and dtype unless given)."""
        w = self.k_proj.weight
        return KVCache(batch, self.num_kv_heads, self.head_dim, max_len, device or w.device, dtype or w.dtype)

    def mix(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        cache: KVStore | None = None,
        average_weights: bool = False,
        temperature: float = 1.0,
    ) -> AttentionOutput:
        """:meth:`AttentionBase.mix <attn.attention.AttentionBase.mix>` after the cache's own checks (type, shape,
        dtype), the layer's dtype and the key mask over cached + new tokens; an empty batch gives zeros."""
        self.check_inputs(query, key, value)
        B, t = query.shape[0], query.shape[1]
        w = self.q_proj.weight
        check_layer_dtype(query, w, "query")
        past = 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be an attn.gqa.KVCache, got {type(cache).__name__}")
            g, d = self.num_kv_heads, self.head_dim
            if cache.k.shape[0] != B or cache.k.shape[1] != g or cache.k.shape[3] != d:
                raise ValueError(f"cache holds (batch, num_kv_heads, max_len, head_dim) = {tuple(cache.k.shape)}, "
                                 f"this call needs batch {B}, {g} key/value heads of width {d}")
            if not autocast_active(query) and cache.dtype != w.dtype:
                raise TypeError(f"cache dtype {cache.dtype} != layer dtype {w.dtype}: create the cache with "
                                f"layer.new_cache(batch, max_len), which takes the layer's dtype, or cast the layer")
            past = cache.length
        m = past + key.shape[1]
        check_key_mask(key_mask, B, m, length_name="cached + new tokens" if cache is not None else "seq")
        if empty_batch(query):
            weights = query.new_zeros(B, self.num_heads, t, m) if need_weights else None
            if weights is not None and average_weights:
                weights = weights.mean(1)
            return AttentionOutput(query.new_zeros(B, t, self.embed_dim), weights)
        return super().mix(query, key, value, key_mask=key_mask, attn_mask=attn_mask, is_causal=is_causal,
                           need_weights=need_weights, cache=cache, average_weights=average_weights,
                           temperature=temperature)


@torch.no_grad()
def mha_to_gqa(mha: Attention, num_kv_heads: int, method: str = "mean") -> GroupedQueryAttention:
    """Convert a trained attention layer to ``num_kv_heads`` key/value heads (Ainslie et al. 2023, section 2.1).

    ``mha`` is any :class:`~attn.attention.Attention` of self-attention widths (a
    :class:`GroupedQueryAttention`, a :class:`~attn.multihead.MultiHeadAttention`, ...): the key and value
    projections of the ``r = g_old / g_new`` heads of each new group are combined: ``"mean"`` averages them
    (the paper's choice), ``"first"`` keeps the first head of the group. ``q_proj`` and ``out_proj`` are copied;
    causality, biases, dropout and positions are kept.
    """
    if not isinstance(mha, Attention):
        raise TypeError(f"mha must be an attn.Attention (e.g. a GroupedQueryAttention), got {type(mha).__name__}")
    if method not in ("mean", "first"):
        raise ValueError(f"method must be 'mean' or 'first', got {method!r}")
    if mha.kdim != mha.embed_dim or mha.vdim != mha.embed_dim or not isinstance(mha.out_proj, nn.Linear):
        raise ValueError(f"mha must be a self-attention layer with an output projection (kdim = vdim = embed_dim = "
                         f"{mha.embed_dim}), got kdim {mha.kdim}, vdim {mha.vdim}, out_proj {type(mha.out_proj).__name__}")
    _check_heads(mha.num_kv_heads, num_kv_heads)
    new = GroupedQueryAttention(mha.embed_dim, mha.num_heads, num_kv_heads, head_dim=mha.head_dim, causal=mha.causal,
                                bias=mha.q_proj.bias is not None, dropout=mha.dropout, position=mha.position)
    new = new.to(mha.q_proj.weight)
    new.q_proj.load_state_dict(mha.q_proj.state_dict())
    new.out_proj.load_state_dict(mha.out_proj.state_dict())
    r = mha.num_kv_heads // num_kv_heads
    for old, dst in ((mha.k_proj, new.k_proj), (mha.v_proj, new.v_proj)):
        for name in ("weight", "bias"):
            p = getattr(old, name)
            if p is None:
                continue
            grouped = p.reshape(num_kv_heads, r, mha.head_dim, *p.shape[1:])  # (g_new, r, d, [E])
            getattr(dst, name).copy_((grouped.mean(1) if method == "mean" else grouped[:, 0]).reshape(getattr(dst, name).shape))
    return new
