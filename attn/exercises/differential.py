"""Chapter 30's exercises: the re-parameterised lambda, the differential map, the sink cache, a sink's mass.

Solutions: :func:`differential_lambda`, :func:`differential_weights`, :func:`sink_window`,
:func:`first_token_mass`. Checkers: :func:`check_differential_lambda`, :func:`check_differential_weights`,
:func:`check_sink_window`, :func:`check_first_token_mass`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "differential_lambda", "differential_weights", "sink_window", "first_token_mass",
    "check_differential_lambda", "check_differential_weights", "check_sink_window", "check_first_token_mass",
    "DIFFERENTIAL_LAMBDA", "DIFFERENTIAL_WEIGHTS", "SINK_WINDOW", "FIRST_TOKEN_MASS", "EXERCISES",
]


def differential_lambda(lq1: Tensor, lk1: Tensor, lq2: Tensor, lk2: Tensor, layer: int) -> Tensor:
    """``λ = exp(λ_q1 · λ_k1) - exp(λ_q2 · λ_k2) + λ_init``, ``λ_init = 0.8 - 0.6 exp(-0.3 (l - 1))``.

    Shapes: four ``(d,)`` vectors and the layer's 1-based index ``l`` -> a 0-dim tensor.
    """
    init = 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))  # 0.2 in layer 1, towards 0.8 deep down
    return torch.exp(lq1 @ lk1) - torch.exp(lq2 @ lk2) + init


def _lambda_cases(g: torch.Generator) -> list[Case]:
    def vecs(d: int) -> tuple[Tensor, ...]:
        return tuple(0.3 * torch.randn(d, generator=g) for _ in range(4))

    return [Case((*vecs(8), 1), label="d = 8, layer 1"), Case((*vecs(4), 3), label="d = 4, layer 3"),
            Case((*vecs(16), 12), label="d = 16, layer 12")]


def _lam(lq1: Tensor, lk1: Tensor, lq2: Tensor, lk2: Tensor, layer: int, *, sign: float = 1.0,
         init: str = "paper", exp: bool = True) -> Tensor:
    f = torch.exp if exp else (lambda x: x)
    base = {"paper": 0.8 - 0.6 * math.exp(-0.3 * (layer - 1)), "zero_based": 0.8 - 0.6 * math.exp(-0.3 * layer),
            "none": 0.0}[init]
    return sign * (f(lq1 @ lk1) - f(lq2 @ lk2)) + base


DIFFERENTIAL_LAMBDA = Exercise(
    name="differential_lambda",
    chapter=30,
    title="The re-parameterised λ",
    solution=differential_lambda,
    cases=_lambda_cases,
    grad=True,
    hint="Two exponentials of dot products, subtracted, plus λ_init of the 1-based layer index.",
    mistakes=(
        Mistake("swapped_sign", "the two exponentials are subtracted the other way round: "
                "`λ = exp(λ_q1·λ_k1) - exp(λ_q2·λ_k2) + λ_init`, the pair of the first map first.",
                lambda *a: _lam(*a, sign=-1.0)),
        Mistake("no_lambda_init", "λ_init is missing: without it λ starts near 0 (the two exponentials nearly "
                "cancel at initialisation) and the layer starts as plain attention. Add "
                "`0.8 - 0.6 exp(-0.3 (l - 1))`.", lambda *a: _lam(*a, init="none")),
        Mistake("zero_based_layer", "λ_init uses a 0-based layer index: the paper's l starts at 1, so the first "
                "layer gets `0.8 - 0.6 = 0.2`; use `exp(-0.3 (l - 1))`.", lambda *a: _lam(*a, init="zero_based")),
        Mistake("no_exp", "the dot products are not exponentiated: `λ = exp(λ_q1·λ_k1) - exp(λ_q2·λ_k2) + λ_init`.",
                lambda *a: _lam(*a, exp=False)),
    ),
)


def differential_weights(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, lam: float,
                         causal: bool = False) -> Tensor:
    """The difference map ``A_1 - λ A_2``, ``A_i = softmax(Q_i K_iᵀ / √d)`` over the keys (causal: ``j <= i``).

    Shapes: ``q1, k1, q2, k2 (..., n, d)`` (``d`` the width of one half), ``lam`` a float -> ``(..., n, n)``.
    """
    d, n = q1.shape[-1], q1.shape[-2]
    s1 = q1 @ k1.transpose(-2, -1) / math.sqrt(d)  # (..., n, n)
    s2 = q2 @ k2.transpose(-2, -1) / math.sqrt(d)
    if causal:
        future = torch.ones(n, n, dtype=torch.bool).triu(1)  # True above the diagonal: hidden
        s1, s2 = s1.masked_fill(future, float("-inf")), s2.masked_fill(future, float("-inf"))
    return torch.softmax(s1, dim=-1) - lam * torch.softmax(s2, dim=-1)


def _weight_cases(g: torch.Generator) -> list[Case]:
    def qk(*shape: int) -> tuple[Tensor, ...]:
        return tuple(torch.randn(*shape, generator=g) for _ in range(4))

    return [
        Case((*qk(5, 8), 0.2), label="(5, 8) halves, λ = 0.2"),
        Case((*qk(2, 3, 6, 4), 0.5), {"causal": True}, label="(2, 3, 6, 4) halves, λ = 0.5, causal"),
        Case((*qk(2, 7, 16), 0.8), label="(2, 7, 16) halves, λ = 0.8"),
        Case((*qk(4, 4), 0.35), {"causal": True}, label="(4, 4) halves, λ = 0.35, causal"),
    ]


def _diff(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, lam: float, causal: bool = False, *,
          sign: float = -1.0, width: int = 1, before: bool = False, mask: bool = True) -> Tensor:
    d, n = q1.shape[-1] * width, q1.shape[-2]
    s1, s2 = q1 @ k1.transpose(-2, -1) / math.sqrt(d), q2 @ k2.transpose(-2, -1) / math.sqrt(d)
    hide = torch.ones(n, n, dtype=torch.bool).triu(1) if causal and mask else torch.zeros(n, n, dtype=torch.bool)
    if before:
        return torch.softmax((s1 + sign * lam * s2).masked_fill(hide, float("-inf")), -1)
    return torch.softmax(s1.masked_fill(hide, float("-inf")), -1) + sign * lam * torch.softmax(
        s2.masked_fill(hide, float("-inf")), -1)


DIFFERENTIAL_WEIGHTS = Exercise(
    name="differential_weights",
    chapter=30,
    title="The differential map",
    solution=differential_weights,
    cases=_weight_cases,
    grad=True,
    hint="Two complete softmax maps, each of its own half, then subtract λ times the second.",
    mistakes=(
        Mistake("plus_lambda", "the second map is added: the differential map is `A_1 - λ A_2`, whose rows sum "
                "to 1 - λ; it cancels what both maps share.", lambda *a, **k: _diff(*a, **k, sign=1.0)),
        Mistake("scale_full_width", "the scores are divided by √(2d), the width of the whole head: each map is "
                "the softmax of a half, `Q_i K_iᵀ / √d` with d the width of `q1`.",
                lambda *a, **k: _diff(*a, **k, width=2)),
        Mistake("scores_subtracted", "the scores are subtracted before one softmax (`softmax(S_1 - λ S_2)`): that "
                "is a single distribution. Normalise each map on its own, then subtract the maps.",
                lambda *a, **k: _diff(*a, **k, before=True)),
        Mistake("no_causal_mask", "with `causal=True` the later keys are still visible: hide key j > i in *both* "
                "maps before their softmaxes.", lambda *a, **k: _diff(*a, **k, mask=False)),
    ),
)


def sink_window(n_tokens: int, window: int, sinks: int) -> Tensor:
    """The indices (int64, increasing) of the tokens a sink cache holds after ``n_tokens`` tokens.

    At most ``window`` tokens: the first ``sinks`` ever seen and the ``window - sinks`` most recent
    (everything while ``n_tokens <= window``).
    """
    if n_tokens <= window:
        return torch.arange(n_tokens)
    first = torch.arange(sinks)  # the attention sinks, never evicted
    recent = torch.arange(n_tokens - (window - sinks), n_tokens)  # the sliding part
    return torch.cat([first, recent])


def _window_cases(g: torch.Generator) -> list[Case]:
    return [Case((20, 8, 4)), Case((6, 8, 4), label="(n_tokens = 6 < window = 8, sinks 4)"),
            Case((9, 8, 4), label="(n_tokens = 9 = window + 1, sinks 4)"), Case((100, 16, 1)), Case((12, 6, 0))]


def _win(n: int, w: int, s: int, *, keep_sinks: bool = True, recent_shift: int = 0, extra: bool = False) -> Tensor:
    if n <= w:
        return torch.arange(n)
    s_used = s if keep_sinks else 0
    r = (w if extra else w - s_used) + recent_shift
    return torch.cat([torch.arange(s_used), torch.arange(max(n - r, s_used), n)])


SINK_WINDOW = Exercise(
    name="sink_window",
    chapter=30,
    title="Which tokens a sink cache keeps",
    solution=sink_window,
    cases=_window_cases,
    hint="The first `sinks` indices, then the last `window - sinks`: `window` tokens in all once the cache is full.",
    mistakes=(
        Mistake("sinks_dropped", "the first tokens are evicted like any other: that is a plain sliding window, "
                "which breaks as soon as token 0 leaves. Keep `arange(sinks)` in front of the recent tokens.",
                lambda n, w, s: _win(n, w, s, keep_sinks=False)),
        Mistake("window_plus_sinks", "the cache holds `sinks + window` tokens: the sinks count towards the "
                "window, so only the last `window - sinks` tokens are kept beside them.",
                lambda n, w, s: _win(n, w, s, extra=True)),
        Mistake("one_recent_too_few", "one recent token too few: the recent part runs from "
                "`n_tokens - (window - sinks)` to `n_tokens - 1` inclusive (`arange(n_tokens - (window - sinks), "
                "n_tokens)`).", lambda n, w, s: _win(n, w, s, recent_shift=-1)),
        Mistake("one_recent_too_many", "one recent token too many: the cache must hold exactly `window` tokens, "
                "`sinks` of them first and `window - sinks` recent.", lambda n, w, s: _win(n, w, s, recent_shift=1)),
    ),
)


def first_token_mass() -> float:
    """The weight token 0 receives, summed over all 16 queries, when each causal row is uniform: ``H_16``.

    Query ``t`` (0-based) sees ``t + 1`` keys and gives each ``1 / (t + 1)``; token 0 is seen by all.
    """
    n = 16
    causal = torch.ones(n, n, dtype=torch.float64).tril()
    uniform = causal / causal.sum(-1, keepdim=True)  # (n, n): row t spreads 1 / (t + 1)
    return float(uniform[:, 0].sum())


_H16 = sum(1 / t for t in range(1, 17))

FIRST_TOKEN_MASS = Exercise(
    name="first_token_mass",
    chapter=30,
    title="How much weight the first token gets",
    solution=first_token_mass,
    kind="value",
    atol=1e-3,
    rtol=1e-4,
    hint="Row t gives 1/(t + 1) to each key it sees, and every row sees token 0.",
    mistakes=(
        Mistake("one", "each row gives token 0 the weight 1/(t + 1), not 1/16: the early rows see few keys, so "
                "token 0 collects 1 + 1/2 + ... + 1/16, far more than a later token does (the last gets 1/16).",
                lambda: 1.0),
        Mistake("log_n", "that is the approximation ln 16: the exact sum is the harmonic number "
                "H_16 = 1 + 1/2 + ... + 1/16 ≈ ln 16 + 0.577.", lambda: math.log(16)),
        Mistake("mean_not_sum", "that is the mean weight per row (H_16 / 16): the question asks for the total "
                "over the 16 queries.", lambda: _H16 / 16),
        Mistake("last_token", "that is what the *last* token receives (only query 15 sees it, with 1/16): "
                "token 0 is seen by every query.", lambda: 1 / 16),
    ),
)

check_differential_lambda = DIFFERENTIAL_LAMBDA.checker()
check_differential_weights = DIFFERENTIAL_WEIGHTS.checker()
check_sink_window = SINK_WINDOW.checker()
check_first_token_mass = FIRST_TOKEN_MASS.checker()

EXERCISES = (FIRST_TOKEN_MASS, DIFFERENTIAL_LAMBDA, DIFFERENTIAL_WEIGHTS, SINK_WINDOW)
