r"""Chapter 18 -- Convolutional attention: attention maps made by convolutions (CBAM), convolutions inside attention (Primer).

**CBAM** (Woo et al. 2018, "CBAM: Convolutional Block Attention Module",
ECCV). A feature map :math:`F \in \mathbb{R}^{C \times H \times W}` is refined
twice, first along channels, then over space:

.. math::

    M_c(F) = \sigma\big(W_1\,\mathrm{ReLU}(W_0 F^c_{avg}) + W_1\,\mathrm{ReLU}(W_0 F^c_{max})\big)
             \in \mathbb{R}^{C}, \qquad F' = M_c(F) \otimes F,

    M_s(F') = \sigma\big(f^{k \times k}([F'^s_{avg};\, F'^s_{max}])\big) \in \mathbb{R}^{H \times W},
             \qquad F'' = M_s(F') \otimes F',

where :math:`F^c_{avg}, F^c_{max} \in \mathbb{R}^C` pool each channel over
the ``H x W`` positions, the MLP ``W_0 (C/r x C)``, ``W_1 (C x C/r)`` is
shared by both, :math:`F'^s_{avg}, F'^s_{max} \in \mathbb{R}^{H \times W}`
pool over the channels, and :math:`f^{k \times k}` is one ``k x k``
convolution (``k = 7`` in the paper) from 2 maps to 1 with zero "same"
padding. Shapes: ``(B, C, H, W) -> (B, C, H, W)``; channel weights
``(B, C)``, spatial map ``(B, H, W)``. Cost ``O(HW (C + k^2) + C^2/r)``:
linear in the number of pixels.

**Multi-DConv-Head Attention** (So et al. 2021, "Primer: Searching for
Efficient Transformers for Language Modeling", NeurIPS). After the query, key
and value projections, each of the ``E`` channels is convolved along the
sequence with its own width-3 kernel (a *depthwise* convolution), causally:

.. math::

    \tilde q_{i,c} = b^Q_c + \sum_{t=0}^{k-1} w^Q_{c,t}\, q_{i-k+1+t,\,c}
    \qquad (q_{j,c} = 0 \text{ for } j < 0),

likewise :math:`\tilde k, \tilde v`, then causal multi-head attention on
``(Q~, K~, V~)``. Output ``i`` depends on inputs ``<= i`` only. Shapes
``(B, n, E) -> (B, n, E)``, weights ``(B, h, n, n)``. The convolutions add
``O(n E k)`` to the ``O(n^2 E)`` of attention.

The chapter's experiment (shapes on cluttered images, a small CNN with and
without CBAM, CBAM's own task for the comparison) lives in
:mod:`attn.experiments.convolutional`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionBase
from .checks import check_tensor, check_tokens, empty_batch
from .core import AttentionOutput
from .masks import check_key_mask
from .multihead import MultiHeadAttention
from .positions import fused_attention
from .registry import register

__all__ = [
    "ChannelAttention", "SpatialAttention", "CBAM", "CBAMOutput", "MultiDConvHeadAttention", "causal_depthwise_conv",
]


def _check_feature_map(x: object, channels: int, name: str = "x") -> Tensor:
    shape = f"(batch, channels={channels}, height, width)"
    x = check_tensor(x, name, shape, 4)
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)} (channels {x.shape[1]} != {channels})")
    if x.shape[0] > 0 and (x.shape[2] == 0 or x.shape[3] == 0):
        raise ValueError(f"{name} must have height, width >= 1: shape {shape}, got {tuple(x.shape)}")
    return x


def _check_positive_int(value: object, name: str, odd: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name} must be odd (a centred 'same' convolution), got {value}")
    return value


class ChannelAttention(nn.Module):
    r"""CBAM's channel attention :math:`M_c(F) = \sigma(\mathrm{MLP}(F^c_{avg}) + \mathrm{MLP}(F^c_{max}))`.

    Args:
        channels: ``C``.
        reduction: ``r``; the hidden width is ``max(1, C // r)`` (the paper uses 16).
        bias: biases in the MLP. The paper's equation has none (the default);
            the authors' code uses ``nn.Linear`` with biases.

    ``x (B, C, H, W) -> weights (B, C)`` in ``(0, 1)``.
    """

    def __init__(self, channels: int, reduction: int = 16, bias: bool = False) -> None:
        super().__init__()
        self.channels = _check_positive_int(channels, "channels")
        self.reduction = _check_positive_int(reduction, "reduction")
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, channels, bias=bias))  # W_1 ReLU(W_0 .)

    def forward(self, x: Tensor) -> Tensor:
        x = _check_feature_map(x, self.channels)
        avg = x.mean(dim=(2, 3))  # F^c_avg (B, C)
        mx = x.amax(dim=(2, 3))  # F^c_max (B, C)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))  # (B, C)


class SpatialAttention(nn.Module):
    r"""CBAM's spatial attention :math:`M_s(F) = \sigma(f^{k \times k}([F^s_{avg}; F^s_{max}]))`.

    Args:
        kernel_size: ``k`` (odd; the paper uses 7 and compares 3).
        bias: a bias in the convolution (ignored with ``batch_norm``).
        batch_norm: follow the convolution with ``BatchNorm2d(1)`` before the
            sigmoid, as the authors' code does (their convolution has no bias).
            The equation has no normalisation (default ``False``); without it
            the logits of ReLU features are large and the sigmoid can saturate
            at 1 everywhere (the chapter measures this).

    ``x (B, C, H, W) -> map (B, H, W)`` in ``(0, 1)``.
    """

    def __init__(self, kernel_size: int = 7, bias: bool = True, batch_norm: bool = False) -> None:
        super().__init__()
        self.kernel_size = _check_positive_int(kernel_size, "kernel_size", odd=True)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=bias and not batch_norm)  # f^{k x k}: 2 maps -> 1
        self.norm = nn.BatchNorm2d(1) if batch_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = check_tensor(x, "x", "(batch, channels, height, width)", 4)
        pooled = torch.stack([x.mean(1), x.amax(1)], 1)  # [F^s_avg; F^s_max] (B, 2, H, W)
        return torch.sigmoid(self.norm(self.conv(pooled)))[:, 0]  # (B, H, W)


class CBAMOutput(NamedTuple):
    """``output (B, C, H, W)``, ``channel`` weights ``(B, C)``, ``spatial`` map ``(B, H, W)``."""

    output: Tensor
    channel: Tensor
    spatial: Tensor


@register(
    "cbam",
    paper="Woo et al. 2018",
    complexity="O(HW (C + k^2))",
    chapter=18,
    data="image",
    summary="channel attention (shared MLP on pooled features) then spatial attention (k x k conv on pooled maps)",
)
class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention, each a sigmoid gate.

    Args:
        channels: ``C``.
        reduction: ``r`` of the channel MLP (paper: 16).
        kernel_size: ``k`` of the spatial convolution (paper: 7).
        mlp_bias, conv_bias, batch_norm: see :class:`ChannelAttention`, :class:`SpatialAttention`.

    ``x (B, C, H, W)`` -> :class:`CBAMOutput` ``(F'' (B, C, H, W), M_c (B, C), M_s (B, H, W))``: an image
    module with its own typed interface (not a sequence mixer). Its own task is in
    :mod:`attn.experiments.convolutional`.
    """

    def __init__(
        self, channels: int, reduction: int = 16, kernel_size: int = 7, *, mlp_bias: bool = False, conv_bias: bool = True,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.channel_attention = ChannelAttention(channels, reduction, bias=mlp_bias)
        self.spatial_attention = SpatialAttention(kernel_size, bias=conv_bias, batch_norm=batch_norm)

    def forward(self, x: Tensor) -> CBAMOutput:
        x = _check_feature_map(x, self.channels)
        if empty_batch(x):
            b, c, h, w = x.shape
            return CBAMOutput(x.clone(), x.new_zeros(b, c), x.new_zeros(b, h, w))
        mc = self.channel_attention(x)  # (B, C)
        refined = x * mc[:, :, None, None]  # F' = M_c(F) (x) F
        ms = self.spatial_attention(refined)  # (B, H, W)
        return CBAMOutput(refined * ms[:, None], mc, ms)  # F'' = M_s(F') (x) F'


# ----------------------------------------------------------------------------- Primer


def causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, causal: bool = True) -> Tensor:
    r"""Depthwise convolution along the sequence: ``x (B, n, C)``, ``weight (C, k)`` -> ``(B, n, C)``.

    Causal: output ``i`` reads inputs ``i-k+1 .. i`` (zeros before 0). Otherwise
    centred (odd ``k``): inputs ``i - k//2 .. i + k//2``. Computed as ``k``
    shifted multiply-adds in the ``(B, n, C)`` layout: on a CPU this is faster
    than ``F.conv1d(groups=C)`` and leaves ``Q, K, V`` contiguous for the
    fused attention kernel (a transposed convolution output is not, and makes
    attention several times slower).
    """
    k, n = weight.shape[-1], x.shape[1]
    left = k - 1 if causal else k // 2  # zeros before the first position
    padded = F.pad(x, (0, 0, left, k - 1 - left))  # (B, n + k - 1, C)
    # tap t of output i reads input i - left + t; k shifted views, summed (stays (B, n, C), contiguous)
    out = sum(weight[:, t] * padded[:, t : t + n] for t in range(k))
    assert isinstance(out, Tensor)  # k >= 1 taps, so the sum is a tensor, not sum()'s start 0
    return out if bias is None else out + bias


def _primer_build(embed_dim: int, num_heads: int) -> MultiDConvHeadAttention:
    return MultiDConvHeadAttention(embed_dim, num_heads, kernel_size=3, causal=True)


@register(
    "primer",
    paper="So et al. 2021",
    complexity="O(n^2 d + n d k)",
    chapter=18,
    summary="Primer's multi-DConv-head attention: causal width-3 depthwise convolutions on Q, K, V",
    build=_primer_build,
    kernel="sdpa",
    causal=True,
)
class MultiDConvHeadAttention(AttentionBase):
    """Primer's Multi-DConv-Head Attention (MDHA): causal depthwise convolutions on Q, K and V, then attention.

    :class:`~attn.attention.AttentionBase` with the ``"sdpa"`` kernel: its ``q_proj, k_proj, v_proj,
    out_proj`` are those of :class:`attn.multihead.MultiHeadAttention` (state dicts load into each other,
    plus ``dconv_weight``, ``dconv_bias``); between the projections and the heads, each of the ``E``
    channels of ``Q``, ``K`` and ``V`` is convolved along the sequence with its own width-``k`` kernel.
    Self-attention only (the convolutions run along one sequence), hence ``forward(x, *, ...)``.

    Args:
        embed_dim: ``E``. num_heads: ``h``.
        kernel_size: ``k`` (3 in Primer).
        causal: convolutions and attention see only the past (Primer is a
            decoder); ``False`` gives centred convolutions (odd ``k``) and
            bidirectional attention. ``forward(is_causal=False)`` makes the attention of a causal layer
            bidirectional (its convolutions stay causal); ``is_causal=True`` on a layer built with
            ``causal=False`` is refused (its centred convolutions read later tokens).
        dropout, bias: as in :class:`~attn.attention.AttentionBase`.

    ``x (B, n, E)``, ``key_mask (B, n)`` (``True`` = real) ->
    ``(output (B, n, E), weights (B, h, n, n) | None)``. Padded positions are
    zeroed before the convolutions, like the zeros past the sequence's ends, so
    they reach no real token.

    Memory: the convolutions are ``O(n E k)``; without weights, attention is the
    fused ``F.scaled_dot_product_attention`` (``is_causal``, no ``n x n`` mask;
    a key mask with causal runs in query blocks, :func:`attn.positions.fused_attention`),
    linear in ``n``. ``need_weights=True`` takes the exact dense path (the ``"sdpa"`` kernel).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, kernel_size: int = 3, causal: bool = True,
                 dropout: float = 0.0, bias: bool = True) -> None:
        _check_positive_int(kernel_size, "kernel_size", odd=not causal)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, causal=causal)
        self.kernel_size = kernel_size
        # one (E, k) depthwise kernel and (E,) bias for each of Q, K, V
        self.dconv_weight = nn.Parameter(torch.empty(3, embed_dim, kernel_size))
        self.dconv_bias = nn.Parameter(torch.zeros(3, embed_dim))
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default init (fan_in = k for a depthwise kernel)
        nn.init.uniform_(self.dconv_weight, -bound, bound)

    @torch.no_grad()
    def identity_dconv(self) -> MultiDConvHeadAttention:
        """Set every kernel to pass its input through (weight 1 on the current position, 0 elsewhere, no bias).

        The layer is then plain multi-head attention: a reference point.
        """
        self.dconv_weight.zero_()
        self.dconv_bias.zero_()
        self.dconv_weight[..., self.kernel_size - 1 if self.causal else self.kernel_size // 2] = 1.0
        return self

    @torch.no_grad()
    def load_torch_weights(self, mha: nn.MultiheadAttention) -> MultiDConvHeadAttention:
        """Copy the projections of a ``torch.nn.MultiheadAttention`` of the same size (the convolutions stay)."""
        with torch.random.fork_rng(devices=[]):  # the throw-away layer's init leaves the caller's random stream alone
            ref = MultiHeadAttention(self.embed_dim, self.num_heads).to(self.q_proj.weight)
        ref.load_torch_weights(mha)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(self, name).load_state_dict(getattr(ref, name).state_dict())
        return self

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None, key_mask: Tensor | None, is_causal: bool,
        dropout_p: float, scale: float, need_weights: bool,
    ) -> AttentionOutput:
        """The ``"sdpa"`` kernel; without weights and a general mask, :func:`~attn.positions.fused_attention` (linear memory)."""
        if need_weights or attn_mask is not None:
            return super().attend(q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal,
                                  dropout_p=dropout_p, scale=scale, need_weights=need_weights)
        out = fused_attention(q, k, v, key_mask=key_mask, causal=is_causal, scale=scale, dropout_p=dropout_p)
        return AttentionOutput(out, None)

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), weights (B, h, n, n) | None)``; ``is_causal`` ``None``: the layer's."""
        x = check_tokens(x, self.embed_dim)
        check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="n")
        causal = self.causal if is_causal is None else is_causal
        if not isinstance(causal, bool):
            raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
        if causal and not self.causal:
            raise ValueError("is_causal=True on a MultiDConvHeadAttention built with causal=False: its centred "
                             "convolutions read later tokens; build it with causal=True for a causal layer")
        if empty_batch(x):
            n = x.shape[1]
            return AttentionOutput(x.new_zeros(x.shape), x.new_zeros(0, self.num_heads, n, n) if need_weights else None)
        projected = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]  # 3 x (B, n, E)
        if key_mask is not None:  # padding behaves like the zeros beyond the ends
            projected = [p * key_mask[..., None] for p in projected]
        q, k, v = (
            self.split_heads(causal_depthwise_conv(p, self.dconv_weight[i], self.dconv_bias[i], self.causal))  # (B, h, n, d_h)
            for i, p in enumerate(projected)
        )
        out, weights = self.attend(
            q, k, v, attn_mask=None, key_mask=key_mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0, scale=1.0 / math.sqrt(self.head_dim),
            need_weights=need_weights,
        )
        return AttentionOutput(self.out_proj(self.merge_heads(out)), weights)
