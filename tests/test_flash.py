"""Chapter 25: FlashAttention from scratch (tiled online softmax, recomputing backward) against SDPA."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attn
from attn import registry
from attn.attention import Attention
from attn.benchmark import fit_exponent, peak_memory
from attn.flash import (
    FlashAttention,
    flash_attention,
    flash_forward,
    merge_partial_attention,
    naive_attention,
    online_softmax_trace,
    tile_plan,
)
from attn.masks import padding_mask
from attn.multihead import MultiHeadAttention


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny products: one thread is fastest on a shared CPU (see attn.train.cpu_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def qkv(b, h, n_q, n_k, d=8, d_v=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(b, h, n_k, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(b, h, n_k, d_v or d, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


# ----------------------------------------------------------------------------- equality with SDPA, forward and gradients


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q, n_k, block_q, block_k", [(64, 64, 16, 16), (37, 37, 16, 8), (23, 50, 7, 16), (50, 23, 16, 7), (5, 5, 64, 64), (9, 9, 1, 1)])
def test_matches_sdpa_forward_and_gradients(causal, n_q, n_k, block_q, block_k):
    q, k, v = qkv(2, 3, n_q, n_k, d=8, d_v=6)
    out, lse = flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k, return_lse=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert (out - ref).abs().max() <= 1e-5
    # the log-sum-exp is the one of each query's visible scores
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    if causal:
        s = s.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    up = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        assert (a - b).abs().max() <= 2e-5


def test_scale_and_three_dim_input():
    q, k, v = (t[:, 0] for t in qkv(2, 1, 13, 13))
    out = flash_attention(q, k, v, scale=0.3, block_q=4, block_k=5)
    assert out.shape == (2, 13, 8)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_gradcheck_float64():
    km = padding_mask([6, 4], 7)
    for causal in (False, True):
        q, k, v = qkv(2, 1, 7, 7, d=3, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            partial(flash_attention, causal=causal, block_q=3, block_k=2, key_mask=km), (q, k, v))
    q, k, v = qkv(1, 2, 5, 6, d=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, block_q=2, block_k=4), (q, k, v))


def test_float64_agrees_to_rounding():
    q, k, v = qkv(1, 2, 100, 100, d=16, dtype=torch.float64)
    out = flash_attention(q, k, v, causal=True, block_q=32, block_k=16)
    assert (out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max() <= 1e-13


def test_large_scores_do_not_overflow():
    """The running max keeps exp() bounded: scores of 1e4 would overflow a plain exp."""
    q, k, v = (t.detach() for t in qkv(1, 1, 20, 20, d=4))
    q = q * 1000.0
    out = flash_attention(q, k, v, block_q=8, block_k=8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


# ----------------------------------------------------------------------------- memory: only O and the log-sum-exp are saved


def test_backward_saves_no_n_by_n_tensor():
    n = 48
    q, k, v = qkv(1, 2, n, n, d=4)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    assert shapes, "nothing saved at all"
    assert all(math.prod(s) < n * n for s in shapes), shapes
    assert (1, 2, n) in shapes  # the log-sum-exp
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        naive_attention(q, k, v)  # the baseline does save (n, n) tensors
    assert any(s[-2:] == (n, n) for s in shapes)


def test_peak_memory_grows_linearly_and_naive_quadratically():
    peaks = {"flash": [], "naive": []}
    ns = [512, 1024, 2048]
    with torch.no_grad():
        for n in ns:
            q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
            # flash_forward directly: the profiler books the frees inside an autograd.Function at its start
            peaks["flash"].append(peak_memory(partial(flash_forward, q, k, v, block_q=256, block_k=256), "cpu"))
            peaks["naive"].append(peak_memory(partial(naive_attention, q, k, v), "cpu"))
    assert fit_exponent(ns, peaks["flash"]) <= 1.1
    assert fit_exponent(ns, peaks["naive"]) >= 1.8
    assert peaks["flash"][-1] < 2048 * 2048 * 4 / 8
    assert peaks["flash"][-1] > 2 * 256 * 256 * 4  # the tiles are seen (a score tile and its exponential)


# ----------------------------------------------------------------------------- properties


def test_masked_keys_have_no_influence_and_match_sdpa():
    q, k, v = qkv(2, 2, 19, 19)
    km = padding_mask([19, 11], 19)
    out = flash_attention(q, k, v, key_mask=km, block_q=8, block_k=4)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=km[:, None, None, :])
    torch.testing.assert_close(out, ref)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[1, :, 11:] += 100
    v2[1, :, 11:] -= 100
    torch.testing.assert_close(flash_attention(q, k2, v2, key_mask=km, block_q=8, block_k=4), out)
    up = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_causal_outputs_ignore_the_future():
    q, k, v = (t.detach() for t in qkv(1, 2, 30, 30))
    out = flash_attention(q, k, v, causal=True, block_q=8, block_k=8)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, 17:] = torch.randn_like(t[:, :, 17:])
    torch.testing.assert_close(flash_attention(q2, k2, v2, causal=True, block_q=8, block_k=8)[:, :, :17], out[:, :, :17])


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = qkv(2, 1, 6, 6)
    km = torch.tensor([[False] * 6, [True] * 6])
    out, lse = flash_attention(q, k, v, key_mask=km, return_lse=True, block_q=4, block_k=4)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0
    assert torch.isinf(lse[0]).all() and torch.isfinite(lse[1]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert q.grad[0].abs().max() == 0


def test_batched_equals_per_example_and_block_size_does_not_matter():
    q, k, v = (t.detach() for t in qkv(3, 2, 21, 21))
    out = flash_attention(q, k, v, causal=True, block_q=8, block_k=8)
    per = torch.cat([flash_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], causal=True, block_q=8, block_k=8) for i in range(3)])
    torch.testing.assert_close(out, per)
    for bq, bk in ((1, 21), (21, 1), (5, 3), (64, 64)):
        torch.testing.assert_close(flash_attention(q, k, v, causal=True, block_q=bq, block_k=bk), out)


def test_tile_plan_skips_tiles_above_the_diagonal():
    plan = tile_plan(16, 16, 4, 4, causal=True)
    assert plan.shape == (4, 4)
    assert torch.equal(plan, torch.tensor([[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]]))
    assert (tile_plan(10, 10, 4, 4, causal=False) == 2).all()
    plan = tile_plan(12, 12, 4, 8, causal=True)  # wider key tiles: query block 1 straddles the diagonal of key tile 0
    assert torch.equal(plan, torch.tensor([[1, 0], [1, 0], [2, 1]]))
    # every computed tile contains a visible entry, every skipped tile none
    dense = torch.ones(12, 12, dtype=torch.bool).tril()
    for i in range(3):
        for j in range(2):
            visible = dense[i * 4 : i * 4 + 4, j * 8 : j * 8 + 8]
            assert (plan[i, j] == 0) == (not visible.any())
            assert (plan[i, j] == 2) == bool(visible.all())


def test_online_softmax_trace_reaches_the_logsumexp():
    s = torch.randn(23, dtype=torch.float64) * 3
    tr = online_softmax_trace(s, 5)
    assert tr.lse == pytest.approx(torch.logsumexp(s, 0).item(), abs=1e-12)
    assert torch.all(tr.running_max.diff() >= 0)  # the running max never decreases
    assert tr.running_max[-1] == s.max()
    assert tr.running_sum[-1].item() == pytest.approx(torch.exp(s - s.max()).sum().item())
    causal = online_softmax_trace(s, 5, causal_row=7)
    assert causal.lse == pytest.approx(torch.logsumexp(s[:8], 0).item())
    assert torch.isnan(causal.running_max[2:]).all()  # blocks 2.. start after key 7: skipped


def test_flash_forward_matches_the_function():
    q, k, v = (t.detach() for t in qkv(1, 1, 10, 10))
    out, lse = flash_forward(q, k, v, block_q=3, block_k=3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert lse.shape == (1, 1, 10)


# ----------------------------------------------------------------------------- the log-sum-exp is differentiable


def masked_scores(q, k, causal=False, key_mask=None):
    """The full score matrix with -inf where a key is hidden (the reference only)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n_q, n_k = s.shape[-2:]
    if causal:
        s = s.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool).triu(1), float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return s


