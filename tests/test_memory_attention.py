"""Chapter 15: persistent memory and Memorizing-Transformer kNN attention against their references."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from masking import padding_masks
from torch import nn

from attn import registry
from attn.benchmark import count_flops
from attn.core import masked_softmax
from attn.experiments.memory_attention import (
    FarRecallTask,
    LookupModel,
    LookupTask,
    MemoryRecallModel,
    StreamRecallTask,
    _fresh_bank,
    evaluate_streaming,
    far_recall_loss,
    run_far_recall,
    run_lookup,
    train_streaming,
)
from attn.masks import padding_mask
from attn.memory_attention import (
    KNNMemory,
    MemorizingAttention,
    PersistentMemoryAttention,
    faiss_available,
    knn_attention,
    knn_attention_dense,
)
from attn.multihead import MultiHeadAttention
from attn.train import cpu_threads, evaluate, set_seed, train
from attn.transformer_xl import TransformerXLAttention


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one CPU thread is far faster than several on a shared machine (see attn.train.cpu_threads)."""
    with cpu_threads(1):
        yield


# ----------------------------------------------------------------------------- persistent memory


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masks", ["none", "padding", "causal"])
def test_one_slot_equals_torch_multihead_with_add_bias_kv(need_weights, masks):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True)
    ours = PersistentMemoryAttention(16, 4, slots=1).load_torch_weights(ref)
    x = torch.randn(3, 7, 16, requires_grad=True)
    km = padding_mask([7, 5, 2], 7) if masks == "padding" else None
    causal = masks == "causal"
    out, w = ours(x, key_mask=km, is_causal=causal, need_weights=need_weights, include_memory=True)
    torch_mask = torch.ones(7, 7, dtype=torch.bool).triu(1) if causal else None  # torch adds the column for the bias slot
    r_out, r_w = ref(x, x, x, key_padding_mask=None if km is None else ~km, attn_mask=torch_mask,
                     need_weights=need_weights, average_attn_weights=False)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(w, r_w, atol=1e-5, rtol=1e-5)
    up = torch.randn_like(out)
    g1 = torch.autograd.grad(out, [x, ours.memory_k, ours.memory_v], up)
    g2 = torch.autograd.grad(r_out, [x, ref.bias_k, ref.bias_v], up)
    torch.testing.assert_close(g1[0], g2[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1[1].flatten(), g2[1].flatten(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1[2].flatten(), g2[2].flatten(), atol=1e-5, rtol=1e-5)


def test_slots_equal_sdpa_over_concatenated_keys():
    torch.manual_seed(0)
    mod = PersistentMemoryAttention(12, 3, slots=5).double()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    split = lambda t: t.view(2, -1, 3, 4).transpose(1, 2)  # noqa: E731
    q, k, v = split(mod.q_proj(x)), split(mod.k_proj(x)), split(mod.v_proj(x))
    k = torch.cat([k, mod.memory_k.expand(2, -1, -1, -1)], 2)
    v = torch.cat([v, mod.memory_v.expand(2, -1, -1, -1)], 2)
    mask = torch.cat([torch.ones(6, 6, dtype=torch.bool).tril(), torch.ones(6, 5, dtype=torch.bool)], 1)
    ref = mod.out_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(2, 6, 12))
    out, w = mod(x, is_causal=True, need_weights=True)
    torch.testing.assert_close(out, ref)
    assert w.shape == (2, 3, 6, 6) and (w.sum(-1) < 1).all()  # the rest of each row sits on the slots
    full = mod(x, is_causal=True, need_weights=True, include_memory=True).weights
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 3, 6, dtype=torch.float64))
    torch.testing.assert_close(full[..., :6], w)


def test_persistent_gradcheck_and_properties():
    torch.manual_seed(0)
    mod = PersistentMemoryAttention(4, 2, slots=3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    km = padding_mask([5, 3], 5)
    assert torch.autograd.gradcheck(lambda x: mod(x, key_mask=km, is_causal=True).output, (x,))
    assert torch.autograd.gradcheck(lambda x: mod(x, need_weights=True, include_memory=True).weights, (x,))
    # padding keys have no influence; a row whose every token is padding still sees the slots: no NaN
    y = x.detach().clone()
    y[1, 3:] += 50
    torch.testing.assert_close(mod(y, key_mask=km).output[1, :3], mod(x, key_mask=km).output[1, :3].detach())
    all_pad = mod(x, key_mask=torch.zeros(2, 5, dtype=torch.bool)).output
    assert torch.isfinite(all_pad).all()
    # causal ignores the future; batched equals per-example
    z = x.detach().clone()
    z[:, 3:] = torch.randn_like(z[:, 3:])
    torch.testing.assert_close(mod(z, is_causal=True).output[:, :3], mod(x, is_causal=True).output[:, :3].detach())
    torch.testing.assert_close(mod(x).output, torch.cat([mod(x[i : i + 1]).output for i in range(2)]))
    # zero slots is plain multi-head attention
    plain = PersistentMemoryAttention(4, 2, slots=0).double()
    w = plain(x, need_weights=True, include_memory=True).weights
    assert w.shape == (2, 2, 5, 5)


# ----------------------------------------------------------------------------- kNN retrieval


@pytest.mark.parametrize("top_k", [1, 3, 8, 50])
def test_knn_attention_equals_dense_masked_baseline(top_k):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 3, 20, 8, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 3, 20, 6, dtype=torch.float64, requires_grad=True)
    got = knn_attention(q, keys, values, top_k)
    ref = knn_attention_dense(q, keys, values, top_k)
    torch.testing.assert_close(got.output, ref.output, atol=1e-12, rtol=1e-12)
    k = min(top_k, 20)
    assert got.indices.shape == (2, 3, 5, k)
    # the retrieved weights are the dense weights at the retrieved indices; nothing else is non-zero
    torch.testing.assert_close(ref.weights.gather(-1, got.indices), got.weights)
    assert ((ref.weights > 0).sum(-1) == k).all()
    up = torch.randn_like(got.output)
    for a, b in zip(torch.autograd.grad(got.output, (q, keys, values), up), torch.autograd.grad(ref.output, (q, keys, values), up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    if top_k >= 20:  # the whole bank: plain attention
        torch.testing.assert_close(got.output, F.scaled_dot_product_attention(q, keys, values), atol=1e-12, rtol=1e-12)


def test_knn_retrieves_the_largest_inner_products_explicitly():
    q = torch.tensor([[[[1.0, 0.0]]]])  # (1, 1, 1, 2)
    keys = torch.tensor([[[[0.1, 0.0], [3.0, 0.0], [-5.0, 0.0], [2.0, 9.0], [2.5, 0.0]]]])
    got = knn_attention(q, keys, keys, 2)
    assert set(got.indices.flatten().tolist()) == {1, 4}  # q.k = 3.0 and 2.5
    s = torch.tensor([3.0, 2.5]) / math.sqrt(2)
    torch.testing.assert_close(got.weights.flatten(), s.softmax(0))


def test_knn_gradcheck():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(1, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    values = torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: knn_attention(q, k, v, 3).output, (q, keys, values))


@pytest.mark.skipif(not faiss_available(), reason="faiss is optional and not installed")
def test_faiss_backend_gives_the_same_results():
    torch.manual_seed(0)
    q, keys, values = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    a = knn_attention(q, keys, values, 5)
    b = knn_attention(q, keys, values, 5, backend="faiss")
    assert torch.equal(a.indices.sort(-1).values, b.indices.sort(-1).values)
    torch.testing.assert_close(a.output, b.output, atol=1e-5, rtol=1e-5)


def test_faiss_missing_is_a_clear_error():
    if faiss_available():
        pytest.skip("faiss is installed")
    with pytest.raises(ImportError, match="faiss"):
        knn_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), 2, backend="faiss")


