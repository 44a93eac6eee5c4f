"""Chapter 14: Transformer-XL (relative positions, rel-shift, segment memory) against explicit references."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from masking import padding_masks

from attn import registry
from attn.benchmark import count_flops
from attn.experiments.transformer_xl import (
    AbsoluteSegmentAttention,
    LagCopyTask,
    TransformerXLLM,
    lag_copy_accuracy,
    lag_copy_loss,
    set_memory,
    train_lag_copy,
)
from attn.train import cpu_threads, evaluate, set_seed, train
from attn.transformer_xl import (
    TransformerXLAttention,
    rel_shift,
    relative_scores_explicit,
    relative_sinusoids,
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
            R = layer.r_net(relative_sinusoids(torch.tensor([M + i - j]), 12, torch.float64)).view(h, d)
            a = (q[0, :, i] * k[0, :, j]).sum(-1)
            b = (q[0, :, i] * R).sum(-1)
            c = (layer.u * k[0, :, j]).sum(-1)
            dd = (layer.v * R).sum(-1)
            torch.testing.assert_close(ours[0, :, i, j], a + b + c + dd, atol=1e-12, rtol=1e-12)


def test_sinusoid_table():
    """Dai et al.'s [sin | cos] halves, from the book's one table (attn.positions.sinusoidal_embedding)."""
    t = relative_sinusoids(torch.arange(5), 8)
    assert t.shape == (5, 8)
    torch.testing.assert_close(t[0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=t.dtype))
    torch.testing.assert_close(t[3, 0], torch.tensor(math.sin(3.0), dtype=t.dtype))
    torch.testing.assert_close(t.double(), _sinusoid_ref(torch.arange(5), 8), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="even"):
        relative_sinusoids(torch.arange(3), 5)


# ----------------------------------------------------------------------------- segment form and parallel form


@pytest.mark.parametrize("n, L, M", [(17, 5, 3), (16, 4, 4), (9, 3, 7), (6, 8, 8), (10, 4, 0), (17, 8, 16), (5, 4, 8), (13, 1, 512)])
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
    for a, b in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up), strict=True):
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
    layer.attend_segment(cur, memory=mem).output.sum().backward()
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
    assert torch.autograd.gradcheck(lambda c: layer.attend_segment(c, memory=mem).output, (cur,))
    assert torch.autograd.gradcheck(lambda c: layer.attend_segment(c, memory=mem, need_weights=True).weights, (cur,))
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
    out = layer.attend_segment(cur, memory=mem, memory_mask=mask).output
    mem2 = mem.clone()
    mem2[1, :2] += 100.0  # masked slots have no influence
    torch.testing.assert_close(layer.attend_segment(cur, memory=mem2, memory_mask=mask).output, out)
    # ... and dropping them equals masking them (relative positions count from the end)
    torch.testing.assert_close(layer.attend_segment(cur[1:], memory=mem[1:, 2:]).output, out[1:])


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
    out, w = layer.attend_segment(torch.randn(0, 3, 8), memory=torch.randn(0, 5, 8), need_weights=True)
    assert out.shape == (0, 3, 8) and w.shape == (0, 2, 3, 8)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m([[0.0] * 8]), TypeError, r"x must be a torch.Tensor of shape \(batch, seq, embed_dim=8\)"),
        (lambda m: m(torch.ones(1, 4, 8, dtype=torch.long)), TypeError, "floating-point"),
        (lambda m: m(torch.randn(4, 8)), ValueError, r"\(batch, seq, embed_dim=8\)"),
        (lambda m: m(torch.randn(1, 4, 6)), ValueError, r"\(batch, seq, embed_dim=8\), got \(1, 4, 6\)"),
        (lambda m: m(torch.randn(1, 0, 8)), ValueError, r"empty sequence|at least one token"),
        (lambda m: m.attend_segment(torch.randn(1, 3, 8), memory=torch.randn(2, 3, 8)), ValueError, r"memory must have shape \(batch=1"),
        (lambda m: m.attend_segment(torch.randn(1, 3, 8), memory=torch.randn(1, 3, 4)), ValueError, "memory must have shape"),
        (lambda m: m.attend_segment(torch.randn(1, 3, 8), memory=[1.0]), TypeError, "memory must be a torch.Tensor"),
        (lambda m: m.attend_segment(torch.randn(1, 3, 8), memory=torch.randn(1, 2, 8), memory_mask=torch.ones(1, 2)), TypeError, "memory_mask must be a torch.bool"),
        (lambda m: m.attend_segment(torch.randn(1, 3, 8), memory=torch.randn(1, 2, 8), memory_mask=torch.ones(1, 3, dtype=torch.bool)), ValueError, r"memory_mask must have shape \(batch=1, mem_len=2\)"),
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


def test_pair_task_targets_and_classes():
    task = LagCopyTask(vocab=4, segment=8, segments=4, lag=12, near=4)
    assert task.classes == 16
    b = task.sample(3, torch.Generator().manual_seed(1))
    x, y = b["x"], b["y"]
    assert (y[:, :12] == -100).all()
    assert torch.equal(y[:, 12:], x[:, 8:-4] + 4 * x[:, :-12])  # (x[t - near], x[t - lag])
    with pytest.raises(ValueError, match="near"):
        LagCopyTask(vocab=4, segment=8, segments=4, lag=12, near=12)


def test_absolute_positions_reset_per_segment_and_drop_relative_terms():
    set_seed(0)
    lm = TransformerXLLM(7, 8, 2, layers=1, segment=4, mem_len=4, positions="absolute")
    assert isinstance(lm.blocks[0].attn, AbsoluteSegmentAttention) and lm.position_embed is not None
    # the position code restarts at every segment: the same tokens at offsets 0..3 of
    # segments 0 and 1 embed identically
    tokens = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4]])
    h = lm._embed(tokens)
    assert torch.equal(h[:, :4], h[:, 4:])
    q = torch.randn(2, 2, 4, 4)
    assert torch.equal(lm.blocks[0].attn._scores_bias(q, 8), torch.zeros(2, 2, 4, 8))
    # the cache still equals recomputation and the parallel form
    x = torch.randint(0, 7, (2, 12), generator=torch.Generator().manual_seed(0))
    lm = lm.double().eval()
    cached = lm.evaluate_cached(x)
    with torch.no_grad():
        assert torch.allclose(lm(x)[0], cached, atol=1e-12)
    assert torch.allclose(lm.evaluate_recompute(x), cached, atol=1e-12)
    with pytest.raises(ValueError, match="positions"):
        TransformerXLLM(7, 8, 2, positions="learned")  # type: ignore[arg-type]


def test_set_memory_changes_every_layer_and_lag_copy_accuracy_restores_it():
    lm = TransformerXLLM(7, 8, 2, layers=2, segment=4, mem_len=4)
    set_memory(lm, 8)
    assert lm.mem_len == 8 and all(b.attn.mem_len == 8 for b in lm.blocks)
    task = LagCopyTask(vocab=7, segment=4, segments=3, lag=6)
    set_memory(lm, 4)
    lag_copy_accuracy(lm, task, seed=0, batch_size=8, mem_len=8)
    assert lm.mem_len == 4 and all(b.attn.mem_len == 4 for b in lm.blocks)


def test_train_lag_copy_is_seeded_and_memory_reach_decides():
    """Same seed, same model; a memory shorter than the lag cannot copy, a longer one can."""
    task = LagCopyTask(vocab=8, segment=4, segments=3, lag=6)
    a, _ = train_lag_copy(task, seed=3, steps=3)
    b, _ = train_lag_copy(task, seed=3, steps=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    lm, hist = train_lag_copy(task, seed=0, steps=60, mem_len=4, log_every=20)
    assert len(hist.to_frame()) >= 3
    short = lag_copy_accuracy(lm, task, seed=1)
    # trained with M = 4: only queries at offset i >= 2 reach 6 back (about half); with M = 8 all do
    assert short < 0.8
    assert lag_copy_accuracy(lm, task, seed=1, mem_len=8) > short + 0.2


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


# ----------------------------------------------------------------------------- the LM against Dai et al.'s recurrence


def _sinusoid_ref(dist, E):
    """``[sin(d w_0..), cos(d w_0..)]``, ``w_k = 10000^(-2k/E)``, written out again for the reference."""
    w = 10000.0 ** (-torch.arange(0, E, 2, dtype=torch.float64) / E)
    a = dist.to(torch.float64)[:, None] * w[None, :]
    return torch.cat([a.sin(), a.cos()], 1)


def _reference_lm_logits(lm, tokens):
    """Dai et al. (2019) section 3.2 and their code (pre-norm variant), written independently in plain torch.

    Per segment and layer: the memory holds the *raw* inputs of the layer, detached, and the layer
    normalises ``cat[SG(m), h]`` itself, so LN1's parameters see the memory path: ``LN(SG(m))``.
    Relative scores ``(q_i + u)^T k_j + (q_i + v)^T W_R R_{i-j}`` with each distance looked up.
    """
    B, n = tokens.shape
    E = lm.embed.weight.shape[1]
    L, M = lm.segment, lm.mem_len
    mems = [None] * len(lm.blocks)
    logits = []
    for s in range(0, n, L):
        h = lm.embed.weight[tokens[:, s : s + L]]
        Lc = h.shape[1]
        for li, blk in enumerate(lm.blocks):
            a = blk.attn
            H, d = a.num_heads, a.head_dim
            m = mems[li]
            raw = h if m is None else torch.cat([m, h], 1)
            mems[li] = raw[:, max(0, raw.shape[1] - M) :].detach() if M > 0 else None
            ctx = h if m is None else torch.cat([m.detach(), h], 1)  # cat[SG(m), h]
            c = F.layer_norm(ctx, (E,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)  # then LN
            K = ctx.shape[1]
            Mp = K - Lc
            Wq, Wk, Wv = a.qkv.weight.split(E)
            q = (c[:, Mp:] @ Wq.T).view(B, Lc, H, d)
            k = (c @ Wk.T).view(B, K, H, d)
            v = (c @ Wv.T).view(B, K, H, d)
            dist = Mp + torch.arange(Lc)[:, None] - torch.arange(K)[None, :]  # (Lc, K)
            R = (_sinusoid_ref(dist.clamp(min=0).flatten(), E) @ a.r_net.weight.T).view(Lc, K, H, d)
            score = torch.einsum("bihd,bjhd->bhij", q + a.u, k) + torch.einsum("bihd,ijhd->bhij", q + a.v, R)
            score = (score / math.sqrt(d)).masked_fill(dist < 0, float("-inf"))
            att = torch.einsum("bhij,bjhd->bihd", score.softmax(-1), v).reshape(B, Lc, E)
            h = h + F.linear(att, a.out_proj.weight, a.out_proj.bias)
            f = F.layer_norm(h, (E,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
            f = F.linear(F.gelu(F.linear(f, blk.ff[0].weight, blk.ff[0].bias)), blk.ff[2].weight, blk.ff[2].bias)
            h = h + f
        h = F.layer_norm(h, (E,), lm.norm.weight, lm.norm.bias, lm.norm.eps)
        logits.append(F.linear(h, lm.head.weight, lm.head.bias))
    return torch.cat(logits, 1)


@pytest.mark.parametrize("form", ["parallel", "step"])
def test_lm_logits_and_every_gradient_match_the_papers_recurrence(form):
    """2 layers, L = 4, M = 6, float64: logits and all gradients (LN1 weight and bias included) agree to 1e-12.

    The memory is stored detached and normalised inside the layer, LN(SG(m)): the first LayerNorm of each
    block gets gradient through the memory path too (a model that stored SG(LN(m)) differs there at O(1)).
    """
    torch.manual_seed(0)
    lm = TransformerXLLM(13, 16, 2, layers=2, segment=4, mem_len=6).double()
    with torch.no_grad():  # LayerNorm starts at (1, 0): make its parameters matter
        for p in lm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, 13, (2, 16))
    if form == "parallel":
        ours = lm(tokens)[0]
    else:
        mems, out = None, []
        for s in range(0, 16, 4):
            logits, mems = lm.step(tokens[:, s : s + 4], mems)
            out.append(logits)
        ours = torch.cat(out, 1)
    ref = _reference_lm_logits(lm, tokens)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    up = torch.randn_like(ref)
    names, params = zip(*lm.named_parameters(), strict=True)
    g_ours = torch.autograd.grad(ours, params, up)
    g_ref = torch.autograd.grad(ref, params, up)
    for name, a, b in zip(names, g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    ln = dict(zip(names, g_ref, strict=True))
    assert ln["blocks.0.norm1.weight"].abs().max() > 1e-3  # the gradient that SG(LN(m)) would get wrong


# ----------------------------------------------------------------------------- sizes clamped to the sequence, dtypes


@pytest.mark.parametrize("n, small, big", [(8, (8, 8), (512, 512)), (8, (8, 0), (512, 0)), (16, (4, 12), (4, 512))])
def test_segment_and_memory_longer_than_the_sequence_cost_nothing_extra(n, small, big):
    """A segment of 512 on n = 8 is the sequence; memory beyond the first position is always masked.

    Before the clamp, L = M = 512 on n = 8 padded the input to 512 and cost 52,428,800 FLOPs instead of 26,624.
    """
    torch.manual_seed(0)
    a = TransformerXLAttention(16, 2, *small)
    b = TransformerXLAttention(16, 2, *big)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, n, 16)
    out_a, w_a = a(x, need_weights=True)
    out_b, w_b = b(x, need_weights=True)
    assert torch.equal(out_a, out_b) and torch.equal(w_a, w_b)
    flops = count_flops(lambda: b(x))
    assert flops == count_flops(lambda: a(x))
    assert flops <= count_flops(lambda: transformer_xl_dense(b, x, positions="shift"))  # never above dense
    lm_a, lm_b = TransformerXLLM(7, 16, 2, 1, *small), TransformerXLLM(7, 16, 2, 1, *big)
    lm_b.load_state_dict(lm_a.state_dict())
    tokens = torch.randint(0, 7, (2, n))
    assert torch.equal(lm_a(tokens)[0], lm_b(tokens)[0])
    assert count_flops(lambda: lm_b(tokens)) == count_flops(lambda: lm_a(tokens))


@pytest.mark.parametrize("n", [1, 3, 9, 17])
def test_parallel_form_never_costs_more_than_dense(n):
    """Whatever L and M: clamped sizes, segment 0 without memory slots, the short last segment unpadded.

    Before: n = 17, L = 16, M = 16 cost 2.0x the dense baseline (the last segment padded to 16); now <= 1.
    """
    x = torch.randn(1, n, 16)
    for L in (1, 2, 4, 7, 16, 512):
        for M in (0, 1, 3, 8, 16, 512):
            layer = TransformerXLAttention(16, 2, segment=L, mem_len=M)
            flops = count_flops(partial(layer, x))
            dense = count_flops(partial(transformer_xl_dense, layer, x, positions="shift"))
            assert flops <= dense, (n, L, M, flops, dense)


def test_effective_sizes():
    layer = TransformerXLAttention(8, 2, segment=512, mem_len=512)
    assert layer.effective_sizes(8) == (8, 0)
    layer = TransformerXLAttention(8, 2, segment=4, mem_len=512)
    assert layer.effective_sizes(10) == (4, 8) and layer.effective_sizes(3) == (3, 0)


def test_mixed_dtypes_are_a_clear_error():
    layer = TransformerXLAttention(8, 2, segment=4, mem_len=4)
    x = torch.randn(1, 3, 8)
    with pytest.raises(TypeError, match=r"dtypes must match \(x: torch.float32, memory: torch.float64\)"):
        layer.attend_segment(x, memory=torch.randn(1, 2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"dtypes must match \(the layer's parameters: torch.float32, x: torch.float64\)"):
        layer(x.double())
    with pytest.raises(TypeError, match=r"dtypes must match \(the layer's parameters: torch.float32, x: torch.float64\)"):
        layer.attend_segment(x.double())
    lm = TransformerXLLM(5, 8, 2, 1, 4, 4)
    with pytest.raises(TypeError, match=r"mems\[0\]: torch.float64"):
        lm.step(torch.tensor([[1, 2]]), [torch.randn(1, 2, 8, dtype=torch.float64)])
    # under autocast torch mixes dtypes itself: no error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.bfloat16()).output.shape == (1, 3, 8)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, lm: m.projected_positions([1, 2], torch.float32), TypeError, r"distances must be a 1-D real torch.Tensor \(K,\), got list"),
        (lambda m, lm: m.projected_positions(torch.ones(2, 2), torch.float32), TypeError, r"distances must be a 1-D .*shape \(2, 2\)"),
        (lambda m, lm: m.projected_positions(torch.arange(3), torch.long), TypeError, "dtype must be a floating-point"),
        (lambda m, lm: rel_shift([[1.0]]), TypeError, r"x must be a torch.Tensor of shape \(\.\.\., L, K\)"),
        (lambda m, lm: rel_shift(torch.ones(3)), ValueError, r"x must have shape \(\.\.\., L, K\), at least 2-D"),
        (lambda m, lm: relative_sinusoids([1, 2], 4), TypeError, "distances must be a 1-D"),
        (lambda m, lm: m.attend_segment(torch.randn(1, 3, 8), memory=torch.ones(1, 2, 8, dtype=torch.long)), TypeError, "memory must be a floating-point"),
        (lambda m, lm: m.attend_segment(torch.randn(1, 3, 8), memory=torch.randn(2, 8)), ValueError, r"memory must have shape \(batch, mem_len, embed_dim=8\)"),
        (lambda m, lm: lm.step(torch.tensor([[1, 2]]), [[1.0]]), TypeError, r"mems\[0\] must be a torch.Tensor of shape \(batch=1, mem_len, embed_dim=8\)"),
        (lambda m, lm: lm.step(torch.tensor([[1, 2]]), [torch.randn(2, 2, 8)]), ValueError, r"mems\[0\] must have shape \(batch=1"),
        (lambda m, lm: lm.step(torch.tensor([[1, 2]]), torch.randn(1, 1, 2, 8)), ValueError, "mems must be a list of one tensor per layer"),
        (lambda m, lm: lm.evaluate_cached([[1, 2]]), TypeError, r"tokens must be a torch.Tensor of shape \(batch, n\)"),
        (lambda m, lm: lm.evaluate_recompute(torch.tensor([1, 2])), ValueError, r"tokens must have shape \(batch, n\)"),
    ],
)
def test_bad_input_elsewhere(call, error, match):
    with pytest.raises(error, match=match):
        call(TransformerXLAttention(8, 2, segment=4, mem_len=4), TransformerXLLM(5, 8, 2, 1, 4, 4))


# ----------------------------------------------------------------------------- key_mask (the sequence-mixer protocol)



def _segment_by_segment(layer: TransformerXLAttention, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The recurrent form run by hand: segment s reads the previous M states of x as memory, the mask sliced alongside."""
    L, M = layer.effective_sizes(x.shape[1])
    outs = []
    for s in range(0, x.shape[1], L):
        lo = max(0, s - M)
        mem, mem_mask = (x[:, lo:s], key_mask[:, lo:s]) if s > lo else (None, None)
        outs.append(layer.attend_segment(x[:, s : s + L], memory=mem, memory_mask=mem_mask, key_mask=key_mask[:, s : s + L]).output)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("kind", ["right", "left", "holed"])
