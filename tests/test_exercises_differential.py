"""Chapter 30's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import math

import torch

from attn.differential import DifferentialAttention, SinkCache, lambda_init
from attn.exercises import differential as ex


def _lam(lq1, lk1, lq2, lk2, layer, *, init=None):  # type: ignore[no-untyped-def]
    a = (lq1 * lk1).sum().exp()
    b = (lq2 * lk2).sum().exp()
    return a - b + (lambda_init(layer) if init is None else init)


def test_lambda_right_and_wrong() -> None:
    assert ex.check_differential_lambda(_lam).passed
    table = {
        "swapped_sign": lambda lq1, lk1, lq2, lk2, layer: _lam(lq2, lk2, lq1, lk1, layer),
        "no_lambda_init": lambda *a: _lam(*a, init=0.0),
        "zero_based_layer": lambda *a: _lam(*a, init=lambda_init(a[-1] + 1)),
    }
    for name, fn in table.items():
        report = ex.check_differential_lambda(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_lambda_matches_the_layer() -> None:
    layer = DifferentialAttention(32, 2, layer_index=4)
    with torch.no_grad():
        ours = ex.differential_lambda(layer.lambda_q1, layer.lambda_k1, layer.lambda_q2, layer.lambda_k2, 4)
        torch.testing.assert_close(ours, layer.lam())


def _weights(q1, k1, q2, k2, lam, causal=False, *, sign=-1.0, hide=True):  # type: ignore[no-untyped-def]
    def one(q, k):  # type: ignore[no-untyped-def]
        s = torch.einsum("...id,...jd->...ij", q, k) * q.shape[-1] ** -0.5
        if causal and hide:
            n = s.shape[-1]
            s = torch.where(torch.arange(n)[None, :] > torch.arange(n)[:, None], -1e30, s)
        e = (s - s.amax(-1, keepdim=True)).exp()
        return e / e.sum(-1, keepdim=True)

    return one(q1, k1) + sign * lam * one(q2, k2)


def test_weights_right_and_wrong() -> None:
    assert ex.check_differential_weights(_weights).passed
    table = {
        "plus_lambda": lambda *a, **k: _weights(*a, **k, sign=1.0),
        "no_causal_mask": lambda *a, **k: _weights(*a, **k, hide=False),
    }
    for name, fn in table.items():
        report = ex.check_differential_weights(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_weights_match_the_layer() -> None:
    torch.manual_seed(0)
    layer = DifferentialAttention(32, 2, causal=True)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        a1, a2, lam = layer.maps(x)
        q1, q2, k1, k2, _ = layer._qkv(x)
        ours = ex.differential_weights(q1, k1, q2, k2, float(lam), causal=True)
        torch.testing.assert_close(ours, a1 - lam * a2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours, layer(x, need_weights=True).weights, atol=1e-5, rtol=1e-4)


def _window_list(n_tokens, window, sinks, *, drop_sinks=False):  # type: ignore[no-untyped-def]
    kept: list[int] = []
    for t in range(n_tokens):  # simulate the cache token by token
        kept.append(t)
        if len(kept) > window:
            del kept[0 if drop_sinks else sinks]
    return torch.tensor(kept, dtype=torch.long)


def test_window_right_and_wrong() -> None:
    assert ex.check_sink_window(_window_list).passed
    report = ex.check_sink_window(lambda *a: _window_list(*a, drop_sinks=True))
    assert not report.passed and report.mistake == "sinks_dropped", report.text()


def test_window_matches_the_sink_cache() -> None:
    for case in ex.SINK_WINDOW.inputs():
        n, w, s = case.args
        cache = SinkCache(1, w, s)
        for t in range(n):  # each token's "key" is its index
            k, _ = cache.append(0, torch.full((1, 1, 1, 1), float(t)), torch.zeros(1, 1, 1, 1))
        assert torch.equal(k.flatten().long(), ex.sink_window(n, w, s)), case.args


def test_first_token_mass() -> None:
    assert ex.check_first_token_mass(sum(1 / t for t in range(1, 17))).passed
    assert ex.check_first_token_mass(math.log(16)).mistake == "log_n"
    assert ex.check_first_token_mass(2.0).mistake == "generic"
