"""Chapter 1's exercises: Luong's general score, Bahdanau's additive attention with a padding mask, and where
the alignment of a reversal concentrates.

Solutions: :func:`general_scores`, :func:`additive_attention`, :func:`reversal_alignment`. Checkers:
:func:`check_general_scores`, :func:`check_additive_attention`, :func:`check_reversal_alignment`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "general_scores", "additive_attention", "reversal_alignment",
    "check_general_scores", "check_additive_attention", "check_reversal_alignment",
    "GENERAL_SCORES", "ADDITIVE_ATTENTION", "REVERSAL_ALIGNMENT", "EXERCISES",
]


# -- 1. Luong's general score ------------------------------------------------------------------------------
def general_scores(s: Tensor, h: Tensor, W: Tensor) -> Tensor:
    """Luong's general score ``e_ij = s_iᵀ W h_j`` for every query ``i`` and key ``j`` (no softmax, no scale).

    Shapes: ``s (B, L, d_s)`` queries (decoder states), ``h (B, S, d_h)`` keys (annotations),
    ``W (d_s, d_h)`` -> ``e (B, L, S)``.
    """
    hW = h @ W.transpose(0, 1)  # (B, S, d_s): W h_j for every key j
    return s @ hW.transpose(1, 2)  # (B, L, S): s_i . (W h_j)


def _general_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, L: int, S: int, d: int) -> Case:
        return Case((torch.randn(b, L, d, generator=g), torch.randn(b, S, d, generator=g),
                     torch.randn(d, d, generator=g)),
                    label=f"s ({b}, {L}, {d}), h ({b}, {S}, {d}), W ({d}, {d})")

    return [draw(2, 3, 5, 4), draw(1, 4, 4, 6), draw(3, 1, 7, 8), draw(1, 1, 1, 3)]


def _bmm_general(s: Tensor, h: Tensor, W: Tensor) -> Tensor:
    return s @ W @ h.transpose(1, 2)


GENERAL_SCORES = Exercise(
    name="general_scores",
    chapter=1,
    title="Luong's general score",
    solution=general_scores,
    cases=_general_cases,
    grad=True,
    hint="Write the score of one pair first, s_iᵀ W h_j, then do it for all pairs with matrix products.",
    mistakes=(
        Mistake("dot_not_general", "the matrix `W` is never used: that is Luong's *dot* score `s_iᵀ h_j`. The "
                "general score puts the learned `W` between the query and the key: `s @ W @ h.transpose(1, 2)`.",
                lambda s, h, W: s @ h.transpose(1, 2)),
        Mistake("w_transposed", "`W` is used transposed (`s_iᵀ Wᵀ h_j`): with `W` of shape `(d_s, d_h)` the score "
                "is `s_iᵀ W h_j`, so the query multiplies `W` from the left: `s @ W @ h.transpose(1, 2)`.",
                lambda s, h, W: s @ W.transpose(0, 1) @ h.transpose(1, 2)),
        Mistake("scaled", "the scores are divided by √d: Luong's scores are not scaled (the 1/√d factor is the "
                "Transformer's, chapter 2). Return `s_iᵀ W h_j` as it is.",
                lambda s, h, W: _bmm_general(s, h, W) / math.sqrt(s.shape[-1])),
        Mistake("softmaxed", "you returned the alignment (a softmax over the keys), not the scores: the exercise "
                "asks for the scores `e_ij`, before the softmax normalises them.",
                lambda s, h, W: torch.softmax(_bmm_general(s, h, W), -1)),
    ),
)


# -- 2. Bahdanau's additive attention with a padding mask ----------------------------------------------------
def additive_attention(
    s: Tensor, h: Tensor, W: Tensor, U: Tensor, v: Tensor, key_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One decoder step of Bahdanau attention: ``e_j = vᵀ tanh(W s + U h_j)``, ``α = softmax(e)``, ``c = Σ α_j h_j``.

    Shapes: ``s (B, d_s)`` the decoder state, ``h (B, S, d_h)`` the annotations, ``W (d_a, d_s)``,
    ``U (d_a, d_h)``, ``v (d_a,)``, ``key_mask (B, S)`` boolean (True = real source token) ->
    ``(context (B, d_h), alpha (B, S))``; padded positions get weight exactly 0.
    """
    hidden = torch.tanh((s @ W.T)[:, None, :] + h @ U.T)  # (B, S, d_a): W s + U h_j for every j
    e = hidden @ v  # (B, S)
    if key_mask is not None:
        e = e.masked_fill(~key_mask, float("-inf"))  # padding never receives weight
    alpha = torch.softmax(e, dim=-1)  # over the source positions
    context = (alpha[:, :, None] * h).sum(1)  # (B, d_h)
    return context, alpha


def _additive_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, S: int, d_s: int, d_h: int, d_a: int, keep: list[str] | None) -> Case:
        args: tuple[Any, ...] = (torch.randn(b, d_s, generator=g), torch.randn(b, S, d_h, generator=g),
                                 torch.randn(d_a, d_s, generator=g), torch.randn(d_a, d_h, generator=g),
                                 torch.randn(d_a, generator=g))
        label = f"s ({b}, {d_s}), h ({b}, {S}, {d_h}), d_a {d_a}"
        if keep is None:
            return Case(args, label=label + ", no mask")
        mask = torch.tensor([[c == "1" for c in row] for row in keep])
        return Case((*args, mask), label=label + f", key_mask {' '.join(keep)} (1 = real token)")

    # every masked sentence has padding (left or right) and every position is real in some sentence
    return [draw(3, 5, 4, 6, 7, None), draw(3, 6, 4, 6, 5, ["011111", "111100", "110000"]),
            draw(2, 7, 3, 5, 4, ["1110000", "0011111"]), draw(1, 1, 2, 3, 4, None)]


