"""Chapter 23: attention distillation losses (MiniLM, TinyBERT, attention transfer) against explicit formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attn
from attn import registry
from attn.attention import AttentionBase
from attn.distillation import (
    AttentionRecord,
    RecordingAttention,
    activation_attention,
    attention_transfer_loss,
    logit_distillation_loss,
    minilm_attention_loss,
    minilm_value_loss,
    tinybert_attention_loss,
    tinybert_hidden_loss,
    value_relation,
)
from attn.experiments import own_task, own_tasks
from attn.experiments.distillation import (
    KINDS,
    Distiller,
    RecallTransformer,
    StudentRuns,
    distillation_loss,
    make_task,
    teacher_loss,
    train_students,
)
from attn.masks import padding_mask
from attn.models import TransformerBlock
from attn.tasks import AssociativeRecall
from attn.train import set_seed, train

TASK = AssociativeRecall(n_pairs=4, n_keys=8, n_values=8)
GOOD_X = torch.tensor([[0, 8, 1, 9, 2, 10, 3, 11, 2]] * 2)  # k1 v1 ... k4 v4 q


def rand_attn(*shape, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, dtype=dtype)
    a = logits.softmax(-1)
    return a.requires_grad_() if grad else a


# ----------------------------------------------------------------------------- the losses against explicit formulas


def test_minilm_attention_kl_matches_kl_div_and_is_zero_for_the_teacher():
    t = rand_attn(2, 3, 5, 5, seed=1)
    s = rand_attn(2, 3, 5, 5, seed=2, grad=True)
    ours = minilm_attention_loss(s, t)
    ref = F.kl_div(s.log(), t, reduction="sum") / (2 * 3 * 5)  # sum_{a,t} KL(A^T || A^S) / (A_h |x|), batch-averaged
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    g1, g2 = torch.autograd.grad(ours, s), torch.autograd.grad(ref, s)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-12)
    assert minilm_attention_loss(t, t) == 0
    assert ours > 0


def test_minilm_kl_with_padding_skips_padded_rows_and_handles_zeros():
    mask = padding_mask([5, 3], 5)
    t = rand_attn(2, 2, 5, 5, seed=3) * mask[:, None, None, :]
    t = t / t.sum(-1, keepdim=True)  # teacher puts 0 on padded keys
    s = rand_attn(2, 2, 5, 5, seed=4)
    loss = minilm_attention_loss(s, t, mask)
    rows = [(b, h, i) for b in range(2) for h in range(2) for i in range(5) if mask[b, i]]
    explicit = sum(float((t[b, h, i][t[b, h, i] > 0] * (t[b, h, i][t[b, h, i] > 0] / s[b, h, i][t[b, h, i] > 0]).log()).sum()) for b, h, i in rows) / len(rows)
    assert abs(float(loss) - explicit) < 1e-12
    s2 = s.clone()
    s2[1, :, 3:] = rand_attn(2, 2, 5, seed=9)  # padded query rows: no effect
    assert float(minilm_attention_loss(s2, t, mask)) == pytest.approx(float(loss), abs=1e-14)


def test_value_relation_and_value_loss_with_different_widths():
    g = torch.Generator().manual_seed(0)
    vt = torch.randn(2, 3, 6, 16, generator=g, dtype=torch.float64)
    vs = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    vr = value_relation(vt)
    for b in range(2):
        for h in range(3):
            explicit = torch.softmax(vt[b, h] @ vt[b, h].T / 4.0, -1)  # sqrt(16) = 4
            torch.testing.assert_close(vr[b, h], explicit)
    loss = minilm_value_loss(vs, vt)
    vrs = torch.softmax(vs @ vs.transpose(-1, -2) / 2.0, -1)  # sqrt(4)
    ref = F.kl_div(vrs.log(), vr, reduction="sum") / (2 * 3 * 6)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, vs)[0], torch.autograd.grad(ref, vs)[0])
    assert float(minilm_value_loss(vt, vt)) == pytest.approx(0.0, abs=1e-14)


def test_tinybert_attention_mse_is_the_mean_of_per_head_mse():
    g = torch.Generator().manual_seed(0)
    st = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tt = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    loss = tinybert_attention_loss(st, tt)
    per_head = sum(F.mse_loss(st[:, i], tt[:, i]) for i in range(4)) / 4
    torch.testing.assert_close(loss, per_head)
    assert tinybert_attention_loss(tt, tt) == 0
    mask = padding_mask([5, 2], 5)
    masked = tinybert_attention_loss(st, tt, mask)
    keep = mask[:, None, None, :]
    torch.testing.assert_close(masked, ((st - tt) ** 2 * keep).sum() / st.numel())


def test_tinybert_hidden_mse_with_projection():
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(3, 5, 20, generator=g, dtype=torch.float64)
    proj = torch.nn.Linear(8, 20, bias=False).double()
    loss = tinybert_hidden_loss(hs, ht, proj)
    explicit = ((hs @ proj.weight.T - ht) ** 2).sum() / (3 * 5 * 20)
    torch.testing.assert_close(loss, explicit)
    for a, b in zip(torch.autograd.grad(loss, (hs, proj.weight)), torch.autograd.grad(explicit, (hs, proj.weight)), strict=True):
        torch.testing.assert_close(a, b)
    same = torch.nn.Linear(20, 20, bias=False).double()
    with torch.no_grad():
        same.weight.copy_(torch.eye(20))
    assert tinybert_hidden_loss(ht, ht, same) == 0


def test_attention_transfer_matches_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    a_s = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)  # 4 student channels
    a_t = torch.randn(3, 9, 5, 6, generator=g, dtype=torch.float64)  # 9 teacher channels
    q = activation_attention(a_s)
    for b in range(3):
        energy = np.sum(a_s[b].detach().numpy() ** 2, axis=0).reshape(-1)
        np.testing.assert_allclose(q[b].detach().numpy(), energy / np.linalg.norm(energy), rtol=1e-12)
    loss = attention_transfer_loss(a_s, a_t)
    qs = (a_s**2).sum(1).flatten(1)
    qt = (a_t**2).sum(1).flatten(1)
    explicit = torch.stack([torch.linalg.vector_norm(qs[b] / qs[b].norm() - qt[b] / qt[b].norm()) for b in range(3)]).mean()
    torch.testing.assert_close(loss, explicit)
    torch.testing.assert_close(torch.autograd.grad(loss, a_s)[0], torch.autograd.grad(explicit, a_s)[0])
    assert float(attention_transfer_loss(a_t, a_t)) == pytest.approx(0.0, abs=1e-14)
    assert float(attention_transfer_loss(3 * a_t, a_t)) == pytest.approx(0.0, abs=1e-7)  # scale-free
    assert float(attention_transfer_loss(a_t.repeat(1, 2, 1, 1), a_t)) == pytest.approx(0.0, abs=1e-7)  # channel count free
    p1 = activation_attention(a_t, p=1)
    torch.testing.assert_close(p1, F.normalize(a_t.abs().sum(1).flatten(1)))


def test_gradcheck_float64():
    s = rand_attn(1, 2, 3, 3, seed=1, grad=True)
    t = rand_attn(1, 2, 3, 3, seed=2)
    assert torch.autograd.gradcheck(lambda s: minilm_attention_loss(s, t), (s,))
    vs = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    vt = torch.randn(1, 2, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: minilm_value_loss(v, vt, padding_mask([2], 3)), (vs,))
    a = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: attention_transfer_loss(a, torch.randn(2, 5, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))), (a,))


# ----------------------------------------------------------------------------- the models


def test_recording_attention_matches_sdpa():
    torch.manual_seed(0)
    att = RecordingAttention(16, 4)
    x = torch.randn(2, 7, 16, requires_grad=True)
    km = padding_mask([7, 5], 7)
    out, (scores, w, _v) = att.record(x, key_mask=km)
    q, k, vv = att.q_proj(x), att.k_proj(x), att.v_proj(x)
    split = lambda t: t.view(2, 7, 4, 4).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(split(q), split(k), split(vv), attn_mask=km[:, None, None, :])
    ref = att.out_proj(ref.transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores, split(q) @ split(k).transpose(-1, -2) / 2.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 7))
    assert (w[1, :, :, 5:] == 0).all()
    up = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, up)[0], torch.autograd.grad(ref, x, up)[0], atol=1e-6, rtol=1e-5)
    assert att(x).weights is None and att(x, need_weights=True).weights.shape == (2, 4, 7, 7)


def test_model_records_and_batched_equals_per_example():
    torch.manual_seed(0)
    model = RecallTransformer(TASK, embed_dim=16, num_heads=4, num_layers=2)
    b = TASK.sample(5, torch.Generator().manual_seed(0))
    logits, recs = model(b["x"])
    n = TASK.n_pairs + 1
    assert logits.shape == (5, TASK.n_values) and len(recs) == 2
    assert recs[-1].attn.shape == (5, 4, n, n) and recs[-1].values.shape == (5, 4, n, 4) and recs[-1].hidden.shape == (5, n, 16)
    per = torch.cat([model(b["x"][i : i + 1])[0] for i in range(5)])
    torch.testing.assert_close(per, logits, atol=1e-6, rtol=1e-5)


def test_distiller_losses_and_frozen_teacher():
    set_seed(0)
    teacher = RecallTransformer(TASK, embed_dim=32, num_heads=4)
    b = TASK.sample(16, torch.Generator().manual_seed(1))
    before = [p.clone() for p in teacher.parameters()]
    for kind in ("none", "minilm", "tinybert"):  # the other kinds: test_new_kinds_are_their_loss_...
        set_seed(1)
        d = Distiller(RecallTransformer(TASK, embed_dim=8, num_heads=4), teacher, kind, weight=0.5)
        loss, m = distillation_loss(d, b)
        logits, srec = d.student(b["x"])
        _, trec = teacher(b["x"])
        ce = F.cross_entropy(logits, b["y"] - TASK.n_keys)
        if kind == "none":
            expected = ce
            assert m["distill"] == 0 and d.projection is None
        elif kind == "minilm":
            expected = ce + 0.5 * (minilm_attention_loss(srec[-1].attn, trec[-1].attn) + minilm_value_loss(srec[-1].values, trec[-1].values))
        else:
            expected = ce + 0.5 * (tinybert_attention_loss(srec[-1].scores, trec[-1].scores)
                                   + tinybert_hidden_loss(srec[-1].hidden, trec[-1].hidden, d.projection))
            assert d.projection.weight.shape == (32, 8)
        torch.testing.assert_close(loss, expected)
        train(d, TASK.sample, distillation_loss, steps=3, batch_size=8, seed=0, progress=False)
        assert not teacher.training
    for p, q in zip(before, teacher.parameters(), strict=True):
        assert torch.equal(p, q)


def test_logit_distillation_is_tau_squared_kl_zero_for_the_teacher_and_logit_matching_at_high_tau():
    g = torch.Generator().manual_seed(0)
    zt = 3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    zs = torch.randn(5, 7, generator=g, dtype=torch.float64)
    for tau in (1.0, 2.0, 4.0):
        expected = tau**2 * F.kl_div(F.log_softmax(zs / tau, -1), F.softmax(zt / tau, -1), reduction="batchmean")
        torch.testing.assert_close(logit_distillation_loss(zs, zt, tau), expected)
        assert logit_distillation_loss(zt, zt, tau).item() == pytest.approx(0.0, abs=1e-12)
    # a shift of all logits changes no softmax
    torch.testing.assert_close(logit_distillation_loss(zs + 5.0, zt, 2.0), logit_distillation_loss(zs, zt, 2.0))
    # Hinton et al. 2.1: at high tau, with zero-mean logits, tau^2 KL -> (1 / 2C) sum_c (z^S_c - z^T_c)^2
    zs0, zt0 = zs - zs.mean(-1, keepdim=True), zt - zt.mean(-1, keepdim=True)
    matching = ((zs0 - zt0) ** 2).sum(-1).mean() / (2 * 7)
    assert logit_distillation_loss(zs0, zt0, 1e3).item() == pytest.approx(matching.item(), rel=1e-2)
    assert abs(logit_distillation_loss(zs0, zt0, 1.0).item() - matching.item()) > 0.05 * matching.item()  # not at tau = 1
    assert torch.autograd.gradcheck(lambda z: logit_distillation_loss(z, zt, 2.0), zs.clone().requires_grad_())
    assert logit_distillation_loss(zs[:0], zt[:0]).item() == 0.0


def test_new_kinds_are_their_loss_and_share_the_teacher_pass():
    set_seed(0)
    teacher = RecallTransformer(TASK, embed_dim=32, num_heads=4)
    b = TASK.sample(16, torch.Generator().manual_seed(1))
    t_logits, trec = teacher(b["x"])
    for kind in ("kd", "minilm_at", "minilm_vr"):
        set_seed(1)
        d = Distiller(RecallTransformer(TASK, embed_dim=8, num_heads=4), teacher, kind, weight=0.5, temperature=3.0)
        logits, srec = d.student(b["x"])
        ce = F.cross_entropy(logits, b["y"] - TASK.n_keys)
        if kind == "kd":
            term = logit_distillation_loss(logits, t_logits, 3.0)
        elif kind == "minilm_at":
            term = minilm_attention_loss(srec[-1].attn, trec[-1].attn)
        else:
            term = minilm_value_loss(srec[-1].values, trec[-1].values)
        loss, m = distillation_loss(d, b)
        torch.testing.assert_close(loss, ce + 0.5 * term)
        assert m["distill"] > 0
        shared, _ = distillation_loss(d, b, teacher(b["x"]))
        torch.testing.assert_close(shared, loss)
    # logit distillation needs no paired heads
    Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 4), "kd")


def test_train_students_same_start_same_batches_one_value_per_seed():
    """With weight 0 every kind is the labels-only student, bit for bit: same initial weights, same batches."""
    set_seed(0)
    teacher = RecallTransformer(TASK, embed_dim=16, num_heads=2)
    seen = []
    runs = train_students(TASK, teacher, KINDS, [3, 4], steps=7, student_dim=8, num_heads=2, batch_size=8,
                          weight=0.0, eval_every=3, eval_batch=32, test_batch=32, record=lambda m: seen.append(1) or 0)
    assert runs.steps == [3, 6, 7] and runs.seeds == [3, 4] and runs.kinds == list(KINDS)
    assert all(len(runs.curves[k]) == 2 and all(len(c) == 3 for c in runs.curves[k]) for k in KINDS)
    assert all(len(runs.final[k]) == 2 for k in KINDS) and len(runs.models) == 12 and len(seen) == 12 * 3
    for s in (3, 4):
        base = list(runs.models["none", s].student.parameters())
        for k in KINDS:
            for p, q in zip(base, runs.models[k, s].student.parameters(), strict=True):
                assert torch.equal(p, q), k
        assert runs.curves["kd"][s - 3] == runs.curves["none"][s - 3]
    other = list(runs.models["none", 4].student.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(runs.models["none", 3].student.parameters(), other, strict=True))
    # with weight 1 the kinds separate, and the teacher is untouched
    before = [p.clone() for p in teacher.parameters()]
    runs = train_students(TASK, teacher, ["none", "minilm_at"], [3], steps=4, student_dim=8, num_heads=2, batch_size=8,
                          eval_every=2, eval_batch=16, test_batch=16)
    a, b = (next(runs.models[k, 3].student.parameters()) for k in ("none", "minilm_at"))
    assert not torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(before, teacher.parameters(), strict=True))


def test_steps_to_target_is_censored_and_late_change_reads_the_end():
    runs = StudentRuns(kinds=["none", "kd"], seeds=[1, 2], steps=[10, 20, 30, 40],
                       curves={"none": [[0.2, 0.95, 0.96, 0.97], [0.1, 0.5, 0.8, 0.85]],
                               "kd": [[0.9, 0.9, 1.0, 1.0], [0.3, 0.6, 0.9, 0.7]]},
                       final={"none": [0.97, 0.85], "kd": [1.0, 0.7]}, models={})
    assert runs.steps_to(0.9) == {"none": [20, None], "kd": [10, 30]}
    assert runs.late_change(10) == pytest.approx({"none": 0.05, "kd": 0.2})
    assert runs.late_change(0) == {"none": 0.0, "kd": 0.0}


def test_a_student_distilling_attention_moves_its_attention_to_the_teachers():
    """The mechanism's trained state: 40 steps of the attention term bring the student's maps closer to a trained
    teacher's than the same student trained on the labels alone gets."""
    set_seed(0)
    teacher = RecallTransformer(TASK, embed_dim=32, num_heads=2)
    train(teacher, TASK.sample, teacher_loss, steps=60, batch_size=32, seed=0, progress=False)
    runs = train_students(TASK, teacher, ["none", "minilm_at"], [1], steps=40, student_dim=8, num_heads=2,
                          batch_size=32, lr=1e-2, weight=3.0, eval_every=40, eval_batch=16, test_batch=16)
    b = TASK.sample(64, torch.Generator().manual_seed(9))
    with torch.no_grad():
        t_attn = teacher(b["x"])[1][-1].attn
        kl = {k: minilm_attention_loss(runs.models[k, 1].student(b["x"])[1][-1].attn, t_attn).item()
              for k in ("none", "minilm_at")}
    assert kl["minilm_at"] < 0.5 * kl["none"]