def test_memory_bank_is_bounded_fifo_and_not_differentiable():
    bank = KNNMemory(capacity=5)
    k = torch.randn(2, 3, 4, 8, requires_grad=True)
    bank.add(k, k * 2, torch.arange(4))
    assert bank.size == 4 and not bank.keys.requires_grad
    bank.add(k + 1, k, torch.arange(4, 8))
    assert bank.size == 5 and bank.positions.tolist() == [3, 4, 5, 6, 7]  # the oldest left first
    torch.testing.assert_close(bank.keys[:, :, 0], k[:, :, 3].detach())
    torch.testing.assert_close(bank.keys[:, :, 1:], (k + 1)[:, :, :4].detach())
    with pytest.raises(ValueError, match="do not match the bank"):
        bank.add(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8), torch.arange(2))
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        KNNMemory(0)


# ----------------------------------------------------------------------------- Memorizing attention


def explicit_memorizing(layer: MemorizingAttention, x: torch.Tensor) -> torch.Tensor:
    """Reference: each segment by explicit dense formulas, the bank kept as a plain list of past keys/values."""
    B, n, E = x.shape
    h, d, L = layer.num_heads, layer.head_dim, layer.segment
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    q, k, v = (t.view(B, n, h, d).transpose(1, 2) for t in (q, k, v))
    outs = []
    for start in range(0, n, L):
        stop = min(start + L, n)
        qs, ks, vs = q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop]
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(d)
        causal = torch.ones(stop - start, stop - start, dtype=torch.bool).tril()
        local = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vs
        first = max(0, start - layer.capacity)
        if start > 0 and layer.top_k > 0:
            bk, bv = k[:, :, first:start].detach(), v[:, :, first:start].detach()  # the bounded bank
            s = qs @ bk.transpose(-1, -2) / math.sqrt(d)
            kk = min(layer.top_k, start - first)
            keep = s >= s.topk(kk, -1).values[..., -1:]
            mem = s.masked_fill(~keep, float("-inf")).softmax(-1) @ bv
            g = torch.sigmoid(layer.gate_bias)[None, :, None, None]
            local = g * mem + (1 - g) * local
        outs.append(local)
    out = torch.cat(outs, 2).transpose(1, 2).reshape(B, n, E)
    return layer.out_proj(out)


@pytest.mark.parametrize("n, L, top_k, capacity", [(20, 4, 3, 8), (23, 5, 2, 100), (12, 4, 0, 8), (9, 3, 50, 3)])
def test_memorizing_attention_equals_explicit_reference(n, L, top_k, capacity):
    torch.manual_seed(0)
    layer = MemorizingAttention(8, 2, segment=L, top_k=top_k, capacity=capacity).double()
    with torch.no_grad():
        layer.gate_bias.copy_(torch.tensor([0.7, -1.2]))
    x = torch.randn(2, n, 8, dtype=torch.float64, requires_grad=True)
    out, w = layer(x, need_weights=True)
    ref = explicit_memorizing(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, n, dtype=torch.float64))  # effective weights: rows sum to 1
    assert (w.triu(1) == 0).all()  # nothing from the future
    up = torch.randn_like(out)
    params = [x, layer.gate_bias, layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight, layer.out_proj.weight]
    kw = {"allow_unused": True, "materialize_grads": True}  # top_k = 0 leaves the gate unused
    for a, b in zip(torch.autograd.grad(out, params, up, **kw), torch.autograd.grad(ref, params, up, **kw), strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)


def test_effective_weights_reproduce_the_output():
    """sum_j W_ij v_j, with the weights forward() returns and values from the same projection, gives the output."""
    torch.manual_seed(0)
    layer = MemorizingAttention(8, 2, segment=4, top_k=3, capacity=6).double()
    x = torch.randn(1, 14, 8, dtype=torch.float64)
    out, w = layer(x, need_weights=True)
    v = layer.v_proj(x).view(1, 14, 2, 4).transpose(1, 2)
    mixed = (w @ v).transpose(1, 2).reshape(1, 14, 8)
    torch.testing.assert_close(layer.out_proj(mixed), out)


