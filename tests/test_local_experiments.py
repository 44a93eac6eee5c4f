"""Chapter 8's experiments: the lag-k copy (reach of stacked causal windows) and local-p vs global alignment."""

from __future__ import annotations

import pytest
import torch

from attn.experiments.local import (
    AlignConfig,
    AlignModel,
    LagConfig,
    LagCopy,
    MonotoneAlignment,
    align_loss,
    lag_loss,
    lag_model,
    reach,
    run_alignment,
    run_lag_copy,
)
from attn.local import LocalAttention


def test_lag_copy_target_is_the_token_k_back():
    task = LagCopy(n=16, lag=5, vocab=8)
    b = task.sample(4, torch.Generator().manual_seed(0))
    assert (b["y"][:, :5] == -100).all()
    assert torch.equal(b["y"][:, 5:], b["tokens"][:, :-5])
    with pytest.raises(ValueError):
        LagCopy(n=8, lag=8)


@pytest.mark.parametrize("causal", [True, False])
def test_reach_is_L_times_w(causal):
    n, w = 40, 4
    for L in (1, 2, 3):
        r = reach(n, w, L, causal=causal)
        t = torch.arange(n)
        d = t[:, None] - t[None, :]  # query - input
        want = ((d >= 0) & (d <= L * w)) if causal else (d.abs() <= L * w)
        assert torch.equal(r, want)


def test_local_model_uses_the_blockwise_window_and_cannot_see_beyond_reach():
    """A random 2-layer local model: the output at t does not change when x_{t - 2w - 1} changes."""
    cfg = LagConfig(n=32, window=4)
    torch.manual_seed(0)
    model = lag_model("local", 2, cfg).eval()
    assert all(isinstance(b.mixer, LocalAttention) and b.mixer.window == 4 for b in model.blocks)
    x = torch.randint(0, cfg.vocab, (1, 32))
    x2 = x.clone()
    x2[0, 10] = (x2[0, 10] + 1) % cfg.vocab
    with torch.no_grad():
        a, b = model(x, is_causal=True).logits, model(x2, is_causal=True).logits
    changed = (a - b).abs().amax(-1)[0] > 1e-6
    assert not changed[:10].any() and changed[10:19].any() and not changed[19:].any()


def test_run_lag_copy_one_value_per_seed_and_the_out_of_reach_arm_guesses():
    cfg = LagConfig(n=16, window=4, steps=20, batch_size=16, eval_batch=64)
    runs = run_lag_copy(lags=(10,), arms=(("local", 1), ("full", 1)), seeds=(0, 1, 2), config=cfg)
    assert set(runs.accuracy) == {"local, L=1", "full, L=1"}
    for arm in runs.accuracy:
        assert len(runs.accuracy[arm][10]) == 3 and len(runs.steps[arm][10]) == 3
    # lag 10 > w = 4: one window layer is at chance whatever it learned
    assert max(runs.accuracy["local, L=1"][10]) < runs.chance + 0.08


def test_lag_loss_counts_only_positions_with_a_target():
    cfg = LagConfig(n=16, window=4)
    model = lag_model("full", 1, cfg)
    batch = LagCopy(16, 3, cfg.vocab).sample(8, torch.Generator().manual_seed(1))
    loss, m = lag_loss(model, batch)
    assert torch.isfinite(loss) and 0 <= m["acc"] <= 1


def test_monotone_alignment_is_a_diagonal_inside_the_source():
    task = MonotoneAlignment(vocab=16, target_len=20, min_src=40, max_src=60)
    b = task.sample(64, torch.Generator().manual_seed(0))
    S = b["lengths"]
    assert ((S >= 40) & (S <= 60)).all()
    assert (b["align"] < S[:, None]).all() and (b["align"].diff(dim=1) > 0).all()  # strictly monotone
    assert torch.equal(b["y"], b["src"].gather(1, b["align"]))
    assert torch.equal(b["key_mask"].sum(1), S)


def test_align_models_and_run_shapes():
    cfg = AlignConfig(steps=5, batch_size=8, eval_batch=32)
    batch = MonotoneAlignment(cfg.vocab, cfg.target_len, cfg.min_src, cfg.max_src).sample(
        4, torch.Generator().manual_seed(0))
    for kind in ("local-p", "global"):
        model = AlignModel(kind, cfg)
        assert model(batch).shape == (4, cfg.target_len, cfg.vocab)
        loss, _ = align_loss(model, batch)
        assert torch.isfinite(loss)
    p = AlignModel("local-p", cfg).positions(batch)
    assert p.shape == (4, cfg.target_len) and (p > 0).all() and (p < batch["lengths"][:, None]).all()
    with pytest.raises(ValueError):
        AlignModel("global", cfg).positions(batch)
    runs = run_alignment(seeds=(0, 1, 2), config=cfg, probe_lengths=(40, 60))
    assert len(runs.accuracy["local-p"]) == len(runs.accuracy["global"]) == 3
    assert len(runs.in_window) == len(runs.in_window_init) == len(runs.error) == 3
    assert len(runs.curves) == 3 and len(runs.curves[0]) == 2 and len(runs.curves[0][0]) == cfg.target_len
