"""Chapter 21: hard attention (REINFORCE, straight-through Gumbel-softmax) against exact expectations and formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.experiments import own_task, own_tasks
from attn.experiments.hard import (
    LOOKUP_ARMS,
    NEAREST_ARMS,
    LookupModel,
    LookupTask,
    NearestModel,
    NearestTask,
    expected_loss,
    gradient_samples,
    lookup_loss,
    make_lookup_task,
    nearest_comparison,
    nearest_loss,
    train_lookup,
)
from attn.hard import (
    HardAttention,
    HardSelfAttention,
    MovingAverageBaseline,
    gumbel_noise,
    hard_attention,
    reinforce_loss,
    rloo_loss,
    select,
    soft_substitution,
)
from attn.masks import padding_mask
from attn.multihead import MultiHeadAttention
from attn.train import set_seed, train


def per_sample_score_gradients(scores, losses, estimator, tau=1.0, baseline=0.0, m=20000, seed=0):
    """Per-sample gradient estimates wrt the scores ``(n,)``: each row of a leaf ``(m, n)`` copy is its own sample."""
    s_rep = scores.detach().repeat(m, 1).requires_grad_()
    g = torch.Generator().manual_seed(seed)
    weights, _probs, _index, log_prob, _entropy = select(s_rep, estimator, tau, generator=g)
    loss = weights @ losses  # (m,): l(z) for a one-hot pick (and the relaxed mix in the backward for gumbel)
    total = reinforce_loss(loss, log_prob, baseline) * m if estimator == "reinforce" else loss.sum()
    total.backward()
    return s_rep.grad  # (m, n), row i = estimate from sample i


def exact_score_gradient(scores, losses):
    s = scores.detach().requires_grad_()
    (torch.softmax(s, -1) @ losses).backward()
    return s.grad


# ----------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("baseline", [0.0, 1.3])
def test_reinforce_is_unbiased_within_standard_error(baseline):
    """E_z[(l_z - b) grad log p_z] = grad sum_j p_j l_j: the Monte-Carlo mean lies within 4 standard errors."""
    scores = torch.tensor([0.3, -1.0, 1.2, 0.1, -0.4], dtype=torch.float64)
    losses = torch.tensor([2.0, 0.5, 1.0, 3.0, 0.2], dtype=torch.float64)
    exact = exact_score_gradient(scores, losses)
    est = per_sample_score_gradients(scores, losses, "reinforce", baseline=baseline)
    mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    z = (mean - exact).abs() / se
    assert z.max() < 4.0, (mean, exact, se)
    assert exact.abs().max() > 10 * se.max()  # the test has the power to see a wrong mean


def test_straight_through_gumbel_is_biased_and_baseline_lowers_variance():
    scores = torch.tensor([0.3, -1.0, 1.2, 0.1, -0.4], dtype=torch.float64)
    losses = torch.tensor([2.0, 0.5, 1.0, 3.0, 0.2], dtype=torch.float64)
    exact = exact_score_gradient(scores, losses)
    st = per_sample_score_gradients(scores, losses, "gumbel", tau=1.0)
    se = st.std(0) / math.sqrt(st.shape[0])
    assert ((st.mean(0) - exact).abs() / se).max() > 6.0  # the same check rejects ST-Gumbel: it is biased
    no_b = per_sample_score_gradients(scores, losses, "reinforce", baseline=0.0).var(0).sum()
    good_b = per_sample_score_gradients(scores, losses, "reinforce", baseline=float(torch.softmax(scores, -1) @ losses)).var(0).sum()
    assert good_b < 0.5 * no_b


def test_gumbel_max_samples_follow_p_and_noise_is_finite():
    scores = torch.tensor([1.0, 0.0, -1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    _, probs, index, _, _ = select(scores.repeat(40000, 1), "reinforce", generator=g)
    freq = torch.bincount(index, minlength=4).float() / 40000
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)
    noise = gumbel_noise((100000,), torch.Generator().manual_seed(1))
    assert torch.isfinite(noise).all() and abs(noise.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni


# ----------------------------------------------------------------------------- select: formulas and gradients


def test_select_formulas():
    torch.manual_seed(0)
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w, p, idx, lp, ent = select(s, "soft")
    torch.testing.assert_close(w, torch.softmax(s, -1))
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))
    torch.testing.assert_close(lp, torch.log_softmax(s, -1).gather(-1, idx[:, None])[:, 0])
    # gumbel, straight-through: forward one-hot, backward = gradient of the relaxed sample with the same noise
    g = torch.Generator().manual_seed(3)
    w, _, idx, _, _ = select(s, "gumbel", tau=0.7, generator=g)
    assert torch.equal(w.detach(), F.one_hot(idx, 6).double())
    noise = gumbel_noise((3, 6), torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.softmax((s + noise) / 0.7, -1)
    assert torch.equal(idx, (s + noise).argmax(-1))
    up = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(w, s, up)[0], torch.autograd.grad(y, s, up)[0])
    # reinforce: the weights carry no gradient to the scores; log_prob does
    w, _, idx, lp, _ = select(s, "reinforce", generator=torch.Generator().manual_seed(3))
    assert not w.requires_grad
    torch.testing.assert_close(torch.autograd.grad(lp.sum(), s)[0], F.one_hot(idx, 6).double() - torch.softmax(s, -1))
    # (the straight-through forward is piecewise constant: its gradient is checked against y's above, not numerically)
    assert torch.autograd.gradcheck(lambda s: select(s, "reinforce", generator=torch.Generator().manual_seed(5))[3], (s,))
    assert torch.autograd.gradcheck(lambda s: select(s, "soft")[0], (s,))
    assert torch.autograd.gradcheck(lambda s: select(s, "soft")[4], (s,))


def test_select_masks_and_eval_mode():
    s = torch.tensor([[3.0, 0.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [False, False, False, False]])
    for est in ("soft", "reinforce", "gumbel"):
        for tau in (0.1, 1.0):
            w, p, idx, lp, ent = select(s, est, tau, mask, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(w).all() and torch.isfinite(lp).all() and torch.isfinite(ent).all()
            assert idx[0] != 3 and (w[0, 3] == 0) and (p[0, 3] == 0)
            assert (w[1] == 0).all()  # a row with no key reads nothing
    w, *_ = select(s, "gumbel", mask=mask, sample=False)
    assert torch.equal(w[0], torch.tensor([1.0, 0, 0, 0]))  # eval: argmax of p among the allowed keys


# ----------------------------------------------------------------------------- gradients reach W_q and W_k


@pytest.mark.parametrize("estimator", ["reinforce", "gumbel", "soft"])
def test_gradients_reach_query_and_key_projections(estimator):
    torch.manual_seed(0)
    task = LookupTask()
    model = LookupModel(task, estimator, entropy_weight=0.0).train()
    batch = task.sample(16, torch.Generator().manual_seed(0))
    loss, _ = lookup_loss(model, batch, generator=torch.Generator().manual_seed(1))
    loss.backward()
    for lin in (model.attention.q_proj, model.attention.k_proj):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert model.label_embed.weight.grad.abs().sum() > 0


def test_reinforce_loss_gradient_formula_and_baseline():
    torch.manual_seed(0)
    s = torch.randn(4, 5, requires_grad=True)
    _, p, idx, lp, ent = select(s, "reinforce", generator=torch.Generator().manual_seed(0))
    loss = torch.tensor([1.0, 2.0, 0.5, 3.0])
    surrogate = reinforce_loss(loss, lp, 1.5, ent, entropy_weight=0.1)
    grad = torch.autograd.grad(surrogate, s)[0]
    onehot = F.one_hot(idx, 5).float()
    dlogp = onehot - p.detach()
    logp = torch.log_softmax(s.detach(), -1)
    dent = -p.detach() * (logp + ent.detach()[:, None])  # dH/ds_j = -p_j (log p_j + H)
    expected = ((loss - 1.5)[:, None] * dlogp - 0.1 * dent) / 4
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)
    b = MovingAverageBaseline(0.9)
    assert b.update(torch.tensor([2.0, 4.0])) == 3.0  # first batch: its own mean
    assert math.isclose(float(b.update(torch.tensor([1.0]))), 3.0, rel_tol=1e-6)
    assert math.isclose(float(b.value), 0.9 * 3 + 0.1 * 1, rel_tol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageBaseline(1.0)


def test_gradient_samples_estimate_the_expected_loss_gradient_for_reinforce():
    torch.manual_seed(0)
    task = LookupTask(n_items=6)
    model = LookupModel(task, "reinforce")
    batch = task.sample(8, torch.Generator().manual_seed(0))
    att = model.attention
    params = [att.q_proj.weight, att.q_proj.bias, att.k_proj.weight, att.k_proj.bias]
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(expected_loss(model, batch), params)])
    b = float(expected_loss(model, batch).detach())
    est = gradient_samples(model, batch, 256, baseline=b)
    mean, se = est.mean(0), est.std(0) / 16
    assert (((mean - exact).abs() - 4.5 * se) <= 1e-7).all()
    soft = gradient_samples(LookupModel(task, "soft"), batch, 3)
    assert torch.equal(soft[0], soft[2])


# ----------------------------------------------------------------------------- the layers: shapes, masks, bad input


def test_hard_attention_layer_and_self_attention():
    torch.manual_seed(0)
    att = HardAttention(5, 4, 8, "gumbel")
    q, k, v = torch.randn(2, 3, 5), torch.randn(2, 7, 4), torch.randn(2, 7, 6)
    km = padding_mask([7, 4], 7)
    out = att(q, k, v, key_mask=km)
    assert out.output.shape == (2, 3, 6) and out.weights.shape == (2, 3, 7) and out.index.shape == (2, 3)
    assert (out.index[1] < 4).all()
    rows = torch.arange(2)[:, None]
    torch.testing.assert_close(out.output, v[rows, out.index])  # one value read per query
    att.eval()
    ev = att(q, k, v, key_mask=km)
    assert torch.equal(ev.index, ev.probs.argmax(-1))
    torch.testing.assert_close(ev.output, ev.weights @ v)  # the gathered read equals the one-hot product
    rf = HardAttention(5, 4, 8, "reinforce")
    rf.load_state_dict(att.state_dict())
    vr = v.clone().requires_grad_()
    res = rf(q, k, vr, key_mask=torch.zeros(2, 7, dtype=torch.bool).index_fill(1, torch.tensor([2]), True))
    assert (res.index == 2).all()
    torch.testing.assert_close(res.output, vr[:, 2:3].expand(2, 3, 6))
    res.output.sum().backward()
    assert (vr.grad[:, 2] == 3).all() and (vr.grad[:, [0, 1, 3, 4, 5, 6]] == 0).all()
    sa = HardSelfAttention(8, 2, causal=True)
    x = torch.randn(3, 6, 8)
    y, w = sa(x, need_weights=True)
    assert y.shape == (3, 6, 8) and w.shape == (3, 2, 6, 6)
    assert (w.triu(1) == 0).all() and torch.equal(w.sum(-1), torch.ones(3, 2, 6))
    sa.eval()
    x2 = x.clone()
    x2[:, 4:] = torch.randn(3, 2, 8)
    torch.testing.assert_close(sa(x2).output[:, :4], sa(x).output[:, :4])  # causal
    torch.testing.assert_close(torch.cat([sa(x[i : i + 1]).output for i in range(3)]), sa(x).output)


@pytest.mark.parametrize("bad, err, match", [
    ([[0.0] * 8], TypeError, r"x must be a torch.Tensor of shape \(batch, seq, embed_dim=8\)"),
    (torch.ones(2, 3, 8, dtype=torch.long), TypeError, "floating-point"),
    (torch.ones(3, 8), ValueError, r"embed_dim=8\), got 2-D"),
    (torch.ones(2, 3, 5), ValueError, r"got \(2, 3, 5\)"),
])
def test_self_attention_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        HardSelfAttention(8, 2)(bad)


def test_bad_arguments():
    att = HardAttention(5, 4)
    q, k, v = torch.randn(2, 3, 5), torch.randn(2, 7, 4), torch.randn(2, 7, 6)
    with pytest.raises(TypeError, match=r"query must be a torch.Tensor of shape \(batch, n_queries, query_dim=5\)"):
        att(q.tolist(), k, v)
    with pytest.raises(ValueError, match=r"query_dim=5\), got \(2, 3, 4\)"):
        att(torch.randn(2, 3, 4), k, v)
    with pytest.raises(ValueError, match=r"key_dim=4\)"):
        att(q, torch.randn(2, 7, 5), v)
    with pytest.raises(ValueError, match="share the batch"):
        att(q, k, torch.randn(2, 6, 6))
    with pytest.raises(TypeError, match="floating-point"):
        att(q, k.long(), v)
    with pytest.raises(ValueError, match="key_mask"):
        att(q, k, v, key_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="estimator must be one of"):
        HardAttention(5, 4, estimator="argmax")
    with pytest.raises(ValueError, match="tau must be a positive"):
        HardAttention(5, 4, tau=0.0)
    with pytest.raises(ValueError, match="tau must be a positive"):
        select(torch.zeros(3), "gumbel", tau=-1)
    with pytest.raises(ValueError, match="share the batch"):
        reinforce_loss(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="n_items"):
        LookupTask(n_items=1)


def test_empty_batch():
    out = HardSelfAttention(8, 2)(torch.zeros(0, 5, 8), need_weights=True)
    assert out.output.shape == (0, 5, 8) and out.weights.shape == (0, 2, 5, 5)
    res = HardAttention(5, 4)(torch.zeros(0, 3, 5), torch.zeros(0, 7, 4), torch.zeros(0, 7, 6))
    assert res.output.shape == (0, 3, 6) and res.weights.shape == (0, 3, 7)


# ----------------------------------------------------------------------------- task, learning, registry


def test_lookup_task_is_consistent():
    task = LookupTask()
    b = task.sample(64, torch.Generator().manual_seed(0))
    rows = torch.arange(64)
    assert torch.equal(b["y"], b["labels"][rows, b["target"]])
    recovered = torch.einsum("bd,bnd->bn", b["query"][:, 0] @ task.rotation, b["keys"])  # (R^T q) . k_j
    assert (recovered.argmax(-1) == b["target"]).float().mean() > 0.95  # the target is the key the query encodes
    torch.testing.assert_close(task.rotation @ task.rotation.T, torch.eye(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("estimator", ["reinforce", "gumbel"])
def test_hard_estimators_learn_the_lookup(estimator):
    torch.manual_seed(0)
    task = LookupTask()
    model = LookupModel(task, estimator)
    hist = train(model, task.sample, lookup_loss, steps=250, batch_size=32, lr=1e-2, progress=False)
    assert hist.metrics["pick_acc"][-1] > 0.5 and hist.metrics["pick_acc"][0] < 0.3


def test_registry_entries():
    m = registry.get("hard_gumbel")
    assert m.chapter == 21 and m.data == "sequence"
    out = m.build(16, 4)(torch.randn(2, 5, 16), need_weights=True)
    assert out.output.shape == (2, 5, 16) and out.weights.shape == (2, 4, 5, 5)
    m = registry.get("hard_reinforce")
    assert m.chapter == 21 and m.build is None and m.cls is HardAttention
    assert own_tasks()["hard_reinforce"] is make_lookup_task
    own = own_task("hard_reinforce", "quick")
    hist = train(own.model, own.sample, own.loss, steps=own.steps, batch_size=own.batch_size, lr=own.lr, progress=False)
    assert len(hist.loss) > 0
    g = torch.Generator().manual_seed(0)
    for size in own.sizes:
        assert own.layer(*own.inputs(size, g)).output.shape == (8, 1, 16)
    torch.testing.assert_close(own.weights(own.model, own.sample(4, g)).sum(-1), torch.ones(4))
    with pytest.raises(ValueError, match="unknown task size 'huge'"):
        make_lookup_task("huge")


def test_soft_estimator_layer_is_multihead_attention_with_the_same_weights():
    """Issue 23: HardSelfAttention is an AttentionBase (no fused qkv): MultiHeadAttention's state dict loads as is, and
    with the soft estimator the two agree; in evaluation the hard layer reads the argmax key of those weights."""
    torch.manual_seed(0)
    hard, mha = HardSelfAttention(16, 4, estimator="soft", causal=True).double().eval(), MultiHeadAttention(16, 4).double()
    hard.load_state_dict(mha.state_dict())
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    km = padding_mask([9, 6], 9)
    out, w = hard(x, key_mask=km, need_weights=True)
    ref, w_ref = mha(x, key_mask=km, is_causal=True, need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w, w_ref, atol=1e-12, rtol=1e-12)
    gumbel = HardSelfAttention(16, 4, causal=True).double().eval()
    gumbel.load_state_dict(mha.state_dict())
    _, picks = gumbel(x, key_mask=km, need_weights=True)
    assert torch.equal(picks.argmax(-1), w_ref.argmax(-1)) and gumbel.last is not None
    assert torch.equal(gumbel.last.index, w_ref.argmax(-1))


def test_hard_attention_function_on_split_heads():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    km = padding_mask([5, 3], 5)
    res = hard_attention(q, k, v, key_mask=km, is_causal=True)
    assert res.output.shape == (2, 3, 5, 4) and res.index.shape == (2, 3, 5)
    assert (res.index <= torch.arange(5)).all() and (res.index[1] < 3).all()
    torch.testing.assert_close(res.output, res.weights @ v)
    assert res.index.dtype == torch.long and not isinstance(res, tuple)  # a dataclass: out.index is the field


# ----------------------------------------------------------------------------- RLOO, soft substitution


def rloo_score_gradients(scores, losses, k=4, m=20000, seed=0):
    """Per-example RLOO estimates wrt the scores: row i uses its own K picks."""
    s_rep = scores.detach().repeat(m, 1).requires_grad_()
    g = torch.Generator().manual_seed(seed)
    _w, _p, index, log_prob, _e = select(s_rep[:, None, :].expand(m, k, -1), "reinforce", generator=g)
    (rloo_loss(losses[index], log_prob) * m).backward()
    return s_rep.grad, index


def test_rloo_is_unbiased_and_beats_k_plain_samples():
    """The leave-one-out estimate averages to the exact gradient (4 SE) with less variance than K samples, b = 0."""
    scores = torch.tensor([0.3, -1.0, 1.2, 0.1, -0.4], dtype=torch.float64)
    losses = torch.tensor([2.0, 0.5, 1.0, 3.0, 0.2], dtype=torch.float64)
    exact = exact_score_gradient(scores, losses)
    est, index = rloo_score_gradients(scores, losses)
    assert index.shape == (20000, 4) and not (index == index[:, :1]).all()  # K independent picks per row
    se = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - exact).abs() / se).max() < 4
    plain = per_sample_score_gradients(scores, losses, "reinforce", baseline=0.0, m=80000, seed=3)
    plain_k = plain.reshape(20000, 4, -1).mean(1)  # the average of 4 one-sample estimates, no baseline
    assert est.var(0).sum() < 0.5 * plain_k.var(0).sum()


def test_rloo_loss_gradient_is_the_leave_one_out_advantage():
    loss = torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.5, 2.0]])
    log_prob = torch.zeros(2, 3, requires_grad=True)
    rloo_loss(loss, log_prob).backward()
    b = (loss.sum(1, keepdim=True) - loss) / 2
    torch.testing.assert_close(log_prob.grad, (loss - b) / 6)  # / (B K)
    ent = torch.ones(2, 3, requires_grad=True)
    rloo_loss(loss, torch.zeros(2, 3), ent, entropy_weight=0.1).backward()
    torch.testing.assert_close(ent.grad, torch.full((2, 3), -0.1 / 6))
    with pytest.raises(ValueError, match="n_samples >= 2"):
        rloo_loss(torch.zeros(4, 1), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="same shape"):
        rloo_loss(torch.zeros(4, 2), torch.zeros(4, 3))


def test_soft_substitution_reads_soft_or_sampled():
    torch.manual_seed(0)
    att = HardAttention(4, 4, 8, "reinforce").train()
    q, k, v = torch.randn(4000, 1, 4), torch.randn(4000, 5, 4), torch.randn(4000, 5, 3)
    out = att(q, k, v, generator=torch.Generator().manual_seed(0))
    hard_read, _ = soft_substitution(out, v, 0.0)
    torch.testing.assert_close(hard_read, out.output)
    soft_read, sampled = soft_substitution(out, v, 1.0)
    assert not sampled.any()
    torch.testing.assert_close(soft_read, out.probs @ v)
    mixed, sampled = soft_substitution(out, v, 0.5, torch.Generator().manual_seed(1))
    assert 0.45 < sampled.float().mean() < 0.55
    torch.testing.assert_close(mixed[sampled], out.output[sampled])
    torch.testing.assert_close(mixed[~sampled], (out.probs @ v)[~sampled])
    with pytest.raises(ValueError, match="prob"):
        soft_substitution(out, v, 1.5)


@pytest.mark.parametrize("arm", ["RLOO, K = 4", "REINFORCE, K = 4, moving average", "REINFORCE, soft substitution 0.5"])
def test_lookup_arms_reach_the_projections(arm):
    task = LookupTask()
    torch.manual_seed(0)
    model = LookupModel(task, **LOOKUP_ARMS[arm]).train()
    loss, metrics = lookup_loss(model, task.sample(16, torch.Generator().manual_seed(0)))
    loss.backward()
    assert model.attention.q_proj.weight.grad.norm() > 0 and model.attention.k_proj.weight.grad.norm() > 0
    assert 0 <= metrics["pick_acc"] <= 1
    with pytest.raises(ValueError):
        LookupModel(task, "gumbel", samples=4)
    with pytest.raises(ValueError):
        LookupModel(task, "reinforce", samples=1, baseline="loo")


def test_train_lookup_same_start_for_every_arm():
    task = LookupTask()
    hists = [train_lookup(task, LOOKUP_ARMS[a], seed=2, steps=10)[1] for a in ("soft", "RLOO, K = 4")]
    assert all(h.step == [5, 10] for h in hists)
    torch.manual_seed(5)
    set_seed(1002)
    w = LookupModel(task).attention.q_proj.weight
    set_seed(1002)
    torch.testing.assert_close(LookupModel(task, "reinforce", samples=4, baseline="loo").attention.q_proj.weight, w)


def test_nearest_task_scores_can_express_the_nearest_item():
    task = NearestTask()
    b = task.sample(500, torch.Generator().manual_seed(0))
    v, t = b["values"][..., 0], b["t"]
    torch.testing.assert_close(b["keys"] / task.scale, torch.stack([v, v * v], -1))
    bilinear = 2 * (b["query"][:, :, 0] / task.scale) * (b["keys"][..., 0] / task.scale) - b["keys"][..., 1] / task.scale
    assert torch.equal(bilinear.argmax(-1), b["target"])  # 2 t v - v^2 = t^2 - (v - t)^2
    assert torch.equal(b["target"], (v - t[:, None]).abs().argmin(-1))


def test_nearest_loss_regret_and_straight_through_tangent():
    """Regret >= 0; the straight-through score gradient is the tangent 2 (v_z - t) v_j through y."""
    task = NearestTask(n_items=3)
    model = NearestModel("gumbel", tau=1.0)
    batch = task.sample(64, torch.Generator().manual_seed(1))
    _loss, m = nearest_loss(model.train(), batch, torch.Generator().manual_seed(2))
    assert m["regret"] >= 0 and 0 <= m["pick_acc"] <= 1
    # the REBAR toy: v = (0, 1), t = 0.45 -> the nearest is 0 but the tangent at v_z = 0 says "go towards 1"
    s = torch.zeros(1, 2, requires_grad=True)
    w, *_ = select(s, "gumbel", 1.0, generator=torch.Generator().manual_seed(0))
    read = w @ torch.tensor([0.0, 1.0])
    ((read - 0.45) ** 2).sum().backward()
    picked = int(w.detach().argmax())
    assert (s.grad[0, 1] < 0) == (picked == 0)  # descent raises item 1's score whenever item 0 was read


def test_nearest_comparison_returns_one_value_per_seed_and_arm():
    res = nearest_comparison(NearestTask(), [0, 1, 2], steps=4, more_steps=2)
    assert set(res["regret"]) == set(NEAREST_ARMS) and all(len(v) == 3 for v in res["regret"].values())
    assert set(res["continued regret"]) == {"RLOO, K = 4", "ST Gumbel, tau = 0.5", "ST Gumbel, tau = 1"}
    assert all(len(v) == 3 and min(v) >= 0 for v in res["continued regret"].values())
