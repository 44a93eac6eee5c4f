r"""Chapter 12 -- Frequency-domain attention: mix tokens with the Fourier transform, in O(n log n).

**FNet** (Lee-Thorp et al. 2022, "FNet: Mixing Tokens with Fourier
Transforms", NAACL). The self-attention sublayer is replaced by a fixed,
parameter-free 2-D discrete Fourier transform, of which only the real part is kept:

.. math::

    y = \operatorname{Re}\big(\mathcal F_{\text{seq}}(\mathcal F_{\text{hidden}}(x))\big)
      = \operatorname{Re}(F_n\, x\, F_E) = C_n x C_E - S_n x S_E ,

with :math:`x` ``(n, E)``, :math:`(F_n)_{tk} = e^{-2\pi i\, tk/n} = (C_n)_{tk} - i (S_n)_{tk}`
the DFT matrix (:math:`C = \cos`, :math:`S = \sin` of :math:`2\pi tk/n`). Read along the
sequence, :math:`C_n` and :math:`S_n` are two *fixed* ``n x n`` "attention
matrices" (:func:`fourier_mix_dense`, the labelled baseline). Computed with the
FFT (:func:`fourier_mix`) it costs :math:`O(nE \log(nE))` and stores no
``n x n`` array.

**FEDformer** (Zhou et al. 2022, "FEDformer: Frequency Enhanced Decomposed
Transformer for Long-term Series Forecasting", ICML). The sequence is moved to
the frequency domain, only a subset :math:`I` of :math:`M` Fourier modes is
kept (chosen once, at random or the lowest :math:`M`, among the first
:math:`\lfloor n/2 \rfloor`), something is done to those :math:`M` modes, and
the result is brought back with the inverse FFT (modes outside :math:`I` are zero):

* **FEB-f** (frequency enhanced block, :class:`FrequencyEnhancedBlock`): a
  learned complex linear map per kept mode and head,
  :math:`\tilde Y_m = \tilde Q_m R_m`, :math:`R_m \in \mathbb C^{d \times d}`;
* **FEA-f** (frequency enhanced attention, :class:`FrequencyEnhancedAttention`):
  attention among the kept modes, :math:`\tilde Y = \sigma(\tilde Q \tilde K^\top)\tilde V`.
  The paper (section 3.2) allows :math:`\sigma` = softmax or tanh and uses FEA-f as
  the decoder's *cross*-attention; the authors' code defaults to tanh on the complex
  scores, uses :math:`\tilde K` as the values and multiplies by a learned complex
  weight per mode. Here: :math:`\sigma` = softmax of the moduli, in self-attention
  form, with separate values and no per-mode weight.

FEDformer applies these blocks to the **seasonal** part of a series, after the
series decomposition of Autoformer (Wu et al. 2021) that splits off a moving-average
trend (:func:`series_decomposition`).

.. math::

    \tilde Q = \operatorname{Select}_I(\operatorname{rFFT}(x W_Q)) \in \mathbb C^{M \times d},\qquad
    y = \operatorname{irFFT}\big(\operatorname{Pad}_I(\tilde Y)\big) W_O .

Cost: :math:`O(nE \log n)` for the transforms plus :math:`O(M d E)` (FEB-f) or
:math:`O(M^2 E)` (FEA-f) in the frequency domain: no ``n x n`` array.

**Weights.** None of the three forms softmax rows over tokens. With
``need_weights=True`` each returns *influence weights* ``(batch, heads, n, n)``:
row ``t`` is :math:`\lVert \partial y_t / \partial v_s \rVert_F` over ``s`` (``v`` the
per-head tokens entering the frequency-domain core; FEA-f's mode weights held
fixed), normalised to sum to 1. FNet's are almost uniform (:math:`|F_{ts}| = 1`
for every pair): every token reads every other with the same magnitude.

Shapes: ``x`` ``(batch, n, E)`` -> ``(batch, n, E)``. ``key_mask`` ``(batch, n)``,
``True`` = real token: a padding position enters every Fourier transform as an
exact zero, so it contributes nothing to the spectrum, neither its content nor
a projection's bias. FNet zeroes the tokens (it has no projection); FEB-f and
FEA-f zero the *projected* vectors ``x W + b`` (zeroing ``x`` before the
projection would still put ``b`` into the spectrum). The transform still runs
over all ``n`` positions, and the outputs at padding positions are not zero.

**Precision.** ``torch.fft`` has no ``bfloat16`` (nor, on the CPU, ``float16``)
kernels: half-precision inputs are transformed in ``float32`` and the result is
cast back, so ``bfloat16`` in gives ``bfloat16`` out.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from .checks import check_heads, check_tokens, empty_batch
from .core import AttentionOutput
from .masks import check_key_mask
from .registry import register

__all__ = [
    "dft_matrix",
    "fourier_mix",
    "fourier_mix_dense",
    "dft_real_parts",
    "select_modes",
    "mode_filter_matrix",
    "fourier_influence",
    "series_decomposition",
    "FourierMixing",
    "FrequencyEnhancedBlock",
    "FrequencyEnhancedAttention",
]

ModeSelect = Literal["random", "lowest"]
WriteBack = Literal["frequency", "slot"]
FFTNorm = Literal["backward", "ortho"]


def _check_norm(norm: str) -> None:
    if norm not in ("backward", "ortho"):
        raise ValueError(f"norm must be 'backward' (unscaled, as FNet) or 'ortho' (scaled by 1/sqrt(n E)), got {norm!r}")


def dft_matrix(n: int, dtype: torch.dtype = torch.complex128, device: torch.device | str | None = None) -> Tensor:
    r"""The ``(n, n)`` DFT matrix :math:`F_{tk} = e^{-2\pi i\, t k / n}` (``fft(x) == F @ x``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    t = torch.arange(n, device=device, dtype=torch.float64)
    angle = -2 * math.pi * torch.outer(t, t).remainder(n) / n  # remainder keeps the angle exact for large t*k
    return torch.polar(torch.ones_like(angle), angle).to(dtype)


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype the FFT runs in: ``float32`` for ``bfloat16`` / ``float16`` (no FFT kernels), else ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _refuse_causal(is_causal: object, layer: str) -> None:
    """The Fourier mixers read the whole sequence at once: ``is_causal=True`` is a ``ValueError`` saying so."""
    if is_causal is not None and not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
    if is_causal:
        raise ValueError(
            f"{layer} cannot be causal (is_causal=True): every output is a Fourier transform over all n positions, "
            "so each token reads every later one; use is_causal=None or False"
        )


def _zero_padding(x: Tensor, key_mask: Tensor | None) -> Tensor:
    check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="n")
    return x if key_mask is None else x * key_mask[..., None].to(x.dtype)


