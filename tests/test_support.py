"""Shared modules: benchmarking, registry, widgets, tasks and trainer."""

from __future__ import annotations

import math
import os
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


# ----------------------------------------------------------------------------- explorer in a browser
#
# A standalone page runs static/explorer.js (the anywidget ESM) on explorers built here, with a
# fake anywidget model (get/set/on/save_changes) as on a static page with no kernel. Fast: no book.

WORDS = ["the", "cat", "sat", "on", "a", "mat", "because", "it", "was", "warm", "and", "soft"]


def _harness_explorers() -> list[AttentionExplorer]:
    from attn.widgets import Curves, Graph

    def words(temperature, causal, query):  # chapter 2's word labels, a toggle
        q = query
        s = torch.randn(12, 12, generator=torch.Generator().manual_seed(1)) / temperature
        if causal:
            s = s.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), -math.inf)
        w = s.softmax(-1)
        return View([Panel(w, rows=WORDS, cols=WORDS, highlight_row=q, title="weights"),
                     Curves(list(range(12)), {"weight": w[q]}, title="query row", xlabel="key")], caption=f"t={temperature}")

    def wide(window, kind):  # three 24 x 24 heatmaps side by side, colours fixed over states
        i = torch.arange(24.0)
        band = ((i[:, None] - i[None]).abs() <= window).float()
        w = band / band.sum(-1, keepdim=True) * (2.0 if kind == "b" else 1.0)
        return View([Panel(w, vmax=None, title="band"), Panel(w.T, vmax=None, title="transposed", unit="nats"),
                     Panel(w * w, vmax=None, scale="state", title="squared")], caption=f"w={window}")

    def graph(node, head):
        pos = torch.tensor([[math.cos(a), math.sin(a)] for a in torch.arange(8.0) * math.pi / 4])
        edges = torch.tensor([list(range(8)), [node] * 8])
        return Graph(pos, edges, edge_weight=torch.linspace(0, 1, 8), node_value=torch.arange(8) % 4 / 3,
                     highlight=node, title=f"node {node}, head {head}")

    def compare(mechanism, example):  # the comparison's 30-position dropdown; a signed panel; clipped values
        g = torch.Generator().manual_seed(int(mechanism[-2:]) * 2 + example)
        w = torch.rand(6, 6, generator=g).softmax(-1)
        return View([Panel(w, title=mechanism), Curves([1, 2, 3], {"loss": [3.0, 2.0, 1.5]}, xlabel="epoch"),
                     Panel(torch.rand(4, 4, generator=g) * 2 - 1, title="signed", vmax=1.0),
                     Panel(torch.rand(4, 4, generator=g) * 1.5, title="clipped", vmax=1.0)])

    mechanisms = [f"mechanism_{i:02d}" for i in range(30)]
    return [
        AttentionExplorer(words, {"temperature": [0.5, 1.0, 2.0], "causal": [False, True], "query": range(12)},
                          initial={"query": 7}, title="words"),
        AttentionExplorer(wide, {"window": [1, 2, 4], "kind": ["a", "b"]}, title="wide"),
        AttentionExplorer(graph, {"node": range(8), "head": ["mean", 0, 1]}, title="graph"),
        AttentionExplorer(compare, {"mechanism": mechanisms, "example": [0, 1]},
                          value_labels={"mechanism": {m: f"{i + 1}. chapter {m}" for i, m in enumerate(mechanisms)}},
                          title="comparison"),
    ]


