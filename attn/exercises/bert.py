"""Chapter 6's exercises: BERT's additive padding mask, a fully padded row, and the 80/10/10 masking rule.

Solutions: :func:`additive_key_mask`, :func:`padded_row_weight`, :func:`mlm_corrupt`. Checkers:
:func:`check_additive_key_mask`, :func:`check_padded_row_weight`, :func:`check_mlm_corrupt`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "additive_key_mask", "padded_row_weight", "mlm_corrupt",
    "check_additive_key_mask", "check_padded_row_weight", "check_mlm_corrupt",
    "ADDITIVE_KEY_MASK", "PADDED_ROW_WEIGHT", "MLM_CORRUPT", "EXERCISES",
]


# -- 1. the additive padding mask ---------------------------------------------------------------------------
def additive_key_mask(key_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A padding key mask -> the additive mask BERT adds to its scores ``(B, h, n, n)``.

    ``key_mask (B, n)`` boolean, ``True`` = real token -> ``(B, 1, 1, n)`` of ``dtype``: ``0`` at a real key,
    ``torch.finfo(dtype).min`` at a padded one (the value ``M_ij`` of the chapter's equation for a padded key,
    finite so that no row turns into NaN). The two singleton dimensions broadcast over heads and queries.
    """
    blocked = torch.finfo(dtype).min
    mask = torch.zeros(key_mask.shape, dtype=dtype)  # (B, n)
    mask = mask.masked_fill(~key_mask, blocked)  # padded keys get the most negative finite value
    return mask[:, None, None, :]  # (B, 1, 1, n): one row for every head and every query


def _key_mask_cases(g: torch.Generator) -> list[Case]:
    def lengths_mask(lengths: list[int], n: int) -> Tensor:
        return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, n), padding at the end

    scattered = torch.rand(3, 7, generator=g) > 0.4
    scattered[:, 0] = True
    return [
        Case((lengths_mask([5, 3], 5),), label="key_mask (2, 5), lengths 5 and 3"),
        Case((scattered,), {"dtype": torch.float16}, label="key_mask (3, 7) with scattered padding, float16"),
        Case((lengths_mask([4, 0, 2], 4),), label="key_mask (3, 4), the second example all padding"),
        Case((torch.ones(1, 1, dtype=torch.bool),), {"dtype": torch.float64}, label="key_mask (1, 1), float64"),
    ]


def _additive(key_mask: Tensor, dtype: torch.dtype, blocked: float, where_pad: bool = True) -> Tensor:
    pad = ~key_mask if where_pad else key_mask
    return torch.zeros(key_mask.shape, dtype=dtype).masked_fill(pad, blocked)


ADDITIVE_KEY_MASK = Exercise(
    name="additive_key_mask",
    chapter=6,
    title="BERT's additive padding mask",
    solution=additive_key_mask,
    cases=_key_mask_cases,
    hint="Zeros of shape (B, n), the padded keys filled with `torch.finfo(dtype).min`, then two new axes.",
    mistakes=(
        Mistake("inverted", "the real tokens are blocked and the padding is open: `key_mask` is `True` at a *real* "
                "token, so fill where it is `False` (`masked_fill(~key_mask, ...)`).",
                lambda key_mask, dtype=torch.float32:
                _additive(key_mask, dtype, torch.finfo(dtype).min, where_pad=False)[:, None, None, :]),
        Mistake("multiplicative", "that is a 0/1 *multiplicative* mask (1 at a real token): added to the scores it "
                "shifts them by 1 and blocks nothing. The additive mask is 0 at a real key and a huge negative "
                "number at a padded one.",
                lambda key_mask, dtype=torch.float32: key_mask.to(dtype)[:, None, None, :]),
        Mistake("masks_queries", "the mask has shape (B, 1, n, 1): it blocks padded *queries* (rows), not padded "
                "*keys*. Padding hides the keys, the last axis of the scores: index it `[:, None, None, :]`.",
                lambda key_mask, dtype=torch.float32:
                _additive(key_mask, dtype, torch.finfo(dtype).min)[:, None, :, None]),
        Mistake("no_broadcast_axes", "the mask has shape (B, n): added to scores of shape (B, h, n, n) it would "
                "broadcast against the wrong axes (or fail). Add the head and query axes: `[:, None, None, :]`.",
                lambda key_mask, dtype=torch.float32: _additive(key_mask, dtype, torch.finfo(dtype).min)),
        Mistake("not_finfo_min", "the padded entries are not `torch.finfo(dtype).min`: `-inf` turns a fully padded "
                "row into NaN after the softmax, and a hand-picked constant such as -1e9 overflows to -inf in "
                "float16 (or, like BERT's old -10000, is not negative enough in float64). Use "
                "`torch.finfo(dtype).min` for the dtype you are given.",
                lambda key_mask, dtype=torch.float32:
                _additive(key_mask, dtype, float("-inf"))[:, None, None, :]),
    ),
)


