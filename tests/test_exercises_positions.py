"""Chapter 28's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import math

import torch

from attn.exercises import positions as ex
from attn.positions import RotaryEmbedding, alibi_bias, alibi_slopes


def _rope_complex(x, positions, base=10000.0, *, interleaved=False, conj=False):  # type: ignore[no-untyped-def]
    """RoPE as a complex multiplication, z_i = x_i + i x_{i+d/2} (or x_2i + i x_2i+1) times e^{i p w_i}."""
    d = x.shape[-1]
    w = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    phase = torch.polar(torch.ones(len(positions), d // 2, dtype=torch.float64),
                        positions.double()[:, None] * w)
    if conj:
        phase = phase.conj()
    if interleaved:
        z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
        return torch.view_as_real(z * phase).flatten(-2).to(x.dtype)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    out = z * phase
    return torch.cat([out.real, out.imag], -1).to(x.dtype)


def test_rope_right_and_wrong() -> None:
    assert ex.check_rope_rotate(_rope_complex).passed
    table = {
        "interleaved": lambda x, p, base=10000.0: _rope_complex(x, p, base, interleaved=True),
        "wrong_direction": lambda x, p, base=10000.0: _rope_complex(x, p, base, conj=True),
        "base_ignored": lambda x, p, base=10000.0: _rope_complex(x, p),
    }
    for name, fn in table.items():
        report = ex.check_rope_rotate(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_rope_matches_the_library() -> None:
    for case in ex.ROPE_ROTATE.inputs():
        x, positions = case.args
        base = case.kwargs.get("base", 10000.0)
        lib = RotaryEmbedding(x.shape[-1], base)(x, positions)
        torch.testing.assert_close(ex.rope_rotate(x, positions, base), lib, atol=1e-5, rtol=1e-4)


def _alibi_loop(n, num_heads, *, sign=-1.0, reverse=False):  # type: ignore[no-untyped-def]
    out = torch.full((num_heads, n, n), -math.inf)
    for h in range(num_heads):
        hh = num_heads - 1 - h if reverse else h
        m = 2 ** (-8 * (hh + 1) / num_heads)
        for i in range(n):
            for j in range(i + 1):
                out[h, i, j] = sign * m * (i - j)
    return out


def test_alibi_right_and_wrong() -> None:
    assert ex.check_alibi_causal_bias(_alibi_loop).passed
    table = {
        "positive_sign": lambda n, h: _alibi_loop(n, h, sign=1.0),
        "slopes_reversed": lambda n, h: _alibi_loop(n, h, reverse=True),
    }
    for name, fn in table.items():
        report = ex.check_alibi_causal_bias(fn)
        assert not report.passed and report.mistake == name, (name, report.text())
    no_mask = ex.check_alibi_causal_bias(lambda n, h: _alibi_loop(n, h).nan_to_num(neginf=-1e9))
    assert not no_mask.passed


def test_alibi_matches_the_library() -> None:
    for case in ex.ALIBI_CAUSAL_BIAS.inputs():
        n, h = case.args
        torch.testing.assert_close(ex.alibi_causal_bias(n, h), alibi_bias(n, n, alibi_slopes(h)))


def test_same_score() -> None:
    assert ex.check_same_rope_score("a").passed and ex.check_same_rope_score(" A ").passed
    assert ex.check_same_rope_score("b").mistake == "swapped"
    assert ex.check_same_rope_score("e").mistake == "generic"
    # the solution's numerical check, independently: shifting both positions keeps the score
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 8, dtype=torch.float64), torch.randn(1, 8, dtype=torch.float64)
    s = [float(rope(q, torch.tensor([m])) @ rope(k, torch.tensor([n]))[0]) for m, n in ((3, 1), (13, 11), (1, 3))]
    assert math.isclose(s[0], s[1], abs_tol=1e-9) and not math.isclose(s[0], s[2], abs_tol=1e-6)


def test_rope_in_float32_passes() -> None:
    def f32(x, positions, base=10000.0):  # type: ignore[no-untyped-def]
        d = x.shape[-1]
        angle = positions.float()[:, None] / base ** (torch.arange(0, d, 2).float() / d)
        angle = torch.cat([angle, angle], -1)
        x1, x2 = x.chunk(2, -1)
        return x * angle.cos() + torch.cat([-x2, x1], -1) * angle.sin()

    assert ex.check_rope_rotate(f32).passed
