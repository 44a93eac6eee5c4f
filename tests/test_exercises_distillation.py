"""Chapter 23's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attn import distillation as lib
from attn.exercises import distillation as ex


def test_kd_a_correct_answer_written_another_way_passes() -> None:
    def mine(s, t, tau):  # type: ignore[no-untyped-def]
        return F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean") * tau * tau

    assert ex.check_logit_distillation_loss(mine).passed


@pytest.mark.filterwarnings("ignore:reduction")
def test_kd_wrong_answers_get_their_diagnosis() -> None:
    def plain(s, t, tau):  # type: ignore[no-untyped-def]
        return F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean")

    def backwards(s, t, tau):  # type: ignore[no-untyped-def]
        return F.kl_div(F.log_softmax(t / tau, 1), F.softmax(s / tau, 1), reduction="batchmean") * tau**2

    def elementwise(s, t, tau):  # type: ignore[no-untyped-def]
        return F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="mean") * tau**2

    def summed(s, t, tau):  # type: ignore[no-untyped-def]
        return F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="sum") * tau**2

    def hard_teacher(s, t, tau):  # type: ignore[no-untyped-def]
        return F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t, 1), reduction="batchmean") * tau**2

    table = {plain: "no_tau_squared", backwards: "kl_reversed", elementwise: "mean_over_classes",
             summed: "sum_over_batch", hard_teacher: "teacher_not_softened"}
    for fn, name in table.items():
        report = ex.check_logit_distillation_loss(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_kd_solution_agrees_with_the_library() -> None:
    s, t = torch.randn(5, 4), 3 * torch.randn(5, 4)
    torch.testing.assert_close(ex.logit_distillation_loss(s, t, 3.0), lib.logit_distillation_loss(s, t, 3.0))


def test_kd_limit_values_and_the_library_near_the_limit() -> None:
    assert ex.check_kd_limit(1 / 3).passed and ex.check_kd_limit(0.333).passed
    assert ex.check_kd_limit(0).mistake == "no_tau_squared"
    assert ex.check_kd_limit(2).mistake == "squared_error"
    assert ex.check_kd_limit(0.5).mistake == "generic"
    far = lib.logit_distillation_loss(torch.zeros(1, 3, dtype=torch.float64),
                                      torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64), 1e3)
    assert abs(far.item() - ex.kd_limit()) < 1e-3


def _kl_rows(s, t):  # type: ignore[no-untyped-def]
    return torch.nan_to_num(t * torch.log(t / s)).sum(-1)


def test_minilm_a_correct_answer_written_another_way_passes() -> None:
    def mine(s, t, mask=None):  # type: ignore[no-untyped-def]
        kl = torch.nan_to_num(torch.xlogy(t, t) - torch.xlogy(t, s)).sum(-1)  # (B, h, n)
        if mask is None:
            return kl.mean()
        w = mask.unsqueeze(1).float()
        return (kl * w).sum() / (w.sum() * kl.shape[1])

    assert ex.check_minilm_attention_loss(mine).passed


def test_minilm_wrong_answers_get_their_diagnosis() -> None:
    def mean_of(kl, mask):  # type: ignore[no-untyped-def]
        return kl.mean() if mask is None else kl.transpose(1, 2)[mask].mean()

    def backwards(s, t, mask=None):  # type: ignore[no-untyped-def]
        return mean_of(_kl_rows(t, s), mask)

    def double_softmax(s, t, mask=None):  # type: ignore[no-untyped-def]
        return mean_of(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                reduction="none").sum(-1), mask)

    def student_logits(s, t, mask=None):  # type: ignore[no-untyped-def]
        return mean_of(F.kl_div(s.log_softmax(-1), t, reduction="none").sum(-1), mask)

    def all_rows(s, t, mask=None):  # type: ignore[no-untyped-def]
        return _kl_rows(s, t).mean()

    def per_entry(s, t, mask=None):  # type: ignore[no-untyped-def]
        return mean_of(torch.nan_to_num(t * torch.log(t / s)).mean(-1), mask)

    table = {backwards: "kl_reversed", double_softmax: "softmax_twice",
             student_logits: "log_softmax_of_student",
             all_rows: "padded_rows_counted", per_entry: "mean_over_keys"}
    for fn, name in table.items():
        report = ex.check_minilm_attention_loss(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_minilm_solution_agrees_with_the_library() -> None:
    for case in ex.MINILM_ATTENTION_LOSS.inputs():
        torch.testing.assert_close(ex.minilm_attention_loss(*case.args), lib.minilm_attention_loss(*case.args))


def test_value_relation_a_correct_answer_written_another_way_passes() -> None:
    def mine(values, mask=None):  # type: ignore[no-untyped-def]
        s = torch.einsum("bhid,bhjd->bhij", values, values) / math.sqrt(values.shape[-1])
        if mask is not None:
            s = torch.where(mask[:, None, None, :], s, torch.finfo(s.dtype).min)
        return F.softmax(s, dim=3)

    assert ex.check_value_relation(mine).passed


def test_value_relation_wrong_answers_get_their_diagnosis() -> None:
    def gram(values, mask=None):  # type: ignore[no-untyped-def]
        return F.softmax(torch.einsum("bhnd,bhne->bhde", values, values) / math.sqrt(values.shape[-1]), -1)

    def unscaled(values, mask=None):  # type: ignore[no-untyped-def]
        s = torch.einsum("bhid,bhjd->bhij", values, values)
        return F.softmax(s if mask is None else torch.where(mask[:, None, None, :], s, -1e30), -1)

    def unmasked(values, mask=None):  # type: ignore[no-untyped-def]
        return F.softmax(torch.einsum("bhid,bhjd->bhij", values, values) / math.sqrt(values.shape[-1]), -1)

    table = {gram: "features_not_tokens", unscaled: "no_scale", unmasked: "mask_ignored"}
    for fn, name in table.items():
        report = ex.check_value_relation(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_value_relation_agrees_with_the_library() -> None:
    for case in ex.VALUE_RELATION.inputs():
        torch.testing.assert_close(ex.value_relation(*case.args), lib.value_relation(*case.args))
