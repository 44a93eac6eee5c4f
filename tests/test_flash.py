"""Chapter 25: FlashAttention from scratch (tiled online softmax, recomputing backward) against SDPA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.benchmark import fit_exponent, peak_memory
from attn.flash import (
    FlashAttention, flash_attention, flash_forward, naive_attention, online_softmax_trace, tile_plan,
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
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up)):
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
            lambda q, k, v: flash_attention(q, k, v, causal=causal, block_q=3, block_k=2, key_mask=km), (q, k, v))
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
            peaks["flash"].append(peak_memory(lambda: flash_forward(q, k, v, block_q=256, block_k=256), "cpu"))
            peaks["naive"].append(peak_memory(lambda: naive_attention(q, k, v), "cpu"))
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
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up)):
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


# ----------------------------------------------------------------------------- the module and the registry


def test_module_equals_multihead_with_copied_weights():
    torch.manual_seed(1)
    E, h, n = 16, 4, 21
    flash = FlashAttention(E, h, causal=True, block_q=8, block_k=4)
    mha = MultiHeadAttention(E, h)
    with torch.no_grad():
        wq, wk, wv = flash.qkv.weight.split(E)
        bq, bk, bv = flash.qkv.bias.split(E)
        for lin, wt, b in ((mha.q_proj, wq, bq), (mha.k_proj, wk, bk), (mha.v_proj, wv, bv)):
            lin.weight.copy_(wt)
            lin.bias.copy_(b)
        mha.out_proj.load_state_dict(flash.out_proj.state_dict())
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