@pytest.mark.parametrize("causal, masked", [(False, False), (True, False), (False, True)])
def test_lse_gradient_matches_torch_logsumexp(causal, masked):
    """A loss through the returned lse gets dL/ds_ij = P_ij; before the fix the backward returned zeros for it."""
    q, k, v = qkv(2, 2, 13, 11, d=4, d_v=3, dtype=torch.float64)
    km = padding_mask([11, 6], 11) if masked else None
    out, lse = flash_attention(q, k, v, causal=causal, block_q=4, block_k=3, key_mask=km, return_lse=True)
    ref_lse = torch.logsumexp(masked_scores(q, k, causal, km), -1)
    torch.testing.assert_close(lse, ref_lse, atol=1e-13, rtol=1e-13)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad((w * lse).sum(), (q, k), allow_unused=True, retain_graph=True)
    ref = torch.autograd.grad((w * ref_lse).sum(), (q, k), retain_graph=True)
    for a, b in zip(mine, ref, strict=True):
        assert b.abs().max() > 0.1  # the term is not small
        assert a is not None and (a - b).abs().max() <= 1e-13
    # through the output and the lse at once
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ref_out = torch.softmax(masked_scores(q, k, causal, km), -1) @ v
    mine = torch.autograd.grad((up * out).sum() + (w * lse).sum(), (q, k, v))
    ref = torch.autograd.grad((up * ref_out).sum() + (w * ref_lse).sum(), (q, k, v))
    for a, b in zip(mine, ref, strict=True):
        assert (a - b).abs().max() <= 1e-13


