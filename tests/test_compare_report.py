"""The comparison's page (issue 22): figures that stay legible with thirty-odd mechanisms, tables that fit the
column, the raw numbers downloadable. Drawn from a synthetic :class:`attn.compare.Comparison` (every registered
sequence mechanism, made-up numbers), so nothing is trained here."""

from __future__ import annotations

import dataclasses
import io
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

import attn
from attn import compare, plotting

LENGTHS = (64, 128, 256, 512, 1024)
#: a table this many characters wide (index + columns, with two characters of padding each) fits the
#: page's 757-px column at the theme's table font (about 8 px a character)
MAX_TABLE_CHARS = 90


def _fake() -> compare.Comparison:
    """Every registered sequence mechanism with plausible made-up numbers (seeded)."""
    rng = np.random.default_rng(0)
    preset = compare.get_preset("book")
    results = []
    for m in attn.mechanisms():
        if m.data != "sequence" or m.build is None:
            continue
        p = float(rng.uniform(1.0, 2.0))
        steps = np.arange(0, 310, 10)
        loss = 2.1 * np.exp(-steps / rng.uniform(50, 400)) + rng.uniform(0.01, 0.3)
        r = compare.MechanismResult(
            name=m.name, chapter=m.chapter, paper="", complexity="", data="sequence",
            metrics={"accuracy": rng.uniform(0.1, 1), "accuracy_near": rng.uniform(0.1, 1),
                     "accuracy_far": rng.uniform(0.1, 1), "latency_ms": rng.uniform(0.05, 3),
                     "peak_mib": rng.uniform(0.1, 9), "gflops": rng.uniform(0.01, 0.2), "params": 16640,
                     "time_exponent": p, "memory_exponent": p - 0.3, "flops_exponent": p,
                     "steps_to_target": int(rng.integers(20, 300)), "query_entropy": rng.uniform(0, 3)},
            history=pd.DataFrame({"step": steps, "loss": loss, "acc": 1 - loss / 2.5}),
            sweep=pd.DataFrame({"name": m.name, "n": LENGTHS,
                                "median_ms": [1e-3 * n**p for n in LENGTHS],
                                "peak_mib": [1e-3 * n ** (p - 0.3) for n in LENGTHS],
                                "gflops": [1e-6 * n**p for n in LENGTHS]}),
            query_entropy=rng.uniform(0, 3, size=(2, 16, 4)),
        )
        results.append(r)
    return compare.Comparison(preset=preset, seed=0, device="cpu", results=results)


@pytest.fixture(scope="module")
def fake() -> compare.Comparison:
    res = _fake()
    assert len(res.measured()) >= 25  # the case of the page: thirty-odd mechanisms on one figure
    return res


def _render(fig) -> None:
    """Draw the figure as the book stores it; any warning (constrained layout giving up) is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.savefig(io.BytesIO(), format="png", dpi=plotting.DPI)


@pytest.mark.parametrize("draw", ["curves", "sweep_time", "sweep_memory", "accuracy", "entropy"])
def test_figures_fit_the_column_without_a_long_legend(fake, draw):
    with plt.rc_context():
        plotting.use_style()
        fig = {"curves": fake.plot_curves, "sweep_time": lambda: fake.plot_sweep("median_ms"),
               "sweep_memory": lambda: fake.plot_sweep("peak_mib"),
               "accuracy": fake.plot_accuracy_vs_cost, "entropy": fake.plot_entropy}[draw]()
        try:
            _render(fig)
            assert fig.get_figwidth() <= plotting.MAX_WIDTH_IN + 1e-9
            legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
            # a legend names families at most, never the thirty mechanisms
            assert all(len(leg.get_texts()) <= 8 for leg in legends)
            for ax in fig.axes:  # no two coloured lines of one panel look alike
                styles = [(line.get_color(), str(line.get_linestyle()), line.get_marker())
                          for line in ax.get_lines() if line.get_color() not in ("0.85", "0.5")]
                assert len(styles) == len(set(styles)), styles
            _no_overlapping_text(fig)
        finally:
            plt.close(fig)


def _no_overlapping_text(fig) -> None:
    """Tick labels and direct labels of the figure do not overlap one another (at the stored dpi)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        texts = [t for t in ax.get_yticklabels() + ax.get_xticklabels() if t.get_text() and t.get_visible()]
        texts += [t for t in ax.texts if t.get_text()]
        # the text's own box (an annotation's extent would include its leader line)
        boxes = [Text.get_window_extent(t, renderer) for t in texts]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
                overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
                assert overlap_x <= 1 or overlap_y <= 1, (texts[i].get_text(), texts[j].get_text())


def test_every_mechanism_is_drawn_in_its_family_panel(fake):
    fig = fake.plot_sweep("median_ms")
    try:
        labelled = {t.get_text().split()[0] for ax in fig.axes for t in ax.texts}
        assert labelled == {r.name for r in fake.measured()}
        families = fake.families()
        assert sum(len(v) for v in families.values()) == len(fake.measured())
        assert len(families) <= 6 and len(fig.axes) == len(families)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("task", ["recall", "mqar"])
def test_headline_table_fits_the_column(fake, task):
    wide = []
    for r in fake.results:  # copies holding the widest values each column can have
        r = dataclasses.replace(r, metrics={**r.metrics, "accuracy_min": 0.123, "accuracy_max": 1.0,
                                            "implementation": "python loop", "time_fit": "overhead"})
        wide.append(r)
    fake = dataclasses.replace(fake, task=task, results=wide)
    table = fake.headline_table()
    assert list(table.index) == [r.name for r in fake.sequence_results()]
    chars = max(len(str(i)) for i in table.index) + 2
    for col in table.columns:
        chars += max(len(col), *(len(str(v)) for v in table[col])) + 2
    assert chars <= MAX_TABLE_CHARS, chars
    assert len(table) <= 40  # about two screens of rows


def test_the_raw_numbers_download_as_csv(fake):
    files = fake.csv_files()
    assert set(files) == {"summary.csv", "sweep.csv", "curves.csv"}
    summary = pd.read_csv(io.StringIO(files["summary.csv"]), index_col="name")
    assert list(summary.index) == [r.name for r in fake.results]
    html = fake.download_links().data
    assert html.count('download="') == 3 and "data:text/csv;base64," in html
