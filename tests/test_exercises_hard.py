"""Chapter 21's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn import hard as lib
from attn.exercises import hard as ex


def test_reinforce_surrogate_agrees_with_the_library() -> None:
    scores = torch.randn(5, 4, requires_grad=True)
    z = torch.tensor([0, 3, 1, 1, 2])
    loss = torch.rand(5, requires_grad=True)
    log_p = torch.log_softmax(scores, -1).gather(-1, z[:, None])[:, 0]
    expected = lib.reinforce_loss(loss, log_p, 0.6)
    ours = ex.reinforce_surrogate(scores, z, loss, 0.6)
    torch.testing.assert_close(ours, expected)
    for a, b in zip(torch.autograd.grad(ours, [scores, loss]), torch.autograd.grad(expected, [scores, loss]),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_reinforce_surrogate_written_another_way_passes() -> None:
    def mine(scores, z, loss, baseline):  # type: ignore[no-untyped-def]
        log_p_z = torch.distributions.Categorical(logits=scores).log_prob(z)
        with torch.no_grad():
            weight = loss - baseline
        return torch.mean(loss + weight * log_p_z)

    assert ex.check_reinforce_surrogate(mine).passed


def test_reinforce_surrogate_wrong_answers_get_their_diagnosis() -> None:
    def log_p(scores, z):  # type: ignore[no-untyped-def]
        return torch.distributions.Categorical(logits=scores).log_prob(z)

    def no_baseline(scores, z, loss, baseline):  # type: ignore[no-untyped-def]
        return (loss + loss.detach() * log_p(scores, z)).mean()

    def minus(scores, z, loss, baseline):  # type: ignore[no-untyped-def]
        return torch.mean(loss - (loss - baseline).detach() * log_p(scores, z))

    def greedy(scores, z, loss, baseline):  # type: ignore[no-untyped-def]
        return torch.mean(loss + (loss - baseline).detach() * log_p(scores, scores.argmax(1)))

    def live_advantage(scores, z, loss, baseline):  # type: ignore[no-untyped-def]
        return torch.mean(loss + (loss - baseline) * log_p(scores, z))

    table = {no_baseline: "no_baseline", minus: "wrong_sign", greedy: "log_prob_of_argmax",
             live_advantage: "advantage_not_detached"}
    for fn, name in table.items():
        report = ex.check_reinforce_surrogate(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_straight_through_agrees_with_the_library_pick() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 5)
    g = lib.gumbel_noise((6, 5), torch.Generator().manual_seed(3))
    weights, *_ = lib.select(scores, "gumbel", tau=0.5, generator=gen)
    torch.testing.assert_close(ex.straight_through_gumbel(scores, g, 0.5), weights)


def test_straight_through_written_another_way_passes() -> None:
    def mine(scores, g, tau):  # type: ignore[no-untyped-def]
        y = F.softmax((scores + g) / tau, -1)
        hard = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
        return (hard - y).detach() + y

    assert ex.check_straight_through_gumbel(mine).passed


def test_straight_through_wrong_answers_get_their_diagnosis() -> None:
    def relaxed(scores, g, tau):  # type: ignore[no-untyped-def]
        e = torch.exp((scores + g) / tau - ((scores + g) / tau).amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)

    def hard_only(scores, g, tau):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            idx = (scores + g).argmax(-1)
        return F.one_hot(idx, scores.shape[-1]).float()

    def greedy(scores, g, tau):  # type: ignore[no-untyped-def]
        y = F.softmax((scores + g) / tau, -1)
        hard = torch.zeros_like(y).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0)
        return (hard - y).detach() + y

    table = {relaxed: "no_straight_through", hard_only: "no_gradient", greedy: "noise_ignored_in_pick"}
    for fn, name in table.items():
        report = ex.check_straight_through_gumbel(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_biased_estimators_values() -> None:
    assert ex.biased_estimators() == "c"
    assert ex.check_biased_estimators("C").passed
    assert ex.check_biased_estimators("b, c").mistake == "no_baseline_biased"
    assert ex.check_biased_estimators("abcd").mistake == "generic"