def test_lse_gradcheck_float64():
    km = padding_mask([6, 4], 6)
    for causal, mask in ((False, km), (True, None)):
        q, k, v = qkv(2, 1, 5, 6, d=3, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            partial(flash_attention, causal=causal, block_q=2, block_k=4, key_mask=mask, return_lse=True), (q, k, v))
    q, k, v = (t[:, 0] for t in qkv(1, 1, 4, 7, d=2, dtype=torch.float64))  # 3-D input
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, block_q=3, block_k=2, return_lse=True)[1], (q, k, v))


def test_lse_gradient_of_fully_masked_rows_is_zero():
    q, k, v = qkv(2, 1, 6, 6)
    km = torch.tensor([[False] * 6, [True] * 6])
    _, lse = flash_attention(q, k, v, key_mask=km, return_lse=True, block_q=4, block_k=4)
    (lse[1].sum() + torch.where(torch.isinf(lse[0]), 0.0, lse[0]).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert q.grad[0].abs().max() == 0 and q.grad[1].abs().max() > 0


# ----------------------------------------------------------------------------- merging partial attentions (split-KV)


def split_kv(q, k, v, bounds, key_mask=None, block=3):
    """flash_attention on each key chunk [lo, hi) alone, then the merge by log-sum-exp."""
    outs, lses = [], []
    for lo, hi in bounds:
        km = None if key_mask is None else key_mask[:, lo:hi]
        o, lse = flash_attention(q, k[..., lo:hi, :], v[..., lo:hi, :], key_mask=km, block_q=block, block_k=block, return_lse=True)
        outs.append(o)
        lses.append(lse)
    return merge_partial_attention(outs, lses)


@pytest.mark.parametrize("bounds", [[(0, 17)], [(0, 8), (8, 17)], [(0, 3), (3, 4), (4, 11), (11, 17)]])
@pytest.mark.parametrize("masked", [False, True])
def test_split_kv_equals_one_pass_with_gradients(bounds, masked):
    """Forward and gradients w.r.t. q, k, v equal one pass over all keys (float64), including a loss through the lse."""
    q, k, v = qkv(3, 2, 5, 17, d=4, d_v=6, dtype=torch.float64)
    # example 1 has no real key after 7 (its last chunks are empty: lse = -inf), example 2 has holes
    km = torch.stack([torch.ones(17, dtype=torch.bool), torch.arange(17) < 7, torch.arange(17) % 3 != 1]) if masked else None
    out, lse = split_kv(q, k, v, bounds, km)
    ref_out, ref_lse = flash_attention(q, k, v, key_mask=km, return_lse=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=None if km is None else km[:, None, None, :])
    assert (out - sdpa).abs().max() <= 1e-13 and (lse - ref_lse).abs().max() <= 1e-13
    g = torch.Generator().manual_seed(2)
    up, w = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad((up * out).sum(), (q, k, v), retain_graph=True)
    ref = torch.autograd.grad((up * sdpa).sum(), (q, k, v))
    for a, b in zip(mine, ref, strict=True):
        assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-13
    mine = torch.autograd.grad((up * out).sum() + (w * lse).sum(), (q, k, v))
    ref = torch.autograd.grad((up * ref_out).sum() + (w * ref_lse).sum(), (q, k, v))
    for a, b in zip(mine, ref, strict=True):
        assert (a - b).abs().max() <= 1e-13


def test_split_kv_decoding_one_query_float32_and_three_dim():
    """Split-KV decoding: one new query against a long cache in chunks, float32, (batch, n, d) input."""
    q, k, v = (t[:, 0] for t in qkv(2, 1, 1, 300, d=16))
    bounds = [(lo, min(lo + 64, 300)) for lo in range(0, 300, 64)]
    out, lse = split_kv(q, k, v, bounds, block=32)
    assert out.shape == (2, 1, 16) and lse.shape == (2, 1)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert (out - ref).abs().max() <= 1e-6
    up = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_merge_of_empty_chunks_gives_zeros_not_nan():
    o = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    lse = torch.tensor([[0.5, float("-inf"), 1.0], [float("-inf")] * 3], dtype=torch.float64, requires_grad=True)
    lse_b = torch.full((2, 3), float("-inf"), dtype=torch.float64, requires_grad=True)
    o_b = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    out, merged = merge_partial_attention([o, o_b], [lse, lse_b])
    assert torch.equal(out[0, 0], o[0, 0]) and merged[0, 0] == 0.5  # the other chunk is empty: weight 0
    assert (out[0, 1] == 0).all() and (out[1] == 0).all() and torch.isinf(merged[1]).all() and (merged[1] < 0).all()
    (out.sum() + torch.where(torch.isinf(merged), 0.0, merged).sum()).backward()
    for t in (o, lse, o_b, lse_b):
        assert torch.isfinite(t.grad).all()
    assert o_b.grad.abs().max() == 0 and o.grad[1].abs().max() == 0


def test_merge_gradcheck_and_formula():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lses = [(torch.randn(2, 3, generator=g, dtype=torch.float64) * 5).requires_grad_() for _ in range(3)]
    with torch.no_grad():
        lses[1][0, 2] = float("-inf")  # one empty chunk for one query
    assert torch.autograd.gradcheck(lambda *t: merge_partial_attention(t[:3], t[3:]), (*outs, *lses))
    out, lse = merge_partial_attention(outs, lses)
    ref_lse = torch.logsumexp(torch.stack(lses), 0)
    ref = sum(torch.exp(chunk_lse - ref_lse)[..., None] * o for o, chunk_lse in zip(outs, lses, strict=True))
    torch.testing.assert_close(lse, ref_lse, atol=1e-14, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-14, rtol=0)
    big = [torch.full((1, 1), 1e4, dtype=torch.float64), torch.full((1, 1), 1e4 - 1, dtype=torch.float64)]  # exp(1e4) overflows
    out, lse = merge_partial_attention([torch.ones(1, 1, 2, dtype=torch.float64), torch.zeros(1, 1, 2, dtype=torch.float64)], big)
    assert torch.isfinite(out).all() and lse.item() == pytest.approx(1e4 + math.log1p(math.exp(-1)))


def test_merge_is_exported():
    assert "merge_partial_attention" in attn.__all__ and attn.merge_partial_attention is merge_partial_attention


MERGE_BAD = [
    ("tensor, not list", lambda o, lse: (torch.stack([o, o]), [lse, lse]), TypeError, "outputs must be a list or tuple"),
    ("empty", lambda o, lse: ([], []), ValueError, "at least one chunk"),
    ("count", lambda o, lse: ([o, o], [lse]), ValueError, "2 outputs and 1 lses"),
    ("list entry", lambda o, lse: ([o.tolist()], [lse]), TypeError, r"outputs\[0\] must be a torch.Tensor"),
    ("int lse", lambda o, lse: ([o], [lse.long()]), TypeError, r"lses\[0\] must be a floating-point"),
    ("1-D output", lambda o, lse: ([o[0, 0]], [lse[0, 0]]), ValueError, r"\(\.\.\., n_q, d_v\)"),
    ("shapes differ", lambda o, lse: ([o, o[:, :2]], [lse, lse[:, :2]]), ValueError, r"outputs\[1\] has shape \(2, 2, 4\)"),
    ("lse shape", lambda o, lse: ([o], [lse[:, :2]]), ValueError, r"lses\[0\] must have shape \(2, 3\)"),
    ("dtypes differ", lambda o, lse: ([o, o.double()], [lse, lse.double()]), TypeError, "dtypes must match"),
    ("nan lse", lambda o, lse: ([o], [lse.masked_fill(lse > -10, float("nan"))]), ValueError, "NaN or \\+inf"),
    ("+inf lse", lambda o, lse: ([o], [torch.full_like(lse, float("inf"))]), ValueError, "NaN or \\+inf"),
]


@pytest.mark.parametrize("case, make, exc, match", MERGE_BAD, ids=[b[0] for b in MERGE_BAD])
def test_merge_bad_input(case, make, exc, match):
    o, lse = torch.randn(2, 3, 4), torch.randn(2, 3)
    with pytest.raises(exc, match=match):
        merge_partial_attention(*make(o, lse))


# ----------------------------------------------------------------------------- the module and the registry


def test_module_equals_multihead_with_copied_weights():
    torch.manual_seed(1)
    E, h, n = 16, 4, 21
    flash = FlashAttention(E, h, causal=True, block_q=8, block_k=4)
    mha = MultiHeadAttention(E, h)
    mha.load_state_dict(flash.state_dict())  # the same parameter names: Attention's q/k/v/out projections
    x = torch.randn(2, n, E)
    km = padding_mask([n, 15], n)
    out, w = flash(x, key_mask=km, need_weights=True)
    ref, w_ref = mha(x, key_mask=km, is_causal=True, need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)


def test_module_gradcheck():
    mod = FlashAttention(4, 2, block_q=3, block_k=2).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mod(x).output, (x,), fast_mode=True)


