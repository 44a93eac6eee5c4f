r"""Chapter 28 -- positions in attention: sinusoidal embeddings, rotary embeddings (RoPE) and linear biases (ALiBi).

Attention is permutation-equivariant; position must be put in.

**Sinusoidal** (Vaswani et al. 2017, section 3.5): added to the token embeddings,

.. math::

    \mathrm{PE}_{p, 2i} = \sin(p\, \omega_i), \quad \mathrm{PE}_{p, 2i+1} = \cos(p\, \omega_i), \qquad
    \omega_i = \text{base}^{-2i/D}.

**Rotary** (Su et al. 2021, RoFormer): each pair of query/key coordinates is
rotated by the angle ``p \omega_i`` of its position ``p``,

.. math::

    \tilde q_p = R_p\, q_p, \quad \tilde k_p = R_p\, k_p, \qquad
    \tilde q_m^\top \tilde k_n = q_m^\top R_{n - m}\, k_n,

so the score depends on the positions only through ``n - m``. Pairs follow the
"rotate half" layout of ``transformers`` (coordinate ``i`` pairs with
``i + d/2``), ``\omega_i = \text{base}^{-2i/d}``.

**ALiBi** (Press et al. 2022): no embedding; head ``h`` adds
``-m_h (i - j)`` to the score of query ``i`` and key ``j <= i``, with slopes
``m_h = 2^{-8 (h + 1) / H}`` (a geometric sequence; for ``H`` not a power of 2,
the paper's interleaving of the two nearest powers).

Shapes: ``x`` ``(B, n, E)``; RoPE acts on ``(B, H, n, d)``; the ALiBi bias is
``(H, n_q, n_k)``.

**Precision rule.** Angles and tables are computed in float64 and cast to the
input's dtype (RoPE's ``cos, sin``, as in :mod:`attn.latent`; the sinusoidal
embedding is cast to the default dtype): a float64 input gets float64-exact
rotations, a float32 or bf16 input the correctly rounded ones.

**Memory.** Without weights, attention runs in memory linear in ``n``
(:func:`fused_attention`): RoPE and the causal mask go straight into the fused
``F.scaled_dot_product_attention`` (``is_causal``, no mask tensor). The ALiBi
bias is additive, and torch's CPU kernels have no fused path for an additive
bias computed inside the kernel (the one that runs it, FlexAttention, runs on a
CPU only through ``torch.compile``, a C++ build of the kernel before its first
call): so the bias is built one block of ``block_q`` queries at a time,
``(H, block_q, n_k)``, and each block goes through the fused kernel. Memory
``O(H\, block_q\, n)`` instead of ``O(H n^2)``; with ``need_weights=True`` the
exact dense path forms the full ``(B, H, n, n)`` weights.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv 2021 (Neurocomputing 2024).
Press, Smith, Lewis, "Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation", ICLR 2022.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import (
    check_heads,
    check_int,
    check_positive_float,
    check_same_dtype,
    check_tensor,
    check_tokens,
    empty_batch,
)
from .core import AttentionOutput, check_qkv, scaled_dot_product_attention
from .masks import check_key_mask
from .registry import register

__all__ = [
    "sinusoidal_embedding", "RotaryEmbedding", "rotate_half", "alibi_slopes", "alibi_bias",
    "PositionalAttention", "SCHEMES", "LastValueTask", "PositionModel", "position_loss", "fused_attention",
]

SCHEMES = ("none", "sinusoidal", "rope", "alibi")


def sinusoidal_embedding(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """``(n,)`` positions -> ``(n, dim)`` embeddings, sin in even and cos in odd coordinates (``dim`` even)."""
    positions = _check_positions(positions)
    check_int("dim", dim)
    if dim % 2:
        raise ValueError(f"dim must be even for sinusoidal embeddings, got {dim}")
    omega = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)  # (dim/2,)
    angle = positions.to(torch.float64)[:, None] * omega  # (n, dim/2)
    pe = torch.stack([angle.sin(), angle.cos()], -1).flatten(-2)  # (n, dim): sin, cos interleaved
    return pe.to(torch.get_default_dtype())


def rotate_half(x: Tensor) -> Tensor:
    """``(x_1, x_2) -> (-x_2, x_1)`` on the two halves of the last dimension: a 90-degree turn of every pair."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


def _check_positions(positions: object, n: int | None = None) -> Tensor:
    """``positions`` is a 1-D real tensor (``(n,)`` when ``n`` is given); a list or a bool/complex tensor is a TypeError."""
    shape = "(n,)" if n is None else f"(n,) = ({n},)"
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor of shape {shape}, e.g. torch.arange(n), "
                        f"got {type(positions).__name__}")
    if positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"positions must hold integer or real positions, got dtype {positions.dtype}")
    if positions.ndim != 1 or (n is not None and positions.shape[0] != n):
        raise ValueError(f"positions must have shape {shape}, got {tuple(positions.shape)}")
    return positions


