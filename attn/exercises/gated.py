"""Chapter 20's exercises: the output gate of gated attention, the squared-ReLU weights of the gated attention
unit, and how a GAU row shrinks with the sequence length.

Solutions: :func:`gated_attention`, :func:`gau_weights`, :func:`gau_row_sum_ratio`. Checkers:
:func:`check_gated_attention`, :func:`check_gau_weights`, :func:`check_gau_row_sum_ratio`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "gated_attention", "gau_weights", "gau_row_sum_ratio",
    "check_gated_attention", "check_gau_weights", "check_gau_row_sum_ratio",
    "GATED_ATTENTION", "GAU_WEIGHTS", "GAU_ROW_SUM_RATIO", "EXERCISES",
]


# -- 1. the output gate ------------------------------------------------------------------------------------
def gated_attention(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, wg: Tensor) -> Tensor:
    r"""One head of gated attention: :math:`Y = \operatorname{softmax}(QK^\top / \sqrt d)\, V \odot \sigma(X W^G)`.

    Shapes: ``x (B, n, E)``, ``wq, wk, wv, wg (E, d)`` -> ``(B, n, d)``; ``Q = X W^Q`` and so on (no biases, no
    mask, no output projection).
    """
    q, k, v = x @ wq, x @ wk, x @ wv  # (B, n, d) each
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v  # O: attention's output
    gate = torch.sigmoid(x @ wg)  # (B, n, d): row t from the query token x_t alone, in (0, 1)
    return o * gate  # each query keeps a fraction of what it read


def _gate_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, n: int, e: int, d: int) -> tuple[Tensor, ...]:
        x = torch.randn(b, n, e, generator=g)
        return (x, *(torch.randn(e, d, generator=g) / e**0.5 for _ in range(4)))

    return [
        Case(draw(2, 5, 8, 4), label="x (2, 5, 8), weights (8, 4)"),
        Case(draw(1, 7, 6, 6), label="x (1, 7, 6), weights (6, 6)"),
        Case(draw(3, 4, 4, 8), label="x (3, 4, 4), weights (4, 8)"),
        Case(draw(2, 1, 5, 3), label="x (2, 1, 5), weights (5, 3): one token"),
    ]


def _attend(x: Tensor, wq: Tensor, wk: Tensor, v: Tensor, scale: bool = True) -> Tensor:
    s = (x @ wq) @ (x @ wk).transpose(-1, -2)
    return torch.softmax(s / math.sqrt(wq.shape[-1]) if scale else s, -1) @ v


GATED_ATTENTION = Exercise(
    name="gated_attention",
    chapter=20,
    title="The output gate",
    solution=gated_attention,
    cases=_gate_cases,
    grad=True,
    hint="Compute attention's output O first; then multiply it, element by element, by sigmoid(x @ wg).",
    mistakes=(
        Mistake("gate_on_values", "the gate multiplies the values *before* attention, so the gate of key token j "
                "scales what every query reads from j. The output gate is the query's: multiply attention's "
                "output `O`, row t by `sigmoid(x_t @ wg)`.",
                lambda x, wq, wk, wv, wg: _attend(x, wq, wk, (x @ wv) * torch.sigmoid(x @ wg))),
        Mistake("tanh_gate", "the gate uses `tanh`, whose values lie in (-1, 1): it can flip the sign of what a "
                "head read, and 0 is its midpoint rather than 'closed'. A gate is a sigmoid, in (0, 1).",
                lambda x, wq, wk, wv, wg: _attend(x, wq, wk, x @ wv) * torch.tanh(x @ wg)),
        Mistake("sigmoid_before_projection", "the sigmoid is applied to `x` before the projection "
                "(`sigmoid(x) @ wg`): the gate's logits are `x @ wg`, and the sigmoid squashes them.",
                lambda x, wq, wk, wv, wg: _attend(x, wq, wk, x @ wv) * (torch.sigmoid(x) @ wg)),
        Mistake("no_scale", "the attention scores are not divided by √d: multiply `q @ kᵀ` by "
                "`1 / math.sqrt(d)` with `d = wq.shape[-1]` before the softmax.",
                lambda x, wq, wk, wv, wg: _attend(x, wq, wk, x @ wv, scale=False) * torch.sigmoid(x @ wg)),
    ),
)


# -- 2. GAU's squared-ReLU weights -------------------------------------------------------------------------
def gau_weights(q: Tensor, k: Tensor, key_mask: Tensor | None = None) -> Tensor:
    r"""The GAU's attention matrix :math:`A = \operatorname{relu}^2(QK^\top / n)`, ``n`` the number of real keys.

    Shapes: ``q, k (B, n, s)``, ``key_mask (B, n)`` (``True`` = real token) -> ``(B, n, n)``; padded keys get
    weight 0. Not a softmax: a row need not sum to one.
    """
    if key_mask is None:
        n_real = torch.full((q.shape[0], 1, 1), float(k.shape[1]))
    else:
        n_real = key_mask.sum(-1).to(q.dtype)[:, None, None]  # (B, 1, 1): each example's own length
    a = torch.relu(q @ k.transpose(-1, -2) / n_real) ** 2  # divide inside the squared ReLU
    if key_mask is not None:
        a = a.masked_fill(~key_mask[:, None, :], 0.0)  # padded keys: weight exactly 0
    return a


def _gau_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, n: int, s: int) -> tuple[Tensor, Tensor]:
        return 2 * torch.randn(b, n, s, generator=g), 2 * torch.randn(b, n, s, generator=g)

    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[0, 4:] = False  # 4 real tokens
    keep[1, 2:] = False  # 2 real tokens
    return [
        Case(draw(2, 5, 4), label="q, k (2, 5, 4), no mask"),
        Case(draw(1, 8, 3), label="q, k (1, 8, 3), no mask"),
        Case((*draw(3, 6, 4), keep), label="q, k (3, 6, 4), key_mask (3, 6) with 4, 2 and 6 real tokens"),
    ]


def _gau(q: Tensor, k: Tensor, mask: Tensor | None, weights: object, n_from_mask: bool = True,
         apply_mask: bool = True) -> Tensor:
    n = float(k.shape[1]) if mask is None or not n_from_mask else mask.sum(-1).to(q.dtype)[:, None, None]
    s = q @ k.transpose(-1, -2)
    assert callable(weights)
    a = weights(s, n)
    return a if mask is None or not apply_mask else a.masked_fill(~mask[:, None, :], 0.0)


GAU_WEIGHTS = Exercise(
    name="gau_weights",
    chapter=20,
    title="GAU's squared-ReLU weights",
    solution=gau_weights,
    cases=_gau_cases,
    grad=True,
    hint="A = relu(q @ kᵀ / n) ** 2, n the number of real keys of each example; then zero the padded keys.",
    mistakes=(
        Mistake("divide_after_square", "`n` divides after the square (`relu(q @ kᵀ) ** 2 / n`): in the "
                "chapter's GAU equation it divides the scores *inside* the squared ReLU, so each weight "
                "scales as 1/n².",
                lambda q, k, mask=None: _gau(q, k, mask, lambda s, n: torch.relu(s) ** 2 / n)),
        Mistake("square_before_relu", "the scores are squared without the ReLU (or squared before it), so "
                "negative scores get a positive weight: `relu` first, then the square.",
                lambda q, k, mask=None: _gau(q, k, mask, lambda s, n: (s / n) ** 2)),
        Mistake("relu_not_squared", "the ReLU is not squared: the GAU's weights are `relu(s / n) ** 2`.",
                lambda q, k, mask=None: _gau(q, k, mask, lambda s, n: torch.relu(s / n))),
        Mistake("softmax_weights", "the weights are a softmax: the GAU has none, its weights are "
                "`relu(q @ kᵀ / n) ** 2`, and a row may sum to anything (even 0).",
                lambda q, k, mask=None: _gau(q, k, mask, lambda s, n: torch.softmax(
                    s if mask is None else s.masked_fill(~mask[:, None, :], float("-inf")), -1))),
        Mistake("padded_length", "`n` counts the padded positions too: divide by the number of *real* keys "
                "of each example, `key_mask.sum(-1)`, so that padding does not change the real tokens' weights.",
                lambda q, k, mask=None: _gau(q, k, mask, lambda s, n: torch.relu(s / n) ** 2, n_from_mask=False)),
        Mistake("mask_ignored", "the padded keys keep their weight: set `A` to 0 where `key_mask` is `False` "
                "(after the squared ReLU; a weight of exactly 0, not a `-inf` score).",
                lambda q, k, mask=None: _gau(q, k, mask, lambda s, n: torch.relu(s / n) ** 2, apply_mask=False)),
    ),
)


# -- 3. how a row of A scales with the length --------------------------------------------------------------
def gau_row_sum_ratio() -> float:
    """The factor by which a GAU row's sum ``sum_j A_ij`` changes when the sequence length doubles from 64 to 128
    and every score ``q_i . k_j`` stays the same (here 3): ``n (c/n)^2 = c^2/n``, so ``1/2``.
    """
    def row_sum(n: int) -> float:
        q = torch.full((1, n, 1), 3.0)  # every score q_i . k_j = 3
        k = torch.ones(1, n, 1)
        return float(gau_weights(q, k)[0, 0].sum())

    return row_sum(128) / row_sum(64)


GAU_ROW_SUM_RATIO = Exercise(
    name="gau_row_sum_ratio",
    chapter=20,
    title="A GAU row as the sequence grows",
    solution=gau_row_sum_ratio,
    kind="value",
    atol=1e-3,
    rtol=1e-3,
    hint="Each weight is relu(c / n)²; a row has n of them.",
    mistakes=(
        Mistake("normalised_like_softmax", "a GAU row is not normalised: there is no softmax, so nothing "
                "keeps its sum at 1. Each weight is (c/n)² and there are n of them.", lambda: 1.0),
        Mistake("one_weight", "that is the factor for one weight, (1/2)²; a row has twice as many weights "
                "after doubling, so its sum changes by 2 × 1/4.", lambda: 0.25),
        Mistake("more_keys_more_mass", "more keys do add more terms (twice as many), but each term shrinks "
                "four-fold, because n divides inside the square.", lambda: 2.0),
    ),
)

check_gated_attention = GATED_ATTENTION.checker()
check_gau_weights = GAU_WEIGHTS.checker()
check_gau_row_sum_ratio = GAU_ROW_SUM_RATIO.checker()

EXERCISES = (GATED_ATTENTION, GAU_WEIGHTS, GAU_ROW_SUM_RATIO)
