"""Chapters 1-3: soft, self and multi-head attention against their references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attn.experiments.soft import permutation_loss
from attn.masks import causal_mask, mha_convention, padding_mask
from attn.models import RecallModel, recall_loss
from attn.multihead import MultiHeadAttention
from attn.self_attention import SelfAttention
from attn.soft import (
    AdditiveAttention,
    MultiplicativeAttention,
    Seq2SeqAttention,
    make_score,
    softmax_vjp,
)
from attn.tasks import AssociativeRecall, PermutationTask
from attn.train import evaluate, train

# ----------------------------------------------------------------------------- chapter 1: soft attention


def test_softmax_vjp_matches_autograd():
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    p = z.softmax(-1)
    (auto,) = torch.autograd.grad(p, z, g)
    torch.testing.assert_close(softmax_vjp(p.detach(), g), auto, atol=1e-12, rtol=1e-12)


def test_additive_scores_match_explicit_formula():
    att = AdditiveAttention(6, 5, hidden=7).double()
    s = torch.randn(3, 6, dtype=torch.float64)
    h = torch.randn(3, 4, 5, dtype=torch.float64)
    ctx, alpha = att(s, h)
    W, U, b, v = att.w_q.weight, att.w_k.weight, att.w_k.bias, att.v.weight[0]
    with torch.no_grad():
        e = torch.tensor([[float(v @ torch.tanh(W @ s[n] + U @ h[n, j] + b)) for j in range(4)] for n in range(3)], dtype=torch.float64)
    torch.testing.assert_close(alpha, e.softmax(-1))
    torch.testing.assert_close(ctx, torch.einsum("nj,njd->nd", e.softmax(-1), h))


@pytest.mark.parametrize("kind", ["general", "dot"])
def test_multiplicative_scores(kind):
    att = MultiplicativeAttention(5, 5, kind).double()
    s, h = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    W = att.w.weight if kind == "general" else torch.eye(5, dtype=torch.float64)
    expected = torch.softmax(s @ (h @ W.T).transpose(1, 2), -1)
    torch.testing.assert_close(att(s, h).weights, expected)


@pytest.mark.parametrize("kind", ["additive", "general", "dot"])
def test_score_gradcheck_and_masking(kind):
    att = make_score(kind, 4, 4, hidden=3).double()
    s = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    km = padding_mask([5, 3], 5)
    assert torch.autograd.gradcheck(lambda s, h: att(s, h, key_mask=km).output, (s, h))
    ctx, alpha = att(s, h, key_mask=km)
    assert alpha[1, 3:].abs().max() == 0
    h2 = h.detach().clone()
    h2[1, 3:] += 50
    torch.testing.assert_close(att(s, h2, key_mask=km).output[1], ctx[1].detach())


def test_soft_attention_bad_input():
    att = AdditiveAttention(4, 6)
    with pytest.raises(ValueError, match=r"query must have shape"):
        att(torch.randn(2, 5), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"keys must have shape"):
        att(torch.randn(2, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="empty"):
        att(torch.randn(2, 4), torch.randn(2, 0, 6))
    with pytest.raises(ValueError, match="dot scores need"):
        MultiplicativeAttention(3, 4, "dot")
    with pytest.raises(ValueError, match="score must be"):
        make_score("cosine", 3, 3)  # type: ignore[arg-type]


def test_seq2seq_learns_the_true_alignment():
    """The encoder-decoder recovers the permutation from the task loss alone."""
    task = PermutationTask(vocab=10, length=6, permutation="random", seed=3)
    loss_fn = permutation_loss(task.perm)
    torch.manual_seed(0)
    model = Seq2SeqAttention(10, 16, 32, "general")
    before = evaluate(model, task.sample, loss_fn)["align_acc"]
    train(model, task.sample, loss_fn, steps=150, progress=False)
    after = evaluate(model, task.sample, loss_fn)
    assert before < 0.5 and after["align_acc"] > 0.95 and after["acc"] > 0.95


def test_permutation_task_validation():
    with pytest.raises(ValueError):
        PermutationTask(length=3, permutation=[0, 0, 1])
    t = PermutationTask(length=4)
    b = t.sample(2, torch.Generator().manual_seed(0))
    assert torch.equal(b["tgt"], b["src"].flip(-1)) and (b["tgt_in"][:, 0] == 0).all()


# ----------------------------------------------------------------------------- chapter 2: self-attention


def explicit_self_attention(sa: SelfAttention, x, mask=None, temperature=1.0):
    q, k, v = x @ sa.w_q.weight.T, x @ sa.w_k.weight.T, x @ sa.w_v.weight.T
    s = q @ k.transpose(-1, -2) / (temperature * sa.d_k**0.5)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_matches_formula_and_sdpa(need_weights):
    sa = SelfAttention(12, d_k=8, d_v=6).double()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    m = causal_mask(7)
    out = sa(x, attn_mask=m, need_weights=need_weights, temperature=0.7).output
    torch.testing.assert_close(out, explicit_self_attention(sa, x, m, 0.7))
    ref = F.scaled_dot_product_attention(sa.w_q(x), sa.w_k(x), sa.w_v(x), is_causal=True)
    torch.testing.assert_close(sa(x, is_causal=True, need_weights=need_weights).output, ref)


def test_self_attention_gradcheck_and_properties():
    sa = SelfAttention(4, d_k=3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    km = padding_mask([5, 3], 5)
    assert torch.autograd.gradcheck(lambda x: sa(x, key_mask=km, need_weights=True).output, (x,))
    assert torch.autograd.gradcheck(lambda x: sa(x, key_mask=km).output, (x,))
    p = torch.randperm(5)
    torch.testing.assert_close(sa(x[:, p]).output, sa(x).output[:, p])


def test_self_attention_bad_input():
    sa = SelfAttention(8)
    with pytest.raises(ValueError, match=r"\(batch, seq, embed_dim=8\)"):
        sa(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"embed_dim=8"):
        sa(torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match="temperature"):
        sa(torch.randn(1, 5, 8), temperature=0)
    with pytest.raises(ValueError, match="empty"):
        sa(torch.randn(1, 0, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        sa(torch.randn(1, 5, 8), attn_mask=torch.ones(4, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- chapter 3: multi-head


def torch_pair(E=32, h=4, kdim=None, vdim=None, bias=True):
    ref = nn.MultiheadAttention(E, h, batch_first=True, kdim=kdim, vdim=vdim, bias=bias)
    return ref, MultiHeadAttention(E, h, kdim=kdim, vdim=vdim, bias=bias).load_torch_weights(ref)


@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both", "per-batch"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_matches_torch(masks, need_weights):
    ref, ours = torch_pair()
    x = torch.randn(3, 9, 32, requires_grad=True)
    km = padding_mask([9, 5, 2], 9) if masks in ("padding", "both") else None
    am = causal_mask(9) if masks in ("causal", "both") else None
    if masks == "per-batch":
        am = torch.rand(3, 9, 9) > 0.3
        am[..., 0] = True
    out, w = ours(x, key_mask=km, attn_mask=am, need_weights=need_weights)
    torch_am = mha_convention(am)
    if torch_am is not None and torch_am.ndim == 3:
        torch_am = torch_am.repeat_interleave(4, 0)  # torch wants (B * h, L, S)
    r_out, r_w = ref(x, x, x, key_padding_mask=mha_convention(km), attn_mask=torch_am, need_weights=need_weights, average_attn_weights=False)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(w, r_w, atol=1e-5, rtol=1e-5)
    up = torch.randn_like(out)
    g1 = torch.autograd.grad(out, [x, ours.q_proj.weight, ours.out_proj.weight], up)
    g2 = torch.autograd.grad(r_out, [x, ref.in_proj_weight, ref.out_proj.weight], up)
    torch.testing.assert_close(g1[0], g2[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1[1], g2[1][:32], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1[2], g2[2], atol=1e-5, rtol=1e-5)


def test_multihead_cross_widths_match_torch():
    ref, ours = torch_pair(E=24, h=3, kdim=10, vdim=7)
    q, k, v = torch.randn(2, 5, 24), torch.randn(2, 8, 10), torch.randn(2, 8, 7)
    km = padding_mask([8, 4], 8)
    out, w = ours(q, k, v, key_mask=km, need_weights=True, average_weights=True)
    r_out, r_w = ref(q, k, v, key_padding_mask=mha_convention(km))
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, r_w, atol=1e-5, rtol=1e-5)


def test_multihead_gradcheck_and_properties():
    mha = MultiHeadAttention(8, 2).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mha(x, is_causal=True, need_weights=True).output, (x,))
    assert torch.autograd.gradcheck(lambda x: mha(x, is_causal=True).output, (x,))
    p = torch.randperm(4)
    torch.testing.assert_close(mha(x[:, p]).output, mha(x).output[:, p])
    # batched equals per-example
    torch.testing.assert_close(torch.cat([mha(x[i : i + 1]).output for i in range(2)]), mha(x).output)


def test_multihead_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq, embed_dim=8\)"):
        mha(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"key must have shape"):
        mha(torch.randn(1, 4, 8), torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="empty"):
        mha(torch.randn(1, 0, 8))
    with pytest.raises(TypeError, match=r"torch\.bool"):
        mha(torch.randn(1, 4, 8), attn_mask=torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not broadcast"):
        mha(torch.randn(1, 4, 8), attn_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="sizes"):
        MultiHeadAttention(8, 2).load_torch_weights(nn.MultiheadAttention(8, 4))


def test_recall_model_learns():
    task = AssociativeRecall(n_pairs=4, n_keys=8, n_values=8)
    torch.manual_seed(0)
    model = RecallModel(task, embed_dim=32, num_heads=2)
    train(model, task.sample, recall_loss, steps=150, progress=False)
    assert evaluate(model, task.sample, recall_loss)["acc"] > 0.9
