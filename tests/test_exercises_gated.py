"""Chapter 20's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn import gated as lib
from attn.exercises import gated as ex


def test_gated_attention_agrees_with_the_library() -> None:
    torch.manual_seed(0)
    layer = lib.GatedAttention(8, 1, bias=False)
    x = torch.randn(2, 5, 8)
    wq, wk, wv = layer.q_proj.weight.T, layer.k_proj.weight.T, layer.v_proj.weight.T
    assert layer.gate_proj is not None
    with torch.no_grad():
        layer.gate_proj.bias.zero_()
        expected = layer(x).output
        ours = ex.gated_attention(x, wq, wk, wv, layer.gate_proj.weight.T) @ layer.out_proj.weight.T
    torch.testing.assert_close(ours, expected)


def test_gated_attention_written_another_way_passes() -> None:
    def mine(x, wq, wk, wv, wg):  # type: ignore[no-untyped-def]
        o = F.scaled_dot_product_attention(x @ wq, x @ wk, x @ wv)
        return o / (1 + torch.exp(-torch.einsum("bne,ed->bnd", x, wg)))

    assert ex.check_gated_attention(mine).passed


def test_gated_attention_wrong_answers_get_their_diagnosis() -> None:
    def gated_values(x, wq, wk, wv, wg):  # type: ignore[no-untyped-def]
        v = torch.einsum("bne,ed->bnd", x, wv) * F.sigmoid(torch.einsum("bne,ed->bnd", x, wg))
        return F.scaled_dot_product_attention(x @ wq, x @ wk, v)

    def tanh(x, wq, wk, wv, wg):  # type: ignore[no-untyped-def]
        return F.scaled_dot_product_attention(x @ wq, x @ wk, x @ wv) * (2 * torch.sigmoid(2 * x @ wg) - 1)

    def unscaled(x, wq, wk, wv, wg):  # type: ignore[no-untyped-def]
        o = F.scaled_dot_product_attention(x @ wq, x @ wk, x @ wv, scale=1.0)
        return o * torch.sigmoid(x @ wg)

    table = {gated_values: "gate_on_values", tanh: "tanh_gate", unscaled: "no_scale"}
    for fn, name in table.items():
        report = ex.check_gated_attention(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_gau_weights_agree_with_the_library() -> None:
    torch.manual_seed(0)
    gau = lib.GatedAttentionUnit(8, qk_dim=4)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    for m in (None, mask):
        with torch.no_grad():
            _, _, expected = gau.uva(x, m)
            z = F.silu(gau.uvz(x))[..., -4:]
            q, k = z * gau.gamma[0] + gau.beta[0], z * gau.gamma[1] + gau.beta[1]
        torch.testing.assert_close(ex.gau_weights(q, k, m), expected)


def test_gau_weights_written_another_way_passes() -> None:
    def mine(q, k, key_mask=None):  # type: ignore[no-untyped-def]
        n = torch.full(q.shape[:1], k.shape[1]) if key_mask is None else key_mask.sum(1)
        s = torch.einsum("bis,bjs->bij", q, k) / n.view(-1, 1, 1)
        a = s.clamp_min(0).pow(2)
        return a if key_mask is None else a * key_mask.unsqueeze(1)

    assert ex.check_gau_weights(mine).passed


def test_gau_weights_wrong_answers_get_their_diagnosis() -> None:
    def late_division(q, k, key_mask=None):  # type: ignore[no-untyped-def]
        n = torch.full(q.shape[:1], k.shape[1]) if key_mask is None else key_mask.sum(1)
        a = torch.einsum("bis,bjs->bij", q, k).clamp_min(0).pow(2) / n.view(-1, 1, 1)
        return a if key_mask is None else a * key_mask.unsqueeze(1)

    def full_length(q, k, key_mask=None):  # type: ignore[no-untyped-def]
        a = F.relu(torch.einsum("bis,bjs->bij", q, k) / k.shape[1]).square()
        return a if key_mask is None else torch.where(key_mask[:, None], a, 0.0)

    def no_relu(q, k, key_mask=None):  # type: ignore[no-untyped-def]
        n = torch.full(q.shape[:1], k.shape[1]) if key_mask is None else key_mask.sum(1)
        a = (torch.einsum("bis,bjs->bij", q, k) / n.view(-1, 1, 1)).square()
        return a if key_mask is None else a * key_mask.unsqueeze(1)

    table = {late_division: "divide_after_square", full_length: "padded_length", no_relu: "square_before_relu"}
    for fn, name in table.items():
        report = ex.check_gau_weights(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_gau_row_sum_ratio_values() -> None:
    assert ex.check_gau_row_sum_ratio(64 / 128).passed
    assert ex.check_gau_row_sum_ratio(1 / 4).mistake == "one_weight"
    assert ex.check_gau_row_sum_ratio(1 / 8).mistake == "generic"
