"""The shared input checks in attn.checks: each raises the documented error, naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

from attn.checks import check_positive_float, check_same_dtype, check_token_ids


def test_same_dtype_names_each_argument():
    check_same_dtype(("q", torch.zeros(2)), ("k", torch.zeros(3)), ("memory", None))
    with pytest.raises(TypeError, match=r"q: torch\.float32, memory: torch\.float64"):
        check_same_dtype(("q", torch.zeros(2)), ("memory", torch.zeros(2, dtype=torch.float64)))


@pytest.mark.parametrize(
    "ids,exc,match",
    [
        ([[1, 2]], TypeError, r"torch\.Tensor of integer token ids \(batch, seq\), got list"),
        (torch.ones(1, 2), TypeError, r"integer token ids.*float32"),
        (torch.ones(1, 2, dtype=torch.bool), TypeError, r"integer token ids.*bool"),
        (torch.tensor([1, 2]), ValueError, r"shape \(batch, seq\), got 1-D"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, r"empty sequence"),
        (torch.tensor([[0, 5]]), ValueError, r"\[0, 5\), got values in \[0, 5\]"),
        (torch.tensor([[-1, 2]]), ValueError, r"\[0, 5\), got values in \[-1, 2\]"),
    ],
)
def test_token_ids(ids, exc, match):
    with pytest.raises(exc, match=match):
        check_token_ids(ids, 5)


def test_token_ids_accepts_valid_and_empty_batch():
    ids = torch.tensor([[0, 4]])
    assert check_token_ids(ids, 5) is ids
    check_token_ids(torch.zeros(0, 3, dtype=torch.long), 5)


@pytest.mark.parametrize(
    "value,kw,exc,match",
    [
        ("1", {}, TypeError, r"temperature must be a real number, got str"),
        (True, {}, TypeError, r"real number, got bool"),
        (math.nan, {}, ValueError, r"finite, got nan"),
        (math.inf, {}, ValueError, r"finite, got inf"),
        (0.0, {}, ValueError, r"> 0, got 0"),
        (-1.0, {"allow_zero": True}, ValueError, r">= 0, got -1"),
        (1e-40, {"minimum": 1e-30}, ValueError, r">= 1e-30 .*overflow"),
    ],
)
def test_positive_float(value, kw, exc, match):
    with pytest.raises(exc, match=match):
        check_positive_float("temperature", value, **kw)


def test_positive_float_returns_float():
    assert check_positive_float("t", 2) == 2.0
    assert check_positive_float("t", 0, allow_zero=True) == 0.0
    assert check_positive_float("t", torch.tensor(0.5)) == 0.5
