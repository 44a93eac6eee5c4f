"""Chapter 5's experiments: Luong's score grid (best learning rate per score) and the marker task of global tokens."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from attn.experiments.global_attention import (
    MARKER_ARMS,
    LuongConfig,
    LuongRun,
    MarkerClassifier,
    MarkerConfig,
    MarkerTask,
    best_lrs,
    grid_table,
    run_luong_grid,
    run_marker,
    window_ceiling,
)

# ----------------------------------------------------------------------------- part 1: Luong's scores


def _run(score: str, lr: float, seed: int, align: float) -> LuongRun:
    return LuongRun(score, lr, seed, False, align, align, None, pd.DataFrame(), None, [])  # type: ignore[arg-type]


def test_best_lrs_picks_each_scores_highest_mean():
    runs = [_run("dot", 1e-3, s, v) for s, v in enumerate([0.2, 0.3, 0.4])]
    runs += [_run("dot", 1e-2, s, v) for s, v in enumerate([0.9, 0.1, 0.9])]  # mean 0.633 > 0.3
    runs += [_run("concat", 1e-3, s, v) for s, v in enumerate([0.5, 0.5, 0.5])]
    runs += [_run("concat", 1e-2, s, v) for s, v in enumerate([0.6, 0.2, 0.4])]  # mean 0.4 < 0.5
    runs += [_run("general", lr, s, 0.7) for lr in (1e-2, 1e-3) for s in range(3)]  # tie: the smaller rate
    assert best_lrs(runs) == {"dot": 1e-2, "concat": 1e-3, "general": 1e-3}
    table = grid_table(runs)
    assert table.loc[("dot", 1e-2), "min"] == pytest.approx(0.1)
    assert table.loc[("dot", 1e-2), "max"] == pytest.approx(0.9)


def test_luong_grid_one_run_per_score_lr_seed_and_probe_on_first_seed_only():
    cfg = LuongConfig(seq_len=4, hidden=4, steps=2, batch_size=4, lrs=(1e-3, 1e-2), log_every=1)
    probe = cfg.task().sample(2, torch.Generator().manual_seed(0))
    runs = run_luong_grid(cfg, [0, 1], ("concat",), probe=probe)
    assert [(r.score, r.lr, r.seed) for r in runs] == [("concat", lr, s) for lr in (1e-3, 1e-2) for s in (0, 1)]
    for r in runs:
        assert 0 <= r.align_acc <= 1 and 0 <= r.acc <= 1
        assert len(r.snapshots) == (2 if r.seed == 0 else 0)
        if r.snapshots:
            assert r.snapshots[0][1].shape == (2, 4, 4)  # (probe batch, T, S)
    assert set(best_lrs(runs)) == {"concat"}


def test_luong_same_seed_same_initialisation_and_batches():
    cfg = LuongConfig(seq_len=4, hidden=4, steps=3, batch_size=4, lrs=(1e-2,), log_every=1)
    a, b = run_luong_grid(cfg, [5], ("general",)), run_luong_grid(cfg, [5], ("general",))
    pd.testing.assert_frame_equal(a[0].history, b[0].history)


# ----------------------------------------------------------------------------- part 2: global tokens


def test_marker_task_has_one_marker_exactly_in_the_positives():
    batch = MarkerTask(64).sample(400, torch.Generator().manual_seed(0))
    tokens, y, where = batch["tokens"], batch["y"], batch["where"]
    assert (tokens[:, 0] == 0).all()  # [CLS]
    markers = (tokens == 1).sum(1)
    assert torch.equal(markers, y)  # one marker exactly when y = 1
    pos = y == 1
    assert (tokens[pos, where[pos]] == 1).all() and (where[~pos] == -1).all()
    assert where[pos].min() >= 1
    assert 0.4 < y.float().mean() < 0.6
    far = where[pos] > 16  # most markers lie beyond a short window's reach
    assert far.float().mean() > 0.6


def test_window_ceiling():
    assert window_ceiling(256, 4, 2) == pytest.approx(0.5 + 0.5 * 8 / 255)
    assert window_ceiling(9, 4, 2) == 1.0
    assert window_ceiling(5, 4, 2) == 1.0


@pytest.mark.parametrize("gidx, sees_far", [((), False), ((0,), True)])
def test_window_only_cannot_see_beyond_layers_times_window(gidx, sees_far):
    torch.manual_seed(0)
    n, w, layers = 40, 3, 2
    model = MarkerClassifier(3, 8, 2, layers, w, gidx).eval()
    tokens = MarkerTask(n).sample(1, torch.Generator().manual_seed(0))["tokens"]
    tokens[:] = 2
    tokens[0, 0] = 0
    far, near = tokens.clone(), tokens.clone()
    far[0, layers * w + 1] = 1  # just out of the window's reach
    near[0, layers * w] = 1  # just within it
    with torch.no_grad():
        base, out_far, out_near = model(tokens), model(far), model(near)
    assert not torch.allclose(out_near, base)
    assert (not torch.allclose(out_far, base)) == sees_far


def test_run_marker_one_value_per_seed_per_arm():
    cfg = MarkerConfig(length=24, window=2, embed_dim=8, steps=2, batch_size=4, eval_batch=16, log_every=1)
    acc, reached = run_marker(cfg, [0, 1, 2])
    assert list(acc) == list(MARKER_ARMS) and list(reached) == list(MARKER_ARMS)
    assert all(len(v) == 3 and all(0 <= x <= 1 for x in v) for v in acc.values())
    assert all(len(v) == 3 for v in reached.values())