def fourier_mix(x: Tensor, norm: FFTNorm = "backward", key_mask: Tensor | None = None) -> Tensor:
    r"""FNet's token mixing :math:`\operatorname{Re}(\mathrm{FFT}_{\text{seq}}(\mathrm{FFT}_{\text{hidden}}(x)))`, ``(B, n, E) -> (B, n, E)``.

    One 2-D FFT over the last two axes: :math:`O(nE\log(nE))` time, :math:`O(nE)` memory.
    ``norm="ortho"`` divides by :math:`\sqrt{nE}` (a unitary transform); FNet and
    ``transformers`` use the unscaled ``"backward"``.
    """
    x = check_tokens(x, None, "x")
    _check_norm(norm)
    x = _zero_padding(x, key_mask)
    if empty_batch(x):
        return x.clone()
    return torch.fft.fft2(x.to(_fft_dtype(x.dtype)), dim=(-2, -1), norm=norm).real.to(x.dtype)  # (B, n, E)


def dft_real_parts(n: int, e: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""``(C_n, S_n, C_E, S_E)``: cosine and sine parts of the DFT matrices, :math:`F = C - iS`, as real ``dtype`` tensors."""
    fn, fe = dft_matrix(n, device=device), dft_matrix(e, device=device)
    return fn.real.to(dtype), (-fn.imag).to(dtype), fe.real.to(dtype), (-fe.imag).to(dtype)


def fourier_mix_dense(x: Tensor, norm: FFTNorm = "backward", matrices: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
    r"""Baseline: the same mixing as real matrix products, :math:`C_n x C_E - S_n x S_E`, in :math:`O(n^2 E + n E^2)`.

    :math:`C_n, S_n` ``(n, n)`` are the cosine and sine parts of the DFT
    matrix: the fixed "attention matrices" of FNet. ``matrices`` passes them
    precomputed (:func:`dft_real_parts`), as a model would store them. For checks
    and as the labelled dense baseline.
    """
    x = check_tokens(x, None, "x")
    _check_norm(norm)
    n, e = x.shape[-2], x.shape[-1]
    cn, sn, ce, se = matrices if matrices is not None else dft_real_parts(n, e, x.dtype, x.device)
    if cn.shape != (n, n) or ce.shape != (e, e):
        raise ValueError(f"matrices must be (C_n, S_n, C_E, S_E) of shapes ({n}, {n}) and ({e}, {e}), got {tuple(cn.shape)} and {tuple(ce.shape)}")
    out = cn @ x @ ce - sn @ x @ se  # Re((C_n - i S_n) x (C_E - i S_E))
    return out / math.sqrt(n * e) if norm == "ortho" else out


def select_modes(n: int, modes: int, method: ModeSelect = "random", generator: torch.Generator | None = None) -> Tensor:
    r"""FEDformer's mode selection: ``min(modes, max(1, n // 2))`` sorted indices among ``0 .. max(1, n // 2) - 1``.

    ``"lowest"`` keeps ``0 .. M-1``; ``"random"`` draws ``M`` of them without
    replacement (with ``generator``: reproducible). The paper draws once, when
    the layer is built for its input length, and keeps the choice.
    """
    if isinstance(modes, bool) or not isinstance(modes, int) or modes < 1:
        raise ValueError(f"modes must be an int >= 1, got {modes!r}")
    if method not in ("random", "lowest"):
        raise ValueError(f"mode_select must be 'random' or 'lowest', got {method!r}")
    pool = max(1, n // 2)
    m = min(modes, pool)
    if method == "lowest":
        return torch.arange(m)
    return torch.randperm(pool, generator=generator)[:m].sort().values


def mode_filter_matrix(n: int, index: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""The ``(n, n)`` real matrix :math:`P` with ``irfft(Pad_I(rfft(x))) == P @ x``: keeping modes ``I`` as a token-mixing matrix.

    :math:`P_{ts} = \frac1n \sum_{k \in I} c_k \cos\!\big(2\pi k (t - s)/n\big)`, with
    :math:`c_k = 1` for :math:`k = 0` (and :math:`k = n/2`), else 2: a circulant matrix.
    """
    t = torch.arange(n, dtype=torch.float64)
    diff = t[:, None] - t[None, :]  # (n, n): t - s
    k = index.to(torch.float64)
    c = torch.where((index == 0) | (2 * index == n), 1.0, 2.0).to(torch.float64)
    p = (c[:, None, None] * torch.cos(2 * math.pi * k[:, None, None] * diff / n)).sum(0) / n
    return p.to(dtype)


def _normalise_rows(a: Tensor, key_mask: Tensor | None) -> Tensor:
    """Non-negative ``(B, h, n, n)`` influence -> rows summing to 1; padding columns (no influence) and rows set to 0."""
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(a.dtype) * key_mask[:, None, :, None].to(a.dtype)
    total = a.sum(-1, keepdim=True)
    return torch.where(total > 0, a / total.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))


