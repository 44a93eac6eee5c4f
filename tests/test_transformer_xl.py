"""Chapter 14: Transformer-XL (relative positions, rel-shift, segment memory) against explicit references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.benchmark import count_flops
from attn.train import cpu_threads, evaluate, set_seed, train
from attn.transformer_xl import (
    LagCopyTask,
    TransformerXLAttention,
    TransformerXLLM,
    lag_copy_loss,
    rel_shift,
    relative_scores_explicit,
    sinusoid_table,
    transformer_xl_dense,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one CPU thread is far faster than several on a shared machine (see attn.train.cpu_threads)."""
    with cpu_threads(1):
        yield


def rel_shift_off_by_one(x):
    """A wrong shift (zero column padded on the right): row i lands one distance off."""
    *lead, L, K = x.shape
    padded = F.pad(x, (0, 1)).reshape(*lead, K + 1, L)
    return padded[..., :-1, :].reshape(*lead, L, K)


# ----------------------------------------------------------------------------- the rel-shift


@pytest.mark.parametrize("L, M", [(1, 0), (3, 0), (3, 3), (4, 9), (6, 2)])
def test_rel_shift_puts_distance_m_plus_i_minus_j_in_column_j(L, M):
    K = M + L
    # column c holds its own distance K-1-c: after the shift, entry (i, j) must read M + i - j
    raw = (K - 1 - torch.arange(K)).float().expand(2, L, K)
    out = rel_shift(raw)
    i, j = torch.arange(L)[:, None], torch.arange(K)[None, :]
    visible = j <= M + i
    assert torch.equal(out[:, visible], (M + i - j).float().expand(2, L, K)[:, visible])


def test_rel_shift_catches_the_off_by_one():
    """The test above fails for a shift padded on the wrong side: distances come out one off."""
    L, M = 4, 4
    K = M + L
    raw = (K - 1 - torch.arange(K)).float().expand(L, K)
    i, j = torch.arange(L)[:, None], torch.arange(K)[None, :]
    visible = j <= M + i
    wrong = rel_shift_off_by_one(raw)[visible]
    assert not torch.equal(wrong, (M + i - j).float().expand(L, K)[visible])
    # the diagonal (distance M + i - j = 0 where j = M + i) is where a unit off lands on R_1 or R_{-1}
    assert rel_shift(raw)[torch.arange(L), M + torch.arange(L)].abs().max() == 0


def test_rel_shift_rejects_fewer_keys_than_queries():
    with pytest.raises(ValueError, match=r"K >= L"):
        rel_shift(torch.zeros(5, 3))


def test_scores_match_the_explicit_four_terms():
    torch.manual_seed(0)
    layer = TransformerXLAttention(12, 3, segment=5, mem_len=4).double()
    B, L, M, h, d = 2, 5, 4, 3, 4
    q = torch.randn(B, h, L, d, dtype=torch.float64)
    k = torch.randn(B, h, M + L, d, dtype=torch.float64)
    r_proj = layer.projected_positions(torch.arange(M + L), torch.float64)  # ascending distances
    ours = layer._scores_bias(q, M + L) + torch.einsum("bhid,bhjd->bhij", q + layer.u[:, None], k)
    ref = relative_scores_explicit(q, k, r_proj, layer.u, layer.v, M)
    visible = torch.ones(L, M + L, dtype=torch.bool).tril(M)
    torch.testing.assert_close(ours[..., visible], ref[..., visible], atol=1e-12, rtol=1e-12)
    # a one-by-one loop over (i, j) and the four terms of the paper, for one entry of each row
    for i in range(L):
        for j in (0, M + i):
            R = layer.r_net(sinusoid_table(torch.tensor([M + i - j]), 12).double()).view(h, d)
            a = (q[0, :, i] * k[0, :, j]).sum(-1)
            b = (q[0, :, i] * R).sum(-1)
            c = (layer.u * k[0, :, j]).sum(-1)
            dd = (layer.v * R).sum(-1)
            torch.testing.assert_close(ours[0, :, i, j], a + b + c + dd, atol=1e-12, rtol=1e-12)


