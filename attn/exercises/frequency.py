"""Chapter 12's exercises: FNet's Fourier mixing, FEDformer's kept modes, and a token's weight on itself.

Solutions: :func:`fnet_mixing`, :func:`keep_modes`, :func:`self_weight`. Checkers: :func:`check_fnet_mixing`,
:func:`check_keep_modes`, :func:`check_self_weight`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "fnet_mixing", "keep_modes", "self_weight",
    "check_fnet_mixing", "check_keep_modes", "check_self_weight",
    "FNET_MIXING", "KEEP_MODES", "SELF_WEIGHT", "EXERCISES",
]


# -- 1. FNet ---------------------------------------------------------------------------------------------------
def fnet_mixing(x: Tensor) -> Tensor:
    """FNet's token mixing ``Re(FFT_seq(FFT_hidden(x)))``: ``x (..., n, E)`` real -> ``(..., n, E)`` real.

    A 1-D FFT along the hidden axis (``-1``), one along the sequence (``-2``), then the real part; unscaled
    (``norm="backward"``, as FNet). The two FFTs together are one 2-D FFT over the last two axes.
    """
    mixed = torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2)  # complex (..., n, E)
    return mixed.real


def _fnet_cases(g: torch.Generator) -> list[Case]:
    return [
        Case((torch.randn(2, 6, 4, generator=g),), label="x (2, 6, 4)"),
        Case((torch.randn(5, 3, generator=g),), label="x (5, 3): no batch"),
        Case((torch.randn(2, 3, 7, 8, generator=g),), label="x (2, 3, 7, 8): two batch dimensions"),
        Case((torch.randn(1, 1, 5, generator=g),), label="x (1, 1, 5): one token"),
    ]


FNET_MIXING = Exercise(
    name="fnet_mixing",
    chapter=12,
    title="FNet's Fourier mixing",
    solution=fnet_mixing,
    cases=_fnet_cases,
    grad=True,
    atol=1e-4,
    rtol=1e-4,
    hint="Two FFTs (hidden axis -1, sequence axis -2), no scaling, then the real part.",
    mistakes=(
        Mistake("sequence_only", "only the sequence axis is transformed: FNet also applies an FFT along the "
                "hidden dimension (`dim=-1`) before the one along the sequence (`dim=-2`); `torch.fft.fft2` "
                "over `dim=(-2, -1)` does both.", lambda x: torch.fft.fft(x, dim=-2).real),
        Mistake("hidden_only", "only the hidden axis is transformed, so tokens are never mixed with each other: "
                "add the FFT along the sequence (`dim=-2`).", lambda x: torch.fft.fft(x, dim=-1).real),
        Mistake("modulus", "you kept the modulus `abs()` of the spectrum: FNet keeps the real part "
                "(`.real`), which is linear in `x`; the modulus throws away the sign and the phase.",
                lambda x: torch.fft.fft2(x).abs()),
        Mistake("imaginary", "you kept the imaginary part: FNet keeps the real part, `.real`.",
                lambda x: torch.fft.fft2(x).imag),
        Mistake("ortho", "the transform is scaled by 1/√(nE) (`norm=\"ortho\"`): FNet's mixing is unscaled "
                "(the default `norm=\"backward\"`; FNet's layer norm after the sublayer handles the scale).",
                lambda x: torch.fft.fft2(x, norm="ortho").real),
        Mistake("inverse", "that is the inverse FFT, whose real part is the forward one's divided by nE: use "
                "`torch.fft.fft`/`fft2`, not `ifft`.", lambda x: torch.fft.ifft2(x).real),
    ),
)


# -- 2. FEDformer's kept modes ---------------------------------------------------------------------------------
def keep_modes(x: Tensor, index: Tensor) -> Tensor:
    """Keep the Fourier modes ``index`` of ``x`` along the sequence, drop the others: ``irFFT_n(Pad_I(rFFT(x)))``.

    Shapes: ``x (B, n, E)`` real, ``index (M,)`` long, sorted, in ``[0, n // 2)`` -> ``(B, n, E)`` real.
    The same as the mixing matrix ``P`` of the chapter applied to each channel: ``P @ x``.
    """
    n = x.shape[1]
    spectrum = torch.fft.rfft(x, dim=1)  # (B, n // 2 + 1, E) complex: modes 0 .. n // 2
    kept = torch.zeros_like(spectrum)
    kept[:, index] = spectrum[:, index]  # Pad_I: the kept modes at their own frequencies, the others zero
    return torch.fft.irfft(kept, n=n, dim=1)  # n= : an odd length is not recoverable from n // 2 + 1 modes


def _modes_cases(g: torch.Generator) -> list[Case]:
    def x(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    return [
        Case((x(2, 16, 3), torch.tensor([0, 2, 5])), label="x (2, 16, 3), modes [0, 2, 5]"),
        Case((x(1, 15, 2), torch.tensor([1, 4, 6])), label="x (1, 15, 2): odd n, modes [1, 4, 6]"),
        Case((x(3, 12, 4), torch.tensor([3])), label="x (3, 12, 4), mode [3]"),
        Case((x(2, 9, 2), torch.tensor([0, 1, 2, 3])), label="x (2, 9, 2): odd n, modes [0, 1, 2, 3]"),
    ]


def _slot_write(x: Tensor, index: Tensor) -> Tensor:
    spec = torch.fft.rfft(x, dim=1)
    out = torch.zeros_like(spec)
    out[:, : len(index)] = spec[:, index]  # the m-th kept mode written to slot m
    return torch.fft.irfft(out, n=x.shape[1], dim=1)


def _no_length(x: Tensor, index: Tensor) -> Tensor:
    spec = torch.fft.rfft(x, dim=1)
    out = torch.zeros_like(spec)
    out[:, index] = spec[:, index]
    return torch.fft.irfft(out, dim=1)  # length 2 (n // 2): one short when n is odd


def _full_fft(x: Tensor, index: Tensor) -> Tensor:
    spec = torch.fft.fft(x, dim=1)
    out = torch.zeros_like(spec)
    out[:, index] = spec[:, index]  # only the positive frequencies: their conjugates n - k are missing
    return torch.fft.ifft(out, dim=1).real


KEEP_MODES = Exercise(
    name="keep_modes",
    chapter=12,
    title="FEDformer's kept modes",
    solution=keep_modes,
    cases=_modes_cases,
    grad=True,
    hint="rfft along the sequence (dim=1), zero every mode not in index, irfft with n=x.shape[1].",
    mistakes=(
        Mistake("irfft_without_n", "the output has the wrong length for odd n: `irfft` assumes an even length "
                "2 (m - 1) unless told otherwise. Pass `n=x.shape[1]`.", _no_length),
        Mistake("slot_write_back", "the m-th kept mode is written to slot m (the lowest M frequencies): the "
                "paper's Pad_I puts each kept mode back at its own frequency, `kept[:, index] = spec[:, index]`.",
                _slot_write),
        Mistake("full_fft", "with the complex `fft`/`ifft`, keeping only the modes `k` in `index` drops their "
                "conjugate partners `n - k`, so the real part comes back at half amplitude (all but mode 0). "
                "Use `rfft`/`irfft`, which treat the pair as one mode.", _full_fft),
        Mistake("kept_the_others", "you zeroed the modes in `index` and kept the others: `index` lists the modes "
                "to *keep*.",
                lambda x, index: x - keep_modes(x, index)),
    ),
)


# -- 3. predict: a token's weight on itself ---------------------------------------------------------------------
def self_weight() -> float:
    """``P[0, 0]`` of the chapter's mixing matrix P for the lowest 8 modes at ``n = 64``.

    ``P[t, t] = (1/n) sum_{k in I} c_k`` with ``c_0 = 1`` and ``c_k = 2`` otherwise: computed here by filtering
    a unit impulse at token 0 with :func:`keep_modes`.
    """
    n = 64
    impulse = torch.zeros(1, n, 1, dtype=torch.float64)
    impulse[0, 0, 0] = 1.0  # token 0 alone: P @ impulse is column 0 of P
    column = keep_modes(impulse, torch.arange(8))[0, :, 0]
    return float(column[0])


SELF_WEIGHT = Exercise(
    name="self_weight",
    chapter=12,
    title="A token's weight on itself",
    solution=self_weight,
    kind="value",
    atol=1e-4,
    rtol=1e-3,
    hint="P[t, t] = (1/n) Σ_k c_k: cos 0 = 1 for every kept mode.",
    mistakes=(
        Mistake("no_conjugates", "every mode k > 0 counts twice (c_k = 2): its conjugate n - k carries the same "
                "content, and irfft adds both. Only mode 0 (and n/2) counts once.", lambda: 8 / 64),
        Mistake("dc_doubled", "mode 0 has no conjugate partner, so c_0 = 1: only the modes k > 0 count twice.",
                lambda: 16 / 64),
        Mistake("no_division", "the inverse transform divides by n: P[t, t] = (1/n) Σ_k c_k.", lambda: 15.0),
        Mistake("uniform", "that is 1/n, the weight of a uniform average over the n tokens: keeping only the "
                "lowest modes concentrates the weight near the token itself, P[t, t] = (1/n) Σ_k c_k.",
                lambda: 1 / 64),
    ),
)

check_fnet_mixing = FNET_MIXING.checker()
check_keep_modes = KEEP_MODES.checker()
check_self_weight = SELF_WEIGHT.checker()

EXERCISES = (FNET_MIXING, KEEP_MODES, SELF_WEIGHT)
