"""Chapter 15's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import math

import torch

from attn.exercises import memory_attention as ex
from attn.memory_attention import PersistentMemoryAttention, knn_attention_dense
from attn.memory_attention import knn_attention as library_knn


def _dense_top(q, keys, values, top_k, pick=None, scale=True, renorm=True):  # type: ignore[no-untyped-def]
    """A dense version with a loop over the queries: rank by ``pick`` (default the scores)."""
    s = torch.einsum("bhld,bhsd->bhls", q, keys) * (q.shape[-1] ** -0.5 if scale else 1.0)
    rank = s if pick is None else pick
    out = torch.zeros(*q.shape[:-1], values.shape[-1])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                idx = torch.argsort(rank[b, h, i], descending=True)[:top_k]
                w = torch.softmax(s[b, h, i, idx], -1) if renorm else torch.softmax(s[b, h, i], -1)[idx]
                out[b, h, i] = w @ values[b, h, idx]
    return out


def test_knn_written_another_way_passes_and_matches_the_library() -> None:
    assert ex.check_knn_attention(_dense_top).passed
    for case in ex.KNN_ATTENTION.inputs():
        q, keys, values, k = case.args
        torch.testing.assert_close(ex.knn_attention(*case.args), library_knn(q, keys, values, k).output)
        torch.testing.assert_close(ex.knn_attention(*case.args), knn_attention_dense(q, keys, values, k).output)


def test_knn_wrong_answers_get_their_diagnosis() -> None:
    def smallest(q, keys, values, top_k):  # type: ignore[no-untyped-def]
        return _dense_top(q, keys, values, top_k, pick=-torch.einsum("bhld,bhsd->bhls", q, keys))

    def by_l2(q, keys, values, top_k):  # type: ignore[no-untyped-def]
        dist = ((q.unsqueeze(-2) - keys.unsqueeze(-3)) ** 2).sum(-1)  # (B, h, L, S)
        return _dense_top(q, keys, values, top_k, pick=-dist)

    def not_renormalised(q, keys, values, top_k):  # type: ignore[no-untyped-def]
        return _dense_top(q, keys, values, top_k, renorm=False)

    def unscaled(q, keys, values, top_k):  # type: ignore[no-untyped-def]
        return _dense_top(q, keys, values, top_k, scale=False)

    table = {smallest: "smallest", by_l2: "nearest_l2", not_renormalised: "softmax_before_topk",
             unscaled: "no_scale",
             (lambda q, keys, values, top_k: _dense_top(q, keys, values, keys.shape[-2])): "whole_bank"}
    for fn, name in table.items():
        report = ex.check_knn_attention(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def _mine(q, k, v, mem_k, mem_v, causal=False, slots_masked=False, scale=True):  # type: ignore[no-untyped-def]
    b, n = q.shape[0], q.shape[-2]
    keys = torch.cat([mem_k.unsqueeze(0).repeat(b, 1, 1, 1), k], -2)  # slots first: order does not matter
    vals = torch.cat([mem_v.unsqueeze(0).repeat(b, 1, 1, 1), v], -2)
    s = torch.einsum("bhid,bhjd->bhij", q, keys) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    if causal:
        slots = mem_k.shape[-2]
        col = torch.arange(slots + n)[None, :]
        token = col - slots  # the token index of each column (negative: a slot)
        allowed = (token <= torch.arange(n)[:, None]) & ((token >= 0) | (not slots_masked))
        s = torch.where(allowed, s, torch.finfo(s.dtype).min)
    return s.softmax(-1) @ vals


def test_persistent_written_another_way_passes_and_matches_the_layer() -> None:
    assert ex.check_persistent_attention(_mine).passed
    layer = PersistentMemoryAttention(8, 2, slots=3)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    for causal in (False, True):
        want = layer.attend(q, k, v, attn_mask=None, key_mask=None, is_causal=causal, dropout_p=0.0,
                            scale=0.5, need_weights=False)[0]
        got = ex.persistent_attention(q, k, v, layer.memory_k.detach(), layer.memory_v.detach(), causal)
        torch.testing.assert_close(got, want)


def test_persistent_wrong_answers_get_their_diagnosis() -> None:
    table = {
        (lambda *a: _mine(*a, slots_masked=True)): "slots_hidden_by_causal",
        (lambda q, k, v, mk, mv, causal=False: _mine(q, k, v, mk, mv, False)): "causal_ignored",
        (lambda *a: _mine(*a, scale=False)): "no_scale",
    }
    for fn, name in table.items():
        report = ex.check_persistent_attention(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_retrieved_entry_values() -> None:
    assert ex.check_retrieved_entry(1).passed
    assert ex.check_retrieved_entry(torch.tensor(1)).passed
    assert ex.check_retrieved_entry(0).mistake == "nearest_l2"
    assert ex.check_retrieved_entry(3).mistake == "generic"
    assert ex.check_retrieved_entry("1").mistake == "generic"
