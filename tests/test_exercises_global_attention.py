"""Chapter 5's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.exercises import global_attention as ex
from attn.global_attention import ConcatAttention, global_mask
from attn.soft import MultiplicativeAttention


def _loop_mask(n, global_idx, window, *, rows=True, cols=True, lo=0):  # type: ignore[no-untyped-def]
    """Entry by entry (the mistakes' code is vectorised)."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            near = lo <= abs(i - j) <= window if lo == 0 else abs(i - j) < window
            m[i, j] = near or (rows and i in global_idx) or (cols and j in global_idx)
    return m


def test_global_token_mask_another_way_and_wrong_answers() -> None:
    assert ex.check_global_token_mask(_loop_mask).passed
    assert ex.check_global_token_mask(lambda n, idx, w: global_mask(n, idx, w)).passed
    table = {
        "rows_only": lambda *a: _loop_mask(*a, cols=False),
        "columns_only": lambda *a: _loop_mask(*a, rows=False),
        "strict_window": lambda *a: _loop_mask(*a, lo=1),
        "two_sided_window": lambda n, idx, w: _loop_mask(n, idx, w // 2),
        "mask_inverted": lambda *a: _loop_mask(*a).logical_not(),
    }
    for name, fn in table.items():
        report = ex.check_global_token_mask(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def _einsum_score(h_t, h_s, kind, W_a=None, v_a=None, *, transposed=False, swapped=False, tanh=True):  # type: ignore[no-untyped-def]
    """einsum and an explicit concatenation (the mistakes' code splits W_a)."""
    if kind == "dot":
        return torch.einsum("btd,bsd->bts", h_t, h_s)
    if kind == "general":
        return torch.einsum("btd,ed,bse->bts" if transposed else "btd,de,bse->bts", h_t, W_a, h_s)
    T, S = h_t.shape[1], h_s.shape[1]
    a = h_t[:, :, None, :].expand(-1, -1, S, -1)
    b = h_s[:, None, :, :].expand(-1, T, -1, -1)
    pair = torch.cat([b, a] if swapped else [a, b], dim=-1)  # (B, T, S, 2d)
    pre = torch.einsum("btsc,ac->btsa", pair, W_a)
    return torch.einsum("btsa,a->bts", pre.tanh() if tanh else pre, v_a)


def test_luong_score_another_way_and_wrong_answers() -> None:
    assert ex.check_luong_score(_einsum_score).passed
    table = {
        "general_transposed": lambda *a: _einsum_score(*a, transposed=True),
        "concat_order_swapped": lambda *a: _einsum_score(*a, swapped=True),
        "concat_no_tanh": lambda *a: _einsum_score(*a, tanh=False),
        "softmaxed": lambda *a: _einsum_score(*a).softmax(-1),
    }
    for name, fn in table.items():
        report = ex.check_luong_score(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_solutions_agree_with_the_library() -> None:
    g = torch.Generator().manual_seed(11)
    h_t, h_s = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    concat, general = ConcatAttention(4, 4, hidden=6), MultiplicativeAttention(4, 4, "general")
    with torch.no_grad():
        torch.testing.assert_close(ex.luong_score(h_t, h_s, "concat", concat.w.weight, concat.v.weight[0]),
                                   concat.scores(h_t, h_s))
        torch.testing.assert_close(ex.luong_score(h_t, h_s, "general", general.w.weight), general.scores(h_t, h_s))
    assert torch.equal(ex.global_token_mask(32, [0, 16], 4), global_mask(32, [0, 16], 4))


def test_scored_pairs() -> None:
    n_global = 2  # the explorer's global positions for "global tokens" = 2
    gidx = list(range(0, 32, 32 // n_global))[:n_global]
    assert ex.check_scored_pairs(int(global_mask(32, gidx, 4).sum())).passed
    assert ex.check_scored_pairs(394).mistake == "formula"
    assert ex.check_scored_pairs(365).mistake == "generic"
