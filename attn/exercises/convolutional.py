"""Chapter 18's exercises: CBAM's channel attention, Primer's causal depthwise convolution, and how far a centred
kernel leaks the future through a stack of layers.

Solutions: :func:`channel_attention`, :func:`causal_depthwise_conv`, :func:`centred_leak_start`. Checkers:
:func:`check_channel_attention`, :func:`check_causal_depthwise_conv`, :func:`check_centred_leak_start`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "channel_attention", "causal_depthwise_conv", "centred_leak_start",
    "check_channel_attention", "check_causal_depthwise_conv", "check_centred_leak_start",
    "CHANNEL_ATTENTION", "CAUSAL_DEPTHWISE_CONV", "CENTRED_LEAK_START", "EXERCISES",
]


# -- 1. CBAM's channel attention ---------------------------------------------------------------------------
def channel_attention(x: Tensor, w0: Tensor, w1: Tensor) -> Tensor:
    r"""CBAM's channel weights :math:`M_c = \sigma(W_1\,\mathrm{ReLU}(W_0 F_{avg}) + W_1\,\mathrm{ReLU}(W_0 F_{max}))`.

    Shapes: ``x (B, C, H, W)``, ``w0 (C/r, C)``, ``w1 (C, C/r)`` -> ``(B, C)``, each weight in ``(0, 1)``.
    """
    avg = x.mean(dim=(2, 3))  # F^c_avg (B, C): each channel averaged over the H x W positions
    mx = x.amax(dim=(2, 3))  # F^c_max (B, C): and its strongest response

    def mlp(z: Tensor) -> Tensor:  # the one MLP both descriptors share, (B, C) -> (B, C)
        return torch.relu(z @ w0.T) @ w1.T

    return torch.sigmoid(mlp(avg) + mlp(mx))  # a gate per channel, not a softmax


def _channel_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, c: int, h: int, w: int, hidden: int, shift: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        x = torch.randn(b, c, h, w, generator=g) + shift
        return x, torch.randn(hidden, c, generator=g), torch.randn(c, hidden, generator=g) / hidden**0.5

    return [
        Case(draw(2, 8, 5, 7, 2), label="x (2, 8, 5, 7), w0 (2, 8), w1 (8, 2)"),
        Case(draw(3, 16, 4, 4, 4, shift=-0.5), label="x (3, 16, 4, 4) mostly negative, w0 (4, 16), w1 (16, 4)"),
        Case(draw(1, 6, 1, 1, 3), label="x (1, 6, 1, 1): a single position (average = maximum), w0 (3, 6)"),
        Case(draw(2, 4, 3, 9, 1), label="x (2, 4, 3, 9), w0 (1, 4), w1 (4, 1): a one-unit bottleneck"),
    ]


def _mlp(z: Tensor, w0: Tensor, w1: Tensor) -> Tensor:
    return torch.relu(z @ w0.T) @ w1.T


def _avg(x: Tensor) -> Tensor:
    return x.mean(dim=(2, 3))


def _max(x: Tensor) -> Tensor:
    return x.amax(dim=(2, 3))


CHANNEL_ATTENTION = Exercise(
    name="channel_attention",
    chapter=18,
    title="CBAM's channel attention",
    solution=channel_attention,
    cases=_channel_cases,
    grad=True,
    hint="Pool each channel over (H, W) twice (mean and max), put both through the same MLP, add, then a sigmoid.",
    mistakes=(
        Mistake("average_only", "only the average-pooled descriptor goes through the MLP: that is "
                "squeeze-and-excitation. CBAM adds the max-pooled one (`x.amax(dim=(2, 3))`) through the *same* "
                "MLP before the sigmoid.",
                lambda x, w0, w1: torch.sigmoid(_mlp(_avg(x), w0, w1))),
        Mistake("max_only", "only the max-pooled descriptor goes through the MLP: add the average-pooled one "
                "(`x.mean(dim=(2, 3))`) through the same MLP before the sigmoid.",
                lambda x, w0, w1: torch.sigmoid(_mlp(_max(x), w0, w1))),
        Mistake("pool_sum_before_mlp", "the two descriptors are added *before* the MLP: because of the ReLU, "
                "`MLP(avg + max)` is not `MLP(avg) + MLP(max)`. Run the MLP on each descriptor, then add.",
                lambda x, w0, w1: torch.sigmoid(_mlp(_avg(x) + _max(x), w0, w1))),
        Mistake("sigmoid_per_branch", "each branch has its own sigmoid and the two gates are averaged: CBAM adds "
                "the two MLP outputs (logits) and applies one sigmoid to the sum.",
                lambda x, w0, w1: (torch.sigmoid(_mlp(_avg(x), w0, w1)) + torch.sigmoid(_mlp(_max(x), w0, w1))) / 2),
        Mistake("softmax_over_channels", "the weights are a softmax over the channels, so they compete and sum to "
                "one: CBAM's channel weights are independent gates, one `torch.sigmoid` per channel.",
                lambda x, w0, w1: torch.softmax(_mlp(_avg(x), w0, w1) + _mlp(_max(x), w0, w1), dim=-1)),
        Mistake("no_relu", "the MLP has no ReLU between `W_0` and `W_1`: without it the bottleneck is one linear "
                "map. Apply `torch.relu` to `z @ w0.T` before multiplying by `w1.T`.",
                lambda x, w0, w1: torch.sigmoid((_avg(x) + _max(x)) @ w0.T @ w1.T)),
    ),
)


# -- 2. Primer's causal depthwise convolution --------------------------------------------------------------
def causal_depthwise_conv(x: Tensor, weight: Tensor) -> Tensor:
    r"""Each channel convolved along the sequence with its own kernel, causally: :math:`y_{i,c} = \sum_{t=0}^{k-1}
    w_{c,t}\, x_{i-k+1+t,\,c}`, with :math:`x_{j,c} = 0` for :math:`j < 0`.

    Shapes: ``x (B, n, C)``, ``weight (C, k)`` -> ``(B, n, C)``; tap ``k - 1`` multiplies the current position.
    """
    n, k = x.shape[1], weight.shape[-1]
    padded = F.pad(x, (0, 0, k - 1, 0))  # (B, n + k - 1, C): k - 1 zeros *before* the first token, none after
    out = torch.zeros_like(x)
    for t in range(k):  # tap t of output i reads padded[i + t] = x[i - k + 1 + t]
        out = out + weight[:, t] * padded[:, t : t + n]
    return out


def _conv_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, n: int, c: int, k: int) -> tuple[Tensor, Tensor]:
        return torch.randn(b, n, c, generator=g), torch.randn(c, k, generator=g)

    return [
        Case(draw(2, 7, 4, 3), label="x (2, 7, 4), weight (4, 3)"),
        Case(draw(2, 9, 6, 4), label="x (2, 9, 6), weight (6, 4): an even kernel"),
        Case(draw(3, 2, 2, 4), label="x (3, 2, 2), weight (2, 4): a sequence shorter than the kernel"),
        Case(draw(1, 5, 3, 1), label="x (1, 5, 3), weight (3, 1): a width-1 kernel"),
    ]


def _shifted(x: Tensor, weight: Tensor, left: int) -> Tensor:
    """Tap ``t`` of output ``i`` reads input ``i - left + t`` (zeros outside)."""
    n, k = x.shape[1], weight.shape[-1]
    padded = F.pad(x, (0, 0, left, max(0, k - 1 - left)))
    return sum((weight[:, t] * padded[:, t : t + n] for t in range(k)), torch.zeros_like(x))


def _rolled(x: Tensor, weight: Tensor) -> Tensor:
    k = weight.shape[-1]
    return sum((weight[:, t] * torch.roll(x, k - 1 - t, dims=1) for t in range(k)), torch.zeros_like(x))


CAUSAL_DEPTHWISE_CONV = Exercise(
    name="causal_depthwise_conv",
    chapter=18,
    title="Primer's causal depthwise convolution",
    solution=causal_depthwise_conv,
    cases=_conv_cases,
    grad=True,
    hint="Pad k - 1 zeros before the first position and none after, then tap t of output i reads input i - k + 1 + t.",
    mistakes=(
        Mistake("centred_padding", "the padding is centred (`padding='same'`, or `k // 2` zeros on each side), so "
                "output i reads inputs after i: the layer leaks the future. A causal kernel pads `k - 1` zeros *before* the "
                "sequence and none after.",
                lambda x, w: _shifted(x, w, (w.shape[-1] - 1) // 2)),
        Mistake("future_padding", "the zeros are padded *after* the sequence, so output i reads inputs "
                "i .. i + k - 1: the future instead of the past. Pad `k - 1` zeros before the first position.",
                lambda x, w: _shifted(x, w, 0)),
        Mistake("flipped_kernel", "the kernel is reversed: tap 0 multiplies the current position. In the "
                "depthwise-convolution equation of the chapter, tap `k - 1` is the current position and tap 0 the oldest "
                "(`x[i - k + 1]`); index the taps the other way round (or flip `weight` along its last axis).",
                lambda x, w: _shifted(x, w.flip(-1), w.shape[-1] - 1)),
        Mistake("excludes_current", "every tap is shifted one position too far into the past: output i reads "
                "inputs i - k .. i - 1 and never its own token. Pad `k - 1` zeros before the sequence, not `k`.",
                lambda x, w: _shifted(x, w, w.shape[-1])),
        Mistake("wraps_around", "the shift wraps around (`torch.roll`): the first outputs read the *last* tokens "
                "of the sequence, which is both wrong and a leak of the future. Shift in zeros instead "
                "(`F.pad` then slice).",
                _rolled),
    ),
)


# -- 3. how far a centred kernel leaks ---------------------------------------------------------------------
@functools.cache
def centred_leak_start(layers: int = 3, width: int = 3, n: int = 24, t: int = 16) -> int:
    """The first output position that changes when inputs ``t..`` change, through ``layers`` layers each with
    *centred* width-``width`` convolutions on Q, K, V (reading ``i - width // 2 .. i + width // 2``) and
    *causal* attention: measured on a random float64 stack (answer: ``t - layers * (width // 2)``).
    """
    from ..convolutional import causal_depthwise_conv as dconv  # the library's layer, centred by causal=False

    gen = torch.Generator().manual_seed(0)
    e = 8
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    params = [(torch.randn(3, e, e, generator=gen, dtype=torch.float64) / e**0.5,
               torch.randn(3, e, width, generator=gen, dtype=torch.float64)) for _ in range(layers)]

    def stack(x: Tensor) -> Tensor:
        for proj, kernels in params:
            q, k, v = (dconv(x @ proj[i], kernels[i], causal=False) for i in range(3))  # centred: reads i + 1
            scores = (q @ k.transpose(-1, -2) / e**0.5).masked_fill(~causal, float("-inf"))
            x = x + scores.softmax(-1) @ v  # causal attention, residual
        return x

    x = torch.randn(1, n, e, generator=gen, dtype=torch.float64)
    changed = x.clone()
    changed[:, t:] = torch.randn(1, n - t, e, generator=gen, dtype=torch.float64)
    moved = (stack(x) - stack(changed)).abs().amax(-1)[0] > 1e-12  # (n,): which outputs changed
    return int(moved.nonzero()[0])


CENTRED_LEAK_START = Exercise(
    name="centred_leak_start",
    chapter=18,
    title="How far a centred kernel leaks",
    solution=centred_leak_start,
    kind="value",
    atol=0,
    rtol=0,
    hint="Follow one layer first: which outputs before t read an input at t or later, through q, k or v?",
    mistakes=(
        Mistake("no_leak", "the attention is causal, but the convolutions are not: a centred width-3 kernel "
                "makes q, k and v at position i read input i + 1, so output t - 1 already sees input t.",
                lambda: 16),
        Mistake("one_layer", "that is one layer's leak (one position): the second layer's centred kernels read "
                "one position further ahead of the first layer's changed outputs, and so on; the leaks add up "
                "over the 3 layers.",
                lambda: 15),
        Mistake("kernel_minus_one_per_layer", "a centred width-3 kernel reads only `3 // 2 = 1` position ahead "
                "(its other tap looks back), so each layer leaks one position, not `k - 1 = 2`.",
                lambda: 10),
        Mistake("everything_changes", "causal attention only carries information forward (query i reads keys "
                "j <= i), so a change at t cannot reach the very first outputs; only the centred kernels move it "
                "back, one position per layer.",
                lambda: 0),
    ),
)

check_channel_attention = CHANNEL_ATTENTION.checker()
check_causal_depthwise_conv = CAUSAL_DEPTHWISE_CONV.checker()
check_centred_leak_start = CENTRED_LEAK_START.checker()

EXERCISES = (CHANNEL_ATTENTION, CAUSAL_DEPTHWISE_CONV, CENTRED_LEAK_START)
