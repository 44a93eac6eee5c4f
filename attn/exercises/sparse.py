"""Chapter 9's exercises: the strided pattern, a top-k mask with ties, and sparsemax by sorting.

Solutions: :func:`strided_mask`, :func:`topk_mask`, :func:`sparsemax`. Checkers: :func:`check_strided_mask`,
:func:`check_topk_mask`, :func:`check_sparsemax`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "strided_mask", "topk_mask", "sparsemax",
    "check_strided_mask", "check_topk_mask", "check_sparsemax",
    "STRIDED_MASK", "TOPK_MASK", "SPARSEMAX", "EXERCISES",
]


# -- 1. the strided pattern -------------------------------------------------------------------------------------
def strided_mask(n: int, stride: int) -> Tensor:
    """Child et al.'s causal strided pattern ``(n, n)``, ``True`` = may attend: ``A1 ∪ A2``.

    Query ``i`` reads key ``j <= i`` when ``i - j <= stride`` (the previous ``stride`` positions, ``A1``) or
    ``(i - j) mod stride == 0`` (every ``stride``-th position before them, ``A2``).
    """
    d = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # (n, n): i - j
    band = d <= stride  # A1: the recent keys
    column = d % stride == 0  # A2: the same offset in earlier blocks
    return (d >= 0) & (band | column)  # causal: j <= i


def _strided_cases(g: torch.Generator) -> list[Case]:
    del g  # sizes only
    return [
        Case((12, 3), label="n = 12, stride 3"),
        Case((16, 4), label="n = 16, stride 4"),
        Case((10, 2), label="n = 10, stride 2"),
        Case((5, 8), label="n = 5, stride 8 > n"),
        Case((1, 1), label="n = 1, stride 1"),
    ]


def _offsets(n: int) -> tuple[Tensor, Tensor, Tensor]:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return i, j, i - j


STRIDED_MASK = Exercise(
    name="strided_mask",
    chapter=9,
    title="The strided pattern",
    solution=strided_mask,
    cases=_strided_cases,
    hint="Build the offsets i - j once; the band and the column are two conditions on them, both causal.",
    mistakes=(
        Mistake("inverted", "the mask is inverted: `True` means *may attend* in this book, so the pattern's keys "
                "are `True`.",
                lambda n, stride: ~strided_mask(n, stride)),
        Mistake("band_only", "only the band A1 (the previous `stride` keys) is there: add the column part A2, "
                "the keys with `(i - j) % stride == 0`, which reach the distant past in strides.",
                lambda n, stride: (_offsets(n)[2] >= 0) & (_offsets(n)[2] <= stride)),
        Mistake("columns_only", "only the column part A2 is there: add the band A1, the previous `stride` keys "
                "(`0 <= i - j <= stride`).",
                lambda n, stride: (_offsets(n)[2] >= 0) & (_offsets(n)[2] % stride == 0)),
        Mistake("not_causal", "the pattern reads future keys: the strided pattern of the chapter is causal, so "
                "intersect both parts with `j <= i`.",
                lambda n, stride: (_offsets(n)[2].abs() <= stride) | (_offsets(n)[2] % stride == 0)),
        Mistake("columns_from_zero", "the column part is anchored at position 0 (`j % stride == 0`): it must be "
                "relative to the query, `(i - j) % stride == 0`, so that every query reads the keys with its own "
                "offset in earlier blocks.",
                lambda n, stride: (_offsets(n)[2] >= 0)
                & ((_offsets(n)[2] <= stride) | (_offsets(n)[1] % stride == 0))),
        Mistake("fixed_columns", "the columns are the last position of every block (`j % stride == stride - 1`): "
                "that is the *fixed* pattern's summary (with c = 1). The strided column is "
                "`(i - j) % stride == 0`.",
                lambda n, stride: (_offsets(n)[2] >= 0)
                & ((_offsets(n)[2] <= stride) | (_offsets(n)[1] % stride == stride - 1))),
    ),
)


# -- 2. a top-k mask, ties to the lower index --------------------------------------------------------------------
def topk_mask(scores: Tensor, k: int) -> Tensor:
    """The ``k`` largest scores of each row, ``True``: exactly ``k`` per row, ties to the lower key index.

    Shapes: ``scores (..., n)``, ``1 <= k <= n`` -> boolean ``(..., n)``. A stable descending sort keeps equal
    scores in key order, so the first ``k`` of the sorted order break every tie towards the lower index.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (..., n), ties in key order
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    return keep.scatter(-1, order[..., :k], True)  # the first k of that order