def test_sinusoid_table():
    t = sinusoid_table(torch.arange(5), 8)
    assert t.shape == (5, 8)
    torch.testing.assert_close(t[0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=torch.float64))
    torch.testing.assert_close(t[3, 0], torch.tensor(math.sin(3.0), dtype=torch.float64))
    with pytest.raises(ValueError, match="even"):
        sinusoid_table(torch.arange(3), 5)


# ----------------------------------------------------------------------------- segment form and parallel form


@pytest.mark.parametrize("n, L, M", [(17, 5, 3), (16, 4, 4), (9, 3, 7), (6, 8, 8), (10, 4, 0)])
@pytest.mark.parametrize("need_weights", [False, True])
def test_parallel_form_matches_dense_masked_reference(n, L, M, need_weights):
    torch.manual_seed(1)
    layer = TransformerXLAttention(16, 4, segment=L, mem_len=M).double()
    x = torch.randn(2, n, 16, dtype=torch.float64, requires_grad=True)
    out, w = layer(x, need_weights=need_weights)
    ref, w_ref = transformer_xl_dense(layer, x, need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    if need_weights:
        assert w.shape == (2, 4, n, n)
        torch.testing.assert_close(w, w_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, n, dtype=torch.float64))
    up = torch.randn_like(out)
    params = [x, layer.u, layer.v, layer.r_net.weight, layer.qkv.weight, layer.out_proj.weight]
    for a, b in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)


def test_memory_is_stop_gradient():
    layer = TransformerXLAttention(8, 2, segment=4, mem_len=4)
    x = torch.randn(1, 8, 8, requires_grad=True)
    out = layer(x).output
    # the second segment's output depends on the first segment only through SG(memory)
    (g,) = torch.autograd.grad(out[:, 4:].sum(), x)
    assert g[:, :4].abs().max() == 0 and g[:, 4:].abs().max() > 0
    mem = torch.randn(1, 3, 8, requires_grad=True)
    cur = torch.randn(1, 2, 8)
    layer.attend_segment(cur, mem).output.sum().backward()
    assert mem.grad is None  # detached: no gradient reaches the memory
    assert layer.r_net.weight.grad is not None and layer.u.grad is not None and layer.v.grad is not None


def test_gradcheck_float64():
    """Gradients wrt the current segment (memory constant), and wrt u, v, W_R through the parallel form.

    (Not wrt the whole input of the parallel form: the stop-gradient on the memory is a deliberate
    difference between the analytical gradient and finite differences.)
    """
    torch.manual_seed(0)
    layer = TransformerXLAttention(4, 2, segment=3, mem_len=2).double()
    mem = torch.randn(2, 3, 4, dtype=torch.float64)
    cur = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: layer.attend_segment(c, mem).output, (cur,))
    assert torch.autograd.gradcheck(lambda c: layer.attend_segment(c, mem, need_weights=True).weights, (cur,))
    x = torch.randn(1, 7, 4, dtype=torch.float64)
    u, v, w_r = (t.detach().clone().requires_grad_() for t in (layer.u, layer.v, layer.r_net.weight))
    assert torch.autograd.gradcheck(lambda u, v, w_r: _with(layer, u, v, w_r)(x).output, (u, v, w_r))


def _with(layer, u, v, w_r):
    """The layer with u, v and W_R replaced by given tensors (for gradcheck on them)."""
    clone = TransformerXLAttention(layer.embed_dim, layer.num_heads, layer.segment, layer.mem_len).double()
    clone.load_state_dict(layer.state_dict())
    del clone.u, clone.v, clone.r_net.weight
    clone.u, clone.v, clone.r_net.weight = u, v, w_r
    return clone


def test_causal_and_segments_ignore_the_future_and_what_lies_beyond_memory():
    torch.manual_seed(0)
    layer = TransformerXLAttention(8, 2, segment=4, mem_len=4)
    x = torch.randn(2, 16, 8)
    out = layer(x).output
    y = x.clone()
    y[:, 10:] = torch.randn_like(y[:, 10:])  # change the future of position 9
    torch.testing.assert_close(layer(y).output[:, :10], out[:, :10])
    z = x.clone()
    z[:, :4] += 10.0  # segment 0 lies beyond the memory of segment 2 (positions 8..11 see 4..11)
    torch.testing.assert_close(layer(z).output[:, 8:], out[:, 8:])
    assert (layer(z).output[:, 4:8] - out[:, 4:8]).abs().max() > 1e-3  # but segment 1 reads it


