"""Chapter 4's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.benchmark import count_flops
from attn.cross import CrossAttention
from attn.exercises import cross as ex


def _einsum_cross(x, c, W_q, W_k, W_v, key_mask=None, *, invert=False, use_mask=True, dim=-1,  # type: ignore[no-untyped-def]
                  width=None, swap=False):
    """einsum and torch.where (the mistakes' code uses @ and masked_fill)."""
    q = torch.einsum("ble,ek->blk", x, W_q)
    k = torch.einsum("bsc,ck->bsk", c, W_v if swap else W_k)
    v = torch.einsum("bsc,ck->bsk", c, W_k if swap else W_v)
    s = torch.einsum("blk,bsk->bls", q, k) * (width or q.shape[-1]) ** -0.5
    if key_mask is not None and use_mask:
        keep = key_mask.logical_not() if invert else key_mask
        s = torch.where(keep.unsqueeze(1), s, torch.tensor(float("-inf")))
    return torch.einsum("bls,bsk->blk", s.softmax(dim), v)


def test_cross_attention_another_way_and_wrong_answers() -> None:
    assert ex.check_cross_attention(_einsum_cross).passed
    table = {
        "softmax_over_queries": lambda *a, **k: _einsum_cross(*a, **k, dim=1),
        "mask_inverted": lambda *a, **k: _einsum_cross(*a, **k, invert=True),
        "mask_ignored": lambda *a, **k: _einsum_cross(*a, **k, use_mask=False),
        "scale_by_input_width": lambda x, *a, **k: _einsum_cross(x, *a, **k, width=x.shape[-1]),
        "keys_values_swapped": lambda *a, **k: _einsum_cross(*a, **k, swap=True),
    }
    for name, fn in table.items():
        report = ex.check_cross_attention(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_keys_from_the_target_and_a_mask_on_the_queries_are_refused() -> None:
    def self_attention(x, c, W_q, W_k, W_v, key_mask=None):  # type: ignore[no-untyped-def]
        return _einsum_cross(x, x, W_q, W_q, W_q)  # keys and values from the wrong sequence

    def mask_on_queries(x, c, W_q, W_k, W_v, key_mask=None):  # type: ignore[no-untyped-def]
        out = _einsum_cross(x, c, W_q, W_k, W_v)
        return out if key_mask is None else out.masked_fill(~key_mask[:, :, None], 0.0)

    for fn in (self_attention, mask_on_queries):
        report = ex.check_cross_attention(fn)
        assert not report.passed and report.mistake == "generic", report.text()


def test_solution_agrees_with_the_library_layer() -> None:
    g = torch.Generator().manual_seed(7)
    layer = CrossAttention(8, 1, kdim=6, bias=False).eval()
    x, c = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        want = layer(x, c, key_mask=mask).output
        got = ex.cross_attention(x, c, layer.q_proj.weight.T, layer.k_proj.weight.T, layer.v_proj.weight.T, mask)
        torch.testing.assert_close(got @ layer.out_proj.weight.T, want)


def test_values_against_the_layer() -> None:
    layer = CrossAttention(32, 4, kdim=48)
    out = layer(torch.randn(2, 7, 32), torch.randn(2, 11, 48), need_weights=True)
    assert ex.check_cross_shapes((out.weights.shape, out.output.shape)).passed
    assert ex.check_cross_shapes(((2, 4, 7, 11), (2, 7, 48))).mistake == "output_in_memory_space"
    assert ex.check_cross_shapes(((2, 7, 11), (2, 7, 32))).mistake == "generic"

    m = CrossAttention(64, 4, kdim=64)
    memory, step = torch.randn(1, 100, 64), torch.randn(1, 1, 64)
    with torch.no_grad():
        cache = m.encode_memory(memory)
        flops = count_flops(lambda: m.encode_memory(memory)) + 20 * count_flops(lambda: m(step, cache=cache))
    assert ex.check_cached_decoding_flops(flops).passed
    assert ex.check_cached_decoding_flops(flops // 2).mistake == "multiply_adds"
