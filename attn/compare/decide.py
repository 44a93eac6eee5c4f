"""What the comparison decides: MQAR tables over seeds, the grid, the frontier, the decision table and its reading.

Every function takes a :class:`~attn.compare.report.Comparison` run with ``task="mqar"`` and reads its
``mqar`` frame (one row per mechanism, cell and seed) and its cost results. Rankings use the evidence
ledger's rule (:mod:`attn.evidence`): two mechanisms are ordered only where their ranges over seeds are
disjoint; otherwise the table says "no separation".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..evidence import Claim, Ledger, describe
from .mqar import MQARCell

if TYPE_CHECKING:
    from .report import Comparison

__all__ = [
    "REFERENCE", "VERSUS_TOLERANCE", "point_runs", "cell_values", "mqar_table", "grid_table", "decision_table", "decision_reading",
    "zoology_claims", "cost_class", "plot_mqar", "plot_grid", "plot_frontier",
]

#: the mechanism every other is compared with: full softmax attention, multi-head (chapter 3)
REFERENCE = "multihead"
#: accuracy ranges closer than this count as "no separation" in the decision table (rounding-level gaps between
#: two mechanisms at ceiling are not a ranking)
VERSUS_TOLERANCE = 0.02

_SHORT_VERDICT = {"no separation": "no sep."}


def point_runs(cmp: Comparison) -> pd.DataFrame:
    """The rows of the MQAR point (every sequence mechanism, every seed) that trained without error."""
    runs = cmp.mqar
    if not len(runs):
        return runs
    c = cmp.preset.mqar_point
    keep = (runs["pairs"] == c.pairs) & (runs["width"] == c.width) & (runs["seq_len"] == c.length)
    return runs[keep & (runs["status"] == "ok")]


def cell_values(cmp: Comparison, name: str, cell: MQARCell, column: str = "acc") -> list[float]:
    """One value per seed of ``column`` for ``name`` on ``cell`` (empty when it was not run)."""
    runs = cmp.mqar
    if not len(runs):
        return []
    mine = runs[(runs["name"] == name) & (runs["pairs"] == cell.pairs) & (runs["width"] == cell.width)
                & (runs["seq_len"] == cell.length) & (runs["status"] == "ok")]
    return [float(v) for v in mine.sort_values("seed")[column]]


def _versus(values: Sequence[float], reference: Sequence[float], name: str) -> str:
    """``"higher"``, ``"lower"`` or ``"no separation"`` against the reference, by the ledger's disjoint rule."""
    from ..evidence import MIN_SEEDS

    if name == REFERENCE:
        return ""
    if len(values) < MIN_SEEDS or len(reference) < MIN_SEEDS:
        return f"n/a (< {MIN_SEEDS} seeds)"
    rel = Claim(24, f"{name} against {REFERENCE}", metric="acc", arms={name: list(values), REFERENCE: list(reference)},
                expect=f"{name} ? {REFERENCE}", tolerance=VERSUS_TOLERANCE).separation()
    return {">": "higher", "<": "lower"}.get(rel, "no separation")


def mqar_table(cmp: Comparison) -> pd.DataFrame:
    """Accuracy at the MQAR point per mechanism: mean, range and seeds; near and far; against softmax.

    ``vs softmax`` compares the mechanism's accuracies over seeds with multi-head attention's by the
    ledger's disjoint rule: ``lower`` / ``higher`` only when the ranges lie more than
    :data:`VERSUS_TOLERANCE` apart.
    """
    runs = point_runs(cmp)
    if not len(runs):
        return pd.DataFrame()
    ref = list(runs[runs["name"] == REFERENCE].sort_values("seed")["acc"])
    rows = []
    for name, g in runs.groupby("name", sort=False):
        acc = list(g.sort_values("seed")["acc"])
        rows.append({
            "mechanism": name, "ch": int(g["chapter"].iloc[0]),
            "accuracy": describe(acc, digits=2),
            "near": f"{g['acc_near'].mean():.2f}", "far": f"{g['acc_far'].mean():.2f}",
            "vs softmax": _versus(acc, ref, str(name)),
        })
    return pd.DataFrame(rows).set_index("mechanism")