@pytest.mark.parametrize("n, L, M", [(17, 5, 3), (16, 4, 4), (9, 3, 7), (6, 8, 8), (10, 4, 0), (13, 1, 512)])
def test_key_mask_equals_dense_reference_forward_and_gradients(kind, n, L, M):
    """float64: outputs, weights (B, h, L, S=n) and every gradient equal the dense reference with the same mask.

    On the original code (eda29e8) ``forward`` had no ``key_mask`` (TypeError).
    """
    torch.manual_seed(2)
    layer = TransformerXLAttention(16, 4, segment=L, mem_len=M).double()
    km = padding_masks(n)[kind]
    x = torch.randn(3, n, 16, dtype=torch.float64, requires_grad=True)
    out, w = layer(x, need_weights=True, key_mask=km)
    ref, w_ref = transformer_xl_dense(layer, x, need_weights=True, key_mask=km)
    assert w.shape == (3, 4, n, n)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w, w_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer(x, key_mask=km).output, out, atol=1e-12, rtol=1e-12)  # need_weights=False path
    assert (w.transpose(1, 3)[~km] == 0).all()  # (B, S, L, h) at padded keys: no weight on a padded key
    # the recurrent form, segment by segment with memory_mask and key_mask, gives the same outputs
    torch.testing.assert_close(_segment_by_segment(layer, x, km), out, atol=1e-12, rtol=1e-12)
    up = torch.randn_like(out)
    params = [x, layer.u, layer.v, layer.r_net.weight, layer.qkv.weight, layer.out_proj.weight]
    for a, b in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("kind", ["right", "left", "holed"])
