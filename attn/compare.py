r"""The comparison: every registered mechanism measured on the same axes.

``python -m attn compare`` and the book's comparison chapter both call
:func:`run`. For each registered mechanism whose ``build(embed_dim, num_heads)``
gives a token-mixing layer, it measures

* **cost of the layer alone**: parameters; FLOPs of one forward
  (:func:`attn.benchmark.count_flops`); median latency and peak memory of one
  forward at a fixed size; and a sweep over sequence lengths with the fitted
  growth exponent ``p`` of ``cost ~ n^p`` for time, memory and FLOPs
  (:func:`attn.benchmark.sweep`, :func:`attn.benchmark.exponents`);
* **what it learns**: the same small model (:class:`PositionalRecallModel`:
  pair embeddings + learned positions + ``layers`` pre-norm residual
  attention layers + a readout at the query) trained on the same batches of
  the same task (:class:`attn.tasks.AssociativeRecall`) for the same budget:
  held-out accuracy, accuracy when the answer is far from the query,
  convergence (first logged step whose training accuracy reaches a target),
  the loss curve;
* **how it attends**: the entropy of the query's attention row per head
  (``need_weights=True`` on a held-out batch) and the weight it puts on the
  pair that holds the answer.

The task is associative recall with the query at the **end** of the sequence
and the matching pair anywhere before it, uniformly: a mechanism that cannot
reach far (a window, a fixed sparse pattern) can only answer when the pair
happens to lie within its reach, which the ``acc_far`` column shows.

Mechanisms whose ``build`` is ``None`` or whose ``data`` is not
``"sequence"`` work on their own kind of input (graphs, images, sets, pairs):
they appear in the table as *own task, see chapter N*, with no numbers.

Everything that is learned is seeded: each mechanism's model is initialised
from ``seed`` and sees the same stream of training batches, training runs on
a fixed number of CPU threads, and the result of one mechanism does not depend
on which others run with it. Two runs with the same seed give the same
accuracies and losses; only timings differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import benchmark
from .registry import MECHANISMS, Mechanism, mechanisms
from .models import RecallTokens
from .tasks import AssociativeRecall
from .train import History, evaluate, set_seed, train

__all__ = [
    "Preset",
    "PRESETS",
    "get_preset",
    "resolve_device",
    "PositionalRecallModel",
    "recall_loss",
    "MechanismResult",
    "Comparison",
    "run",
    "run_one",
    "TABLE_COLUMNS",
]


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """Sizes of one comparison run.

    Task and model: ``n_pairs`` key-value pairs plus the query (``n_pairs + 1``
    tokens), key and value alphabets, width ``embed_dim``, ``num_heads``,
    ``layers`` attention layers. Training: ``steps`` Adam steps of
    ``batch_size`` at learning rate ``lr`` on ``train_threads`` CPU threads
    (fixed, so that results do not depend on the machine's core count),
    logged every ``log_every``; convergence is the first logged step whose
    training-batch accuracy reaches ``target_acc``. Evaluation on
    ``eval_batch`` held-out sequences.

    Cost of the layer alone (width ``bench_embed``, ``num_heads`` heads):
    latency, peak memory and FLOPs of one forward at ``(bench_batch, bench_n)``;
    a sweep over ``sweep_lengths`` at batch 1, each timed for
    ``min_run_time`` seconds. A sweep stops early when the next length is
    predicted to take more than ``sweep_cap_s`` seconds per call.
    """

    name: str
    n_pairs: int
    n_keys: int
    n_values: int
    embed_dim: int
    num_heads: int
    layers: int
    steps: int
    batch_size: int
    lr: float
    log_every: int
    target_acc: float
    eval_batch: int
    bench_embed: int
    bench_batch: int
    bench_n: int
    sweep_lengths: tuple[int, ...]
    min_run_time: float
    sweep_cap_s: float
    train_threads: int = 1
    probe_examples: int = 6

    @property
    def seq_len(self) -> int:
        """Tokens per sequence seen by the attention layers: the pairs and the query."""
        return self.n_pairs + 1

    def task(self) -> AssociativeRecall:
        return AssociativeRecall(n_pairs=self.n_pairs, n_keys=self.n_keys, n_values=self.n_values)

    def describe(self) -> str:
        """One line with the sizes that matter for reading the results."""
        lengths = ", ".join(map(str, self.sweep_lengths))
        return (
            f"preset {self.name!r}: recall over {self.n_pairs} pairs + query ({self.seq_len} tokens), "
            f"{self.layers} layer(s) of width {self.embed_dim} with {self.num_heads} heads, "
            f"{self.steps} steps of batch {self.batch_size}; layer cost at width {self.bench_embed}, "
            f"batch {self.bench_batch} x n {self.bench_n}; sweep n = {lengths}"
        )


PRESETS: dict[str, Preset] = {
    # a few seconds per mechanism: for the test suite and smoke runs
    "quick": Preset(
        "quick", n_pairs=15, n_keys=16, n_values=8, embed_dim=32, num_heads=4, layers=1,
        steps=60, batch_size=32, lr=1e-2, log_every=10, target_acc=0.5, eval_batch=256,
        bench_embed=32, bench_batch=1, bench_n=128, sweep_lengths=(64, 128, 256),
        min_run_time=0.01, sweep_cap_s=0.05, probe_examples=2,
    ),
    # the book's comparison chapter: 1-3 s per mechanism on a 2-core CPU
    "book": Preset(
        "book", n_pairs=15, n_keys=16, n_values=16, embed_dim=32, num_heads=4, layers=1,
        steps=200, batch_size=64, lr=1e-2, log_every=10, target_acc=0.9, eval_batch=512,
        bench_embed=64, bench_batch=1, bench_n=512, sweep_lengths=(128, 256, 512, 1024),
        min_run_time=0.03, sweep_cap_s=0.25,
    ),
    # the CLI default on a CPU: about 15-40 s per mechanism on 2 cores
    "default": Preset(
        "default", n_pairs=31, n_keys=32, n_values=16, embed_dim=64, num_heads=4, layers=2,
        steps=600, batch_size=64, lr=3e-3, log_every=10, target_acc=0.9, eval_batch=1024,
        bench_embed=128, bench_batch=2, bench_n=1024, sweep_lengths=(256, 512, 1024, 2048, 4096),
        min_run_time=0.2, sweep_cap_s=1.0,
    ),
    # the CLI default on a GPU: longer sequences, wider model, longer training and sweep
    "gpu": Preset(
        "gpu", n_pairs=63, n_keys=64, n_values=32, embed_dim=128, num_heads=8, layers=2,
        steps=2000, batch_size=256, lr=3e-3, log_every=20, target_acc=0.9, eval_batch=4096,
        bench_embed=256, bench_batch=8, bench_n=4096,
        sweep_lengths=(512, 1024, 2048, 4096, 8192, 16384),
        min_run_time=0.2, sweep_cap_s=1.0,
    ),
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; otherwise check the device exists.

    Raises:
        ValueError: for a string torch cannot parse or a device that is not available.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return benchmark.default_device()
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"invalid device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported by the comparison; use 'auto', 'cpu' or 'cuda'")
    return dev


def get_preset(preset: str | Preset | None, device: torch.device | str = "cpu") -> Preset:
    """A preset by name; ``None`` means ``"gpu"`` on CUDA and ``"default"`` on the CPU."""
    if isinstance(preset, Preset):
        return preset
    if preset is None:
        preset = "gpu" if torch.device(device).type == "cuda" else "default"
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}") from None


# --------------------------------------------------------------------------- the task model


POSITION_INIT_STD = 0.3


class PositionalRecallModel(nn.Module):
    """The comparison's model: any registered token-mixing layer on associative recall.

    Each key-value pair of :class:`~attn.tasks.AssociativeRecall` becomes one
    token ``E_k[k] + E_v[v] + P[i]`` (``P`` a learned position embedding);
    the query key becomes the **last** token ``E_k[q] + e_query + P[n]``.
    ``layers`` pre-norm residual blocks ``h <- h + A(LayerNorm(h))`` mix the
    tokens, where ``A = build(embed_dim, num_heads)`` is the mechanism under
    test; a linear readout of the query token predicts the value.

    Shapes: ``x`` ``(B, 2 n_pairs + 1)`` task tokens -> logits ``(B, n_values)``;
    with ``need_weights``, one weight tensor per layer, ``(B, heads, n + 1, n + 1)``.

    Args:
        task: the recall task (alphabet sizes, number of pairs).
        build: ``build(embed_dim, num_heads) -> nn.Module`` from the registry.
        embed_dim, num_heads, layers: model sizes.
    """

    def __init__(
        self,
        task: AssociativeRecall,
        build: Callable[[int, int], nn.Module],
        embed_dim: int = 32,
        num_heads: int = 4,
        layers: int = 1,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.task = task
        # small position init: content first, position learnable
        self.tokens = RecallTokens(task, embed_dim, position_std=POSITION_INIT_STD)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(layers))
        self.mixers = nn.ModuleList(build(embed_dim, num_heads) for _ in range(layers))
        self.out_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_values)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor | None]]:
        """Logits ``(B, n_values)`` and, if asked, each layer's attention weights."""
        h = self.tokens(x)
        weights: list[Tensor | None] = []
        for norm, mixer in zip(self.norms, self.mixers):
            out = mixer(norm(h), need_weights=need_weights)
            h = h + out[0]
            weights.append(out[1] if need_weights else None)
        return self.head(self.out_norm(h[:, -1])), weights


def recall_loss(model: PositionalRecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the recalled value, and accuracy."""
    logits, _ = model(batch["x"])
    target = batch["y"] - model.task.n_keys
    return F.cross_entropy(logits, target), {"acc": float((logits.argmax(-1) == target).float().mean())}


# --------------------------------------------------------------------------- results


#: The summary columns, in order (``summary.csv`` and :meth:`Comparison.table`).
TABLE_COLUMNS: tuple[str, ...] = (
    "name", "chapter", "paper", "complexity", "data", "status", "note",
    "params", "model_params", "gflops", "latency_ms", "peak_mib",
    "time_exponent", "memory_exponent", "flops_exponent", "sweep_max_n",
    "accuracy", "accuracy_near", "accuracy_far", "eval_loss", "final_train_loss", "steps_to_target",
    "query_entropy", "uniform_entropy", "answer_weight", "train_s", "wall_s",
)


_INT_COLUMNS = ("chapter", "params", "model_params", "sweep_max_n", "steps_to_target")


@dataclass
class MechanismResult:
    """Everything measured for one mechanism (``status``: ``"ok"``, ``"own task"`` or ``"error"``)."""

    name: str
    chapter: int
    paper: str
    complexity: str
    data: str
    status: str = "ok"
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    sweep: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: query-row entropies (nats) on the held-out batch, ``(layers, examples, heads)``
    query_entropy: np.ndarray | None = None
    #: mean entropy of every attention row per ``(layer, head)``
    head_entropy: np.ndarray | None = None
    #: accuracy per distance bucket (quarters of the sequence, nearest first)
    accuracy_by_distance: list[float] = field(default_factory=list)
    #: attention weights of a few held-out examples, ``(layers, examples, heads, n, n)``
    probe_weights: Tensor | None = None
    probe: dict[str, Tensor] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The summary row (see :data:`TABLE_COLUMNS`)."""
        base = {
            "name": self.name, "chapter": self.chapter, "paper": self.paper, "complexity": self.complexity,
            "data": self.data, "status": self.status, "note": "; ".join(self.notes),
        }
        return {c: base[c] if c in base else self.metrics.get(c) for c in TABLE_COLUMNS}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = self.row()
        out["notes"] = list(self.notes)
        out["history"] = {k: v.tolist() for k, v in self.history.items()} if len(self.history) else {}
        out["sweep"] = self.sweep.to_dict(orient="records") if len(self.sweep) else []
        out["accuracy_by_distance"] = self.accuracy_by_distance
        out["head_entropy"] = None if self.head_entropy is None else self.head_entropy.tolist()
        if self.query_entropy is not None and self.query_entropy.size:
            edges = np.linspace(0.0, math.log(self.metrics.get("seq_len") or 2), 21)
            counts, _ = np.histogram(self.query_entropy.ravel(), bins=edges)
            out["query_entropy_histogram"] = {"edges": edges.tolist(), "counts": counts.tolist()}
        return out


def _clean(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively, for strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


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

    def measured(self) -> list[MechanismResult]:
        """The mechanisms that ran on the shared task."""
        return [r for r in self.results if r.status == "ok"]

    def curves(self) -> dict[str, pd.DataFrame]:
        """``name -> History frame`` (``step, loss, acc``) for the measured mechanisms."""
        return {r.name: r.history for r in self.results if len(r.history)}

    def curves_frame(self) -> pd.DataFrame:
        """All training curves, long format: ``name, step, loss, acc``."""
        frames = [df.assign(name=name)[["name", *df.columns]] for name, df in self.curves().items()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["name", "step", "loss", "acc"])

    def sweep_frame(self) -> pd.DataFrame:
        """All sweeps, long format: ``name, n, median_ms, peak_mib, gflops``."""
        frames = [r.sweep for r in self.results if len(r.sweep)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["name", "n", "median_ms", "peak_mib", "gflops"])

    def display_table(self) -> pd.DataFrame:
        """The summary with readable column names and rounding, for printing."""
        t = self.table()
        out = pd.DataFrame(index=t.index)
        out["ch"] = t["chapter"]
        out["params"] = t["params"].map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
        out["GFLOP"] = t["gflops"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
        out["ms"] = t["latency_ms"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
        out["MiB"] = t["peak_mib"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
        out["time ~n^p"] = t["time_exponent"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        out["mem ~n^p"] = t["memory_exponent"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        out["FLOP ~n^p"] = t["flops_exponent"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        out["acc"] = t["accuracy"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
        out["acc far"] = t["accuracy_far"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
        out["steps to target"] = [
            "" if r.status != "ok" else ("never" if pd.isna(v) else str(int(v)))
            for r, v in zip(self.results, t["steps_to_target"])
        ]
        out["H(query)"] = t["query_entropy"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        out["status"] = [
            r.status if r.status != "own task" else f"own task, see chapter {r.chapter}" for r in self.results
        ]
        return out

    def format_table(self) -> str:
        """The readable table as text (for the CLI)."""
        return self.display_table().to_string()

    # ---------------------------------------------------------------- reading

    def reading(self) -> str:
        """A few sentences on what the numbers say, computed from the results (Markdown)."""
        p = self.preset
        t = self.table()
        ok = t[t["status"] == "ok"]
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
        own = [r for r in self.results if r.status == "own task"]
        if own:
            lines.append(
                "Measured on their own tasks, not on this one: "
                + ", ".join(f"{r.name} (chapter {r.chapter}, {r.data} data)" for r in own) + "."
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
        from . import plotting

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

        from . import plotting

        df = self.sweep_frame()
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
        t = t[(t["status"] == "ok")].dropna(subset=[cost, "accuracy"])
        if not len(t):
            return _empty(ax, "nothing measured")
        if ax is None:
            _, ax = plt.subplots()
        from .plotting import PALETTE

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

        data = [(r.name, r.query_entropy.ravel()) for r in self.results if r.query_entropy is not None and r.query_entropy.size]
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
        from .widgets import AttentionExplorer, Panel, View, entropy

        have = [r for r in self.results if r.probe_weights is not None]
        if not have:
            raise ValueError("no mechanism returned attention weights to explore")
        k = min(r.probe_weights.shape[1] for r in have)
        k = k if examples is None else min(k, examples)
        layers = min(r.probe_weights.shape[0] for r in have)
        task = self.preset.task()
        by_name = {r.name: r for r in have}

        def labels(r: MechanismResult, b: int) -> list[str]:
            xs = r.probe["x"][b].tolist()
            answer = (int(r.probe["where"][b]) - 1) // 2
            pairs = [f"{xs[2 * i]}:{xs[2 * i + 1] - task.n_keys}" + ("*" if i == answer else "") for i in range(task.n_pairs)]
            return pairs + [f"q={xs[-1]}"]

        def view(mechanism: str, example: int, layer: int = 0) -> View:
            r = by_name[mechanism]
            w = r.probe_weights[layer, example]  # (H, n, n)
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

        sliders: dict[str, list[Any]] = {"mechanism": list(by_name), "example": list(range(k))}
        if layers > 1:
            sliders["layer"] = list(range(layers))
        return AttentionExplorer(
            view, sliders, initial={"mechanism": next(iter(by_name)), "example": 0},
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

        from . import plotting

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
    from .plotting import PALETTE

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


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _reproducible(device: torch.device, threads: int) -> Iterator[None]:
    """Fixed CPU thread count (reductions then add up in one order) and deterministic kernels."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(max(1, threads))
    if device.type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def _layer_call(layer: nn.Module, x: Tensor) -> Callable[[], object]:
    def fn() -> object:
        with torch.no_grad():
            return layer(x)

    return fn


def _try(res: MechanismResult, what: str, fn: Callable[[], float]) -> float:
    """``fn()``, or NaN and a note when this one measurement fails (the others still stand)."""
    try:
        return float(fn())
    except Exception as err:  # noqa: BLE001
        res.notes.append(f"{what} failed: {type(err).__name__}: {err}")
        return float("nan")


def _flops(layer: nn.Module, x: Tensor) -> int:
    """FLOPs of one forward of ``layer`` on ``x``.

    Counted with autograd enabled: ``FlopCounterMode``'s module tracker
    rejects some modules under ``torch.no_grad`` (views of parameters); the
    forward arithmetic is the same either way.
    """
    return benchmark.count_flops(lambda: layer(x))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _cost(mech: Mechanism, preset: Preset, seed: int, device: torch.device, res: MechanismResult) -> None:
    """Parameters; the sweep over lengths; latency, memory and FLOPs at the fixed size."""
    assert mech.build is not None
    set_seed(seed)
    layer = mech.build(preset.bench_embed, preset.num_heads).to(device).eval()
    res.metrics["params"] = _n_params(layer)
    gen = torch.Generator().manual_seed(seed)

    frames: list[pd.DataFrame] = []
    for n in preset.sweep_lengths:
        if frames:
            ns = [int(f["n"].iloc[0]) for f in frames]
            ts = [float(f["median_ms"].iloc[0]) / 1e3 for f in frames]
            growth = min(3.0, max(1.0, benchmark.fit_exponent(ns[-2:], ts[-2:]))) if len(ns) >= 2 else 2.0
            predicted = ts[-1] * (n / ns[-1]) ** growth
            if predicted > preset.sweep_cap_s:
                res.notes.append(f"sweep stopped at n = {ns[-1]} (n = {n} predicted {predicted:.2g} s per call)")
                break
        xs = torch.randn(1, n, preset.bench_embed, generator=gen).to(device)
        fn_n = _layer_call(layer, xs)
        try:
            ms = benchmark.time_median(fn_n, preset.min_run_time) * 1e3
        except Exception as err:  # noqa: BLE001 - a mechanism's own limit (e.g. a maximum length) ends its sweep
            res.notes.append(f"sweep stopped at n = {n}: {type(err).__name__}: {err}")
            break
        frames.append(pd.DataFrame([{
            "name": mech.name, "n": n, "median_ms": ms,
            "peak_mib": _try(res, f"peak memory at n = {n}", lambda fn_n=fn_n: benchmark.peak_memory(fn_n, device) / 2**20),
            "gflops": _try(res, f"FLOP count at n = {n}", lambda xs=xs: _flops(layer, xs) / 1e9),
        }]))
    if frames:
        res.sweep = pd.concat(frames, ignore_index=True)
        res.metrics["sweep_max_n"] = int(res.sweep["n"].max())
        if len(res.sweep) >= 2:
            for col, key in (("median_ms", "time_exponent"), ("peak_mib", "memory_exponent"), ("gflops", "flops_exponent")):
                vals = res.sweep[col].astype(float)
                if (vals > 0).all():
                    res.metrics[key] = benchmark.fit_exponent(res.sweep["n"], vals)

    # the fixed size: taken from the sweep when it is one of its points (batch 1), else measured
    reuse = res.sweep[res.sweep["n"] == preset.bench_n] if preset.bench_batch == 1 and len(res.sweep) else pd.DataFrame()
    if len(reuse):
        row = reuse.iloc[0]
        res.metrics["latency_ms"] = float(row["median_ms"])
        res.metrics["peak_mib"] = float(row["peak_mib"])
        res.metrics["gflops"] = float(row["gflops"])
        return
    x = torch.randn(preset.bench_batch, preset.bench_n, preset.bench_embed, generator=gen).to(device)
    fn = _layer_call(layer, x)
    res.metrics["latency_ms"] = benchmark.time_median(fn, preset.min_run_time) * 1e3
    res.metrics["peak_mib"] = _try(res, "peak memory", lambda: benchmark.peak_memory(fn, device) / 2**20)
    res.metrics["gflops"] = _try(res, "FLOP count", lambda: _flops(layer, x) / 1e9)


def _attention_stats(
    model: PositionalRecallModel, preset: Preset, seed: int, device: torch.device, res: MechanismResult
) -> None:
    """Held-out accuracy by distance, entropy of the attention rows, weight on the answer."""
    task = model.task
    batch = task.sample(preset.eval_batch, torch.Generator().manual_seed(_eval_seed(seed)))
    x = batch["x"].to(device)
    target = batch["y"] - task.n_keys
    with torch.no_grad():
        logits, _ = model(x)
    correct = (logits.argmax(-1).cpu() == target).float()
    pair = (batch["where"] - 1) // 2  # index of the pair holding the answer
    distance = task.n_pairs - pair  # 1 (just before the query) .. n_pairs (first token)
    far = distance > task.n_pairs / 2
    res.metrics["accuracy_near"] = float(correct[~far].mean()) if (~far).any() else None
    res.metrics["accuracy_far"] = float(correct[far].mean()) if far.any() else None
    quarters = torch.clamp(((distance - 1) * 4) // task.n_pairs, max=3)
    res.accuracy_by_distance = [float(correct[quarters == q].mean()) if (quarters == q).any() else float("nan") for q in range(4)]

    try:
        with torch.no_grad():
            _, weights = model(x, need_weights=True)
    except Exception as err:  # noqa: BLE001 - reported, the rest of the row stands
        res.notes.append(f"need_weights=True failed: {type(err).__name__}: {err}")
        return
    n = preset.seq_len
    per_layer = []
    for i, w in enumerate(weights):
        if w is None:
            res.notes.append(f"layer {i} returned no weights")
            return
        w = w.detach().float().cpu()
        if w.ndim == 3:
            w = w[:, None]  # (B, n, n) -> (B, 1, n, n)
        if w.ndim != 4 or tuple(w.shape[-2:]) != (n, n) or w.shape[0] != x.shape[0]:
            res.notes.append(f"weights of shape {tuple(w.shape)}, expected (batch, [heads,] {n}, {n}); entropy skipped")
            return
        per_layer.append(w)
    from .widgets import entropy

    rows = torch.stack([entropy(w) for w in per_layer]).float()  # (layers, B, H, n)
    res.query_entropy = rows[..., -1].numpy()  # (layers, B, H)
    res.head_entropy = rows.mean(dim=(1, 3)).numpy()  # (layers, H)
    res.metrics["query_entropy"] = float(rows[..., -1].mean())
    res.metrics["uniform_entropy"] = math.log(n)
    answer = torch.stack([w[torch.arange(w.shape[0]), :, -1, pair] for w in per_layer])  # (layers, B, H)
    res.metrics["answer_weight"] = float(answer.mean(1).max())  # the best (layer, head)
    k = min(preset.probe_examples, x.shape[0])
    res.probe_weights = torch.stack([w[:k] for w in per_layer])  # (layers, k, H, n, n)
    res.probe = {
        "x": batch["x"][:k], "y": batch["y"][:k], "where": batch["where"][:k],
        "pred": logits.argmax(-1).cpu()[:k] + task.n_keys,
    }


def _eval_seed(seed: int) -> int:
    return seed + 1_000_003  # a held-out stream, distinct from the training stream seeded by ``seed``


def run_one(
    mech: Mechanism | str,
    preset: str | Preset = "book",
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = False,
    cost: bool = True,
    learn: bool = True,
) -> MechanismResult:
    """Measure one mechanism (see :func:`run`); ``cost``/``learn`` switch the two halves."""
    from .registry import get

    t_start = time.perf_counter()
    mech = get(mech) if isinstance(mech, str) else mech
    dev = resolve_device(device)
    p = get_preset(preset, dev)
    res = MechanismResult(mech.name, mech.chapter, mech.paper, mech.complexity, mech.data)
    res.metrics["seq_len"] = p.seq_len
    if mech.build is None or mech.data != "sequence":
        res.status = "own task"
        res.notes.append(f"works on {mech.data} data: measured on its own task in chapter {mech.chapter}")
        return res
    try:
        if learn:
            task = p.task()
            with _reproducible(dev, p.train_threads if dev.type == "cpu" else torch.get_num_threads()):
                set_seed(seed)
                model = PositionalRecallModel(task, mech.build, p.embed_dim, p.num_heads, p.layers)
                res.metrics["model_params"] = _n_params(model)
                t0 = time.perf_counter()
                hist: History = train(
                    model, task.sample, recall_loss, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                    seed=seed, log_every=p.log_every, device=dev, progress=progress, num_threads=None,
                )
                res.metrics["train_s"] = time.perf_counter() - t0
                res.history = hist.to_frame()
                res.metrics["final_train_loss"] = hist.loss[-1]
                res.metrics["steps_to_target"] = hist.first_step_reaching("acc", p.target_acc)
                ev = evaluate(model, task.sample, recall_loss, batch_size=p.eval_batch, seed=_eval_seed(seed), device=dev)
                res.metrics["accuracy"] = ev["acc"]
                res.metrics["eval_loss"] = ev["loss"]
                _attention_stats(model, p, seed, dev, res)
            del model
        if cost:
            _cost(mech, p, seed, dev, res)
    except Exception as err:  # noqa: BLE001 - one broken mechanism must not stop the comparison
        res.status = "error"
        res.notes.append(f"{type(err).__name__}: {err}")
    res.metrics["wall_s"] = time.perf_counter() - t_start
    return res


def _select(modes: Iterable[str] | None) -> list[Mechanism]:
    registered = mechanisms()  # chapter order, then name: independent of import order
    if modes is None:
        return registered
    wanted = list(dict.fromkeys(modes))  # keep the caller's order, drop repeats
    unknown = [m for m in wanted if m not in MECHANISMS]
    if unknown:
        raise KeyError(
            f"unknown mechanism(s) {', '.join(map(repr, unknown))}; registered: {', '.join(m.name for m in registered)}"
        )
    chosen = set(wanted)
    return [m for m in registered if m.name in chosen]


def run(
    modes: Sequence[str] | None = None,
    preset: str | Preset | None = "book",
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    cost: bool = True,
    learn: bool = True,
) -> Comparison:
    """Compare the registered mechanisms (or ``modes``) on the shared task and cost axes.

    Args:
        modes: registry names; ``None`` for every registered mechanism.
        preset: a name in :data:`PRESETS`, a :class:`Preset`, or ``None``
            (``"gpu"`` on CUDA, ``"default"`` on the CPU).
        seed: seeds model initialisation, training batches and the held-out batch.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        progress: tqdm bars (mechanisms, training steps).
        cost, learn: run the cost measurements and the training half.

    Returns:
        a :class:`Comparison`, in chapter order whatever the order of ``modes``.

    Raises:
        KeyError: an unknown name in ``modes`` (the message lists the valid ones).
        ValueError: an unknown preset or an unavailable device.
    """
    from tqdm.auto import tqdm

    chosen = _select(modes)
    dev = resolve_device(device)
    p = get_preset(preset, dev)
    t0 = time.perf_counter()
    results = []
    bar = tqdm(chosen, desc="compare", disable=not progress, unit="mechanism")
    for mech in bar:
        bar.set_postfix_str(mech.name)
        results.append(run_one(mech, p, seed, dev, progress=progress, cost=cost, learn=learn))
    return Comparison(p, seed, str(dev), results, wall_s=time.perf_counter() - t0)