def _harness_page(folder) -> None:
    import json
    import shutil

    from attn import widgets

    shutil.copy(widgets._STATIC / "explorer.js", folder / "explorer.js")
    states = [{k: ex.get_state()[k] for k in ("title", "controls", "states", "selection", "palette")}
              for ex in _harness_explorers()]
    (folder / "states.json").write_text(json.dumps(states))
    css = (widgets._STATIC / "explorer.css").read_text()
    (folder / "index.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{css}
body {{ margin: 0; }} article {{ max-width: 757px; margin: 0 auto; padding: 0 16px; }}</style></head>
<body><article id="col"></article><script type="module">
import widget from "./explorer.js";
const all = await (await fetch("states.json")).json();
for (const data of all) {{
  const el = document.createElement("div"); document.getElementById("col").appendChild(el);
  const model = {{ get: (k) => data[k], set: () => {{}}, on: () => {{}},
                   save_changes: () => {{ throw new Error("no kernel"); }} }};
  widget.render({{ model, el }});
}}
window.ready = true;
</script></body></html>""")


def test_explorer_fixed_colour_scale_toggles_dropdowns_and_units():
    words, wide, graph, comp = _harness_explorers()
    assert [c["kind"] for c in words.controls] == ["slider", "toggle", "slider"]
    assert [c["kind"] for c in comp.controls] == ["dropdown", "toggle"]
    assert comp.controls[0]["labels"][0] == "1. chapter mechanism_00"
    assert [c["kind"] for c in graph.controls] == ["slider", "slider"]
    # vmax=None: one colour range for the panel over every state (the largest value it reaches)
    band = [s["panels"][0] for s in wide.states.values()]
    assert {p["vmax"] for p in band} == {max(p["zmax"] for p in band)} and band[0]["vmax_from"] == "all states"
    assert {p["vmax"] for p in band} == {1.0}  # kind "b", window 1: the first row's 2 keys, 2 x 1/2 each
    assert wide.states["0-0"]["panels"][1]["unit"] == "nats"
    squared = [s["panels"][2] for s in wide.states.values()]
    assert all(p["vmax_from"] == "state" and p["vmax"] == p["zmax"] for p in squared)
    assert len({p["vmax"] for p in squared}) > 1
    assert words.states["0-0-0"]["panels"][0]["vmax"] == 1.0 and words.states["0-0-0"]["panels"][0]["ylabel"] == "query"
    # the live path (a kernel) uses the same fixed range
    assert wide.select(window=4, kind="a")["panels"][0]["vmax"] == 1.0
    # signed values: the colours run from the most negative value over all states; clipped ones are kept
    signed = [s["panels"][2] for s in comp.states.values()]
    assert {p["vmin"] for p in signed} == {min(p["zmin"] for p in signed)} and signed[0]["vmin"] < -0.9
    assert all(p["vmin"] == 0.0 and p["vmax"] == 1.0 for s in comp.states.values() for p in s["panels"][3:])
    g = graph.states["0-0"]["panels"][0]["legend"]
    assert g["node_label"] and len(g["nodes"]) == 4 and g["edge_label"]


def test_explorer_option_errors():
    with pytest.raises(ValueError, match="scale"):
        Panel(torch.ones(2, 2), scale="row").to_json()
    with pytest.raises(ValueError, match="vmax"):
        Panel(torch.ones(2, 2), vmax=0.0).to_json()
    with pytest.raises(ValueError, match="vmin must be a finite number below vmax"):
        Panel(torch.ones(2, 2), vmin=2.0).to_json()
    with pytest.raises(ValueError, match=r"controls.*'t'.*toggle"):
        AttentionExplorer(_view, {"t": [1.0, 2.0, 3.0], "q": [0]}, controls={"t": "toggle"})
    with pytest.raises(ValueError, match=r"controls.*one of"):
        AttentionExplorer(_view, {"t": [1.0], "q": [0]}, controls={"t": "knob"})
    with pytest.raises(ValueError, match="value_labels names unknown"):
        AttentionExplorer(_view, {"t": [1.0], "q": [0]}, value_labels={"x": {}})
    with pytest.raises(ValueError, match="value_labels\\['t'\\] has 1 entries"):
        AttentionExplorer(_view, {"t": [1.0, 2.0], "q": [0]}, value_labels={"t": ["a"]})


@pytest.mark.parametrize("width", [1366, 390])
def test_explorer_page_lays_out_for_the_width(tmp_path, width):
    """In Chromium, at a desktop and a phone width: every canvas keeps its aspect ratio and stays inside
    the column, every heatmap panel has a colour bar, index ticks never overlap, and each control
    (slider, toggle, dropdown) moves with the keyboard and redraws; a resize redraws for the new width."""
    import json

    from browser import CHROMIUM_ARGS, EXPLORER_REPORT_JS, BookServer, chromium_path, move_control
    from playwright.sync_api import sync_playwright
    from test_browser import overlapping_labels

    _harness_page(tmp_path)
    with BookServer(tmp_path) as server, sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = b.new_page(viewport={"width": width, "height": 900}, device_scale_factor=2 if width < 500 else 1)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server.url}/index.html", wait_until="networkidle")
        page.wait_for_function("window.ready === true")
        report = page.evaluate(EXPLORER_REPORT_JS)
        assert len(report) == 4 and not errors, errors
        column = min(width - 32, 757)  # the article's content box
        for i, ex in enumerate(report):
            assert ex["aspect_error"] < 0.01, (i, ex["css"], ex["store"])
            assert ex["overflow"] <= 0.5, (i, ex["overflow"], ex["layout"])
            assert ex["css"][0] <= column + 0.5
            assert ex["layout"]["dpr"] == (2 if width < 500 else 1)
            heatmaps = [p[0] for p in ex["panels"] if p[1] == "heatmap"]
            assert sorted(c[0] for c in ex["colorbars"]) == heatmaps, ex["colorbars"]
            assert not overlapping_labels(ex["boxes"]), overlapping_labels(ex["boxes"])[:3]
        words, wide, graph, comp = report
        assert sum(len(e["colorbars"]) for e in report) == 7
        signed, clipped = comp["colorbars"][1:]
        assert signed[1] < -0.9 and signed[2] == 1 and clipped[1:3] == [0, 1]
        if os.environ.get("ATTN_SHOTS"):
            page.screenshot(path=f"{os.environ['ATTN_SHOTS']}/explorers_{width}.png", full_page=True)
        assert {c[2] for c in words["boxes"] if c[0] == 0 and c[1] == "col"} and \
            len([c for c in words["boxes"] if c[0] == 0 and c[1] == "col"]) == 12  # all 12 words, rotated
        assert [c[4] for c in wide["colorbars"]] == ["fixed", "fixed", "scaled per state"]
        assert wide["colorbars"][1][3] == "nats"
        assert sorted(x[1] for x in graph["legends"]) == ["edges", "nodes"]
        assert all(float(t).is_integer() for t in comp["panels"][1][6])  # epochs 1, 2, 3: no 1.5
        if width < 500:
            assert wide["layout"]["rows"] >= 2  # the three heatmaps wrap onto rows
        else:
            assert wide["layout"]["rows"] == 1 and wide["layout"]["scale"] == 1
        # controls: toggles are radio pairs, the 30 mechanisms a dropdown of their labels
        explorers = page.locator(".attn-explorer")
        assert explorers.nth(0).locator("[data-kind=toggle] input[type=radio]").count() == 2
        assert explorers.nth(3).locator("select option").count() == 30
        assert explorers.nth(3).locator("select option").first.inner_text() == "1. chapter mechanism_00"
        for i, ex in enumerate(report):
            loc = explorers.nth(i)
            for j in range(len(ex["controls"])):
                before = (loc.get_attribute("data-key"), loc.locator("canvas").evaluate("c => c.toDataURL()"))
                keys = move_control(page, loc, j)
                after = (loc.get_attribute("data-key"), loc.locator("canvas").evaluate("c => c.toDataURL()"))
                assert after[0] != before[0], f"explorer {i} control {j} ({ex['controls'][j]}): key did not change"
                assert after[1] != before[1], f"explorer {i} control {j}: drawing did not change"
                page.keyboard.press(keys[1])
                assert loc.get_attribute("data-key") == before[0], f"explorer {i} control {j}: did not move back"
        # resize: the explorers redraw for the new width, still undistorted and inside the column
        other = 390 if width > 500 else 1366
        page.set_viewport_size({"width": other, "height": 900})
        page.wait_for_function(f"JSON.parse(document.querySelector('.attn-explorer canvas').dataset.layout).avail "
                               f"!= {json.dumps(report[0]['layout']['avail'])}")
        page.wait_for_timeout(100)
        resized = page.evaluate(EXPLORER_REPORT_JS)
        for ex in resized:
            assert ex["aspect_error"] < 0.01 and ex["overflow"] <= 0.5
        print(f"width {width}: aspect errors {[round(e['aspect_error'], 4) for e in report]}, "
              f"colour bars {sum(len(e['colorbars']) for e in report)}, "
              f"draw ms {[e['draw_ms'] for e in report]}, after resize {[e['draw_ms'] for e in resized]}")
        b.close()
