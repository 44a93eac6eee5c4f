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
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import (
    autocast_active,
    check_int,
    check_layer_dtype,
    check_same_dtype,
    check_tensor,
    check_token_ids,
    check_tokens,
    empty_batch,
)
from .core import AttentionOutput, scaled_dot_product_attention
from .masks import check_key_mask
from .registry import register

__all__ = [
    "KVCache", "GroupedQueryAttention", "grouped_attention", "fused_attention", "kv_cache_bytes_per_token",
    "mha_to_gqa", "DecoderLM", "generate",
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
                    key_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
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

    Returns:
        ``(B, h, t, D_v)``; a query that sees no real key gets zeros (not NaN).

    No mask but causality: one SDPA call with ``is_causal`` (``past = 0``) or no
    mask (one query after the cache). Otherwise the queries go in blocks of
    ``b`` with a ``(b, m)`` mask each (``b m`` about ``2^20``), and a causal block
    reads only the keys up to its last position. The CPU's fused kernel needs
    ``D_v = D``: the narrower side is padded with zeros (zero columns of ``q``
    and ``k`` add nothing to a score; zero columns of ``v`` give output columns
    that are dropped).
    """
    past = _check_grouped(q, k, v, past, causal, key_mask)
    _, h, t, d = q.shape
    g, m, dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if dv < d:
        v = F.pad(v, (0, d - dv))
    elif dv > d:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    gqa = g != h
    if key_mask is None and not (causal and past > 0 and t > 1):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and t > 1, scale=scale, enable_gqa=gqa)
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
                                           enable_gqa=gqa)
        outs.append(o if row_ok is None else o * row_ok.to(o.dtype))
    return torch.cat(outs, 2)[..., :dv]


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, past: int = 0, causal: bool = True,
                      need_weights: bool = False, key_mask: Tensor | None = None) -> AttentionOutput:
    r"""Attention of ``h`` query heads over ``g`` key/value heads, without repeating the keys.

    Args:
        q: ``(B, h, t, d)`` queries of the ``t`` newest tokens (absolute positions ``past .. past + t - 1``).
        k: ``(B, g, m, d)`` keys of positions ``0 .. m - 1`` (``g`` divides ``h``).
        v: ``(B, g, m, d_v)`` values (``d_v`` may differ from ``d``).
        past: number of tokens before the queries (``m = past + t`` with a cache).
        causal: query at position ``p`` sees keys ``j <= p`` (bottom-right aligned when ``past > 0``).
        need_weights: also return the weights ``(B, h, t, m)``.
        key_mask: ``(B, m)`` boolean, True = real token; a query with no real key visible gets zeros.

    Returns:
        ``(output (B, h, t, d_v), weights or None)``. Without weights: :func:`fused_attention`
        (linear memory); with weights: the query heads of a group folded into rows, explicit scores.
    """
    past = _check_grouped(q, k, v, past, causal, key_mask)
    B, h, t, d = q.shape
    g, m, dv = k.shape[1], k.shape[2], v.shape[-1]
    if not need_weights:
        return AttentionOutput(fused_attention(q, k, v, past, causal, key_mask), None)
    r = h // g
    qg = q.reshape(B, g, r * t, d)  # query heads of a group stacked along the length: row = r_idx * t + i
    mask = None
    if causal and t > 1:  # a single new token sees every cached key
        pos = torch.arange(past, past + t, device=q.device)
        mask = torch.arange(m, device=q.device)[None, :] <= pos[:, None]  # (t, m), True = may attend
        mask = mask.repeat(r, 1)  # (r t, m): the same pattern for each query head of the group
    out, w = scaled_dot_product_attention(qg, k, v, attn_mask=mask, key_mask=key_mask, need_weights=True)  # (B, g, r t, d_v)
    assert w is not None, "need_weights=True returns the weights"
    return AttentionOutput(out.reshape(B, h, t, dv), w.reshape(B, h, t, m))


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
)
class GroupedQueryAttention(nn.Module):
    """MHA (``num_kv_heads = num_heads``), GQA (``1 < num_kv_heads < num_heads``) and MQA (``num_kv_heads = 1``).

    Args:
        embed_dim: model width ``E``.
        num_heads: query heads ``h``.
        num_kv_heads: key/value heads ``g`` (divides ``h``); default ``h`` (MHA).
        head_dim: width ``d`` of each head (default ``E / h``).
        causal: hide future tokens (a decoder); ``False`` for bidirectional attention.
        bias: biases on the projections (Llama has none).

    ``forward(x (B, t, E), need_weights=False, cache=None, key_mask=None)``: with a
    :class:`KVCache` (see :meth:`new_cache`), ``x`` holds only the new tokens;
    their keys and values are appended and the queries read the whole cache.
    ``key_mask`` ``(B, m)``, True = real token, covers every key the queries
    read: ``m = t`` without a cache, ``m`` = cached + new tokens with one (pass
    the mask of the whole sequence so far at each step, e.g. for left-padded
    prompts). Without weights the attention is :func:`fused_attention`
    (memory linear in ``t``); ``need_weights=True`` forms the weights explicitly.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 causal: bool = True, bias: bool = False) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_heads(num_heads, num_kv_heads)
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), or pass head_dim")
            head_dim = embed_dim // num_heads
        check_int("head_dim", head_dim)
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.causal = causal
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)  # W^Q: h heads
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)  # W^K: g heads
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)  # W^V: g heads
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)  # W^O

    def new_cache(self, batch: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for this layer (the layer's device and dtype unless given)."""
        w = self.k_proj.weight
        return KVCache(batch, self.num_kv_heads, self.head_dim, max_len, device or w.device, dtype or w.dtype)

    def forward(self, x: Tensor, need_weights: bool = False, cache: KVCache | None = None,
                key_mask: Tensor | None = None) -> AttentionOutput:
        x = check_tokens(x, self.embed_dim)
        B, t, _ = x.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        w = self.q_proj.weight
        autocast = autocast_active(x)
        check_layer_dtype(x, w)
        past = 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be an attn.gqa.KVCache, got {type(cache).__name__}")
            if cache.k.shape[0] != B or cache.k.shape[1] != g or cache.k.shape[3] != d:
                raise ValueError(f"cache holds (batch, num_kv_heads, max_len, head_dim) = {tuple(cache.k.shape)}, "
                                 f"this call needs batch {B}, {g} key/value heads of width {d}")
            if not autocast and cache.dtype != w.dtype:
                raise TypeError(f"cache dtype {cache.dtype} != layer dtype {w.dtype}: create the cache with "
                                f"layer.new_cache(batch, max_len), which takes the layer's dtype, or cast the layer")
            past = cache.length
        m = past + t
        check_key_mask(key_mask, B, m, length_name="cached + new tokens" if cache is not None else "seq")
        if empty_batch(x):
            return AttentionOutput(x.new_zeros(B, t, self.embed_dim), x.new_zeros(B, h, t, m) if need_weights else None)
        q = self.q_proj(x).view(B, t, h, d).transpose(1, 2)  # (B, h, t, d)
        k = self.k_proj(x).view(B, t, g, d).transpose(1, 2)  # (B, g, t, d)
        v = self.v_proj(x).view(B, t, g, d).transpose(1, 2)  # (B, g, t, d)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, g, past + t, d)
        out, weights = grouped_attention(q, k, v, past=past, causal=self.causal, need_weights=need_weights,
                                         key_mask=key_mask)
        y = self.o_proj(out.transpose(1, 2).reshape(B, t, h * d))  # (B, t, E)
        return AttentionOutput(y, weights)


@torch.no_grad()
def mha_to_gqa(mha: GroupedQueryAttention, num_kv_heads: int, method: str = "mean") -> GroupedQueryAttention:
    """Convert a trained attention layer to ``num_kv_heads`` key/value heads (Ainslie et al. 2023, section 2.1).

    The key and value projections of the ``r = g_old / g_new`` heads of each new
    group are combined: ``"mean"`` averages them (the paper's choice), ``"first"``
    keeps the first head of the group. Query and output projections are copied.
    """
    if not isinstance(mha, GroupedQueryAttention):
        raise TypeError(f"mha must be a GroupedQueryAttention, got {type(mha).__name__}")
    if method not in ("mean", "first"):
        raise ValueError(f"method must be 'mean' or 'first', got {method!r}")
    _check_heads(mha.num_kv_heads, num_kv_heads)
    new = GroupedQueryAttention(mha.embed_dim, mha.num_heads, num_kv_heads, mha.head_dim, mha.causal,
                                bias=mha.q_proj.bias is not None).to(mha.q_proj.weight)
    new.q_proj.load_state_dict(mha.q_proj.state_dict())
    new.o_proj.load_state_dict(mha.o_proj.state_dict())
    r = mha.num_kv_heads // num_kv_heads
    for old, dst in ((mha.k_proj, new.k_proj), (mha.v_proj, new.v_proj)):
        for name in ("weight", "bias"):
            p = getattr(old, name)
            if p is None:
                continue
            grouped = p.reshape(num_kv_heads, r, mha.head_dim, *p.shape[1:])  # (g_new, r, d, [E])
            getattr(dst, name).copy_((grouped.mean(1) if method == "mean" else grouped[:, 0]).reshape(getattr(dst, name).shape))
    return new


class DecoderLM(nn.Module):
    """A small pre-norm decoder language model built on :class:`GroupedQueryAttention`, for cached generation.

    ``forward(tokens (B, t), caches=None) -> logits (B, t, vocab)``; with a list
    of caches (one per layer, :meth:`new_caches`) the tokens continue the cached
    sequence (learned absolute positions start at the cached length).
    """

    def __init__(self, vocab: int, embed_dim: int = 64, num_heads: int = 4, num_kv_heads: int | None = None,
                 num_layers: int = 2, max_len: int = 512) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab, embed_dim)
        self.pos = nn.Embedding(max_len, embed_dim)
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            self.layers.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(embed_dim),
                "attn": GroupedQueryAttention(embed_dim, num_heads, num_kv_heads),
                "norm2": nn.LayerNorm(embed_dim),
                "mlp": nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.GELU(), nn.Linear(4 * embed_dim, embed_dim)),
            }))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab, bias=False)

    def _blocks(self) -> Iterator[nn.ModuleDict]:
        """The transformer blocks, typed: each is the ``ModuleDict`` built in ``__init__``."""
        for layer in self.layers:
            assert isinstance(layer, nn.ModuleDict)
            yield layer

    def new_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        caches = []
        for layer in self._blocks():
            attention = layer["attn"]
            assert isinstance(attention, GroupedQueryAttention)
            caches.append(attention.new_cache(batch, max_len or self.max_len))
        return caches

    def forward(self, tokens: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        check_token_ids(tokens, self.embed.num_embeddings)
        if caches is not None:
            if not isinstance(caches, (list, tuple)) or not all(isinstance(c, KVCache) for c in caches):
                raise TypeError(f"caches must be a list of KVCache (one per layer, model.new_caches(batch)), "
                                f"got {type(caches).__name__}")
            if len(caches) != len(self.layers):
                raise ValueError(f"caches must hold one KVCache per layer: {len(self.layers)} layers, got {len(caches)}")
            if len({c.length for c in caches}) > 1:
                raise ValueError(f"the caches hold different lengths {[c.length for c in caches]}: they must "
                                 "advance together")
        past = caches[0].length if caches else 0
        if past + tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence of {past + tokens.shape[1]} tokens exceeds max_len {self.max_len}")
        h = self.embed(tokens) + self.pos(torch.arange(past, past + tokens.shape[1], device=tokens.device))
        for i, layer in enumerate(self._blocks()):
            h = h + layer["attn"](layer["norm1"](h), cache=None if caches is None else caches[i]).output
            h = h + layer["mlp"](layer["norm2"](h))
        return self.head(self.norm(h))


@torch.no_grad()
def generate(model: DecoderLM, prompt: Tensor, steps: int, use_cache: bool = True) -> Tensor:
    """Greedy decoding of ``steps`` tokens after ``prompt`` ``(B, p)``; returns ``(B, p + steps)``.

    ``use_cache=True``: the prompt is run once (prefill), then each step feeds
    only the newest token through the cached layers. ``False``: every step
    recomputes the whole sequence (the baseline the cache replaces).
    """
    check_token_ids(prompt, model.embed.num_embeddings, "prompt")
    check_int("steps", steps, 0)
    seq = prompt
    if steps == 0:
        return seq
    if use_cache:
        caches = model.new_caches(prompt.shape[0], prompt.shape[1] + steps)
        logits = model(prompt, caches)  # prefill
        for step in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            if step + 1 < steps:
                logits = model(nxt, caches)  # one new token against the cache
        return seq
    for _ in range(steps):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq
