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

from .attention import Attention, KVStore, register_kernel
from .checks import (
    check_int,
    check_positive_float,
    check_same_dtype,
    check_tensor,
)
from .core import AttentionOutput, check_qkv, scaled_dot_product_attention
from .masks import check_key_mask
from .registry import register

__all__ = [
    "sinusoidal_embedding", "RotaryEmbedding", "rotate_half", "apply_rotary", "alibi_slopes", "alibi_bias",
    "alibi_kernel", "PositionalAttention", "SCHEMES", "fused_attention", "rotate_pairs", "half_to_interleaved",
    "rope_frequencies", "yarn_magnitude", "ROPE_SCALINGS",
]

SCHEMES = ("none", "sinusoidal", "rope", "alibi")


def sinusoidal_embedding(positions: Tensor, dim: int, base: float = 10000.0, dtype: torch.dtype | None = None) -> Tensor:
    """``(n,)`` positions -> ``(n, dim)`` embeddings, sin in even and cos in odd coordinates (``dim`` even).

    Computed in float64 and returned in ``dtype`` (default: ``torch.get_default_dtype()``).
    """
    positions = _check_positions(positions)
    check_int("dim", dim)
    if dim % 2:
        raise ValueError(f"dim must be even for sinusoidal embeddings, got {dim}")
    omega = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)  # (dim/2,)
    angle = positions.to(torch.float64)[:, None] * omega  # (n, dim/2)
    pe = torch.stack([angle.sin(), angle.cos()], -1).flatten(-2)  # (n, dim): sin, cos interleaved
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    return pe.to(dtype or torch.get_default_dtype())


def rotate_half(x: Tensor) -> Tensor:
    """``(x_1, x_2) -> (-x_2, x_1)`` on the two halves of the last dimension: a 90-degree turn of every pair."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


def rotate_pairs(x: Tensor) -> Tensor:
    """``(x_0, x_1, x_2, x_3, ..) -> (-x_1, x_0, -x_3, x_2, ..)``: the 90-degree turn of the *interleaved* layout.

    GPT-J and Meta's original Llama code pair neighbouring coordinates ``(x_{2i}, x_{2i+1})``; GPT-NeoX and
    ``transformers`` (:func:`rotate_half`) pair ``(x_i, x_{i + d/2})``.
    """
    pairs = x.unflatten(-1, (-1, 2))  # (..., d/2, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)


def half_to_interleaved(head_dim: int) -> Tensor:
    """The permutation ``perm`` ``(d,)`` with ``x_interleaved = x_half[..., perm]``: ``(0, d/2, 1, d/2 + 1, ..)``.

    Coordinate ``2i`` of the interleaved layout is coordinate ``i`` of the half layout, ``2i + 1`` is ``i + d/2``:
    the same pair, rotated by the same angle. Converting a checkpoint between the layouts permutes the rows of every
    head's ``W^Q`` and ``W^K`` (and their biases) by ``perm`` (or its inverse ``argsort(perm)``).
    """
    check_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    return torch.arange(head_dim).view(2, head_dim // 2).T.flatten()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    r"""Rotate the pairs of ``x`` ``(..., n, d)`` by the angles whose ``cos, sin`` ``(n, d)`` are given.

    Half layout (default): pairs ``(x_k, x_{k + d/2})``, ``x \cos + \operatorname{rotate\_half}(x) \sin``
    (the tables of :meth:`RotaryEmbedding.cos_sin`). ``interleaved=True``: pairs ``(x_{2k}, x_{2k+1})``,
    ``x \cos + \operatorname{rotate\_pairs}(x) \sin`` with tables in the interleaved order.
    """
    check_tensor(x, "x", "(..., n, dim)")
    check_tensor(cos, "cos", "(n, dim)")
    check_tensor(sin, "sin", "(n, dim)")
    if x.ndim < 1 or x.shape[-1] % 2 or cos.shape != sin.shape or cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"apply_rotary needs x (..., n, dim) with dim even and cos, sin (n, dim) of the same dim, "
                         f"got x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    return x * cos + (rotate_pairs(x) if interleaved else rotate_half(x)) * sin


ROPE_SCALINGS = ("default", "pi", "ntk", "yarn")


def rope_frequencies(head_dim: int, base: float = 10000.0, *, method: str = "default", factor: float = 1.0,
                     original_length: int | None = None, alpha: float = 1.0, beta: float = 32.0) -> Tensor:
    r"""RoPE's frequencies ``(d/2,)`` (float64), as trained or rescaled for a context ``factor`` times longer.

    * ``"default"``: :math:`\omega_i = b^{-2i/d}`.
    * ``"pi"``, position interpolation (Chen et al. 2023): every position divided by :math:`s` = ``factor``,
      i.e. :math:`\omega_i / s`: length :math:`s L` maps onto the angles seen at length :math:`L`.
    * ``"ntk"``, NTK-aware scaling (bloc97 2023; YaRN paper, section 3.1): a larger base
      :math:`b' = b\, s^{d/(d-2)}`: the fastest pair is unchanged, the slowest is divided by :math:`s`.
    * ``"yarn"``, NTK-by-parts (Peng et al. 2023, YaRN): pair ``i`` completes :math:`r_i = L / \lambda_i`
      turns over the trained length ``original_length`` :math:`L` (:math:`\lambda_i = 2\pi/\omega_i`);
      :math:`\gamma_i = \operatorname{clip}((r_i - \alpha)/(\beta - \alpha), 0, 1)`,
      :math:`\omega_i' = (1 - \gamma_i)\, \omega_i / s + \gamma_i\, \omega_i`: pairs that turn many times
      are kept, pairs that turn less than once are interpolated. Pair it with :func:`yarn_magnitude`.
    """
    check_int("head_dim", head_dim)
    check_positive_float("base", base)
    check_positive_float("factor", factor)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    if method not in ROPE_SCALINGS:
        raise ValueError(f"method must be one of {ROPE_SCALINGS}, got {method!r}")
    i = torch.arange(0, head_dim, 2, dtype=torch.float64)
    omega = base ** (-i / head_dim)  # (d/2,)
    if method == "pi":
        return omega / factor
    if method == "ntk":
        return (base * factor ** (head_dim / (head_dim - 2))) ** (-i / head_dim)
    if method == "yarn":
        if original_length is None:
            raise ValueError("yarn needs original_length, the trained context length L")
        check_int("original_length", original_length)
        turns = original_length * omega / (2 * math.pi)  # r_i
        gamma = ((turns - alpha) / (beta - alpha)).clamp(0.0, 1.0)
        return (1 - gamma) * omega / factor + gamma * omega
    return omega


def yarn_magnitude(factor: float) -> float:
    r"""YaRN's attention temperature as a factor on ``q`` and ``k``: :math:`\sqrt{1/t} = 0.1 \ln s + 1` (1 for ``s <= 1``).

    Multiplying both ``cos`` and ``sin`` tables by it scales every score by :math:`1/t` (as ``transformers`` does).
    """
    check_positive_float("factor", factor)
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


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

    ``interleaved=True`` pairs ``(x_{2i}, x_{2i+1})`` instead (GPT-J / Meta layout, :func:`rotate_pairs`): the same
    rotation up to the permutation :func:`half_to_interleaved` of the coordinates. :meth:`rescale` swaps in the
    frequencies of a longer context (:func:`rope_frequencies`: position interpolation, NTK-aware, YaRN) and a
    magnitude on the tables (YaRN's temperature, :func:`yarn_magnitude`); neither is a parameter.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, *, interleaved: bool = False) -> None:
        super().__init__()
        check_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.head_dim, self.base = head_dim, check_positive_float("base", base)
        self.interleaved = bool(interleaved)
        self.frequencies: Tensor | None = None  # (d/2,) float64 override of base^{-2i/d} (rescale)
        self.magnitude = 1.0

    def rescale(self, method: str = "default", factor: float = 1.0, original_length: int | None = None,
                magnitude: float | None = None) -> RotaryEmbedding:
        """Use :func:`rope_frequencies` ``(head_dim, base, method=, factor=, original_length=)`` from now on.

        ``magnitude`` multiplies the ``cos, sin`` tables (default: :func:`yarn_magnitude` for ``"yarn"``, else 1).
        ``rescale()`` restores the trained frequencies. Returns ``self``.
        """
        self.frequencies = rope_frequencies(self.head_dim, self.base, method=method, factor=factor,
                                            original_length=original_length)
        if magnitude is None:
            magnitude = yarn_magnitude(factor) if method == "yarn" else 1.0
        self.magnitude = check_positive_float("magnitude", magnitude)
        return self

    @property
    def inv_freq(self) -> Tensor:
        """The frequencies ``omega_i = base^{-2i/d}`` (or those set by :meth:`rescale`), ``(d/2,)``, float64."""
        if self.frequencies is not None:
            return self.frequencies
        return self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``(n, d)``: each angle twice (once per half, or twice in a row when interleaved);
        computed in float64, returned in ``dtype``.

        ``dtype`` defaults to float64 (float32 on MPS).
        """
        positions = _check_positions(positions)
        wide = _table_dtype(positions.device)
        angle = positions.to(wide)[:, None] * self.inv_freq.to(positions.device, wide)  # (n, d/2)
        angle = angle.repeat_interleave(2, -1) if self.interleaved else torch.cat([angle, angle], -1)  # (n, d)
        cos, sin = self.magnitude * angle.cos(), self.magnitude * angle.sin()
        return (cos, sin) if dtype is None else (cos.to(dtype), sin.to(dtype))

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        x = check_tensor(x, "x", f"(..., n, head_dim={self.head_dim})")
        if x.ndim < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must have shape (..., n, head_dim={self.head_dim}), got {tuple(x.shape)}")
        positions = _check_positions(positions, x.shape[-2])
        cos, sin = self.cos_sin(positions.to(x.device), x.dtype)
        return apply_rotary(x, cos, sin, self.interleaved)


class _ShiftedRotary(RotaryEmbedding):
    """:class:`RotaryEmbedding` whose positions are moved by ``offset`` (:class:`PositionalAttention`'s ``offset=``)."""

    offset: int = 0

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return super().forward(x, positions + self.offset)


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


@register_kernel(
    "alibi",
    summary="softmax(q k^T * scale - m_h |i - j| + mask) v: ALiBi's linear distance biases, built per block of queries",
    dense=False,
)
def alibi_kernel(
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
    block_q: int = 128,
) -> AttentionOutput:
    r"""ALiBi (Press et al. 2022) as a kernel: head ``h`` of ``H`` adds ``-m_h |i - j|`` to the scores, slopes :func:`alibi_slopes`.

    .. math::

        o_i = \sum_j \operatorname{softmax}_j\big(s\, q_i^\top k_j - m_h |p_i - j| + M_{ij}\big)\, v_j,
        \qquad p_i = S - L + i

    (query ``i`` is the token ``S - L + i``: after a cache the new queries are the last ones). Causal
    (top-left, as the ``"sdpa"`` kernel) keeps only ``j <= i``, where ``|p_i - j| = p_i - j``. Without weights
    and without an ``attn_mask``, :func:`fused_attention` builds the bias one block of ``block_q`` queries at a
    time, ``(H, block_q, S)``: memory ``O(H\, block_q\, S)``, never ``(L, S)``. With weights, or with a
    general ``attn_mask`` (already ``(L, S)``), the dense bias ``(H, L, S)`` is formed.
    """
    check_qkv(q, k, v)
    check_int("block_q", block_q)
    if q.ndim != 4:
        raise ValueError(f"alibi_kernel needs heads: q (B, H, L, d), got {tuple(q.shape)}")
    n_q, n_k = q.shape[-2], k.shape[-2]
    slopes = alibi_slopes(q.shape[1]).to(device=q.device, dtype=q.dtype)
    shift = max(n_k - n_q, 0)
    if attn_mask is None and not need_weights:
        def bias(lo: int, hi: int, kh: int) -> Tensor:
            return alibi_bias(hi - lo, kh, slopes, causal=False, offset=shift + lo)

        out = fused_attention(q, k, v, key_mask=key_mask, causal=is_causal, scale=scale, bias=bias,
                              dropout_p=dropout_p, block_q=block_q)
        return AttentionOutput(out, None)
    mask = alibi_bias(n_q, n_k, slopes, causal=False, offset=shift)  # (H, L, S)
    if attn_mask is not None:
        mask = mask.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else mask + attn_mask
    return scaled_dot_product_attention(q, k, v, attn_mask=mask, key_mask=key_mask, is_causal=is_causal,
                                        dropout_p=dropout_p, scale=scale, need_weights=need_weights)


@register(
    "rope",
    paper="Su et al. 2021",
    complexity="O(n^2 d + n d^2)",
    chapter=28,
    summary="multi-head attention with rotary position embeddings on queries and keys",
    build=lambda embed_dim, num_heads: PositionalAttention(embed_dim, num_heads, "rope", causal=False),
    kernel="sdpa",
    causal=False,
)
@register(
    "alibi",
    paper="Press et al. 2022",
    complexity="O(n^2 d + n d^2)",
    chapter=28,
    summary="multi-head attention with a linear distance penalty per head (ALiBi)",
    build=lambda embed_dim, num_heads: PositionalAttention(embed_dim, num_heads, "alibi", causal=False),
    kernel="alibi",
    causal=False,
)
class PositionalAttention(Attention):
    """Multi-head attention with a position scheme inside it: :class:`~attn.attention.Attention` with rotary
    positions (``position="rope"``) or the ``"alibi"`` kernel (:func:`alibi_kernel`).

    Args:
        embed_dim, num_heads: width ``E`` and heads ``H`` (head width ``E / H``).
        position: ``"rope"`` (rotate queries and keys), ``"alibi"`` (linear biases),
            ``"none"`` or ``"sinusoidal"`` (nothing inside attention: sinusoidal
            embeddings are added to the input by the model, see :func:`sinusoidal_embedding`).
        causal: hide future keys (the layer's default for ``is_causal``).
        base: RoPE frequency base.
        bias: biases on the four projections.
        block_q: queries per block of the blocked ALiBi path (see :func:`fused_attention`).
        dropout: on the attention weights while training.
        interleaved: RoPE pairs ``(x_{2i}, x_{2i+1})`` (GPT-J / Meta layout) instead of ``(x_i, x_{i + d/2})``.

    ``forward(x (B, n, E), *, key_mask=None, is_causal=None, need_weights=False, cache=None, offset=0)``: token
    ``t`` sits at position ``offset + t`` (RoPE; ALiBi and none depend on distances only); ``key_mask``
    ``(B, n)`` is True for real tokens. Without weights the attention runs in linear memory: one fused call for
    RoPE/none, blocks of ``block_q`` queries with their own ALiBi bias for ALiBi; ``need_weights=True`` takes the
    dense path and returns ``(B, H, n, n)``. ``scheme`` holds the ``position`` argument; the parameters are
    ``q_proj, k_proj, v_proj, out_proj`` (a :class:`~attn.multihead.MultiHeadAttention`'s state dict loads).
    """

    def __init__(self, embed_dim: int, num_heads: int, position: str = "rope", *, causal: bool = True,
                 base: float = 10000.0, bias: bool = True, block_q: int = 128, dropout: float = 0.0,
                 interleaved: bool = False) -> None:
        if position not in SCHEMES:
            raise ValueError(f"position must be one of {SCHEMES}, got {position!r}")
        check_int("block_q", block_q)
        options = {"block_q": block_q} if position == "alibi" else {}
        super().__init__(embed_dim, num_heads, kernel="alibi" if position == "alibi" else "sdpa",
                         position="rope" if position == "rope" else None, rope_base=base, bias=bias, causal=causal,
                         dropout=dropout, **options)
        self.scheme, self.block_q = position, block_q
        if position == "rope":
            self.rotary = _ShiftedRotary(self.head_dim, base, interleaved=interleaved)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        cache: KVStore | None = None,
        average_weights: bool = False,
        temperature: float = 1.0,
        offset: int = 0,
    ) -> AttentionOutput:
        """:meth:`Attention.forward <attn.attention.Attention.forward>`, the tokens at positions ``offset ..``."""
        check_int("offset", offset, low=0)
        rotary = self.rotary if isinstance(self.rotary, _ShiftedRotary) else None
        if rotary is not None:
            rotary.offset = offset
        try:
            return super().forward(query, key, value, key_mask=key_mask, attn_mask=attn_mask, is_causal=is_causal,
                                   need_weights=need_weights, cache=cache, average_weights=average_weights,
                                   temperature=temperature)
        finally:
            if rotary is not None:
                rotary.offset = 0
