"""Chapter 26's experiments: the MQAR task (attn.tasks.MQARTask), the delta rule, the MQAR runner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attn.experiments.linear import (
    DeltaRuleAttention,
    mqar_loss,
    mqar_model,
    run_mqar,
    state_and_cache_bytes,
)
from attn.linear import (
    delta_rule_recurrent,
    delta_rule_step,
    linear_attention,
    linear_attention_recurrent,
    linear_attention_step,
)
from attn.tasks import MQARTask

# ----------------------------------------------------------------------------- MQARTask


@pytest.mark.parametrize("pairs, queries, seq_len", [(4, 4, None), (8, 3, 40), (16, 16, 64), (1, 1, None)])
def test_mqar_data_properties(pairs, queries, seq_len):
    task = MQARTask(vocab=2 * pairs + 5, num_pairs=pairs, num_queries=queries, seq_len=seq_len)
    b = task.sample(64, torch.Generator().manual_seed(1))
    x, y, mask, src = b["x"], b["y"], b["loss_mask"], b["source"]
    n = task.length
    assert x.shape == y.shape == mask.shape == src.shape == (64, n)
    assert x.dtype == torch.long and mask.dtype == torch.bool
    assert int(x.max()) < task.vocab and int(x.min()) >= 0
    assert (mask.sum(1) == queries).all()  # loss positions only at the queries, one per query
    assert not mask[:, : 2 * pairs].any()  # never inside the pairs
    assert ((y >= 0) == mask).all() and (src[mask] >= 0).all() and (src[~mask] == -1).all()
    keys, values = x[:, : 2 * pairs : 2], x[:, 1 : 2 * pairs : 2]
    assert ((keys >= 1) & (keys <= task.n_keys)).all() and (values > task.n_keys).all()
    assert all(len(set(r.tolist())) == pairs for r in keys)  # distinct keys in a sequence
    for i in range(64):
        asked = x[i][mask[i]].tolist()
        assert len(set(asked)) == queries  # each key asked at most once
        for pos in mask[i].nonzero().flatten().tolist():
            q = int(x[i, pos])
            seen = (x[i, :pos] == q).nonzero().flatten().tolist()
            assert len(seen) == 1 and seen[0] < 2 * pairs and seen[0] % 2 == 0  # its key appears once before it
            assert int(y[i, pos]) == int(x[i, seen[0] + 1])  # the target is that key's value
            assert int(src[i, pos]) == seen[0] + 1
        assert (x[i, 2 * pairs :][~mask[i, 2 * pairs :]] == 0).all()  # the filler elsewhere


def test_mqar_is_seeded_and_validates():
    task = MQARTask(vocab=33, num_pairs=16)
    a, b = (task.sample(4, torch.Generator().manual_seed(5)) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x"], task.sample(4, torch.Generator().manual_seed(6))["x"])
    assert task.length == 48 and task.num_queries == 16
    with pytest.raises(ValueError, match="vocab"):
        MQARTask(vocab=20, num_pairs=16)
    with pytest.raises(ValueError, match="num_queries"):
        MQARTask(vocab=40, num_pairs=4, num_queries=5)
    with pytest.raises(ValueError, match="seq_len"):
        MQARTask(vocab=40, num_pairs=4, seq_len=10)
    with pytest.raises(TypeError, match="num_pairs"):
        MQARTask(vocab=40, num_pairs=4.0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the delta rule


def _loop(q, k, v, beta):
    """The delta rule written out: U <- U + beta (v - U k) k^T, y = U q."""
    u = torch.zeros(v.shape[-1], q.shape[-1], dtype=q.dtype)
    out = []
    for t in range(q.shape[0]):
        u = u + beta[t] * torch.outer(v[t] - u @ k[t], k[t])
        out.append(u @ q[t])
    return torch.stack(out)


def test_delta_rule_equals_an_explicit_loop():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 9, 5, generator=g, dtype=torch.float64), None, None
    k = F.normalize(torch.randn(2, 3, 9, 5, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64)
    beta = torch.rand(2, 3, 9, generator=g, dtype=torch.float64)
    out = delta_rule_recurrent(q, k, v, beta)
    assert out.shape == (2, 3, 9, 4)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(out[b, h], _loop(q[b, h], k[b, h], v[b, h], beta[b, h]))
    with pytest.raises(ValueError, match="beta"):
        delta_rule_recurrent(q, k, v, beta[..., :3])


def test_delta_rule_recalls_orthonormal_keys_exactly_and_linear_attention_does_not():
    """d orthonormal keys, written with beta = 1, then read back with the same keys: the delta rule returns every
    value exactly (a d x d state holds d orthogonal associations); plain (un-normalised) linear attention
    U = sum v k^T also does when the keys are orthonormal and unique, but not once a key is rewritten: it
    returns the sum of the old and new values, the delta rule the new one."""
    d = 8
    g = torch.Generator().manual_seed(3)
    keys = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T  # rows orthonormal
    vals = torch.randn(d, 4, generator=g, dtype=torch.float64)
    new = torch.randn(4, generator=g, dtype=torch.float64)
    k = torch.cat([keys, keys[:1]])  # key 0 is written twice, with a new value the second time
    v = torch.cat([vals, new[None]])
    want = torch.cat([new[None], vals[1:]])
    u = torch.zeros(4, d, dtype=torch.float64)
    for t in range(d + 1):
        _, u = delta_rule_step(u, k[t], k[t], v[t], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(keys @ u.T, want)  # exact recall of every current association
    additive = v.T @ k  # linear attention's state without a feature map: sum_t v_t k_t^T
    assert float((keys @ additive.T - want).abs().max()) > 0.5  # key 0 returns old + new
    # and the sequence form: read at the last step with every key as a query
    out = delta_rule_recurrent(torch.cat([k[:-1], keys[:1]])[None], k[None], v[None], 1.0)
    torch.testing.assert_close(out[0, -1], new)


def test_linear_attention_decoding_steps_equal_the_parallel_causal_form():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 21, 6, generator=g, dtype=torch.float64) for _ in range(3))
    par = linear_attention(q, k, v, causal=True, chunk=8)
    state, norm = q.new_zeros(2, 3, 6, 6), q.new_zeros(2, 3, 6)
    outs = []
    for t in range(21):
        y, state, norm = linear_attention_step(state, norm, q[..., t, :], k[..., t, :], v[..., t, :])
        outs.append(y)
        assert state.shape == (2, 3, 6, 6)  # the state never grows
    torch.testing.assert_close(torch.stack(outs, -2), par)
    torch.testing.assert_close(linear_attention_recurrent(q, k, v), par)


def test_state_and_cache_bytes():
    b = state_and_cache_bytes(64, 4, 2, tokens=1000, bytes_per_value=2)
    assert b["kv_cache"] == 2 * 2 * 1000 * 64 * 2
    assert b["linear_state"] == 2 * 4 * 16 * 17 * 2
    assert state_and_cache_bytes(64, 4, 2, tokens=10**6)["linear_state"] == b["linear_state"]


# ----------------------------------------------------------------------------- the MQAR models and runner


def test_delta_mixer_is_causal_and_models_run():
    task = MQARTask(vocab=17, num_pairs=4)
    x = task.sample(2, torch.Generator().manual_seed(0))["x"]
    for arm in ("softmax", "linear", "delta"):
        torch.manual_seed(0)
        model = mqar_model(arm, task, 16, 2, 8)
        logits = model(x).logits
        assert logits.shape == (2, task.length, task.vocab)
        x2 = x.clone()
        x2[:, 7:] = (x2[:, 7:] + 1) % task.vocab
        torch.testing.assert_close(model(x2).logits[:, :7], logits[:, :7])  # the future cannot reach the past
    with pytest.raises(ValueError, match="causal"):
        DeltaRuleAttention(16, 2)(torch.randn(1, 3, 16), is_causal=False)
    with pytest.raises(ValueError, match="arm"):
        mqar_model("nope", task, 16)


def test_mqar_loss_counts_only_query_positions():
    task = MQARTask(vocab=17, num_pairs=4)
    batch = task.sample(8, torch.Generator().manual_seed(0))
    model = mqar_model("softmax", task)
    loss, m = mqar_loss(model, batch)
    logits = model(batch["x"]).logits
    ref = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    assert 0.0 <= m["acc"] <= 1.0


def test_run_mqar_one_row_per_arm_seed_and_softmax_learns_a_small_case():
    rows = run_mqar(pairs=[4], head_dims=[4], seeds=[0, 1, 2], arms=("softmax", "linear"), steps=5, batch_size=8,
                    eval_size=16)
    assert len(rows) == 6 and {(r["arm"], r["seed"]) for r in rows} == {(a, s) for a in ("softmax", "linear")
                                                                       for s in range(3)}
    assert all(0.0 <= r["acc"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_softmax_solves_mqar_with_few_pairs():
    rows = run_mqar(pairs=[4], head_dims=[4], seeds=[0], arms=("softmax",), steps=200)
    assert rows[0]["acc"] > 0.9
