"""The report: the tables, a reading of the numbers, figures, the explorer, and the files."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .presets import Preset
from .results import _INT_COLUMNS, TABLE_COLUMNS, MechanismResult, _clean

__all__ = ["Comparison"]

@dataclass
class Comparison:
    """The results of :func:`run`: one :class:`MechanismResult` per mechanism, in chapter order."""

    preset: Preset
    seed: int
    device: str
    results: list[MechanismResult]
    wall_s: float = 0.0

    # ---------------------------------------------------------------- frames

    def table(self) -> pd.DataFrame:
        """Summary, one row per mechanism, indexed by name (columns :data:`TABLE_COLUMNS`)."""
        df = pd.DataFrame([r.row() for r in self.results], columns=list(TABLE_COLUMNS))
        for col in _INT_COLUMNS:  # counts stay integers (missing ones <NA>), also in the CSV
            df[col] = pd.array([None if pd.isna(v) else int(v) for v in df[col]], dtype="Int64")
        return df.set_index("name")

    def sequence_results(self) -> list[MechanismResult]:
        """The mechanisms of the first table: token mixers on the shared recall task."""
        return [r for r in self.results if not _own(r)]

    def own_results(self) -> list[MechanismResult]:
        """The mechanisms of the second table: each on its own task (graphs, images, sets, documents, pairs)."""
        return [r for r in self.results if _own(r)]

    def measured(self) -> list[MechanismResult]:
        """The mechanisms that ran on the shared task."""
        return [r for r in self.sequence_results() if r.status == "ok"]

    def curves(self) -> dict[str, pd.DataFrame]:
        """``name -> History frame`` (``step, loss, acc``) for the mechanisms on the shared task."""
        return {r.name: r.history for r in self.sequence_results() if len(r.history)}

    def own_curves(self) -> dict[str, pd.DataFrame]:
        """``name -> History frame`` for the mechanisms measured on their own task."""
        return {r.name: r.history for r in self.own_results() if len(r.history)}

    def curves_frame(self) -> pd.DataFrame:
        """All training curves, long format: ``name, step, loss, acc``."""
        every = {**self.curves(), **self.own_curves()}
        frames = [df.assign(name=name)[["name", *df.columns]] for name, df in every.items()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["name", "step", "loss", "acc"])

    def sweep_frame(self, which: str = "all") -> pd.DataFrame:
        """Sweeps, long format: ``name, n, median_ms, peak_mib, gflops`` (``which``: all, sequence, own)."""
        pick = {"all": self.results, "sequence": self.sequence_results(), "own": self.own_results()}[which]
        frames = [r.sweep for r in pick if len(r.sweep)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["name", "n", "median_ms", "peak_mib", "gflops"])

    def display_table(self) -> pd.DataFrame:
        """The summary with readable column names and rounding, for printing."""
        t = self.table().loc[[r.name for r in self.sequence_results()]]
        out = pd.DataFrame(index=t.index)
        out["ch"] = t["chapter"]
        _cost_columns(out, t, "n")
        out["acc"] = _fmt(t["accuracy"], ".3f")
        out["acc far"] = _fmt(t["accuracy_far"], ".3f")
        out["steps to target"] = _steps(self.sequence_results(), t)
        out["H(query)"] = _fmt(t["query_entropy"], ".2f")
        out["status"] = [
            r.status for r in self.sequence_results()
        ]
        return out

    def own_table(self) -> pd.DataFrame:
        """The second table: mechanisms on their own tasks, on the same axes (size = the task's own unit)."""
        t = self.table().loc[[r.name for r in self.own_results()]]
        out = pd.DataFrame(index=t.index)
        out["ch"] = t["chapter"]
        out["task"] = t["task"]
        out["size"] = [
            "" if pd.isna(m) else f"{u} <= {int(m)}" for u, m in zip(t["size_unit"], t["sweep_max_n"], strict=True)
        ]
        _cost_columns(out, t, "size")
        out["acc"] = _fmt(t["accuracy"], ".3f")
        out["steps to target"] = _steps(self.own_results(), t)
        out["H(attn)"] = _fmt(t["query_entropy"], ".2f")
        out["status"] = [r.status if r.status != "own task" else "no task hook" for r in self.own_results()]
        return out

    def format_table(self) -> str:
        """The readable tables as text (for the CLI): the shared task, then the own tasks."""
        parts = []
        if self.sequence_results():
            parts.append(self.display_table().to_string())
        if self.own_results():
            parts.append("On their own tasks (size = the unit each task grows in):\n" + self.own_table().to_string())
        return "\n\n".join(parts)

    # ---------------------------------------------------------------- reading

    def reading(self) -> str:
        """A few sentences on what the numbers say, computed from the results (Markdown)."""
        p = self.preset
        t = self.table()
        ok = t[(t["status"] == "ok") & (t["task"] == "associative recall")]
        lines: list[str] = []
        chance = 1.0 / p.n_values
        if len(ok):
            acc = ok["accuracy"].astype(float).dropna()
            if len(acc):
                top = acc[acc >= acc.max() - 0.005].sort_values(ascending=False)
                who = _names(top.index)
                lines.append(
                    f"After {p.steps} training steps on {p.seq_len}-token sequences, {who} "
                    + ("recalls" if len(top) == 1 else "recall")
                    + f" best ({top.iloc[0]:.1%} of held-out queries; chance is {chance:.1%})."
                    + (f" {_names(acc[acc < 2 * chance].index)} stay near chance." if (acc < 2 * chance).any() else "")
                )
            gap = (ok["accuracy_near"].astype(float) - ok["accuracy_far"].astype(float)).dropna()
            short = gap[gap > 0.2].sort_values(ascending=False)
            if len(short):
                names = ", ".join(
                    f"**{n}** ({ok.loc[n, 'accuracy_near']:.0%} near, {ok.loc[n, 'accuracy_far']:.0%} far)" for n in short.index
                )
                lines.append(
                    f"Reach matters: {names} answer when the matching pair lies in the half of the sequence next to "
                    f"the query, and much less often when it lies in the far half, beyond what their pattern lets "
                    f"the query see in {p.layers} layer{'s' if p.layers > 1 else ''}."
                )
            elif len(gap):
                lines.append("No mechanism here answers much worse when the matching pair lies far from the query.")
            same = _identical_groups(self.measured())
            for group in same:
                lines.append(
                    f"{_names(group)} have identical loss curves to the last digit: on this task, with this seed, "
                    f"they compute the same function for the query token (same parametrisation, and nothing in "
                    f"their pattern hides a key from the last token)."
                )
            conv = ok["steps_to_target"].dropna().astype(float)
            never = [n for n in ok.index if pd.isna(ok.loc[n, "steps_to_target"])]
            if len(conv):
                first = conv[conv == conv.min()].index
                lines.append(
                    f"{_names(first)} first {'reaches' if len(first) == 1 else 'reach'} {p.target_acc:.0%} "
                    f"training accuracy (step {int(conv.min())})"
                    + (f"; {_names(never, bold=False)} never reach it within the budget." if never else ".")
                )
            elif never:
                lines.append(f"No mechanism reaches {p.target_acc:.0%} training accuracy within {p.steps} steps.")
            lat = ok["latency_ms"].dropna().astype(float)
            if len(lat) > 1:
                fast, slow = lat.idxmin(), lat.idxmax()
                lines.append(
                    f"One forward at batch {p.bench_batch} x {p.bench_n} tokens (width {p.bench_embed}) is fastest for "
                    f"**{fast}** ({lat[fast]:.3g} ms) and slowest for **{slow}** ({lat[slow]:.3g} ms, "
                    f"{lat[slow] / lat[fast]:.0f} times longer)."
                )
            fe = ok["flops_exponent"].dropna().astype(float).sort_values()
            if len(fe):
                lin, mid, quad = fe[fe < 1.2], fe[(fe >= 1.2) & (fe < 1.6)], fe[fe >= 1.6]
                parts = []
                if len(lin):
                    parts.append(f"about linearly for {_with_p(lin)}")
                if len(mid):
                    parts.append(f"between linear and quadratic for {_with_p(mid)}")
                if len(quad):
                    parts.append(f"towards quadratically for {_with_p(quad)}")
                lines.append(
                    f"FLOPs (counted, so free of timing noise) grow over n = {min(p.sweep_lengths)}..{max(p.sweep_lengths)} "
                    + "; ".join(parts)
                    + f". At these lengths the projections' 8nE^2 FLOPs, linear in n, still weigh against the 4n^2E "
                    f"of the scores (the two are equal at n = 2E = {2 * p.bench_embed}), so a quadratic mechanism's "
                    "fitted exponent sits below 2."
                )
            me = ok["memory_exponent"].astype(float)
            fused = [n for n in fe.index if fe[n] >= 1.6 and me.get(n, float("nan")) < 1.2]
            dense = [n for n in fe.index if me.get(n, float("nan")) >= 1.6]
            if fused:
                lines.append(
                    f"Quadratic FLOPs need not mean quadratic memory: the peak memory of {_names(fused)} grows about "
                    f"linearly (their kernel never holds the n x n scores at once)"
                    + (f", while that of {_names(dense)} grows about quadratically." if dense else ".")
                )
            ent = ok["query_entropy"].dropna().astype(float)
            if len(ent) > 1:
                sharp, flat = ent.idxmin(), ent.idxmax()
                lines.append(
                    f"The query's attention is sharpest for **{sharp}** ({ent[sharp]:.2f} nats, averaged over heads) "
                    f"and flattest for **{flat}** ({ent[flat]:.2f} nats); a uniform row over {p.seq_len} tokens has "
                    f"{math.log(p.seq_len):.2f} nats."
                )
        own = [r for r in self.own_results() if r.status == "ok"]
        if own:
            lines.append(
                "On their own tasks (second table): "
                + "; ".join(
                    f"**{r.name}** ({r.task}) {r.metrics.get('accuracy', float('nan')):.1%} held-out accuracy"
                    + (f", time growing as size^{r.metrics['time_exponent']:.2f} in {r.size_unit}" if r.metrics.get("time_exponent") else "")
                    for r in own
                ) + "."
            )
        hookless = [r for r in self.own_results() if r.status == "own task"]
        if hookless:
            lines.append(
                "Registered without a task to measure them on: "
                + ", ".join(f"{r.name} (chapter {r.chapter}, {r.data} data)" for r in hookless) + "."
            )
        failed = [r for r in self.results if r.status == "error"]
        if failed:
            lines.append("Failed here: " + "; ".join(f"{r.name}: {'; '.join(r.notes)}" for r in failed) + ".")
        lines.append(
            "All timings come from one run on one machine: compare their ratios within the run, not absolute times across runs."
        )
        return "\n\n".join(lines)

    # ---------------------------------------------------------------- figures

    def plot_curves(self, ax=None, y: str = "loss"):
        """Training curves of every measured mechanism, overlaid."""
        from .. import plotting

        curves = self.curves()
        if not curves:
            return _empty(ax, "no training curves")
        ax = plotting.curves(curves, y, ax=ax, logy=(y == "loss"))
        ax.set_ylabel({"loss": "training loss", "acc": "training-batch accuracy"}.get(y, y))
        _distinguish(ax)
        _legend_outside(ax)
        return ax

    def plot_sweep(self, ax=None, y: str = "median_ms"):
        """Cost of the layer alone against sequence length, log-log, with fitted exponents."""
        from matplotlib.ticker import NullFormatter

        from .. import plotting

        df = self.sweep_frame("sequence")
        if len(df):
            df = df[df[y].astype(float) > 0]
            counts = df.groupby("name")["n"].transform("count")
            df = df[counts >= 2]
        if not len(df):
            return _empty(ax, "no sweep with two or more lengths")
        ylabel = {"median_ms": "forward time (ms)", "peak_mib": "peak memory (MiB)", "gflops": "GFLOP per forward"}.get(y, y)
        ax = plotting.sweep_plot(df, y=y, ax=ax, ylabel=ylabel)
        ax.set_title(f"one layer, batch 1, width {self.preset.bench_embed}", fontsize=9)
        lengths = sorted(int(n) for n in df["n"].unique())
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        _distinguish(ax)
        _legend_outside(ax)
        return ax

    def plot_accuracy_vs_cost(self, ax=None, cost: str = "latency_ms"):
        """Held-out accuracy against the layer's cost at the fixed size (log x)."""
        import matplotlib.pyplot as plt

        t = self.table()
        t = t[(t["status"] == "ok") & (t["task"] == "associative recall")].dropna(subset=[cost, "accuracy"])
        if not len(t):
            return _empty(ax, "nothing measured")
        if ax is None:
            _, ax = plt.subplots()
        from ..plotting import PALETTE

        for i, (name, r) in enumerate(t.iterrows()):
            ax.scatter(float(r[cost]), float(r["accuracy"]), s=45, zorder=3, label=name,
                       color=PALETTE[i % len(PALETTE)], marker=_MARKERS[(i // len(PALETTE)) % len(_MARKERS)])
        ax.axhline(1.0 / self.preset.n_values, color="0.5", ls=":", lw=1, label="chance")
        _legend_outside(ax)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel({"latency_ms": f"forward time at batch {self.preset.bench_batch} x n {self.preset.bench_n} (ms)",
                       "peak_mib": "peak memory (MiB)", "gflops": "GFLOP per forward", "params": "parameters"}.get(cost, cost))
        ax.set_ylabel("held-out accuracy")
        return ax

    def plot_entropy(self, ax=None):
        """Distribution of the query row's attention entropy (all layers and heads), per mechanism."""
        import matplotlib.pyplot as plt

        data = [(r.name, r.query_entropy.ravel()) for r in self.sequence_results() if r.query_entropy is not None and r.query_entropy.size]
        if not data:
            return _empty(ax, "no attention weights")
        if ax is None:
            _, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(data) + 2), 3.6))
        ax.violinplot([d for _, d in data], showmedians=True, widths=0.8)
        ax.set_xticks(range(1, len(data) + 1), [n for n, _ in data], rotation=40, ha="right")
        ax.axhline(math.log(self.preset.seq_len), color="0.5", ls=":", lw=1)
        ax.annotate("uniform", (0.6, math.log(self.preset.seq_len)), fontsize=7, color="0.4",
                    textcoords="offset points", xytext=(0, 2))
        ax.set_ylabel("entropy of the query row (nats)")
        ax.set_ylim(bottom=0)
        return ax

    def explorer(self, examples: int | None = None):
        """An :class:`~attn.widgets.AttentionExplorer` over the trained models' attention.

        Sliders: the mechanism, the held-out example (and the layer when there
        are several). Left: the attention matrix averaged over heads, the query
        row highlighted; right: the query row of every head.
        """
        from ..core import entropy
        from ..widgets import AttentionExplorer, Panel, View

        # name -> (result, its probe weights (layers, k, H, n, n)), for the mechanisms that returned weights
        have = {r.name: (r, r.probe_weights) for r in self.results if r.probe_weights is not None}
        if not have:
            raise ValueError("no mechanism returned attention weights to explore")
        k = min(pw.shape[1] for _, pw in have.values())
        k = k if examples is None else min(k, examples)
        layers = min(pw.shape[0] for _, pw in have.values())
        task = self.preset.task()

        def labels(r: MechanismResult, b: int) -> list[str]:
            xs = r.probe["x"][b].tolist()
            answer = (int(r.probe["where"][b]) - 1) // 2
            pairs = [f"{xs[2 * i]}:{xs[2 * i + 1] - task.n_keys}" + ("*" if i == answer else "") for i in range(task.n_pairs)]
            return [*pairs, f"q={xs[-1]}"]

        def view(mechanism: str, example: int, layer: int = 0) -> View:
            r, probe_weights = have[mechanism]
            w = probe_weights[layer, example]  # (H, n, n)
            lab = labels(r, example)
            answer = (int(r.probe["where"][example]) - 1) // 2
            q = w.shape[-1] - 1
            ok = int(r.probe["pred"][example]) == int(r.probe["y"][example])
            return View(
                [
                    Panel(w.mean(0), rows=lab, cols=lab, highlight_row=q, title=f"{mechanism}: mean over {w.shape[0]} head(s)"),
                    Panel(w[:, q], rows=[f"head {h}" for h in range(w.shape[0])], cols=lab, title="query row, per head"),
                ],
                caption=(
                    f"* marks the pair holding the answer. Query row: weight on the answer {float(w[:, q, answer].mean()):.2f} "
                    f"(mean over heads), entropy {float(entropy(w[:, q]).mean()):.2f} nats; "
                    f"prediction {'correct' if ok else 'wrong'}."
                ),
            )

        sliders: dict[str, list[Any]] = {"mechanism": list(have), "example": list(range(k))}
        if layers > 1:
            sliders["layer"] = list(range(layers))
        return AttentionExplorer(
            view, sliders, initial={"mechanism": next(iter(have)), "example": 0},
            title="Trained models on held-out recall queries",
        )

    def figure(self):
        """The four plots on one figure."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
        self.plot_curves(axes[0, 0])
        self.plot_sweep(axes[0, 1])
        self.plot_accuracy_vs_cost(axes[1, 0])
        self.plot_entropy(axes[1, 1])
        return fig

    # ---------------------------------------------------------------- files

    def to_json(self) -> dict[str, Any]:
        return _clean(
            {
                "meta": {
                    "seed": self.seed,
                    "device": self.device,
                    "preset": dataclasses.asdict(self.preset),
                    "torch": torch.__version__,
                    "wall_s": round(self.wall_s, 2),
                    "columns": list(TABLE_COLUMNS),
                },
                "results": [r.to_json() for r in self.results],
            }
        )

    def save(self, out_dir: str | Path, figures: bool = True) -> list[Path]:
        """Write ``summary.csv``, ``sweep.csv``, ``curves.csv``, ``results.json`` and PNG figures."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        path = out / "summary.csv"
        self.table().to_csv(path)
        written.append(path)
        path = out / "sweep.csv"
        self.sweep_frame().to_csv(path, index=False)
        written.append(path)
        path = out / "curves.csv"
        self.curves_frame().to_csv(path, index=False)
        written.append(path)
        path = out / "results.json"
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        written.append(path)
        if figures:
            written += self.save_figures(out)
        return written

    def save_figures(self, out_dir: str | Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from .. import plotting

        out = Path(out_dir)
        written = []
        plots: dict[str, Callable[[Any], Any]] = {
            "loss_curves.png": self.plot_curves,
            "sweep_time.png": lambda ax: self.plot_sweep(ax, "median_ms"),
            "sweep_memory.png": lambda ax: self.plot_sweep(ax, "peak_mib"),
            "accuracy_vs_cost.png": self.plot_accuracy_vs_cost,
            "entropy.png": self.plot_entropy,
        }
        with plt.rc_context():
            plotting.use_style()
            for fname, plot in plots.items():
                fig, ax = plt.subplots(figsize=(8.5, 4.2), constrained_layout=True)
                plot(ax)
                fig.savefig(out / fname, bbox_inches="tight")
                plt.close(fig)
                written.append(out / fname)
        return written


def _fmt(series: pd.Series, spec: str) -> pd.Series:
    """Numbers formatted with ``spec``; missing values as empty strings."""
    return series.map(lambda v: "" if pd.isna(v) else format(float(v), spec))


def _cost_columns(out: pd.DataFrame, t: pd.DataFrame, size: str) -> None:
    """The cost columns both tables share: parameters, GFLOP, ms, MiB and the fitted exponents in ``size``."""
    out["params"] = t["params"].map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
    out["GFLOP"] = _fmt(t["gflops"], ".3g")
    out["ms"] = _fmt(t["latency_ms"], ".3g")
    out["MiB"] = _fmt(t["peak_mib"], ".3g")
    for col, label in (("time_exponent", "time"), ("memory_exponent", "mem"), ("flops_exponent", "FLOP")):
        out[f"{label} ~{size}^p"] = _fmt(t[col], ".2f")


def _steps(results: list[MechanismResult], t: pd.DataFrame) -> list[str]:
    """Steps to the target accuracy: a number, "never" within the budget, or empty for a failed row."""
    return ["" if r.status != "ok" else ("never" if pd.isna(v) else str(int(v))) for r, v in zip(results, t["steps_to_target"], strict=True)]


def _own(r: MechanismResult) -> bool:
    """Measured (or to be measured) on its own task rather than the shared recall task."""
    return bool(r.task) or r.data != "sequence"


def _names(names: Iterable[str], bold: bool = True) -> str:
    """``['a', 'b', 'c'] -> '**a**, **b** and **c**'``."""
    items = [f"**{n}**" if bold else str(n) for n in names]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _with_p(series: pd.Series) -> str:
    return ", ".join(f"{n} (p = {v:.2f})" for n, v in series.items())


def _identical_groups(results: list[MechanismResult]) -> list[list[str]]:
    """Groups of mechanisms whose logged training losses are exactly equal."""
    groups: dict[tuple[float, ...], list[str]] = {}
    for r in results:
        if len(r.history):
            groups.setdefault(tuple(r.history["loss"].tolist()), []).append(r.name)
    return [g for g in groups.values() if len(g) > 1]


_MARKERS = ("o", "s", "^", "D", "v", "P")
_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def _distinguish(ax) -> None:
    """Past the palette's 8 colours, vary line style and marker so every line stays tellable apart."""
    from ..plotting import PALETTE

    for i, line in enumerate(ax.get_lines()):
        k = (i // len(PALETTE)) % len(_LINESTYLES)
        line.set_color(PALETTE[i % len(PALETTE)])
        line.set_linestyle(_LINESTYLES[k])
        if line.get_marker() not in (None, "None", ""):
            line.set_marker(_MARKERS[k])


def _legend_outside(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0, **kw)


def _empty(ax, text: str):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_axis_off()
    return ax
