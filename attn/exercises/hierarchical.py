"""Chapter 16's exercises: the shapes of the two levels, context-vector pooling, two-level pooling with padding.

Solutions: :func:`han_shapes`, :func:`context_pool`, :func:`han_pool`. Checkers: :func:`check_han_shapes`,
:func:`check_context_pool`, :func:`check_han_pool`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "han_shapes", "context_pool", "han_pool", "check_han_shapes", "check_context_pool", "check_han_pool",
    "HAN_SHAPES", "CONTEXT_POOL", "HAN_POOL", "EXERCISES",
]

Level = tuple[Tensor, Tensor, Tensor]


# -- 1. shapes ----------------------------------------------------------------------------------------------
def han_shapes() -> tuple[tuple[int, ...], ...]:
    """Shapes of ``(word weights, sentence vectors s, sentence weights, document vector v)``.

    For ``B = 4`` documents of ``S = 6`` sentences of ``T = 10`` words and bidirectional GRUs with
    ``h = 32`` units per direction (annotations of width ``2h = 64``).
    """
    batch, sentences, words, hidden = 4, 6, 10, 32
    width = 2 * hidden  # forward and backward states side by side
    return (batch, sentences, words), (batch, sentences, width), (batch, sentences), (batch, width)


HAN_SHAPES = Exercise(
    name="han_shapes",
    chapter=16,
    title="The shapes of the two levels",
    solution=han_shapes,
    kind="value",
    hint="One softmax per sentence over its words, one per document over its sentences; annotations are 2h wide.",
    mistakes=(
        Mistake("one_direction", "the annotations are `2h = 64` wide, not `h = 32`: each is a forward and a "
                "backward GRU state side by side, and the pooled vectors `s_i` and `v` are weighted sums of "
                "annotations.", lambda: ((4, 6, 10), (4, 6, 32), (4, 6), (4, 32))),
        Mistake("one_word_softmax", "the word weights are one distribution *per sentence* (they sum to one over "
                "the `T` words of sentence `i`), so they keep the sentence axis: `(B, S, T)`, not one softmax "
                "over the document's `S T` words.", lambda: ((4, 60), (4, 6, 64), (4, 6), (4, 64))),
    ),
)


# -- 2. context-vector pooling ------------------------------------------------------------------------------
def context_pool(h: Tensor, w: Tensor, b: Tensor, context: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Attention pooling against a learned context vector: one level of HAN.

    ``u_t = tanh(W h_t + b)``, ``alpha_t = softmax_t(u_t^T c)`` over the real positions, ``out = sum_t alpha_t h_t``.
    Shapes: ``h (..., n, dim)``, ``w (a, dim)``, ``b (a,)``, ``context (a,)``, ``mask (..., n)`` boolean
    (``True`` = real; every row has one) -> ``(out (..., dim), alpha (..., n))``. No ``1/sqrt(d)``.
    """
    u = torch.tanh(h @ w.T + b)  # (..., n, a)
    scores = u @ context  # (..., n): u_t^T c
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # padding gets weight 0
    alpha = torch.softmax(scores, dim=-1)  # over the positions of each row
    return (alpha.unsqueeze(-1) * h).sum(-2), alpha


def _pool(h: Tensor, w: Tensor, b: Tensor, c: Tensor, mask: Tensor | None = None, *, mode: str = "",
          dim: int = -1) -> tuple[Tensor, Tensor]:
    u = h @ w.T + b if mode == "no_tanh" else torch.tanh(h @ w.T + b)
    scores = u @ c
    if mode == "scaled":
        scores = scores / math.sqrt(c.shape[0])
    if mask is not None and mode == "inverted":
        scores = scores.masked_fill(mask, float("-inf"))
    elif mask is not None and mode not in ("ignored", "after"):
        scores = scores.masked_fill(~mask, float("-inf"))
    alpha = torch.softmax(scores, dim=dim)
    if mask is not None and mode == "after":
        alpha = alpha * mask
    return (alpha.unsqueeze(-1) * (u if mode == "keys" else h)).sum(-2), alpha