def test_student_equal_to_teacher_has_zero_distillation():
    set_seed(0)
    teacher = RecallTransformer(TASK, embed_dim=16, num_heads=4)
    student = RecallTransformer(TASK, embed_dim=16, num_heads=4)
    student.load_state_dict(teacher.state_dict())
    b = TASK.sample(8, torch.Generator().manual_seed(0))
    assert distillation_loss(Distiller(student, teacher, "minilm"), b)[1]["distill"] == pytest.approx(0.0, abs=1e-6)
    d = Distiller(student, teacher, "tinybert")
    with torch.no_grad():
        d.projection.weight.copy_(torch.eye(16))
    assert distillation_loss(d, b)[1]["distill"] == pytest.approx(0.0, abs=1e-10)


def test_training_is_seeded_and_deterministic():
    set_seed(0)
    teacher = RecallTransformer(TASK, embed_dim=16, num_heads=4)

    def run(seed):
        set_seed(seed)
        d = Distiller(RecallTransformer(TASK, embed_dim=8, num_heads=4), teacher, "minilm")
        train(d, TASK.sample, distillation_loss, steps=4, batch_size=8, seed=seed, progress=False)
        return torch.cat([p.detach().flatten() for p in d.student.parameters()])

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_empty_batch():
    model = RecallTransformer(TASK, embed_dim=8, num_heads=2)
    logits, recs = model(torch.zeros(0, TASK.length, dtype=torch.long))
    assert logits.shape == (0, TASK.n_values) and recs[0].attn.shape == (0, 2, 5, 5)
    e = torch.zeros(0, 2, 5, 5)
    assert minilm_attention_loss(e, e) == 0 and tinybert_attention_loss(e, e) == 0
    assert attention_transfer_loss(torch.zeros(0, 3, 4, 4), torch.zeros(0, 2, 4, 4)) == 0
    assert tinybert_hidden_loss(torch.zeros(0, 5, 4), torch.zeros(0, 5, 6), torch.nn.Linear(4, 6)) == 0
    out = RecordingAttention(8, 2)(torch.zeros(0, 5, 8))
    assert out.output.shape == (0, 5, 8)