def test_memorizing_gradcheck_and_gate_limits():
    torch.manual_seed(0)
    layer = MemorizingAttention(4, 2, segment=3, top_k=2, capacity=4).double()
    x = torch.randn(1, 8, 4, dtype=torch.float64, requires_grad=True)
    # the memory is detached, so the check runs on one segment against a fixed bank
    bank = KNNMemory(4)
    bank.add(torch.randn(1, 2, 4, 2, dtype=torch.float64), torch.randn(1, 2, 4, 2, dtype=torch.float64), torch.arange(4))
    assert torch.autograd.gradcheck(lambda s: layer.attend_segment(s, bank).output, (x[:, :3],))
    # gate -> 0: local causal attention only, as with top_k = 0
    with torch.no_grad():
        layer.gate_bias.fill_(-1e4)
        local_only = layer(x.detach()).output
        layer.top_k = 0
        torch.testing.assert_close(layer(x.detach()).output, local_only)
    # gate -> 1, top_k >= bank: segment 2 is plain attention over everything before it (the whole bank)
    layer.top_k, layer.capacity = 50, 50
    with torch.no_grad():
        layer.gate_bias.fill_(1e4)
        out = layer(x.detach()).output
        q, k, v = layer.q_proj(x.detach()), layer.k_proj(x.detach()), layer.v_proj(x.detach())
        q, k, v = (t.view(1, 8, 2, 2).transpose(1, 2) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(q[:, :, 6:], k[:, :, :6], v[:, :, :6]).transpose(1, 2).reshape(1, 2, 4)
    torch.testing.assert_close(out[:, 6:], layer.out_proj(ref))


def test_memorizing_properties():
    torch.manual_seed(0)
    layer = MemorizingAttention(8, 2, segment=4, top_k=2, capacity=8)
    x = torch.randn(3, 16, 8)
    out = layer(x).output
    torch.testing.assert_close(out, torch.cat([layer(x[i : i + 1]).output for i in range(3)]))  # batched == per-example
    y = x.clone()
    y[:, 10:] = torch.randn_like(y[:, 10:])
    torch.testing.assert_close(layer(y).output[:, :10], out[:, :10])  # causal: the future has no effect
    # a stream read in two calls with one memory equals one call
    bank = KNNMemory(8)
    two = torch.cat([layer(x[:, :8], memory=bank).output, layer(x[:, 8:], memory=bank).output], 1)
    torch.testing.assert_close(two, out)
    # beyond the capacity, old segments are forgotten: changing tokens 0..3 leaves segment 3 (positions 12..15) alone
    z = x.clone()
    z[:, :4] += 5.0
    torch.testing.assert_close(layer(z).output[:, 12:], out[:, 12:])
    assert (layer(z).output[:, 4:8] - out[:, 4:8]).abs().max() > 1e-4


def test_empty_batch_and_bad_input():
    layer = MemorizingAttention(8, 2, segment=4)
    out, w = layer(torch.randn(0, 6, 8), need_weights=True)
    assert out.shape == (0, 6, 8) and w.shape == (0, 2, 6, 6)
    pm = PersistentMemoryAttention(8, 2, slots=3)
    out, w = pm(torch.randn(0, 6, 8), need_weights=True, include_memory=True)
    assert out.shape == (0, 6, 8) and w.shape == (0, 2, 6, 9)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, p: m([[0.0] * 8]), TypeError, r"x must be a torch.Tensor of shape \(batch, seq, embed_dim=8\)"),
        (lambda m, p: p([[0.0] * 8]), TypeError, r"x must be a torch.Tensor of shape \(batch, seq, embed_dim=8\)"),
        (lambda m, p: m(torch.ones(1, 4, 8, dtype=torch.long)), TypeError, "floating-point"),
        (lambda m, p: p(torch.randn(4, 8)), ValueError, r"\(batch, seq, embed_dim=8\)"),
        (lambda m, p: m(torch.randn(1, 4, 6)), ValueError, r"embed_dim=8\), got \(1, 4, 6\)"),
        (lambda m, p: m(torch.randn(1, 0, 8)), ValueError, r"empty sequence|at least one token"),
        (lambda m, p: p(torch.randn(1, 4, 8), key_mask=torch.ones(1, 4)), TypeError, "key_mask must be a torch.bool"),
        (lambda m, p: p(torch.randn(1, 4, 8), key_mask=torch.ones(1, 3, dtype=torch.bool)), ValueError, r"key_mask must have shape \(batch=1, n=4\)"),
        (lambda m, p: knn_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 4), 2), ValueError, "must share"),
        (lambda m, p: knn_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 4), 2), ValueError, "empty"),
        (lambda m, p: knn_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 0), ValueError, "top_k must be >= 1"),
        (lambda m, p: knn_attention([1.0], torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 2), TypeError, r"q must be a torch.Tensor"),
        (lambda m, p: knn_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 2, backend="annoy"), ValueError, "backend"),
        (lambda m, p: m.attend_segment(torch.randn(2, 4, 8), _bank(1)), ValueError, r"memory holds"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(MemorizingAttention(8, 2, segment=4), PersistentMemoryAttention(8, 2, slots=2))


def _bank(batch):
    bank = KNNMemory(4)
    bank.add(torch.randn(batch, 2, 3, 4), torch.randn(batch, 2, 3, 4), torch.arange(3))
    return bank


def test_bad_construction():
    with pytest.raises(ValueError, match="divisible"):
        MemorizingAttention(10, 3)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        MemorizingAttention(8, 2, top_k=-1)
    with pytest.raises(TypeError, match="capacity must be an int"):
        MemorizingAttention(8, 2, capacity=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slots must be >= 0"):
        PersistentMemoryAttention(8, 2, slots=-1)
    with pytest.raises(ValueError, match="add_bias_kv"):
        PersistentMemoryAttention(8, 2, slots=2).load_torch_weights(nn.MultiheadAttention(8, 2, add_bias_kv=True))


# ----------------------------------------------------------------------------- the task and the registry


def test_far_recall_task():
    task = FarRecallTask(n_keys=24, n_values=8, segment=8, segments=3, p_near=0.5)
    b = task.sample(64, torch.Generator().manual_seed(0))
    rows = torch.arange(64)
    assert b["keys"].shape == (64, 24)
    assert torch.equal(b["keys"][rows, b["where"]], b["keys"][:, -1])
    assert torch.equal(b["values"][rows, b["where"]], b["y"])
    assert torch.equal(b["far"], b["where"] < 16) and 0 < b["far"].sum() < 64
    assert (b["keys"][:, :-1].sort(-1).values.diff(dim=-1) > 0).all()  # distinct keys
    with pytest.raises(ValueError, match="n_keys"):
        FarRecallTask(n_keys=10, segment=8, segments=3)


def test_memory_answers_beyond_the_window():
    task = FarRecallTask(n_keys=24, n_values=8, segment=8, segments=3, p_near=0.5)
    far = FarRecallTask(n_keys=24, n_values=8, segment=8, segments=3, p_near=0.0)
    accs = {}
    for top_k in (4, 0):
        set_seed(0)
        model = MemoryRecallModel(task, 32, 2, top_k=top_k)
        train(model, task.sample, far_recall_loss, steps=100, batch_size=32, lr=1e-2, progress=False)
        accs[top_k] = evaluate(model, far.sample, far_recall_loss, batch_size=256)["acc_far"]
    assert accs[4] > 0.8 and accs[0] < 0.25, accs


def test_registry_builds():
    for name, cls in (("persistent_memory", PersistentMemoryAttention), ("memorizing", MemorizingAttention)):
        mech = registry.get(name)
        assert mech.chapter == 15 and mech.cls is cls and mech.build is not None
        layer = mech.build(32, 4)
        x = torch.randn(2, 19, 32)
        out, w = layer(x, need_weights=True)
        assert out.shape == (2, 19, 32) and w.shape == (2, 4, 19, 19)
        assert layer(x).weights is None


@pytest.mark.parametrize("n, L, top_k, capacity", [(21, 4, 3, 6), (16, 4, 2, 3), (13, 5, 9, 7), (8, 8, 2, 4)])
def test_parallel_form_equals_segment_by_segment_bank(n, L, top_k, capacity):
    torch.manual_seed(0)
    layer = MemorizingAttention(8, 2, segment=L, top_k=top_k, capacity=capacity).double()
    with torch.no_grad():
        layer.gate_bias.copy_(torch.tensor([0.3, -0.4]))
    x = torch.randn(2, n, 8, dtype=torch.float64)
    par, w_par = layer.forward_parallel(x, need_weights=True)
    seq, w_seq = layer(x, need_weights=True, memory=KNNMemory(capacity))
    torch.testing.assert_close(par, seq, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w_par, w_seq, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- sizes clamped to the sequence, dtypes, bad input


@pytest.mark.parametrize("n, small, big", [(8, (8, 64), (512, 64)), (8, (8, 64), (512, 512)), (16, (4, 12), (4, 512)), (17, (17, 64), (512, 512))])
def test_segment_and_capacity_longer_than_the_sequence_cost_nothing_extra(n, small, big):
    """A segment of 512 on n = 8 is the sequence; bank slots before position 0 are always empty.

    Before the clamp, segment 512 on n = 8 padded the input to 512: 17,567,744 FLOPs instead of 20,480.
    """
    torch.manual_seed(0)
    a = MemorizingAttention(16, 2, segment=small[0], top_k=4, capacity=small[1])
    b = MemorizingAttention(16, 2, segment=big[0], top_k=4, capacity=big[1])
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, n, 16)
    out_a, w_a = a(x, need_weights=True)
    out_b, w_b = b(x, need_weights=True)
    assert torch.equal(out_a, out_b) and torch.equal(w_a, w_b)
    assert count_flops(lambda: b(x)) == count_flops(lambda: a(x))


@pytest.mark.parametrize("n", [1, 3, 9, 17])
def test_parallel_form_never_costs_more_than_dense(n):
    """Whatever L, C, k: never above dense causal multi-head attention over n (same projections).

    Before: n = 17, L = 16 cost 2.1x dense (the last segment padded to 16, segment 0 searching an empty window).
    """
    x = torch.randn(1, n, 16)
    dense = count_flops(lambda: MultiHeadAttention(16, 2)(x, is_causal=True))
    for L in (1, 2, 4, 7, 16, 512):
        for C in (1, 3, 16, 512):
            layer = MemorizingAttention(16, 2, segment=L, top_k=4, capacity=C)
            flops = count_flops(partial(layer, x))
            assert flops <= dense, (n, L, C, flops, dense)


def test_effective_sizes():
    assert MemorizingAttention(8, 2, segment=512, capacity=512).effective_sizes(8) == (8, 0)
    assert MemorizingAttention(8, 2, segment=4, capacity=512).effective_sizes(10) == (4, 8)


def _bank64(batch=1, dtype=torch.float64):
    bank = KNNMemory(8)
    bank.add(torch.randn(batch, 2, 3, 4, dtype=dtype), torch.randn(batch, 2, 3, 4, dtype=dtype), torch.arange(3))
    return bank


def test_mixed_dtypes_are_a_clear_error():
    layer = MemorizingAttention(8, 2, segment=4)
    x = torch.randn(1, 4, 8)
    msg = r"dtypes must match \(x \(projected to queries\): torch.float32, memory.keys: torch.float64"
    with pytest.raises(TypeError, match=msg):
        layer.attend_segment(x, _bank64())
    with pytest.raises(TypeError, match=msg):
        layer(x, memory=_bank64())
    with pytest.raises(TypeError, match=r"dtypes must match \(the layer's parameters: torch.float32, x: torch.float64\)"):
        layer(x.double())
    with pytest.raises(TypeError, match=r"dtypes must match \(the layer's parameters: torch.float32, x: torch.float64\)"):
        PersistentMemoryAttention(8, 2)(x.double())
    with pytest.raises(TypeError, match=r"dtypes must match \(q: torch.float32, keys: torch.float64, values: torch.float64\)"):
        knn_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4).double(), torch.randn(1, 2, 5, 4).double(), 2)
    with pytest.raises(TypeError, match=r"dtypes must match \(keys: torch.float32, values: torch.float64\)"):
        KNNMemory(4).add(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).double(), torch.arange(3))
    with pytest.raises(TypeError, match=r"the bank's keys: torch.float64"):
        _bank64().add(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.arange(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torch mixes dtypes itself under autocast: no error
        assert layer(x).output.shape == (1, 4, 8)


_q, _kv = lambda: torch.randn(1, 2, 3, 4), lambda: torch.randn(1, 2, 5, 4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: KNNMemory(4).add([[1.0]], [[1.0]], [0]), TypeError, r"keys must be a torch.Tensor of shape \(batch, heads, L, d\), got list"),
        (lambda: KNNMemory(4).add(_kv(), [[1.0]], torch.arange(5)), TypeError, r"values must be a torch.Tensor of shape \(batch, heads, L, d_v\), got list"),
        (lambda: KNNMemory(4).add(_kv(), _kv(), [0, 1, 2, 3, 4]), TypeError, r"positions must be an integer torch.Tensor .*shape \(L=5,\), got list"),
        (lambda: KNNMemory(4).add(_kv(), _kv(), torch.zeros(5)), TypeError, r"positions must be an integer .*got dtype torch.float32"),
        (lambda: KNNMemory(4).add(_kv(), _kv(), torch.arange(4)), ValueError, r"positions must have shape \(L=5,\)"),
        (lambda: KNNMemory(4).add(torch.ones(1, 2, 5, 4, dtype=torch.long), _kv(), torch.arange(5)), TypeError, "keys must be a floating-point"),
        (lambda: KNNMemory(4).add(torch.randn(2, 5, 4), _kv(), torch.arange(5)), ValueError, r"keys must have shape \(batch, heads, L, d\), got 3-D"),
        (lambda: KNNMemory(4).add(_kv(), torch.randn(1, 2, 4, 4), torch.arange(5)), ValueError, r"values must have shape \(batch, heads, L, d_v\)"),
        (lambda: _bank64(1, torch.float32).add(_kv(), torch.randn(1, 2, 5, 6), torch.arange(5)), ValueError, "values must have d_v = 4"),
        (lambda: knn_attention_dense([1.0], _kv(), _kv(), 2), TypeError, r"q must be a torch.Tensor"),
        (lambda: knn_attention_dense(_q(), _kv(), _kv(), 0), ValueError, "top_k must be >= 1"),
        (lambda: knn_attention_dense(_q(), torch.randn(1, 2, 5, 3), _kv(), 2), ValueError, "must share"),
        (lambda: knn_attention(_q(), _kv(), _kv(), 2, scale=-1.0), ValueError, "scale must be > 0"),
        (lambda: MemorizingAttention(8, 2)(torch.randn(1, 4, 8), memory=[1.0]), TypeError, "memory must be a KNNMemory"),
        (lambda: MemorizingAttention(8, 2).attend_segment(torch.randn(1, 4, 8), {"k": 1}), TypeError, "memory must be a KNNMemory"),
        (lambda: MemorizingAttention(8, 2).forward_parallel([[1.0]]), TypeError, r"x must be a torch.Tensor of shape \(batch, seq, embed_dim=8\)"),
        (lambda: PersistentMemoryAttention(8, 2, slots=1).load_torch_weights("mha"), TypeError, "mha must be a torch.nn.MultiheadAttention"),
        (lambda: MemoryRecallModel(FarRecallTask(n_keys=24, segment=4, segments=3))(torch.full((1, 12), 99), torch.zeros(1, 12, dtype=torch.long)), ValueError, r"keys must be token ids in \[0, 24\)"),
        (lambda: MemoryRecallModel(FarRecallTask(n_keys=24, segment=4, segments=3))(torch.zeros(1, 12), torch.zeros(1, 12)), TypeError, "keys must hold integer token ids"),
    ],
)
def test_bad_input_elsewhere(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_empty_inputs():
    bank = KNNMemory(4)
    bank.add(torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 4), torch.arange(0))  # nothing to add: a no-op
    assert bank.size == 0
    layer = MemorizingAttention(8, 2, segment=4)
    out, w = layer(torch.randn(0, 5, 8), need_weights=True, memory=KNNMemory(3))
    assert out.shape == (0, 5, 8) and w.shape == (0, 2, 5, 5)
    assert layer.forward_parallel(torch.randn(0, 5, 8)).output.shape == (0, 5, 8)


