r"""Chapter 29 -- multi-head latent attention: keys and values cached as one small latent per token.

Multi-head latent attention (MLA), DeepSeek-AI, "DeepSeek-V2: A Strong,
Economical, and Efficient Mixture-of-Experts Language Model", arXiv 2024,
section 2.1. For a token ``x_t`` (width ``E``), ``h`` heads of width ``d``
(``d_v`` for values), a KV latent of rank ``d_c`` and a rotary key of width
``d_R``:

.. math::

    c^{KV}_t = \operatorname{RMSNorm}(W^{DKV} x_t) \in \mathbb{R}^{d_c}, \qquad
    k^C_{t,i} = W^{UK}_i c^{KV}_t, \qquad v^C_{t,i} = W^{UV}_i c^{KV}_t,

    k^R_t = \operatorname{RoPE}_t(W^{KR} x_t) \in \mathbb{R}^{d_R} \quad\text{(one key shared by all heads)},

    c^Q_t = \operatorname{RMSNorm}(W^{DQ} x_t), \qquad q^C_{t,i} = W^{UQ}_i c^Q_t, \qquad
    q^R_{t,i} = \operatorname{RoPE}_t(W^{QR}_i c^Q_t),

    o_{t,i} = \sum_{j \le t} \operatorname{softmax}_j\!\Big(
        \frac{q^{C\top}_{t,i} k^C_{j,i} + q^{R\top}_{t,i} k^R_j}{\sqrt{d + d_R}}\Big) v^C_{j,i}, \qquad
    y_t = W^O [o_{t,1}; \dots; o_{t,h}].

Only ``c^KV_t`` and ``k^R_t`` are cached: ``d_c + d_R`` numbers per token
and layer, against ``2 h d`` for multi-head attention (:class:`LatentCache`).

**Weight absorption** (section 2.1.2). Since
``q^{C\top}_{t,i} W^{UK}_i c_j = (W^{UK\top}_i q^C_{t,i})^\top c_j`` and
``\sum_j a_{tj} W^{UV}_i c_j = W^{UV}_i \sum_j a_{tj} c_j``, attention can
run directly on the cached latents: the query of head ``i`` becomes
``[W^{UK\top}_i q^C_{t,i}; q^R_{t,i}]`` (width ``d_c + d_R``), every head
reads the same keys ``[c_j; k^R_j]`` and values ``c_j`` (a multi-query
attention in latent space), and ``W^{UV}_i`` is applied after the weighted
sum (it folds into ``W^O``). ``forward(..., absorb=True)`` computes this; the
outputs equal ``absorb=False``, which up-projects every cached latent.

**Linear memory.** Without weights both forms run through one fused SDPA call
(:func:`attn.gqa.fused_attention`): no ``n x n`` score or mask tensor. Absorbed,
the query ``[W^{UK\top}_i q^C_{t,i}; q^R_{t,i}]`` and the shared key
``[c_j; k^R_j]`` make one dot product ``q^{C\top} k^C + q^{R\top} k^R``, and the
same key serves as the value: the first ``d_c`` columns of the output are
``\sum_j a_{tj} c_j`` (the rotary columns are dropped); one key/value head
for all ``h`` query heads (``enable_gqa``).
Unabsorbed, the values ``d_v`` wide are padded with zeros to ``d + d_R`` for the
CPU's fused kernel. A key padding mask ``key_mask`` ``(B, m)`` is applied to
blocks of queries. ``need_weights=True`` forms the weights explicitly.

The decoupled rotary key exists because RoPE sits between ``W^{UK}`` and the
query: ``q^\top R_{t-j} W^{UK} c_j`` has a position-dependent matrix in the
middle, so ``W^{UK}`` could not be absorbed if the rotated part were
compressed. The rotated part is a separate, small, shared key instead.

Shapes: ``x`` ``(B, t, E)``; output ``(B, t, E)``; weights ``(B, h, t, m)``
with ``m`` = cached length + ``t``. The layout of the projections follows the
released model (and ``transformers``' ``DeepseekV3Attention``):
``kv_down`` = ``[W^{DKV}; W^{KR}]`` ``(d_c + d_R, E)``, ``kv_up`` = per head
``[W^{UK}_i; W^{UV}_i]`` ``(h (d + d_v), d_c)``, ``q_up`` per head
``[W^{UQ}_i; W^{QR}_i]``; rotary in the half-split (``rotate_half``) layout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .checks import autocast_active, check_int, check_layer_dtype, check_tensor, check_tokens, empty_batch
from .core import AttentionOutput, scaled_dot_product_attention
from .gqa import _cache_write, _check_dtype, fused_attention
from .masks import check_key_mask
from .positions import RotaryEmbedding, apply_rotary
from .registry import register

__all__ = ["LatentCache", "MultiHeadLatentAttention", "latent_cache_bytes_per_token"]


def latent_cache_bytes_per_token(num_layers: int, kv_rank: int, rope_dim: int, bytes_per_number: int = 2) -> int:
    """Bytes an MLA cache grows by per token: ``L (d_c + d_R)`` numbers (against ``2 L g d`` for GQA)."""
    for name, val in (("num_layers", num_layers), ("kv_rank", kv_rank), ("rope_dim", rope_dim),
                      ("bytes_per_number", bytes_per_number)):
        check_int(name, val)
    return num_layers * (kv_rank + rope_dim) * bytes_per_number


class LatentCache:
    """The MLA cache of one layer, preallocated: latents ``c`` ``(batch, max_len, d_c)`` and rotary keys ``(batch, max_len, d_R)``.

    :meth:`append` writes the new tokens after the ``length`` stored ones and
    returns views of everything stored (no copy of the prefix per step). As
    :class:`attn.gqa.KVCache`: meant for inference; when autograd records the
    step it writes out of place (a copy per step), so backpropagation through
    cached decoding works. Its dtype must be the layer's (a ``TypeError`` otherwise).
    """

    def __init__(self, batch: int, kv_rank: int, rope_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        check_int("batch", batch, 0)
        for name, val in (("kv_rank", kv_rank), ("rope_dim", rope_dim), ("max_len", max_len)):
            check_int(name, val)
        dtype = _check_dtype(dtype)
        self.c = torch.zeros(batch, max_len, kv_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(batch, max_len, rope_dim, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.c.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.c.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the latents and rotary keys stored so far (not the preallocated room)."""
        stored = self.c[:, : self.length].numel() + self.k_rope[:, : self.length].numel()
        return stored * self.c.element_size()

    def append(self, c: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``c`` ``(B, t, d_c)`` and ``k_rope`` ``(B, t, d_R)``; return all stored ``(B, length, .)``."""
        check_tensor(c, "c", "(batch, t, d_c)", 3)
        check_tensor(k_rope, "k_rope", "(batch, t, d_R)", 3)
        B, t = c.shape[0], c.shape[1]
        if tuple(c.shape) != (self.c.shape[0], t, self.c.shape[2]) or tuple(k_rope.shape) != (B, t, self.k_rope.shape[2]):
            raise ValueError(f"cache expects c (batch={self.c.shape[0]}, t, d_c={self.c.shape[2]}) and k_rope "
                             f"(batch, t, d_R={self.k_rope.shape[2]}), got {tuple(c.shape)} and {tuple(k_rope.shape)}")
        if c.dtype != self.dtype or k_rope.dtype != self.dtype:
            raise TypeError(f"LatentCache dtype {self.dtype} != latents dtype {c.dtype}/{k_rope.dtype}: create the "
                            f"cache with the layer's dtype (layer.new_cache(...) does), or cast the layer")
        if c.device != self.c.device or k_rope.device != self.c.device:
            raise ValueError(f"LatentCache is on {self.c.device}, latents on {c.device}/{k_rope.device}")
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"latent cache is full: {self.length} cached + {t} new > max_len {self.max_len}")
        self.c = _cache_write(self.c, c, 1, self.length)
        self.k_rope = _cache_write(self.k_rope, k_rope, 1, self.length)
        self.length = end
        return self.c[:, :end], self.k_rope[:, :end]


def _causal(past: int, t: int, m: int, device: torch.device) -> Tensor | None:
    """``(t, m)`` boolean mask, True = may attend: the query at position ``past + i`` sees keys ``j <= past + i``."""
    if t == 1:
        return None  # one new token sees the whole cache
    pos = torch.arange(past, past + t, device=device)
    return torch.arange(m, device=device)[None, :] <= pos[:, None]


@register(
    "mla",
    paper="DeepSeek-AI 2024",
    complexity="O(n^2 h (d + d_R))",
    chapter=29,
    summary="multi-head latent attention: keys and values from one cached rank-d_c latent, decoupled rotary key",
    build=lambda embed_dim, num_heads: MultiHeadLatentAttention(embed_dim, num_heads),
    kernel=None,
    causal=True,
)
class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2), causal, with a :class:`LatentCache` for decoding.

    Args:
        embed_dim: model width ``E``.
        num_heads: heads ``h``.
        kv_rank: latent rank ``d_c`` (default ``4 d``, DeepSeek-V2's ratio).
        q_rank: rank ``d_c'`` of the query compression (``None``: a full ``W^Q``, as DeepSeek-V2-Lite).
        head_dim: ``d`` of the compressed query/key part (default ``E / h``).
        rope_dim: ``d_R`` of the decoupled rotary query/key (default ``d / 2``, even, >= 2).
        v_head_dim: ``d_v`` (default ``d``).
        rope_base: RoPE base.
        eps: epsilon of the RMSNorms on the latents.

    ``forward(x (B, t, E), *, key_mask=None, is_causal=None, need_weights=False, cache=None, absorb=False)``
    (the :class:`~attn.attention.SequenceMixer` protocol, always causal: ``is_causal=False`` is refused):
    with a cache (:meth:`new_cache`), ``x`` holds only the new tokens, whose
    positions continue the cached ones. ``absorb=True`` attends in latent space.
    ``key_mask`` ``(B, m)``, True = real token, covers every key read (``m = t``
    without a cache, cached + new tokens with one); a query with no real key
    visible gets zeros. Without weights: :func:`attn.gqa.fused_attention`,
    memory linear in ``t``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, kv_rank: int | None = None, q_rank: int | None = None,
                 head_dim: int | None = None, rope_dim: int | None = None, v_head_dim: int | None = None,
                 rope_base: float = 10000.0, eps: float = 1e-6) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), or pass head_dim")
            head_dim = embed_dim // num_heads
        d = check_int("head_dim", head_dim)
        d_r = check_int("rope_dim", rope_dim if rope_dim is not None else max(2, (d // 2) // 2 * 2))
        if d_r % 2:
            raise ValueError(f"rope_dim must be even (pairs are rotated), got {d_r}")
        d_v = check_int("v_head_dim", v_head_dim if v_head_dim is not None else d)
        r = check_int("kv_rank", kv_rank if kv_rank is not None else 4 * d)
        if q_rank is not None:
            check_int("q_rank", q_rank)
        self.embed_dim, self.num_heads, self.head_dim, self.rope_dim, self.v_head_dim = embed_dim, num_heads, d, d_r, d_v
        self.kv_rank, self.q_rank, self.rope_base = r, q_rank, rope_base
        self.scale = 1.0 / math.sqrt(d + d_r)
        h = num_heads
        if q_rank is None:
            self.q_proj = nn.Linear(embed_dim, h * (d + d_r), bias=False)  # [W^UQ_i; W^QR_i] per head, on x
        else:
            self.q_down = nn.Linear(embed_dim, q_rank, bias=False)  # W^DQ
            self.q_norm = nn.RMSNorm(q_rank, eps=eps)
            self.q_up = nn.Linear(q_rank, h * (d + d_r), bias=False)  # [W^UQ_i; W^QR_i] per head
        self.kv_down = nn.Linear(embed_dim, r + d_r, bias=False)  # [W^DKV; W^KR]
        self.kv_norm = nn.RMSNorm(r, eps=eps)
        self.kv_up = nn.Linear(r, h * (d + d_v), bias=False)  # [W^UK_i; W^UV_i] per head
        self.out_proj = nn.Linear(h * d_v, embed_dim, bias=False)  # W^O (DeepSeek's o_proj)
        self.rotary = RotaryEmbedding(d_r, rope_base)  # the package's one RoPE (attn.positions), half-split pairs

    # ------------------------------------------------------------------ pieces

    def new_cache(self, batch: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> LatentCache:
        """An empty cache for this layer."""
        w = self.kv_down.weight
        return LatentCache(batch, self.kv_rank, self.rope_dim, max_len, device or w.device, dtype or w.dtype)

    def up_weights(self) -> tuple[Tensor, Tensor]:
        """``W^UK`` ``(h, d, d_c)`` and ``W^UV`` ``(h, d_v, d_c)`` (views of ``kv_up.weight``)."""
        w = self.kv_up.weight.view(self.num_heads, self.head_dim + self.v_head_dim, self.kv_rank)
        return w[:, : self.head_dim], w[:, self.head_dim :]

    def latents(self, x: Tensor, past: int = 0) -> tuple[Tensor, Tensor]:
        """What the cache stores for tokens ``x`` ``(B, t, E)`` at positions ``past..``: ``c`` ``(B, t, d_c)``, rotated ``k^R`` ``(B, t, d_R)``."""
        x = check_tokens(x, self.embed_dim)
        check_int("past", past, 0)
        ckv = self.kv_down(x)  # (B, t, d_c + d_R)
        c = self.kv_norm(ckv[..., : self.kv_rank])  # (B, t, d_c)
        cos, sin = self._rotary(past, x.shape[1], x)
        return c, apply_rotary(ckv[..., self.kv_rank :], cos, sin)  # (B, t, d_R)

    def queries(self, x: Tensor, past: int = 0) -> tuple[Tensor, Tensor]:
        """``q^C`` ``(B, h, t, d)`` and rotated ``q^R`` ``(B, h, t, d_R)``."""
        x = check_tokens(x, self.embed_dim)
        check_int("past", past, 0)
        B, t, _ = x.shape
        q = self.q_proj(x) if self.q_rank is None else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(B, t, self.num_heads, self.head_dim + self.rope_dim).transpose(1, 2)  # (B, h, t, d + d_R)
        cos, sin = self._rotary(past, t, x)
        return q[..., : self.head_dim], apply_rotary(q[..., self.head_dim :], cos, sin)

    def _rotary(self, past: int, t: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """``cos, sin`` ``(t, d_R)`` of positions ``past .. past + t - 1`` (float64 angles, in ``x``'s dtype)."""
        return self.rotary.cos_sin(torch.arange(past, past + t, device=x.device), x.dtype)

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None,
                need_weights: bool = False, cache: LatentCache | None = None, absorb: bool = False) -> AttentionOutput:
        """Causal MLA over ``x`` ``(B, t, E)`` (the new tokens after ``cache``, if any).

        Args:
            key_mask: ``(B, m)`` boolean, ``True`` = real token, ``m`` = cached + new tokens.
            is_causal: ``None`` or ``True``; MLA is a decoder layer (its rotary key and its cache assume that
                every query sees only earlier tokens): ``False`` is a ``ValueError``.
            need_weights: return the weights ``(B, h, t, m)``.
            cache: a :class:`LatentCache` (:meth:`new_cache`).
            absorb: attend in latent space (equal outputs; see the module docstring).
        """
        if is_causal is not None and is_causal is not True:
            if not isinstance(is_causal, bool):
                raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
            raise ValueError("MultiHeadLatentAttention is always causal (a decoder layer with a latent KV cache): "
                             "is_causal=False is not supported; pass None or True")
        x = check_tokens(x, self.embed_dim)
        B, t, _ = x.shape
        h = self.num_heads
        w = self.kv_down.weight
        autocast = autocast_active(x)
        check_layer_dtype(x, w)
        if cache is not None:
            if not isinstance(cache, LatentCache):
                raise TypeError(f"cache must be an attn.latent.LatentCache, got {type(cache).__name__}")
            if cache.c.shape[0] != B or cache.c.shape[2] != self.kv_rank or cache.k_rope.shape[2] != self.rope_dim:
                raise ValueError(f"cache holds (batch, max_len, d_c) = {tuple(cache.c.shape)} and d_R = "
                                 f"{cache.k_rope.shape[2]}; this call needs batch {B}, d_c {self.kv_rank}, d_R {self.rope_dim}")
            if not autocast and cache.dtype != w.dtype:
                raise TypeError(f"cache dtype {cache.dtype} != layer dtype {w.dtype}: create the cache with "
                                f"layer.new_cache(batch, max_len), which takes the layer's dtype, or cast the layer")
        past = cache.length if cache is not None else 0
        m = past + t
        check_key_mask(key_mask, B, m, length_name="cached + new tokens" if cache is not None else "seq")
        if empty_batch(x):
            return AttentionOutput(x.new_zeros(B, t, self.embed_dim), x.new_zeros(B, h, t, m) if need_weights else None)
        q_c, q_r = self.queries(x, past)  # (B, h, t, d), (B, h, t, d_R)
        c, k_r = self.latents(x, past)  # (B, t, d_c), (B, t, d_R)
        if cache is not None:
            c, k_r = cache.append(c, k_r)  # (B, m, d_c), (B, m, d_R)
        w_uk, w_uv = self.up_weights()  # (h, d, d_c), (h, d_v, d_c)
        weights = None
        if absorb:
            # query in latent space: W^UK_i^T q^C_i; every head reads the same keys [c; k^R] and values c
            q = torch.cat([torch.einsum("bhtd,hdr->bhtr", q_c, w_uk), q_r], -1)  # (B, h, t, d_c + d_R)
            k = torch.cat([c, k_r], -1)[:, None]  # (B, 1, m, d_c + d_R): one shared key head
            if need_weights:
                mask = _causal(past, t, m, x.device)
                rows = None if mask is None else mask.repeat(h, 1)  # (h t, m): heads folded into rows
                q_rows = q.reshape(B, 1, h * t, self.kv_rank + self.rope_dim)
                o_lat, w_rows = scaled_dot_product_attention(q_rows, k, c[:, None], attn_mask=rows, key_mask=key_mask,
                                                             scale=self.scale, need_weights=True)
                assert w_rows is not None, "need_weights=True returns the weights"
                o_lat, weights = o_lat.view(B, h, t, self.kv_rank), w_rows.view(B, h, t, m)
            else:  # the key doubles as the value: its first d_c output columns are sum_j a_tj c_j
                o_lat = fused_attention(q, k, k, past, True, key_mask, self.scale)[..., : self.kv_rank]
            out = torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)  # (B, h, t, d_v): W^UV after the sum
        else:
            kv = self.kv_up(c).view(B, m, h, self.head_dim + self.v_head_dim).transpose(1, 2)  # (B, h, m, d + d_v)
            k = torch.cat([kv[..., : self.head_dim], k_r[:, None].expand(B, h, m, self.rope_dim)], -1)  # (B, h, m, d + d_R)
            q = torch.cat([q_c, q_r], -1)  # (B, h, t, d + d_R)
            v = kv[..., self.head_dim :]  # (B, h, m, d_v)
            if need_weights:
                out, weights = scaled_dot_product_attention(q, k, v, attn_mask=_causal(past, t, m, x.device),
                                                            key_mask=key_mask, scale=self.scale, need_weights=True)
            else:
                out = fused_attention(q, k, v, past, True, key_mask, self.scale)
        y = self.out_proj(out.transpose(1, 2).reshape(B, t, h * self.v_head_dim))  # (B, t, E)
        return AttentionOutput(y, weights)

    @torch.no_grad()
    def absorbed_output_weight(self) -> Tensor:
        """``W^O`` with ``W^UV`` folded in: ``(E, h d_c)``, so that ``y = W^{O'} [\\sum_j a_{tj} c_j]_{i=1..h}``."""
        _, w_uv = self.up_weights()  # (h, d_v, d_c)
        w_o = self.out_proj.weight.view(self.embed_dim, self.num_heads, self.v_head_dim)  # (E, h, d_v)
        return torch.einsum("ehv,hvr->ehr", w_o, w_uv).reshape(self.embed_dim, self.num_heads * self.kv_rank)