def test_batched_equals_per_example_and_memory_mask():
    torch.manual_seed(0)
    layer = TransformerXLAttention(8, 2, segment=3, mem_len=5)
    x = torch.randn(3, 11, 8)
    torch.testing.assert_close(layer(x).output, torch.cat([layer(x[i : i + 1]).output for i in range(3)]))
    cur, mem = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    out = layer.attend_segment(cur, mem, mask).output
    mem2 = mem.clone()
    mem2[1, :2] += 100.0  # masked slots have no influence
    torch.testing.assert_close(layer.attend_segment(cur, mem2, mask).output, out)
    # ... and dropping them equals masking them (relative positions count from the end)
    torch.testing.assert_close(layer.attend_segment(cur[1:], mem[1:, 2:]).output, out[1:])


def test_no_memory_is_segment_local_causal_attention():
    layer = TransformerXLAttention(8, 2, segment=4, mem_len=0)
    x = torch.randn(1, 12, 8)
    w = layer(x, need_weights=True).weights
    block = torch.block_diag(*[torch.ones(4, 4).tril()] * 3).bool()
    assert (w[..., ~block] == 0).all() and (w[..., block] > 0).all()


def test_empty_batch():
    layer = TransformerXLAttention(8, 2, segment=4, mem_len=4)
    out, w = layer(torch.randn(0, 10, 8), need_weights=True)
    assert out.shape == (0, 10, 8) and w.shape == (0, 2, 10, 10)
    out, w = layer.attend_segment(torch.randn(0, 3, 8), torch.randn(0, 5, 8), need_weights=True)
    assert out.shape == (0, 3, 8) and w.shape == (0, 2, 3, 8)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m([[0.0] * 8]), TypeError, r"x must be a torch.Tensor of shape \(batch, seq, embed_dim=8\)"),
        (lambda m: m(torch.ones(1, 4, 8, dtype=torch.long)), TypeError, "floating-point"),
        (lambda m: m(torch.randn(4, 8)), ValueError, r"\(batch, seq, embed_dim=8\)"),
        (lambda m: m(torch.randn(1, 4, 6)), ValueError, r"\(batch, seq, embed_dim=8\), got \(1, 4, 6\)"),
        (lambda m: m(torch.randn(1, 0, 8)), ValueError, r"empty sequence|at least one token"),
        (lambda m: m.attend_segment(torch.randn(1, 3, 8), torch.randn(2, 3, 8)), ValueError, r"memory must have shape \(batch=1"),
        (lambda m: m.attend_segment(torch.randn(1, 3, 8), torch.randn(1, 3, 4)), ValueError, "memory must have shape"),
        (lambda m: m.attend_segment(torch.randn(1, 3, 8), [1.0]), TypeError, "memory must be a torch.Tensor"),
        (lambda m: m.attend_segment(torch.randn(1, 3, 8), torch.randn(1, 2, 8), torch.ones(1, 2)), TypeError, "memory_mask must be a torch.bool"),
        (lambda m: m.attend_segment(torch.randn(1, 3, 8), torch.randn(1, 2, 8), torch.ones(1, 3, dtype=torch.bool)), ValueError, r"memory_mask must have shape \(batch=1, mem_len=2\)"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(TransformerXLAttention(8, 2, segment=4, mem_len=4))


def test_bad_construction():
    with pytest.raises(ValueError, match="divisible"):
        TransformerXLAttention(10, 3)
    with pytest.raises(ValueError, match="even"):
        TransformerXLAttention(9, 3)
    with pytest.raises(ValueError, match="segment must be >= 1"):
        TransformerXLAttention(8, 2, segment=0)
    with pytest.raises(TypeError, match="mem_len must be an int"):
        TransformerXLAttention(8, 2, mem_len=2.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the language model: cache vs recompute


@pytest.mark.parametrize("L, M, layers", [(4, 4, 2), (4, 2, 3), (4, 9, 2), (5, 0, 2), (3, 3, 1)])
def test_cached_evaluation_equals_recomputation_and_parallel_form(L, M, layers):
    torch.manual_seed(0)
    lm = TransformerXLLM(11, 16, 2, layers, L, M).double().eval()
    tokens = torch.randint(0, 11, (3, 23))
    cached = lm.evaluate_cached(tokens)
    torch.testing.assert_close(lm.evaluate_recompute(tokens), cached, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lm(tokens)[0], cached, atol=1e-12, rtol=1e-12)


def test_recompute_needs_the_whole_context():
    """Starting one segment later than `context_segments` changes the result: the dependency is real."""
    torch.manual_seed(0)
    lm = TransformerXLLM(11, 16, 2, 2, 4, 4).double().eval()
    tokens = torch.randint(0, 11, (2, 24))
    full = lm(tokens)[0][:, 20:]
    assert lm.context_segments == 2
    with torch.no_grad():
        short = lm(tokens[:, 12:])[0][:, 8:]  # from segment 3, two segments before segment 5
        too_short = lm(tokens[:, 16:])[0][:, 4:]  # from segment 4: one too few
    torch.testing.assert_close(short, full)
    assert (too_short - full).abs().max() > 1e-4


def test_cache_saves_flops():
    lm = TransformerXLLM(11, 16, 2, 2, 4, 4).eval()
    tokens = torch.randint(0, 11, (1, 32))
    cached = count_flops(lambda: lm.evaluate_cached(tokens))
    recompute = count_flops(lambda: lm.evaluate_recompute(tokens))
    assert 2.0 < recompute / cached < 3.0  # (c + 1) = 3 segment passes per segment, fewer at the start


def test_lm_bad_input():
    lm = TransformerXLLM(5, 8, 2, 1, 4, 4)
    with pytest.raises(TypeError, match="integer ids"):
        lm(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        lm(torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match=r"\(batch, n\)"):
        lm(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one tensor per layer"):
        lm.step(torch.tensor([[1, 2]]), [torch.randn(1, 2, 8)] * 2)


# ----------------------------------------------------------------------------- the task and the registry


def test_lag_copy_task_and_memory_helps():
    task = LagCopyTask(vocab=8, segment=4, segments=3)
    b = task.sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(b["y"][:, 4:], b["x"][:, :-4]) and (b["y"][:, :4] == -100).all()
    with pytest.raises(ValueError):
        LagCopyTask(segments=1)
    accs = {}
    for M in (4, 0):
        set_seed(0)
        lm = TransformerXLLM(8, 16, 2, 1, 4, M, ff_mult=1)
        train(lm, task.sample, lag_copy_loss, steps=60, batch_size=16, lr=1e-2, progress=False)
        accs[M] = evaluate(lm, task.sample, lag_copy_loss, batch_size=128)["acc"]
    assert accs[4] > 0.9 and accs[0] < 0.3, accs


def test_registry_build():
    mech = registry.get("transformer_xl")
    assert mech.chapter == 14 and mech.cls is TransformerXLAttention and mech.build is not None
    layer = mech.build(32, 4)
    x = torch.randn(2, 19, 32)
    out, w = layer(x, need_weights=True)
    assert out.shape == (2, 19, 32) and w.shape == (2, 4, 19, 19)
    assert layer(x).weights is None
    i, j = torch.arange(19)[:, None], torch.arange(19)[None, :]
    outside = (j > i) | (j < (i // layer.segment) * layer.segment - layer.mem_len)
    assert (w[..., outside] == 0).all()


def test_dense_baseline_with_shift_equals_gather():
    torch.manual_seed(0)
    layer = TransformerXLAttention(8, 2, segment=4, mem_len=6).double()
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    a = transformer_xl_dense(layer, x, positions="gather").output
    torch.testing.assert_close(transformer_xl_dense(layer, x, positions="shift").output, a, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="positions must be"):
        transformer_xl_dense(layer, x, positions="loop")
