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

from .checks import check_int, check_tokens, empty_batch
from .core import AttentionOutput, scaled_dot_product_attention
from .registry import register

__all__ = [
    "rotary_cos_sin", "apply_rotary", "LatentCache", "MultiHeadLatentAttention", "latent_cache_bytes_per_token",
]


def rotary_cos_sin(positions: Tensor, dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    r"""RoPE tables (Su et al. 2021): ``cos, sin`` ``(n, dim)`` for angles ``p \theta_k``, ``\theta_k = base^{-2k/dim}``.

    Half-split layout: column ``k`` and ``k + dim/2`` share the frequency ``\theta_k``.
    """
    if dim % 2:
        raise ValueError(f"the rotary width must be even, got {dim}")
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (n, dim/2)
    angles = torch.cat([angles, angles], -1)  # (n, dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs ``(x_k, x_{k + dim/2})`` of ``x`` ``(..., n, dim)`` by the angles in ``cos, sin`` ``(n, dim)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)  # rotate_half
    return x * cos + rotated * sin


def latent_cache_bytes_per_token(num_layers: int, kv_rank: int, rope_dim: int, bytes_per_number: int = 2) -> int:
    """Bytes an MLA cache grows by per token: ``L (d_c + d_R)`` numbers (against ``2 L g d`` for GQA)."""
    return num_layers * (kv_rank + rope_dim) * bytes_per_number


class LatentCache:
    """The MLA cache of one layer, preallocated: latents ``c`` ``(batch, max_len, d_c)`` and rotary keys ``(batch, max_len, d_R)``.

    :meth:`append` writes the new tokens after the ``length`` stored ones and
    returns views of everything stored (no copy of the prefix per step).
    """

    def __init__(self, batch: int, kv_rank: int, rope_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if batch < 0 or min(kv_rank, rope_dim, max_len) < 1:
            raise ValueError(f"LatentCache needs kv_rank, rope_dim, max_len >= 1 and batch >= 0, got "
                             f"{kv_rank}, {rope_dim}, {max_len}, {batch}")
        self.c = torch.zeros(batch, max_len, kv_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(batch, max_len, rope_dim, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.c.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the latents and rotary keys stored so far (not the preallocated room)."""
        stored = self.c[:, : self.length].numel() + self.k_rope[:, : self.length].numel()
        return stored * self.c.element_size()

    def append(self, c: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``c`` ``(B, t, d_c)`` and ``k_rope`` ``(B, t, d_R)``; return all stored ``(B, length, .)``."""
        B, t = c.shape[0], c.shape[1]
        if tuple(c.shape) != (self.c.shape[0], t, self.c.shape[2]) or tuple(k_rope.shape) != (B, t, self.k_rope.shape[2]):
            raise ValueError(f"cache expects c (batch={self.c.shape[0]}, t, d_c={self.c.shape[2]}) and k_rope "
                             f"(batch, t, d_R={self.k_rope.shape[2]}), got {tuple(c.shape)} and {tuple(k_rope.shape)}")
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"latent cache is full: {self.length} cached + {t} new > max_len {self.max_len}")
        self.c[:, self.length : end] = c
        self.k_rope[:, self.length : end] = k_rope
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

    ``forward(x (B, t, E), need_weights=False, cache=None, absorb=False)``:
    with a cache (:meth:`new_cache`), ``x`` holds only the new tokens, whose
    positions continue the cached ones. ``absorb=True`` attends in latent space.
    """

    def __init__(self, embed_dim: int, num_heads: int, kv_rank: int | None = None, q_rank: int | None = None,
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
        self.o_proj = nn.Linear(h * d_v, embed_dim, bias=False)  # W^O

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
        ckv = self.kv_down(x)  # (B, t, d_c + d_R)
        c = self.kv_norm(ckv[..., : self.kv_rank])  # (B, t, d_c)
        cos, sin = self._rotary(past, x.shape[1], x)
        return c, apply_rotary(ckv[..., self.kv_rank :], cos, sin)  # (B, t, d_R)

    def queries(self, x: Tensor, past: int = 0) -> tuple[Tensor, Tensor]:
        """``q^C`` ``(B, h, t, d)`` and rotated ``q^R`` ``(B, h, t, d_R)``."""
        B, t, _ = x.shape
        q = self.q_proj(x) if self.q_rank is None else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(B, t, self.num_heads, self.head_dim + self.rope_dim).transpose(1, 2)  # (B, h, t, d + d_R)
        cos, sin = self._rotary(past, t, x)
        return q[..., : self.head_dim], apply_rotary(q[..., self.head_dim :], cos, sin)

    def _rotary(self, past: int, t: int, x: Tensor) -> tuple[Tensor, Tensor]:
        return rotary_cos_sin(torch.arange(past, past + t, device=x.device), self.rope_dim, self.rope_base, x.dtype)

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, need_weights: bool = False, cache: LatentCache | None = None,
                absorb: bool = False) -> AttentionOutput:
        x = check_tokens(x, self.embed_dim)
        B, t, _ = x.shape
        h = self.num_heads
        if cache is not None:
            if not isinstance(cache, LatentCache):
                raise TypeError(f"cache must be an attn.latent.LatentCache, got {type(cache).__name__}")
            if cache.c.shape[0] != B or cache.c.shape[2] != self.kv_rank or cache.k_rope.shape[2] != self.rope_dim:
                raise ValueError(f"cache holds (batch, max_len, d_c) = {tuple(cache.c.shape)} and d_R = "
                                 f"{cache.k_rope.shape[2]}; this call needs batch {B}, d_c {self.kv_rank}, d_R {self.rope_dim}")
        past = cache.length if cache is not None else 0
        if empty_batch(x):
            return AttentionOutput(x.new_zeros(B, t, self.embed_dim), x.new_zeros(B, h, t, past + t) if need_weights else None)
        q_c, q_r = self.queries(x, past)  # (B, h, t, d), (B, h, t, d_R)
        c, k_r = self.latents(x, past)  # (B, t, d_c), (B, t, d_R)
        if cache is not None:
            c, k_r = cache.append(c, k_r)  # (B, m, d_c), (B, m, d_R)
        m = c.shape[1]
        mask = _causal(past, t, m, x.device)
        w_uk, w_uv = self.up_weights()  # (h, d, d_c), (h, d_v, d_c)
        if absorb:
            # query in latent space: W^UK_i^T q^C_i; every head reads the same keys [c; k^R] and values c
            q_lat = torch.einsum("bhtd,hdr->bhtr", q_c, w_uk)  # (B, h, t, d_c)
            q = torch.cat([q_lat, q_r], -1).reshape(B, 1, h * t, self.kv_rank + self.rope_dim)  # heads folded into rows
            k = torch.cat([c, k_r], -1)[:, None]  # (B, 1, m, d_c + d_R): one shared key head
            rows = None if mask is None else mask.repeat(h, 1)  # (h t, m)
            o_lat, w = scaled_dot_product_attention(q, k, c[:, None], attn_mask=rows, scale=self.scale, need_weights=need_weights)
            o_lat = o_lat.view(B, h, t, self.kv_rank)  # sum_j a_tj c_j per head
            out = torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)  # (B, h, t, d_v): W^UV after the sum
            weights = None if w is None else w.view(B, h, t, m)
        else:
            kv = self.kv_up(c).view(B, m, h, self.head_dim + self.v_head_dim).transpose(1, 2)  # (B, h, m, d + d_v)
            k = torch.cat([kv[..., : self.head_dim], k_r[:, None].expand(B, h, m, self.rope_dim)], -1)  # (B, h, m, d + d_R)
            q = torch.cat([q_c, q_r], -1)  # (B, h, t, d + d_R)
            out, weights = scaled_dot_product_attention(q, k, kv[..., self.head_dim :], attn_mask=mask, scale=self.scale,
                                                        need_weights=need_weights)
        y = self.o_proj(out.transpose(1, 2).reshape(B, t, h * self.v_head_dim))  # (B, t, E)
        return AttentionOutput(y, weights)

    @torch.no_grad()
    def absorbed_output_weight(self) -> Tensor:
        """``W^O`` with ``W^UV`` folded in: ``(E, h d_c)``, so that ``y = W^{O'} [\\sum_j a_{tj} c_j]_{i=1..h}``."""
        _, w_uv = self.up_weights()  # (h, d_v, d_c)
        w_o = self.o_proj.weight.view(self.embed_dim, self.num_heads, self.v_head_dim)  # (E, h, d_v)
        return torch.einsum("ehv,hvr->ehr", w_o, w_uv).reshape(self.embed_dim, self.num_heads * self.kv_rank)
