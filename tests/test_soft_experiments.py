"""Chapter 1's experiments: the softmax gradient's sign, the reorder task, the bottleneck model, greedy decoding."""

from __future__ import annotations

import pytest
import torch

from attn.experiments.soft import (
    BottleneckSeq2Seq,
    RankedReorderTask,
    bottleneck_sweep,
    greedy_decode,
    reorder_loss,
)
from attn.soft import Seq2SeqAttention, softmax_vjp
from attn.train import evaluate, set_seed, train


def test_softmax_gradient_formula_and_sign():
    """dL/de_k = p_k (g_k - <p, g>) (autograd against the formula); descent raises e_k iff g_k < <p, g>."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(32, 9, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(32, 9, dtype=torch.float64, generator=g)
    p = e.softmax(-1)
    (auto,) = torch.autograd.grad((p * upstream).sum(), e)  # L = <g, p>, so dL/dp = g
    mean_g = (p * upstream).sum(-1, keepdim=True).detach()
    torch.testing.assert_close(auto, p.detach() * (upstream - mean_g), rtol=0, atol=1e-14)
    torch.testing.assert_close(softmax_vjp(p.detach(), upstream), auto, rtol=0, atol=1e-14)
    step = -0.1 * auto  # one gradient-descent step on e
    assert torch.equal(step > 0, upstream < mean_g)  # raised exactly where g_k is below the weighted mean


def test_ranked_reorder_task_alignment_depends_on_the_input():
    task = RankedReorderTask(length=10, n_values=5)
    b = task.sample(64, torch.Generator().manual_seed(0))
    assert b["values"].min() >= 1 and b["values"].max() <= 5
    assert torch.equal(b["ranks"].sort(-1).values, torch.arange(10).expand(64, 10))  # a permutation per example
    assert torch.equal(b["ranks"].gather(1, b["align"]), torch.arange(10).expand(64, 10))  # r_{align[t]} = t
    assert torch.equal(b["tgt"], b["values"].gather(1, b["align"]))
    assert torch.equal(b["tgt_in"][:, 1:], b["tgt"][:, :-1]) and (b["tgt_in"][:, 0] == 0).all()
    assert len({tuple(a) for a in b["align"].tolist()}) == 64  # no fixed pattern: every example its own
    again = task.sample(64, torch.Generator().manual_seed(0))
    assert all(torch.equal(b[k], again[k]) for k in b)
    with pytest.raises(ValueError):
        RankedReorderTask(length=0)


def _batch(length=6, batch=5):
    return RankedReorderTask(length, 4).sample(batch, torch.Generator().manual_seed(1))


def test_no_attention_model_reads_the_source_only_through_the_last_state():
    """Zeroing every annotation but the last state changes nothing without attention, everything with it."""
    b = _batch()
    for attention in (False, True):
        torch.manual_seed(0)
        model = BottleneckSeq2Seq(4, 6, embed=8, hidden=8, attention=attention)
        logits, alpha = model(b["values"], b["ranks"], b["tgt_in"])
        assert logits.shape == (5, 6, 5) and (alpha is None) == (not attention)
        hook = model.encoder.register_forward_hook(lambda m, i, out: (torch.zeros_like(out[0]), out[1]))
        blinded, _ = model(b["values"], b["ranks"], b["tgt_in"])
        hook.remove()
        assert torch.allclose(blinded, logits) == (not attention)


def test_attention_step_i_queries_with_the_previous_state():
    """Step 0 attends with s_0 (from the source alone); step 1's query has read y_0."""
    b = _batch()
    torch.manual_seed(0)
    model = BottleneckSeq2Seq(4, 6, embed=8, hidden=8, attention=True)
    _, a1 = model(b["values"], b["ranks"], b["tgt_in"])
    other = b["tgt_in"].clone()
    other[:, 1] = other[:, 1] % 4 + 1
    _, a2 = model(b["values"], b["ranks"], other)
    assert a1 is not None and a2 is not None
    torch.testing.assert_close(a1[:, :2], a2[:, :2])  # rows 0, 1 read tgt_in[:, :1] only
    assert not torch.allclose(a1[:, 2], a2[:, 2])  # row 2 attends with s_1, which read tgt_in[:, 1]


def test_bottleneck_sweep_records_one_value_per_length_seed_and_arm():
    recs = bottleneck_sweep(lengths=(5,), seeds=(0, 1, 2), steps=2, batch_size=4, eval_batch=8, hidden=8, embed=8)
    assert len(recs) == 3 * 2
    assert {(r["length"], r["seed"], r["arm"]) for r in recs} == {
        (5, s, a) for s in (0, 1, 2) for a in ("attention", "no attention")}
    assert all(0 <= r["acc"] <= 1 for r in recs)
    assert all((r["align_acc"] is None) == (r["arm"] == "no attention") for r in recs)
    again = bottleneck_sweep(lengths=(5,), seeds=(1,), steps=2, batch_size=4, eval_batch=8, hidden=8, embed=8)
    assert [r["acc"] for r in again] == [r["acc"] for r in recs if r["seed"] == 1]  # same seed, same run


def test_attention_arm_learns_a_short_reordering():
    """Sanity on a tiny budget: the attention arm aligns at length 6, the no-attention arm stays below it."""
    task = RankedReorderTask(6, 4)
    acc = {}
    for attention in (True, False):
        set_seed(0)
        model = BottleneckSeq2Seq(4, 6, embed=16, hidden=16, attention=attention)
        train(model, task.sample, reorder_loss, steps=60, batch_size=64, lr=2e-2, seed=0, progress=False)
        acc[attention] = evaluate(model, task.sample, reorder_loss, batch_size=256)
    assert acc[True]["acc"] > 0.9 and acc[True]["align_acc"] > 0.9
    assert acc[False]["acc"] < acc[True]["acc"]


def test_greedy_decode_feeds_back_its_own_argmax():
    torch.manual_seed(0)
    model = Seq2SeqAttention(7, embed=8, hidden=8)
    src = torch.randint(1, 7, (3, 5), generator=torch.Generator().manual_seed(0))
    tokens, align = greedy_decode(model, src)
    assert tokens.shape == (3, 5) and align.shape == (3, 5, 5)
    tgt_in = torch.cat([torch.zeros(3, 1, dtype=torch.long), tokens[:, :-1]], 1)
    logits, align_tf = model(src, tgt_in)  # teacher forcing on its own outputs gives the same argmax
    assert torch.equal(logits.argmax(-1), tokens)
    torch.testing.assert_close(align, align_tf)
    assert greedy_decode(model, src, length=2)[0].shape == (3, 2)