def grid_table(cmp: Comparison) -> pd.DataFrame:
    """The grid: mean (range) accuracy per mechanism and cell, for the mechanisms with more than one cell."""
    runs = cmp.mqar
    if not len(runs):
        return pd.DataFrame()
    ok = runs[runs["status"] == "ok"]
    cells = ok.groupby("name")["pairs"].transform("size") // ok.groupby("name")["seed"].transform("nunique")
    ok = ok[cells > 1]
    if not len(ok):
        return pd.DataFrame()
    rows = []
    for (name, pairs, width, n), g in ok.groupby(["name", "pairs", "width", "seq_len"], sort=False):
        rows.append({"mechanism": name, "pairs": int(pairs), "width": int(width), "n": int(n),
                     "steps": int(g["steps"].iloc[0]), "accuracy": describe(list(g["acc"]), digits=2),
                     "mean": float(g["acc"].mean())})
    return pd.DataFrame(rows)


def tail_exponent(sweep: pd.DataFrame, column: str) -> float | None:
    """The growth exponent between the sweep's two largest lengths: the closest to the asymptotic class
    (over the whole sweep, the projections' ``n E^2`` still pull a quadratic mechanism's fit below 2)."""
    if len(sweep) < 2:
        return None
    last = sweep.sort_values("n").iloc[-2:]
    a, b = (float(v) for v in last[column])
    n0, n1 = (float(v) for v in last["n"])
    if a <= 0 or b <= 0:
        return None
    import math

    return math.log(b / a) / math.log(n1 / n0)


def cost_class(exponent: Any) -> str:
    """``"~n"`` (below 1.3), ``"~n^1.5"`` (below 1.6) or ``"~n^2"`` from a growth exponent (empty when missing)."""
    if exponent is None or pd.isna(exponent):
        return ""
    p = float(exponent)
    return "~n" if p < 1.3 else "~n^1.5" if p < 1.6 else "~n^2"


def decision_table(cmp: Comparison) -> pd.DataFrame:
    """One row per sequence mechanism: recall (MQAR) and reach, FLOP and memory class, implementation.

    ``recall``: MQAR accuracy at the point, mean (min-max over the seeds); ``vs softmax``: the ledger's
    disjoint rule against multi-head attention (``lower``, ``higher``, ``no sep.``: no separation); ``near`` / ``far``: accuracy on the queries whose answer lies nearer /
    farther than the median distance; ``FLOPs`` and ``memory``: how one forward's FLOPs and peak memory grow
    between the sweep's two largest lengths (:func:`tail_exponent`; ``~n``, ``~n^1.5``, ``~n^2``; the
    memory class is the implementation's);
    ``implementation``: measured (:func:`~attn.compare.cost.implementation_kind`); ``ms``: one forward at the
    sweep's fixed size, comparable only within an implementation kind.
    """
    mq = mqar_table(cmp)
    point = point_runs(cmp)
    rows = []
    for r in cmp.sequence_results():
        if r.status != "ok" or r.name not in mq.index:
            continue
        m = r.metrics
        ms = m.get("latency_ms")
        accs = point[point["name"] == r.name]["acc"]
        rows.append({
            "mechanism": r.name, "ch": r.chapter,
            "recall": f"{accs.mean():.2f} ({accs.min():.2f}-{accs.max():.2f})",
            "vs softmax": _SHORT_VERDICT.get(mq.loc[r.name, "vs softmax"], mq.loc[r.name, "vs softmax"]),
            "near": mq.loc[r.name, "near"], "far": mq.loc[r.name, "far"],
            "FLOPs": cost_class(tail_exponent(r.sweep, "gflops")),
            "memory": cost_class(tail_exponent(r.sweep, "peak_mib")),
            "implementation": m.get("implementation") or "",
            "ms": "" if ms is None or pd.isna(ms) else f"{float(ms):.3g}",
        })
    return pd.DataFrame(rows).set_index("mechanism") if rows else pd.DataFrame()


