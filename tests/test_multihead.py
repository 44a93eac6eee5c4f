"""Chapter 3: the per-head sum view of multi-head attention, and the two-key ordered recall experiment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attn.experiments.multihead import (
    TwoKeyRecall,
    TwoKeyRecallModel,
    pair_weights,
    run_heads,
    specialisation,
    two_key_loss,
)
from attn.masks import causal_mask, padding_mask
from attn.multihead import MultiHeadAttention, head_contributions

# ----------------------------------------------------------------------------- per-head sum view


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_head_contributions_sum_to_the_layer_output_with_masks(heads: int) -> None:
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, heads).eval()
    x = torch.randn(3, 7, 32)
    masks = {"key_mask": padding_mask([7, 5, 2], 7), "attn_mask": causal_mask(7)}
    parts = head_contributions(layer, x, **masks)
    assert parts.shape == (3, heads, 7, 32)
    with torch.no_grad():
        out = layer(x, **masks).output
    torch.testing.assert_close(parts.sum(1) + layer.out_proj.bias, out, atol=1e-5, rtol=1e-5)


def test_head_contributions_match_torch_weights_and_each_head_is_a_v_w_o() -> None:
    """Against nn.MultiheadAttention (copied weights, kdim/vdim): the sum, and head i = A_i V W_i^V W_i^O."""
    torch.manual_seed(1)
    E, h, d = 16, 4, 4
    ref = nn.MultiheadAttention(E, h, batch_first=True, kdim=12, vdim=10).eval()
    layer = MultiHeadAttention(E, h, kdim=12, vdim=10).load_torch_weights(ref).eval()
    q, k, v = torch.randn(2, 5, E), torch.randn(2, 6, 12), torch.randn(2, 6, 10)
    parts = head_contributions(layer, q, k, v)
    with torch.no_grad():
        ref_out, ref_w = ref(q, k, v, need_weights=True, average_attn_weights=False)  # (B, L, E), (B, h, L, S)
    torch.testing.assert_close(parts.sum(1) + ref.out_proj.bias, ref_out, atol=1e-5, rtol=1e-5)
    w_v = ref.v_proj_weight.T  # (vdim, E): y = v W^V
    b_v = ref.in_proj_bias[2 * E:]
    w_o = ref.out_proj.weight.T  # (E, E): y = z W^O
    for i in range(h):
        cols = slice(i * d, (i + 1) * d)
        head_i = ref_w[:, i] @ (v @ w_v[:, cols] + b_v[cols])  # A_i (V W_i^V + b_i^V)
        torch.testing.assert_close(parts[:, i], head_i @ w_o[cols], atol=1e-5, rtol=1e-5)  # rows of W^O


def test_head_contributions_refuses_a_layer_without_output_projection() -> None:
    layer = MultiHeadAttention(8, 2)
    layer.out_proj = nn.Identity()
    with pytest.raises(TypeError, match="output projection"):
        head_contributions(layer, torch.randn(1, 3, 8))


# ----------------------------------------------------------------------------- the task


def test_two_key_recall_asks_two_distinct_keys_of_the_sequence_in_order() -> None:
    task = TwoKeyRecall(n_pairs=6, n_keys=10, n_values=7)
    b = task.sample(256, torch.Generator().manual_seed(0))
    x, y, where = b["x"], b["y"], b["where"]
    assert x.shape == (256, task.length) and y.shape == (256, 2) and where.shape == (256, 2)
    keys, values = x[:, :-2:2], x[:, 1:-2:2] - task.n_keys
    assert (keys < task.n_keys).all() and ((values >= 0) & (values < task.n_values)).all()
    assert all(len(set(row.tolist())) == task.n_pairs for row in keys)  # distinct keys per sequence
    assert (where[:, 0] != where[:, 1]).all()
    rows = torch.arange(256)[:, None]
    assert torch.equal(x[:, -2:], keys[rows, where])  # q1 q2 are the keys at `where`, in order
    assert torch.equal(y, values[rows, where])  # the answer is their values, in the same order
    assert (where[:, 0] > where[:, 1]).any() and (where[:, 0] < where[:, 1]).any()  # q1 not always first
    again = task.sample(256, torch.Generator().manual_seed(0))
    assert torch.equal(again["x"], x)


def test_two_key_recall_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        TwoKeyRecall(n_pairs=8, n_keys=4)
    with pytest.raises(ValueError):
        TwoKeyRecall(n_pairs=1)


def test_the_query_token_knows_which_key_is_first() -> None:
    """Swapping q1 and q2 changes the query token (one embedding table per slot): the order is in the input."""
    task = TwoKeyRecall()
    model = TwoKeyRecallModel(task, 16, 2)
    b = task.sample(4, torch.Generator().manual_seed(0))
    swapped = b["x"].clone()
    swapped[:, -2:] = swapped[:, -2:].flip(-1)
    assert not torch.allclose(model.tokens(b["x"])[:, -1], model.tokens(swapped)[:, -1])
    with pytest.raises(ValueError):
        model.tokens(b["x"][:, :-1])


def test_one_head_with_equal_weight_on_both_pairs_cannot_tell_the_order() -> None:
    """The design's premise: one head's mixture of the two matching pairs is the same whichever value is q1's."""
    torch.manual_seed(0)
    task = TwoKeyRecall(n_pairs=4)
    model = TwoKeyRecallModel(task, 16, 1).eval()
    b = task.sample(8, torch.Generator().manual_seed(1))
    x = b["x"].clone()
    h = model.tokens(x)
    where = b["where"]
    swapped = x.clone()
    rows = torch.arange(8)
    v1, v2 = x[rows, 2 * where[:, 0] + 1].clone(), x[rows, 2 * where[:, 1] + 1].clone()
    swapped[rows, 2 * where[:, 0] + 1], swapped[rows, 2 * where[:, 1] + 1] = v2, v1  # swap the two values
    w = torch.zeros(8, task.n_pairs + 1)
    w[rows, where[:, 0]] = w[rows, where[:, 1]] = 0.5
    lin = model.attention.v_proj
    mix = torch.einsum("bj,bje->be", w, lin(h))
    mix_swapped = torch.einsum("bj,bje->be", w, lin(model.tokens(swapped)))
    torch.testing.assert_close(mix, mix_swapped)
    assert not torch.equal(b["y"], b["y"].flip(-1))  # while the answers differ (values not all equal)


