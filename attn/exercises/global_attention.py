"""Chapter 5's exercises: the global-token mask, Luong's three scores, and how many pairs a global-token
pattern scores.

Solutions: :func:`global_token_mask`, :func:`luong_score`, :func:`scored_pairs`. Checkers:
:func:`check_global_token_mask`, :func:`check_luong_score`, :func:`check_scored_pairs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "global_token_mask", "luong_score", "scored_pairs",
    "check_global_token_mask", "check_luong_score", "check_scored_pairs",
    "GLOBAL_TOKEN_MASK", "LUONG_SCORE", "SCORED_PAIRS", "EXERCISES",
]


# -- 1. The global-token mask ------------------------------------------------------------------------------
def global_token_mask(n: int, global_idx: Sequence[int], window: int) -> Tensor:
    """The ``(n, n)`` boolean pattern of global tokens and a sliding window (True = may attend).

    Query ``i`` may attend to key ``j`` when ``|i - j| <= window`` (a one-sided window), when ``i`` is
    global (a global token sees every position), or when ``j`` is global (every position sees it).
    ``global_idx`` lists the global positions (possibly none).
    """
    pos = torch.arange(n)
    keep = (pos[:, None] - pos[None, :]).abs() <= window  # the band
    is_global = torch.zeros(n, dtype=torch.bool)
    is_global[list(global_idx)] = True
    return keep | is_global[:, None] | is_global[None, :]  # global rows | global columns


def _mask_cases(g: torch.Generator) -> list[Case]:
    del g  # the inputs are sizes, not random tensors
    cases = [(8, [0], 1), (10, [0, 9], 2), (12, [3, 7], 3), (6, [], 1), (5, [2], 7), (1, [0], 0)]
    return [Case((n, idx, w), label=f"n = {n}, global_idx = {idx}, window = {w}") for n, idx, w in cases]


def _pattern(n: int, global_idx: Sequence[int], window: int, *, rows: bool = True, cols: bool = True,
             strict: bool = False) -> Tensor:
    pos = torch.arange(n)
    dist = (pos[:, None] - pos[None, :]).abs()
    keep = dist < window if strict else dist <= window
    for i in global_idx:
        if rows:
            keep[i, :] = True
        if cols:
            keep[:, i] = True
    return keep


GLOBAL_TOKEN_MASK = Exercise(
    name="global_token_mask",
    chapter=5,
    title="The global-token mask",
    solution=global_token_mask,
    cases=_mask_cases,
    hint="Build the band first, then add the global rows and the global columns.",
    mistakes=(
        Mistake("rows_only", "the global tokens see everything, but nobody sees them: a global position is "
                "also a global *column*, `keep[:, g] = True`, so that any two positions connect through it.",
                lambda n, global_idx, window: _pattern(n, global_idx, window, cols=False)),
        Mistake("columns_only", "every position sees the global tokens, but the global tokens see only their "
                "window: a global position's *row* is full too, `keep[g, :] = True`.",
                lambda n, global_idx, window: _pattern(n, global_idx, window, rows=False)),
        Mistake("strict_window", "the window is one too narrow (`|i - j| < window`): a window of w keeps the w "
                "keys on each side *and* the query's own position, `|i - j| <= window`.",
                lambda n, global_idx, window: _pattern(n, global_idx, window, strict=True)),
        Mistake("two_sided_window", "that is Longformer's convention, w / 2 keys on each side: in this "
                "chapter the window is one-sided, `|i - j| <= window`.",
                lambda n, global_idx, window: _pattern(n, global_idx, window // 2)),
        Mistake("mask_inverted", "every entry is the opposite of the answer: in this book `True` means *may "
                "attend*, so the band and the global rows and columns are True.",
                lambda n, global_idx, window: ~_pattern(n, global_idx, window)),
    ),
)


# -- 2. Luong's three scores -------------------------------------------------------------------------------
def luong_score(h_t: Tensor, h_s: Tensor, kind: str, W_a: Tensor | None = None, v_a: Tensor | None = None) -> Tensor:
    """Luong's scores of every target state ``h_t`` against every source state ``h̄_s`` (no softmax).

    ``dot``: ``h_tᵀ h̄_s``; ``general``: ``h_tᵀ W_a h̄_s``; ``concat``: ``v_aᵀ tanh(W_a [h_t; h̄_s])``.
    Shapes: ``h_t (B, T, d)``, ``h_s (B, S, d)``; ``W_a (d, d)`` for general, ``(d_a, 2d)`` for concat;
    ``v_a (d_a,)`` -> ``(B, T, S)``.
    """
    if kind == "dot":
        return h_t @ h_s.transpose(1, 2)
    if kind == "general":
        assert W_a is not None
        return h_t @ W_a @ h_s.transpose(1, 2)
    assert kind == "concat" and W_a is not None and v_a is not None
    d = h_t.shape[-1]
    W_t, W_s = W_a[:, :d], W_a[:, d:]  # W_a [h_t; h_s] = W_t h_t + W_s h_s, no (T, S, 2d) tensor needed
    hidden = torch.tanh((h_t @ W_t.T)[:, :, None, :] + (h_s @ W_s.T)[:, None, :, :])  # (B, T, S, d_a)
    return hidden @ v_a


def _score_cases(g: torch.Generator) -> list[Case]:
    def states(b: int, T: int, S: int, d: int) -> tuple[Tensor, Tensor]:
        return torch.randn(b, T, d, generator=g), torch.randn(b, S, d, generator=g)

    ht1, hs1 = states(2, 3, 5, 4)
    ht2, hs2 = states(2, 4, 3, 6)
    ht3, hs3 = states(2, 3, 5, 4)
    ht4, hs4 = states(1, 1, 4, 3)
    return [
        Case((ht1, hs1, "dot"), label="dot, h_t (2, 3, 4), h_s (2, 5, 4)"),
        Case((ht2, hs2, "general", torch.randn(6, 6, generator=g)), label="general, h_t (2, 4, 6), h_s (2, 3, 6)"),
        Case((ht3, hs3, "concat", torch.randn(5, 8, generator=g), torch.randn(5, generator=g)),
             label="concat, h_t (2, 3, 4), h_s (2, 5, 4), W_a (5, 8)"),
        Case((ht4, hs4, "concat", torch.randn(2, 6, generator=g), torch.randn(2, generator=g)),
             label="concat, h_t (1, 1, 3), h_s (1, 4, 3), W_a (2, 6)"),
    ]


def _score(h_t: Tensor, h_s: Tensor, kind: str, W_a: Tensor | None = None, v_a: Tensor | None = None, *,
           transpose: bool = False, swap: bool = False, tanh: bool = True, scale: bool = False,
           softmax: bool = False) -> Tensor:
    d = h_t.shape[-1]
    if kind == "dot":
        e = h_t @ h_s.transpose(1, 2) / (d**0.5 if scale else 1.0)
    elif kind == "general":
        assert W_a is not None
        W = W_a.T if transpose else W_a
        e = h_t @ W @ h_s.transpose(1, 2) / (d**0.5 if scale else 1.0)
    else:
        assert W_a is not None and v_a is not None
        first, second = (W_a[:, d:], W_a[:, :d]) if swap else (W_a[:, :d], W_a[:, d:])
        pre = (h_t @ first.T)[:, :, None, :] + (h_s @ second.T)[:, None, :, :]
        e = (torch.tanh(pre) if tanh else pre) @ v_a
    return torch.softmax(e, -1) if softmax else e


LUONG_SCORE = Exercise(
    name="luong_score",
    chapter=5,
    title="Luong's three scores",
    solution=luong_score,
    cases=_score_cases,
    grad=True,
    hint="Write each score for one pair (h_t, h̄_s) first; then broadcast over all (t, s) pairs.",
    mistakes=(
        Mistake("general_transposed", "the general score uses `W_a` transposed: `h_tᵀ W_a h̄_s` multiplies `W_a` "
                "by the query from the left, `h_t @ W_a @ h_s.transpose(1, 2)`.",
                lambda *a: _score(*a, transpose=True)),
        Mistake("concat_order_swapped", "the concat score applies `W_a` to `[h̄_s; h_t]`: its first d columns "
                "read the *target* state `h_t` and the last d the source state, `W_a[:, :d] h_t + W_a[:, d:] h̄_s`.",
                lambda *a: _score(*a, swap=True)),
        Mistake("concat_no_tanh", "the concat score has no `tanh`: without it `v_aᵀ W_a [h_t; h̄_s]` splits "
                "into a part of h_t alone, which the softmax cancels, plus one of h̄_s alone, so every target "
                "step gets the same alignment. Apply `torch.tanh` before projecting onto `v_a`.",
                lambda *a: _score(*a, tanh=False)),
        Mistake("scaled", "the dot and general scores are divided by √d: Luong's scores are not scaled (the "
                "1/√d factor is the Transformer's, chapter 2).",
                lambda *a: _score(*a, scale=True)),
        Mistake("softmaxed", "you returned the alignment `a_t(s)`, a softmax over the source: the exercise asks "
                "for the scores, before normalising.",
                lambda *a: _score(*a, softmax=True)),
    ),
)


# -- 3. Count the scored pairs -----------------------------------------------------------------------------
def scored_pairs() -> int:
    """The (query, key) pairs the global-token pattern keeps for ``n = 32``, global positions ``[0, 16]`` and
    a window of 4: the True entries of :func:`global_token_mask` (the cost formula of the chapter is an
    upper bound: at the edges the window is cut, and the band already holds some global columns)."""
    return int(global_token_mask(32, [0, 16], 4).sum())


SCORED_PAIRS = Exercise(
    name="scored_pairs",
    chapter=5,
    title="How many pairs a global-token pattern scores",
    solution=scored_pairs,
    kind="value",
    atol=0.5,
    rtol=0.0,
    hint="Count the band first (rows near the edges have fewer neighbours), then what the global rows and "
    "columns add outside it.",
    mistakes=(
        Mistake("formula", "that is the cost formula's g n + (n - g)(2w + 1 + g), an upper bound: near the edges "
                "a row's window is cut short, and some rows' windows already contain a global column, which must "
                "not be counted twice. Count the True entries of the mask.",
                lambda: 2 * 32 + 30 * (2 * 4 + 1 + 2)),
        Mistake("dense", "that is every pair, n²: the pattern keeps only the band and the global rows and columns.",
                lambda: 32 * 32),
        Mistake("band_only", "that is the band alone: the two global rows (every key) and the two global columns "
                "(every query) add the pairs outside it.", lambda: int(_pattern(32, [], 4).sum())),
        Mistake("rows_only_count", "that counts the global rows but not the global columns: every position also "
                "attends to the global tokens.", lambda: int(_pattern(32, [0, 16], 4, cols=False).sum())),
    ),
)

check_global_token_mask = GLOBAL_TOKEN_MASK.checker()
check_luong_score = LUONG_SCORE.checker()
check_scored_pairs = SCORED_PAIRS.checker()

EXERCISES = (LUONG_SCORE, GLOBAL_TOKEN_MASK, SCORED_PAIRS)
