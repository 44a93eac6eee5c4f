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
    "name", "chapter", "paper", "complexity", "data", "status", "note", "task", "size_unit",
    "params", "model_params", "gflops", "latency_ms", "peak_mib",
    "time_exponent", "memory_exponent", "flops_exponent", "sweep_max_n",
    "accuracy", "accuracy_near", "accuracy_far", "eval_loss", "final_train_loss", "steps_to_target",
    "query_entropy", "uniform_entropy", "answer_weight", "train_s", "wall_s",
)


#: What each column means (``python -m attn compare --list-axes``).
AXES: dict[str, str] = {
    "name": "registry name (--mode NAME)",
    "chapter": "the book chapter that derives and tests it",
    "paper": "canonical citation",
    "complexity": "time complexity the paper claims, in the sequence length n (or the task's size)",
    "data": "kind of input: sequence, graph, image, grid, set, document, pair, training",
    "status": "ok; error (the note says why); own task (a non-sequence mechanism with no task hook: no numbers)",
    "note": "what could not be measured and why (sweep stopped early, weights unavailable...)",
    "task": "the task it was trained on: associative recall (shared), or its own task (second table)",
    "size_unit": "what the sweep's size counts: n tokens, or nodes, pixels, set elements...",
    "params": "parameters of the attention layer alone",
    "model_params": "parameters of the whole task model that was trained",
    "gflops": "GFLOP of one forward of the layer at the fixed size (FlopCounterMode: matmuls/convs counted)",
    "latency_ms": "median ms of one forward of the layer at the fixed size (torch.utils.benchmark)",
    "peak_mib": "peak memory of one forward at the fixed size, MiB (CUDA allocator, or traced CPU allocations)",
    "time_exponent": "p in time ~ size^p, least-squares fit over the sweep",
    "memory_exponent": "p in peak memory ~ size^p over the sweep",
    "flops_exponent": "p in FLOPs ~ size^p over the sweep (counted: free of timing noise)",
    "sweep_max_n": "largest size the sweep reached (it stops when the next is predicted too slow)",
    "accuracy": "held-out accuracy after the fixed training budget",
    "accuracy_near": "recall only: accuracy when the answer lies in the half of the sequence next to the query",
    "accuracy_far": "recall only: accuracy when the answer lies in the far half",
    "eval_loss": "held-out loss",
    "final_train_loss": "training loss at the last step",
    "steps_to_target": "first logged step whose training-batch accuracy reaches the target (empty: never)",
    "query_entropy": "mean entropy (nats) of the attention rows (recall: the query's row)",
    "uniform_entropy": "entropy of a uniform row, for scale",
    "answer_weight": "recall only: attention weight the query puts on the pair holding the answer (best head)",
    "train_s": "seconds of training",
    "wall_s": "seconds for the whole row",
}

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
    #: the task it was measured on: "" for the shared recall task, else its own task's description
    task: str = ""
    #: what the cost sweep's size counts ("n" tokens for sequence mechanisms; nodes, pixels, elements...)
    size_unit: str = "n"
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
            "task": self.task or "associative recall", "size_unit": self.size_unit,
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
