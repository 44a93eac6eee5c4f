"""Chapter 11's exercises: the column pass by permute and reshape, the receptive field, the cost against dense.

Solutions: :func:`column_attention`, :func:`receptive_field`, :func:`cost_ratio`. Checkers:
:func:`check_column_attention`, :func:`check_receptive_field`, :func:`check_cost_ratio`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "column_attention", "receptive_field", "cost_ratio",
    "check_column_attention", "check_receptive_field", "check_cost_ratio",
    "COLUMN_ATTENTION", "RECEPTIVE_FIELD", "COST_RATIO", "EXERCISES",
]


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q kᵀ / √d) v`` over the last two dimensions."""
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


# -- 1. the column pass ---------------------------------------------------------------------------------------
def column_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The column pass: query ``(i, j)`` attends to the ``H`` keys ``(m, j)`` of its own column ``j``.

    Shapes: ``q, k, v (B, H, W, d)`` -> ``(B, H, W, d)``. The ``W`` columns are independent sequences
    of length ``H``: move ``W`` next to the batch (a permute, not a bare reshape), attend, move it back.
    """
    B, H, W, d = q.shape
    # (B, H, W, d) -> (B, W, H, d) -> (B W, H, d): one sequence of length H per column
    qc, kc, vc = (t.permute(0, 2, 1, 3).reshape(B * W, H, t.shape[-1]) for t in (q, k, v))
    weights = torch.softmax(qc @ kc.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (B W, H, H)
    out = weights @ vc  # (B W, H, d_v)
    return out.reshape(B, W, H, -1).permute(0, 2, 1, 3)  # back to (B, H, W, d)


def _column_cases(g: torch.Generator) -> list[Case]:
    def qkv(*shape: int) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(torch.randn(*shape, generator=g) for _ in range(3))  # type: ignore[return-value]

    return [
        Case(qkv(2, 3, 5, 4), label="q, k, v (2, 3, 5, 4): H=3, W=5"),
        Case(qkv(1, 6, 2, 8), label="q, k, v (1, 6, 2, 8): H=6, W=2"),
        Case(qkv(3, 4, 4, 4), label="q, k, v (3, 4, 4, 4): a square grid"),
        Case(qkv(2, 1, 3, 4), label="q, k, v (2, 1, 3, 4): one row (H=1)"),
    ]


def _bare_reshape(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    B, H, W, d = q.shape
    out = _sdpa(*(t.reshape(B * W, H, d) for t in (q, k, v)))  # groups H consecutive pixels, not a column
    return out.reshape(B, H, W, d)


def _no_permute_back(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    B, H, W, d = q.shape
    out = _sdpa(*(t.transpose(1, 2).reshape(B * W, H, d) for t in (q, k, v)))
    return out.reshape(B, W, H, d)  # (B, W, H, d): never permuted back


def _back_by_reshape(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    B, H, W, d = q.shape
    out = _sdpa(*(t.transpose(1, 2).reshape(B * W, H, d) for t in (q, k, v)))
    return out.reshape(B, H, W, d)  # the right numbers, put back in the wrong cells


COLUMN_ATTENTION = Exercise(
    name="column_attention",
    chapter=11,
    title="The column pass",
    solution=column_attention,
    cases=_column_cases,
    grad=True,
    hint="Permute (B, H, W, d) to (B, W, H, d), reshape to (B W, H, d), attend, and undo both steps.",
    mistakes=(
        Mistake("reshape_without_permute", "a bare `reshape(B * W, H, d)` of a `(B, H, W, d)` tensor does not "
                "give the columns: it cuts the row-major pixels into runs of H consecutive ones, which mixes "
                "pixels of different rows and columns. Permute first: `t.permute(0, 2, 1, 3).reshape(B * W, H, d)`.",
                _bare_reshape),
        Mistake("not_permuted_back", "the output is laid out `(B, W, H, d)`: after attending, reshape to "
                "`(B, W, H, d)` and permute back to `(B, H, W, d)`.", _no_permute_back),
        Mistake("back_by_reshape", "the attention is right but the output is put back with a bare reshape to "
                "`(B, H, W, d)`, which scatters the columns' results into the wrong cells: reshape to "
                "`(B, W, H, d)`, then permute to `(B, H, W, d)`.", _back_by_reshape),
        Mistake("row_pass", "that is the row pass: each query attends to the W keys of its row. The column pass "
                "attends along H, to the keys `(m, j)` of the query's column `j`.",
                lambda q, k, v: _sdpa(q, k, v)),
        Mistake("whole_grid", "each query attends to all H W pixels (dense attention over the grid): the "
                "column pass reads only the H pixels of the query's own column.",
                lambda q, k, v: _sdpa(*(t.flatten(1, 2) for t in (q, k, v))).reshape(q.shape[:3] + v.shape[-1:])),
        Mistake("no_scale", "the scores are not divided by √d: each pass is ordinary scaled dot-product "
                "attention, `softmax(q kᵀ / √d) v` with `d = q.shape[-1]`.",
                lambda q, k, v: (torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1), -1)
                                 @ v.transpose(1, 2)).transpose(1, 2)),
    ),
)


# -- 2. predict: the receptive field after each pass ----------------------------------------------------------
def receptive_field() -> tuple[int, int]:
    """How many input pixels of a 6 x 8 grid (H=6, W=8) output ``(2, 3)`` depends on after the row pass, then after both.

    Computed by following the two passes' supports: the row pass connects ``(i, j)`` to its row, the
    column pass ``(i, j)`` to its column; compose them as boolean matrices over the ``H W`` pixels.
    """
    H, W = 6, 8
    rows = torch.arange(H).repeat_interleave(W)  # row of each pixel, row-major
    cols = torch.arange(W).repeat(H)
    row_pass = rows[:, None] == rows[None, :]  # (HW, HW): output pixel <- input pixel, same row
    col_pass = cols[:, None] == cols[None, :]
    both = (col_pass.float() @ row_pass.float()) > 0  # z <- y (same column) <- x (same row)
    p = 2 * W + 3
    return int(row_pass[p].sum()), int(both[p].sum())


RECEPTIVE_FIELD = Exercise(
    name="receptive_field",
    chapter=11,
    title="The receptive field after each pass",
    solution=receptive_field,
    kind="value",
    hint="After the row pass, a pixel has read its own row; the column pass then reads the row-pass outputs of its "
         "column, each of which has read a whole row.",
    mistakes=(
        Mistake("cross", "after both passes it is not only the cross (row and column, H + W - 1 pixels): the "
                "column pass reads y at (m, j) for every row m, and each of those already read all of row m, "
                "so every pixel (m, l) reaches (i, j) through (m, j).", lambda: (8, 13)),
        Mistake("axes_swapped", "the row pass reads the W = 8 pixels of the query's row (a row has W pixels, one "
                "per column), not H.", lambda: (6, 48)),
        Mistake("one_pass_only", "the second number is after *both* passes: the column pass adds the other rows, "
                "each already summarised by the row pass.", lambda: (8, 8)),
    ),
)


# -- 3. the cost against dense --------------------------------------------------------------------------------
def cost_ratio() -> float:
    """Dense attention's FLOPs over axial attention's (scores per pass) on a 32 x 64 grid (H=32, W=64): ``HW / (H + W)``."""
    H, W = 32, 64
    axial = H * W * W + W * H * H  # scores of the row pass (H rows of W x W) and the column pass (W cols of H x H)
    dense = (H * W) ** 2
    return dense / axial


COST_RATIO = Exercise(
    name="cost_ratio",
    chapter=11,
    title="Axial against dense: the cost",
    solution=cost_ratio,
    kind="value",
    atol=1e-2,
    rtol=1e-3,
    hint="Count the scores of each pass (H rows of W x W, W columns of H x H) against (HW)^2 for dense attention.",
    mistakes=(
        Mistake("row_pass_only", "you counted only the row pass (H W^2 scores): the column pass adds W H^2 more, "
                "so axial costs H W (H + W).", lambda: 32 * 64 / 64),
        Mistake("column_pass_only", "you counted only the column pass (W H^2 scores): the row pass adds H W^2 more, "
                "so axial costs H W (H + W).", lambda: 32 * 64 / 32),
        Mistake("inverted", "that is axial's cost as a fraction of dense: the question asks how many times more "
                "dense costs, (HW)^2 / (HW (H + W)).", lambda: 96 / (32 * 64)),
    ),
)

check_column_attention = COLUMN_ATTENTION.checker()
check_receptive_field = RECEPTIVE_FIELD.checker()
check_cost_ratio = COST_RATIO.checker()

EXERCISES = (COLUMN_ATTENTION, RECEPTIVE_FIELD, COST_RATIO)
