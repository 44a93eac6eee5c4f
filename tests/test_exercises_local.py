"""Chapter 8's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.exercises import local as ex
from attn.experiments.local import reach
from attn.local import local_attention
from attn.masks import band_mask as library_band_mask


def test_solutions_agree_with_the_library() -> None:
    for n, w, causal in ((10, 2, False), (10, 3, True), (5, 8, True), (7, 0, False)):
        assert torch.equal(ex.band_mask(n, w, causal), library_band_mask(n, w, causal))
    assert ex.receptive_field() == int(reach(24, 4, 3, causal=True)[17].sum())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g) for _ in range(3))
    ref = local_attention(q, k, v, 4, causal=True, blockwise=True).output
    assert torch.allclose(ex.blockwise_local(q, k, v, 4), ref, atol=1e-5)


def _band_loop(n, w, causal=False, lo=None, hi=None, invert=False):  # type: ignore[no-untyped-def]
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            d = i - j
            a = (0 if causal else -w) if lo is None else lo
            b = w if hi is None else hi
            out[i, j] = (a <= d <= b) != invert
    return out


def test_band_mask_right_and_wrong_answers() -> None:
    assert ex.check_band_mask(_band_loop).passed
    table = {
        "inverted": lambda n, w, causal=False: _band_loop(n, w, causal, invert=True),
        "too_narrow": lambda n, w, causal=False: _band_loop(n, w, causal, lo=0 if causal else 1 - w, hi=w - 1),
        "causal_future": lambda n, w, causal=False: _band_loop(n, w, causal, lo=-w, hi=0 if causal else w),
        "causal_ignored": lambda n, w, causal=False: torch.ones(n, n).triu(-w).tril(w).bool(),
        "causal_w_keys": lambda n, w, causal=False: _band_loop(n, w, causal, lo=1 if causal else -w),
    }
    for name, fn in table.items():
        report = ex.check_band_mask(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_receptive_field_values() -> None:
    assert ex.check_receptive_field(13).passed
    assert ex.check_receptive_field(12).mistake == "without_itself"
    assert ex.check_receptive_field(25).mistake == "two_sided"
    assert ex.check_receptive_field(9).mistake == "generic"


def _dense_local(q, k, v, w, lo=0, hi=None, scale=True, fill=float("-inf"), pad_zero_keys=False):  # type: ignore[no-untyped-def]
    """A dense reference with the bug, computed on the n x n scores (not blockwise)."""
    n, d = q.shape[-2], q.shape[-1]
    hi = w if hi is None else hi
    if pad_zero_keys:  # w zero keys/values in front: the band reaches them from queries i < w
        k = torch.cat([torch.zeros_like(k[..., :w, :]), k], -2)
        v = torch.cat([torch.zeros_like(v[..., :w, :]), v], -2)
    m = k.shape[-2]
    s = torch.einsum("...id,...jd->...ij", q, k) * (d ** -0.5 if scale else 1.0)
    diff = torch.arange(n)[:, None] + (m - n) - torch.arange(m)[None, :]
    keep = (diff >= lo) & (diff <= hi)
    s = torch.where(keep, s, torch.tensor(fill))
    return torch.einsum("...ij,...jd->...id", s.softmax(-1), v)


def test_blockwise_right_and_wrong_answers() -> None:
    assert ex.check_blockwise_local(_dense_local).passed
    table = {
        "no_scale": lambda q, k, v, w: _dense_local(q, k, v, w, scale=False),
        "window_w_keys": lambda q, k, v, w: _dense_local(q, k, v, w, hi=w - 1),
        "padding_attended": lambda q, k, v, w: _dense_local(q, k, v, w, pad_zero_keys=True),
    }
    for name, fn in table.items():
        report = ex.check_blockwise_local(fn)
        assert not report.passed and report.mistake == name, (name, report.text())
    # the block-aligned window: the library's own exact_band=False
    aligned = ex.check_blockwise_local(
        lambda q, k, v, w: local_attention(q, k, v, w, causal=True, exact_band=False).output)
    assert aligned.mistake == "block_aligned", aligned.text()
