"""Chapter 10's exercises: BigBird's block pattern, the key blocks a query block reads, its FLOPs against dense.

Solutions: :func:`bigbird_block_mask`, :func:`blocks_read`, :func:`flop_ratio`. Checkers:
:func:`check_bigbird_block_mask`, :func:`check_blocks_read`, :func:`check_flop_ratio`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..hybrid import bigbird_layout
from ._core import Case, Exercise, Mistake

__all__ = [
    "bigbird_block_mask", "blocks_read", "flop_ratio",
    "check_bigbird_block_mask", "check_blocks_read", "check_flop_ratio",
    "BIGBIRD_BLOCK_MASK", "BLOCKS_READ", "FLOP_RATIO", "EXERCISES",
]


# -- 1. the block pattern -------------------------------------------------------------------------------------
def bigbird_block_mask(n_blocks: int, window: int, global_blocks: Sequence[int], random_blocks: Tensor) -> Tensor:
    """BigBird's block pattern (window + global + random blocks) as an ``(n_blocks, n_blocks)`` boolean mask (True = reads).

    Query block ``i`` reads key block ``j`` when ``|i - j| <= window`` (the window, not wrapping around),
    when ``j`` is global (every block reads the globals), when ``i`` is global (a global block reads
    everything), or when ``j`` is one of the random blocks ``random_blocks[i]``.

    Shapes: ``global_blocks`` block indices in ``[0, n_blocks)``; ``random_blocks (n_blocks, r)`` long
    (``r`` may be 0).
    """
    i = torch.arange(n_blocks)
    mask = (i[:, None] - i[None, :]).abs() <= window  # the window: a band of width 2w + 1
    g = torch.tensor(list(global_blocks), dtype=torch.long)
    mask[:, g] = True  # every query block reads the global blocks ...
    mask[g, :] = True  # ... and the global blocks read every key block
    return mask.scatter(1, random_blocks, True)  # row i: the blocks random_blocks[i]


def _mask_cases(g: torch.Generator) -> list[Case]:
    def rnd(nb: int, r: int) -> Tensor:
        return torch.randint(0, nb, (nb, r), generator=g)

    return [
        Case((10, 1, [], rnd(10, 1)), label="10 blocks, window 1, no global, 1 random block"),
        Case((12, 2, [0, 11], rnd(12, 2)), label="12 blocks, window 2, globals [0, 11], 2 random blocks"),
        Case((8, 0, [3], rnd(8, 1)), label="8 blocks, window 0, global [3], 1 random block"),
        Case((9, 1, [0], rnd(9, 0)), label="9 blocks, window 1, global [0], no random block"),
        Case((1, 1, [], rnd(1, 0)), label="1 block, window 1, no global, no random block"),
    ]


def _band(nb: int, window: int) -> Tensor:
    i = torch.arange(nb)
    return (i[:, None] - i[None, :]).abs() <= window


def _pattern(nb: int, window: int, global_blocks: Sequence[int], random_blocks: Tensor, *, band: Tensor | None = None,
             rows: bool = True, cols: bool = True, random: str = "rows") -> Tensor:
    mask = (_band(nb, window) if band is None else band).clone()
    g = torch.tensor(list(global_blocks), dtype=torch.long)
    if cols:
        mask[:, g] = True
    if rows:
        mask[g, :] = True
    if random == "rows":
        mask = mask.scatter(1, random_blocks, True)
    elif random == "cols":
        mask = mask.scatter(0, random_blocks.T, True)  # mask[random_blocks[i, s], i] = True
    return mask


def _wrapping_band(nb: int, window: int) -> Tensor:
    i = torch.arange(nb)
    d = (i[:, None] - i[None, :]).abs()
    return torch.minimum(d, nb - d) <= window


BIGBIRD_BLOCK_MASK = Exercise(
    name="bigbird_block_mask",
    chapter=10,
    title="BigBird's block pattern",
    solution=bigbird_block_mask,
    cases=_mask_cases,
    hint="Build it in three steps: the band |i - j| <= window, then the global rows and columns, then the "
         "random blocks of each row.",
    mistakes=(
        Mistake("window_strict", "the window is one block too narrow: block `i` reads `i - w .. i + w`, so keep "
                "`|i - j| <= window` (with `<` a window of 0 reads nothing, not the block itself).",
                lambda nb, w, gb, rb: _pattern(nb, w, gb, rb, band=_band(nb, w - 1) if w > 0
                                               else torch.zeros(nb, nb, dtype=torch.bool))),
        Mistake("window_wraps", "the window wraps around the ends (indices taken modulo `n_blocks`): the first "
                "block reads the last ones. Blocks outside `[0, n_blocks)` do not exist, so compare "
                "`|i - j| <= window` without a modulo.",
                lambda nb, w, gb, rb: _pattern(nb, w, gb, rb, band=_wrapping_band(nb, w))),
        Mistake("no_global_rows", "the global blocks are read by everyone, but they do not read everything: a "
                "global block's *row* must be all True too (`mask[g, :] = True`).",
                lambda nb, w, gb, rb: _pattern(nb, w, gb, rb, rows=False)),
        Mistake("no_global_columns", "the global blocks read everything, but the other blocks do not read them: "
                "set the global *columns* too (`mask[:, g] = True`).",
                lambda nb, w, gb, rb: _pattern(nb, w, gb, rb, cols=False)),
        Mistake("random_transposed", "the random blocks are set in the columns: `random_blocks[i]` are the key "
                "blocks that *query block i* reads, so set `mask[i, random_blocks[i]]` (row `i`), e.g. "
                "`mask.scatter(1, random_blocks, True)`.",
                lambda nb, w, gb, rb: _pattern(nb, w, gb, rb, random="cols")),
        Mistake("random_ignored", "the random blocks are missing: row `i` must also read the blocks "
                "`random_blocks[i]`.",
                lambda nb, w, gb, rb: _pattern(nb, w, gb, rb, random="none")),
    ),
)


# -- 2. predict: how many key blocks a query block reads -------------------------------------------------------
def blocks_read() -> tuple[int, int, int]:
    """Key blocks read by query blocks 0, 1 and 3 of the explorer's layout: 8 blocks, w=1, globals (0, -1), r=2.

    From the library's layout: the rows of its block mask, counted.
    """
    layout = bigbird_layout(8, window=1, global_blocks=(0, -1), num_random=2, heads=1, seed=0)
    per_row = layout.block_mask()[0].sum(-1)  # (n_blocks,): key blocks each query block reads
    return int(per_row[0]), int(per_row[1]), int(per_row[3])


BLOCKS_READ = Exercise(
    name="blocks_read",
    chapter=10,
    title="Key blocks per query block",
    solution=blocks_read,
    kind="value",
    hint="A global block reads everything; a window block that is also global is counted once; the r random "
         "blocks are drawn among the blocks that are neither in the window nor global.",
    mistakes=(
        Mistake("all_slots", "every query block does not read m = 2w + 1 + g + r = 7 blocks: a global query block "
                "reads all 8, and next to a global block the window and the global slot hold the same block, "
                "which counts once.", lambda: (7, 7, 7)),
        Mistake("double_counted", "block 1's window (blocks 0, 1, 2) contains the global block 0, which is already "
                "one of its global blocks: it is read once, so block 1 reads one block fewer than a block in the "
                "middle.", lambda: (8, 7, 7)),
        Mistake("no_random", "you left out the random blocks: each non-global query block also reads r = 2 random "
                "blocks (per head) among those outside its window and the globals.", lambda: (8, 4, 5)),
        Mistake("tokens_not_blocks", "those are key *tokens* (blocks of 4): the question counts key *blocks*.",
                lambda: (32, 24, 28)),
    ),
)


# -- 3. FLOPs against dense -----------------------------------------------------------------------------------
def flop_ratio() -> float:
    """Dense attention's FLOPs over BigBird's (the chapter's cost formula) at n=4096, b=64, w=1, g=2, r=3.

    BigBird: ``4 n d (m b + g b)`` with ``m = 2w + 1 + g + r`` slots; dense: ``4 n^2 d``; ``d`` cancels.
    """
    n, b, w, g, r = 4096, 64, 1, 2, 3
    m = 2 * w + 1 + g + r  # key-block slots per query block
    bigbird = 4 * n * (m * b + g * b)  # gathered blocks + the dense rows of the global blocks (per unit of d)
    dense = 4 * n * n
    return dense / bigbird


FLOP_RATIO = Exercise(
    name="flop_ratio",
    chapter=10,
    title="BigBird's FLOPs against dense",
    solution=flop_ratio,
    kind="value",
    atol=1e-2,
    rtol=1e-3,
    hint="Count the gathered blocks (m b keys per query, m = 2w + 1 + g + r) and the global blocks' dense rows "
         "(g b queries against all n keys), then divide dense's 4 n^2 d by it.",
    mistakes=(
        Mistake("no_global_rows", "you counted only the gathered blocks (m b keys per query): the g b queries "
                "of the global blocks also attend densely to all n keys, another 4 g b n d FLOPs.",
                lambda: 4096 / (8 * 64)),
        Mistake("inverted", "that is BigBird's cost as a fraction of dense, the inverse of the ratio asked for "
                "(dense FLOPs divided by BigBird's).", lambda: (10 * 64) / 4096),
        Mistake("window_only", "you counted only the window's 2w + 1 blocks: each query block also reads the "
                "g global and r random blocks (m = 2w + 1 + g + r = 8 slots), and the global rows are dense.",
                lambda: 4096 / (3 * 64)),
    ),
)

check_bigbird_block_mask = BIGBIRD_BLOCK_MASK.checker()
check_blocks_read = BLOCKS_READ.checker()
check_flop_ratio = FLOP_RATIO.checker()

EXERCISES = (BIGBIRD_BLOCK_MASK, BLOCKS_READ, FLOP_RATIO)