def test_registry_build():
    mech = registry.get("flash")
    assert mech.chapter == 25 and mech.cls is FlashAttention
    layer = mech.build(32, 4)
    x = torch.randn(2, 19, 32)
    out, w = layer(x, need_weights=True)
    assert out.shape == (2, 19, 32) and w.shape == (2, 4, 19, 19)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 19))
    assert layer(x).weights is None
    assert layer(torch.randn(0, 7, 32)).output.shape == (0, 7, 32)


BAD = [
    ("list query", lambda q: (q.tolist(), q, q), {}, TypeError, "query must be a torch.Tensor"),
    ("int query", lambda q: (q.long(), q, q), {}, TypeError, "floating-point"),
    ("2-D query", lambda q: (q[0, 0], q[0, 0], q[0, 0]), {}, ValueError, r"\(batch, seq, dim\) or \(batch, heads, seq, dim\)"),
    ("d mismatch", lambda q: (q, q[..., :3], q), {}, ValueError, "share d_k"),
    ("k/v length", lambda q: (q, q, q[:, :, :5]), {}, ValueError, "same length"),
    ("block 0", lambda q: (q, q, q), {"block_q": 0}, ValueError, "block_q must be >= 1"),
    ("block float", lambda q: (q, q, q), {"block_k": 2.0}, TypeError, "block_k must be an int"),
    ("mask dtype", lambda q: (q, q, q), {"key_mask": torch.ones(2, 8)}, TypeError, "torch.bool"),
    ("mask shape", lambda q: (q, q, q), {"key_mask": torch.ones(2, 7, dtype=torch.bool)}, ValueError, r"\(batch=2, n_keys=8\)"),
    ("float64 key", lambda q: (q, q.double(), q), {}, TypeError, r"dtypes must match \(query: torch.float32, key: torch.float64"),
    ("bf16 value", lambda q: (q, q, q.bfloat16()), {}, TypeError, r"value: torch.bfloat16"),
]


