"""Chapter 3's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch
from einops import rearrange

from attn.exercises import multihead as ex
from attn.multihead import MultiHeadAttention


def test_split_heads_another_way_and_wrong_answers() -> None:
    assert ex.check_split_heads(lambda x, h: rearrange(x, "b n (h d) -> b h n d", h=h)).passed
    assert ex.check_split_heads(lambda x, h: torch.stack(x.chunk(h, dim=-1), dim=1)).passed
    table = {
        "view_without_transpose": lambda x, h: x.view(x.shape[0], h, x.shape[1], -1),
        "strided_heads": lambda x, h: rearrange(x, "b n (d h) -> b h n d", h=h),
        "no_transpose": lambda x, h: rearrange(x, "b n (h d) -> b n h d", h=h),
    }
    for name, fn in table.items():
        report = ex.check_split_heads(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def _heads_loop(x, W_q, W_k, W_v, W_o, h, key_mask=None, *, scale_width=None, linear=False,  # type: ignore[no-untyped-def]
                merge_view=False, project=True):
    """Head by head with einsum (the mistakes' code batches the heads)."""
    if linear:
        W_q, W_k, W_v, W_o = W_q.T, W_k.T, W_v.T, W_o.T
    E = x.shape[-1]
    d = E // h
    outs = []
    for i in range(h):
        cols = slice(i * d, (i + 1) * d)
        q, k, v = x @ W_q[:, cols], x @ W_k[:, cols], x @ W_v[:, cols]
        s = torch.einsum("bqd,bkd->bqk", q, k) / (scale_width or d) ** 0.5
        if key_mask is not None:
            s = torch.where(key_mask[:, None, :], s, torch.tensor(-1e30))
        outs.append(torch.softmax(s, -1) @ v)
    concat = torch.stack(outs, 1).reshape(x.shape) if merge_view else torch.cat(outs, -1)
    return concat @ W_o if project else concat


def test_multihead_forward_another_way_and_wrong_answers() -> None:
    assert ex.check_multihead_forward(_heads_loop).passed
    table = {
        "scale_by_E": lambda x, *a, **k: _heads_loop(x, *a, **k, scale_width=x.shape[-1]),
        "merge_without_transpose": lambda *a, **k: _heads_loop(*a, **k, merge_view=True),
        "linear_convention": lambda *a, **k: _heads_loop(*a, **k, linear=True),
        "no_output_projection": lambda *a, **k: _heads_loop(*a, **k, project=False),
        "mask_inverted": lambda x, q, k_, v, o, h, key_mask=None:
            _heads_loop(x, q, k_, v, o, h, None if key_mask is None else key_mask.logical_not()),
    }
    for name, fn in table.items():
        report = ex.check_multihead_forward(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_solution_agrees_with_the_library_layer() -> None:
    g = torch.Generator().manual_seed(5)
    layer = MultiHeadAttention(12, 3, bias=False).eval()
    x = torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        want = layer(x, key_mask=mask).output
        got = ex.multihead_forward(x, layer.q_proj.weight.T, layer.k_proj.weight.T, layer.v_proj.weight.T,
                                   layer.out_proj.weight.T, 3, mask)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(ex.split_heads(x, 3), layer.split_heads(x))


def test_parameter_count() -> None:
    count = sum(p.numel() for p in MultiHeadAttention(512, 8).parameters())
    assert ex.mha_parameters() == count
    assert ex.check_mha_parameters(count).passed
    assert ex.check_mha_parameters(sum(p.numel() for p in MultiHeadAttention(512, 16).parameters())).passed
    assert ex.check_mha_parameters(4 * 512**2).mistake == "no_bias"
    assert ex.check_mha_parameters(1_000_000).mistake == "generic"
