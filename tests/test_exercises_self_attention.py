"""Chapter 2's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import math

import torch

from attn.exercises import self_attention as ex


def _softmax(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    e = torch.exp(s - s.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def test_a_correct_answer_written_another_way_passes() -> None:
    def mine(q, k, mask=None):  # type: ignore[no-untyped-def]
        s = torch.einsum("...nd,...md->...nm", q, k) * q.shape[-1] ** -0.5
        if mask is not None:
            s = torch.where(mask, s, torch.tensor(float("-inf")))
        return _softmax(s)

    assert ex.check_attention_weights(mine).passed


def test_wrong_answers_get_their_diagnosis() -> None:
    def no_scale(q, k, mask=None):  # type: ignore[no-untyped-def]
        s = torch.einsum("...nd,...md->...nm", q, k)
        return _softmax(s if mask is None else s.masked_fill(mask.logical_not(), -1e30))

    def wrong_axis(q, k, mask=None):  # type: ignore[no-untyped-def]
        s = torch.einsum("...nd,...md->...nm", q, k) / math.sqrt(q.shape[-1])
        return _softmax(s if mask is None else s.masked_fill(mask.logical_not(), -1e30), dim=-2)

    def inverted(q, k, mask=None):  # type: ignore[no-untyped-def]
        s = torch.einsum("...nd,...md->...nm", q, k) / math.sqrt(q.shape[-1])
        return _softmax(s if mask is None else torch.where(mask, -1e30, s))

    table = {no_scale: "no_scale", wrong_axis: "softmax_over_queries", inverted: "mask_inverted"}
    for fn, name in table.items():
        report = ex.check_attention_weights(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_a_transposed_answer_is_named_a_transpose() -> None:
    report = ex.check_attention_weights(lambda q, k, mask=None: ex.attention_weights(q, k, mask).transpose(-1, -2))
    assert not report.passed and "transpose" in report.diagnosis


def test_values() -> None:
    assert ex.check_uniform_row_entropy(math.log(8)).passed
    assert ex.check_uniform_row_entropy(math.log2(8)).mistake == "bits"
    assert ex.check_uniform_row_entropy(2.5).mistake == "generic"
