"""Chapter 5: Luong global attention (dot/general/concat) and global-token attention against dense references."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attn import registry
from attn.benchmark import count_flops, peak_memory
from attn.global_attention import (
    ConcatAttention,
    GlobalTokenAttention,
    LuongGlobalAttention,
    LuongSelfAttention,
    LuongSeq2Seq,
    global_mask,
    make_luong_score,
)
from attn.masks import padding_mask
from attn.multihead import MultiHeadAttention
from attn.tasks import PermutationTask
from attn.train import evaluate, train

# ----------------------------------------------------------------------------- Luong global attention


def test_concat_score_matches_explicit_concatenation():
    att = ConcatAttention(5, 4, hidden=6).double()
    h_t = torch.randn(2, 3, 5, dtype=torch.float64)
    h_s = torch.randn(2, 7, 4, dtype=torch.float64)
    W, v = att.w.weight, att.v.weight[0]
    e = torch.stack([torch.stack([torch.stack([v @ torch.tanh(W @ torch.cat([h_t[b, t], h_s[b, s]])) for s in range(7)])
                                  for t in range(3)]) for b in range(2)])  # eq. 8, pair by pair
    ctx, a = att(h_t, h_s)
    torch.testing.assert_close(a, e.softmax(-1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ctx, e.softmax(-1) @ h_s, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_global_matches_formula_and_gradcheck(score):
    att = LuongGlobalAttention(4, 4, score, hidden=3, out_dim=5).double()
    h_t = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    h_s = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    km = padding_mask([6, 2], 6)
    h_tilde, a = att(h_t, h_s, key_mask=km)
    # independent dense formula: scores, masked softmax, context, tanh(W_c [c; h])
    if score == "dot":
        e = h_t @ h_s.transpose(1, 2)
    elif score == "general":
        e = h_t @ (h_s @ att.score.w.weight.T).transpose(1, 2)
    else:
        e = att.score.scores(h_t, h_s)
    e = e.masked_fill(~km[:, None], float("-inf"))
    a_ref = e.softmax(-1)
    ref = torch.tanh(torch.cat([a_ref @ h_s, h_t], -1) @ att.w_c.weight.T)
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(h_tilde, ref)
    assert a[1, :, 2:].abs().max() == 0
    assert torch.autograd.gradcheck(lambda q, k: att(q, k, key_mask=km).output, (h_t, h_s))
    # one step (B, d) equals the same step inside (B, T, d); batched equals per example
    step = att(h_t[:, 1], h_s, key_mask=km)
    torch.testing.assert_close(step.output, h_tilde[:, 1])
    torch.testing.assert_close(att(h_t[1:], h_s[1:], key_mask=km[1:]).output, h_tilde[1:])


def test_luong_bad_input():
    with pytest.raises(ValueError, match="score must be"):
        make_luong_score("location", 3, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dot scores need"):
        LuongGlobalAttention(3, 4, "dot")
    att = LuongGlobalAttention(4, 6, "concat")
    with pytest.raises(ValueError, match=r"^memory must have shape \(batch=2, n_keys, 6\)"):  # the caller passed memory
        att(torch.randn(2, 4), torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="empty"):
        att(torch.randn(2, 4), torch.randn(2, 0, 6))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, embed_dim=8\)"):
        LuongSelfAttention(8)(torch.randn(2, 8))


@pytest.mark.parametrize("score,input_feeding", [("general", True), ("general", False), ("dot", False), ("concat", False)])
def test_luong_seq2seq_learns_the_alignment(score, input_feeding):
    task = PermutationTask(vocab=10, length=6, permutation="random", seed=3)

    def loss_fn(model, b):
        logits, al = model(b["src"], b["tgt_in"])
        return F.cross_entropy(logits.flatten(0, 1), b["tgt"].flatten()), {"align": (al.argmax(-1) == task.perm).float().mean()}

    torch.manual_seed(0)
    model = LuongSeq2Seq(10, 16, 32, score, input_feeding=input_feeding)
    logits, al = model(task.sample(2)["src"], task.sample(2)["tgt_in"])
    assert logits.shape == (2, 6, 10) and al.shape == (2, 6, 6)
    train(model, task.sample, loss_fn, steps=150, lr=1e-2, progress=False)
    # concat learns the alignment more slowly (as in Luong et al.); within this budget demand well above chance (1/6)
    assert evaluate(model, task.sample, loss_fn)["align"] > (0.5 if score == "concat" else 0.9)


# ----------------------------------------------------------------------------- global tokens


@pytest.mark.parametrize(
    "n,window,gidx",
    [(1, 0, (0,)), (7, 2, (0,)), (13, 3, (0, 5, -1)), (16, 4, ()), (10, 0, (2,)), (9, 20, (1,)), (33, 5, (0, 1, 2, 3))],
)
def test_global_tokens_match_dense_masked_reference(n, window, gidx):
    layer = GlobalTokenAttention(16, 2, window=window, global_idx=gidx).double()
    x = torch.randn(3, n, 16, dtype=torch.float64, requires_grad=True)
    km = padding_mask([n, max(1, n - 3), max(1, n // 2)], n)
    for key_mask, blockwise in ((None, True), (km, True), (km, None)):  # the blocks forced, and the cheaper path
        out, w = layer(x, need_weights=True, key_mask=key_mask, blockwise=blockwise)
        ref_out, ref_w = layer.reference(x, need_weights=True, key_mask=key_mask)
        torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(w, ref_w, atol=1e-10, rtol=1e-10)
        fast = layer(x, key_mask=key_mask, blockwise=blockwise).output
        torch.testing.assert_close(fast, ref_out, atol=1e-10, rtol=1e-10)
        up = torch.randn_like(fast)
        params = [x, *layer.parameters()]
        for a, b in zip(torch.autograd.grad(fast, params, up), torch.autograd.grad(ref_out, params, up), strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_global_mask_pattern():
    m = global_mask(8, [0, -1], 1)
    assert m[0].all() and m[:, 0].all() and m[7].all() and m[:, 7].all()
    assert m[3, 2] and m[3, 4] and not m[3, 5] and not m[3, 1]
    assert m.sum() == 8 * 8 - (6 * 6 - (6 + 2 * 5))  # inner 6x6 keeps only its tridiagonal band


def test_global_tokens_gradcheck_and_properties():
    layer = GlobalTokenAttention(4, 2, window=1, global_idx=(2,)).double()
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    km = padding_mask([7, 5], 7)
    assert torch.autograd.gradcheck(lambda x: layer(x, key_mask=km).output, (x,))
    assert torch.autograd.gradcheck(lambda x: layer(x, key_mask=km, need_weights=True).output, (x,))
    out = layer(x, key_mask=km).output
    # padded keys have no influence
    x2 = x.detach().clone()
    x2[1, 5:] = 1e3
    torch.testing.assert_close(layer(x2, key_mask=km).output[1, :5], out[1, :5].detach())
    # a token outside the window of a non-global query, and not global, has no influence on it
    x3 = x.detach().clone()
    x3[:, 6] += 10.0
    o3 = layer(x3).output
    o = layer(x).output.detach()
    torch.testing.assert_close(o3[:, [0, 1, 3, 4]], o[:, [0, 1, 3, 4]])  # outside token 6's window, not global
    assert (o3[:, 2] - o[:, 2]).abs().max() > 1e-3  # position 2 is global: it sees everything
    assert (o3[:, 5] - o[:, 5]).abs().max() > 1e-3  # position 5 has token 6 in its window
    # batched equals per example; fully masked rows give zeros, not NaN
    torch.testing.assert_close(torch.cat([layer(x[i : i + 1], key_mask=km[i : i + 1]).output for i in range(2)]), out)
    res = layer(x, key_mask=torch.zeros(2, 7, dtype=torch.bool), need_weights=True)
    assert torch.isfinite(res.output).all() and res.weights.abs().max() == 0


def test_global_tokens_are_efficient():
    """No n x n tensor: peak memory far below n^2 floats, FLOPs linear in n."""
    layer = GlobalTokenAttention(16, 1, window=16, global_idx=(0, 1)).eval()
    n = 8192
    x = torch.randn(1, n, 16)
    with torch.no_grad():
        p1, p2 = peak_memory(lambda: layer(x[:, : n // 2]), "cpu"), peak_memory(lambda: layer(x), "cpu")
        f1, f2 = count_flops(lambda: layer(x[:, : n // 2])), count_flops(lambda: layer(x))
    assert p2 < n * n * 4 / 10, f"peak {p2} bytes vs n^2 fp32 {n * n * 4}"
    assert p2 / p1 < 2.5  # linear, not quadratic (which would be 4)
    assert 1.9 < f2 / f1 < 2.1


def test_global_tokens_bad_input():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(3\)"):
        GlobalTokenAttention(10, 3)
    with pytest.raises(ValueError, match="window must be >= 0"):
        GlobalTokenAttention(8, 2, window=-1)
    layer = GlobalTokenAttention(8, 2, window=2, global_idx=(0,))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, embed_dim=8\)"):
        layer(torch.randn(5, 8))
    with pytest.raises(ValueError, match="empty"):
        layer(torch.randn(1, 0, 8))
    with pytest.raises(ValueError, match=r"global_idx must lie in \[-5, 5\)"):
        layer(torch.randn(1, 5, 8), global_idx=[5])
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool"):
        layer(torch.randn(1, 5, 8), key_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=\d+, n="):
        layer(torch.randn(1, 5, 8), key_mask=torch.ones(1, 4, dtype=torch.bool))


def test_builds():
    x = torch.randn(2, 6, 16)
    for name, cls in (("global", LuongSelfAttention), ("global-tokens", GlobalTokenAttention)):
        m = registry.get(name)
        assert m.chapter == 5
        layer = m.build(16, 4)
        assert isinstance(layer, cls)
        out = layer(x, need_weights=True)
        assert out.output.shape == (2, 6, 16) and out.weights.shape[-2:] == (6, 6)
        torch.testing.assert_close(out.weights.sum(-1), torch.ones_like(out.weights.sum(-1)))
        assert layer(x).weights is None
    assert registry.get("global").cls is LuongSelfAttention  # the class build returns


# ----------------------------------------------------------------------------- sizes clamped to n (issue 15, section 3)


def test_global_token_window_larger_than_n_costs_no_more_than_dense():
    """A window of 512 on n = 8 once cost over 1,000x the FLOPs of dense attention; now at most dense's, same output."""
    torch.manual_seed(0)
    layer = GlobalTokenAttention(32, 2, window=512, global_idx=(0,)).eval()
    mha = MultiHeadAttention(32, 2).eval()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        assert count_flops(lambda: layer(x)) <= count_flops(lambda: mha(x))
        wide, forced = layer(x).output, layer(x, blockwise=True).output
        layer.window = 8
        torch.testing.assert_close(wide, layer(x).output)
        torch.testing.assert_close(forced, layer(x, blockwise=True).output)
        assert count_flops(lambda: layer(x, blockwise=True)) <= 4 * count_flops(lambda: mha(x))  # blocks of n, not 512


