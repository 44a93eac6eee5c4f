"""Chapter 2's experiment: the partner task and the models trained on it."""

from __future__ import annotations

import pytest
import torch

from attn.experiments.self_attention import (
    ARMS,
    DeepSetModel,
    PartnerTask,
    SetAttentionModel,
    partner_loss,
    run_partner,
)


def test_partner_task_every_token_has_exactly_one_partner():
    task = PartnerTask(seed=3)
    b = task.sample(64, torch.Generator().manual_seed(0))
    cls, partner = b["cls"], b["partner"]
    assert cls.shape == (64, task.n) and b["x"].shape == (64, task.n, task.dim)
    # the partner's class is mine ^ 1, and each class occurs once per set
    assert torch.equal(cls.gather(1, partner), cls ^ 1)
    assert all(len(set(row.tolist())) == task.n for row in cls)
    assert torch.equal(b["y"], b["val"].gather(1, partner))
    assert torch.allclose(b["x"], task.class_emb[cls] + task.value_emb[b["val"]])


def test_partner_task_embeddings_follow_the_seed():
    assert torch.equal(PartnerTask(seed=1).class_emb, PartnerTask(seed=1).class_emb)
    assert not torch.equal(PartnerTask(seed=1).class_emb, PartnerTask(seed=2).class_emb)


def test_partner_task_order_carries_nothing():
    """The set is shuffled: both members of a pair occupy every position equally often."""
    b = PartnerTask().sample(4000, torch.Generator().manual_seed(0))
    first_member = (b["cls"] % 2 == 0).float().mean(0)  # per position
    assert torch.allclose(first_member, torch.full_like(first_member, 0.5), atol=0.05)


def test_identity_projections_attend_to_themselves_not_the_partner():
    """The design: with W_Q = W_K = I a token is most similar to itself, so it cannot find its partner."""
    task = PartnerTask(seed=0)
    model = SetAttentionModel(task.dim, task.values, "identity").eval()
    b = task.sample(256, torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, w = model(b["x"], need_weights=True)
    assert w is not None
    assert w.argmax(-1).eq(torch.arange(task.n)).float().mean() > 0.95
    assert not any(p.requires_grad for p in model.attn.parameters())


def test_deep_sets_sees_the_set_but_is_permutation_invariant_in_its_pool():
    task = PartnerTask(seed=0)
    model = DeepSetModel(task.dim, task.values).eval()
    b = task.sample(4, torch.Generator().manual_seed(1))
    perm = torch.randperm(task.n)
    with torch.no_grad():
        y, w = model(b["x"])
        y_perm, _ = model(b["x"][:, perm])
    assert w is None
    assert torch.allclose(y[:, perm], y_perm, atol=1e-5)


def test_partner_loss_reports_partner_weight_for_attention_only():
    task = PartnerTask(seed=0)
    b = task.sample(8, torch.Generator().manual_seed(0))
    _, m = partner_loss(SetAttentionModel(task.dim, task.values), b)
    assert {"acc", "partner_weight", "self_weight"} <= set(m)
    _, m = partner_loss(DeepSetModel(task.dim, task.values), b)
    assert set(m) == {"acc"}


def test_run_partner_one_value_per_seed_per_arm():
    run = run_partner([0, 1, 2], steps=2, pairs=2, classes=4, values=4, eval_batch=16)
    assert set(run.acc) == set(ARMS) == set(run.histories) == set(run.models)
    assert all(len(v) == 3 for v in run.acc.values())
    assert set(run.partner_weight) == {"learned", "identity", "random"}
    assert [t.seed for t in run.tasks] == [0, 1, 2]


def test_learned_projections_solve_the_task_identity_cannot():
    run = run_partner([0], steps=60, arms=["learned", "identity"], pairs=3, classes=8, values=8,
                      eval_batch=256)
    assert run.acc["learned"][0] > 0.9 > run.acc["identity"][0]
    assert min(run.partner_weight["learned"]) > 0.5


def test_run_partner_rejects_unknown_arms():
    with pytest.raises(ValueError, match="unknown arms"):
        run_partner([0], steps=1, arms=["learned", "mlp"])
