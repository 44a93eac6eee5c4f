"""The comparison on multi-query associative recall: the model, the runs, the implementation column, the verdicts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import attn  # noqa: F401 - registers the mechanisms
from attn import compare
from attn.compare import cost
from attn.compare.mqar import MQARCell, MQARModel, attention_stats, run_mqar, train_mqar
from attn.evidence import Ledger
from attn.registry import get

QUICK = compare.PRESETS["quick"]


def test_model_shapes_and_token_shift() -> None:
    task = MQARCell(4, 16).task()
    model = MQARModel(task.vocab, get("multihead").build, 16, 4)
    batch = task.sample(3, torch.Generator().manual_seed(0))
    logits, weights = model(batch["x"], need_weights=True)
    assert logits.shape == (3, task.length, task.vocab) and len(weights) == 2
    assert weights[0].shape == (3, 4, task.length, task.length)
    # the token shift: position t's input adds E'[x_{t-1}]; position 0 has no previous token
    h = model.embed(batch["x"]) + torch.nn.functional.pad(model.prev_embed(batch["x"][:, :-1]), (0, 0, 1, 0))
    assert torch.equal(h[:, 0], model.embed(batch["x"][:, 0]))
    with pytest.raises(ValueError, match="batch, n"):
        model(batch["x"][0])


def test_runs_are_seeded_and_workers_change_nothing() -> None:
    cells = [MQARCell(4, 16)]
    kw = {"steps": 20, "batch_size": 8, "lr": 1e-2, "eval_batch": 32}
    one = run_mqar(["multihead", "linear"], cells, [0, 1], **kw)
    two = run_mqar(["multihead", "linear"], cells, [0, 1], workers=2, **kw)
    again = run_mqar(["multihead"], cells, [1], **kw)
    assert list(one["name"]) == ["multihead", "multihead", "linear", "linear"] and list(one["seed"]) == [0, 1, 0, 1]
    assert (one["status"] == "ok").all()
    for col in ("acc", "acc_near", "acc_far", "loss", "train_acc_end"):
        assert one[col].tolist() == two[col].tolist(), col
    assert again["acc"].iloc[0] == one["acc"].iloc[1]  # independent of what else ran
    assert one["acc"].iloc[0] != one["acc"].iloc[1] or one["loss"].iloc[0] != one["loss"].iloc[1]


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="no sequence layer"):
        run_mqar(["gat"], [MQARCell(4, 16)], [0])
    with pytest.raises(ValueError, match="workers"):
        run_mqar(["multihead"], [MQARCell(4, 16)], [0], workers=0)
    with pytest.raises(TypeError, match="MQARCell"):
        run_mqar(["multihead"], None, [0])
    with pytest.raises(ValueError, match="seeds"):
        compare.run(["multihead"], preset=QUICK, seeds=0, device="cpu", progress=False)
    with pytest.raises(ValueError, match="task"):
        compare.run(["multihead"], preset=QUICK, task="nope", device="cpu", progress=False)


def test_softmax_learns_the_point_and_a_window_cannot_reach() -> None:
    """The book's point (8 pairs, width 16, 150 steps): multi-head attention recalls; a window of 8 answers the
    near queries more often than the far ones and recalls little."""
    out = {name: train_mqar(get(name).build, MQARCell(8, 16), 0, steps=150, batch_size=32, lr=1e-2, probe=2)
           for name in ("multihead", "local")}
    assert out["multihead"]["acc"] > 0.9
    assert out["local"]["acc"] < 0.6 and out["local"]["acc_near"] > out["local"]["acc_far"]
    mh = out["multihead"]
    assert mh["answer_weight"] > 0.5 and 0 <= mh["query_entropy"] < mh["uniform_entropy"]
    assert mh["probe"]["weights"].shape[:2] == (2, 2) and len(mh["history"]) > 0


def test_no_entropy_without_attention_weights() -> None:
    """FNet's rows are influence weights of a fixed mixing: no entropy is reported for them."""
    task = MQARCell(4, 16).task()
    model = MQARModel(task.vocab, get("fnet").build, 16, 4)
    stats = attention_stats(model, task.sample(4, torch.Generator().manual_seed(0)), probe=2)
    assert np.isnan(stats["query_entropy"]) and "influence" in stats["weights_note"] and stats["probe"] is None


@pytest.mark.parametrize(("name", "kind"), [("multihead", "fused"), ("flash", "python loop"),
                                            ("fnet", "torch ops"), ("sparsemax", "torch ops"),
                                            ("linear", "python loop")])
def test_implementation_kind_is_measured(name: str, kind: str) -> None:
    layer = get(name).build(32, 4).eval()
    assert cost.implementation_kind(layer, 32) == kind


