"""Chapter 11's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from attn.axial import axis_attention
from attn.exercises import axial as ex


def test_a_correct_answer_written_another_way_passes() -> None:
    def mine(q, k, v):  # type: ignore[no-untyped-def]
        s = torch.einsum("bijd,bmjd->bjim", q, k) / q.shape[-1] ** 0.5  # (B, W, H, H): query row i, key row m
        return torch.einsum("bjim,bmjd->bijd", s.softmax(-1), v)

    assert ex.check_column_attention(mine).passed


def test_wrong_answers_get_their_diagnosis() -> None:
    def bare_view(q, k, v):  # type: ignore[no-untyped-def]
        b, h, w, d = q.shape
        out = F.scaled_dot_product_attention(*(t.contiguous().view(b * w, h, d) for t in (q, k, v)))
        return out.view(b, h, w, d)

    def along_rows(q, k, v):  # type: ignore[no-untyped-def]
        return F.scaled_dot_product_attention(q, k, v)

    def unscaled(q, k, v):  # type: ignore[no-untyped-def]
        seq = lambda t: rearrange(t, "b h w d -> (b w) h d")  # noqa: E731
        out = F.scaled_dot_product_attention(seq(q), seq(k), seq(v), scale=1.0)
        return rearrange(out, "(b w) h d -> b h w d", b=q.shape[0])

    table = {bare_view: "reshape_without_permute", along_rows: "row_pass", unscaled: "no_scale"}
    for fn, name in table.items():
        report = ex.check_column_attention(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_the_solution_agrees_with_the_library() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    lib = axis_attention(q[:, None], k[:, None], v[:, None], "col").output[:, 0]  # one head
    torch.testing.assert_close(ex.column_attention(q, k, v), lib)


def test_values() -> None:
    assert ex.check_receptive_field((8, 48)).passed
    assert ex.check_receptive_field((8, 13)).mistake == "cross"
    assert ex.check_receptive_field((8, 47)).mistake == "generic"
    assert ex.check_cost_ratio(2048 / 96).passed
    assert ex.check_cost_ratio(32.0).mistake == "row_pass_only"
    assert ex.check_cost_ratio(20.0).mistake == "generic"
