"""Chapter 14's exercises: which score term encodes a distance, the rel-shift, and a memory with stop-gradient.

Solutions: :func:`distance_term`, :func:`rel_shift`, :func:`attend_with_memory`. Checkers:
:func:`check_distance_term`, :func:`check_rel_shift`, :func:`check_attend_with_memory`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._core import Case, Exercise, Mistake, describe_difference

__all__ = [
    "distance_term", "rel_shift", "attend_with_memory",
    "check_distance_term", "check_rel_shift", "check_attend_with_memory",
    "DISTANCE_TERM", "REL_SHIFT", "ATTEND_WITH_MEMORY", "EXERCISES",
]


# -- 1. which term ------------------------------------------------------------------------------------------
def distance_term() -> str:
    """The term of ``A_rel`` that depends on the distance ``i - j`` alone, not on any content: (d), ``v^T W_R R_{i-j}``.

    (a) ``q_i^T k_j`` reads both contents, (b) ``q_i^T W_R R_{i-j}`` the query's content and the distance,
    (c) ``u^T k_j`` the key's content; only (d) is the same for every query and key at a given distance.
    """
    terms = {"a": ("query", "key"), "b": ("query", "distance"), "c": ("key",), "d": ("distance",)}
    return next(t for t, reads in terms.items() if reads == ("distance",))


def _choice(got: Any, expected: Any) -> str | None:
    if not isinstance(got, str):
        return f"answer with one letter as a string, 'a', 'b', 'c' or 'd'; got {type(got).__name__}."
    letter = got.strip().strip("()").lower()
    return None if letter == expected else f"you chose ({letter}), the answer is another term."


DISTANCE_TERM = Exercise(
    name="distance_term",
    chapter=14,
    title="The term that encodes a distance",
    solution=distance_term,
    kind="value",
    compare=_choice,
    hint="For each term, list what it reads: the query's content, the key's content, the distance.",
    mistakes=(
        Mistake("content_position", "(b) `q_i^T W_R R_{i-j}` does depend on the distance, but through the "
                "query's content: a different token at position i prefers other distances. The term that is the "
                "same for every query is the one with the learned bias `v` in place of `q_i`.", lambda: "b"),
        Mistake("content_bias", "(c) `u^T k_j` is a bias on the key's *content* (some tokens are worth attending "
                "to anywhere); it never sees the distance `i - j`.", lambda: "c"),
        Mistake("content", "(a) `q_i^T k_j` is the content term of ordinary attention: it sees no position at "
                "all, which is why the chapter adds (b)-(d).", lambda: "a"),
    ),
)


# -- 2. the rel-shift ---------------------------------------------------------------------------------------
def rel_shift(x: Tensor) -> Tensor:
    """Move row ``i`` of ``x`` left by ``L - 1 - i`` places: ``out[..., i, j] = x[..., i, j + L - 1 - i]``.

    ``x (..., L, K)``, ``K >= L``, holds in column ``c`` the score of distance ``K - 1 - c``; the result
    ``(..., L, K)`` holds distance ``M + i - j`` (``M = K - L``) at every visible entry ``j <= M + i``
    (the entries right of that are never read). One pad and two reshapes, no gather.
    """
    *lead, length, keys = x.shape
    padded = F.pad(x, (1, 0))  # (..., L, K + 1): a zero column in front
    padded = padded.reshape(*lead, keys + 1, length)  # the same numbers read as K + 1 rows of L
    return padded[..., 1:, :].reshape(*lead, length, keys)  # drop the first row, read back as (L, K)


def _visible(length: int, keys: int) -> Tensor:
    """``(L, K)``: ``True`` where key ``j`` is visible to query ``i`` (``j <= K - L + i``)."""
    return torch.ones(length, keys, dtype=torch.bool).tril(keys - length)


def _compare_visible(got: Any, expected: Any) -> str | None:
    """Compare only the visible entries (the others are masked by the layer and may hold anything)."""
    if not isinstance(got, Tensor) or not isinstance(expected, Tensor) or got.shape != expected.shape:
        return describe_difference(got, expected)
    vis = _visible(*expected.shape[-2:])
    return describe_difference(torch.where(vis, got.detach(), 0.0), torch.where(vis, expected, 0.0))


def _by_index(x: Tensor, offset: Tensor) -> Tensor:
    """``out[..., i, j] = x[..., i, j + offset[i]]`` (0 where that column does not exist)."""
    keys = x.shape[-1]
    idx = torch.arange(keys)[None, :] + offset[:, None]  # (L, K)
    inside = (idx >= 0) & (idx < keys)
    out = x.gather(-1, idx.clamp(0, keys - 1).expand(x.shape))
    return torch.where(inside, out, 0.0)


def _shift_pad_right(x: Tensor) -> Tensor:
    *lead, length, keys = x.shape
    return F.pad(x, (0, 1)).reshape(*lead, keys + 1, length)[..., :-1, :].reshape(*lead, length, keys)


def _rows(x: Tensor) -> Tensor:
    return torch.arange(x.shape[-2])


def _shift_cases(g: torch.Generator) -> list[Case]:
    return [
        Case((torch.randn(4, 4, generator=g),), label="x (L=4, K=4): no memory"),
        Case((torch.randn(3, 10, generator=g),), label="x (L=3, K=10): memory M=7"),
        Case((torch.randn(2, 3, 5, 8, generator=g),), label="x (2, 3, L=5, K=8): batch and heads"),
        Case((torch.randn(1, 4, generator=g),), label="x (L=1, K=4): one query"),
    ]


REL_SHIFT = Exercise(
    name="rel_shift",
    chapter=14,
    title="The rel-shift",
    solution=rel_shift,
    cases=_shift_cases,
    compare=_compare_visible,
    hint="Check one row by hand: row i must move left by L - 1 - i places, the last row not at all.",
    mistakes=(
        Mistake("pad_right", "the zero column is padded on the right (`F.pad(x, (0, 1))`): every row then reads "
                "the distance next to the right one. Pad on the left, `F.pad(x, (1, 0))`, reshape to "
                "`(K + 1, L)`, drop the *first* row, reshape back to `(L, K)`.", _shift_pad_right),
        Mistake("off_by_one", "each row moves one place too far (by `L - i` instead of `L - 1 - i`): as if the "
                "distances were listed `K, ..., 1` instead of `K - 1, ..., 0`. The last row must not move.",
                lambda x: _by_index(x, x.shape[-2] - _rows(x))),
        Mistake("wrong_direction", "the rows move right instead of left: column `j` must read column "
                "`j + L - 1 - i` of `x` (a larger distance sits further left, since the columns list "
                "distances in descending order).", lambda x: _by_index(x, _rows(x) - x.shape[-2] + 1)),
        Mistake("shift_by_row", "row `i` moves by `i` places: the shift is largest for the *first* query "
                "(`L - 1` places) and zero for the last one, which is query `M + L - 1`, the one that sees "
                "every key.", lambda x: _by_index(x, _rows(x))),
        Mistake("no_shift", "the output is the input: nothing moved. Row `i` must move left by `L - 1 - i` "
                "places (pad a zero column in front, reread as `(K + 1, L)`, drop a row, reread as `(L, K)`).",
                lambda x: x.clone()),
    ),
)


# -- 3. memory with stop-gradient ---------------------------------------------------------------------------
def attend_with_memory(prev: Tensor, cur: Tensor, w_h: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> Tensor:
    r"""One head of a Transformer-XL layer on segment ``cur``, with the previous segment's states as memory.

    The layer below is ``h = tanh(x @ w_h)``, run on both segments: ``m = tanh(prev @ w_h)`` ``(B, M, E)``
    and ``h = tanh(cur @ w_h)`` ``(B, L, E)``. Then ``h~ = [SG(m) | h]`` ``(B, M + L, E)``, ``q = h w_q``,
    ``k = h~ w_k``, ``v = h~ w_v`` (``w_*`` ``(E, d)``), and query ``i`` (key position ``M + i``) attends
    to keys ``j <= M + i`` with ``softmax(q k^T / sqrt(d))``. Returns ``(B, L, d)``. No gradient flows
    into the previous segment (``SG``: ``detach``).
    """
    mem = torch.tanh(prev @ w_h).detach()  # SG(m): (B, M, E)
    h = torch.tanh(cur @ w_h)  # (B, L, E)
    ext = torch.cat([mem, h], dim=1)  # h~ = [SG(m) | h]: (B, M + L, E)
    q, k, v = h @ w_q, ext @ w_k, ext @ w_v  # (B, L, d), (B, K, d), (B, K, d)
    length, keys = h.shape[1], ext.shape[1]
    visible = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)  # j <= M + i
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return weights @ v


def _memory_attn(prev: Tensor, cur: Tensor, w_h: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor, *,
                 detach: bool = True, memory_first: bool = True, diagonal: int | None = None,
                 scale: bool = True) -> Tensor:
    mem = torch.tanh(prev @ w_h)
    mem = mem.detach() if detach else mem
    h = torch.tanh(cur @ w_h)
    ext = torch.cat([mem, h] if memory_first else [h, mem], dim=1)
    q, k, v = h @ w_q, ext @ w_k, ext @ w_v
    length, keys = h.shape[1], ext.shape[1]
    visible = torch.ones(length, keys, dtype=torch.bool).tril(keys - length if diagonal is None else diagonal)
    scores = q @ k.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


def _no_memory_mask(prev: Tensor, cur: Tensor, w_h: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> Tensor:
    return _memory_attn(prev, cur, w_h, w_q, w_k, w_v, diagonal=prev.shape[1] + cur.shape[1])


def _memory_cases(g: torch.Generator) -> list[Case]:
    def make(batch: int, mem: int, length: int, e: int, d: int, label: str) -> Case:
        return Case((torch.randn(batch, mem, e, generator=g), torch.randn(batch, length, e, generator=g),
                     torch.randn(e, e, generator=g) / math.sqrt(e), torch.randn(e, d, generator=g),
                     torch.randn(e, d, generator=g), torch.randn(e, d, generator=g)), label=label)

    return [
        make(2, 4, 4, 6, 4, "prev (2, M=4, 6), cur (2, L=4, 6), d=4"),
        make(1, 6, 3, 5, 8, "prev (1, M=6, 5), cur (1, L=3, 5), d=8: a memory longer than the segment"),
        make(3, 2, 5, 4, 3, "prev (3, M=2, 4), cur (3, L=5, 4), d=3"),
        make(2, 1, 1, 4, 2, "prev (2, M=1, 4), cur (2, L=1, 4): one query"),
    ]


ATTEND_WITH_MEMORY = Exercise(
    name="attend_with_memory",
    chapter=14,
    title="A memory with stop-gradient",
    solution=attend_with_memory,
    cases=_memory_cases,
    grad=True,
    hint="Build h~ = [SG(m) | h] first, then the causal mask on the (L, M + L) scores: query i sees j <= M + i.",
    mistakes=(
        Mistake("no_stop_gradient", "the values are right but the gradient flows into the previous segment: "
                "`w_h` gets gradient through the memory `m` too. Detach the memory, "
                "`m = torch.tanh(prev @ w_h).detach()`, so that training back-propagates through one segment.",
                lambda *a: _memory_attn(*a, detach=False)),
        Mistake("memory_after_segment", "the memory is appended after the segment (`[h | m]`): on the key axis "
                "the memory comes *first*, positions `0 .. M-1`, and query `i` sits at position `M + i`; "
                "concatenate `[m, h]` along dimension 1.", lambda *a: _memory_attn(*a, memory_first=False)),
        Mistake("causal_from_zero", "the causal mask is `tril()` of the `(L, M + L)` scores, so query `i` sees "
                "keys `j <= i`: most of the memory is hidden. Query `i` is at position `M + i`: use "
                "`tril(M)` (diagonal `K - L`).", lambda *a: _memory_attn(*a, diagonal=0)),
        Mistake("no_causal_mask", "every query sees the whole segment, its future included: mask the keys "
                "`j > M + i` (the memory stays fully visible).", _no_memory_mask),
        Mistake("no_scale", "the scores are not divided by `sqrt(d)` (`d = w_q.shape[1]`, the head width).",
                lambda *a: _memory_attn(*a, scale=False)),
    ),
)

check_distance_term = DISTANCE_TERM.checker()
check_rel_shift = REL_SHIFT.checker()
check_attend_with_memory = ATTEND_WITH_MEMORY.checker()

EXERCISES = (DISTANCE_TERM, REL_SHIFT, ATTEND_WITH_MEMORY)