def _join(names: Sequence[str]) -> str:
    names = [f"**{n}**" for n in names]
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def decision_reading(cmp: Comparison) -> str:
    """The paragraph that reads :func:`decision_table`, generated from it (Markdown)."""
    d = decision_table(cmp)
    if not len(d):
        return "No mechanism was trained on MQAR in this run."
    p = cmp.preset
    c = p.mqar_point
    refs = point_runs(cmp)
    refs = refs[refs["name"] == REFERENCE]["acc"]
    ref = (f"a mean of {refs.mean():.2f} of the queries (min-max over the seeds {refs.min():.2f}-{refs.max():.2f})"
           if len(refs) else "(not run)")
    level = d[d["vs softmax"].isin(["no sep.", ""])]
    below = d[d["vs softmax"] == "lower"]
    sub = level[level["FLOPs"].isin(["~n", "~n^1.5"])]
    fused = level[level["implementation"] == "fused"]
    others = [n for n in level.index if n != REFERENCE]
    first = (f"On MQAR with {c.pairs} pairs in {c.length} tokens at width {c.width} ({len(cmp.seeds)} seeds), "
             f"multi-head softmax attention recalls {ref}.")
    if others:
        first += f" Not separated from it ({len(others)}): {_join(others)}."
    if len(below):
        first += f" Lower, with ranges disjoint from softmax's ({len(below)}): {_join(list(below.index))}."
    undecided = d[d["vs softmax"].str.startswith("n/a")]
    if len(undecided):
        first += f" Too few seeds to rank: {_join(list(undecided.index))}."
    lines = [first]
    sub = sub[[n != REFERENCE for n in sub.index]]
    if len(sub):
        lines.append(
            f"Of the mechanisms that recall as well as softmax, {_join(list(sub.index))} "
            f"{'has' if len(sub) == 1 else 'have'} FLOPs growing slower than n^2 over the sweep "
            f"(n = {min(p.sweep_lengths)}..{max(p.sweep_lengths)}): the candidates when n is what limits you.")
    elif others:
        lines.append("None of the mechanisms that recall as well as softmax has FLOPs growing slower than n^2.")
    lines += _grid_caveats(cmp, list(sub.index))
    if len(fused):
        lines.append(
            f"Of the mechanisms not separated from softmax, {_join(list(fused.index))} "
            f"{'runs' if len(fused) == 1 else 'run'} through PyTorch's fused kernel: their peak memory is the "
            "kernel's, and their time compares with each other, not with the Python-loop references.")
    far_gap = below[(below["near"].astype(float) - below["far"].astype(float)) > 0.1]
    if len(far_gap):
        lines.append(
            f"Reach explains part of the losses: {_join(list(far_gap.index))} answer the queries whose key is near "
            "more often than those whose key is far, as a pattern that hides distant keys predicts.")
    loops = d[d["implementation"] == "python loop"]
    if len(loops):
        lines.append(
            f"{_join(list(loops.index))} run as Python loops over blocks here: their wall-clock time measures "
            "the loop, so read their FLOPs and memory, not their milliseconds.")
    return " ".join(lines)


def _grid_caveats(cmp: Comparison, names: Sequence[str]) -> list[str]:
    """For each candidate that the grid also trained, the larger cells where it recalls less than softmax."""
    runs = cmp.mqar
    if not len(runs):
        return []
    point = cmp.preset.mqar_point
    out = []
    for name in names:
        worse = []
        for cell in cmp.preset.mqar_cells(name):
            mine, ref = cell_values(cmp, name, cell), cell_values(cmp, REFERENCE, cell)
            if len(mine) >= 3 and len(ref) >= 3 and _versus(mine, ref, name) == "lower":
                worse.append(f"{cell.pairs} pairs at width {cell.width} ({describe(mine, digits=2)} against "
                             f"softmax's {describe(ref, digits=2)})")
        if worse:
            out.append(f"But the grid trained **{name}** on more pairs, and there it recalls less than softmax: "
                       + "; ".join(worse) + f". At {point.pairs} pairs its state still holds them all.")
    return out


