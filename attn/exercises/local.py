"""Chapter 8's exercises: the band mask, the reach of a stack of windows, and blockwise causal local attention.

Solutions: :func:`band_mask`, :func:`receptive_field`, :func:`blockwise_local`. Checkers:
:func:`check_band_mask`, :func:`check_receptive_field`, :func:`check_blockwise_local`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "band_mask", "receptive_field", "blockwise_local",
    "check_band_mask", "check_receptive_field", "check_blockwise_local",
    "BAND_MASK", "RECEPTIVE_FIELD", "BLOCKWISE_LOCAL", "EXERCISES",
]


# -- 1. the band mask -----------------------------------------------------------------------------------------
def band_mask(n: int, w: int, causal: bool = False) -> Tensor:
    """The sliding-window pattern ``(n, n)``, ``True`` = may attend: query ``i`` sees key ``j`` when ``|i - j| <= w``.

    With ``causal=True`` only the keys ``i - w <= j <= i``: ``w`` keys behind and the query's own.
    """
    i = torch.arange(n)[:, None]  # (n, 1) queries
    j = torch.arange(n)[None, :]  # (1, n) keys
    keep = (i - j).abs() <= w  # the two-sided window, 2w + 1 keys away from the edges
    if causal:
        keep = keep & (j <= i)  # no key from the future
    return keep


def _band_cases(g: torch.Generator) -> list[Case]:
    del g  # the inputs are sizes, not random draws
    return [
        Case((10, 2), label="n = 10, w = 2"),
        Case((10, 3, True), label="n = 10, w = 3, causal"),
        Case((6, 0), label="n = 6, w = 0 (each query sees itself)"),
        Case((5, 8, True), label="n = 5, w = 8 >= n, causal"),
        Case((1, 2), label="n = 1, w = 2"),
    ]


def _band(n: int, lo: int, hi: int) -> Tensor:
    """``lo <= i - j <= hi``."""
    d = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    return (d >= lo) & (d <= hi)


BAND_MASK = Exercise(
    name="band_mask",
    chapter=8,
    title="The band mask",
    solution=band_mask,
    cases=_band_cases,
    hint="Build `i - j` for every pair with two `arange`s, then compare it with w.",
    mistakes=(
        Mistake("inverted", "the mask is inverted: in this book `True` means *may attend*, so the band itself is "
                "`True` and everything outside it `False`.",
                lambda n, w, causal=False: ~_band(n, -w if not causal else 0, w)),
        Mistake("too_narrow", "the window is one short on each side: `|i - j| < w` keeps 2w - 1 keys; the "
                "chapter's window is `|i - j| <= w`, 2w + 1 keys (w + 1 when causal).",
                lambda n, w, causal=False: _band(n, -(w - 1) if not causal else 0, w - 1)),
        Mistake("too_wide", "the window is one too wide on each side: `|i - j| <= w + 1`. The window of width w "
                "reaches exactly w positions away.",
                lambda n, w, causal=False: _band(n, -(w + 1) if not causal else 0, w + 1)),
        Mistake("causal_future", "the causal window looks ahead: it keeps `i <= j <= i + w` (the future). Causal "
                "means `j <= i`: the w keys *behind* the query and the query itself.",
                lambda n, w, causal=False: _band(n, -w, 0 if causal else w)),
        Mistake("causal_ignored", "`causal=True` has no effect: intersect the band with `j <= i` "
                "(`torch.ones(n, n).tril()`), so that no query reads a later key.",
                lambda n, w, causal=False: _band(n, -w, w)),
        Mistake("causal_w_keys", "the causal window drops the query itself: it keeps `i - w <= j < i`. The "
                "query's own key is part of its window (w + 1 keys, `j <= i`).",
                lambda n, w, causal=False: _band(n, 1, w) if causal else _band(n, -w, w)),
    ),
)


# -- 2. predict: the reach of L window layers -------------------------------------------------------------------
def receptive_field() -> int:
    """How many inputs the output at position 17 can depend on after 3 causal window layers of w = 4 (n = 24).

    Each layer lets position t read ``t - w .. t``; three of them compose to ``t - 3w .. t``: 3·4 + 1 = 13 inputs,
    counted here from the boolean power of the one-layer pattern.
    """
    n, w, layers, t = 24, 4, 3, 17
    one = band_mask(n, w, causal=True).float()  # (n, n): one layer's graph
    reach = torch.eye(n)
    for _ in range(layers):
        reach = ((reach @ one) > 0).float()  # one more hop
    return int(reach[t].sum())


RECEPTIVE_FIELD = Exercise(
    name="receptive_field",
    chapter=8,
    title="The reach of a stack of windows",
    solution=receptive_field,
    kind="value",
    hint="Follow the oldest input one layer at a time: how far back can layer 3 read, given what layer 2 read?",
    mistakes=(
        Mistake("without_itself", "that is L·w = 12, the *distance* reached: the inputs are positions "
                "t - Lw .. t, which includes t itself, L·w + 1 of them.", lambda: 12),
        Mistake("one_layer", "that is one layer's window, w + 1 = 5: each further layer reads w positions "
                "further back, through what the previous layer already mixed in.", lambda: 5),
        Mistake("w_plus_one_per_layer", "that counts w + 1 new inputs per layer: each layer's window overlaps the "
                "previous layer's by one position (the query's own), so L layers reach t - Lw .. t, L·w + 1 "
                "inputs.", lambda: 15),
        Mistake("two_sided", "that is the two-sided reach, 2Lw + 1: the layers here are causal, so the field "
                "only grows to the left, t - Lw .. t.", lambda: 25),
    ),
)


# -- 3. blockwise causal local attention ------------------------------------------------------------------------
def blockwise_local(q: Tensor, k: Tensor, v: Tensor, w: int) -> Tensor:
    """Causal sliding-window attention computed in blocks of ``w``, each reading its own block and the one before.

    Shapes: ``q, k, v (..., n, d)`` with ``n`` a multiple of ``w`` -> ``(..., n, d)``. Query ``i`` attends to keys
    ``i - w <= j <= i`` with weights ``softmax(q kᵀ / √d)``, without forming any ``n x n`` tensor.
    """
    *lead, n, d = q.shape
    nb = n // w
    k_pad = F.pad(k, (0, 0, w, 0))  # (..., w + n, d): one empty block in front
    v_pad = F.pad(v, (0, 0, w, 0))
    k_blk = k_pad.unfold(-2, 2 * w, w).transpose(-1, -2)  # (..., nb, 2w, d): block b holds keys (b-1)w .. bw+w-1
    v_blk = v_pad.unfold(-2, 2 * w, w).transpose(-1, -2)
    q_blk = q.reshape(*lead, nb, w, d)  # (..., nb, w, d)
    scores = q_blk @ k_blk.transpose(-1, -2) / math.sqrt(d)  # (..., nb, w, 2w)
    r = torch.arange(w)[:, None]  # query row in its block
    c = torch.arange(2 * w)[None, :]  # key column in the two blocks
    rel = w + r - c  # i - j, the same for every block
    band = (rel >= 0) & (rel <= w)  # (w, 2w): i - w <= j <= i
    exists = torch.arange(nb)[:, None] * w - w + torch.arange(2 * w)[None, :] >= 0  # (nb, 2w): j >= 0, not padding
    keep = band & exists[:, None, :]  # (nb, w, 2w)
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return (weights @ v_blk).reshape(*lead, n, d)  # (..., n, d)


def _local_cases(g: torch.Generator) -> list[Case]:
    def qkv(*shape: int) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(torch.randn(*shape, generator=g) for _ in range(3))  # type: ignore[return-value]

    return [
        Case((*qkv(1, 8, 4), 2), label="q, k, v (1, 8, 4), w = 2"),
        Case((*qkv(2, 3, 12, 8), 4), label="q, k, v (2, 3, 12, 8) with heads, w = 4"),
        Case((*qkv(2, 4, 4), 4), label="q, k, v (2, 4, 4), w = 4 = n (one block)"),
        Case((*qkv(1, 6, 3), 1), label="q, k, v (1, 6, 3), w = 1"),
    ]


def _blockwise(q: Tensor, k: Tensor, v: Tensor, w: int, *, scale: bool = True, lo: int = 0, hi: int | None = None,
               mask_pad: bool = True, band: bool = True, fill: float = float("-inf")) -> Tensor:
    *lead, n, d = q.shape
    nb, hi = n // w, w if hi is None else hi
    k_blk = F.pad(k, (0, 0, w, 0)).unfold(-2, 2 * w, w).transpose(-1, -2)
    v_blk = F.pad(v, (0, 0, w, 0)).unfold(-2, 2 * w, w).transpose(-1, -2)
    s = q.reshape(*lead, nb, w, d) @ k_blk.transpose(-1, -2) / (math.sqrt(d) if scale else 1.0)
    rel = w + torch.arange(w)[:, None] - torch.arange(2 * w)[None, :]
    keep = (rel >= lo) & (rel <= hi) if band else rel >= 0
    if mask_pad:
        keep = keep & (torch.arange(nb)[:, None] * w - w + torch.arange(2 * w)[None, :] >= 0)[:, None, :]
    return (torch.softmax(s.masked_fill(~keep, fill), -1) @ v_blk).reshape(*lead, n, d)


BLOCKWISE_LOCAL = Exercise(
    name="blockwise_local",
    chapter=8,
    title="Blockwise causal local attention",
    solution=blockwise_local,
    cases=_local_cases,
    grad=True,
    hint="Pad k and v with w zeros in front, `unfold(-2, 2 * w, w)`, one (w, 2w) band mask from i - j = w + r - c, "
         "and mask the padded keys of the first block.",
    mistakes=(
        Mistake("no_scale", "the scores are not divided by √d: multiply `q kᵀ` by `1 / math.sqrt(d)` as in "
                "dense attention; the window changes which keys are read, not how they are scored.",
                lambda q, k, v, w: _blockwise(q, k, v, w, scale=False)),
        Mistake("padding_attended", "the first block attends to the zero padding in front of the sequence: the "
                "padded keys score 0 and take weight. Mask every key position j = (b-1)w + c < 0 as well as "
                "the band.", lambda q, k, v, w: _blockwise(q, k, v, w, mask_pad=False)),
        Mistake("window_w_keys", "each query reads w keys (i - w < j <= i), one too few: the window "
                "i - w <= j <= i holds w + 1 keys, so keep 0 <= w + r - c <= w.",
                lambda q, k, v, w: _blockwise(q, k, v, w, hi=w - 1)),
        Mistake("block_aligned", "no band mask inside the blocks: each query reads all of the previous block "
                "and the causal part of its own (the block-aligned window), up to 2w keys. Keep only "
                "0 <= i - j <= w, i.e. 0 <= w + r - c <= w.",
                lambda q, k, v, w: _blockwise(q, k, v, w, band=False)),
        Mistake("fill_zero", "the masked scores are set to 0, not -inf: exp(0) = 1 still gives them weight. "
                "Fill with `float('-inf')` before the softmax.",
                lambda q, k, v, w: _blockwise(q, k, v, w, fill=0.0)),
    ),
)

check_band_mask = BAND_MASK.checker()
check_receptive_field = RECEPTIVE_FIELD.checker()
check_blockwise_local = BLOCKWISE_LOCAL.checker()

EXERCISES = (BAND_MASK, RECEPTIVE_FIELD, BLOCKWISE_LOCAL)
