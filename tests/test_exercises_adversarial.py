"""Chapter 22's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn.adversarial import fgm_perturbation as library_fgm
from attn.adversarial import vat_perturbation
from attn.exercises import adversarial as ex


def test_fgm_a_correct_answer_written_another_way_passes() -> None:
    def mine(grad, epsilon):  # type: ignore[no-untyped-def]
        sq = torch.einsum("b...,b...->b", grad, grad)
        scale = epsilon * torch.where(sq > 0, sq.clamp_min(1e-30).rsqrt(), torch.zeros_like(sq))
        return grad * scale.view(-1, *([1] * (grad.ndim - 1)))

    assert ex.check_fgm_perturbation(mine).passed


def test_fgm_wrong_answers_get_their_diagnosis() -> None:
    def linf(grad, epsilon):  # type: ignore[no-untyped-def]
        return torch.where(grad > 0, epsilon, torch.where(grad < 0, -epsilon, 0.0))

    def per_row(grad, epsilon):  # type: ignore[no-untyped-def]
        return epsilon * F.normalize(grad, dim=-1, eps=0.0)

    def global_norm(grad, epsilon):  # type: ignore[no-untyped-def]
        return epsilon * grad / torch.sqrt((grad**2).sum())

    def raw(grad, epsilon):  # type: ignore[no-untyped-def]
        return grad.mul(epsilon)

    def down(grad, epsilon):  # type: ignore[no-untyped-def]
        n = torch.stack([row.norm() for row in grad]).view(-1, *([1] * (grad.ndim - 1)))
        return epsilon * (-grad) / n

    def unguarded(grad, epsilon):  # type: ignore[no-untyped-def]
        n = torch.stack([row.norm() for row in grad]).view(-1, *([1] * (grad.ndim - 1)))
        return epsilon * grad / n

    table = {linf: "sign_step", per_row: "norm_per_token", global_norm: "norm_over_batch", raw: "not_normalised",
             down: "descent", unguarded: "zero_gradient_nan"}
    for fn, name in table.items():
        report = ex.check_fgm_perturbation(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_fgm_solution_agrees_with_the_library() -> None:
    g = torch.randn(4, 5, 3)
    g[2] = 0
    torch.testing.assert_close(ex.fgm_perturbation(g, 0.7), library_fgm(g, 0.7))


def test_loss_rise_values() -> None:
    assert ex.check_loss_rise((0.5, 0.7)).passed
    assert ex.check_loss_rise([0.1 * 5, 0.1 * 7]).passed
    assert ex.check_loss_rise((0.5, 0.5)).mistake == "same_rise"
    assert ex.check_loss_rise((0.1, 0.1)).mistake == "budget_only"
    assert ex.check_loss_rise((0.5, 0.9)).mistake == "generic"


def _kl(clean, logits):  # type: ignore[no-untyped-def]
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(clean, -1), log_target=True, reduction="sum")


def test_vat_a_correct_answer_written_another_way_passes() -> None:
    def mine(logits_at, clean_logits, d, xi):  # type: ignore[no-untyped-def]
        r = torch.zeros_like(d, requires_grad=True)
        with torch.enable_grad():
            _kl(clean_logits, logits_at(r + xi * d)).backward()
        g = r.grad
        return g / torch.linalg.vector_norm(g, dim=tuple(range(1, g.ndim)), keepdim=True)

    assert ex.check_vat_direction(mine).passed


def test_vat_wrong_answers_get_their_diagnosis() -> None:
    def grad_at(logits_at, clean_logits, r):  # type: ignore[no-untyped-def]
        r = r.clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(_kl(clean_logits, logits_at(r)), [r])
        return g

    def unit(g):  # type: ignore[no-untyped-def]
        return g / torch.linalg.vector_norm(g, dim=tuple(range(1, g.ndim)), keepdim=True)

    def full_step(logits_at, clean_logits, d, xi):  # type: ignore[no-untyped-def]
        return unit(grad_at(logits_at, clean_logits, d))

    def raw(logits_at, clean_logits, d, xi):  # type: ignore[no-untyped-def]
        return grad_at(logits_at, clean_logits, d * xi)

    def flipped(logits_at, clean_logits, d, xi):  # type: ignore[no-untyped-def]
        return unit(-grad_at(logits_at, clean_logits, d * xi))

    table = {full_step: "no_xi", raw: "not_normalised", flipped: "descent"}
    for fn, name in table.items():
        report = ex.check_vat_direction(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_vat_solution_agrees_with_the_library() -> None:
    base, w = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)

    def logits_at(r: torch.Tensor) -> torch.Tensor:
        return torch.tanh(base + r).flatten(1) @ w

    clean = logits_at(torch.zeros(3, 4, 5, dtype=torch.float64))
    like = torch.zeros(3, 4, 5, dtype=torch.float64)
    r = vat_perturbation(logits_at, clean, like, 0.5, xi=1e-2, generator=torch.Generator().manual_seed(3))
    d = torch.randn(like.shape, generator=torch.Generator().manual_seed(3), dtype=like.dtype)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(0.5 * ex.vat_direction(logits_at, clean, d, 1e-2), r)
