"""Chapter 15's exercises: which entry a kNN memory retrieves, attention over the top k, persistent slots.

Solutions: :func:`retrieved_entry`, :func:`knn_attention`, :func:`persistent_attention`. Checkers:
:func:`check_retrieved_entry`, :func:`check_knn_attention`, :func:`check_persistent_attention`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "retrieved_entry", "knn_attention", "persistent_attention",
    "check_retrieved_entry", "check_knn_attention", "check_persistent_attention",
    "RETRIEVAL_QUERY", "RETRIEVAL_KEYS",
    "RETRIEVED_ENTRY", "KNN_ATTENTION", "PERSISTENT_ATTENTION", "EXERCISES",
]

# -- 1. which entry is retrieved ----------------------------------------------------------------------------
#: the query of exercise 1
RETRIEVAL_QUERY = (1.0, 0.0)
#: the bank's keys of exercise 1, entries 0..3
RETRIEVAL_KEYS = ((1.0, 0.2), (2.0, 2.5), (-1.5, 0.0), (0.5, -0.5))


def retrieved_entry() -> int:
    """The entry a kNN memory retrieves for ``RETRIEVAL_QUERY`` with ``k = 1``: the largest ``q^T k_s``.

    The search is a *maximum inner product* search: a long key can win over a key that is nearer in
    Euclidean distance (here entry 1, inner product 2.0, beats entry 0, inner product 1.0, distance 0.2).
    """
    q = torch.tensor(RETRIEVAL_QUERY)
    keys = torch.tensor(RETRIEVAL_KEYS)  # (S, d)
    return int((keys @ q).argmax())


def _entry(got: object, expected: object) -> str | None:
    if isinstance(got, Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, int):
        return f"answer with the entry's index, an int 0..3; got {type(got).__name__}."
    return None if got == expected else f"entry {got} is not the one with the largest score."


RETRIEVED_ENTRY = Exercise(
    name="retrieved_entry",
    chapter=15,
    title="Which entry is retrieved",
    solution=retrieved_entry,
    kind="value",
    compare=_entry,
    hint="Compute q^T k_s for each of the four keys.",
    mistakes=(
        Mistake("nearest_l2", "entry 0 is the *nearest* key (Euclidean distance 0.2, and the largest cosine), "
                "but the memory ranks by the inner product `q^T k_s`, the score "
                "attention itself uses: entry 1 is longer and scores 2.0 against 1.0.", lambda: 0),
        Mistake("smallest", "entry 2 has the *smallest* score (-1.5): the memory retrieves the largest ones, "
                "`topk(largest=True)`, the entries attention would weight most.", lambda: 2),
    ),
)


# -- 2. attention over the top k ----------------------------------------------------------------------------
def knn_attention(q: Tensor, keys: Tensor, values: Tensor, top_k: int) -> Tensor:
    r"""Each query attends over the ``top_k`` bank entries with the largest ``q^T k_s`` only.

    ``q (B, h, L, d)``, bank ``keys (B, h, S, d)`` and ``values (B, h, S, d_v)``, ``1 <= top_k <= S``
    -> ``(B, h, L, d_v)``: ``sum_{s in N_k(q)} softmax_s(q^T k_s / sqrt(d)) v_s``, the softmax over the
    ``top_k`` retrieved scores (they sum to one).
    """
    scores = q @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, L, S): the exact search
    top, idx = scores.topk(top_k, dim=-1)  # (B, h, L, k): the k largest scores and their entries
    weights = torch.softmax(top, dim=-1)  # over the k retrieved entries only
    length, d_v = q.shape[-2], values.shape[-1]
    bank = values.unsqueeze(-3).expand(*values.shape[:-2], length, *values.shape[-2:])  # (B, h, L, S, d_v)
    picked = bank.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, d_v))  # (B, h, L, k, d_v)
    return (weights.unsqueeze(-1) * picked).sum(-2)


def _top(scores: Tensor, rank: Tensor, top_k: int, *, renorm: bool = True) -> Tensor:
    """Weights ``(B, h, L, S)``: softmax of ``scores`` over the ``top_k`` entries with the largest ``rank``."""
    kth = rank.topk(top_k, dim=-1).values[..., -1:]
    keep = rank >= kth
    if renorm:
        return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.softmax(scores, dim=-1) * keep


def _dot(q: Tensor, keys: Tensor, scale: bool = True) -> Tensor:
    return q @ keys.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1.0)


def _knn_cases(g: torch.Generator) -> list[Case]:
    def make(shape: tuple[int, int, int, int], s: int, d_v: int, top_k: int, label: str) -> Case:
        b, h, _, d = shape
        keys = torch.randn(b, h, s, d, generator=g) * torch.rand(b, h, s, 1, generator=g).mul(2.5).add(0.2)
        return Case((torch.randn(*shape, generator=g), keys, torch.randn(b, h, s, d_v, generator=g), top_k),
                    label=label)

    return [
        make((2, 2, 3, 8), 10, 5, 3, "q (2, 2, 3, 8), bank S=10, d_v=5, top_k=3"),
        make((1, 3, 5, 4), 12, 4, 4, "q (1, 3, 5, 4), bank S=12, top_k=4"),
        make((2, 1, 4, 6), 6, 3, 1, "q (2, 1, 4, 6), bank S=6, top_k=1"),
        make((1, 2, 3, 4), 5, 4, 5, "q (1, 2, 3, 4), bank S=5, top_k=5 = S"),
    ]


KNN_ATTENTION = Exercise(
    name="knn_attention",
    chapter=15,
    title="Attention over the top k",
    solution=knn_attention,
    cases=_knn_cases,
    grad=True,
    hint="Three steps: the scores against the whole bank, `topk` of them, a softmax over the k retrieved.",
    mistakes=(
        Mistake("smallest", "the retrieved entries are the *smallest* scores: use `topk(k, largest=True)` "
                "(the default), the entries attention would weight most.",
                lambda q, keys, values, top_k: _top(_dot(q, keys), -_dot(q, keys), top_k) @ values),
        Mistake("nearest_l2", "the entries are chosen by Euclidean distance (`torch.cdist`) instead of the "
                "inner product: a kNN memory for attention is a *maximum inner product* search, so rank "
                "by `q @ keys.transpose(-2, -1)`, the score the softmax then uses.",
                lambda q, keys, values, top_k: _top(_dot(q, keys), -torch.cdist(q, keys), top_k) @ values),
        Mistake("whole_bank", "every query attends over the whole bank: keep only its `top_k` scores "
                "(`scores.topk(top_k, dim=-1)`) and normalise over those.",
                lambda q, keys, values, top_k: torch.softmax(_dot(q, keys), -1) @ values),
        Mistake("softmax_before_topk", "the softmax runs over the whole bank and the top k weights are kept "
                "as they are, so they sum to less than one: take the top k *scores* first, then the softmax "
                "over those k.",
                lambda q, keys, values, top_k: _top(_dot(q, keys), _dot(q, keys), top_k, renorm=False) @ values),
        Mistake("no_scale", "the scores are not divided by `sqrt(d)` (`d = q.shape[-1]`); the ranking is the "
                "same, but the softmax over the retrieved entries is too sharp.",
                lambda q, keys, values, top_k: _top(_dot(q, keys, False), _dot(q, keys), top_k) @ values),
    ),
)


# -- 3. persistent memory -----------------------------------------------------------------------------------
def persistent_attention(q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor, causal: bool = False) -> Tensor:
    r"""Attention over the tokens' keys and values plus ``N`` persistent slots per head, visible to every query.

    ``q, k, v (B, h, n, d)``, ``mem_k, mem_v (h, N, d)`` -> ``(B, h, n, d)``:
    ``softmax(q K'^T / sqrt(d)) V'`` with ``K' = [k; mem_k]``, ``V' = [v; mem_v]``. ``causal``: query ``i``
    sees tokens ``j <= i`` and every slot.
    """
    batch, n, slots = q.shape[0], q.shape[-2], mem_k.shape[-2]
    keys = torch.cat([k, mem_k.expand(batch, -1, -1, -1)], dim=-2)  # (B, h, n + N, d): [k; M_k]
    vals = torch.cat([v, mem_v.expand(batch, -1, -1, -1)], dim=-2)
    scores = q @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, n, n + N)
    if causal:  # the mask covers the tokens; the slots stay visible
        tokens = torch.ones(n, n, dtype=torch.bool).tril()
        visible = torch.cat([tokens, torch.ones(n, slots, dtype=torch.bool)], dim=-1)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ vals


def _persistent(q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor, causal: bool = False, *,
                visible: Tensor | None = None, slots_first: bool = False, scale: bool = True) -> Tensor:
    b = q.shape[0]
    parts_k, parts_v = [k, mem_k.expand(b, -1, -1, -1)], [v, mem_v.expand(b, -1, -1, -1)]
    if slots_first:
        parts_k, parts_v = parts_k[::-1], parts_v[::-1]
    keys, vals = torch.cat(parts_k, -2), torch.cat(parts_v, -2)
    scores = q @ keys.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    if causal and visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ vals


def _square_tril(q: Tensor, mem_k: Tensor) -> Tensor:
    return torch.ones(q.shape[-2], q.shape[-2] + mem_k.shape[-2], dtype=torch.bool).tril()


def _right(q: Tensor, mem_k: Tensor) -> Tensor:
    n, slots = q.shape[-2], mem_k.shape[-2]
    return torch.cat([torch.ones(n, n, dtype=torch.bool).tril(), torch.ones(n, slots, dtype=torch.bool)], -1)


def _persistent_cases(g: torch.Generator) -> list[Case]:
    def make(b: int, h: int, n: int, slots: int, d: int, causal: bool, label: str) -> Case:
        t = [torch.randn(b, h, n, d, generator=g) for _ in range(3)]
        m = [torch.randn(h, slots, d, generator=g) for _ in range(2)]
        return Case((*t, *m, causal), label=label)

    return [
        make(2, 2, 5, 3, 4, False, "q, k, v (2, 2, 5, 4), slots (2, N=3, 4), causal=False"),
        make(2, 2, 6, 4, 8, True, "q, k, v (2, 2, 6, 8), slots (2, N=4, 8), causal=True"),
        make(1, 3, 4, 1, 4, True, "q, k, v (1, 3, 4, 4), slots (3, N=1, 4), causal=True"),
        make(2, 1, 1, 2, 4, True, "q, k, v (2, 1, n=1, 4), slots (1, N=2, 4), causal=True"),
    ]


PERSISTENT_ATTENTION = Exercise(
    name="persistent_attention",
    chapter=15,
    title="Persistent memory slots",
    solution=persistent_attention,
    cases=_persistent_cases,
    grad=True,
    hint="Append the slots to the keys and the values, then build the causal mask for the (n, n + N) scores.",
    mistakes=(
        Mistake("slots_hidden_by_causal", "with `causal=True` the slots are hidden: a `tril()` of the "
                "`(n, n + N)` scores also masks the columns of the slots, which every query must see. Build "
                "the causal mask over the `n` tokens and append `N` columns of `True`.",
                lambda q, k, v, mk, mv, causal=False: _persistent(q, k, v, mk, mv, causal,
                                                                  visible=_square_tril(q, mk))),
        Mistake("slots_first_square_mask", "the slots come first and the square causal mask `tril()` is "
                "applied to `[slots | tokens]`: query `i` then sees only the first `i + 1` columns. The "
                "slots are visible to every query and the tokens causally: mask by token index, not column.",
                lambda q, k, v, mk, mv, causal=False: _persistent(q, k, v, mk, mv, causal,
                                                                  visible=_square_tril(q, mk), slots_first=True)),
        Mistake("causal_ignored", "`causal=True` has no effect: query `i` must not see the tokens `j > i` "
                "(the slots stay visible).",
                lambda q, k, v, mk, mv, causal=False: _persistent(q, k, v, mk, mv)),
        Mistake("no_scale", "the scores are not divided by `sqrt(d)` (`d = q.shape[-1]`).",
                lambda q, k, v, mk, mv, causal=False: _persistent(q, k, v, mk, mv, causal,
                                                                  visible=_right(q, mk), scale=False)),
    ),
)

check_retrieved_entry = RETRIEVED_ENTRY.checker()
check_knn_attention = KNN_ATTENTION.checker()
check_persistent_attention = PERSISTENT_ATTENTION.checker()

EXERCISES = (RETRIEVED_ENTRY, KNN_ATTENTION, PERSISTENT_ATTENTION)