def test_padded_content_never_reaches_real_outputs_nor_later_memory(kind):
    """Padded states change nothing at real positions, in their segment or as memory of later ones; no NaN."""
    torch.manual_seed(0)
    n = 16
    layer = TransformerXLAttention(16, 4, segment=4, mem_len=6).double()
    km = padding_masks(n)[kind]
    x = torch.randn(3, n, 16, dtype=torch.float64, requires_grad=True)
    other = 1e3 * torch.randn(3, n, 16, dtype=torch.float64)
    out = layer(x, key_mask=km).output
    out2 = layer(torch.where(km[..., None], x, other), key_mask=km).output
    torch.testing.assert_close(out2[km], out[km], atol=1e-12, rtol=1e-12)
    (g,) = torch.autograd.grad(out[km].sum(), x)
    assert (g[~km] == 0).all() and g[km].abs().max() > 0  # nothing flows to or from padded states
    # a query with no visible key (a left-padded first token: causal, every earlier key padded) -> zero row, no NaN
    left = padding_masks(n)["left"]
    o, w = layer(x, need_weights=True, key_mask=left)
    assert torch.isfinite(o).all() and torch.isfinite(w).all()
    empty = ~(left.cumsum(1) > 0)  # (B, n): no real token at or before this position
    assert empty.any() and (w.transpose(1, 2)[empty] == 0).all()
    torch.testing.assert_close(o[empty], layer.out_proj.bias.expand(int(empty.sum()), -1))
    # an all-True mask is no mask
    torch.testing.assert_close(layer(x, key_mask=torch.ones(3, n, dtype=torch.bool)).output, layer(x).output, atol=1e-13, rtol=0)


