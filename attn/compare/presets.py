"""The comparison's size presets and device choice."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import benchmark
from ..tasks import AssociativeRecall
from .mqar import MQARCell

__all__ = ["Preset", "PRESETS", "get_preset", "resolve_device", "presets_help"]

#: the MQAR cell of a preset that names none (frozen, so one instance can be shared)
_POINT = MQARCell(8, 16)


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
    #: the size of the mechanisms' own tasks (graphs, images, sets, ...): one of ``attn.experiments.SIZES``
    task_size: str = "full"
    #: typical seconds per sequence mechanism on a 2-core CPU (measured; own tasks vary by chapter)
    cpu_seconds: str = ""
    #: seeds of every learning number (the first is also the cost measurement's and the explorer's)
    seeds: int = 3
    #: MQAR: the cell every sequence mechanism is trained on, for every seed
    mqar_point: MQARCell = _POINT
    #: MQAR: further cells per mechanism ("*" = every sequence mechanism), for the grid's figures and claims
    mqar_grid: tuple[tuple[str, tuple[MQARCell, ...]], ...] = ()
    #: MQAR training: steps at the point, then ``(pairs, steps)`` for the grid's cells (a cell with more pairs
    #: than any listed scales the last entry's steps with its pairs), batch, learning rate, heads of every layer
    mqar_steps: int = 150
    mqar_steps_by_pairs: tuple[tuple[int, int], ...] = ()
    mqar_batch: int = 32
    mqar_lr: float = 1e-2
    mqar_heads: int = 4
    #: train the mechanisms with their own data (graphs, images, sets...) too; ``False``: only their cost
    own_task_learning: bool = True

    @property
    def seq_len(self) -> int:
        """Tokens per sequence seen by the attention layers: the pairs and the query."""
        return self.n_pairs + 1

    def mqar_steps_for(self, cell: MQARCell) -> int:
        """Training steps of an MQAR cell: ``mqar_steps`` at the point; a grid cell's from
        ``mqar_steps_by_pairs`` (the entry for its pairs, or the largest entry below scaled by the ratio of
        pairs), else ``mqar_steps`` scaled by ``pairs / mqar_point.pairs`` when it has more pairs."""
        if cell == self.mqar_point:
            return self.mqar_steps
        table = dict(self.mqar_steps_by_pairs)
        if cell.pairs in table:
            return table[cell.pairs]
        below = [p for p in table if p < cell.pairs]
        if below:
            p = max(below)
            return int(table[p] * cell.pairs / p)
        return int(self.mqar_steps * max(1.0, cell.pairs / self.mqar_point.pairs))

    def mqar_cells(self, name: str) -> tuple[MQARCell, ...]:
        """The grid cells of ``name`` beyond the point (from ``mqar_grid``; ``"*"`` applies to all)."""
        cells: list[MQARCell] = []
        for who, more in self.mqar_grid:
            if who in (name, "*"):
                cells.extend(c for c in more if c != self.mqar_point and c not in cells)
        return tuple(cells)

    def task(self) -> AssociativeRecall:
        return AssociativeRecall(n_pairs=self.n_pairs, n_keys=self.n_keys, n_values=self.n_values)

    def describe(self, task: str = "mqar") -> str:
        """One line with the sizes that matter for reading the results (``task``: ``"mqar"`` or ``"recall"``)."""
        lengths = ", ".join(map(str, self.sweep_lengths))
        if task == "mqar":
            c = self.mqar_point
            grid = sum(len(cells) for _, cells in self.mqar_grid)
            return (
                f"preset {self.name!r}: MQAR with {c.pairs} pairs in {c.length} tokens, 2 layers of width "
                f"{c.width} with {self.mqar_heads} heads, {self.mqar_steps} steps of batch {self.mqar_batch}, "
                f"{self.seeds} seeds; {grid} further grid cell(s); layer cost at width {self.bench_embed}, "
                f"sweep n = {lengths}"
            )
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
        min_run_time=0.01, sweep_cap_s=0.05, probe_examples=2, task_size="quick", cpu_seconds="about 1 s",
        seeds=2, mqar_point=MQARCell(4, 16), mqar_steps=40, own_task_learning=False,
    ),
    # the book's comparison chapter: about 2-3 s of CPU per mechanism (3 MQAR runs and its cost), under 150 s in all
    "book": Preset(
        "book", n_pairs=15, n_keys=16, n_values=16, embed_dim=32, num_heads=4, layers=1,
        steps=200, batch_size=64, lr=1e-2, log_every=10, target_acc=0.9, eval_batch=512,
        bench_embed=64, bench_batch=1, bench_n=512, sweep_lengths=(128, 256, 512, 1024),
        min_run_time=0.01, sweep_cap_s=0.15, task_size="book", cpu_seconds="2-3 s",
        seeds=3, mqar_point=MQARCell(4, 16), mqar_steps=80, mqar_steps_by_pairs=((8, 150), (16, 300)),
        own_task_learning=False,
        mqar_grid=(
            # Zoology's anchors on one representative per kind of mixer: softmax, linear, window, Fourier,
            # fixed sparse pattern; every sequence mechanism also runs the point (4 pairs) for every seed
            ("multihead", (MQARCell(8, 16), MQARCell(16, 16))),
            ("linear", (MQARCell(8, 16), MQARCell(8, 32))),
            ("local", (MQARCell(8, 16),)),
            ("fnet", (MQARCell(8, 64),)),
            ("sparse-fixed", (MQARCell(8, 16),)),
        ),
    ),
    # the CLI default on a CPU: the whole MQAR grid for every mechanism (5-30 min per mechanism on 2 cores)
    "default": Preset(
        "default", n_pairs=31, n_keys=32, n_values=16, embed_dim=64, num_heads=4, layers=2,
        steps=600, batch_size=64, lr=3e-3, log_every=10, target_acc=0.9, eval_batch=1024,
        bench_embed=128, bench_batch=2, bench_n=1024, sweep_lengths=(256, 512, 1024, 2048, 4096),
        min_run_time=0.2, sweep_cap_s=1.0, task_size="full",
        cpu_seconds="5-30 min (hours for all mechanisms)",
        seeds=3, mqar_point=MQARCell(8, 32, seq_len=128), mqar_steps=300,
        mqar_steps_by_pairs=((4, 150), (8, 300), (16, 400), (32, 800)),
        mqar_grid=(("*", (
            *(MQARCell(p, 32) for p in (4, 8, 16, 32)),  # pairs, no filler (n = 3 P)
            *(MQARCell(16, w) for w in (16, 64)),  # width at 16 pairs
            MQARCell(8, 32, seq_len=256),  # length: the point's pairs among more filler
        )),),
    ),
    # the CLI default on a GPU: sequences of 1k-4k tokens, wider models, longer training (not run on a CPU)
    "gpu": Preset(
        "gpu", n_pairs=63, n_keys=64, n_values=32, embed_dim=128, num_heads=8, layers=2,
        steps=2000, batch_size=256, lr=3e-3, log_every=20, target_acc=0.9, eval_batch=4096,
        bench_embed=256, bench_batch=8, bench_n=4096,
        sweep_lengths=(512, 1024, 2048, 4096, 8192, 16384),
        min_run_time=0.2, sweep_cap_s=1.0, task_size="large", cpu_seconds="minutes on a GPU (not meant for a CPU)",
        seeds=5, mqar_point=MQARCell(16, 64, seq_len=1024), mqar_steps=1000, mqar_batch=64, mqar_lr=3e-3,
        mqar_steps_by_pairs=((8, 1000), (16, 1000), (32, 2000), (64, 4000)),
        mqar_grid=(("*", (
            *(MQARCell(p, 64, seq_len=1024) for p in (8, 32, 64)),
            *(MQARCell(32, w, seq_len=1024) for w in (32, 128)),
            MQARCell(16, 64, seq_len=4096),
        )),),
    ),
}


def presets_help() -> str:
    """The presets with their sizes and typical run time, for ``python -m attn compare --help``."""
    lines = ["presets (typical time per mechanism on a 2-core CPU):"]
    for p in PRESETS.values():
        lines.append(f"  {p.name:8s} {p.cpu_seconds} per mechanism")
        lines.append("           " + p.describe().split(": ", 1)[1])
    return "\n".join(lines)


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
