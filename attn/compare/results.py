"""One mechanism's measurements (:class:`MechanismResult`) and the summary columns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

__all__ = ["MechanismResult", "TABLE_COLUMNS", "AXES"]

#: The summary columns, in order (``summary.csv`` and :meth:`Comparison.table`).
TABLE_COLUMNS: tuple[str, ...] = (
    "name", "chapter", "family", "paper", "complexity", "data", "status", "note", "task", "size_unit",
    "implementation", "params", "model_params", "gflops", "latency_ms", "peak_mib",
    "time_exponent", "time_fit", "memory_exponent", "flops_exponent", "sweep_max_n",
    "seq_len", "mqar_pairs", "mqar_width", "task_gflops", "task_peak_kib",
    "seeds", "accuracy", "accuracy_min", "accuracy_max", "accuracy_near", "accuracy_far", "eval_loss",
    "final_train_loss", "steps_to_target",
    "query_entropy", "uniform_entropy", "answer_weight", "train_s", "wall_s",
)


#: What each column means (``python -m attn compare --list-axes``).
AXES: dict[str, str] = {
    "name": "registry name (--mode NAME)",
    "chapter": "the book chapter that derives and tests it",
    "family": "the part of the book its chapter belongs to (the figures' panels)",
    "paper": "canonical citation",
    "complexity": "time complexity the paper claims, in the sequence length n (or the task's size)",
    "data": "kind of input: sequence, graph, image, grid, set, document, pair, training",
    "status": "ok; error (the note says why); own task (a non-sequence mechanism with no task hook: no numbers)",
    "note": "what could not be measured and why (sweep stopped early, weights unavailable...)",
    "task": "the task it was trained on: associative recall (shared), or its own task (second table)",
    "size_unit": "what the sweep's size counts: n tokens, or nodes, pixels, set elements...",
    "implementation": "fused (PyTorch's fused attention kernel), torch ops (vectorised, no fused kernel) or "
                      "python loop (a reference whose torch calls grow with n): measured by counting torch calls",
    "params": "parameters of the attention layer alone",
    "model_params": "parameters of the whole task model that was trained",
    "gflops": "GFLOP of one forward of the layer at the fixed size (FlopCounterMode: matmuls/convs counted)",
    "latency_ms": "median ms of one forward of the layer at the fixed size (torch.utils.benchmark)",
    "peak_mib": "peak memory of one forward at the fixed size, MiB (CUDA allocator, or traced CPU allocations)",
    "time_exponent": "p in time ~ size^p, least-squares fit over the sweep",
    "time_fit": "fitted; overhead: on a CPU the smallest forward took < 1 ms, or the time grew slower than the "
                "counted FLOPs (exponent more than 0.3 below theirs), so fixed per-call cost hides the growth and "
                "no time exponent is reported; noisy: the log-log fit's R^2 is below 0.9",
    "memory_exponent": "p in peak memory ~ size^p over the sweep",
    "flops_exponent": "p in FLOPs ~ size^p over the sweep (counted: free of timing noise)",
    "sweep_max_n": "largest size the sweep reached (it stops when the next is predicted too slow)",
    "seq_len": "tokens per training sequence of the learning task",
    "mqar_pairs": "MQAR: key-value pairs per sequence at the point every mechanism is trained on",
    "mqar_width": "MQAR: model width at that point",
    "task_gflops": "GFLOP of one layer's forward at the learning task's length and width (batch 1)",
    "task_peak_kib": "peak memory (KiB) of one layer's forward at the learning task's length and width",
    "seeds": "number of seeds behind the learning numbers",
    "accuracy": "held-out accuracy after the fixed training budget, mean over the seeds",
    "accuracy_min": "lowest held-out accuracy over the seeds",
    "accuracy_max": "highest held-out accuracy over the seeds",
    "accuracy_near": "accuracy on the queries whose answer lies nearer than the median distance (mean over seeds)",
    "accuracy_far": "accuracy on the queries whose answer lies farther than the median distance",
    "eval_loss": "held-out loss",
    "final_train_loss": "training loss at the last step",
    "steps_to_target": "first logged step whose training-batch accuracy reaches the target, median over seeds "
                       "(empty: most seeds never did)",
    "query_entropy": "mean entropy (nats) of the query rows of the head that weighs the answer most (first seed; "
                     "empty when the layer has no attention weights that are distributions)",
    "uniform_entropy": "entropy of a uniform row, for scale",
    "answer_weight": "attention weight a query puts on the token holding its answer (best layer and head)",
    "train_s": "seconds of training",
    "wall_s": "seconds for the whole row",
}

_INT_COLUMNS = ("chapter", "params", "model_params", "sweep_max_n", "steps_to_target", "seq_len", "mqar_pairs",
                "mqar_width", "seeds")


@dataclass
class MechanismResult:
    """Everything measured for one mechanism (``status``: ``"ok"``, ``"own task"`` or ``"error"``)."""

    name: str
    chapter: int
    paper: str
    complexity: str
    data: str
    status: str = "ok"
    #: the task it was measured on: "" for the shared recall task, else its own task's description
    task: str = ""
    #: what the cost sweep's size counts ("n" tokens for sequence mechanisms; nodes, pixels, elements...)
    size_unit: str = "n"
    notes: list[str] = field(default_factory=list)
    #: numbers (and a few labels: ``implementation``, ``time_fit``, ``task_name``) by column name
    metrics: dict[str, Any] = field(default_factory=dict)
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
    #: the learning metric per seed: ``{"seed": [...], "accuracy": [...]}``
    per_seed: dict[str, list[Any]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The summary row (see :data:`TABLE_COLUMNS`)."""
        from .report import family_of

        base = {
            "name": self.name, "chapter": self.chapter, "family": family_of(self.chapter), "paper": self.paper, "complexity": self.complexity,
            "data": self.data, "status": self.status, "note": "; ".join(self.notes),
            "task": self.task or str(self.metrics.get("task_name") or "associative recall"), "size_unit": self.size_unit,
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
