"""Chapter 7's exercises: the affinity matrix, the axes of DCN's two softmaxes, and DCN's co-attention context.

Solutions: :func:`affinity`, :func:`dcn_softmax_axes`, :func:`dcn_context`. Checkers: :func:`check_affinity`,
:func:`check_dcn_softmax_axes`, :func:`check_dcn_context`.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake, describe_difference

__all__ = [
    "affinity", "dcn_softmax_axes", "dcn_context",
    "check_affinity", "check_dcn_softmax_axes", "check_dcn_context",
    "AFFINITY", "DCN_SOFTMAX_AXES", "DCN_CONTEXT", "EXERCISES",
]


# -- 1. the affinity matrix ----------------------------------------------------------------------------------
def affinity(question: Tensor, passage: Tensor, w_b: Tensor, question_mask: Tensor | None = None,
             passage_mask: Tensor | None = None) -> Tensor:
    """Lu et al.'s affinity ``C = tanh(Qᵀ W_b V)``, batch-first, with padded positions at 0.

    Shapes: ``question (B, T, d_q)``, ``passage (B, N, d_v)``, ``w_b (d_q, d_v)``; masks ``(B, T)`` and
    ``(B, N)``, ``True`` = real -> ``(B, T, N)`` with ``C[b, t, n] = tanh(q_t W_b v_nᵀ)``, and 0 in every row of a
    padded question position and every column of a padded passage position.
    """
    c = torch.tanh(question @ w_b @ passage.transpose(-2, -1))  # (B, T, d_q)(d_q, d_v)(B, d_v, N) -> (B, T, N)
    if question_mask is not None:
        c = c * question_mask[:, :, None]  # a padded question position: its row is 0
    if passage_mask is not None:
        c = c * passage_mask[:, None, :]  # a padded passage position: its column is 0
    return c


def _affinity_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, t: int, n: int, dq: int, dv: int) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.randn(b, t, dq, generator=g), torch.randn(b, n, dv, generator=g),
                torch.randn(dq, dv, generator=g) / math.sqrt(dq))

    q1, v1, w1 = draw(2, 4, 7, 5, 3)
    q2, v2, w2 = draw(3, 5, 6, 4, 8)
    qm = torch.arange(5)[None, :] < torch.tensor([5, 3, 2])[:, None]  # (3, 5), right padding
    vm = torch.rand(3, 6, generator=g) > 0.35
    vm[:, 0] = True
    q3, v3, w3 = draw(1, 1, 3, 2, 2)
    return [
        Case((q1, v1, w1), label="question (2, 4, 5), passage (2, 7, 3), no masks"),
        Case((q2, v2, w2, qm, vm), label="question (3, 5, 4), passage (3, 6, 8), both padded"),
        Case((q3, v3, w3, None, torch.tensor([[True, False, True]])),
             label="question (1, 1, 2), passage (1, 3, 2), a passage mask only"),
    ]


def _raw(q: Tensor, v: Tensor, w: Tensor) -> Tensor:
    return q @ w @ v.transpose(-2, -1)


def _zero_padded(c: Tensor, qm: Tensor | None, vm: Tensor | None) -> Tensor:
    if qm is not None:
        c = c * qm[:, :, None]
    if vm is not None:
        c = c * vm[:, None, :]
    return c


def _inf_before_tanh(q: Tensor, v: Tensor, w: Tensor, qm: Tensor | None = None, vm: Tensor | None = None) -> Tensor:
    s = _raw(q, v, w)
    if qm is not None:
        s = s.masked_fill(~qm[:, :, None], float("-inf"))
    if vm is not None:
        s = s.masked_fill(~vm[:, None, :], float("-inf"))
    return torch.tanh(s)


AFFINITY = Exercise(
    name="affinity",
    chapter=7,
    title="The affinity matrix",
    solution=affinity,
    cases=_affinity_cases,
    grad=True,
    hint="Batch-first, Qᵀ is the (B, T, d_q) tensor itself: `question @ w_b @ passage.transpose(-2, -1)`.",
    mistakes=(
        Mistake("no_tanh", "the affinity is missing its `tanh`: C = tanh(Qᵀ W_b V) lies in (-1, 1), which keeps "
                "the terms (W_q Q) C of the hidden features bounded.",
                lambda q, v, w, qm=None, vm=None: _zero_padded(_raw(q, v, w), qm, vm)),
        Mistake("scaled", "the bilinear scores are divided by √d as in scaled dot-product attention: the "
                "affinity has no such factor (W_b is learned, it can take any scale), C = tanh(Qᵀ W_b V).",
                lambda q, v, w, qm=None, vm=None:
                _zero_padded(torch.tanh(_raw(q, v, w) / math.sqrt(q.shape[-1])), qm, vm)),
        Mistake("transposed", "the output is (B, N, T), passage by question: the chapter's C has one row per "
                "question position and one column per passage position, (B, T, N).",
                lambda q, v, w, qm=None, vm=None: _zero_padded(torch.tanh(_raw(q, v, w)), qm, vm).transpose(-2, -1)),
        Mistake("mask_ignored", "padded positions still have affinities: set the rows of padded question "
                "positions and the columns of padded passage positions to 0, so they add nothing to the other "
                "side's hidden features.",
                lambda q, v, w, qm=None, vm=None: torch.tanh(_raw(q, v, w))),
        Mistake("inf_before_tanh", "padded entries are -1: the scores were filled with -inf *before* the tanh, "
                "as one would before a softmax. The affinity is not normalised; padded entries must be 0 "
                "(multiply by the mask, or fill with 0 after the tanh).", _inf_before_tanh),
        Mistake("one_side_masked", "only one side's padding is applied: zero the rows of padded *question* "
                "positions and the columns of padded *passage* positions.",
                lambda q, v, w, qm=None, vm=None: _zero_padded(torch.tanh(_raw(q, v, w)), None, vm)),
    ),
)


# -- 2. predict: along which axes do DCN's softmaxes run ---------------------------------------------------------
@cache
def dcn_softmax_axes() -> tuple[int, int]:
    """The axes of DCN's affinity ``L (B, m+1, n+1)`` over which ``A^D`` and ``A^Q`` normalise, read off the layer.

    ``A^D`` (each document word over the question) normalises over the question axis, ``-1``; ``A^Q`` (each
    question word over the document) over the document axis, ``-2``: the same matrix, two different axes.
    """
    from ..co_attention import DCNCoAttention

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = DCNCoAttention(4, 4, fusion=False)
        out = layer(torch.randn(1, 3, 4), torch.randn(1, 5, 4))  # question n=3, document m=5
    found = []
    for weights in (out.passage_weights, out.question_weights.transpose(-2, -1)):  # both as (B, m+1, n+1)
        axis = next(a for a in (-1, -2) if torch.allclose(weights, torch.softmax(out.affinity, dim=a), atol=1e-6))
        found.append(axis)
    return found[0], found[1]


def _axes_compare(got: Any, expected: Any) -> str | None:
    """Accept axes 1 and 2 of ``L (B, m+1, n+1)`` for -2 and -1."""
    if isinstance(got, tuple | list) and all(isinstance(a, int) for a in got):
        got = tuple({1: -2, 2: -1}.get(a, a) for a in got)
    return describe_difference(got, expected)


DCN_SOFTMAX_AXES = Exercise(
    name="dcn_softmax_axes",
    chapter=7,
    title="DCN's two softmaxes",
    solution=dcn_softmax_axes,
    kind="value",
    compare=_axes_compare,
    hint="A^D gives each document word a distribution over the question; A^Q each question word one over the "
         "document. Which axis of L indexes the question, which the document?",
    mistakes=(
        Mistake("same_axis_question", "both softmaxes over the question axis: then A^Q = A^D and the question "
                "words never get their own distribution over the document. A^Q normalises over the document "
                "axis of L, -2.", lambda: (-1, -1)),
        Mistake("swapped", "the two are swapped: A^D is each *document* word's attention over the question, so "
                "it normalises over the question axis of L (-1); A^Q over the document axis (-2).",
                lambda: (-2, -1)),
        Mistake("same_axis_document", "both softmaxes over the document axis: A^D must give each document word "
                "a distribution over the *question*, the last axis of L (-1).", lambda: (-2, -2)),
    ),
)


# -- 3. DCN's co-attention context ----------------------------------------------------------------------------
def dcn_context(document: Tensor, question: Tensor) -> Tensor:
    """DCN's co-attention context ``C^D = [Q; C^Q] A^D``, batch-first (rows are positions).

    Shapes: ``document D (B, m, ℓ)``, ``question Q (B, n, ℓ)`` (sentinels already appended, the question
    already projected) -> ``(B, m, 2ℓ)``: for each document word, its attention over the question applied to
    ``[Q; C^Q]``, where ``C^Q (B, n, ℓ)`` summarises the document for each question word.
    """
    aff = document @ question.transpose(-2, -1)  # L = Dᵀ Q: (B, m, n)
    a_d = torch.softmax(aff, dim=-1)  # A^D: each document word over the question, (B, m, n)
    a_q = torch.softmax(aff, dim=-2)  # A^Q: each question word over the document (columns sum to 1), (B, m, n)
    c_q = a_q.transpose(-2, -1) @ document  # C^Q = D A^Q: (B, n, ℓ)
    return a_d @ torch.cat([question, c_q], dim=-1)  # C^D = [Q; C^Q] A^D: (B, m, 2ℓ)


def _dcn_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, m: int, n: int, ell: int) -> tuple[Tensor, Tensor]:
        return torch.randn(b, m, ell, generator=g), torch.randn(b, n, ell, generator=g)

    return [
        Case(draw(2, 7, 4, 6), label="document (2, 7, 6), question (2, 4, 6)"),
        Case(draw(1, 5, 5, 3), label="document (1, 5, 3), question (1, 5, 3)"),
        Case(draw(3, 9, 2, 4), label="document (3, 9, 4), question (3, 2, 4)"),
    ]


def _dcn(d: Tensor, q: Tensor, ad_dim: int = -1, aq_dim: int = -2, scale: float = 1.0,
         cq_first: bool = False, with_cq: bool = True) -> Tensor:
    aff = d @ q.transpose(-2, -1) * scale
    a_d = torch.softmax(aff, dim=ad_dim)
    a_q = torch.softmax(aff, dim=aq_dim)
    c_q = a_q.transpose(-2, -1) @ d
    if not with_cq:
        return a_d @ q
    return a_d @ (torch.cat([c_q, q], -1) if cq_first else torch.cat([q, c_q], -1))


DCN_CONTEXT = Exercise(
    name="dcn_context",
    chapter=7,
    title="DCN's co-attention context",
    solution=dcn_context,
    cases=_dcn_cases,
    grad=True,
    hint="Four lines: L = D Qᵀ, two softmaxes over different axes of L, C^Q = A^Qᵀ D, C^D = A^D [Q, C^Q].",
    mistakes=(
        Mistake("same_axis", "both attentions normalise over the question axis: A^Q must give each *question* "
                "word a distribution over the document, `softmax(L, dim=-2)` (columns of L), while A^D uses "
                "`dim=-1`. With one axis for both, C^Q summarises the question instead of the document.",
                lambda d, q: _dcn(d, q, aq_dim=-1)),
        Mistake("axes_swapped", "the two softmaxes are swapped: A^D (each document word over the question) is "
                "`softmax(L, dim=-1)` for L of shape (B, m, n), and A^Q is `softmax(L, dim=-2)`.",
                lambda d, q: _dcn(d, q, ad_dim=-2, aq_dim=-1)),
        Mistake("scaled", "the affinity is divided by √ℓ: DCN's L = Dᵀ Q is a plain dot product, with no "
                "scale factor.", lambda d, q: _dcn(d, q, scale=1 / math.sqrt(d.shape[-1]))),
        Mistake("concat_order", "the halves of C^D are in the other order: C^D = [Q; C^Q] A^D, the attended "
                "question first, then the attended summaries C^Q.", lambda d, q: _dcn(d, q, cq_first=True)),
        Mistake("no_summaries", "C^D holds only A^D Q (width ℓ): DCN's context also attends over the summaries "
                "C^Q = D A^Q, so concatenate [Q, C^Q] (width 2ℓ) before applying A^D.",
                lambda d, q: _dcn(d, q, with_cq=False)),
    ),
)

check_affinity = AFFINITY.checker()
check_dcn_softmax_axes = DCN_SOFTMAX_AXES.checker()
check_dcn_context = DCN_CONTEXT.checker()

EXERCISES = (AFFINITY, DCN_SOFTMAX_AXES, DCN_CONTEXT)