def test_key_mask_bad_input_and_registered_build():
    layer = registry.get("transformer_xl").build(16, 4)
    x = torch.randn(2, 10, 16)
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool tensor"):
        layer(x, key_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=2, n=10\)"):
        layer(x, key_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=2, L=3\)"):
        layer.attend_segment(x[:, :3], key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError):
        layer(x, True, None, torch.ones(2, 10, dtype=torch.bool))  # keyword only
    km = torch.ones(2, 10, dtype=torch.bool)
    km[1, 6:] = False
    out, w = layer(x, key_mask=km, need_weights=True)
    assert out.shape == (2, 10, 16) and w.shape == (2, 4, 10, 10)
    assert layer(x[:0], key_mask=km[:0], need_weights=True).weights.shape == (0, 4, 10, 10)


def test_one_interface_always_causal_and_memory_keyword_only():
    """Issue 23: TransformerXLAttention follows the SequenceMixer protocol: options keyword-only,
    ``is_causal=False`` refused with a ValueError saying why, the memory of ``attend_segment`` keyword-only,
    registered causal; the chapter's LM and task live in attn.experiments.transformer_xl."""
    torch.manual_seed(0)
    layer = TransformerXLAttention(8, 2, segment=4, mem_len=4)
    x = torch.randn(2, 10, 8)
    torch.testing.assert_close(layer(x, is_causal=True).output, layer(x).output)
    with pytest.raises(ValueError, match="always causal"):
        layer(x, is_causal=False)
    with pytest.raises(TypeError):
        layer(x, True)  # need_weights is keyword-only
    with pytest.raises(TypeError):
        layer.attend_segment(x[:, :4], x[:, 4:])  # the memory is keyword-only
    assert registry.get("transformer_xl").causal is True
    import attn.transformer_xl as module

    assert not hasattr(module, "TransformerXLLM") and not hasattr(module, "sinusoid_table")