def fourier_influence(n: int, e: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    r"""FNet's influence weights ``(n, n)``: :math:`\lVert\partial y_t/\partial x_s\rVert_F = \sqrt{\cos^2\theta\,\lVert C_E\rVert_F^2 + \sin^2\theta\,\lVert S_E\rVert_F^2}`, rows normalised.

    :math:`\theta = 2\pi ts/n`; the block :math:`\partial y_t/\partial x_s = \cos\theta\, C_E - \sin\theta\, S_E`
    and :math:`\langle C_E, S_E\rangle_F = 0`. Nearly uniform: exactly uniform when
    :math:`\lVert C_E\rVert = \lVert S_E\rVert`.
    """
    t = torch.arange(n, dtype=torch.float64, device=device)
    a = torch.arange(e, dtype=torch.float64, device=device)
    theta = 2 * math.pi * torch.outer(t, t).remainder(n) / n
    c2 = torch.cos(2 * math.pi * torch.outer(a, a).remainder(e) / e).pow(2).sum()
    infl = torch.sqrt(torch.cos(theta) ** 2 * c2 + torch.sin(theta) ** 2 * (e * e - c2))
    return (infl / infl.sum(-1, keepdim=True)).to(dtype)


def series_decomposition(x: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    r"""Autoformer's and FEDformer's series decomposition: ``x (B, n, ...) -> (seasonal, trend)``, same shapes.

    .. math::

        x^{\text{trend}} = \operatorname{AvgPool}_k(\operatorname{Pad}(x)),\qquad
        x^{\text{seasonal}} = x - x^{\text{trend}},

    a moving average of ``kernel_size`` :math:`k` steps along dim 1, the ends padded
    by repeating the first value :math:`k - 1 - \lfloor (k-1)/2 \rfloor` times and the
    last :math:`\lfloor (k-1)/2 \rfloor` times, so the trend has the input's length
    (Wu et al. 2021, section 3.1; Zhou et al. 2022, section 3.1). A linear trend is kept
    exactly away from the ends; a component whose period divides :math:`k` goes entirely
    to the seasonal part.
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be an int >= 1, got {kernel_size!r}")
    if x.ndim < 2:
        raise ValueError(f"x must be (batch, n, ...), got shape {tuple(x.shape)}")
    k = kernel_size
    front = x[:, :1].expand(-1, k - 1 - (k - 1) // 2, *x.shape[2:])
    end = x[:, -1:].expand(-1, (k - 1) // 2, *x.shape[2:])
    padded = torch.cat([front, x, end], 1)  # (B, n + k - 1, ...)
    trend = padded.unfold(1, k, 1).mean(-1)  # (B, n, ...): the window is the last axis
    return x - trend, trend


@register(
    "fnet",
    paper="Lee-Thorp et al. 2022",
    complexity="O(n E log(n E))",
    chapter=12,
    summary="FNet: parameter-free token mixing Re(FFT_seq(FFT_hidden(x))), scaled 1/sqrt(nE)",
    build=lambda embed_dim, num_heads: FourierMixing(embed_dim, norm="ortho"),
    causal=False,
)
class FourierMixing(nn.Module):
    r"""FNet's Fourier sublayer as a token mixer: ``x (B, n, E) -> Re(FFT2(x)) (B, n, E)``. No parameters.

    Args:
        embed_dim: ``E`` to check the input against (``None``: any width).
        norm: ``"backward"`` (unscaled: FNet, ``transformers``' ``FNetBasicFourierTransform``)
            or ``"ortho"`` (divided by :math:`\sqrt{nE}`, so that the output has the
            input's scale; the registry's ``build`` uses it, because the comparison's
            pre-norm residual model has no LayerNorm after the mixer, as FNet has).

    ``forward(..., need_weights=True)`` returns the influence weights
    :func:`fourier_influence` ``(B, 1, n, n)``: the mixing is not a set of
    softmax rows (see :func:`fourier_mix_dense` for its matrices).
    """

    #: its ``need_weights`` rows are influence weights (|d y_t / d v_s|, normalised), not attention
    weights_are_influence = True

    def __init__(self, embed_dim: int | None = None, norm: FFTNorm = "backward") -> None:
        super().__init__()
        _check_norm(norm)
        if embed_dim is not None and embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        self.embed_dim, self.norm = embed_dim, norm

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)``, ``key_mask (B, n)`` (``True`` = real; padding zeroed) -> ``(output (B, n, E), None)``."""
        _refuse_causal(is_causal, "FNet")
        x = check_tokens(x, self.embed_dim, "x")
        out = fourier_mix(x, self.norm, key_mask)
        weights = None
        if need_weights:
            b, n, e = x.shape
            w = fourier_influence(n, e, x.dtype, x.device).expand(b, 1, n, n)
            weights = _normalise_rows(w, key_mask) if key_mask is not None else w
        return AttentionOutput(out, weights)


class _ModeSelection(nn.Module):
    """Shared by FEB-f and FEA-f: the kept modes per sequence length (drawn once per ``n``, seeded), the projections."""

    #: its ``need_weights`` rows are influence weights (|d y_t / d v_s|, normalised), not attention
    weights_are_influence = True

    def __init__(self, embed_dim: int, num_heads: int, modes: int, mode_select: ModeSelect, seed: int) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads)
        select_modes(2 * modes, modes, mode_select)  # validates modes and mode_select
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.modes, self.mode_select, self.seed = modes, mode_select, seed
        self._index: dict[int, Tensor] = {}

    def mode_index(self, n: int) -> Tensor:
        """The sorted kept modes for length ``n`` (CPU ``long``), the same every call: seeded by ``(seed, n)``."""
        if n not in self._index:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
            self._index[n] = select_modes(n, self.modes, self.mode_select, gen)
        return self._index[n]

    def _check(self, x: object, key_mask: Tensor | None, is_causal: bool | None = None) -> Tensor:
        _refuse_causal(is_causal, type(self).__name__)
        x = check_tokens(x, self.embed_dim, "x")
        check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="n")
        return x


@register(
    "fedformer",
    paper="Zhou et al. 2022",
    complexity="O(n E log n + M E^2 / h)",
    chapter=12,
    summary="FEDformer FEB-f: learned linear map on M random Fourier modes per head, then inverse FFT",
    build=lambda embed_dim, num_heads: FrequencyEnhancedBlock(embed_dim, num_heads, modes=8),
    causal=False,
)
class FrequencyEnhancedBlock(_ModeSelection):
    r"""FEDformer's frequency enhanced block (FEB-f) as a token mixer.

    .. math::

        \tilde Q = \operatorname{Select}_I(\operatorname{rFFT}_{\text{seq}}(x W_Q)),\quad
        \tilde Y_{m,h} = \tilde Q_{m,h} R_{h,m},\quad
        y = \operatorname{irFFT}_n(\operatorname{Pad}_I(\tilde Y))\, W_O

    per head ``h`` (width ``d = E / heads``) and kept mode ``m`` (``R_{h,m}`` a
    learned complex ``d x d`` matrix). The ``m``-th kept mode (in increasing
    frequency) uses the ``m``-th weight slot, as in the authors' code, and the
    result goes back to the frequency it was read from (the paper's
    :math:`\operatorname{Pad}_I`). The authors' ``FourierBlock`` instead writes
    the ``m``-th kept mode into output slot ``m``, so its output always lies in the
    lowest ``M`` frequencies whatever the selection (``write_back="slot"``); with
    ``mode_select="lowest"`` the two agree.

    Args:
        embed_dim, num_heads: ``E`` and ``h``.
        modes: ``M``, modes kept (``min(M, n // 2)`` at length ``n``).
        mode_select: ``"random"`` (the paper's default) or ``"lowest"``.
        seed: seeds the random choice of modes for each length.
        bias: biases of ``W_Q`` and ``W_O``.
        write_back: ``"frequency"`` (default, the paper's :math:`\operatorname{Pad}_I`) or
            ``"slot"`` (the authors' ``FourierBlock``: the ``m``-th kept mode to mode ``m``;
            no ``need_weights``).
    """

    def __init__(
        self, embed_dim: int, num_heads: int = 1, modes: int = 16, mode_select: ModeSelect = "random", seed: int = 0, bias: bool = True,
        write_back: WriteBack = "frequency",
    ) -> None:
        super().__init__(embed_dim, num_heads, modes, mode_select, seed)
        if write_back not in ("frequency", "slot"):
            raise ValueError(f"write_back must be 'frequency' (the paper's Pad_I) or 'slot' (the authors' FourierBlock), got {write_back!r}")
        self.write_back = write_back
        d = self.head_dim
        scale = 1.0 / (embed_dim * embed_dim)  # the paper's init: scale * U[0, 1) for real and imaginary parts
        self.in_proj = nn.Linear(embed_dim, embed_dim, bias=bias)  # W_Q
        self.weight_real = nn.Parameter(scale * torch.rand(num_heads, modes, d, d))  # Re R: (h, M, d_in, d_out)
        self.weight_imag = nn.Parameter(scale * torch.rand(num_heads, modes, d, d))  # Im R
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)  # W_O

    def mix_modes(self, q: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """The frequency-domain core on split heads: ``q (B, n, h, d)`` -> ``(B, n, h, d)`` (no projections).

        ``q`` is the projected query ``x W_Q + b_Q``; where ``key_mask`` is ``False`` it is zeroed, so a
        padding position adds nothing to the spectrum. Half precision is transformed in ``float32``.
        """
        n, dtype = q.shape[1], q.dtype
        if key_mask is not None:
            q = q * key_mask[:, :, None, None].to(q.dtype)
        work = _fft_dtype(dtype)
        idx = self.mode_index(n).to(q.device)
        m = idx.numel()
        qf = torch.fft.rfft(q.to(work), dim=1)  # (B, n//2 + 1, h, d) complex
        qs = qf.index_select(1, idx)  # (B, M, h, d): the kept modes only
        r = torch.complex(self.weight_real[:, :m].to(work), self.weight_imag[:, :m].to(work)).to(qs.dtype)  # (h, M, d, d)
        ys = torch.einsum("bmhi,hmio->bmho", qs, r)  # per mode and head: (B, M, h, d)
        out = idx if self.write_back == "frequency" else torch.arange(m, device=idx.device)  # slot: modes 0..M-1
        yf = qf.new_zeros(qf.shape).index_copy(1, out, ys)  # Pad_I: zeros elsewhere
        return torch.fft.irfft(yf, n=n, dim=1).to(dtype)  # (B, n, h, d)

    def offset_operator(self, n: int) -> Tensor:
        r"""The core as a circular convolution: ``J (h, n, d, d)`` with ``y_t = \sum_s q_s J[(t - s) mod n]`` per head.

        :math:`J_\delta = \frac1n \sum_{m} c_{k_m} \operatorname{Re}(e^{2\pi i k_m \delta / n} R_m)`
        (:math:`c_0 = 1`, else 2): the data-independent token mixing of FEB-f. Only for
        ``write_back="frequency"``: the slot write-back moves mode :math:`k_m` to :math:`m`,
        which is not a convolution (a ``ValueError`` says so).
        """
        if self.write_back != "frequency":
            raise ValueError("write_back='slot' moves each kept mode to another frequency: the layer is not a circular "
                             "convolution, so it has no offset operator (nor influence weights)")
        idx = self.mode_index(n).to(self.weight_real.device)
        m = idx.numel()
        c = torch.where(idx == 0, 1.0, 2.0).to(self.weight_real.dtype)  # (M,)
        delta = torch.arange(n, device=idx.device, dtype=self.weight_real.dtype)
        ang = 2 * math.pi * torch.outer(delta, idx.to(delta.dtype)) / n  # (n, M)
        re, im = self.weight_real[:, :m], self.weight_imag[:, :m]  # (h, M, d, d)
        # Re(e^{i a} (R_re + i R_im)) = cos(a) R_re - sin(a) R_im
        return (torch.einsum("nm,hmio->hnio", torch.cos(ang) * c, re) - torch.einsum("nm,hmio->hnio", torch.sin(ang) * c, im)) / n

    def influence(self, n: int) -> Tensor:
        """Influence weights ``(h, n, n)``: ``||J[(t - s) mod n]||_F``, rows normalised (see the module docstring)."""
        norms = self.offset_operator(n).flatten(-2).norm(dim=-1)  # (h, n): per offset
        t = torch.arange(n, device=norms.device)
        a = norms[:, (t[:, None] - t[None, :]) % n]  # (h, n, n)
        return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)``, ``key_mask (B, n)`` (``True`` = real) -> ``(output (B, n, E), influence weights (B, h, n, n) | None)``."""
        x = self._check(x, key_mask, is_causal)
        b, n, _ = x.shape
        weights = None
        if need_weights:
            weights = self.influence(n).to(x.dtype).expand(b, -1, -1, -1)
            weights = _normalise_rows(weights, key_mask) if key_mask is not None else weights
        if empty_batch(x):
            return AttentionOutput(self.out_proj(x), weights)
        q = rearrange(self.in_proj(x), "b n (h d) -> b n h d", h=self.num_heads)
        y = self.mix_modes(q, key_mask)
        return AttentionOutput(self.out_proj(rearrange(y, "b n h d -> b n (h d)")), weights)


@register(
    "fedformer-attention",
    paper="Zhou et al. 2022",
    complexity="O(n E log n + M^2 E)",
    chapter=12,
    summary="FEDformer FEA-f: softmax attention among M random Fourier modes, then inverse FFT",
    build=lambda embed_dim, num_heads: FrequencyEnhancedAttention(embed_dim, num_heads, modes=8),
    causal=False,
)
class FrequencyEnhancedAttention(_ModeSelection):
    r"""FEDformer's frequency enhanced attention (FEA-f), in self-attention form, with softmax of the moduli.

    .. math::

        \tilde Q, \tilde K, \tilde V = \operatorname{Select}_I(\operatorname{rFFT}(x W_{Q,K,V})),\qquad
        \tilde Y = \operatorname{softmax}\!\Big(\frac{|\tilde Q \tilde K^\top|}{\sqrt d}\Big)\tilde V,\qquad
        y = \operatorname{irFFT}_n(\operatorname{Pad}_I(\tilde Y))\, W_O

    per head; the ``M x M`` weights (:meth:`mode_weights`) say which
    frequency reads which. The FFTs are orthonormal (``norm="ortho"``) and the
    scores scaled by :math:`1/\sqrt d`, so that the softmax does not saturate as
    ``n`` grows; the paper's code uses an unscaled FFT and divides the output by
    the squared width instead.

    What differs from FEDformer: the paper (section 3.2) uses FEA-f as the
    decoder's cross-attention (queries from the decoder, keys and values from the
    encoder) with :math:`\sigma` = softmax or tanh; the authors' code defaults to
    tanh applied to the complex scores :math:`\tilde Q \tilde K^\top`, takes
    :math:`\tilde K` as the values, and multiplies each output mode by a learned
    complex weight per head before the inverse FFT. This layer is the paper's
    equation with the softmax option, on one sequence, with its own values.

    Args: as :class:`FrequencyEnhancedBlock`.
    """

    def __init__(
        self, embed_dim: int, num_heads: int = 1, modes: int = 16, mode_select: ModeSelect = "random", seed: int = 0, bias: bool = True
    ) -> None:
        super().__init__(embed_dim, num_heads, modes, mode_select, seed)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)  # [W_Q; W_K; W_V]
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def _modes(self, x: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n = x.shape[1]
        idx = self.mode_index(n).to(x.device)
        qkv = self.qkv(x)  # (B, n, 3E)
        if key_mask is not None:  # zero the projected q, k, v (biases included): padding adds nothing to the spectrum
            qkv = qkv * key_mask[..., None].to(qkv.dtype)
        q, k, v = rearrange(qkv.to(_fft_dtype(qkv.dtype)), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        f = torch.fft.rfft(torch.stack((q, k, v)), dim=-2, norm="ortho")  # (3, B, h, n//2+1, d)
        qs, ks, vs = f.index_select(-2, idx).unbind(0)  # (B, h, M, d) each
        scores = torch.einsum("bhmd,bhld->bhml", qs, ks).abs() / math.sqrt(self.head_dim)  # |Q K^T|: (B, h, M, M)
        return scores.softmax(-1), vs, f[2], idx, x  # weights in the FFT's dtype (float32 for half inputs)

    def mode_weights(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """The attention among kept modes, ``(B, h, M, M)``, rows summing to 1 (rows/columns follow :meth:`mode_index`)."""
        x = self._check(x, key_mask)
        return self._modes(x, key_mask)[0].to(x.dtype)

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)``, ``key_mask (B, n)`` -> ``(output (B, n, E), influence weights (B, h, n, n) | None)``.

        The influence weights are :math:`|T_{ts}|` of :meth:`token_mixing`, rows normalised; the
        attention among modes itself is :meth:`mode_weights`.
        """
        x = self._check(x, key_mask, is_causal)
        if empty_batch(x):
            b, n, _ = x.shape
            weights = x.new_zeros(b, self.num_heads, n, n) if need_weights else None
            return AttentionOutput(self.out_proj(x), weights)
        n = x.shape[1]
        w, vs, vf, idx, _ = self._modes(x, key_mask)
        ys = w.to(vs.dtype) @ vs  # (B, h, M, d)
        yf = vf.new_zeros(vf.shape).index_copy(-2, idx, ys)  # Pad_I
        y = torch.fft.irfft(yf, n=n, dim=-2, norm="ortho").to(x.dtype)  # (B, h, n, d)
        weights = _normalise_rows(self.token_mixing(w, idx, n).abs().to(x.dtype), key_mask) if need_weights else None
        return AttentionOutput(self.out_proj(rearrange(y, "b h n d -> b n (h d)")), weights)

    @staticmethod
    def token_mixing(w: Tensor, idx: Tensor, n: int) -> Tensor:
        r"""The ``(B, h, n, n)`` real matrix :math:`T` with ``y = T v`` for fixed mode weights ``w (B, h, M, M)``.

        :math:`T_{ts} = \frac1n \operatorname{Re}\sum_{m,l} c_{k_m} e^{2\pi i k_m t/n} w_{ml} e^{-2\pi i k_l s/n}`:
        forward DFT at the kept modes, mixing among them, inverse DFT. ``O(n^2 M)``: for inspection.
        """
        t = torch.arange(n, device=w.device, dtype=torch.float64)
        ang = 2 * math.pi * torch.outer(t, idx.to(t)) / n  # (n, M)
        c = torch.where(idx == 0, 1.0, 2.0).to(t)
        inv = torch.polar(c.expand_as(ang), ang)  # (n, M): c_m e^{+i...}
        fwd = torch.polar(torch.ones_like(ang), -ang).T  # (M, n)
        return (inv @ w.to(inv.dtype) @ fwd).real.to(w.dtype) / n
