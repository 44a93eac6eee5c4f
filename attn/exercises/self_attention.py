"""Chapter 2's exercises: the attention weights of scaled dot-product attention, and the entropy of a row.

Solutions: :func:`attention_weights`, :func:`uniform_row_entropy`. Checkers: :func:`check_attention_weights`,
:func:`check_uniform_row_entropy`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "attention_weights", "uniform_row_entropy", "check_attention_weights", "check_uniform_row_entropy",
    "ATTENTION_WEIGHTS", "UNIFORM_ROW_ENTROPY", "EXERCISES",
]


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """``softmax(q kᵀ / √d)`` over the keys, masked keys (``mask`` False) at weight 0.

    Shapes: ``q (..., n, d)``, ``k (..., m, d)``, ``mask`` broadcastable to ``(..., n, m)`` (True = may
    attend) -> ``(..., n, m)``; every row holds at least one visible key.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _weight_cases(g: torch.Generator) -> list[Case]:
    def qk(*shape_q: int, m: int) -> tuple[Tensor, Tensor]:
        q = torch.randn(*shape_q, generator=g)
        k = torch.randn(*shape_q[:-2], m, shape_q[-1], generator=g)
        return q, k

    q1, k1 = qk(4, 8, m=6)
    q2, k2 = qk(2, 5, 16, m=7)
    q3, k3 = qk(2, 6, 4, m=6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    q4, k4 = qk(3, 5, 8, m=9)
    keep = torch.rand(3, 1, 9, generator=g) > 0.4
    keep[..., 0] = True  # every row keeps a key
    return [
        Case((q1, k1), label="q (4, 8), k (6, 8), no mask"),
        Case((q2, k2), label="q (2, 5, 16), k (2, 7, 16), no mask"),
        Case((q3, k3, causal), label="q (2, 6, 4), k (2, 6, 4), causal mask (6, 6)"),
        Case((q4, k4, keep), label="q (3, 5, 8), k (3, 9, 8), key mask (3, 1, 9)"),
    ]


def _scores(q: Tensor, k: Tensor) -> Tensor:
    return q @ k.transpose(-2, -1)


def _masked(scores: Tensor, mask: Tensor | None) -> Tensor:
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


ATTENTION_WEIGHTS = Exercise(
    name="attention_weights",
    chapter=2,
    title="Attention weights",
    solution=attention_weights,
    cases=_weight_cases,
    grad=True,
    hint="Write the three steps one by one: scores, mask, softmax over the keys.",
    mistakes=(
        Mistake("no_scale", "the scores are not divided by √d: multiply `q @ kᵀ` by `1 / math.sqrt(d)`, "
                "with `d = q.shape[-1]`; without it the softmax saturates as d grows.",
                lambda q, k, mask=None: torch.softmax(_masked(_scores(q, k), mask), -1)),
        Mistake("scale_by_d", "the scores are divided by d, not √d: the variance of a dot product of d "
                "unit-variance terms is d, so its standard deviation is √d.",
                lambda q, k, mask=None: torch.softmax(_masked(_scores(q, k) / q.shape[-1], mask), -1)),
        Mistake("softmax_over_queries", "the softmax runs over the queries (`dim=-2`): each query's weights "
                "over the keys must sum to one, so normalise over the last dimension (`dim=-1`).",
                lambda q, k, mask=None: torch.softmax(_masked(_scores(q, k) / math.sqrt(q.shape[-1]), mask), -2)),
        Mistake("mask_inverted", "the mask is used the other way round: in this book `True` means *may attend*, "
                "so fill the scores where the mask is `False` (`masked_fill(~mask, -inf)`).",
                lambda q, k, mask=None: torch.softmax(
                    _scores(q, k) / math.sqrt(q.shape[-1]) if mask is None
                    else (_scores(q, k) / math.sqrt(q.shape[-1])).masked_fill(mask, float("-inf")), -1)),
        Mistake("mask_ignored", "the mask has no effect: the masked keys still get weight. Fill their scores "
                "with `-inf` *before* the softmax.",
                lambda q, k, mask=None: torch.softmax(_scores(q, k) / math.sqrt(q.shape[-1]), -1)),
        Mistake("mask_after_softmax", "the mask zeroes weights *after* the softmax, so the visible weights no "
                "longer sum to one: mask the scores before normalising.",
                lambda q, k, mask=None: torch.softmax(_scores(q, k) / math.sqrt(q.shape[-1]), -1)
                * (1 if mask is None else mask)),
    ),
)


def uniform_row_entropy() -> float:
    """The entropy, in nats, of a query that attends uniformly to 8 keys: ``log 8``."""
    n = 8
    p = torch.full((n,), 1 / n)
    return float(-(p * p.log()).sum())


UNIFORM_ROW_ENTROPY = Exercise(
    name="uniform_row_entropy",
    chapter=2,
    title="Entropy of a uniform row",
    solution=uniform_row_entropy,
    kind="value",
    atol=1e-3,
    rtol=1e-3,
    hint="H(a) = -Σ a_j log a_j with the natural logarithm; here every a_j = 1/8.",
    mistakes=(
        Mistake("bits", "that is the entropy in bits (log₂ 8 = 3): the book measures entropy in nats, with the "
                "natural logarithm, so a uniform row over n keys has entropy ln n.", lambda: 3.0),
        Mistake("weight_not_entropy", "that is the weight each key gets (1/8), not the entropy of the row.",
                lambda: 1 / 8),
        Mistake("keys_not_entropy", "that is the number of keys: the entropy of a uniform row is ln n, "
                "which grows only logarithmically with n.", lambda: 8.0),
    ),
)

check_attention_weights = ATTENTION_WEIGHTS.checker()
check_uniform_row_entropy = UNIFORM_ROW_ENTROPY.checker()

EXERCISES = (ATTENTION_WEIGHTS, UNIFORM_ROW_ENTROPY)