def _mistake(mode: str = "", dim: int = -1) -> Callable[..., tuple[Tensor, Tensor]]:
    def fn(h: Tensor, w: Tensor, b: Tensor, c: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return _pool(h, w, b, c, mask, mode=mode, dim=dim)

    return fn


def _level(g: torch.Generator, dim: int, a: int) -> Level:
    return (torch.randn(a, dim, generator=g) / math.sqrt(dim), 0.5 * torch.randn(a, generator=g),
            2 * torch.randn(a, generator=g))


def _lengths_mask(lengths: Tensor, n: int) -> Tensor:
    return torch.arange(n) < lengths.unsqueeze(-1)


def _pool_cases(g: torch.Generator) -> list[Case]:
    h1, m1 = torch.randn(3, 5, 6, generator=g), _lengths_mask(torch.tensor([5, 3, 1]), 5)
    h2, m2 = torch.randn(2, 3, 4, 6, generator=g), _lengths_mask(torch.tensor([[4, 2, 3], [1, 4, 2]]), 4)
    h3 = torch.randn(2, 1, 3, generator=g)
    h4 = torch.randn(4, 6, 3, generator=g)
    return [
        Case((h1, *_level(g, 6, 4), m1), label="h (3, 5, 6), a = 4, mask (3, 5) with lengths 5, 3, 1"),
        Case((h2, *_level(g, 6, 5), m2), label="h (2, 3, 4, 6) (documents, sentences, words), mask (2, 3, 4)"),
        Case((h3, *_level(g, 3, 2)), label="h (2, 1, 3): one position, no mask"),
        Case((h4, *_level(g, 3, 5)), label="h (4, 6, 3), a = 5, no mask"),
    ]


CONTEXT_POOL = Exercise(
    name="context_pool",
    chapter=16,
    title="Pooling against a context vector",
    solution=context_pool,
    cases=_pool_cases,
    grad=True,
    hint="Four steps: u = tanh(h Wᵀ + b), scores u·c, masked softmax over the positions, weighted sum of h.",
    mistakes=(
        Mistake("padding_weighted", "the padded positions get weight: fill their scores with `-inf` "
                "(`scores.masked_fill(~mask, float('-inf'))`) before the softmax.", _mistake("ignored")),
        Mistake("mask_after_softmax", "the padded weights are zeroed *after* the softmax, so a row's weights "
                "sum to less than one: mask the scores before normalising.", _mistake("after")),
        Mistake("mask_inverted", "the mask is used the other way round: `True` marks a *real* word, so fill "
                "the scores where the mask is `False` (`~mask`).", _mistake("inverted")),
        Mistake("softmax_over_batch", "the softmax runs over the batch (`dim=0`): each row's weights must sum to "
                "one over its own positions, `dim=-1`.", _mistake(dim=0)),
        Mistake("scaled", "the scores are divided by `sqrt(a)`: HAN's scores are `u_t^T c` as they are (the "
                "`tanh` already bounds the keys; the context vector learns its own scale).", _mistake("scaled")),
        Mistake("no_tanh", "the `tanh` is missing: `u_t = tanh(W h_t + b)`, a one-layer MLP, not a linear map.",
                _mistake("no_tanh")),
        Mistake("pooled_keys", "the output sums the keys `u_t`: the weights pool the annotations themselves, "
                "`out = sum_t alpha_t h_t` (the output has `h`'s width).", _mistake("keys")),
    ),
)


# -- 3. two levels ------------------------------------------------------------------------------------------
def han_pool(h: Tensor, word_mask: Tensor, word_level: Level, sentence_level: Level) -> tuple[Tensor, Tensor, Tensor]:
    r"""Two levels of :func:`context_pool`: words inside each sentence, then sentences inside each document.

    ``h (B, S, T, dim)``: the words' annotations; ``word_mask (B, S, T)``, ``True`` = real word (real words
    and real sentences first; a padded sentence has no real word); ``word_level``, ``sentence_level``:
    ``(w, b, c)`` each. Returns ``v (B, dim)``, the sentence weights ``(B, S)`` and the word weights
    ``(B, S, T)``; padded words and sentences get weight 0 (no sentence encoder between the levels).
    """
    sent_mask = word_mask.any(-1)  # (B, S): the real sentences
    # only the real sentences are pooled (a padded one has no word to attend to), then scattered back
    s_real, a_real = context_pool(h[sent_mask], *word_level, word_mask[sent_mask])  # (N_s, dim), (N_s, T)
    s = h.new_zeros(h.shape[:2] + h.shape[-1:])  # (B, S, dim)
    alpha_w = h.new_zeros(word_mask.shape)  # (B, S, T)
    s[sent_mask], alpha_w[sent_mask] = s_real, a_real
    v, alpha_s = context_pool(s, *sentence_level, sent_mask)  # (B, dim), (B, S)
    return v, alpha_s, alpha_w


def _two_levels(h: Tensor, word_mask: Tensor, word_level: Level, sentence_level: Level, *,
                mask_sentences: bool = True, share: bool = False,
                word_mode: str = "") -> tuple[Tensor, Tensor, Tensor]:
    s, alpha_w = _pool(h, *word_level, word_mask, mode=word_mode)  # padded sentences: NaN rows
    keep = word_mask.any(-1, keepdim=True)
    s, alpha_w = torch.where(keep, s.nan_to_num(), 0.0), torch.where(keep, alpha_w.nan_to_num(), 0.0)
    level = word_level if share else sentence_level
    v, alpha_s = _pool(s, *level, word_mask.any(-1) if mask_sentences else None)
    return v, alpha_s, alpha_w


def _nan_documents(h: Tensor, word_mask: Tensor, word_level: Level,
                   sentence_level: Level) -> tuple[Tensor, Tensor, Tensor]:
    """The NaN of a padded sentence's word softmax: in its word weights and in its document's ``v``."""
    v, alpha_s, alpha_w = han_pool(h, word_mask, word_level, sentence_level)
    real = word_mask.any(-1)  # (B, S)
    hit = ~real.all(-1, keepdim=True)  # (B, 1): documents with a padded sentence
    nan = float("nan")
    return torch.where(hit, nan, v), alpha_s, torch.where(real.unsqueeze(-1), alpha_w, nan)


def _han_cases(g: torch.Generator) -> list[Case]:
    def make(lengths: list[list[int]], t: int, dim: int, a: int, label: str) -> Case:
        mask = _lengths_mask(torch.tensor(lengths), t)
        h = torch.randn(*mask.shape, dim, generator=g)
        return Case((h, mask, _level(g, dim, a), _level(g, dim, a)), label=label)

    return [
        make([[3, 2, 4], [4, 1, 0]], 4, 6, 5, "h (2, 3, 4, 6): document 1 has 2 sentences (one padded)"),
        make([[2, 0, 0], [3, 3, 1], [1, 2, 0]], 3, 4, 3, "h (3, 3, 3, 4): padded sentences in two documents"),
        make([[5, 5], [5, 5]], 5, 3, 4, "h (2, 2, 5, 3): no padding"),
        make([[1]], 1, 4, 2, "h (1, 1, 1, 4): one word"),
    ]


HAN_POOL = Exercise(
    name="han_pool",
    chapter=16,
    title="Two levels of pooling",
    solution=han_pool,
    cases=_han_cases,
    hint="Pool the words of every real sentence, put the sentence vectors back in place, pool the sentences.",
    mistakes=(
        Mistake("padded_sentences_weighted", "the padded sentences get sentence weight: the sentence level "
                "needs its own mask, `word_mask.any(-1)` (a sentence is real when it has a real word).",
                lambda *a: _two_levels(*a, mask_sentences=False)),
        Mistake("one_context_vector", "both levels use the word level's parameters: the sentence level has its "
                "own `(w, b, c)`, a context vector `u_s` that asks which *sentence* matters.",
                lambda *a: _two_levels(*a, share=True)),
        Mistake("padded_words_weighted", "the padded words get weight: mask the word scores with `word_mask` "
                "before the word softmax.", lambda *a: _two_levels(*a, word_mode="ignored")),
        Mistake("empty_sentence_nan", "a padded sentence has no real word, so its word softmax is over `-inf` "
                "only and gives NaN, which the sentence level then spreads into `v`. Pool only the real "
                "sentences (`sent_mask = word_mask.any(-1)`; `h[sent_mask]`) and leave zeros for the others.",
                _nan_documents),
    ),
)

check_han_shapes = HAN_SHAPES.checker()
check_context_pool = CONTEXT_POOL.checker()
check_han_pool = HAN_POOL.checker()

EXERCISES = (HAN_SHAPES, CONTEXT_POOL, HAN_POOL)