def _table_dtype(device: torch.device) -> torch.dtype:
    """float64 for the angle tables (MPS has no float64: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for heads of width ``head_dim`` (even), frequency base ``base``.

    ``forward(x (..., n, d), positions (n,))`` rotates pair ``(x_i, x_{i + d/2})``
    by the angle ``p \\omega_i``: ``x cos + rotate_half(x) sin``. The angles
    ``p \\omega_i`` and their ``cos, sin`` are computed in float64 and cast to
    ``x``'s dtype (the module's precision rule).
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        check_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.head_dim, self.base = head_dim, check_positive_float("base", base)

    @property
    def inv_freq(self) -> Tensor:
        """The frequencies ``omega_i = base^{-2i/d}``, ``(d/2,)``, float64."""
        return self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``(n, d)``: each angle twice, once per half; computed in float64, returned in ``dtype``.

        ``dtype`` defaults to float64 (float32 on MPS).
        """
        positions = _check_positions(positions)
        wide = _table_dtype(positions.device)
        angle = positions.to(wide)[:, None] * self.inv_freq.to(positions.device, wide)  # (n, d/2)
        angle = torch.cat([angle, angle], -1)  # (n, d)
        cos, sin = angle.cos(), angle.sin()
        return (cos, sin) if dtype is None else (cos.to(dtype), sin.to(dtype))

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        x = check_tensor(x, "x", f"(..., n, head_dim={self.head_dim})")
        if x.ndim < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must have shape (..., n, head_dim={self.head_dim}), got {tuple(x.shape)}")
        positions = _check_positions(positions, x.shape[-2])
        cos, sin = self.cos_sin(positions.to(x.device), x.dtype)
        return x * cos + rotate_half(x) * sin


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi slopes ``(num_heads,)``: ``2^{-8/H}, 2^{-16/H}, ...``; other ``H`` interleave the nearest powers of 2."""
    check_int("num_heads", num_heads)

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_2(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(power_of_2(closest) + extra)


def alibi_bias(n_queries: int, n_keys: int, slopes: Tensor, causal: bool = True, offset: int = 0) -> Tensor:
    """Additive bias ``(H, n_q, n_k)``: ``-m_h (i - j)`` (``-m_h |i - j|`` when not causal; ``-inf`` after ``i`` when causal).

    Query ``i`` sits at position ``offset + i`` (keys at ``0..n_k-1``): with a cache, ``offset = n_k - n_q``.
    ``slopes`` is a floating-point ``(H,)`` tensor (:func:`alibi_slopes`).
    """
    check_int("n_queries", n_queries)
    check_int("n_keys", n_keys)
    check_int("offset", offset, low=0)
    slopes = check_tensor(slopes, "slopes", "(num_heads,)", 1)
    i = torch.arange(offset, offset + n_queries, device=slopes.device)[:, None]
    j = torch.arange(n_keys, device=slopes.device)[None, :]
    dist = (i - j).to(slopes.dtype)  # (n_q, n_k)
    bias = -slopes[:, None, None] * (dist if causal else dist.abs())
    if causal:
        bias = bias.masked_fill(j > i, float("-inf"))
    return bias


def fused_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, causal: bool = False,
    scale: float | None = None, bias: Callable[[int, int, int], Tensor] | None = None, dropout_p: float = 0.0,
    block_q: int = 128,
) -> Tensor:
    r"""``softmax(\tau q k^\top + b + M) v`` in memory linear in ``n``: never an ``(n_q, n_k)`` tensor.

    The reference is :func:`attn.core.scaled_dot_product_attention` with the
    same ``key_mask``, ``is_causal`` (top-left aligned, query ``i`` sees keys
    ``j <= i``) and the additive ``bias``; queries with no visible key get a zero
    output, as there. It is equal to it (forward and backward) without forming
    the scores:

    * no bias, and not both a key mask and ``causal``: one call of the fused
      ``F.scaled_dot_product_attention`` (``is_causal=True`` or a ``(B, 1, 1, n_k)``
      key mask: nothing quadratic);
    * otherwise, blocks of ``block_q`` queries: block ``[lo, hi)`` gets its own
      ``(B|1, H|1, hi - lo, n_k')`` mask/bias (``n_k' = hi`` when causal: later
      keys are skipped) and one fused call. Memory ``O(H\, block_q\, n_k)``.

    Args:
        q: ``(B, [H,] n_q, d)``. k: ``(B, [H,] n_k, d)``. v: ``(B, [H,] n_k, d_v)``.
        key_mask: ``(B, n_k)`` boolean, ``True`` = real key.
        causal: hide keys ``j > i``.
        scale: ``\tau``, default ``1/sqrt(d)``.
        bias: ``(lo, hi, n_k') -> (H|1, hi - lo, n_k')`` additive scores of queries
            ``lo..hi-1`` against keys ``0..n_k'-1`` (finite; e.g. ALiBi's ``-m_h |i - j|``).
        dropout_p: dropout on the weights (training).
        block_q: queries per block on the blocked path.

    Returns:
        ``(B, [H,] n_q, d_v)``.
    """
    check_qkv(q, k, v)
    check_same_dtype(("q", q), ("k", k), ("v", v))
    check_int("block_q", block_q)
    if q.ndim == 3:  # one head
        return fused_attention(q[:, None], k[:, None], v[:, None], key_mask=key_mask, causal=causal, scale=scale,
                               bias=bias, dropout_p=dropout_p, block_q=block_q)[:, 0]
    batch, n_q, n_k = q.shape[0], q.shape[-2], k.shape[-2]
    if key_mask is not None:
        check_key_mask(key_mask, batch, n_k)
    if bias is None and (key_mask is None or not causal):
        if key_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale)
        has_key = key_mask.any(-1)  # (B,): a row with no real key at all attends nowhere
        safe = (key_mask | ~has_key[:, None])[:, None, None, :]  # (B, 1, 1, n_k): finite math in empty rows
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, dropout_p=dropout_p, scale=scale)
        return out * has_key[:, None, None, None].to(out.dtype)
    blocks = []
    for lo in range(0, n_q, block_q):
        hi = min(lo + block_q, n_q)
        kh = min(hi, n_k) if causal else n_k  # causal: keys after the block's last query are never seen
        allowed: Tensor | None = None  # (B|1, 1, hi - lo, kh), True = may attend
        if causal:
            allowed = (torch.arange(kh, device=q.device)[None, :] <= torch.arange(lo, hi, device=q.device)[:, None])[None, None]
        if key_mask is not None:
            km = key_mask[:, None, None, :kh]
            allowed = km if allowed is None else allowed & km
        mask: Tensor | None = None
        row_ok: Tensor | None = None
        if allowed is not None:
            row_ok = allowed.any(-1, keepdim=True)
            mask = allowed | ~row_ok  # rows with nothing visible: every key (finite), zeroed below
        if bias is not None:
            add = bias(lo, hi, kh).to(q.dtype)  # (H|1, hi - lo, kh)
            mask = add if mask is None else add.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q[..., lo:hi, :], k[..., :kh, :], v[..., :kh, :], attn_mask=mask,
                                             dropout_p=dropout_p, scale=scale)
        blocks.append(out if row_ok is None else out * row_ok.to(out.dtype))
    return torch.cat(blocks, -2)


@register(
    "rope",
    paper="Su et al. 2021",
    complexity="O(n^2 d + n d^2)",
    chapter=28,
    summary="multi-head attention with rotary position embeddings on queries and keys",
    build=lambda embed_dim, num_heads: PositionalAttention(embed_dim, num_heads, "rope", causal=False),
)
@register(
    "alibi",
    paper="Press et al. 2022",
    complexity="O(n^2 d + n d^2)",
    chapter=28,
    summary="multi-head attention with a linear distance penalty per head (ALiBi)",
    build=lambda embed_dim, num_heads: PositionalAttention(embed_dim, num_heads, "alibi", causal=False),
)
class PositionalAttention(nn.Module):
    """Multi-head self-attention with a position scheme inside it.

    Args:
        embed_dim, num_heads: width ``E`` and heads ``H`` (head width ``E / H``).
        position: ``"rope"`` (rotate queries and keys), ``"alibi"`` (linear biases),
            ``"none"`` or ``"sinusoidal"`` (nothing inside attention: sinusoidal
            embeddings are added to the input by the model, see :func:`sinusoidal_embedding`).
        causal: hide future keys.
        base: RoPE frequency base.
        block_q: queries per block of the blocked ALiBi path (see :func:`fused_attention`).

    ``forward(x (B, n, E), need_weights=False, offset=0, key_mask=None)``: token ``t``
    sits at position ``offset + t``; ``key_mask`` ``(B, n)`` is True for real tokens.
    Without weights the attention runs in linear memory (:func:`fused_attention`):
    one fused call for RoPE/none, blocks of ``block_q`` queries with their own ALiBi
    bias for ALiBi; ``need_weights=True`` takes the dense path and returns ``(B, H, n, n)``.
    """

    slopes: Tensor  # buffer: (H,) ALiBi slopes

    def __init__(self, embed_dim: int, num_heads: int, position: str = "rope", causal: bool = True,
                 base: float = 10000.0, bias: bool = True, block_q: int = 128) -> None:
        super().__init__()
        if position not in SCHEMES:
            raise ValueError(f"position must be one of {SCHEMES}, got {position!r}")
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        check_heads(embed_dim, num_heads)
        self.block_q = check_int("block_q", block_q)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.position, self.causal = position, causal
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim, base) if position == "rope" else None
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def forward(self, x: Tensor, need_weights: bool = False, offset: int = 0,
                key_mask: Tensor | None = None) -> AttentionOutput:
        x = check_tokens(x, self.embed_dim)
        B, n, E = x.shape
        H, d = self.num_heads, self.head_dim
        check_int("offset", offset, low=0)
        check_key_mask(key_mask, B, n, length_name="n")
        if empty_batch(x):
            return AttentionOutput(x.new_zeros(B, n, E), x.new_zeros(B, H, n, n) if need_weights else None)
        q, k, v = self.qkv(x).view(B, n, 3, H, d).permute(2, 0, 3, 1, 4)  # each (B, H, n, d)
        if self.rotary is not None:  # position == "rope"
            pos = torch.arange(offset, offset + n, device=x.device)
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        slopes = self.slopes.to(x.dtype)
        if not need_weights:  # linear memory: no (n, n) tensor
            bias = None
            if self.position == "alibi":  # finite -m_h |i - j| of one query block; the causal mask is added by fused_attention
                bias = lambda lo, hi, kh: alibi_bias(hi - lo, kh, slopes, causal=False, offset=lo)  # noqa: E731
            out = fused_attention(q.contiguous(), k.contiguous(), v.contiguous(), key_mask=key_mask,
                                  causal=self.causal, bias=bias, block_q=self.block_q)
            return AttentionOutput(self.out_proj(out.transpose(1, 2).reshape(B, n, E)), None)
        mask: Tensor | None = None  # the dense reference path, (H, n, n)
        if self.position == "alibi":
            mask = alibi_bias(n, n, slopes, self.causal)  # (H, n, n), -inf above the diagonal if causal
        out, w = scaled_dot_product_attention(q, k, v, attn_mask=mask, key_mask=key_mask, is_causal=self.causal,
                                              need_weights=True)  # (B, H, n, d)
        return AttentionOutput(self.out_proj(out.transpose(1, 2).reshape(B, n, E)), w)


class LastValueTask:
    """Length-extrapolation task: tokens are values ``0..V-1`` or a READ token ``V``; at every READ, output the most recent value.

    The answer is the nearest earlier value token: content (skip READ tokens)
    plus recency (the nearest one), the kind of local dependency text is full of.
    The first token is always a value, so every READ has an answer.

    ``sample(batch, length, generator)`` -> ``x (B, n)`` tokens, ``y (B, n)`` targets
    (``-100`` where not a READ, ignored by the loss).
    """

    def __init__(self, n_values: int = 8, read_prob: float = 0.4) -> None:
        self.n_values, self.read_prob = n_values, read_prob
        self.read = n_values
        self.vocab = n_values + 1

    def sample(self, batch: int, length: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        values = torch.randint(0, self.n_values, (batch, length), generator=generator)
        is_read = torch.rand(batch, length, generator=generator) < self.read_prob
        is_read[:, 0] = False
        x = torch.where(is_read, torch.full_like(values, self.read), values)
        idx = torch.where(is_read, 0, torch.arange(length).expand(batch, length))  # position of each value, 0 at READs
        last = torch.cummax(idx, 1).values  # position of the most recent value at or before t
        y = torch.where(is_read, values.gather(1, last), torch.full_like(values, -100))
        return {"x": x, "y": y}


class PositionModel(nn.Module):
    """Embedding (+ sinusoidal positions if chosen) -> causal :class:`PositionalAttention` -> LayerNorm -> linear head.

    ``forward(x (B, n) tokens, need_weights=False) -> (logits (B, n, V), weights)``.
    """

    def __init__(self, vocab: int, position: str, embed_dim: int = 32, num_heads: int = 4, base: float = 10000.0) -> None:
        super().__init__()
        self.position = position
        self.embed = nn.Embedding(vocab, embed_dim)
        self.attention = PositionalAttention(embed_dim, num_heads, position, causal=True, base=base)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.embed(x)  # (B, n, E)
        if self.position == "sinusoidal":
            h = h + sinusoidal_embedding(torch.arange(x.shape[1], device=x.device), h.shape[-1]).to(h)
        out, w = self.attention(h, need_weights=need_weights)
        return self.head(self.norm(h + out)), w


def position_loss(model: PositionModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy and accuracy over the READ positions."""
    logits, _ = model(batch["x"])
    y = batch["y"]
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    keep = y >= 0
    acc = (logits.argmax(-1)[keep] == y[keep]).float().mean()
    return loss, {"acc": float(acc)}
