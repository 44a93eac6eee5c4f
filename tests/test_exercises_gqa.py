"""Chapter 27's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.exercises import gqa as ex
from attn.gqa import KVCache, grouped_attention, kv_cache_bytes_per_token


def _weights(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def _gqa_loop(q, k, v, *, head_of=lambda i, h, g: i // (h // g), scale=True, offset=True):  # type: ignore[no-untyped-def]
    """Grouped attention one query head at a time, with einsum and torch.where."""
    h, t, d = q.shape[1:]
    g, m = k.shape[1], k.shape[2]
    past = m - t if offset else 0
    keep = torch.arange(m)[None, :] <= (past + torch.arange(t))[:, None]
    heads = []
    for i in range(h):
        j = head_of(i, h, g)
        s = torch.einsum("btd,bmd->btm", q[:, i], k[:, j]) * (d**-0.5 if scale else 1.0)
        s = torch.where(keep, s, torch.tensor(-1e30))
        heads.append(torch.einsum("btm,bmd->btd", _weights(s), v[:, j]))
    return torch.stack(heads, 1)


def test_grouped_attention_right_and_wrong() -> None:
    assert ex.check_grouped_query_attention(_gqa_loop).passed
    table = {
        "tiled_heads": lambda q, k, v: _gqa_loop(q, k, v, head_of=lambda i, h, g: i % g),
        "no_scale": lambda q, k, v: _gqa_loop(q, k, v, scale=False),
        "causal_top_left": lambda q, k, v: _gqa_loop(q, k, v, offset=False),
    }
    for name, fn in table.items():
        report = ex.check_grouped_query_attention(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_grouped_attention_matches_the_library() -> None:
    for case in ex.GROUPED_QUERY_ATTENTION.inputs():
        q, k, v = case.args
        lib = grouped_attention(q, k, v, past=k.shape[2] - q.shape[2], causal=True).output
        torch.testing.assert_close(ex.grouped_query_attention(q, k, v), lib, atol=1e-5, rtol=1e-4)


def _step_loop(q, k_new, v_new, k_cache, v_cache, *, before=False, front=False):  # type: ignore[no-untyped-def]
    k_all = torch.cat((k_new, k_cache) if front else (k_cache, k_new), dim=-2)
    v_all = torch.cat((v_new, v_cache) if front else (v_cache, v_new), dim=-2)
    k_read, v_read = (k_cache, v_cache) if before else (k_all, v_all)
    out = _gqa_loop(q, k_read, v_read) if k_read.shape[2] else torch.zeros_like(q)
    return out, k_all, v_all


def test_decode_step_right_and_wrong() -> None:
    assert ex.check_decode_step(_step_loop).passed
    table = {
        "attend_before_append": lambda *a: _step_loop(*a, before=True),
        "prepended": lambda *a: _step_loop(*a, front=True),
    }
    for name, fn in table.items():
        report = ex.check_decode_step(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_decode_step_matches_the_library_cache() -> None:
    for case in ex.DECODE_STEP.inputs():
        q, k_new, v_new, k_cache, v_cache = case.args
        B, g, m, d = k_cache.shape
        cache = KVCache(B, g, d, m + 1)
        if m:
            cache.append(k_cache, v_cache)
        k_all, v_all = cache.append(k_new, v_new)
        lib = grouped_attention(q, k_all, v_all, past=m, causal=True).output
        out, k_mine, v_mine = ex.decode_step(q, k_new, v_new, k_cache, v_cache)
        torch.testing.assert_close(out, lib, atol=1e-5, rtol=1e-4)
        assert torch.equal(k_mine, k_all) and torch.equal(v_mine, v_all)


def test_cache_bytes() -> None:
    assert ex.mistral_cache_bytes() == kv_cache_bytes_per_token(32, 8, 128, 2)
    assert ex.check_mistral_cache_bytes(131072).passed
    assert ex.check_mistral_cache_bytes(2 * 32 * 32 * 128 * 2).mistake == "query_heads"
    assert ex.check_mistral_cache_bytes(100_000).mistake == "generic"


def test_sdpa_answers() -> None:
    import torch.nn.functional as F

    def right(q, k, v):  # type: ignore[no-untyped-def]
        t, m = q.shape[2], k.shape[2]
        keep = torch.ones(t, m, dtype=torch.bool).tril(m - t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)

    def top_left(q, k, v):  # type: ignore[no-untyped-def]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    assert ex.check_grouped_query_attention(right).passed
    assert ex.check_grouped_query_attention(top_left).mistake == "causal_top_left"