# -- 2. predict: a fully padded row --------------------------------------------------------------------------
def padded_row_weight() -> float:
    """The weight each of 6 keys gets, under BERT's additive mask, in a row whose keys are all padding.

    Every score becomes ``s_j + finfo.min``, which rounds to ``finfo.min`` itself (``s_j`` is far below the
    spacing of float32 numbers near ``-3.4e38``): six equal scores, so the softmax is uniform, 1/6 each.
    """
    scores = torch.randn(1, 1, 1, 6, generator=torch.Generator().manual_seed(0))  # (B, h, n=1 query, 6 keys)
    real = torch.zeros(1, 1, 1, 6, dtype=torch.bool)  # no real key: all six are padding
    additive = torch.where(real, 0.0, torch.finfo(torch.float32).min)
    weights = torch.softmax(scores + additive, dim=-1)
    return float(weights[0, 0, 0, 0])


PADDED_ROW_WEIGHT = Exercise(
    name="padded_row_weight",
    chapter=6,
    title="A fully padded row",
    solution=padded_row_weight,
    kind="value",
    atol=1e-3,
    rtol=1e-3,
    hint="Add finfo.min to six different small scores in float32: what are the six sums?",
    mistakes=(
        Mistake("zero_weights", "zero is what the *book's* boolean path returns for a fully masked row (it zeroes "
                "such rows after the softmax). BERT's additive mask does not: `s_j + finfo.min` rounds to "
                "`finfo.min` for every key, six equal scores, so the softmax is uniform.", lambda: 0.0),
        Mistake("one_hot", "no key stands out: `s_j + finfo.min` rounds to the same number for every j in float32 "
                "(the scores are far below the spacing of floats near -3.4e38), so the row is uniform, not "
                "concentrated on one key.", lambda: 1.0),
    ),
)


# -- 3. the masked-LM corruption, 80/10/10 --------------------------------------------------------------------
def mlm_corrupt(tokens: Tensor, special: Tensor, pick: Tensor, rule: Tensor, random_tokens: Tensor,
                mask_id: int = 1, rate: float = 0.15) -> tuple[Tensor, Tensor]:
    """BERT's masked-LM corruption with its random draws given: ``(x, target)``.

    A position is *selected* when ``pick < rate`` and it is not a special token; a selected position becomes
    ``mask_id`` when ``rule < 0.8``, ``random_tokens`` when ``0.8 <= rule < 0.9``, and stays as it is otherwise.
    ``target`` holds the original token at the selected positions and ``-100`` (ignored by the loss) elsewhere.

    Shapes: ``tokens, random_tokens (B, n)`` integers; ``special (B, n)`` boolean (``[CLS]``, ``[SEP]``,
    padding); ``pick, rule (B, n)`` uniform in ``[0, 1)`` -> ``x, target (B, n)`` integers.
    """
    selected = (pick < rate) & ~special  # (B, n): the positions the loss predicts
    mask_tok = torch.full_like(tokens, mask_id)
    replacement = torch.where(rule < 0.8, mask_tok, torch.where(rule < 0.9, random_tokens, tokens))
    x = torch.where(selected, replacement, tokens)  # unselected positions are never changed
    target = torch.where(selected, tokens, torch.full_like(tokens, -100))
    return x, target