# ----------------------------------------------------------------------------- key_mask (the sequence-mixer protocol)



def explicit_memorizing_masked(layer: MemorizingAttention, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Reference with padding: dense per segment; padded keys hidden locally and padded bank entries never retrieved.

    A query whose bank window holds no real entry uses local attention alone; a row with no visible key is zero.
    """
    B, n, E = x.shape
    h, d, L = layer.num_heads, layer.head_dim, layer.segment
    q, k, v = (t.view(B, n, h, d).transpose(1, 2) for t in (layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)))
    outs = []
    for start in range(0, n, L):
        stop = min(start + L, n)
        qs, ks, vs = q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop]
        causal = torch.ones(stop - start, stop - start, dtype=torch.bool).tril()
        visible = causal & key_mask[:, None, None, start:stop]
        local = masked_softmax(qs @ ks.transpose(-1, -2) / math.sqrt(d), visible) @ vs
        first = max(0, start - layer.capacity)
        if start > 0 and layer.top_k > 0:
            bk, bv = k[:, :, first:start].detach(), v[:, :, first:start].detach()  # the bounded bank
            real = key_mask[:, None, None, first:start]
            s = (qs @ bk.transpose(-1, -2) / math.sqrt(d)).masked_fill(~real, float("-inf"))
            kk = min(layer.top_k, start - first)
            keep = (s >= s.topk(kk, -1).values[..., -1:]) & real
            mem = masked_softmax(s, keep) @ bv
            g = torch.sigmoid(layer.gate_bias)[None, :, None, None] * keep.any(-1, keepdim=True)
            local = g * mem + (1 - g) * local
        outs.append(local)
    return layer.out_proj(torch.cat(outs, 2).transpose(1, 2).reshape(B, n, E))


@pytest.mark.parametrize("kind", ["right", "left", "holed"])
@pytest.mark.parametrize("n, L, top_k, capacity", [(20, 4, 3, 8), (23, 5, 2, 100), (12, 4, 0, 8), (9, 3, 50, 3), (16, 16, 4, 64)])
def test_key_mask_equals_explicit_reference_forward_and_gradients(kind, n, L, top_k, capacity):
    """float64: parallel form, segment-by-segment bank and the explicit reference agree, weights (B, h, L, S=n) too.

    On the original code (eda29e8) ``forward`` had no ``key_mask`` (TypeError).
    """
    torch.manual_seed(0)
    layer = MemorizingAttention(8, 2, segment=L, top_k=top_k, capacity=capacity).double()
    with torch.no_grad():
        layer.gate_bias.copy_(torch.tensor([0.7, -1.2]))
    km = padding_masks(n)[kind]
    x = torch.randn(3, n, 8, dtype=torch.float64, requires_grad=True)
    out, w = layer(x, need_weights=True, key_mask=km)
    ref = explicit_memorizing_masked(layer, x, km)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    seq, w_seq = layer(x, need_weights=True, memory=KNNMemory(capacity), key_mask=km)
    torch.testing.assert_close(seq, out, atol=1e-12, rtol=1e-12)
    assert w.shape == (3, 2, n, n)
    torch.testing.assert_close(w_seq, w, atol=1e-12, rtol=1e-12)
    assert (w.transpose(1, 3)[~km] == 0).all()  # (B, S, L, h) at padded keys: no weight on a padded key
    v = layer.v_proj(x).view(3, n, 2, 4).transpose(1, 2)  # the weights reproduce the output
    torch.testing.assert_close(layer.out_proj((w @ v).transpose(1, 2).reshape(3, n, 8)), out, atol=1e-12, rtol=1e-12)
    up = torch.randn_like(out)
    params = [x, layer.gate_bias, layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight, layer.out_proj.weight]
    kw = {"allow_unused": True, "materialize_grads": True}  # top_k = 0 leaves the gate unused
    for a, b in zip(torch.autograd.grad(out, params, up, **kw), torch.autograd.grad(ref, params, up, **kw), strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("kind", ["right", "left", "holed"])
def test_padded_content_never_reaches_real_outputs_nor_the_bank(kind):
    """Padded tokens change nothing at real positions: not locally, not through the kNN bank, not in a later call."""
    torch.manual_seed(0)
    n = 16
    layer = MemorizingAttention(16, 4, segment=4, top_k=3, capacity=6).double()
    km = padding_masks(n)[kind]
    x = torch.randn(3, n, 16, dtype=torch.float64, requires_grad=True)
    x2 = torch.where(km[..., None], x, 1e3 * torch.randn(3, n, 16, dtype=torch.float64))
    out = layer(x, key_mask=km).output
    torch.testing.assert_close(layer(x2, key_mask=km).output[km], out[km], atol=1e-12, rtol=1e-12)
    (g,) = torch.autograd.grad(out[km].sum(), x)
    assert (g[~km] == 0).all() and g[km].abs().max() > 0
    # a stream over two calls: the padded entries of call 1 sit in the bank marked invalid and are never retrieved
    nxt = torch.randn(3, 8, 16, dtype=torch.float64)
    outs = []
    for first in (x, x2):
        bank = KNNMemory(6)
        layer(first.detach(), memory=bank, key_mask=km)
        assert bank.valid is not None and torch.equal(bank.valid, km[:, -6:])
        outs.append(layer(nxt, memory=bank).output)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-12)
    # rows with no visible key at all (left padding, segment 0: no bank yet) are zero rows, not NaN
    left = padding_masks(n)["left"]
    o, w = layer(x, need_weights=True, key_mask=left)
    assert torch.isfinite(o).all() and torch.isfinite(w).all()
    empty = ~(left.cumsum(1) > 0)
    empty[:, 4:] = False  # later segments may retrieve real entries
    assert empty.any() and (w.transpose(1, 2)[empty] == 0).all()
    torch.testing.assert_close(o[empty], layer.out_proj.bias.expand(int(empty.sum()), -1))
    torch.testing.assert_close(layer(x, key_mask=torch.ones(3, n, dtype=torch.bool)).output, layer(x).output, atol=1e-13, rtol=0)


@pytest.mark.parametrize("top_k", [1, 3, 9])
def test_knn_attention_key_mask_equals_dense_baseline(top_k):
    """Only real bank entries are searched: fewer real than k -> those; none -> zero weights and output."""
    torch.manual_seed(0)
    q = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    keys, values = torch.randn(3, 2, 9, 4, dtype=torch.float64), torch.randn(3, 2, 9, 4, dtype=torch.float64)
    km = torch.ones(3, 9, dtype=torch.bool)
    km[0, ::2] = False
    km[1, 1:] = False  # one real entry
    km[2] = False  # none
    got = knn_attention(q, keys, values, top_k, key_mask=km)
    ref = knn_attention_dense(q, keys, values, top_k, key_mask=km)
    torch.testing.assert_close(got.output, ref.output, atol=1e-12, rtol=1e-12)
    dense = torch.zeros_like(ref.weights).scatter_add(-1, got.indices, got.weights)
    torch.testing.assert_close(dense, ref.weights, atol=1e-12, rtol=1e-12)
    assert (ref.weights[2] == 0).all() and (got.output[2] == 0).all()
    assert (ref.weights.transpose(1, 3)[~km] == 0).all()
    (ga,) = torch.autograd.grad(got.output.sum(), q)
    (gb,) = torch.autograd.grad(ref.output.sum(), q)
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-12)


def test_key_mask_bad_input_and_registered_build():
    layer = registry.get("memorizing").build(16, 4)
    x = torch.randn(2, 10, 16)
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool tensor"):
        layer(x, key_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=2, n=10\)"):
        layer(x, key_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError):
        layer(x, True, None, torch.ones(2, 10, dtype=torch.bool))  # keyword only
    with pytest.raises(ValueError, match=r"valid must have shape \(batch=2, L=3\)"):
        KNNMemory(4).add(torch.randn(2, 4, 3, 4), torch.randn(2, 4, 3, 4), torch.arange(3), valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_mask needs backend='torch'"):
        knn_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), 2, backend="faiss",
                      key_mask=torch.ones(1, 3, dtype=torch.bool))
    km = torch.ones(2, 10, dtype=torch.bool)
    km[1, 6:] = False
    out, w = layer(x, key_mask=km, need_weights=True)
    assert out.shape == (2, 10, 16) and w.shape == (2, 4, 10, 10)
    assert layer(x[:0], key_mask=km[:0], need_weights=True).weights.shape == (0, 4, 10, 10)


def test_one_interface_persistent_memory_is_attention_base_with_mha_state_dict():
    """Issue 23: PersistentMemoryAttention is an AttentionBase (the same q/k/v/out projections, so a
    MultiHeadAttention state dict loads into it; the slots are its own state, appended in ``attend``);
    options keyword-only; registered with the sdpa kernel, bidirectional as built."""
    from attn.attention import AttentionBase

    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).double()
    pm = PersistentMemoryAttention(8, 2, slots=0).double()
    assert isinstance(pm, AttentionBase) and pm.kernel == "sdpa"
    missing, unexpected = pm.load_state_dict(mha.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"memory_k", "memory_v"}
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    km = padding_mask([6, 4], 6)
    torch.testing.assert_close(pm(x, key_mask=km, is_causal=True).output,
                               mha(x, key_mask=km, is_causal=True).output, atol=1e-12, rtol=1e-12)
    with pytest.raises(TypeError):
        pm(x, km)  # key_mask is keyword-only
    assert registry.get("persistent_memory").kernel == "sdpa" and registry.get("persistent_memory").causal is False


def test_one_interface_memorizing_is_always_causal():
    """Issue 23: MemorizingAttention follows the SequenceMixer protocol; its KNNMemory is keyword-only,
    ``is_causal=False`` is refused with a ValueError saying why, and the registry records it causal."""
    torch.manual_seed(0)
    layer = MemorizingAttention(8, 2, segment=4, top_k=2, capacity=8)
    x = torch.randn(2, 10, 8)
    torch.testing.assert_close(layer(x, is_causal=True).output, layer(x).output)
    with pytest.raises(ValueError, match="always causal"):
        layer(x, is_causal=False)
    with pytest.raises(TypeError):
        layer(x, False, KNNMemory(8))  # need_weights and memory are keyword-only
    assert registry.get("memorizing").causal is True
    # its projections are AttentionBase's: a MultiHeadAttention state dict loads (all but the gate)
    from attn.attention import AttentionBase

    assert isinstance(layer, AttentionBase)
    missing, unexpected = layer.load_state_dict(MultiHeadAttention(8, 2).state_dict(), strict=False)
    assert not unexpected and missing == ["gate_bias"]


# ----------------------------------------------------------------------------- issue 16: trained persistent memory,
# four far-recall arms, L2-normalised queries and keys, streaming training with a stale bank


def test_lookup_task_is_fixed_by_its_table_seed_and_answers_the_table():
    a, b, c = (LookupTask(n_tokens=32, embed_dim=8, table_seed=s) for s in (0, 0, 1))
    assert torch.equal(a.table, b.table) and torch.equal(a.codes, b.codes)
    assert not torch.equal(a.table, c.table)
    batch = a.sample(16, torch.Generator().manual_seed(0))
    assert batch["tokens"].shape == (16, a.length) and torch.equal(batch["y"], a.table[batch["tokens"]])
    assert set(a.table.tolist()) == set(range(a.n_classes))  # every class is used
    with pytest.raises(ValueError, match="n_tokens"):
        LookupTask(n_tokens=1)


def test_lookup_models_store_the_table_where_their_kind_says():
    task = LookupTask(n_tokens=32, embed_dim=8)
    models = {kind: LookupModel(task, kind=kind) for kind in ("ffn", "slots", "none")}
    for kind, m in models.items():
        assert not m.codes.weight.requires_grad  # frozen codes: the table cannot live in the embedding
        assert (m.block.ffn is not None) == (kind == "ffn")
        assert m.block.mixer.slots == (4 * 8 if kind == "slots" else 0)
    ffn = models["ffn"].block.ffn
    ffn_weights = sum(p.numel() for n, p in ffn.named_parameters() if n.endswith("weight"))
    slot_weights = models["slots"].block.mixer.memory_k.numel() + models["slots"].block.mixer.memory_v.numel()
    assert ffn_weights == slot_weights == 8 * 8**2  # the same 8 E^2 weights
    assert models["none"](torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, task.n_classes)
    with pytest.raises(ValueError, match="kind"):
        LookupModel(task, kind="mlp")


def test_run_lookup_one_value_per_seed_per_arm():
    task = LookupTask(n_tokens=64, n_classes=4, embed_dim=8, length=8)
    accs, curves = run_lookup(task, {"slots": "slots", "floor": "none"}, [0, 1, 2], steps=2, eval_batch=8)
    assert {k: len(v) for k, v in accs.items()} == {"slots": 3, "floor": 3}
    assert len(curves["slots"]) == 3 and curves["slots"][0].step[-1] == 2


@pytest.mark.slow
def test_trained_slots_store_the_table_the_floor_cannot():
    task = LookupTask(n_tokens=64, n_classes=4, embed_dim=8, length=8)
    accs, _ = run_lookup(task, {"slots": "slots", "floor": "none"}, [0], steps=150)
    assert accs["slots"][0] > 0.9 and accs["floor"][0] < 0.8, accs


def test_recall_model_mixers():
    task = FarRecallTask(n_keys=24, n_values=8, segment=8, segments=3)
    knn, local, dense, xl = (MemoryRecallModel(task, 16, 2, mixer=m) for m in ("knn", "local", "dense", "xl"))
    assert knn.attention.top_k == 4 and local.attention.top_k == 0
    assert dense.attention.segment == task.length and dense.attention.top_k == 0
    assert isinstance(xl.attention, TransformerXLAttention) and xl.attention.mem_len == xl.attention.segment == 8
    with pytest.raises(ValueError, match="mixer"):
        MemoryRecallModel(task, 16, 2, mixer="global")
    # Transformer-XL with M = L cannot see two windows back; dense attention can
    b = task.sample(4, torch.Generator().manual_seed(0))
    moved = b["keys"].clone()
    moved[:, :8] = (moved[:, :8] + 1) % task.n_keys
    for model, reaches in ((xl, False), (dense, True), (local, False)):
        with torch.no_grad():
            same = torch.allclose(model(b["keys"], b["values"])[0], model(moved, b["values"])[0])
        assert same != reaches, model.mixer


def test_run_far_recall_returns_one_value_per_seed_per_arm():
    task = FarRecallTask(n_keys=24, n_values=8, segment=8, segments=3)
    scores, curves, models = run_far_recall(task, {"a": "knn", "b": "xl"}, [0, 1, 2], steps=3, eval_batch=16)
    assert {(a, k, len(v)) for a, r in scores.items() for k, v in r.items()} == {
        (a, k, 3) for a in "ab" for k in ("far", "near")}
    assert set(curves) == set(models) == {(a, s) for a in "ab" for s in range(3)}


def test_normalized_memorizing_attention():
    set_seed(0)
    layer = MemorizingAttention(16, 2, segment=4, top_k=3, capacity=8, normalize=True).double()
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    _, k, _ = layer.project(x)
    torch.testing.assert_close(k.norm(dim=-1), torch.ones_like(k[..., 0]))
    out, w = layer(x, need_weights=True)
    seq, w_seq = layer(x, need_weights=True, memory=KNNMemory(8))
    torch.testing.assert_close(out, seq)  # parallel form == segment-by-segment bank
    torch.testing.assert_close(w, w_seq)
    with torch.no_grad():  # keys of any length score the same: the stale-key argument
        layer.k_proj.weight.mul_(10.0)
        layer.k_proj.bias.mul_(10.0)
    torch.testing.assert_close(layer(x).output, out)
    assert not hasattr(MemorizingAttention(16, 2), "qk_log_scale") or MemorizingAttention(16, 2).qk_log_scale is None
    with pytest.raises(TypeError, match="normalize"):
        MemorizingAttention(16, 2, normalize=1)


def test_stream_recall_task():
    task = StreamRecallTask(n_keys=60, n_values=8, segment=8, segments=6, p_near=0.25)
    b = task.sample(64, torch.Generator().manual_seed(0))
    B, D, L = 64, 6, 8
    assert b["keys"].shape == b["values"].shape == (B, D, L) and b["y"].shape == b["far"].shape == (B, D)
    pairs = b["keys"][..., :-1].reshape(B, -1)
    assert (pairs.sort(-1).values.diff(dim=-1) > 0).all()  # distinct within a document
    assert not b["far"][:, 0].any() and 0 < b["far"].float().mean() < 1
    for i in range(B):
        for s in range(D):
            hit = (b["keys"][i, : s + 1, :-1] == b["keys"][i, s, -1]).nonzero()
            assert len(hit) == 1  # the asked key is in this window or an earlier one
            w, p = hit[0].tolist()
            assert (w < s) == bool(b["far"][i, s]) and b["values"][i, w, p] == b["y"][i, s]
    with pytest.raises(ValueError, match="n_keys"):
        StreamRecallTask(n_keys=10)


def test_streaming_windows_equal_the_parallel_form():
    task = StreamRecallTask(n_keys=40, segment=6, segments=4)
    set_seed(0)
    model = MemoryRecallModel(task, 16, 2, top_k=3)
    b = task.sample(3, torch.Generator().manual_seed(1))
    bank = KNNMemory(task.length)
    with torch.no_grad():
        h = model.embed(b["keys"].flatten(0, 1), b["values"].flatten(0, 1)).view(3, task.length, 16)
        whole = model.attention(h).output.view(3, 4, 6, 16)
        for s in range(4):
            hs = model.embed(b["keys"][:, s], b["values"][:, s])
            seg = model.attention.attend_segment(hs, bank)
            torch.testing.assert_close(seg.output, whole[:, s])
            bank.add(seg.keys, seg.values, torch.arange(s * 6, (s + 1) * 6))
        fresh = _fresh_bank(model, b["keys"], b["values"], 4, task.length)
    torch.testing.assert_close(fresh.keys, bank.keys)
    torch.testing.assert_close(fresh.values, bank.values)


def test_streaming_stale_bank_differs_from_fresh_only_when_parameters_move():
    task = StreamRecallTask(n_keys=40, segment=6, segments=4)
    hists = {}
    for lr in (0.0, 1e-2):
        for fresh in (False, True):
            set_seed(0)
            model = MemoryRecallModel(task, 16, 2, top_k=3)
            hists[lr, fresh] = train_streaming(model, task, 12, batch_size=8, lr=lr, seed=0, fresh=fresh, log_every=1)
    assert hists[0.0, False].loss == pytest.approx(hists[0.0, True].loss, abs=1e-6)  # same parameters: no staleness
    assert hists[1e-2, False].loss[0] == pytest.approx(hists[1e-2, True].loss[0], abs=1e-6)  # empty bank: agree
    assert hists[1e-2, False].loss != pytest.approx(hists[1e-2, True].loss, abs=1e-6)  # then the bank is stale
    assert "acc_far" in hists[1e-2, False].metrics
    acc = evaluate_streaming(model, task, 16, seed=0)
    assert set(acc) == {"acc_far", "acc_near"} and 0 <= acc["acc_far"] <= 1
    with pytest.raises(TypeError, match="memorizing"):
        train_streaming(MemoryRecallModel(task, 16, 2, mixer="xl"), task, 1)
