"""Chapter 25's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import math

import torch

from attn import flash as lib
from attn.exercises import flash as ex


def test_online_step_a_correct_answer_written_another_way_passes() -> None:
    def mine(m, ell, o, s, v):  # type: ignore[no-untyped-def]
        block_max = s.max(dim=-1, keepdim=True).values
        m_new = torch.where(block_max > m, block_max, m)
        p = (s - m_new).exp()
        scale = (m - m_new).exp()
        return m_new, ell * scale + p.sum(-1, keepdim=True), o * scale + torch.einsum("...rc,...cd->...rd", p, v)

    assert ex.check_online_softmax_step(mine).passed


def test_online_step_wrong_answers_get_their_diagnosis() -> None:
    def parts(m, s):  # type: ignore[no-untyped-def]
        m_new = torch.where(s.max(-1, keepdim=True).values > m, s.max(-1, keepdim=True).values, m)
        return m_new, (s - m_new).exp()

    def keeps_o(m, ell, o, s, v):  # type: ignore[no-untyped-def]
        m_new, p = parts(m, s)
        return m_new, ell * (m - m_new).exp() + p.sum(-1, keepdim=True), o + torch.einsum("...rc,...cd->...rd", p, v)

    def keeps_ell(m, ell, o, s, v):  # type: ignore[no-untyped-def]
        m_new, p = parts(m, s)
        return m_new, ell + p.sum(-1, keepdim=True), o * (m - m_new).exp() + torch.einsum("...rc,...cd->...rd", p, v)

    def divides(m, ell, o, s, v):  # type: ignore[no-untyped-def]
        m_new, p = parts(m, s)
        scale = (m - m_new).exp()
        ell_new = ell * scale + p.sum(-1, keepdim=True)
        return m_new, ell_new, (o * scale + torch.einsum("...rc,...cd->...rd", p, v)) / ell_new

    table = {keeps_o: "no_rescale_o", keeps_ell: "no_rescale_ell", divides: "normalised_early"}
    for fn, name in table.items():
        report = ex.check_online_softmax_step(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_online_steps_over_all_blocks_give_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 4, generator=g) for _ in range(3))
    s = q @ k.transpose(-1, -2) / 2
    m, ell, o = torch.full((2, 7, 1), -math.inf), torch.zeros(2, 7, 1), torch.zeros(2, 7, 4)
    for lo in range(0, 7, 3):
        m, ell, o = ex.online_softmax_step(m, ell, o, s[..., lo:lo + 3], v[:, lo:lo + 3])
    torch.testing.assert_close(o / ell, lib.naive_attention(q, k, v))


def test_merge_a_correct_answer_written_another_way_passes() -> None:
    def mine(o1, l1, o2, l2):  # type: ignore[no-untyped-def]
        both = torch.stack([l1, l2])
        lse = torch.logsumexp(both, dim=0)
        w = torch.softmax(both, dim=0).unsqueeze(-1)
        return w[0] * o1 + w[1] * o2, lse

    assert ex.check_merge_two(mine).passed


def test_merge_wrong_answers_get_their_diagnosis() -> None:
    def plain_mean(o1, l1, o2, l2):  # type: ignore[no-untyped-def]
        return torch.stack([o1, o2]).mean(0), torch.logaddexp(l1, l2)

    def biggest(o1, l1, o2, l2):  # type: ignore[no-untyped-def]
        w = torch.softmax(torch.stack([l1, l2]), dim=0).unsqueeze(-1)
        return w[0] * o1 + w[1] * o2, torch.where(l1 > l2, l1, l2)

    def naive(o1, l1, o2, l2):  # type: ignore[no-untyped-def]
        a, b = l1.exp().unsqueeze(-1), l2.exp().unsqueeze(-1)
        return (a * o1 + b * o2) / (a + b), (a + b).squeeze(-1).log()

    table = {plain_mean: "mean_of_outputs", biggest: "lse_is_max", naive: "overflow"}
    for fn, name in table.items():
        report = ex.check_merge_two(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_merge_solution_agrees_with_the_library() -> None:
    for case in ex.MERGE_TWO.inputs():
        o1, l1, o2, l2 = case.args
        got = ex.merge_two(o1, l1, o2, l2)
        want = lib.merge_partial_attention([o1, o2], [l1, l2])
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


def test_traffic_ratio() -> None:
    bq = 211
    assert ex.check_traffic_ratio(2 * bq / 64).passed  # the leading-order estimate
    assert ex.check_traffic_ratio(ex.traffic_ratio()).passed
    assert ex.check_traffic_ratio(1 / ex.traffic_ratio()).mistake == "inverted"
    assert ex.check_traffic_ratio(3.0).mistake == "generic"


def test_more_wrong_answers_get_their_diagnosis() -> None:
    def raw_exp(m, ell, o, s, v):  # type: ignore[no-untyped-def]
        e = s.exp()
        return torch.max(m, s.max(-1, keepdim=True).values), ell + e.sum(-1, keepdim=True), o + e @ v

    def unnormalised(o1, l1, o2, l2):  # type: ignore[no-untyped-def]
        m = torch.max(l1, l2)
        return (l1 - m).exp().unsqueeze(-1) * o1 + (l2 - m).exp().unsqueeze(-1) * o2, torch.logaddexp(l1, l2)

    assert ex.check_online_softmax_step(raw_exp).mistake == "no_max_subtraction"
    assert ex.check_merge_two(unnormalised).mistake == "weights_not_normalised"
