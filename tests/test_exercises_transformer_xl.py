"""Chapter 14's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attn.exercises import transformer_xl as ex
from attn.transformer_xl import rel_shift as library_rel_shift


def _loop_shift(x: torch.Tensor, move: int) -> torch.Tensor:
    """Row ``i`` reads column ``j + L - move - i`` (``move = 1`` is right); zeros outside."""
    length, keys = x.shape[-2:]
    out = torch.zeros_like(x)
    for i in range(length):
        for j in range(keys):
            c = j + length - move - i
            if 0 <= c < keys:
                out[..., i, j] = x[..., i, c]
    return out


def test_rel_shift_written_another_way_passes_and_matches_the_library() -> None:
    def by_roll(x):  # type: ignore[no-untyped-def]
        length = x.shape[-2]
        rows = [torch.roll(x[..., i, :], -(length - 1 - i), dims=-1) for i in range(length)]
        return torch.stack(rows, dim=-2)

    assert ex.check_rel_shift(by_roll).passed
    assert ex.check_rel_shift(lambda x: _loop_shift(x, 1)).passed
    x = torch.randn(2, 3, 5, 9)
    assert torch.equal(ex.rel_shift(x), library_rel_shift(x))


def test_rel_shift_wrong_answers_get_their_diagnosis() -> None:
    def pad_right(x):  # type: ignore[no-untyped-def]
        *lead, length, keys = x.shape
        z = torch.cat([x, x.new_zeros(*lead, length, 1)], dim=-1)  # (..., L, K + 1)
        return z.reshape(*lead, -1)[..., : length * keys].reshape(*lead, length, keys)

    def wrong_way(x):  # type: ignore[no-untyped-def]
        length, keys = x.shape[-2:]
        out = torch.zeros_like(x)
        for i in range(length):
            s = length - 1 - i
            out[..., i, s:] = x[..., i, : keys - s]
        return out

    table = {
        (lambda x: _loop_shift(x, 0)): "off_by_one",
        wrong_way: "wrong_direction",
        (lambda x: x + 0): "no_shift",
        pad_right: "pad_right",
    }
    for fn, name in table.items():
        report = ex.check_rel_shift(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def _sdpa_memory(prev, cur, w_h, w_q, w_k, w_v, detach=True):  # type: ignore[no-untyped-def]
    m = torch.tanh(torch.einsum("bme,ef->bmf", prev, w_h))
    h = torch.tanh(torch.einsum("ble,ef->blf", cur, w_h))
    ext = torch.cat((m.detach() if detach else m, h), 1)
    M, L = prev.shape[1], cur.shape[1]
    mask = torch.arange(M + L)[None, :] <= M + torch.arange(L)[:, None]
    return F.scaled_dot_product_attention(h @ w_q, ext @ w_k, ext @ w_v, attn_mask=mask)


def test_memory_attention_matches_sdpa_and_passes() -> None:
    assert ex.check_attend_with_memory(_sdpa_memory).passed
    case = ex.ATTEND_WITH_MEMORY.inputs()[1]
    torch.testing.assert_close(ex.attend_with_memory(*case.args), _sdpa_memory(*case.args))


def test_memory_attention_wrong_answers_get_their_diagnosis() -> None:
    def no_sg(*a):  # type: ignore[no-untyped-def]
        return _sdpa_memory(*a, detach=False)

    def segment_first(prev, cur, w_h, w_q, w_k, w_v):  # type: ignore[no-untyped-def]
        m, h = torch.tanh(prev @ w_h).detach(), torch.tanh(cur @ w_h)
        ext = torch.cat((h, m), 1)
        M, L = prev.shape[1], cur.shape[1]
        mask = torch.arange(M + L)[None, :] <= M + torch.arange(L)[:, None]
        return F.scaled_dot_product_attention(h @ w_q, ext @ w_k, ext @ w_v, attn_mask=mask)

    def tril_zero(prev, cur, w_h, w_q, w_k, w_v):  # type: ignore[no-untyped-def]
        m, h = torch.tanh(prev @ w_h).detach(), torch.tanh(cur @ w_h)
        ext = torch.cat((m, h), 1)
        s = torch.einsum("bld,bkd->blk", h @ w_q, ext @ w_k) / math.sqrt(w_q.shape[1])
        s = torch.where(torch.arange(ext.shape[1])[None, :] <= torch.arange(h.shape[1])[:, None], s, -1e30)
        return s.softmax(-1) @ (ext @ w_v)

    table = {no_sg: "no_stop_gradient", segment_first: "memory_after_segment", tril_zero: "causal_from_zero"}
    for fn, name in table.items():
        report = ex.check_attend_with_memory(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_distance_term_values() -> None:
    assert ex.check_distance_term("d").passed
    assert ex.check_distance_term("(d)").passed
    assert ex.check_distance_term("B").mistake == "content_position"
    assert ex.check_distance_term(4).mistake == "generic"
