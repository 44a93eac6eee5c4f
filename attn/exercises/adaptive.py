"""Chapter 13's exercises: the soft span mask, the keys a layer reads, and the visual sentinel's context.

Solutions: :func:`soft_span_mask`, :func:`keys_read`, :func:`sentinel_context`. Checkers:
:func:`check_soft_span_mask`, :func:`check_keys_read`, :func:`check_sentinel_context`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "soft_span_mask", "keys_read", "sentinel_context",
    "check_soft_span_mask", "check_keys_read", "check_sentinel_context",
    "SOFT_SPAN_MASK", "KEYS_READ", "SENTINEL_CONTEXT", "EXERCISES",
]


# -- 1. the soft span mask -------------------------------------------------------------------------------------
def soft_span_mask(distance: Tensor, span: Tensor, ramp: int) -> Tensor:
    """The soft mask ``m_z(x) = clamp((R + z - x) / R, 0, 1)`` of every head at every distance.

    Shapes: ``distance (...)`` (``x = i - j``, integer or float), ``span (H,)`` float, the spans ``z_h``
    -> ``(H, ...)``. 1 up to distance ``z``, a linear ramp down to 0 over the next ``R``, 0 beyond; its
    gradient reaches ``z`` through the ramp.
    """
    z = span.reshape(-1, *([1] * distance.ndim))  # (H, 1, ..., 1): broadcast against the distances
    return ((ramp + z - distance) / ramp).clamp(0.0, 1.0)


def _mask_cases(g: torch.Generator) -> list[Case]:
    i = torch.arange(10)
    causal_dist = i[:, None] - i[None, :]  # (10, 10): i - j, negative above the diagonal
    return [
        Case((torch.arange(16), torch.tensor([2.5, 6.3]), 4), label="distance 0..15, spans [2.5, 6.3], R=4"),
        Case((torch.arange(8), torch.tensor([0.5]), 1), label="distance 0..7, span [0.5], R=1"),
        Case((causal_dist, torch.tensor([3.7, 1.2, 8.6]), 2), label="distance i - j (10, 10), 3 spans, R=2"),
        Case((torch.arange(12).double() + 0.25, torch.tensor([4.1], dtype=torch.float64), 3),
             label="float distances 0.25..11.25, span [4.1], R=3"),
    ]


def _ramp(distance: Tensor, span: Tensor) -> tuple[Tensor, Tensor]:
    return distance, span.reshape(-1, *([1] * distance.ndim))


SOFT_SPAN_MASK = Exercise(
    name="soft_span_mask",
    chapter=13,
    title="The soft span mask",
    solution=soft_span_mask,
    cases=_mask_cases,
    grad=True,
    hint="Reshape the spans to (H, 1, ..., 1) so they broadcast against the distances, then clamp((R + z - x) / R, "
         "0, 1).",
    mistakes=(
        Mistake("wrong_sign", "the mask grows with the distance: the numerator is `R + z - x`, which falls as the "
                "key gets further away (x = i - j grows).",
                lambda x, span, R: ((R - _ramp(x, span)[1] + x) / R).clamp(0, 1)),
        Mistake("no_clamp", "the mask is not clamped: without `clamp(0, 1)` it exceeds 1 for near keys and goes "
                "negative for far ones, where it must be exactly 0 (the keys are never read).",
                lambda x, span, R: (R + _ramp(x, span)[1] - x) / R),
        Mistake("clamp_min_only", "the mask exceeds 1 for keys closer than z: clamp it above at 1 as well "
                "(`clamp(0, 1)`), so the keys within the span keep their plain weight.",
                lambda x, span, R: ((R + _ramp(x, span)[1] - x) / R).clamp(min=0)),
        Mistake("hard_step", "that is a hard span (1 if x <= z, else 0): it has no gradient with respect to z, "
                "so the span cannot learn. The ramp of width R makes it soft.",
                lambda x, span, R: (x <= _ramp(x, span)[1]).to(span.dtype)),
        Mistake("ramp_before_span", "the ramp ends at z instead of starting there: the numerator is `R + z - x`, "
                "so the mask is 1 up to distance z and reaches 0 at z + R.",
                lambda x, span, R: ((_ramp(x, span)[1] - x) / R).clamp(0, 1)),
        Mistake("divided_by_span", "the ramp is divided by z instead of R: its width is the fixed ramp R, "
                "`(R + z - x) / R`.",
                lambda x, span, R: ((R + _ramp(x, span)[1] - x) / _ramp(x, span)[1]).clamp(0, 1)),
    ),
)


# -- 2. predict: the keys every query reads ---------------------------------------------------------------------
def keys_read() -> tuple[int, float]:
    """The keys read per query, ``K``, for spans ``z = (3.2, 9.5, 0.4)``, ``R = 4``, ``S = 32``, and its cost ``K / S``.

    The mask is 0 from distance ``z + R`` on for every head, so the layer reads distances ``0 .. K - 1``
    with ``K = min(S, ceil(max_h z_h) + R)``; the blockwise cost is ``8 n K d`` against ``8 n S d``.
    """
    spans, ramp, max_span = (3.2, 9.5, 0.4), 4, 32
    k = min(max_span, math.ceil(max(spans)) + ramp)
    return k, k / max_span


KEYS_READ = Exercise(
    name="keys_read",
    chapter=13,
    title="Keys read per query",
    solution=keys_read,
    kind="value",
    atol=1e-3,
    rtol=1e-3,
    hint="K follows the largest span, rounded up, plus the ramp; the cost of the blocks is proportional to K.",
    mistakes=(
        Mistake("mean_span", "K follows the *largest* span over the heads, not the mean: one long head keeps "
                "the whole layer's window long.", lambda: (9, 9 / 32)),
        Mistake("no_ramp", "the mask is not 0 at distance z but at z + R: the keys on the ramp are read too, "
                "so K = ceil(max z) + R.", lambda: (10, 10 / 32)),
        Mistake("floor", "rounding down drops the key at distance 9 + R = 13, where the mask of the longest head "
                "is still (R + 9.5 - 13) / R > 0: round the span up.", lambda: (13, 13 / 32)),
        Mistake("fixed_span", "the keys beyond every head's span and ramp have mask 0 and are never read: the "
                "layer reads K = min(S, ceil(max z) + R) keys, not all S.", lambda: (32, 1.0)),
    ),
)


# -- 3. the visual sentinel -------------------------------------------------------------------------------------
def sentinel_context(scores: Tensor, sentinel_score: Tensor, features: Tensor, sentinel: Tensor,
                     key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The adaptive context ``c_hat = beta s + sum_i alpha_i v_i`` with a sentinel as the ``(k+1)``-th option.

    ``alpha_hat = softmax([scores; sentinel_score])`` over the ``k + 1`` options (masked features, ``key_mask``
    False, get weight 0; the sentinel is always visible), ``beta = alpha_hat[:, k]``.

    Shapes: ``scores (B, k)``, ``sentinel_score (B,)``, ``features (B, k, d)``, ``sentinel (B, d)``,
    ``key_mask (B, k)`` bool (True = real) -> ``(c_hat (B, d), beta (B,))``.
    """
    logits = torch.cat([scores, sentinel_score[:, None]], dim=1)  # (B, k + 1): the sentinel last
    if key_mask is not None:
        visible = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], 1)], dim=1)
        logits = logits.masked_fill(~visible, float("-inf"))
    alpha = torch.softmax(logits, dim=1)
    beta = alpha[:, -1]  # the share of the sentinel
    # beta s + (1 - beta) c with c = sum_i alpha_i / (1 - beta) v_i, i.e. beta s + sum_i alpha_i v_i
    context = beta[:, None] * sentinel + (alpha[:, :-1, None] * features).sum(1)
    return context, beta