# ----------------------------------------------------------------------------- bad input

A = torch.rand(2, 3, 4, 4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: minilm_attention_loss(A.tolist(), A), TypeError, r"student_attn must be a torch.Tensor of shape \(batch, heads, n, n\)"),
        (lambda: minilm_attention_loss(A.long(), A), TypeError, "floating-point"),
        (lambda: minilm_attention_loss(A[0], A), ValueError, r"student_attn must have shape \(batch, heads, n, n\), got 3-D"),
        (lambda: minilm_attention_loss(torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)), ValueError, r"\(batch, heads, n, n\), got \(2, 3, 4, 5\)"),
        (lambda: minilm_attention_loss(torch.rand(2, 2, 4, 4), A), ValueError, "same number of heads"),
        (lambda: tinybert_attention_loss(torch.rand(2, 3, 5, 5), A), ValueError, "same shape"),
        (lambda: minilm_attention_loss(A, A, torch.ones(2, 4)), TypeError, "mask must be a torch.bool"),
        (lambda: minilm_attention_loss(A, A, torch.ones(2, 5, dtype=torch.bool)), ValueError, r"mask must have shape \(batch=2, n=4\)"),
        (lambda: minilm_value_loss(torch.rand(2, 3, 4, 2), torch.rand(2, 3, 5, 2)), ValueError, r"share \(batch, heads, n\)"),
        (lambda: tinybert_hidden_loss(torch.rand(2, 4, 3), torch.rand(2, 5, 6), torch.nn.Linear(3, 6)), ValueError, r"share \(batch, n\)"),
        (lambda: tinybert_hidden_loss(torch.rand(2, 4, 3), torch.rand(2, 4, 6), torch.nn.Linear(3, 5)), ValueError, "projection must map width 3"),
        (lambda: tinybert_hidden_loss(torch.rand(4, 3), torch.rand(2, 4, 6), torch.nn.Linear(3, 6)), ValueError, r"student_hidden must have shape \(batch, seq, embed_dim\)"),
        (lambda: attention_transfer_loss(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 5, 4)), ValueError, r"share batch and \(height, width\)"),
        (lambda: activation_attention(torch.rand(3, 4, 4)), ValueError, r"activations must have shape \(batch, channels, height, width\)"),
        (lambda: activation_attention(torch.rand(1, 3, 4, 4), p=0), ValueError, "p must be > 0"),
        (lambda: RecordingAttention(10, 3), ValueError, r"embed_dim \(10\) must be divisible by num_heads \(3\)"),
        (lambda: RecordingAttention(8, 2)(torch.rand(2, 5, 6)), ValueError, r"x must have shape \(batch, seq, embed_dim=8\)"),
        (lambda: RecallTransformer(TASK, 8, 2)(torch.rand(2, 9)), TypeError, "integer token ids"),
        (lambda: RecallTransformer(TASK, 8, 2)(torch.zeros(2, 9, dtype=torch.long).tolist()), TypeError, "must be a torch.Tensor"),
        (lambda: RecallTransformer(TASK, 8, 2)(torch.zeros(2, 7, dtype=torch.long)), ValueError, r"x must have shape \(batch, 9\)"),
        (lambda: RecallTransformer(TASK, 8, 2)(torch.full((2, 9), 99)), ValueError, r"x must be token ids in \[0, 16\), got values in \[99, 99\]"),
        (lambda: RecallTransformer(TASK, 8, 2)(torch.full((2, 9), -1)), ValueError, r"x must be token ids in \[0, 16\), got values in \[-1, -1\]"),
        (lambda: RecallTransformer(TASK, 8, 2)(torch.zeros(2, 9, dtype=torch.long)), ValueError, r"value ids in \[8, 16\) at odd positions, got 0"),
        (lambda: RecallTransformer(TASK, 8, 2)(GOOD_X.roll(1, -1)), ValueError, r"key ids in \[0, 8\) at even positions, got 11"),
        (lambda: Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 2))(torch.zeros(2, 9, dtype=torch.long)), ValueError, "value ids"),
        (lambda: Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 2))(GOOD_X.float()), TypeError, "x must hold integer token ids"),
        (lambda: Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 2), weight=float("nan")), ValueError, "weight must be finite"),
        (lambda: Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 2), weight=float("inf")), ValueError, "weight must be finite"),
        (lambda: Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 2), weight="1"), TypeError, "weight must be a real number"),
        (lambda: distillation_loss(Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 2)),
                                   {"x": GOOD_X, "y": torch.tensor([8, 99])}),
         ValueError, r'batch\["y"\] must be token ids in \[0, 16\)'),
        (lambda: distillation_loss(Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 2)),
                                   {"x": GOOD_X, "y": torch.tensor([8, 3])}),
         ValueError, r'batch\["y"\] must be value tokens in \[8, 16\)'),
        (lambda: teacher_loss(RecallTransformer(TASK, 8, 2), {"x": GOOD_X, "y": torch.tensor([8.0, 9.0])}),
         TypeError, r'batch\["y"\] must hold integer token ids'),
        (lambda: Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 4), "minilm"), ValueError, "pairs heads one to one"),
        (lambda: Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 2), "hint"), ValueError, "kind must be one of"),
        (lambda: Distiller(RecallTransformer(TASK, 8, 2), RecallTransformer(TASK, 8, 2), "kd", temperature=0.0), ValueError, "temperature"),
        (lambda: logit_distillation_loss(torch.rand(2, 3), torch.rand(2, 4)), ValueError, "must have the same shape"),
        (lambda: logit_distillation_loss(torch.rand(2, 3), torch.rand(2, 3), -1.0), ValueError, "temperature must be a positive"),
        (lambda: logit_distillation_loss(torch.rand(2, 3, 1), torch.rand(2, 3, 1)), ValueError, "student_logits"),
        (lambda: train_students(TASK, RecallTransformer(TASK, 8, 2), ["none", "none"], [0], steps=2), ValueError, "distinct kinds"),
        (lambda: train_students(TASK, RecallTransformer(TASK, 8, 2), ["hint"], [0], steps=2), ValueError, "distinct kinds"),
        (lambda: train_students(TASK, RecallTransformer(TASK, 8, 2), ["none"], [0], steps=0), ValueError, "must be positive"),
        (lambda: make_task("huge"), ValueError, "unknown task size 'huge'; one of quick, book, full, large"),
        (lambda: make_task("default"), ValueError, "unknown task size 'default'"),
        (lambda: RecordingAttention(8, 2)(torch.rand(2, 5, 8), key_mask=torch.ones(2, 5)), TypeError, "key_mask must be a torch.bool"),
        (lambda: RecordingAttention(8, 2)(torch.rand(2, 5, 8), key_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"key_mask must have shape \(batch=2, n_keys=5\)"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name, kind", [("minilm_distillation", "minilm"), ("tinybert_distillation", "tinybert")])
def test_registry_own_task(name, kind):
    mech = registry.get(name)
    assert mech.chapter == 23 and mech.cls is RecordingAttention and mech.build is None
    own = own_task(name, "quick")
    assert kind in own.description and own.model.kind == kind
    hist = train(own.model, own.sample, own.loss, steps=3, batch_size=own.batch_size, seed=0, progress=False)
    assert len(hist.loss) == 1 and "distill" in hist.metrics
    gen = torch.Generator().manual_seed(0)
    out = own.layer(*own.inputs(own.sizes[0], gen))
    assert out.output.shape == (8, own.sizes[0], 16)
    w = own.weights(own.model, own.sample(4, gen))
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 4))
    assert registry.chapter(23).slug == "attention_distillation"
    assert math.isfinite(teacher_loss(own.model.teacher, own.sample(4, gen))[0].item())


