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
    #: every seed behind the learning numbers (the first is ``seed``)
    seeds: list[int] = dataclasses.field(default_factory=list)
    #: the learning task: "mqar" (multi-query associative recall) or "recall" (one query, the easy floor)
    task: str = "recall"
    #: MQAR: one row per mechanism, cell and seed (:func:`attn.compare.mqar.run_mqar`)
    mqar: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    def __post_init__(self) -> None:
        if not self.seeds:
            self.seeds = [self.seed]

    # ---------------------------------------------------------------- MQAR and the decision

    def mqar_table(self) -> pd.DataFrame:
        """MQAR accuracy at the point per mechanism, over seeds (:func:`attn.compare.decide.mqar_table`)."""
        from .decide import mqar_table

        return mqar_table(self)

    def grid_table(self) -> pd.DataFrame:
        """The MQAR grid (:func:`attn.compare.decide.grid_table`)."""
        from .decide import grid_table

        return grid_table(self)

    def decision_table(self) -> pd.DataFrame:
        """Recall, reach, cost class and implementation per mechanism (:func:`attn.compare.decide.decision_table`)."""
        from .decide import decision_table

        return decision_table(self)

    def decision_reading(self) -> str:
        """The paragraph that reads the decision table, generated from it."""
        from .decide import decision_reading

        return decision_reading(self)

    def zoology_claims(self, ledger: Any) -> list[Any]:
        """Zoology's finding as ledger claims (:func:`attn.compare.decide.zoology_claims`)."""
        from .decide import zoology_claims

        return zoology_claims(self, ledger)

    def plot_mqar(self) -> Any:
        """MQAR accuracy per mechanism and seed, one panel per family."""
        from .decide import plot_mqar

        return plot_mqar(self)

    def plot_grid(self) -> Any:
        """MQAR accuracy against pairs and against width."""
        from .decide import plot_grid

        return plot_grid(self)

    def plot_frontier(self) -> Any:
        """MQAR accuracy against FLOPs and peak memory at the trained length."""
        from .decide import plot_frontier

        return plot_frontier(self)

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

    def headline_table(self) -> pd.DataFrame:
        """The columns a reader needs to choose, narrow enough for the page's column.

        One row per mechanism on the shared task, in chapter order: ``ch`` (chapter); ``impl`` (``fused``:
        PyTorch's fused kernel, ``ops``: vectorised torch operations, ``loop``: a Python loop over blocks, as
        measured); the learning numbers, mean over seeds (MQAR: ``acc``, its range ``min-max`` and ``far``,
        the accuracy on the queries whose answer lies far; recall: ``acc``, ``far`` and ``steps`` to the
        target); ``FLOP``, ``mem`` and ``time``: the exponent ``p`` of cost ~ n^p over the sweep, time only
        where the work sets it (``overhead`` otherwise). :meth:`display_table` and :meth:`table` hold the rest.
        """
        t = self.table().loc[[r.name for r in self.sequence_results()]]
        out = pd.DataFrame(index=pd.Index(t.index, name="mechanism"))
        out["ch"] = t["chapter"]
        out["impl"] = t["implementation"].map(lambda v: _IMPL_SHORT.get(v, "") if isinstance(v, str) else "")
        out["acc"] = _fmt(t["accuracy"], ".2f")
        if self.task == "mqar":
            out["min-max"] = [
                "" if pd.isna(lo) or pd.isna(hi) else f"{float(lo):.2f}-{float(hi):.2f}"
                for lo, hi in zip(t["accuracy_min"], t["accuracy_max"], strict=True)
            ]
            out["far"] = _fmt(t["accuracy_far"], ".2f")
        else:
            out["far"] = _fmt(t["accuracy_far"], ".2f")
            out["steps"] = _steps(self.sequence_results(), t)
        out["FLOP"] = _fmt(t["flops_exponent"], ".2f")
        out["mem"] = _fmt(t["memory_exponent"], ".2f")
        out["time"] = _time_column(t)
        return out

    def csv_files(self) -> dict[str, str]:
        """``file name -> CSV text`` of the raw numbers: ``summary.csv`` (every column of :meth:`table`),
        ``sweep.csv`` (:meth:`sweep_frame`) and ``curves.csv`` (:meth:`curves_frame`), as :meth:`save`
        writes them."""
        files = {
            "summary.csv": self.table().to_csv(),
            "sweep.csv": self.sweep_frame().to_csv(index=False),
            "curves.csv": self.curves_frame().to_csv(index=False),
        }
        if len(self.mqar):
            files["runs.csv"] = self.runs_frame().to_csv(index=False)
        return files

    def runs_frame(self) -> pd.DataFrame:
        """Every learning run, one row per mechanism, task cell and seed (``runs.csv``): MQAR's grid and
        point, with the implementation and family of each mechanism; empty for the recall task."""
        if not len(self.mqar):
            return pd.DataFrame()
        runs = self.mqar.drop(columns=[c for c in ("probe", "history", "query_entropies") if c in self.mqar.columns])
        impl = {r.name: r.metrics.get("implementation") for r in self.results}
        runs.insert(2, "family", [family_of(int(c)) for c in runs["chapter"]])
        runs.insert(3, "implementation", [impl.get(n) for n in runs["name"]])
        return runs

    def download_links(self):
        """Links that download :meth:`csv_files` from the page itself (``data:`` URLs: no server, no file
        next to the page needed; they work offline and in Colab). Returns an ``IPython.display.HTML``."""
        import base64
        import html

        from IPython.display import HTML

        links = []
        for name, text in self.csv_files().items():
            data = base64.b64encode(text.encode()).decode()
            rows = text.count("\n") - 1
            links.append(f'<a download="{html.escape(name)}" href="data:text/csv;base64,{data}">'
                         f"{html.escape(name)}</a> ({rows} rows)")
        return HTML("Download the raw numbers as CSV: " + ", ".join(links) + ".")

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
        """A few sentences on what the numbers say, computed from the results (Markdown).

        MQAR: the paragraph that reads :meth:`decision_table`, then the mechanisms measured on their own
        tasks, the failures and the timing caveat; recall: :meth:`recall_reading`.
        """
        if self.task != "mqar":
            return self.recall_reading()
        lines = [self.decision_reading()]
        lines += self._own_and_failed_lines()
        lines.append("All timings come from one run on one machine: compare their ratios within the run and "
                     "within one implementation kind, not absolute times across runs.")
        return "\n\n".join(lines)

    def _own_and_failed_lines(self) -> list[str]:
        lines = []
        own = [r for r in self.own_results() if r.status == "ok"]
        if own:
            learned = [r for r in own if r.metrics.get("accuracy") is not None]
            lines.append(
                f"{len(own)} mechanisms with their own data (second table) are measured on cost"
                + (f"; {len(learned)} also trained on their own tasks." if learned else
                   " only: their learning is measured in their chapters, with seeds and ledger claims.")
            )
        return lines + self._hookless_and_failed_lines()

    def _hookless_and_failed_lines(self) -> list[str]:
        lines = []
        hookless = [r for r in self.own_results() if r.status == "own task"]
        if hookless:
            lines.append(
                "Registered without a task to measure them on: "
                + ", ".join(f"{r.name} (chapter {r.chapter}, {r.data} data)" for r in hookless) + "."
            )
        failed = [r for r in self.results if r.status == "error"]
        if failed:
            lines.append("Failed here: " + "; ".join(f"{r.name}: {'; '.join(r.notes)}" for r in failed) + ".")
        return lines

    def recall_reading(self) -> str:
        """The reading of a ``task="recall"`` run (the one-query floor), computed from the results (Markdown)."""
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
        lines += self._hookless_and_failed_lines()
        lines.append(
            "All timings come from one run on one machine: compare their ratios within the run, not absolute times across runs."
        )
        return "\n\n".join(lines)

    # ---------------------------------------------------------------- figures
    #
    # Thirty-odd mechanisms do not fit one legend (it squeezes the plot) nor ten colours: each figure is a
    # column of small multiples, one panel per family (:data:`FAMILIES`, parts of the book), every panel
    # drawing the other families in light grey for context and its own mechanisms in colour, each line
    # labelled directly at its end. Every figure is at most ``plotting.MAX_WIDTH_IN`` (7.5 in) wide.

    def families(self) -> dict[str, list[str]]:
        """``family -> names`` of the mechanisms on the shared task, in chapter order (see :data:`FAMILIES`)."""
        out: dict[str, list[str]] = {}
        for r in self.sequence_results():
            out.setdefault(family_of(r.chapter), []).append(r.name)
        return out

    def plot_curves(self, y: str = "loss"):
        """Training curves (``y``: ``loss`` or ``acc``), one panel per family, the others in grey, each line
        labelled at its end. Returns the figure (7.5 in wide, the panels stacked)."""
        curves = self.curves()
        if not curves:
            return _empty(None, "no training curves").figure
        groups = _grouped(self.families(), curves)
        fig, axes = _family_grid(len(groups), panel_height=2.4, sharex=True, sharey=True)
        pending = []
        for ax, (family, names) in zip(axes, groups.items(), strict=True):
            for name, df in curves.items():
                if name not in names:
                    ax.plot(df["step"], df[y], color=_GREY, lw=0.8, zorder=1)
            lines = [ax.plot(curves[n]["step"], curves[n][y], lw=1.3, zorder=2)[0] for n in names]
            _style_family(lines)
            ax.set_title(family, fontsize=10)
            ends = [(float(curves[n]["step"].iloc[-1]), float(curves[n][y].iloc[-1])) for n in names]
            pending.append((ax, ends, names, [line.get_color() for line in lines]))
        if y == "loss":
            axes[0].set_yscale("log")
        _finish_grid(axes, pending, "training step",
                     {"loss": "training loss", "acc": "training-batch accuracy"}.get(y, y))
        return fig

    def plot_sweep(self, y: str = "median_ms"):
        """Cost of the layer alone against sequence length, log-log, one panel per family, each line
        labelled with its mechanism and the fitted exponent ``p`` of cost ~ n^p. Returns the figure."""
        from matplotlib.ticker import NullFormatter

        from ..benchmark import fit_exponent

        df = self.sweep_frame("sequence")
        if len(df):
            df = df[df[y].astype(float) > 0]
            counts = df.groupby("name")["n"].transform("count")
            df = df[counts >= 2]
        if not len(df):
            return _empty(None, "no sweep with two or more lengths").figure
        per = {str(name): g for name, g in df.groupby("name", sort=False)}
        groups = _grouped(self.families(), per)
        ylabel = {"median_ms": "forward time (ms)", "peak_mib": "peak memory (MiB)",
                  "gflops": "GFLOP per forward"}.get(y, y)
        lengths = sorted(int(n) for n in df["n"].unique())
        fig, axes = _family_grid(len(groups), panel_height=2.4, sharex=True, sharey=True)
        pending = []
        for ax, (family, names) in zip(axes, groups.items(), strict=True):
            for name, g in per.items():
                if name not in names:
                    ax.plot(g["n"], g[y], color=_GREY, lw=0.8, zorder=1)
            lines = [ax.plot(per[n]["n"], per[n][y], "o-", ms=3, lw=1.3, zorder=2)[0] for n in names]
            _style_family(lines)
            ax.set_title(family, fontsize=10)
            ends = [(float(per[n]["n"].iloc[-1]), float(per[n][y].iloc[-1])) for n in names]
            labels = [f"{n} {fit_exponent(per[n]['n'], per[n][y]):.2f}" for n in names]
            pending.append((ax, ends, labels, [line.get_color() for line in lines]))
        axes[0].set_xscale("log")
        axes[0].set_yscale("log")
        axes[0].set_xticks(lengths, [str(n) for n in lengths])
        axes[0].xaxis.set_minor_formatter(NullFormatter())
        fig.suptitle(f"one layer, batch 1, width {self.preset.bench_embed}; each label: the mechanism and p "
                     "of cost ~ n^p", fontsize=10)
        _finish_grid(axes, pending, "sequence length n", ylabel)
        return fig

    def plot_accuracy_vs_cost(self, cost: str = "latency_ms"):
        """Held-out accuracy against the layer's cost at the fixed size (log x), one panel per family,
        each point labelled with its mechanism. Returns the figure."""
        t = self.table()
        t = t[(t["status"] == "ok") & (t["task"] == "associative recall")].dropna(subset=[cost, "accuracy"])
        if not len(t):
            return _empty(None, "nothing measured").figure
        points = {str(name): (float(r[cost]), float(r["accuracy"])) for name, r in t.iterrows()}
        groups = _grouped(self.families(), points)
        fig, axes = _family_grid(len(groups), panel_height=2.4, sharex=True, sharey=True)
        chance = 1.0 / self.preset.n_values
        pending = []
        for ax, (family, names) in zip(axes, groups.items(), strict=True):
            others = [pt for n, pt in points.items() if n not in names]
            if others:
                ax.scatter([x for x, _ in others], [a for _, a in others], s=16, color=_GREY, zorder=1)
            colours = [_family_colour(i) for i in range(len(names))]
            for i, name in enumerate(names):
                ax.scatter(*points[name], s=30, zorder=3, color=colours[i],
                           marker=_MARKERS[(i // len(_palette())) % len(_MARKERS)])
            ax.axhline(chance, color="0.5", ls=":", lw=1)
            ax.set_title(family, fontsize=10)
            pending.append((ax, [points[n] for n in names], names, colours))
        axes[0].set_xscale("log")
        axes[0].set_ylim(0, 1.05)
        axes[0].annotate("chance", (0.02, chance), xycoords=("axes fraction", "data"), fontsize=9, color="0.4",
                         textcoords="offset points", xytext=(0, 2))
        xlabel = {"latency_ms": f"forward time at {self.preset.bench_batch} x {self.preset.bench_n} tokens (ms)",
                  "peak_mib": "peak memory (MiB)", "gflops": "GFLOP per forward",
                  "params": "parameters"}.get(cost, cost)
        _finish_grid(axes, pending, xlabel, "held-out accuracy")
        return fig

    def plot_entropy(self):
        """Distribution of the query row's attention entropy (all layers and heads), one horizontal violin per
        mechanism, grouped and coloured by family, the names on the y axis. Returns the figure."""
        import matplotlib.pyplot as plt

        from .. import plotting

        data = {r.name: r.query_entropy.ravel() for r in self.sequence_results()
                if r.query_entropy is not None and r.query_entropy.size}
        if not data:
            return _empty(None, "no attention weights").figure
        groups = _grouped(self.families(), data)
        names = [n for members in groups.values() for n in members]
        family = {n: f for f, members in groups.items() for n in members}
        # one row of 0.25 in per mechanism: 10-pt names (0.14 in) never touch
        height = 1.1 + 0.25 * len(names)
        fig, ax = plt.subplots(figsize=(plotting.MAX_WIDTH_IN, height), constrained_layout=True)
        pos = list(range(len(names), 0, -1))  # first mechanism on top
        parts = ax.violinplot([data[n] for n in names], positions=pos, showmedians=True, widths=0.8,
                              **_horizontal())
        colours = {f: _palette()[i % len(_palette())] for i, f in enumerate(groups)}
        for body, name in zip(parts["bodies"], names, strict=True):
            body.set_facecolor(colours[family[name]])
            body.set_edgecolor(colours[family[name]])
            body.set_alpha(0.6)
        for key in ("cbars", "cmins", "cmaxes", "cmedians"):
            if key in parts:
                parts[key].set_color("0.3")
                parts[key].set_linewidth(0.8)
        ax.set_yticks(pos, names)
        ax.set_ylim(0.4, len(names) + 0.6)
        for label, name in zip(ax.get_yticklabels(), names, strict=True):
            label.set_color(colours[family[name]])
        uniform = math.log(self.preset.mqar_point.length if self.task == "mqar" else self.preset.seq_len)
        ax.axvline(uniform, color="0.5", ls=":", lw=1)
        ax.annotate("uniform", (uniform, 1.0), xycoords=("data", "axes fraction"), fontsize=9, color="0.4",
                    ha="right", va="bottom", textcoords="offset points", xytext=(-3, 2))
        ax.set_xlim(left=0)
        ax.set_xlabel("entropy of the query rows (nats), " + (
            "the head that weighs the answer most" if self.task == "mqar" else "all layers and heads"))
        ax.grid(axis="y", visible=False)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[f], alpha=0.6) for f in groups]
        fig.legend(handles, list(groups), loc="outside lower center", ncols=min(len(groups), 2), fontsize=10)
        return fig

    def explorer(self, examples: int | None = None):
        """An :class:`~attn.widgets.AttentionExplorer` over the trained models' attention.

        Sliders: the mechanism, the held-out example (and the layer when there
        are several). Left: the attention matrix averaged over heads, the query
        row highlighted; right: the query row of every head.
        """
        from ..widgets import AttentionExplorer

        # name -> (result, its probe weights (layers, k, H, n, n)), for the mechanisms that returned weights
        have = {r.name: (r, r.probe_weights) for r in self.results if r.probe_weights is not None}
        if not have:
            raise ValueError("no mechanism returned attention weights to explore")
        k = min(pw.shape[1] for _, pw in have.values())
        k = k if examples is None else min(k, examples)
        layers = min(pw.shape[0] for _, pw in have.values())
        view = self._mqar_view(have) if self.task == "mqar" else self._recall_view(have)
        sliders: dict[str, list[Any]] = {"mechanism": list(have), "example": list(range(k))}
        if layers > 1:
            sliders["layer"] = list(range(layers))
        from ..registry import chapter

        titles = {name: f"{name}: {chapter(r.chapter).title} (ch. {r.chapter})" for name, (r, _) in have.items()}
        return AttentionExplorer(
            view, sliders, initial={"mechanism": next(iter(have)), "example": 0},
            title="Trained models on held-out " + ("MQAR sequences" if self.task == "mqar" else "recall queries"),
            value_labels={"mechanism": titles},
        )

    def _recall_view(self, have: dict[str, tuple[MechanismResult, Any]]) -> Callable[..., Any]:
        from ..core import entropy
        from ..widgets import Panel, View

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

        return view

    def _mqar_view(self, have: dict[str, tuple[MechanismResult, Any]]) -> Callable[..., Any]:
        from ..core import entropy
        from ..widgets import Panel, View

        task = self.preset.mqar_point.task()

        def labels(r: MechanismResult, b: int) -> list[str]:
            xs, src = r.probe["x"][b].tolist(), r.probe["source"][b].tolist()
            out = []
            for t, tok in enumerate(xs):
                if tok == 0:
                    out.append(".")
                elif src[t] >= 0:
                    out.append(f"q{tok}")
                elif tok <= task.n_keys:
                    out.append(f"k{tok}")
                else:
                    out.append(f"v{tok - task.n_keys}")
            return out

        def view(mechanism: str, example: int, layer: int = 0) -> View:
            r, probe_weights = have[mechanism]
            w = probe_weights[layer, example]  # (H, n, n)
            lab = labels(r, example)
            src = r.probe["source"][example]
            q = int((src >= 0).nonzero()[0])  # the first query of the example
            answer = int(src[q])
            lab[answer] += "*"
            ok = int(r.probe["pred"][example, q]) == int(r.probe["y"][example, q])
            return View(
                [
                    Panel(w.mean(0), rows=lab, cols=lab, highlight_row=q,
                          title=f"{mechanism}: layer {layer}, mean over {w.shape[0]} head(s)"),
                    Panel(w[:, q], rows=[f"head {h}" for h in range(w.shape[0])], cols=lab,
                          title=f"row of the query {lab[q]}, per head"),
                ],
                caption=(
                    f"k = key, v = value, q = query, . = filler; * marks the value the highlighted query asks for. "
                    f"Its row: weight on the answer {float(w[:, q, answer].mean()):.2f} (mean over heads), entropy "
                    f"{float(entropy(w[:, q]).mean()):.2f} nats; prediction {'correct' if ok else 'wrong'}."
                ),
            )

        return view

    # ---------------------------------------------------------------- files

    def to_json(self) -> dict[str, Any]:
        return _clean(
            {
                "meta": {
                    "seed": self.seed,
                    "seeds": list(self.seeds),
                    "task": self.task,
                    "device": self.device,
                    "preset": dataclasses.asdict(self.preset),
                    "torch": torch.__version__,
                    "wall_s": round(self.wall_s, 2),
                    "columns": list(TABLE_COLUMNS),
                },
                "results": [r.to_json() for r in self.results],
                "runs": self.runs_frame().to_dict(orient="records") if len(self.mqar) else [],
            }
        )

    def save(self, out_dir: str | Path, figures: bool = True) -> list[Path]:
        """Write ``summary.csv`` (per mechanism, aggregated over seeds), ``runs.csv`` (MQAR: per mechanism, cell
        and seed), ``sweep.csv``, ``curves.csv``, ``results.json`` and PNG figures."""
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
        if len(self.mqar):
            path = out / "runs.csv"
            self.runs_frame().to_csv(path, index=False)
            written.append(path)
        path = out / "results.json"
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        written.append(path)
        if figures:
            written += self.save_figures(out)
        return written

    def save_figures(self, out_dir: str | Path) -> list[Path]:
        """The report's figures as PNG files (each at most 7.5 in wide), for the command line."""
        import matplotlib.pyplot as plt

        from .. import plotting

        out = Path(out_dir)
        written = []
        plots: dict[str, Callable[[], Any]] = {
            "loss_curves.png": self.plot_curves,
            "sweep_time.png": lambda: self.plot_sweep("median_ms"),
            "sweep_memory.png": lambda: self.plot_sweep("peak_mib"),
            "accuracy_vs_cost.png": self.plot_accuracy_vs_cost,
            "entropy.png": self.plot_entropy,
        }
        if len(self.mqar):
            plots.update({"mqar.png": self.plot_mqar, "mqar_grid.png": self.plot_grid,
                          "frontier.png": self.plot_frontier})
        with plt.rc_context():
            plotting.use_style()
            for fname, plot in plots.items():
                fig = plot()
                fig.savefig(out / fname, dpi=150)
                plt.close(fig)
                written.append(out / fname)
        return written


_IMPL_SHORT = {"fused": "fused", "torch ops": "ops", "python loop": "loop"}


def _fmt(series: pd.Series, spec: str) -> pd.Series:
    """Numbers formatted with ``spec``; missing values as empty strings."""
    return series.map(lambda v: "" if pd.isna(v) else format(float(v), spec))


def _cost_columns(out: pd.DataFrame, t: pd.DataFrame, size: str) -> None:
    """The cost columns both tables share: parameters, GFLOP, ms, MiB and the fitted exponents in ``size``."""
    out["params"] = t["params"].map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
    out["GFLOP"] = _fmt(t["gflops"], ".3g")
    out["ms"] = _fmt(t["latency_ms"], ".3g")
    out["MiB"] = _fmt(t["peak_mib"], ".3g")
    out[f"time ~{size}^p"] = _time_column(t)
    for col, label in (("memory_exponent", "mem"), ("flops_exponent", "FLOP")):
        out[f"{label} ~{size}^p"] = _fmt(t[col], ".2f")


def _time_column(t: pd.DataFrame) -> list[str]:
    """The fitted time exponent, or why there is none ("overhead", "noisy")."""
    return [
        "overhead" if fit == "overhead" else "noisy" if isinstance(fit, str) and fit.startswith("noisy")
        else "" if pd.isna(p) else f"{float(p):.2f}"
        for p, fit in zip(t["time_exponent"], t["time_fit"], strict=True)
    ]


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
_GREY = "0.85"

#: The comparison's families: the book's parts (``attn.registry.PARTS``), the small ones merged so that
#: each panel of a figure holds a handful of mechanisms. A part not listed here is a family of its own.
FAMILIES: dict[str, str] = {
    "Foundations": "Foundations",
    "Masks and directions": "Foundations",
    "Long inputs": "Long inputs",
    "Memory and recurrence": "Memory, structure, training",
    "Beyond sequences": "Memory, structure, training",
    "Training signals": "Memory, structure, training",
    "Attention today": "Attention today",
}


def family_of(chapter: int) -> str:
    """The family of the mechanism of ``chapter`` (:data:`FAMILIES` of its part), with its chapter range."""
    from ..registry import PARTS, part_of

    try:
        name = FAMILIES.get(part_of(chapter), part_of(chapter))
    except KeyError:
        return "Other"
    numbers = [n for caption, ns in PARTS for n in ns if FAMILIES.get(caption, caption) == name]
    return f"{name} (ch. {min(numbers)}-{max(numbers)})" if len(numbers) > 1 else f"{name} (ch. {numbers[0]})"


def _palette() -> list[str]:
    """The book's palette less its grey, which would read as the other families' context lines."""
    from ..plotting import PALETTE

    return [c for c in PALETTE if c != "#8c8c8c"]


def _family_colour(i: int) -> str:
    return _palette()[i % len(_palette())]


def _grouped(families: dict[str, list[str]], have: Iterable[str]) -> dict[str, list[str]]:
    """``families`` restricted to the names in ``have``, empty families dropped."""
    keep = set(have)
    out = {f: [n for n in names if n in keep] for f, names in families.items()}
    return {f: names for f, names in out.items() if names}


def _family_grid(n: int, panel_height: float, sharex: bool = False, sharey: bool = False):
    """``n`` panels stacked, each as wide as the page column (``plotting.MAX_WIDTH_IN``): the direct labels
    take the right inch and a half, and the plot keeps the rest."""
    from .. import plotting

    return plotting.panels(n, ncols=1, panel_width=plotting.MAX_WIDTH_IN, panel_height=panel_height,
                           sharex=sharex, sharey=sharey)


def _style_family(lines) -> None:
    """A colour per mechanism of a family; past the palette's 8 colours, line styles and markers vary too."""
    for i, line in enumerate(lines):
        k = (i // len(_palette())) % len(_LINESTYLES)
        line.set_color(_family_colour(i))
        line.set_linestyle(_LINESTYLES[k])
        if line.get_marker() not in (None, "None", ""):
            line.set_marker(_MARKERS[k])


def _horizontal() -> dict[str, Any]:
    """The violin plot's keyword for horizontal violins: ``orientation`` from matplotlib 3.10 (``vert`` is
    deprecated there), ``vert=False`` before."""
    import matplotlib

    major, minor = (int(v) for v in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def _finish_grid(axes, pending, xlabel: str, ylabel: str) -> None:
    """Axis names on the outer panels (tick labels on every panel), then the direct labels, once the shared
    limits are final."""
    for ax in axes:
        ax.tick_params(labelbottom=True, labelleft=True)
    axes[-1].set_xlabel(xlabel)
    for ax in axes:
        ax.set_ylabel(ylabel)
    for ax in axes:
        ax.autoscale_view()
    engine = axes[0].figure.get_layout_engine()
    if engine is not None:  # lay out first: the labels are spaced by the panels' final height
        engine.execute(axes[0].figure)
    for ax, ends, labels, colours in pending:
        _label_ends(ax, ends, labels, colours)


def _spread(ys: list[float], gap: float) -> list[float]:
    """Positions for labels wanted at the ascending ``ys`` (axes fraction): at least ``gap`` apart, kept in
    ``[0, 1]`` while they fit, each as near its wish as that allows."""
    out: list[float] = []
    for y in ys:
        out.append(max(y, out[-1] + gap) if out else max(y, 0.0))
    if out and out[-1] > 1.0:
        top = 1.0
        for k in range(len(out) - 1, -1, -1):  # push down from the top, no lower than wished-for minus slack
            out[k] = min(out[k], top)
            top = out[k] - gap
        for k in range(1, len(out)):  # where that crossed 0, stack upwards again
            out[k] = max(out[k], out[k - 1] + gap)
    return out


def _label_ends(ax, ends: list[tuple[float, float]], labels: list[str], colours: list[str], fontsize: float = 9) -> None:
    """Label each point of ``ends`` (data coordinates: a line's last point, a scatter point) by name, in a
    column just right of the axes, spread so that no two labels touch, with a thin leader to the point."""
    if not ends:
        return
    to_axes = ax.transAxes.inverted()
    ys = [float(to_axes.transform(ax.transData.transform(pt))[1]) for pt in ends]
    ys = [min(max(y, 0.0), 1.0) for y in ys]
    height_pt = ax.get_position().height * ax.figure.get_figheight() * 72
    gap = 1.45 * fontsize / max(height_pt, 1.0)
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    for i, y in zip(order, _spread([ys[i] for i in order], gap), strict=True):
        ax.annotate(labels[i], xy=ends[i], xycoords="data", xytext=(1.03, y), textcoords="axes fraction",
                    ha="left", va="center", fontsize=fontsize, color=colours[i], annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": colours[i], "lw": 0.5, "alpha": 0.7,
                                "shrinkA": 0, "shrinkB": 2})


def _empty(ax, text: str):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_axis_off()
    return ax