def _sentinel_cases(g: torch.Generator) -> list[Case]:
    def make(b: int, k: int, d: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (torch.randn(b, k, generator=g), torch.randn(b, generator=g), torch.randn(b, k, d, generator=g),
                torch.randn(b, d, generator=g))

    mask = torch.tensor([[True, False, True, True, False], [False, False, False, True, False],
                         [True, True, True, True, True]])
    return [
        Case(make(2, 4, 3), label="scores (2, 4), features (2, 4, 3), no mask"),
        Case(make(3, 5, 2), {"key_mask": mask},
             label="scores (3, 5), features (3, 5, 2), key mask (3, 5), one row with a single real feature"),
        Case(make(1, 1, 4), label="one feature (k = 1)"),
    ]


def _options(scores: Tensor, sentinel_score: Tensor, key_mask: Tensor | None, first: bool = False) -> Tensor:
    parts = [sentinel_score[:, None], scores] if first else [scores, sentinel_score[:, None]]
    logits = torch.cat(parts, 1)
    if key_mask is not None:
        ones = key_mask.new_ones(key_mask.shape[0], 1)
        logits = logits.masked_fill(~torch.cat([ones, key_mask] if first else [key_mask, ones], 1), float("-inf"))
    return logits


def _double_gate(sc: Tensor, ss: Tensor, v: Tensor, s: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    a = torch.softmax(_options(sc, ss, key_mask), 1)
    beta = a[:, -1]
    return beta[:, None] * s + (1 - beta)[:, None] * (a[:, :-1, None] * v).sum(1), beta


def _gate_inverted(sc: Tensor, ss: Tensor, v: Tensor, s: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    a = torch.softmax(_options(sc, ss, key_mask), 1)
    beta = a[:, -1]
    c = (a[:, :-1, None] * v).sum(1) / (1 - beta)[:, None]
    return (1 - beta)[:, None] * s + beta[:, None] * c, beta


def _separate_softmax(sc: Tensor, ss: Tensor, v: Tensor, s: Tensor,
                      key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    logits = sc if key_mask is None else sc.masked_fill(~key_mask, float("-inf"))
    a = torch.softmax(logits, 1)  # over the features alone
    beta = torch.sigmoid(ss)
    return beta[:, None] * s + (1 - beta)[:, None] * (a[:, :, None] * v).sum(1), beta


def _wrong_slot(sc: Tensor, ss: Tensor, v: Tensor, s: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    a = torch.softmax(_options(sc, ss, key_mask), 1)
    beta = a[:, 0]  # the first feature's weight, not the sentinel's
    return beta[:, None] * s + (a[:, 1:, None] * v).sum(1), beta


def _sentinel_masked(sc: Tensor, ss: Tensor, v: Tensor, s: Tensor,
                     key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    logits = _options(sc, ss, None)
    if key_mask is not None:  # the mask padded with False: the sentinel is masked out too
        logits = logits.masked_fill(~torch.cat([key_mask, key_mask.new_zeros(key_mask.shape[0], 1)], 1),
                                    float("-inf"))
    a = torch.softmax(logits, 1)
    beta = a[:, -1]
    return beta[:, None] * s + (a[:, :-1, None] * v).sum(1), beta


SENTINEL_CONTEXT = Exercise(
    name="sentinel_context",
    chapter=13,
    title="The sentinel's context",
    solution=sentinel_context,
    cases=_sentinel_cases,
    grad=True,
    hint="One softmax over the k + 1 scores, sentinel last; beta is its weight; the features' weights already carry "
         "the factor 1 - beta.",
    mistakes=(
        Mistake("double_gate", "the features' weights are multiplied by (1 - β) twice: `alpha_hat[:k]` already sums "
                "to 1 - β, so `(1 - β) c` with `c = Σ α_i / (1 - β) v_i` is just `Σ α_i v_i`.", _double_gate),
        Mistake("gate_inverted", "the gate is the other way round: β is the sentinel's share, so "
                "`c_hat = β s + (1 - β) c`, not `(1 - β) s + β c`.", _gate_inverted),
        Mistake("separate_softmax", "the softmax runs over the k features alone and β comes from a sigmoid of the "
                "sentinel's score: the sentinel competes in *one* softmax over the k + 1 scores "
                "{eq}`adaptive-sentinel`, and β is its weight there.", _separate_softmax),
        Mistake("wrong_slot", "β is read from the first slot: the sentinel's score is appended *last*, so β is "
                "`alpha_hat[:, -1]` (and the features' weights are `alpha_hat[:, :-1]`).", _wrong_slot),
        Mistake("sentinel_masked", "the sentinel is masked along with the padding: it is always visible (the mask "
                "is extended with `True` for it), so a row with every feature masked has β = 1, not NaN.",
                _sentinel_masked),
    ),
)

check_soft_span_mask = SOFT_SPAN_MASK.checker()
check_keys_read = KEYS_READ.checker()
check_sentinel_context = SENTINEL_CONTEXT.checker()

EXERCISES = (SOFT_SPAN_MASK, KEYS_READ, SENTINEL_CONTEXT)
