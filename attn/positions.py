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

Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv 2021 (Neurocomputing 2024).
Press, Smith, Lewis, "Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation", ICLR 2022.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .checks import check_tensor, check_tokens, empty_batch
from .core import AttentionOutput, scaled_dot_product_attention
from .registry import register

__all__ = [
    "sinusoidal_embedding", "RotaryEmbedding", "rotate_half", "alibi_slopes", "alibi_bias",
    "PositionalAttention", "SCHEMES", "LastValueTask", "PositionModel", "position_loss",
]

SCHEMES = ("none", "sinusoidal", "rope", "alibi")


def sinusoidal_embedding(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """``(n,)`` positions -> ``(n, dim)`` embeddings, sin in even and cos in odd coordinates (``dim`` even)."""
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


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for heads of width ``head_dim`` (even), frequency base ``base``.

    ``forward(x (..., n, d), positions (n,))`` rotates pair ``(x_i, x_{i + d/2})``
    by the angle ``p \\omega_i``: ``x cos + rotate_half(x) sin``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # omega_i, (d/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``(n, d)``: each angle twice, once per half."""
        angle = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)  # (n, d/2)
        angle = torch.cat([angle, angle], -1)  # (n, d)
        return angle.cos(), angle.sin()

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        x = check_tensor(x, "x", f"(..., n, head_dim={self.head_dim})")
        if x.ndim < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must have shape (..., n, head_dim={self.head_dim}), got {tuple(x.shape)}")
        if positions.shape != (x.shape[-2],):
            raise ValueError(f"positions must have shape (n,) = ({x.shape[-2]},), got {tuple(positions.shape)}")
        cos, sin = self.cos_sin(positions)
        return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi slopes ``(num_heads,)``: ``2^{-8/H}, 2^{-16/H}, ...``; other ``H`` interleave the nearest powers of 2."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

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
    """
    i = torch.arange(offset, offset + n_queries, device=slopes.device)[:, None]
    j = torch.arange(n_keys, device=slopes.device)[None, :]
    dist = (i - j).to(slopes.dtype)  # (n_q, n_k)
    bias = -slopes[:, None, None] * (dist if causal else dist.abs())
    if causal:
        bias = bias.masked_fill(j > i, float("-inf"))
    return bias


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

    ``forward(x (B, n, E), need_weights=False, offset=0)``: token ``t`` sits at position ``offset + t``.
    """

    def __init__(self, embed_dim: int, num_heads: int, position: str = "rope", causal: bool = True,
                 base: float = 10000.0, bias: bool = True) -> None:
        super().__init__()
        if position not in SCHEMES:
            raise ValueError(f"position must be one of {SCHEMES}, got {position!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.position, self.causal = position, causal
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim, base) if position == "rope" else None
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def forward(self, x: Tensor, need_weights: bool = False, offset: int = 0) -> AttentionOutput:
        x = check_tokens(x, self.embed_dim)
        B, n, E = x.shape
        H, d = self.num_heads, self.head_dim
        if empty_batch(x):
            return AttentionOutput(x.new_zeros(B, n, E), x.new_zeros(B, H, n, n) if need_weights else None)
        q, k, v = self.qkv(x).view(B, n, 3, H, d).permute(2, 0, 3, 1, 4)  # each (B, H, n, d)
        mask: Tensor | None = None
        if self.position == "rope":
            pos = torch.arange(offset, offset + n, device=x.device)
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        if self.position == "alibi":
            mask = alibi_bias(n, n, self.slopes.to(x.dtype), self.causal)  # (H, n, n), -inf above the diagonal if causal
        elif self.causal:
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        out, w = scaled_dot_product_attention(q, k, v, attn_mask=mask, need_weights=need_weights)  # (B, H, n, d)
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