def _additive(s: Tensor, h: Tensor, W: Tensor, U: Tensor, v: Tensor, key_mask: Tensor | None, *, tanh: bool = True,
              mask: str = "right", dim: int = -1) -> tuple[Tensor, Tensor]:
    pre = (s @ W.T)[:, None, :] + h @ U.T
    e = (torch.tanh(pre) if tanh else pre) @ v
    if key_mask is not None and mask == "right":
        e = e.masked_fill(~key_mask, float("-inf"))
    elif key_mask is not None and mask == "inverted":
        e = e.masked_fill(key_mask, float("-inf"))
    alpha = torch.softmax(e, dim=dim)
    if key_mask is not None and mask == "after":
        alpha = alpha * key_mask
    return (alpha[:, :, None] * h).sum(1), alpha


ADDITIVE_ATTENTION = Exercise(
    name="additive_attention",
    chapter=1,
    title="Bahdanau's additive attention with a padding mask",
    solution=additive_attention,
    cases=_additive_cases,
    grad=True,
    hint="Build the (B, S, d_a) hidden tensor W s + U h_j first, then the scores, the mask, the softmax over j.",
    mistakes=(
        Mistake("no_tanh", "the score has no `tanh`: without it `vᵀ(W s + U h_j) = vᵀW s + vᵀU h_j`, and `vᵀW s` "
                "is the same for every j, so the softmax cancels it and the decoder state has no effect on the "
                "alignment. Apply `torch.tanh` to `W s + U h_j` before projecting onto `v`.",
                lambda s, h, W, U, v, key_mask=None: _additive(s, h, W, U, v, key_mask, tanh=False)),
        Mistake("mask_inverted", "the mask is used the other way round: `key_mask` is True at *real* source "
                "tokens, so fill the scores where it is False: `e.masked_fill(~key_mask, float('-inf'))`.",
                lambda s, h, W, U, v, key_mask=None: _additive(s, h, W, U, v, key_mask, mask="inverted")),
        Mistake("mask_ignored", "the padding still gets weight: `key_mask` has no effect. Set the scores of the "
                "padded positions to `-inf` before the softmax, so their weight is exactly 0.",
                lambda s, h, W, U, v, key_mask=None: _additive(s, h, W, U, v, key_mask, mask="none")),
        Mistake("mask_after_softmax", "the padded weights are zeroed *after* the softmax, so the real positions' "
                "weights no longer sum to one: mask the scores (`-inf`) before normalising.",
                lambda s, h, W, U, v, key_mask=None: _additive(s, h, W, U, v, key_mask, mask="after")),
        Mistake("softmax_over_batch", "the softmax runs over the batch (`dim=0`): the alignment of one sentence "
                "is a distribution over *its* source positions, so normalise over `dim=-1`.",
                lambda s, h, W, U, v, key_mask=None: _additive(s, h, W, U, v, key_mask, dim=0)),
    ),
)


# -- 3. Predict: the alignment of a reversal ----------------------------------------------------------------
def reversal_alignment() -> tuple[int, ...]:
    """The source position each output step should attend to most when the decoder reverses a sentence of
    6 real tokens padded to 8 (positions 6 and 7 are padding, masked out): output ``t`` copies ``x_{5 - t}``.

    Positions count from 0; the answer has one entry per output step ``t = 0..5``.
    """
    n_real = 6
    return tuple(n_real - 1 - t for t in range(n_real))


def _same_positions(got: Any, expected: Any) -> str | None:
    if isinstance(got, Tensor):
        got = got.tolist()
    if not isinstance(got, tuple | list) or not all(isinstance(x, int) for x in got):
        return "give one integer source position per output step, as a tuple, e.g. `(0, 1, 2, 3, 4, 5)`."
    got = tuple(got)
    if len(got) != len(expected):
        return f"expected {len(expected)} positions (one per output step, the padding emits nothing), got {len(got)}."
    wrong = [t for t, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
    if not wrong:
        return None
    t = wrong[0]
    return f"{len(wrong)} of {len(expected)} positions differ; output step {t} attends to {expected[t]}, not {got[t]}."


REVERSAL_ALIGNMENT = Exercise(
    name="reversal_alignment",
    chapter=1,
    title="Where the alignment of a reversal concentrates",
    solution=reversal_alignment,
    kind="value",
    compare=_same_positions,
    hint="Output step t copies the source token that sits t places from the end of the *real* sentence.",
    mistakes=(
        Mistake("diagonal", "that is the diagonal, the alignment of a copy: a reversal reads the source from the "
                "end, so output step t attends to position 5 - t (the anti-diagonal).",
                lambda: tuple(range(6))),
        Mistake("reversed_padding", "you reversed the padded length (8), so the first steps attend to the two "
                "padding positions, which the mask gives weight 0. Reverse the 6 real tokens: step t reads 5 - t.",
                lambda: tuple(7 - t for t in range(6))),
        Mistake("one_based", "those positions count from 1: the book (and PyTorch) index from 0, so the last "
                "real token is at position 5 and step t reads 5 - t.",
                lambda: tuple(6 - t for t in range(6))),
    ),
)

check_general_scores = GENERAL_SCORES.checker()
check_additive_attention = ADDITIVE_ATTENTION.checker()
check_reversal_alignment = REVERSAL_ALIGNMENT.checker()

EXERCISES = (GENERAL_SCORES, ADDITIVE_ATTENTION, REVERSAL_ALIGNMENT)
