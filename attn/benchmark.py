"""Measuring cost: time, FLOPs, peak memory, and growth with sequence length.

* time: :class:`torch.utils.benchmark.Timer`, median of ``blocked_autorange``
  (it synchronises CUDA and handles warm-up and thread settings);
* FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` (counts matmuls,
  convolutions and SDPA; element-wise ops such as softmax are not counted);
* peak memory: on CUDA the allocator's peak; on CPU the running sum of tensor
  allocations and frees recorded by :mod:`torch.profiler` (``profile_memory``);
* a sweep over sequence lengths, with the growth exponent ``p`` of
  ``cost ~ n^p`` fitted by least squares on log-log axes.

Compare ratios measured in one run: the machine is shared and noisy.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils import benchmark as tbench
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "default_device",
    "time_median",
    "count_flops",
    "peak_memory",
    "largest_tensor",
    "memory_sweep",
    "sweep_table",
    "compare",
    "sweep",
    "fit_exponent",
    "exponents",
    "human_bytes",
]


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_median(fn: Callable[[], object], min_run_time: float = 0.5) -> float:
    """Median wall time of ``fn()`` in seconds (``torch.utils.benchmark``)."""
    fn()  # warm-up (lazy init, autotuning)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn})
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``fn`` (2 per multiply-add).

    Runs ``fn`` with SDPA forced onto its math backend: the fused CPU kernel is
    not known to ``FlopCounterMode``, while the math backend's matrix products
    are, and the arithmetic is the same. Autograd stays on (``FlopCounterMode``
    fails on some ops under ``torch.no_grad``); only the forward is counted.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _silence_native_stderr() -> Iterator[None]:
    """Mute file descriptor 2 (the profiler's native start/stop log lines), then restore it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Peak bytes of tensor memory allocated while ``fn()`` runs, above what was live before.

    On CUDA this is ``torch.cuda.max_memory_allocated``. On CPU it replays the
    allocation and free events of :mod:`torch.profiler` in time order and
    takes the maximum of the running total (each allocation and free at its
    own time).
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _silence_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation and free is a "[memory]" event with its own timestamp in the profiler's
    # kineto results: replaying those is exact, also for operators run inside a Python-level event
    # (an autograd.Function), whose frees the aggregated per-operator view books on the outer event.
    try:
        memory = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        changes = sorted((e.start_ns(), e.nbytes()) for e in memory)
    except (AttributeError, TypeError):  # an older profiler API: per-operator self memory, in start order
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        changes = [(0, e.self_cpu_memory_usage) for e in events]
    running = peak = 0
    for _, delta in changes:
        running += delta
        peak = max(peak, running)
    return int(peak)


def largest_tensor(fn: Callable[[], object]) -> int:
    """The most elements of any tensor an aten op returns while ``fn()`` runs under ``no_grad``.

    Tensors made before the call (inputs, weights) are not counted. A result of ``h * n * n`` or more
    means some op formed a dense ``n x n`` map per head; a kernel that is linear in memory stays far
    below it whatever its allocator does, so this is a device-independent companion to
    :func:`peak_memory` for tests.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    most = 0

    class _Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal most
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    most = max(most, t.numel())
            return out

    with torch.no_grad(), _Largest():
        fn()
    return most


def compare(
    fns: Mapping[str, Callable[[], object]], baseline: str | None = None, min_run_time: float = 0.5
) -> pd.DataFrame:
    """Time several callables in one run; ``ratio`` is each median over the baseline's.

    Returns a DataFrame indexed by name with ``median_ms`` and ``ratio``
    (``> 1`` means slower than the baseline, which defaults to the first entry).
    """
    if not fns:
        raise ValueError("compare needs at least one callable")
    times = {name: time_median(fn, min_run_time) for name, fn in fns.items()}
    base = baseline if baseline is not None else next(iter(fns))
    if base not in times:
        raise KeyError(f"baseline {base!r} not among {list(times)}")
    df = pd.DataFrame({"median_ms": {k: t * 1e3 for k, t in times.items()}})
    df["ratio"] = df["median_ms"] / df.loc[base, "median_ms"]
    df.index.name = "implementation"
    return df


def fit_exponent(ns: Iterable[float], values: Iterable[float]) -> float:
    """Slope ``p`` of the least-squares line through ``(log n, log value)``: ``value ~ n^p``."""
    x = np.log(np.asarray(list(ns), dtype=float))
    vals = np.asarray(list(values), dtype=float)
    if x.size < 2 or x.size != vals.size:
        raise ValueError(f"fit_exponent needs at least two (n, value) pairs, got {x.size} and {vals.size}")
    if not np.all(vals > 0):
        raise ValueError("fit_exponent needs positive values")
    y = np.log(vals)
    slope, _ = np.polyfit(x, y, 1)
    return float(slope)


def sweep(
    make_fns: Callable[[int], Mapping[str, Callable[[], object]]],
    lengths: Iterable[int],
    memory: bool = True,
    flops: bool = False,
    min_run_time: float = 0.2,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Measure every implementation at every sequence length.

    Args:
        make_fns: ``n -> {name: fn}``; builds inputs of length ``n`` and returns
            zero-argument callables to measure (all at the same ``n``, so that
            their ratios come from one run).
        lengths: the sequence lengths.
        memory: also measure peak memory (a separate, profiled call).
        flops: also count FLOPs.

    Returns:
        Long DataFrame with columns ``name, n, median_ms`` (and ``peak_mib``,
        ``gflops``). Use :func:`exponents` to fit growth per implementation.
    """
    from tqdm.auto import tqdm

    rows = []
    lengths = list(lengths)
    for n in tqdm(lengths, desc="sweep", disable=not progress):
        for name, fn in make_fns(n).items():
            row: dict[str, object] = {"name": name, "n": n, "median_ms": time_median(fn, min_run_time) * 1e3}
            if memory:
                row["peak_mib"] = peak_memory(fn, device) / 2**20
            if flops:
                row["gflops"] = count_flops(fn) / 1e9
            rows.append(row)
    return pd.DataFrame(rows)


def exponents(df: pd.DataFrame, column: str = "median_ms") -> pd.Series:
    """Fitted growth exponent of ``column`` in ``n``, per implementation of a :func:`sweep`."""
    return df.groupby("name", sort=False).apply(lambda g: fit_exponent(g["n"], g[column]), include_groups=False)


def memory_sweep(
    make_fns: Callable[[int], Mapping[str, Callable[[], object]]],
    lengths: Iterable[int],
    device: torch.device | str | None = None,
) -> pd.DataFrame:
    """Peak memory of every implementation at every length, without timing them (cheaper than :func:`sweep`).

    Args:
        make_fns: ``n -> {name: fn}``: zero-argument callables at length ``n``. A name may be missing at some
            lengths (e.g. a dense baseline measured only up to a size): :func:`sweep_table` shows it as not run.
        lengths: the sequence lengths.
        device: where :func:`peak_memory` measures (default: the fastest available).

    Returns:
        Long DataFrame with columns ``name, n, peak_mib``; every call runs under ``torch.no_grad()``.
    """
    rows = []
    with torch.no_grad():
        for n in lengths:
            for name, fn in make_fns(n).items():
                rows.append({"name": name, "n": n, "peak_mib": peak_memory(fn, device) / 2**20})
    return pd.DataFrame(rows)


def sweep_table(df: pd.DataFrame, column: str = "peak_mib", decimals: int = 1) -> pd.DataFrame:
    """A :func:`sweep` or :func:`memory_sweep` result as the table a chapter shows.

    One row per length and a last row ``exponent p`` with the fitted growth exponent of each column
    (:func:`exponents`); implementations in the order they were measured; a length at which one was
    not measured reads ``not run`` (never NaN).
    """
    exps = exponents(df, column)
    table = df.pivot(index="n", columns="name", values=column)[list(exps.index)].round(decimals)
    table.loc["exponent p"] = exps.round(2)
    return table.astype(object).where(table.notna(), "not run")


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**i:.1f} {units[i]}"