@pytest.mark.parametrize("case, make, kwargs, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, make, kwargs, exc, match):
    q = torch.randn(2, 1, 8, 4)
    with pytest.raises(exc, match=match):
        flash_attention(*make(q), **kwargs)


def test_module_bad_input():
    layer = FlashAttention(8, 2)
    with pytest.raises(ValueError, match=r"\(batch, seq, embed_dim=8\)"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="divisible"):
        FlashAttention(6, 4)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(1, 3, 8, dtype=torch.long))
    assert np.isfinite(layer(torch.randn(1, 1, 8)).output.detach().numpy()).all()


def test_module_is_attention_and_attends_across_sequences():
    """Issue 23: FlashAttention is ``Attention(kernel="flash")``: cross-attention (L != S) equals MultiHeadAttention's
    with the same state dict; a general attn_mask (an n x n tensor) is refused by the tiled kernel."""
    torch.manual_seed(2)
    flash, mha = FlashAttention(16, 4, block_q=4, block_k=3).double(), MultiHeadAttention(16, 4).double()
    mha.load_state_dict(flash.state_dict())
    assert flash.kernel == "flash" and isinstance(flash, Attention)
    q, kv = torch.randn(2, 7, 16, dtype=torch.float64), torch.randn(2, 11, 16, dtype=torch.float64)
    km = padding_mask([11, 6], 11)
    out, w = flash(q, kv, key_mask=km, need_weights=True)
    ref, w_ref = mha(q, kv, key_mask=km, need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w, w_ref, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="not an attn_mask"):
        flash(q, kv, attn_mask=torch.ones(7, 11, dtype=torch.bool))