# ------------------------------------------------------------------------------------------ claims
def zoology_claims(cmp: Comparison, ledger: Ledger) -> list[Claim]:
    """The ledger claims for Zoology's finding (Arora et al. 2023), from the grid and the point.

    Registered only where both arms were run (a preset without the grid's cells adds none). Each claim
    compares accuracies over the same seeds and batches, so the verdict is the ledger's disjoint rule.
    """
    p = cmp.preset
    point = p.mqar_point
    steps = {c: p.mqar_steps_for(c) for c in (point, *[c for _, cs in p.mqar_grid for c in cs])}

    def cell(pairs: int, width: int) -> MQARCell:
        return MQARCell(pairs, width, point.seq_len if pairs == point.pairs else None, point.vocab)

    def arm(name: str, c: MQARCell) -> list[float]:
        return cell_values(cmp, name, c)

    def note(*cells: MQARCell) -> str:
        parts = [f"{c.pairs} pairs in {c.length} tokens, width {c.width}, {steps.get(c, p.mqar_steps)} steps"
                 for c in dict.fromkeys(cells)]
        return (f"{'; '.join(parts)}; batch {p.mqar_batch}, {len(cmp.seeds)} seeds, the same seeds and batches "
                "for every arm; held-out accuracy at the query positions")

    out: list[Claim] = []

    def add(text: str, arms: dict[str, list[float]], expect: str, cells: Sequence[MQARCell], **kw: Any) -> None:
        if all(len(v) >= 3 for v in arms.values()):
            out.append(ledger.claim(text, metric="MQAR accuracy", arms=arms, expect=expect, note=note(*cells), **kw))

    w = point.width
    small, mid, big = cell(point.pairs, w), cell(2 * point.pairs, w), cell(4 * point.pairs, w)
    p_small, p_mid, p_big = small.pairs, mid.pairs, big.pairs
    add(f"Softmax attention recalls as well at {p_big} pairs as at {p_small} (it solves MQAR at every size tried "
        "here)",
        {f"multihead, {p_big} pairs": arm(REFERENCE, big), f"multihead, {p_small} pairs": arm(REFERENCE, small)},
        f"multihead, {p_big} pairs ~ multihead, {p_small} pairs", [big, small], tolerance=0.05)
    add(f"At {p_mid} pairs and the same width, softmax attention recalls better than linear attention",
        {"multihead": arm(REFERENCE, mid), "linear": arm("linear", mid)}, "multihead > linear", [mid])
    add(f"At width {w}, linear attention recalls {p_small} pairs better than {p_mid} (a fixed state fills up)",
        {f"linear, {p_small} pairs": arm("linear", small), f"linear, {p_mid} pairs": arm("linear", mid)},
        f"linear, {p_small} pairs > linear, {p_mid} pairs", [small, mid])
    wide = cell(p_mid, 2 * w)
    add(f"At {p_mid} pairs, linear attention needs a wider model: width {2 * w} recalls better than width {w}",
        {f"linear, width {2 * w}": arm("linear", wide), f"linear, width {w}": arm("linear", mid)},
        f"linear, width {2 * w} > linear, width {w}", [wide, mid])
    fnet_wide = cell(p_mid, 4 * w)
    add(f"FNet's fixed Fourier mixing does not recall: at {p_mid} pairs, FNet at width {4 * w} stays below "
        f"softmax attention at width {w}",
        {"multihead": arm(REFERENCE, mid), f"fnet, width {4 * w}": arm("fnet", fnet_wide)},
        f"multihead > fnet, width {4 * w}", [mid, fnet_wide])
    add(f"A window of 8 tokens (2 layers) recalls {p_small} pairs better than {p_mid}: it fails once the keys "
        "fall outside its reach",
        {f"local, {p_small} pairs": arm("local", small), f"local, {p_mid} pairs": arm("local", mid)},
        f"local, {p_small} pairs > local, {p_mid} pairs", [small, mid])
    add(f"Two layers of Child et al.'s fixed pattern reach every key through its summary columns: at {p_mid} "
        "pairs it recalls as well as full attention",
        {"sparse-fixed": arm("sparse-fixed", mid), "multihead": arm(REFERENCE, mid)},
        "sparse-fixed ~ multihead", [mid], tolerance=0.03)
    return out


# ------------------------------------------------------------------------------------------ figures
def plot_mqar(cmp: Comparison) -> Any:
    """MQAR accuracy at the point, one dot per seed and a bar at the mean, one panel per family."""
    import matplotlib.pyplot as plt

    from .. import plotting
    from .report import _palette

    runs = point_runs(cmp)
    fams = cmp.families()
    fams = {f: [n for n in names if n in set(runs["name"])] for f, names in fams.items()}
    fams = {f: names for f, names in fams.items() if names}
    rows = sum(len(v) for v in fams.values())
    fig, axes = plt.subplots(len(fams), 1, figsize=(plotting.MAX_WIDTH_IN, 0.9 + 0.27 * rows + 0.45 * len(fams)),
                             sharex=True, constrained_layout=True,
                             gridspec_kw={"height_ratios": [len(v) for v in fams.values()]})
    axes = [axes] if len(fams) == 1 else list(axes)
    chance = 1 / cmp.preset.mqar_point.task().n_values
    for i, (ax, (family, names)) in enumerate(zip(axes, fams.items(), strict=True)):
        colour = _palette()[i % len(_palette())]
        for j, name in enumerate(names):
            acc = runs[runs["name"] == name]["acc"]
            y = len(names) - 1 - j
            ax.plot([acc.min(), acc.max()], [y, y], color=colour, lw=2, alpha=0.5)
            ax.plot(acc, [y] * len(acc), "o", color=colour, ms=4)
            ax.plot([acc.mean()], [y], "|", color="0.2", ms=10, mew=1.5)
        ax.set_yticks(range(len(names)), list(reversed(names)))
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.axvline(chance, color="0.5", ls=":", lw=1)
        ax.set_title(family, fontsize=10, loc="left")
        ax.grid(axis="y", visible=False)
    axes[-1].set_xlim(0, 1.02)
    c = cmp.preset.mqar_point
    axes[-1].set_xlabel(f"MQAR accuracy ({c.pairs} pairs, width {c.width}): dots = seeds, | = mean, "
                        "dotted = chance")
    return fig


