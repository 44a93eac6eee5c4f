"""Chapter 19's exercises: Nadaraya-Watson regression with a Gaussian kernel, and which pools are permutation
invariant.

Solutions: :func:`nadaraya_watson`, :func:`invariant_pools`. Checkers: :func:`check_nadaraya_watson`,
:func:`check_invariant_pools`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake, letter_set

__all__ = [
    "nadaraya_watson", "invariant_pools", "check_nadaraya_watson", "check_invariant_pools",
    "NADARAYA_WATSON", "INVARIANT_POOLS", "EXERCISES",
]


# -- 1. Nadaraya-Watson ------------------------------------------------------------------------------------
def nadaraya_watson(queries: Tensor, keys: Tensor, values: Tensor, bandwidth: float,
                    key_mask: Tensor | None = None) -> Tensor:
    r"""The Nadaraya-Watson estimate with a Gaussian kernel, :math:`\hat f(x) = \sum_i
    \operatorname{softmax}_i(-\lVert x - x_i\rVert^2 / 2h^2)\, y_i`.

    Shapes: ``queries (B, m, d)``, ``keys (B, n, d)``, ``values (B, n, k)``, ``key_mask (B, n)`` (``True`` =
    a real observation; every row keeps one) -> ``(B, m, k)``.
    """
    d2 = ((queries[:, :, None, :] - keys[:, None, :, :]) ** 2).sum(-1)  # (B, m, n) squared distances
    scores = -d2 / (2 * bandwidth**2)  # log K_h(x - x_i), up to a constant
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))  # padding gets weight 0
    return scores.softmax(-1) @ values  # a softmax over the observations, then the weighted average of the y_i


def _nw_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, m: int, n: int, d: int, k: int, spread: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        return (spread * torch.randn(b, m, d, generator=g), spread * torch.randn(b, n, d, generator=g),
                torch.randn(b, n, k, generator=g))

    q4, k4, v4 = draw(3, 4, 7, 2, 2)
    keep = torch.rand(3, 7, generator=g) > 0.4
    keep[:, 0] = True  # every dataset keeps an observation
    return [
        Case((*draw(1, 5, 9, 1, 1), 0.5), label="1-D: queries (1, 5, 1), keys (1, 9, 1), values (1, 9, 1), h = 0.5"),
        Case((*draw(2, 3, 6, 3, 2), 2.0), label="queries (2, 3, 3), keys (2, 6, 3), values (2, 6, 2), h = 2"),
        Case((*draw(2, 1, 5, 2, 3, spread=0.5), 0.7), label="one query: queries (2, 1, 2), keys (2, 5, 2), h = 0.7"),
        Case((q4, k4, v4, 1.5, keep), label="queries (3, 4, 2), keys (3, 7, 2), h = 1.5, key_mask (3, 7)"),
    ]


def _nw(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scores: Any, dim: int = -1) -> Tensor:
    """Weights ``softmax(scores(d2))`` over ``dim`` (masked as in the solution), times the values."""
    d2 = ((q[:, :, None, :] - k[:, None, :, :]) ** 2).sum(-1)
    s = scores(d2)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    return s.softmax(dim) @ v


NADARAYA_WATSON = Exercise(
    name="nadaraya_watson",
    chapter=19,
    title="Nadaraya-Watson regression",
    solution=nadaraya_watson,
    cases=_nw_cases,
    grad=True,
    hint="Squared distances (B, m, n), scores -d2 / 2h^2, the mask, a softmax over the observations, then @ values.",
    mistakes=(
        Mistake("no_factor_two", "the scores are `-|x - x_i|^2 / h^2`: the Gaussian kernel has `2h^2` in its "
                "denominator, so your kernel is that of bandwidth h / √2 (too narrow).",
                lambda q, k, v, h, mask=None: _nw(q, k, v, mask, lambda d2: -d2 / h**2)),
        Mistake("bandwidth_not_squared", "the distance is divided by `2h`, not `2h^2`: the bandwidth is a length, "
                "and the squared distance must be divided by a squared length.",
                lambda q, k, v, h, mask=None: _nw(q, k, v, mask, lambda d2: -d2 / (2 * h))),
        Mistake("distance_not_squared", "the scores use the distance `|x - x_i|`, not its square: that is a "
                "Laplace kernel. The Gaussian kernel is `exp(-|x - x_i|^2 / 2h^2)`.",
                lambda q, k, v, h, mask=None: _nw(q, k, v, mask, lambda d2: -d2.sqrt() / (2 * h**2))),
        Mistake("wrong_sign", "the scores have the wrong sign: `+|x - x_i|^2` gives the *farthest* observations "
                "the most weight. The kernel decays with distance: use `-|x - x_i|^2 / 2h^2`.",
                lambda q, k, v, h, mask=None: _nw(q, k, v, mask, lambda d2: d2 / (2 * h**2))),
        Mistake("softmax_over_queries", "the softmax runs over the queries (`dim=-2` of the `(B, m, n)` scores): "
                "each query's weights over the *observations* must sum to one, so normalise over the last "
                "dimension.",
                lambda q, k, v, h, mask=None: _nw(q, k, v, mask, lambda d2: -d2 / (2 * h**2), dim=-2)),
        Mistake("mask_inverted", "the mask is used the other way round: `True` marks a *real* observation, so "
                "fill the scores where the mask is `False` (`masked_fill(~key_mask[:, None, :], -inf)`).",
                lambda q, k, v, h, mask=None: _nw(q, k, v, None if mask is None else ~mask,
                                                  lambda d2: -d2 / (2 * h**2))),
        Mistake("mask_ignored", "the key mask has no effect: padded observations still get weight. Fill their "
                "scores with `-inf` before the softmax.",
                lambda q, k, v, h, mask=None: _nw(q, k, v, None, lambda d2: -d2 / (2 * h**2))),
    ),
)


# -- 2. which pools are permutation invariant --------------------------------------------------------------
@functools.cache
def invariant_pools() -> str:
    """The letters of the layers whose output does not change when the set's elements are shuffled, measured:
    (a) ``PMA(num_seeds=4)``, (b) ``AttentionPool(num_positions=n)``, (c) ``MAB(z, z)`` (self-attention over the
    set, the Set Transformer's SAB), (d) ``AttentionPool()`` without positions. Answer ``"ad"``.
    """
    from ..attention_pooling import MAB, PMA, AttentionPool

    with torch.random.fork_rng(devices=[]):  # a fixed draw of the layers and the set; the caller's stream untouched
        torch.manual_seed(0)
        n, d = 6, 8
        pma, clip_grid, sab, clip_set = PMA(d, 2, num_seeds=4), AttentionPool(d, 2, num_positions=n), MAB(d, 2), AttentionPool(d, 2)
        layers = {
            "a": lambda z: pma(z).output,  # (B, 4, d)
            "b": lambda z: clip_grid(z).output,  # (B, d)
            "c": lambda z: sab(z, z).output,  # (B, n, d): one vector per element
            "d": lambda z: clip_set(z).output,  # (B, d)
        }
        z = torch.randn(2, n, d)
        shuffled = z[:, torch.randperm(n)]  # the same set, its elements in another order
        found = ""
        with torch.no_grad():
            for letter, layer in layers.items():
                if torch.allclose(layer(z), layer(shuffled), atol=1e-5):
                    found += letter
    return found



INVARIANT_POOLS = Exercise(
    name="invariant_pools",
    chapter=19,
    title="Which pools are permutation invariant?",
    solution=invariant_pools,
    kind="value",
    compare=letter_set("abcd", "layers"),
    hint="Shuffling the set permutes the keys and values together; ask what else in each layer knows the order.",
    mistakes=(
        Mistake("self_attention_invariant", "(c) is permutation *equivariant*, not invariant: self-attention "
                "returns one vector per element, so shuffling the set shuffles its output rows the same way.",
                lambda: "acd"),
        Mistake("positions_invariant", "(b) adds a learned position embedding to the tokens (CLIP's image grid): "
                "the element at position 3 gets embedding 3 wherever it came from, so shuffling changes the "
                "output.", lambda: "abd"),
        Mistake("seeds_are_positions", "(a) is invariant: PMA's k seeds are its own learned queries, not "
                "positions of the set; each seed reads the whole set through a softmax, which does not depend on "
                "the order of the keys.", lambda: "d"),
        Mistake("mean_query_not_invariant", "(d) is invariant: CLIP's query is the mean of the set, which does "
                "not depend on the order, and without position embeddings the keys and values are permuted "
                "together.", lambda: "a"),
    ),
)

check_nadaraya_watson = NADARAYA_WATSON.checker()
check_invariant_pools = INVARIANT_POOLS.checker()

EXERCISES = (NADARAYA_WATSON, INVARIANT_POOLS)