def _topk_cases(g: torch.Generator) -> list[Case]:
    return [
        Case((torch.randint(0, 4, (3, 10), generator=g).float(), 3), label="scores (3, 10) with ties, k = 3"),
        Case((torch.randint(0, 3, (2, 2, 8), generator=g).float(), 1), label="scores (2, 2, 8) with ties, k = 1"),
        Case((torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]]), 2),
             label="scores [[1, 3, 3, 2, 3], [0, 0, 0, 0, 0]], k = 2"),
        Case((torch.randn(4, 7, generator=g), 4), label="scores (4, 7) without ties, k = 4"),
        Case((torch.randint(0, 2, (2, 6), generator=g).float(), 6), label="scores (2, 6), k = 6 = n"),
    ]


def _kth(scores: Tensor, k: int) -> Tensor:
    return scores.topk(k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest value


def _ties_high(scores: Tensor, k: int) -> Tensor:
    flipped = scores.flip(-1)
    order = torch.sort(flipped, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros(scores.shape, dtype=torch.bool).scatter(-1, order[..., :k], True)
    return keep.flip(-1)


TOPK_MASK = Exercise(
    name="topk_mask",
    chapter=9,
    title="A top-k mask with ties",
    solution=topk_mask,
    cases=_topk_cases,
    hint="Sort each row in descending order with `stable=True` (equal scores stay in key order), take the first k "
         "indices, and scatter `True` there.",
    mistakes=(
        Mistake("ties_kept", "every score equal to the k-th largest is kept (`scores >= kth`): that is the "
                "paper's threshold rule, which keeps more than k keys when scores tie. Keep exactly k, breaking "
                "ties towards the lower key index.",
                lambda scores, k: scores >= _kth(scores, k)),
        Mistake("strict_threshold", "only the scores strictly above the k-th largest are kept (`scores > kth`): "
                "the k-th itself and its ties are dropped, so rows get fewer than k keys.",
                lambda scores, k: scores > _kth(scores, k)),
        Mistake("ties_to_higher_index", "ties are broken towards the *higher* key index: among equal scores keep "
                "the earliest keys (a stable descending sort keeps them in key order).", _ties_high),
        Mistake("smallest", "these are the k *smallest* scores: sort in descending order "
                "(`descending=True`, or `topk(..., largest=True)`).",
                lambda scores, k: torch.zeros(scores.shape, dtype=torch.bool).scatter(
                    -1, torch.sort(scores, dim=-1, stable=True).indices[..., :k], True)),
        Mistake("inverted", "the mask is inverted: the k kept keys must be `True` (may attend), the others "
                "`False`.", lambda scores, k: ~topk_mask(scores, k)),
    ),
)


# -- 3. sparsemax by sorting ---------------------------------------------------------------------------------
def sparsemax(z: Tensor) -> Tensor:
    """Sparsemax over the last dimension: ``[z - τ]_+`` with the threshold ``τ`` found by sorting.

    Sort each row descending, ``z_(1) >= z_(2) >= ...``; the support size ``k(z)`` is the largest ``k`` with
    ``1 + k z_(k) > Σ_{j<=k} z_(j)``, and ``τ = (Σ_{j<=k(z)} z_(j) - 1) / k(z)``. Shapes: ``(..., n) -> (..., n)``.
    """
    zs = torch.sort(z, dim=-1, descending=True).values  # (..., n) z_(1) >= z_(2) >= ...
    ks = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)  # k = 1..n
    cs = zs.cumsum(-1)  # Σ_{j<=k} z_(j)
    support = 1 + ks * zs > cs  # True for k = 1..k(z), False after
    k = support.sum(-1, keepdim=True)  # (..., 1): k(z)
    tau = (cs.gather(-1, k - 1) - 1) / k.to(z.dtype)  # the sum of the k(z) largest, minus 1, over k(z)
    return torch.clamp(z - tau, min=0)


def _sparsemax_cases(g: torch.Generator) -> list[Case]:
    peaked = torch.randn(3, 8, generator=g) * 2
    near_flat = torch.randn(2, 6, generator=g) * 0.1
    near_flat[:, 0] = -1.0  # one entry well below the rest: support n - 1
    return [
        Case((torch.tensor([2.0, 1.2, 1.0, 0.1]),), label="z = [2.0, 1.2, 1.0, 0.1]"),
        Case((peaked,), label="z (3, 8), scores of spread 2"),
        Case((torch.randn(2, 3, 5, generator=g),), label="z (2, 3, 5), unit spread"),
        Case((near_flat,), label="z (2, 6), nearly flat with one low entry"),
    ]


def _sparsemax_bug(z: Tensor, *, bug: str) -> Tensor:
    n = z.shape[-1]
    zs = torch.sort(z, dim=-1, descending=True).values
    ks = torch.arange(1, n + 1, dtype=z.dtype)
    cs = zs.cumsum(-1)
    k = (1 + ks * zs > cs).sum(-1, keepdim=True).clamp(min=1)
    if bug == "no_support":
        k = torch.full_like(k, n)
    index = {"one_too_many": k.clamp(max=n - 1), "one_too_few": k - 2}.get(bug, k - 1)
    total = cs.gather(-1, index.clamp(min=0)) * (index >= 0)  # an empty sum is 0
    tau = (total - 1) / k.to(z.dtype)
    return z - tau if bug == "no_clamp" else torch.clamp(z - tau, min=0)


SPARSEMAX = Exercise(
    name="sparsemax",
    chapter=9,
    title="Sparsemax by sorting",
    solution=sparsemax,
    cases=_sparsemax_cases,
    grad=True,
    hint="Sort descending, cumsum, the support condition with k = 1..n, τ from the k(z)-th cumulative sum, clamp.",
    mistakes=(
        Mistake("no_clamp", "the entries below τ are negative: sparsemax is `[z - τ]_+`, so clamp at 0 "
                "(`torch.clamp(z - tau, min=0)`); then the kept entries sum to one and the others are exactly 0.",
                lambda z: _sparsemax_bug(z, bug="no_clamp")),
        Mistake("no_support", "τ averages over *all* n entries, `(Σ_j z_j - 1) / n`: that projects onto the "
                "hyperplane Σ p = 1, not the simplex, and after the clamp the row no longer sums to one. Only the "
                "support, the k(z) largest entries with `1 + k z_(k) > Σ_{j<=k} z_(j)`, enters τ. (An ascending sort "
                "gives the same: the condition then holds for every k; sort with `descending=True`.)",
                lambda z: _sparsemax_bug(z, bug="no_support")),
        Mistake("one_too_many", "τ sums one sorted entry too many: with k(z) the *count* of the support, the "
                "cumulative sum to use is at index k(z) - 1 (0-based), `cs.gather(-1, k - 1)`.",
                lambda z: _sparsemax_bug(z, bug="one_too_many")),
        Mistake("one_too_few", "τ sums one sorted entry too few (an exclusive cumulative sum, or the index "
                "k(z) - 2): the sum runs over the k(z) largest entries, j = 1..k(z).",
                lambda z: _sparsemax_bug(z, bug="one_too_few")),
        Mistake("softmax", "that is softmax: every entry is positive. Sparsemax shifts the scores down by τ and "
                "clips at zero, `[z - τ]_+`, so the low scores get exactly 0.", lambda z: torch.softmax(z, -1)),
    ),
)

check_strided_mask = STRIDED_MASK.checker()
check_topk_mask = TOPK_MASK.checker()
check_sparsemax = SPARSEMAX.checker()

EXERCISES = (STRIDED_MASK, TOPK_MASK, SPARSEMAX)