# ----------------------------------------------------------------------------- measures and runner


def test_specialisation_is_one_for_one_head_per_key_and_at_most_half_for_one_head() -> None:
    assert specialisation(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert specialisation(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.2, 0.2]])) == pytest.approx(1.0)
    assert specialisation(torch.tensor([[0.5, 0.5], [0.5, 0.5]])) == pytest.approx(0.5)
    assert specialisation(torch.tensor([[0.9, 0.1]])) == pytest.approx(0.5)
    assert specialisation(torch.tensor([[0.98, 0.0]])) <= 0.5


def test_pair_weights_read_the_query_row_at_the_asked_pairs() -> None:
    task = TwoKeyRecall(n_pairs=4)
    model = TwoKeyRecallModel(task, 16, 2)
    b = task.sample(16, torch.Generator().manual_seed(0))
    w = pair_weights(model, b)
    assert w.shape == (2, 2) and ((w >= 0) & (w <= 1)).all()
    _, full = model(b["x"], need_weights=True)
    assert full is not None
    expected = full[torch.arange(16), 0, -1, b["where"][:, 0]].mean()
    assert w[0, 0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_two_key_loss_counts_a_pair_right_only_when_both_slots_are() -> None:
    task = TwoKeyRecall(n_pairs=4)
    model = TwoKeyRecallModel(task, 16, 2)
    b = task.sample(64, torch.Generator().manual_seed(0))
    loss, m = two_key_loss(model, b)
    assert loss.ndim == 0 and set(m) == {"acc", "acc1", "acc2"}
    assert m["acc"] <= min(m["acc1"], m["acc2"])


def test_run_heads_returns_one_value_per_seed_per_arm_and_same_batches() -> None:
    task = TwoKeyRecall(n_pairs=4, n_keys=8, n_values=8)
    runs = run_heads(task, heads=(1, 2), seeds=(0, 1, 2), steps=20, embed_dim=16, batch_size=8,
                     eval_every=10, eval_size=32)
    assert set(runs) == {1, 2}
    for h, r in runs.items():
        assert len(r.accuracy) == len(r.steps_to_target) == len(r.weights) == len(r.specialisation) == 3
        assert all(s is None or 10 <= s <= 20 for s in r.steps_to_target)
        assert all(w.shape == (h, 2) for w in r.weights)
        assert all(hist.step[-1] == 20 for hist in r.histories)
    assert all(s <= 0.5 + 1e-6 for s in runs[1].specialisation)


@pytest.mark.slow
def test_two_heads_learn_two_key_recall_and_one_head_does_not() -> None:
    """The chapter's claim on a small budget: two heads pass 0.9, one head stays near one-slot chance."""
    task = TwoKeyRecall()
    runs = run_heads(task, heads=(1, 2), seeds=(0,), steps=200, batch_size=32)
    assert runs[2].accuracy[0] > 0.9 and runs[2].specialisation[0] > 0.9
    assert runs[1].accuracy[0] < 0.2