def test_no_time_exponent_where_overhead_dominates() -> None:
    r = compare.run_one("fnet", preset=QUICK, seed=0, device="cpu", learn=False)
    assert r.metrics["time_fit"] == "overhead" and r.metrics["time_exponent"] is None
    assert r.metrics["task_gflops"] >= 0 and r.metrics["task_peak_kib"] > 0


def _fake(values: dict[tuple[str, int, int], list[float]]) -> compare.Comparison:
    """A Comparison whose MQAR runs hold the given accuracies per (name, pairs, width), seeds 0, 1, 2."""
    p = compare.PRESETS["book"]
    rows = []
    for (name, pairs, width), accs in values.items():
        cell = MQARCell(pairs, width)
        for seed, acc in enumerate(accs):
            rows.append({"name": name, "chapter": get(name).chapter, "pairs": pairs, "width": width,
                         "seq_len": cell.length, "seed": seed, "steps": p.mqar_steps_for(cell), "status": "ok",
                         "acc": acc, "acc_near": acc, "acc_far": acc, "loss": 1 - acc})
    results = []
    for name in dict.fromkeys(n for n, _, _ in values):
        m = get(name)
        r = compare.MechanismResult(m.name, m.chapter, m.paper, m.complexity, m.data)
        r.metrics.update({"implementation": "fused", "latency_ms": 1.0})
        r.sweep = pd.DataFrame({"name": name, "n": [512, 1024], "gflops": [1.0, 4.0 if name == "multihead" else 2.0],
                                "peak_mib": [1.0, 2.0], "median_ms": [1.0, 2.0]})
        results.append(r)
    return compare.Comparison(p, 0, "cpu", results, seeds=[0, 1, 2], task="mqar", mqar=pd.DataFrame(rows))


def test_decision_table_ranks_only_disjoint_ranges() -> None:
    fake = _fake({("multihead", 4, 16): [1.0, 0.99, 1.0], ("linear", 4, 16): [0.5, 0.6, 0.55],
                  ("local", 4, 16): [0.98, 1.0, 0.97]})
    d = fake.decision_table()
    assert d.loc["linear", "vs softmax"] == "lower" and d.loc["local", "vs softmax"] == "no sep."
    assert d.loc["multihead", "FLOPs"] == "~n^2" and d.loc["linear", "FLOPs"] == "~n"
    text = fake.decision_reading()
    assert "**local**" in text.split("Lower")[0] and "**linear**" in text.split("Lower")[1]
    assert "slower than n^2" in text


def test_zoology_claims_follow_the_numbers() -> None:
    hi, lo = [1.0, 0.99, 1.0], [0.4, 0.5, 0.45]
    fake = _fake({("multihead", 4, 16): hi, ("multihead", 8, 16): hi, ("multihead", 16, 16): hi,
                  ("linear", 4, 16): hi, ("linear", 8, 16): lo, ("linear", 8, 32): hi,
                  ("local", 4, 16): hi, ("local", 8, 16): lo, ("fnet", 8, 64): lo, ("sparse-fixed", 8, 16): hi})
    claims = fake.zoology_claims(Ledger(24, display=False))
    assert len(claims) == 7 and all(c.status == "supported" for c in claims), [c.verdict for c in claims]
    flipped = _fake({("multihead", 8, 16): lo, ("linear", 8, 16): hi})
    (claim,) = flipped.zoology_claims(Ledger(24, display=False))
    assert claim.status == "contradicted"  # the build fails on it


def test_cli_task_and_seeds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from attn.__main__ import main

    out = tmp_path / "r"
    assert main(["compare", "--quick", "--mode", "fnet", "--seeds", "3", "--no-progress", "--no-figures",
                 "--out", str(out)]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["seed"]) == [0, 1, 2] and set(runs["implementation"]) == {"torch ops"}
    summary = pd.read_csv(out / "summary.csv", index_col="name")
    assert summary.loc["fnet", "seeds"] == 3
    with pytest.raises(SystemExit):
        main(["compare", "--quick", "--seeds", "0", "--out", str(out)])
    assert main(["compare", "--quick", "--mode", "self", "--task", "recall", "--seeds", "1", "--no-progress",
                 "--no-figures", "--out", str(tmp_path / "s")]) == 0
    assert not (tmp_path / "s" / "runs.csv").exists()


def test_presets_hold_valid_mqar_cells() -> None:
    for p in compare.PRESETS.values():
        for cell in (p.mqar_point, *[c for _, cs in p.mqar_grid for c in cs]):
            assert cell.task().length == cell.length and cell.width % p.mqar_heads == 0
        assert p.mqar_steps_for(p.mqar_point) == p.mqar_steps
        beyond = dataclasses.replace(p.mqar_point, pairs=64 * p.mqar_point.pairs)
        assert p.mqar_steps_for(beyond) > p.mqar_steps  # more pairs, more steps