def _mlm_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, n: int, pad: list[int], rate: float, label: str) -> Case:
        tokens = torch.randint(5, 30, (b, n), generator=g)
        special = torch.zeros(b, n, dtype=torch.bool)
        special[:, 0] = True  # [CLS]
        for row, p in enumerate(pad):  # [SEP] before p padding tokens
            special[row, n - p - 1:] = True
        pick = torch.rand(b, n, generator=g)
        rule = torch.rand(b, n, generator=g)
        random_tokens = torch.randint(5, 30, (b, n), generator=g)
        random_tokens = torch.where(random_tokens == tokens, random_tokens + 30, random_tokens)  # really different
        return Case((tokens, special, pick, rule, random_tokens), {"rate": rate}, label=label)

    return [
        draw(4, 24, [0, 3, 6, 10], 0.5, "4 sequences of 24 tokens, [CLS]/[SEP]/padding special, rate 0.5"),
        draw(2, 40, [0, 5], 0.15, "2 sequences of 40 tokens, rate 0.15"),
        draw(3, 16, [2, 0, 4], 0.9, "3 sequences of 16 tokens, rate 0.9"),
    ]


def _corrupt(tokens: Tensor, selected: Tensor, new: Tensor, target_everywhere: bool = False) -> tuple[Tensor, Tensor]:
    x = torch.where(selected, new, tokens)
    target = tokens.clone() if target_everywhere else torch.where(selected, tokens, torch.full_like(tokens, -100))
    return x, target


def _rule(tokens: Tensor, rule: Tensor, random_tokens: Tensor, mask_id: int) -> Tensor:
    return torch.where(rule < 0.8, torch.full_like(tokens, mask_id), torch.where(rule < 0.9, random_tokens, tokens))


MLM_CORRUPT = Exercise(
    name="mlm_corrupt",
    chapter=6,
    title="The masked-LM corruption (80/10/10)",
    solution=mlm_corrupt,
    cases=_mlm_cases,
    hint="Two steps: which positions are selected (`pick < rate`, not special), then what each selected one "
         "becomes (`rule`: below 0.8, 0.8 to 0.9, above 0.9).",
    mistakes=(
        Mistake("masks_special", "special tokens ([CLS], [SEP], padding) get selected too: exclude them, "
                "`selected = (pick < rate) & ~special`. The model must never be asked to predict padding.",
                lambda tokens, special, pick, rule, random_tokens, mask_id=1, rate=0.15:
                _corrupt(tokens, pick < rate, _rule(tokens, rule, random_tokens, mask_id))),
        Mistake("all_mask", "every selected position becomes `[MASK]`: BERT replaces only 80% of them; 10% get a "
                "random token and 10% stay unchanged, so the model cannot rely on `[MASK]` marking the positions "
                "it predicts (it never sees `[MASK]` when fine-tuned).",
                lambda tokens, special, pick, rule, random_tokens, mask_id=1, rate=0.15:
                _corrupt(tokens, (pick < rate) & ~special, torch.full_like(tokens, mask_id))),
        Mistake("random_keep_swapped", "the two 10% branches are swapped: `0.8 <= rule < 0.9` takes the random "
                "token and `rule >= 0.9` keeps the original.",
                lambda tokens, special, pick, rule, random_tokens, mask_id=1, rate=0.15:
                _corrupt(tokens, (pick < rate) & ~special,
                         torch.where(rule < 0.8, torch.full_like(tokens, mask_id),
                                     torch.where(rule < 0.9, tokens, random_tokens)))),
        Mistake("pick_inverted", "the selection is inverted: a position is selected when `pick < rate` (a "
                "fraction `rate` of them), not when `pick >= rate`.",
                lambda tokens, special, pick, rule, random_tokens, mask_id=1, rate=0.15:
                _corrupt(tokens, (pick >= rate) & ~special, _rule(tokens, rule, random_tokens, mask_id))),
        Mistake("target_everywhere", "`target` holds every token: the masked-LM loss runs over the selected "
                "positions only, so put `-100` (the ignore index of `cross_entropy`) everywhere else.",
                lambda tokens, special, pick, rule, random_tokens, mask_id=1, rate=0.15:
                _corrupt(tokens, (pick < rate) & ~special, _rule(tokens, rule, random_tokens, mask_id),
                         target_everywhere=True)),
    ),
)

check_additive_key_mask = ADDITIVE_KEY_MASK.checker()
check_padded_row_weight = PADDED_ROW_WEIGHT.checker()
check_mlm_corrupt = MLM_CORRUPT.checker()

EXERCISES = (ADDITIVE_KEY_MASK, PADDED_ROW_WEIGHT, MLM_CORRUPT)
