"""Shared modules: benchmarking, registry, widgets, tasks and trainer."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from attn import benchmark, registry
from attn.multihead import MultiHeadAttention
from attn.tasks import AssociativeRecall
from attn.train import History, Recorder, cpu_threads, set_seed, train
from attn.widgets import AttentionExplorer, Panel, View, entropy

# ----------------------------------------------------------------------------- benchmark


def test_fit_exponent_recovers_power_laws():
    n = np.array([128, 256, 512, 1024, 2048])
    assert benchmark.fit_exponent(n, 3 * n**2.0) == pytest.approx(2.0)
    assert benchmark.fit_exponent(n, 0.5 * n * np.log(n)) == pytest.approx(1.13, abs=0.05)
    with pytest.raises(ValueError):
        benchmark.fit_exponent([1], [1])
    with pytest.raises(ValueError):
        benchmark.fit_exponent([1, 2], [0, 1])


def test_count_flops_matches_formula():
    E, n = 64, 32
    mha = MultiHeadAttention(E, 4).eval()
    x = torch.randn(1, n, E)
    with torch.no_grad():
        assert benchmark.count_flops(lambda: mha(x)) == 8 * n * E**2 + 4 * n**2 * E


def test_peak_memory_sees_an_allocation():
    size = 4_000_000  # bytes

    def alloc():
        a = torch.empty(size // 4)
        b = a + 1  # a second buffer alive at once
        return b.sum()

    peak = benchmark.peak_memory(alloc, "cpu")
    assert 2 * size <= peak < 3 * size


class _BigTemporary(torch.autograd.Function):
    """Allocates a 4 MiB temporary inside a Python-level event, frees it, returns a scalar."""

    @staticmethod
    def forward(ctx, x):
        big = x.new_empty(1 << 20).fill_(1.0)  # 4 MiB
        return (big * 2).sum()  # a second 4 MiB buffer alive with the first

    @staticmethod
    def backward(ctx, g):
        return g


def test_peak_memory_sees_temporaries_inside_an_autograd_function():
    peak = benchmark.peak_memory(lambda: _BigTemporary.apply(torch.zeros(1)), "cpu")
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_compare_and_sweep():
    x = torch.randn(128, 128)
    df = benchmark.compare({"one": lambda: x @ x, "four": lambda: x @ x @ x @ x @ x}, min_run_time=0.05)
    assert df.loc["one", "ratio"] == 1.0 and df.loc["four", "ratio"] > 1.0  # four products vs one: robust to noise

    def square_matmul(n: int) -> dict[str, Callable[[], Tensor]]:
        a = torch.randn(n, n)
        return {"mm": lambda: a @ a}

    sweep = benchmark.sweep(square_matmul, [64, 128], min_run_time=0.05, flops=True)
    assert list(sweep.columns) == ["name", "n", "median_ms", "peak_mib", "gflops"]
    assert sweep.gflops.iloc[1] == pytest.approx(8 * sweep.gflops.iloc[0])
    assert benchmark.exponents(sweep, "gflops")["mm"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        benchmark.compare({})
    assert benchmark.human_bytes(1536) == "1.5 KiB"


# ----------------------------------------------------------------------------- registry


def test_registry_chapters_and_mechanisms():
    assert [c.number for c in registry.CHAPTERS] == list(range(1, 31))
    assert len({c.slug for c in registry.CHAPTERS}) == 30
    assert tuple(range(1, 24)) == registry.MECHANISM_CHAPTERS
    assert sorted(n for _, ns in registry.PARTS for n in ns) == list(range(1, 31))  # each chapter in one part
    names = {m.name for m in registry.mechanisms()}
    assert {"additive", "self", "multihead"} <= names
    for m in registry.mechanisms():
        assert m.paper and m.complexity.startswith("O(") and m.summary
        assert m.cls.__doc__, f"{m.name} has no docstring"
    with pytest.raises(KeyError, match="registered"):
        registry.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("self", paper="x", complexity="O(1)", chapter=2)(type("Other", (torch.nn.Module,), {}))
    with pytest.raises(KeyError):
        registry.chapter(99)


# ----------------------------------------------------------------------------- widgets


def _view(t, q):
    w = torch.softmax(torch.arange(16.0).view(4, 4) / t, -1)
    return View([Panel(w, rows=list("abcd"), highlight_row=q)], caption=f"t={t} q={q}")


def test_explorer_precomputes_every_state_and_recomputes_live():
    ex = AttentionExplorer(_view, {"t": [0.5, 1.0, 2.0], "q": range(4)}, initial={"t": 1.0})
    assert len(ex.states) == 12 and ex.selection == [1, 2]
    assert ex.states["0-3"]["caption"] == "t=0.5 q=3"
    assert ex.states["2-1"]["panels"][0]["highlight_row"] == 1
    live = ex.select(t=2.0, q=0)
    assert live["key"] == "2-0" and live["caption"] == "t=2.0 q=0"
    assert live["panels"] == ex.states["2-0"]["panels"]
    assert ex.controls[0]["labels"] == ["0.5", "1", "2"]


def test_explorer_errors():
    with pytest.raises(ValueError, match="at least one slider"):
        AttentionExplorer(_view, {})
    with pytest.raises(ValueError, match="combinations"):
        AttentionExplorer(_view, {"t": list(range(1, 40)), "q": list(range(40))})
    with pytest.raises(ValueError, match="not one of"):
        AttentionExplorer(_view, {"t": [1.0], "q": [0]}, initial={"t": 3.0})
    with pytest.raises(TypeError, match="View or a Panel"):
        AttentionExplorer(lambda t: 1, {"t": [1]})
    with pytest.raises(ValueError, match="2-D"):
        Panel(torch.ones(2, 2, 2)).to_json()


def test_entropy():
    assert entropy(torch.tensor([0.5, 0.5, 0.0])).item() == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------- tasks and trainer


def test_recall_task_is_consistent_and_seeded():
    task = AssociativeRecall(n_pairs=5, n_keys=7, n_values=9)
    b = task.sample(32, torch.Generator().manual_seed(1))
    x, y = b["x"], b["y"]
    assert x.shape == (32, 11)
    for row, target, where in zip(x, y, b["where"], strict=True):
        keys, values = row[:-1:2], row[1:-1:2]
        assert len(set(keys.tolist())) == 5 and (keys < 7).all() and (values >= 7).all()
        assert values[(keys == row[-1]).nonzero()[0, 0]] == target == row[where]
    again = task.sample(32, torch.Generator().manual_seed(1))
    assert torch.equal(again["x"], x)
    with pytest.raises(ValueError):
        AssociativeRecall(n_pairs=5, n_keys=3)


def test_train_is_deterministic_and_logs():
    def run():
        set_seed(0)
        model = torch.nn.Linear(3, 1)
        sample = lambda bs, g: {"x": torch.randn(bs, 3, generator=g)}  # noqa: E731

        def loss_fn(m, b):
            loss = (m(b["x"]) - b["x"].sum(-1, keepdim=True)).pow(2).mean()
            return loss, {"neg": -float(loss.detach())}

        return train(model, sample, loss_fn, steps=30, log_every=10, progress=False)

    a, b = run(), run()
    assert isinstance(a, History) and a.step == [10, 20, 30]
    assert a.loss == b.loss and a.loss[-1] < a.loss[0]
    assert a.first_step_reaching("neg", -1e9) == 10 and a.first_step_reaching("neg", 1.0) is None
    with pytest.raises(ValueError):
        train(torch.nn.Linear(1, 1), lambda b, g: {}, lambda m, b: (None, {}), steps=0)


def test_every_sequence_mechanism_builds_a_token_mixer():
    x = torch.randn(2, 6, 16)
    for m in registry.mechanisms():
        if m.build is None:
            continue
        layer = m.build(16, 4)
        out = layer(x, need_weights=True)
        assert out.output.shape == (2, 6, 16), m.name
        assert out.weights is not None and out.weights.shape[-2:] == (6, 6), m.name
        assert layer(x).output.shape == (2, 6, 16)


def test_recorder_snapshots_in_eval_mode_without_grad():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    x = torch.ones(1, 2)
    rec = Recorder(lambda m: (m.training, torch.is_grad_enabled(), m(x).clone()))
    model.train()
    rec(5, model)
    assert model.training
    step, (training, grad, out) = rec.records[0]
    assert step == 5 and not training and not grad
    torch.testing.assert_close(out, model[0](x))  # dropout off in eval mode


def test_cpu_threads_restores_the_setting():
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before


def test_memory_sweep_and_sweep_table():
    """Peak memory per implementation and length; the table shows a missing measurement as 'not run' and fits p."""
    from attn import benchmark

    def fns(n):
        out = {"linear": lambda: torch.zeros(n * 4096).sum()}
        if n < 4:
            out["quadratic"] = lambda: torch.zeros(n * n * 4096).sum()
        return out

    df = benchmark.memory_sweep(fns, [1, 2, 4], "cpu")
    assert list(df.columns) == ["name", "n", "peak_mib"] and len(df) == 5
    table = benchmark.sweep_table(df, "peak_mib", decimals=3)
    assert list(table.columns) == ["linear", "quadratic"]
    assert list(table.index) == [1, 2, 4, "exponent p"]
    assert table.loc[4, "quadratic"] == "not run"
    assert abs(table.loc["exponent p", "linear"] - 1.0) < 0.1
    assert abs(table.loc["exponent p", "quadratic"] - 2.0) < 0.1
    assert not table.isna().any().any()
