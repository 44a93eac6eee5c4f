"""Chapter 13's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.adaptive import SentinelAttention, span_mask, span_window
from attn.exercises import adaptive as ex


def _z(distance: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    return span.view(span.shape[0], *(1,) * distance.ndim)


def test_span_mask_correct_answer_written_another_way_passes() -> None:
    def piecewise(distance, span, ramp):  # type: ignore[no-untyped-def]
        z = _z(distance, span)
        x = distance.unsqueeze(0).to(z.dtype) if not distance.is_floating_point() else distance.unsqueeze(0)
        inside = torch.ones_like(x * z)
        on_ramp = (ramp + z - x) / ramp
        return torch.where(x <= z, inside, torch.where(x >= z + ramp, torch.zeros_like(on_ramp), on_ramp))

    assert ex.check_soft_span_mask(piecewise).passed


def test_span_mask_wrong_answers_get_their_diagnosis() -> None:
    def grows(distance, span, ramp):  # type: ignore[no-untyped-def]
        return torch.clamp((distance - _z(distance, span) + ramp) / ramp, min=0.0, max=1.0)

    def unclamped(distance, span, ramp):  # type: ignore[no-untyped-def]
        return 1 + (_z(distance, span) - distance) / ramp

    def step(distance, span, ramp):  # type: ignore[no-untyped-def]
        return torch.where(distance <= _z(distance, span), 1.0, 0.0).to(span.dtype)

    table = {grows: "wrong_sign", unclamped: "no_clamp", step: "hard_step"}
    for fn, name in table.items():
        report = ex.check_soft_span_mask(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_span_mask_agrees_with_the_library() -> None:
    d, z = torch.arange(20), torch.tensor([1.5, 7.25, 12.0])
    torch.testing.assert_close(ex.soft_span_mask(d, z, 5), span_mask(d, z, 5))


def test_keys_read_agrees_with_the_library() -> None:
    k, frac = ex.keys_read()
    assert k == span_window(torch.tensor([3.2, 9.5, 0.4]), 4, 32) and frac == k / 32
    assert ex.check_keys_read((14, 14 / 32)).passed
    assert ex.check_keys_read((9, 9 / 32)).mistake == "mean_span"
    assert ex.check_keys_read((14, 0.5)).mistake == "generic"


def test_sentinel_correct_answer_written_another_way_passes() -> None:
    def explicit(scores, sentinel_score, features, sentinel, key_mask=None):  # type: ignore[no-untyped-def]
        e = torch.exp(scores - torch.maximum(scores.amax(1), sentinel_score)[:, None])
        e_s = torch.exp(sentinel_score - torch.maximum(scores.amax(1), sentinel_score))
        if key_mask is not None:
            e = torch.where(key_mask, e, torch.zeros_like(e))
        total = e.sum(1) + e_s
        beta = e_s / total
        c = torch.einsum("bk,bkd->bd", e / total[:, None], features)
        return beta.unsqueeze(-1) * sentinel + c, beta

    assert ex.check_sentinel_context(explicit).passed


def test_sentinel_wrong_answers_get_their_diagnosis() -> None:
    def renormalised_twice(scores, sentinel_score, features, sentinel, key_mask=None):  # type: ignore[no-untyped-def]
        context, beta = ex.sentinel_context(scores, sentinel_score, features, sentinel, key_mask)
        feats = context - beta[:, None] * sentinel  # sum_i alpha_i v_i
        return beta[:, None] * sentinel + (1 - beta)[:, None] * feats, beta

    def swapped(scores, sentinel_score, features, sentinel, key_mask=None):  # type: ignore[no-untyped-def]
        context, beta = ex.sentinel_context(scores, sentinel_score, features, sentinel, key_mask)
        c = (context - beta[:, None] * sentinel) / (1 - beta)[:, None]
        return torch.lerp(sentinel, c, beta[:, None]), beta  # (1 - beta) s + beta c

    table = {renormalised_twice: "double_gate", swapped: "gate_inverted"}
    for fn, name in table.items():
        report = ex.check_sentinel_context(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_sentinel_agrees_with_the_library() -> None:
    torch.manual_seed(0)
    layer = SentinelAttention(6, 5)
    feats, h, s = torch.randn(3, 4, 6), torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[True, True, False, True], [False] * 4, [True] * 4])
    with torch.no_grad():
        g = layer.w_g(h)[:, None]
        scores = layer.w_h(torch.tanh(layer.w_v(feats) + g)).squeeze(-1)
        s_score = layer.w_h(torch.tanh(layer.w_s(s)[:, None] + g)).squeeze(-1)[:, 0]
        context, alpha = layer(feats, h, s, key_mask=mask)
        mine, beta = ex.sentinel_context(scores, s_score, feats, s, mask)
    torch.testing.assert_close(mine, context)
    torch.testing.assert_close(beta, alpha[:, -1])
