"""The comparison: ``python -m attn compare`` / ``list`` and the :mod:`attn.compare` API."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import attn  # noqa: F401 - registers the mechanisms
from attn import compare, registry
from attn.__main__ import main
from attn.core import AttentionOutput
from attn.experiments import own_tasks
from attn.masks import band_mask
from attn.multihead import MultiHeadAttention

ROOT = Path(__file__).resolve().parents[1]

# a tiny preset for the API tests: a few hundred milliseconds per mechanism
TINY = dataclasses.replace(
    compare.PRESETS["quick"], name="tiny", n_pairs=7, n_keys=8, n_values=8, steps=30, batch_size=16,
    eval_batch=64, sweep_lengths=(32, 64), bench_n=64, min_run_time=0.005,
)


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attn", *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def temp_mechanisms():
    """Register test-only mechanisms for one test, then restore the registry exactly."""
    saved = dict(registry.MECHANISMS)
    yield registry.MECHANISMS
    registry.MECHANISMS.clear()
    registry.MECHANISMS.update(saved)


def _strict_json(text: str):
    def no_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constant)


# ----------------------------------------------------------------------------- the command line


def test_cli_compare_quick_round_trip(tmp_path):
    out = tmp_path / "results"
    proc = _cli("compare", "--quick", "--mode", "self", "--mode", "multihead", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # the readable table, with the two rows, in chapter order
    table = proc.stdout[proc.stdout.index("status"):]
    assert table.index("self") < table.index("multihead")

    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(compare.TABLE_COLUMNS)
    assert [r["name"] for r in rows] == ["self", "multihead"]
    for r in rows:
        assert r["status"] == "ok" and r["note"] == ""
        assert int(r["params"]) > 0 and int(r["model_params"]) > 0
        assert float(r["gflops"]) > 0 and float(r["latency_ms"]) > 0 and float(r["peak_mib"]) > 0
        assert 0 <= float(r["accuracy_min"]) <= float(r["accuracy"]) <= float(r["accuracy_max"]) <= 1
        assert 0 <= float(r["accuracy_far"]) <= 1 and int(r["seeds"]) == compare.PRESETS["quick"].seeds
        assert r["implementation"] == "fused"  # both call PyTorch's fused kernel, a fixed number of torch calls
        assert math.isfinite(float(r["flops_exponent"]))
        assert r["time_fit"] == "overhead" or math.isfinite(float(r["time_exponent"]))
        assert 0 <= float(r["query_entropy"]) <= float(r["uniform_entropy"]) + 1e-6
    # self: 3 projections, width 32, batch 1, n = 128: 6nE^2 + 4n^2E FLOPs
    n, e = compare.PRESETS["quick"].bench_n, compare.PRESETS["quick"].bench_embed
    assert float(rows[0]["gflops"]) * 1e9 == pytest.approx(6 * n * e**2 + 4 * n**2 * e)

    with open(out / "sweep.csv") as f:
        sweep = list(csv.DictReader(f))
    assert list(sweep[0]) == ["name", "n", "median_ms", "peak_mib", "gflops"]
    assert {int(r["n"]) for r in sweep if r["name"] == "self"} == set(compare.PRESETS["quick"].sweep_lengths)

    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    point = compare.PRESETS["quick"].mqar_point
    assert [(r["name"], int(r["seed"])) for r in runs] == [(n, s) for n in ("self", "multihead") for s in (0, 1)]
    assert {(int(r["pairs"]), int(r["width"])) for r in runs} == {(point.pairs, point.width)}
    assert all(r["implementation"] == "fused" and r["family"].startswith("Foundations") for r in runs)

    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert list(curves[0]) == ["name", "step", "loss", "acc"]
    assert {r["name"] for r in curves} == {"self", "multihead"}

    data = _strict_json((out / "results.json").read_text())
    assert data["meta"]["seed"] == 0 and data["meta"]["preset"]["name"] == "quick"
    assert [r["name"] for r in data["results"]] == ["self", "multihead"]
    for r in data["results"]:
        assert set(compare.TABLE_COLUMNS) <= set(r)
        assert len(r["history"]["loss"]) == len(r["history"]["step"]) > 0
        assert sum(r["query_entropy_histogram"]["counts"]) > 0

    import matplotlib.image

    for name in ("loss_curves", "sweep_time", "sweep_memory", "accuracy_vs_cost", "entropy", "mqar", "mqar_grid",
                 "frontier"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # not a blank canvas


def test_cli_list():
    proc = _cli("list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["name", "chapter", "paper", "complexity", "data"]
    for m in registry.mechanisms():
        line = next(row for row in lines if row.split() and row.split()[0] == m.name)
        assert m.paper in line and m.complexity in line and f"{m.chapter:2d} {registry.chapter(m.chapter).title}" in line
    assert f"{len(registry.MECHANISMS)} mechanisms registered" in proc.stdout


def test_cli_unknown_mode_lists_valid_names(tmp_path):
    proc = _cli("compare", "--quick", "--mode", "self", "--mode", "no-such-attention", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown --mode no-such-attention" in proc.stderr
    for m in registry.mechanisms():
        assert m.name in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["compare", "--seed", "abc"], "--seed: must be an integer, got 'abc'"),
        (["compare", "--seed", "-1"], "--seed: must be in [0, 2**32), got -1"),
        (["compare", "--device", "tpu"], "--device: invalid device 'tpu'"),
        (["compare", "--device", "meta"], "--device: device 'meta' is not supported"),
        (["compare", "--device", "not a device"], "--device: invalid device 'not a device'"),
        (["compare", "--device", "cuda:7"], "--device: device 'cuda:7'"),
        (["compare", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
        (["compare", "--quick", "--preset", "book"], "not allowed with argument --quick"),
        (["compare", "--mode"], "argument --mode: expected one argument"),
    ],
)
def test_cli_bad_arguments_give_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" in err and "Traceback" not in err


def test_cli_unwritable_out_dir(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for out, message in ((blocker, "exists and is not a directory"), (blocker / "sub", "cannot write there")):
        with pytest.raises(SystemExit) as exc:
            main(["compare", "--quick", "--mode", "self", "--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and message in err


# ----------------------------------------------------------------------------- the API


def test_same_seed_same_results_and_independent_of_the_others():
    kw = {"device": "cpu", "progress": False, "task": "recall", "seeds": 1}
    a = compare.run(["self", "multihead"], preset=TINY, seed=3, **kw)
    b = compare.run(["multihead", "self", "self"], preset=TINY, seed=3, **kw)
    alone = compare.run(["multihead"], preset=TINY, seed=3, cost=False, **kw)
    other_seed = compare.run(["multihead"], preset=TINY, seed=4, cost=False, **kw)
    assert [r.name for r in a.results] == [r.name for r in b.results] == ["self", "multihead"]
    for ra, rb in zip(a.results, b.results, strict=True):
        assert ra.status == rb.status == "ok"
        assert ra.history["loss"].tolist() == rb.history["loss"].tolist()
        assert ra.history["acc"].tolist() == rb.history["acc"].tolist()
        for key in ("accuracy", "accuracy_near", "accuracy_far", "eval_loss", "steps_to_target", "query_entropy",
                    "answer_weight", "params", "model_params", "gflops", "flops_exponent"):
            assert ra.metrics[key] == rb.metrics[key], key
        assert (ra.query_entropy == rb.query_entropy).all()
        assert torch.equal(ra.probe_weights, rb.probe_weights)
    # a mechanism's result does not depend on which others ran with it
    assert alone.results[0].history["loss"].tolist() == a.results[1].history["loss"].tolist()
    assert alone.results[0].metrics["accuracy"] == a.results[1].metrics["accuracy"]
    # and the seed matters
    assert other_seed.results[0].history["loss"].tolist() != a.results[1].history["loss"].tolist()


class _Windowed(nn.Module):
    """Test-only: multi-head attention restricted to a band of half-width ``window``."""

    def __init__(self, embed_dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.mha = MultiHeadAttention(embed_dim, num_heads)
        self.window = window

    def forward(self, x: Tensor, need_weights: bool = False) -> AttentionOutput:
        return self.mha(x, attn_mask=band_mask(x.shape[1], self.window, device=x.device), need_weights=need_weights)


class _Broken(nn.Module):
    """Test-only: a layer whose forward always fails."""

    def forward(self, x: Tensor, need_weights: bool = False) -> AttentionOutput:
        raise RuntimeError("deliberately broken")


def _register(name: str, cls: type[nn.Module], **kw) -> None:
    registry.register(name, paper="Test 2026", complexity="O(n)", chapter=kw.pop("chapter", 6), **kw)(cls)


def test_the_task_separates_reach_from_lookup(temp_mechanisms):
    """Full attention answers wherever the pair is; a window only when the pair lies within it."""
    p = compare.PRESETS["book"]  # 15 pairs + the query: a window of 7 covers exactly the near half
    _register("test-window", _Windowed, build=lambda e, h: _Windowed(e, h, window=7))
    res = compare.run(["multihead", "test-window"], preset=p, seed=0, device="cpu", progress=False, cost=False,
                      task="recall", seeds=1)
    full, window = (r.metrics for r in res.results)
    assert full["accuracy_near"] > 0.9 and full["accuracy_far"] > 0.9
    assert window["accuracy_near"] > 0.9
    assert window["accuracy_far"] < 0.3
    assert "**test-window** (" in res.reading() and "Reach matters" in res.reading()


def test_own_task_and_broken_mechanisms_are_reported(temp_mechanisms, tmp_path, capsys):
    _register("test-graph", _Broken, chapter=12, data="graph")  # build None: its own task
    _register("test-broken", _Broken, build=lambda e, h: _Broken())
    res = compare.run(["self", "test-graph", "test-broken"], preset=TINY, seed=0, device="cpu", progress=False,
                      task="recall", seeds=1)
    by = {r.name: r for r in res.results}
    assert [r.name for r in res.results] == ["self", "test-broken", "test-graph"]  # chapter order
    assert by["self"].status == "ok"
    assert by["test-graph"].status == "own task" and not by["test-graph"].metrics.get("accuracy")
    assert by["test-broken"].status == "error" and "deliberately broken" in by["test-broken"].notes[0]
    table = res.display_table()
    assert "test-graph" not in table.index  # the first table is the shared task's
    assert res.own_table().loc["test-graph", "status"] == "no task hook"
    assert "test-graph (chapter 12, graph data)" in res.reading()
    assert "test-broken: RuntimeError: deliberately broken" in res.reading()
    written = res.save(tmp_path, figures=False)
    assert {p.name for p in written} == {"summary.csv", "sweep.csv", "curves.csv", "results.json"}
    _strict_json((tmp_path / "results.json").read_text())  # NaN written as null
    # the command line exits 1 when a mechanism failed, after writing the files
    assert main(["compare", "--quick", "--mode", "test-broken", "--no-progress", "--no-figures", "--out", str(tmp_path / "b")]) == 1
    assert "FAILED: test-broken" in capsys.readouterr().err
    assert (tmp_path / "b" / "summary.csv").exists()


def test_presets_and_devices():
    assert compare.get_preset(None, "cpu").name == "default"
    assert compare.get_preset(None, "cuda").name == "gpu"
    with pytest.raises(ValueError, match="unknown preset 'x'; presets: quick, book, default, gpu"):
        compare.get_preset("x")
    assert compare.resolve_device("cpu") == torch.device("cpu")
    assert compare.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(KeyError, match=r"unknown mechanism.*'nope'.*registered: .*self"):
        compare.run(["nope"], preset=TINY)
    for p in compare.PRESETS.values():  # every sweep and fixed size is measurable, and the task is valid
        assert p.n_keys >= p.n_pairs and p.sweep_lengths == tuple(sorted(p.sweep_lengths))
        assert p.embed_dim % p.num_heads == 0 and p.bench_embed % p.num_heads == 0


def test_own_task_hook_measures_a_mechanism_on_its_own_task(tmp_path):
    """Chapter 1's encoder-decoder brings its own task (reversal): the second table has numbers on every axis."""
    mech = registry.get("seq2seq")
    assert mech.build is None and mech.data == "seq2seq" and "seq2seq" in own_tasks()  # attn.experiments.soft.OWN_TASKS
    res = compare.run(["self", "seq2seq"], preset="quick", seed=0, device="cpu", progress=False, task="recall",
                      seeds=1)
    own = {r.name: r for r in res.own_results()}
    assert [r.name for r in res.sequence_results()] == ["self"] and list(own) == ["seq2seq"]
    r = own["seq2seq"]
    assert r.status == "ok", r.notes
    assert r.task.startswith("reverse") and r.size_unit
    for key in ("params", "model_params", "gflops", "latency_ms", "peak_mib", "flops_exponent",
                "accuracy", "eval_loss", "final_train_loss", "query_entropy"):
        assert r.metrics.get(key) is not None and r.metrics[key] == r.metrics[key], key
    # a time exponent, unless per-call overhead hides the growth at these tiny sizes (then none, and why)
    assert r.metrics["time_fit"] == "overhead" or r.metrics["time_exponent"] is not None
    assert 1.0 / 11 < r.metrics["accuracy"] <= 1.0  # learned something beyond chance (11 content tokens)
    assert r.metrics["flops_exponent"] > 1.3  # n target steps over n source states: quadratic FLOPs, less the linear projections
    assert len(r.history) and list(r.sweep["n"]) == [16, 32, 64]
    table = res.own_table()
    assert table.loc["seq2seq", "status"] == "ok" and table.loc["seq2seq", "acc"]
    assert "On their own tasks" in res.format_table() and "**seq2seq**" in res.reading()
    again = compare.run_one("seq2seq", preset="quick", seed=0, device="cpu", cost=False, task="recall")
    assert again.metrics["accuracy"] == r.metrics["accuracy"]  # seeded: same batches, same result
    res.save(tmp_path, figures=False)
    assert "seq2seq" in (tmp_path / "summary.csv").read_text() and "seq2seq" in (tmp_path / "curves.csv").read_text()


def test_workers_learn_exactly_what_one_process_learns():
    """Two worker processes (one thread each) give the same learned numbers as one process, in chapter order."""
    names = ["seq2seq", "self", "multihead"]
    one = compare.run(names, preset=TINY, seed=0, device="cpu", progress=False, cost=False, task="recall", seeds=1)
    two = compare.run(names, preset=TINY, seed=0, device="cpu", progress=False, cost=False, workers=2,
                      task="recall", seeds=1)
    assert [r.name for r in two.results] == [r.name for r in one.results] == names
    for a, b in zip(one.results, two.results, strict=True):
        assert a.status == b.status == "ok"
        assert a.metrics["accuracy"] == b.metrics["accuracy"] and list(a.history["loss"]) == list(b.history["loss"])
    with pytest.raises(ValueError, match="workers"):
        compare.run(names, preset=TINY, workers=0)
