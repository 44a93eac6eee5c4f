"""Chapter 26's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn import linear as lib
from attn.exercises import linear as ex
from attn.experiments.linear import state_and_cache_bytes


def _phi(x):  # type: ignore[no-untyped-def]
    return torch.where(x > 0, x + 1, x.exp())  # elu(x) + 1, written out


def test_recurrence_a_correct_answer_written_another_way_passes() -> None:
    def mine(q, k, v):  # type: ignore[no-untyped-def]
        fq, fk = _phi(q), _phi(k)
        u = torch.cumsum(torch.einsum("...nd,...ne->...nde", fk, v), dim=-3)  # U_i for every i
        z = torch.cumsum(fk, dim=-2)
        return torch.einsum("...nd,...nde->...ne", fq, u) / (fq * z).sum(-1, keepdim=True)

    assert ex.check_causal_linear_attention(mine).passed


def test_recurrence_wrong_answers_get_their_diagnosis() -> None:
    def loop(q, k, v, phi, normalise=True, causal=True, write_first=True):  # type: ignore[no-untyped-def]
        fq, fk = phi(q), phi(k)
        total_u = torch.einsum("...nd,...ne->...de", fk, v)
        total_z = fk.sum(-2)
        u = torch.zeros_like(total_u)
        z = torch.zeros_like(total_z)
        ys = []
        for i in range(q.shape[-2]):
            if write_first:
                u, z = u + torch.einsum("...d,...e->...de", fk[..., i, :], v[..., i, :]), z + fk[..., i, :]
            uu, zz = (u, z) if causal else (total_u, total_z)
            num = torch.einsum("...d,...de->...e", fq[..., i, :], uu)
            ys.append(num / (fq[..., i, :] * zz).sum(-1, keepdim=True) if normalise else num)
            if not write_first:
                u, z = u + torch.einsum("...d,...e->...de", fk[..., i, :], v[..., i, :]), z + fk[..., i, :]
        return torch.stack(ys, -2)

    table = {
        (lambda q, k, v: loop(q, k, v, F.elu)): "elu_without_one",
        (lambda q, k, v: loop(q, k, v, _phi, normalise=False)): "no_normaliser",
        (lambda q, k, v: loop(q, k, v, _phi, causal=False)): "not_causal",
        (lambda q, k, v: loop(q, k, v, _phi, write_first=False)): "read_before_write",
    }
    for fn, name in table.items():
        report = ex.check_causal_linear_attention(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_recurrence_agrees_with_the_library() -> None:
    for case in ex.CAUSAL_LINEAR_ATTENTION.inputs():
        q, k, v = case.args
        torch.testing.assert_close(ex.causal_linear_attention(q, k, v), lib.linear_attention_recurrent(q, k, v))
        torch.testing.assert_close(ex.causal_linear_attention(q, k, v), lib.linear_attention(q, k, v, causal=True))


def test_delta_a_correct_answer_written_another_way_passes() -> None:
    def mine(state, k, v, beta):  # type: ignore[no-untyped-def]
        err = v - torch.einsum("...ij,...j->...i", state, k)
        return state + torch.einsum("...,...i,...j->...ij", beta, err, k)

    assert ex.check_delta_update(mine).passed


def test_delta_wrong_answers_get_their_diagnosis() -> None:
    def plain(state, k, v, beta):  # type: ignore[no-untyped-def]
        return state + torch.einsum("...,...i,...j->...ij", beta, v, k)

    def flipped(state, k, v, beta):  # type: ignore[no-untyped-def]
        err = torch.einsum("...ij,...j->...i", state, k) - v
        return state + torch.einsum("...,...i,...j->...ij", beta, err, k)

    def column_row_swapped(state, k, v, beta):  # type: ignore[no-untyped-def]
        err = v - torch.einsum("...ij,...j->...i", state, k)
        return state + torch.einsum("...,...i,...j->...ij", beta, k, err)

    def reads_transpose(state, k, v, beta):  # type: ignore[no-untyped-def]
        err = v - torch.einsum("...ji,...j->...i", state, k)
        return state + torch.einsum("...,...i,...j->...ij", beta, err, k)

    table = {plain: "additive", flipped: "error_sign", column_row_swapped: "outer_transposed",
             reads_transpose: "recall_transposed"}
    for fn, name in table.items():
        report = ex.check_delta_update(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_delta_agrees_with_the_library_and_writes_exactly_at_beta_one() -> None:
    for case in ex.DELTA_UPDATE.inputs():
        state, k, v, beta = case.args
        q = torch.randn(k.shape, dtype=k.dtype)
        _, new = lib.delta_rule_step(state, q, k, v, beta)
        torch.testing.assert_close(ex.delta_update(state, k, v, beta), new)
    state, k, v, beta = ex.DELTA_UPDATE.inputs()[-1].args
    torch.testing.assert_close(ex.delta_update(state, k, v, beta) @ k, v)


def test_break_even_tokens() -> None:
    assert ex.check_break_even_tokens(64.5).passed
    sizes = state_and_cache_bytes(4096, 32, 32, tokens=65)
    assert sizes["kv_cache"] > sizes["linear_state"] > state_and_cache_bytes(4096, 32, 32, tokens=64)["kv_cache"]
    assert ex.check_break_even_tokens(64).mistake == "no_normaliser_state"
    assert ex.check_break_even_tokens(100).mistake == "generic"