@pytest.mark.parametrize("n,window,gidx", [(7, 2, (0,)), (13, 3, (0, 5, -1)), (40, 2, (0,)), (9, 0, ())])
def test_global_tokens_take_the_cheaper_path(n, window, gidx):
    layer = GlobalTokenAttention(16, 2, window=window, global_idx=gidx).eval()
    x = torch.randn(2, n, 16)
    km = padding_mask([n, n - 2], n)
    with torch.no_grad():
        flops = {bw: count_flops(partial(layer, x, key_mask=km, blockwise=bw)) for bw in (None, True, False)}
        assert flops[None] == min(flops[True], flops[False]), flops
        torch.testing.assert_close(layer(x, key_mask=km, blockwise=True).output, layer(x, key_mask=km, blockwise=False).output,
                                   atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- global_idx: positions or a boolean mask


def test_global_idx_as_a_boolean_mask_equals_the_positions():
    layer = GlobalTokenAttention(16, 2, window=1, global_idx=(0, 5)).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.zeros(9, dtype=torch.bool)
    mask[[0, 5]] = True
    ref = layer(x).output
    torch.testing.assert_close(layer(x, global_idx=mask).output, ref)
    torch.testing.assert_close(layer(x, global_idx=mask.tolist()).output, ref)
    by_mask = GlobalTokenAttention(16, 2, window=1, global_idx=mask).double()
    by_mask.load_state_dict(layer.state_dict())
    torch.testing.assert_close(by_mask(x).output, ref)
    torch.testing.assert_close(layer(x, global_idx=torch.tensor([0, 5])).output, ref)
    torch.testing.assert_close(layer(x, global_idx=np.array([5, 0])).output, ref)
    assert torch.equal(global_mask(9, mask, 1), global_mask(9, [0, 5], 1))


@pytest.mark.parametrize("bad,exc,match", [
    (torch.tensor([0.5]), TypeError, r"global_idx must be int positions .* got dtype torch\.float32"),
    ([1.7], TypeError, r"global_idx must be int positions .* got a list of float"),
    ((0, True), TypeError, r"global_idx must be int positions .* got a tuple of bool, int"),
    (3, TypeError, r"global_idx must be int positions .* got int"),
    (torch.tensor([[0, 1]]), ValueError, r"global_idx must be 1-D .* got shape \(1, 2\)"),
    (torch.ones(8, dtype=torch.bool), ValueError, r"global_idx as a boolean mask must have shape \(n=10,\), got \(8,\)"),
    ([10], ValueError, r"global_idx must lie in \[-10, 10\)"),
])
def test_global_idx_bad_input(bad, exc, match):
    layer = GlobalTokenAttention(8, 2, window=2)
    with pytest.raises(exc, match=match):
        layer(torch.randn(2, 10, 8), global_idx=bad)
    if exc is TypeError or (isinstance(bad, Tensor) and bad.ndim > 1):
        with pytest.raises(exc, match=match):
            GlobalTokenAttention(8, 2, global_idx=bad)


def test_global_tokens_bad_hyper_parameters():
    with pytest.raises(TypeError, match="window must be an int, got float"):
        GlobalTokenAttention(8, 2, window=2.5)
    with pytest.raises(TypeError, match="window must be an int, got NoneType"):
        GlobalTokenAttention(8, 2, window=None)
    with pytest.raises(TypeError, match="embed_dim must be an int, got float"):
        GlobalTokenAttention(8.0, 2)
    with pytest.raises(TypeError, match="blockwise must be None, True or False"):
        GlobalTokenAttention(8, 2)(torch.randn(1, 4, 8), blockwise="yes")


# ----------------------------------------------------------------------------- bad input (issue 15, section 4)


@pytest.mark.parametrize("call,exc,match", [
    (lambda a: a(torch.randn(2, 4).tolist(), torch.randn(2, 5, 6)), TypeError, r"^query must be a torch\.Tensor of shape \(batch, 4\) or \(batch, n_queries, 4\), got list$"),
    (lambda a: a(torch.randn(2, 4), torch.randn(2, 5, 6).tolist()), TypeError, r"^memory must be a torch\.Tensor of shape \(batch=2, n_keys, 6\), got list$"),
    (lambda a: a(torch.randint(0, 3, (2, 4)), torch.randn(2, 5, 6)), TypeError, r"^query must be a floating-point tensor"),
    (lambda a: a(torch.randn(2, 4), torch.randn(2, 5, 6).double()), TypeError, r"^dtypes must match \(query: torch\.float32, memory: torch\.float64\)"),
    (lambda a: a(torch.randn(2, 4), torch.randn(1, 5, 6)), ValueError, r"^memory must have shape \(batch=2, n_keys, 6\), got \(1, 5, 6\)$"),
    (lambda a: a(torch.randn(2, 4), torch.randn(2, 0, 6)), ValueError, r"^memory is an empty sequence"),
])
@pytest.mark.parametrize("score", ["general", "concat"])
def test_luong_global_bad_input_names_the_argument(call, exc, match, score):
    with pytest.raises(exc, match=match):
        call(LuongGlobalAttention(4, 6, score))


def test_luong_bad_sizes():
    with pytest.raises(TypeError, match=r"^query_dim must be an int, got float$"):
        LuongGlobalAttention(4.0, 6, "concat")
    with pytest.raises(ValueError, match=r"^hidden must be >= 1, got 0$"):
        LuongGlobalAttention(4, 6, "concat", hidden=0)
    with pytest.raises(ValueError, match=r"^out_dim must be >= 1, got -2$"):
        LuongGlobalAttention(4, 6, out_dim=-2)


SRC, TGT = torch.arange(10).view(2, 5), torch.arange(8).view(2, 4)  # ids 0..9 and 0..7


@pytest.mark.parametrize("src,tgt,exc,match", [
    (SRC + 10, TGT, ValueError, r"^src must be token ids in \[0, 10\), got values in \[10, 19\]$"),
    (SRC - 20, TGT, ValueError, r"^src must be token ids in \[0, 10\), got values in \[-20, -11\]$"),
    (SRC, TGT + 5, ValueError, r"^tgt_in must be token ids in \[0, 10\), got values in \[5, 12\]$"),
    (SRC.float(), TGT, TypeError, r"^src must hold integer token ids"),
    (SRC[:, :0], TGT, ValueError, r"^src is an empty sequence"),
    (SRC, TGT[:, :0], ValueError, r"^tgt_in is an empty sequence"),
    (SRC.tolist(), TGT, TypeError, r"^src must be a torch\.Tensor of integer token ids"),
])
@pytest.mark.parametrize("input_feeding", [True, False])
def test_luong_seq2seq_bad_token_ids(src, tgt, exc, match, input_feeding):
    model = LuongSeq2Seq(10, 8, 8, input_feeding=input_feeding)
    with pytest.raises(exc, match=match):
        model(src, tgt)


@pytest.mark.parametrize("input_feeding", [True, False])
def test_luong_seq2seq_empty_batch_and_sizes(input_feeding):
    model = LuongSeq2Seq(10, 8, 8, input_feeding=input_feeding)
    logits, align = model(SRC[:0], TGT[:0])
    assert logits.shape == (0, 4, 10) and align.shape == (0, 4, 5)
    with pytest.raises(ValueError, match=r"^hidden must be >= 1, got 0$"):
        LuongSeq2Seq(10, 8, 0)


# ----------------------------------------------------------------------------- one interface (issue 23)


def test_global_tokens_kernel_and_layer_share_multihead_parameters():
    """The layer is AttentionBase with the "global-tokens" kernel: MultiHeadAttention's state dict loads into it,
    and it equals MultiHeadAttention under the dense global_mask; the kernel refuses is_causal."""
    from attn.attention import AttentionBase, get_kernel
    from attn.global_attention import global_token_kernel

    torch.manual_seed(0)
    layer = GlobalTokenAttention(16, 2, window=2, global_idx=(0, 7)).double()
    mha = MultiHeadAttention(16, 2).double()
    layer.load_state_dict(mha.state_dict())
    assert isinstance(layer, AttentionBase) and get_kernel("global-tokens").fn is global_token_kernel
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    km = padding_mask([11, 8], 11)
    out, w = layer(x, key_mask=km, need_weights=True, blockwise=True)
    ref, wr = mha(x, key_mask=km, attn_mask=global_mask(11, [0, 7], 2), need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w, wr, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="cannot be causal"):
        layer(x, is_causal=True)


def test_luong_self_attention_is_a_causal_capable_single_head_mixer():
    torch.manual_seed(0)
    layer = registry.get("global").build(8, 2).double()
    assert isinstance(layer, LuongSelfAttention)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    out, w = layer(x, is_causal=True, need_weights=True)
    assert w.shape == (2, 1, 6, 6) and (w[:, 0].triu(1) == 0).all()
    y = x.clone()
    y[:, 3:] += 1.0
    torch.testing.assert_close(layer(y, is_causal=True).output[:, :3], out[:, :3])