# ----------------------------------------------------------------------------- one attention interface, experiments apart


def test_recording_attention_is_multihead_attention_that_records():
    """The recorder is :class:`AttentionBase` around the sdpa kernel: MultiHeadAttention's state dict, its output."""
    torch.manual_seed(0)
    rec = RecordingAttention(16, 4).double()
    mha = attn.MultiHeadAttention(16, 4).double()
    assert isinstance(rec, AttentionBase) and rec.kernel == "sdpa"
    mha.load_state_dict(rec.state_dict())  # the same parameter names: q_proj, k_proj, v_proj, out_proj
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    km = padding_mask([6, 4], 6)
    out, w = rec(x, key_mask=km, need_weights=True)
    ref, ref_w = mha(x, key_mask=km, need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=1e-12)
    assert isinstance(rec.last, AttentionRecord)
    torch.testing.assert_close(rec.last.attn, w)
    torch.testing.assert_close(rec.last.scores.masked_fill(~km[:, None, None, :], float("-inf")).softmax(-1), w)
    assert rec.last.values.shape == (2, 4, 6, 4)
    causal, _ = rec(x, is_causal=True, need_weights=True)
    torch.testing.assert_close(causal[:, 0], rec(x[:, :1]).output[:, 0], atol=1e-12, rtol=1e-12)


def test_recall_transformer_is_post_norm_transformer_blocks_around_the_recorder():
    torch.manual_seed(0)
    model = RecallTransformer(TASK, embed_dim=16, num_heads=4, num_layers=2)
    assert all(isinstance(b, TransformerBlock) and not b.norm_first for b in model.blocks)
    assert all(isinstance(model.attention(i), RecordingAttention) for i in range(2))
    b = TASK.sample(3, torch.Generator().manual_seed(0))
    _, recs = model(b["x"])
    h = model.tokens(b["x"])
    for i, block in enumerate(model.blocks):  # h = LN(x + Attn(x)), y = LN(h + FFN(h))
        a = model.attention(i)(h).output
        h = block.norm1(h + a)
        h = block.norm2(h + block.ffn(h))
        torch.testing.assert_close(recs[i].hidden, h)


def test_own_tasks_live_in_the_experiments_module_by_size():
    tasks = own_tasks()
    assert {"minilm_distillation", "tinybert_distillation"} <= set(tasks)
    assert registry.get("minilm_distillation").own_task is not None  # the comparison finds it in attn.experiments
    assert attn.Distiller is Distiller