def plot_grid(cmp: Comparison) -> Any:
    """Accuracy against the number of pairs (at the point's width) and against the width (at 16 pairs), for
    the mechanisms run on more than one cell; mean and range over seeds."""
    from .. import plotting

    g = grid_table(cmp)
    runs = cmp.mqar[cmp.mqar["status"] == "ok"] if len(cmp.mqar) else cmp.mqar
    fig, axes = plotting.panels(2, panel_width=3.6, panel_height=2.8)
    if not len(g):
        for ax in axes:
            ax.text(0.5, 0.5, "no grid in this preset", ha="center", va="center", transform=ax.transAxes)
        return fig
    width0 = cmp.preset.mqar_point.width
    names = list(dict.fromkeys(g["mechanism"]))
    for name in names:
        mine = runs[runs["name"] == name]
        by_pairs = mine[mine["width"] == width0].groupby("pairs")["acc"].agg(["mean", "min", "max"])
        if len(by_pairs) > 1:
            line = axes[0].plot(by_pairs.index, by_pairs["mean"], "o-", label=name)[0]
            axes[0].fill_between(by_pairs.index, by_pairs["min"], by_pairs["max"], color=line.get_color(), alpha=0.2)
        top = mine["pairs"].max()
        by_width = mine[mine["pairs"] == top].groupby("width")["acc"].agg(["mean", "min", "max"])
        if len(by_width) > 1:
            line = axes[1].plot(by_width.index, by_width["mean"], "o-", label=f"{name}, {top} pairs")[0]
            axes[1].fill_between(by_width.index, by_width["min"], by_width["max"], color=line.get_color(), alpha=0.2)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel(f"key-value pairs (width {width0})")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("model width")
    for ax in axes:
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("MQAR accuracy")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def plot_frontier(cmp: Comparison) -> Any:
    """MQAR accuracy against one layer's FLOPs and peak memory at the length and width it was trained on.

    Every mechanism is a dot coloured by family; the names shown are those on the frontier (no other mechanism
    is both cheaper and at least as accurate) and those that recall less than softmax attention; the decision
    table names the rest. FLOPs are ``FlopCounterMode``'s (matrix products: FNet's FFTs count nothing and it
    is left out of that panel).
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .. import plotting
    from .report import _palette

    runs = point_runs(cmp)
    fig, axes = plotting.panels(2, panel_width=3.6, panel_height=3.0)
    acc = runs.groupby("name", sort=False)["acc"].mean()
    ref = float(acc.get(REFERENCE, acc.max())) if len(acc) else 1.0
    colour = {n: _palette()[i % len(_palette())] for i, names in enumerate(cmp.families().values()) for n in names}
    c = cmp.preset.mqar_point
    panels = (("task_gflops", 1e6, "kFLOP"), ("task_peak_kib", 1.0, "peak KiB"))
    for ax, (key, scale, label) in zip(axes, panels, strict=True):
        pts = []
        for r in cmp.sequence_results():
            x = r.metrics.get(key)
            if r.name in acc.index and x is not None and not pd.isna(x) and float(x) > 0:
                pts.append((r.name, float(x) * scale, float(acc[r.name])))
        best = -1.0
        shown = set()
        for name, _x, y in sorted(pts, key=lambda t: (t[1], -t[2])):
            if y > best + 1e-9:  # the frontier: more accurate than every cheaper mechanism
                shown.add(name)
                best = y
        shown |= {name for name, _x, y in pts if y < ref - VERSUS_TOLERANCE}
        for name, x, y in pts:
            ax.plot(x, y, "o", color=colour.get(name, "0.5"), ms=5, alpha=0.9)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{label} of one layer (n = {c.length}, width {c.width})")
        ax.set_ylabel("MQAR accuracy (mean of seeds)")
        ax.set_ylim(0, 1.05)
        _label_points(ax, [(n, x, y) for n, x, y in pts if n in shown])
    return fig


def _label_points(ax: Any, pts: list[tuple[str, float, float]]) -> None:
    """Name each point beside it, moving a label down (in steps of its height) while it would cover another."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the limits and the transforms
    placed: list[Any] = []
    for name, x, y in sorted(pts, key=lambda t: -t[2]):
        for step in range(6):
            text = ax.annotate(name, (x, y), fontsize=7, xytext=(4, -3 - 9 * step), textcoords="offset points")
            box = text.get_window_extent(renderer=fig.canvas.get_renderer())
            if not any(box.overlaps(other) for other in placed) or step == 5:
                placed.append(box)
                break
            text.remove()
