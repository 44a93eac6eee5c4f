"""Cost of a layer alone: parameters, FLOPs, latency, peak memory, and a size sweep with fitted exponents."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from .. import benchmark
from ..registry import Mechanism, OwnTask
from ..train import set_seed
from .presets import Preset
from .results import MechanismResult

__all__ = ["sweep_layer", "sequence_cost", "own_task_cost", "implementation_kind", "IMPLEMENTATIONS",
           "OVERHEAD_MS", "OVERHEAD_GAP", "MIN_R2"]

#: What the ``implementation`` column says, measured by :func:`implementation_kind`.
IMPLEMENTATIONS: dict[str, str] = {
    "fused": "calls PyTorch's fused attention kernel (scaled_dot_product_attention), a fixed number of torch "
             "calls at any length",
    "torch ops": "vectorised torch operations (explicit score matrices, FFTs, gathers), a fixed number of "
                 "torch calls at any length, no fused attention kernel",
    "python loop": "a reference implementation whose number of torch calls grows with the length (a Python "
                   "loop over blocks or chunks): its time measures the loop, not the algorithm",
}

#: A sweep whose smallest forward is shorter than this (ms, on a CPU) fits no time exponent: fixed per-call
#: overhead (Python, dispatch, allocation) hides how the work grows.
OVERHEAD_MS = 1.0


#: A time exponent this far below the FLOP exponent means the time grows slower than the counted work: fixed
#: per-call cost still dominates at the short lengths, and the fit measures it, not the mechanism.
OVERHEAD_GAP = 0.3

#: A time fit over three or more lengths whose log-log R^2 is below this is noise, not growth: no exponent.
MIN_R2 = 0.9


def _r_squared(n: Any, y: Any) -> float:
    """R^2 of the least-squares line through ``(log n, log y)``."""
    import numpy as np

    x, v = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(y, dtype=float))
    slope, intercept = np.polyfit(x, v, 1)
    resid = v - (slope * x + intercept)
    total = ((v - v.mean()) ** 2).sum()
    return float(1 - (resid**2).sum() / total) if total > 0 else 1.0


class _CallCounter(torch.overrides.TorchFunctionMode):
    """Counts torch function calls, and whether the fused attention kernel is among them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.fused = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            self.fused = True
        return func(*args, **(kwargs or {}))


def implementation_kind(layer: nn.Module, embed_dim: int, lengths: tuple[int, int] = (128, 256)) -> str:
    """``"fused"``, ``"torch ops"`` or ``"python loop"`` (:data:`IMPLEMENTATIONS`), measured, not declared.

    One forward at each of two lengths under a ``TorchFunctionMode`` that counts torch calls: more calls at
    the longer length means a Python loop over the sequence; else the fused kernel when
    ``scaled_dot_product_attention`` was called, otherwise vectorised torch operations.
    """
    counts, fused = [], False
    for n in lengths:
        counter = _CallCounter()
        with torch.no_grad(), counter:
            layer(torch.randn(1, n, embed_dim))
        counts.append(counter.calls)
        fused = fused or counter.fused
    if counts[1] > counts[0]:
        return "python loop"
    return "fused" if fused else "torch ops"


def _layer_call(layer: nn.Module, args: tuple[Any, ...]) -> Callable[[], object]:
    def fn() -> object:
        with torch.no_grad():
            return layer(*args)

    return fn


def _try(res: MechanismResult, what: str, fn: Callable[[], float]) -> float:
    """``fn()``, or NaN and a note when this one measurement fails (the others still stand)."""
    try:
        return float(fn())
    except Exception as err:
        res.notes.append(f"{what} failed: {type(err).__name__}: {err}")
        return float("nan")


def _flops(layer: nn.Module, args: tuple[Any, ...]) -> int:
    """FLOPs of one forward of ``layer`` on ``args``.

    Counted with autograd enabled: ``FlopCounterMode``'s module tracker
    rejects some modules under ``torch.no_grad`` (views of parameters); the
    forward arithmetic is the same either way.
    """
    return benchmark.count_flops(lambda: layer(*args))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _to(args: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    return tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)


def sweep_layer(
    res: MechanismResult,
    layer: nn.Module,
    sizes: Sequence[int],
    inputs: Callable[[int, torch.Generator], tuple[Any, ...]],
    preset: Preset,
    seed: int,
    device: torch.device,
) -> None:
    """Time, peak memory and FLOPs of ``layer(*inputs(n))`` for each ``n`` in ``sizes``; fitted exponents.

    The sweep stops early when the next size is predicted (from the growth so
    far) to take more than ``preset.sweep_cap_s`` per call, or when the layer
    refuses a size (its own limit); both are noted in ``res.notes``.
    """
    gen = torch.Generator().manual_seed(seed)
    frames: list[pd.DataFrame] = []
    for n in sizes:
        if frames:
            ns = [int(f["n"].iloc[0]) for f in frames]
            ts = [float(f["median_ms"].iloc[0]) / 1e3 for f in frames]
            growth = min(3.0, max(1.0, benchmark.fit_exponent(ns[-2:], ts[-2:]))) if len(ns) >= 2 else 2.0
            predicted = ts[-1] * (n / ns[-1]) ** growth
            if predicted > preset.sweep_cap_s:
                res.notes.append(f"sweep stopped at n = {ns[-1]} (n = {n} predicted {predicted:.2g} s per call)")
                break
        try:
            args = _to(inputs(n, gen), device)
            fn_n = _layer_call(layer, args)
            ms = benchmark.time_median(fn_n, preset.min_run_time) * 1e3
        except Exception as err:
            res.notes.append(f"sweep stopped at n = {n}: {type(err).__name__}: {err}")
            break
        frames.append(pd.DataFrame([{
            "name": res.name, "n": n, "median_ms": ms,
            "peak_mib": _try(res, f"peak memory at n = {n}", functools.partial(benchmark.peak_memory, fn_n, device)) / 2**20,
            "gflops": _try(res, f"FLOP count at n = {n}", functools.partial(_flops, layer, args)) / 1e9,
        }]))
    if frames:
        res.sweep = pd.concat(frames, ignore_index=True)
        res.metrics["sweep_max_n"] = int(res.sweep["n"].max())
        if len(res.sweep) >= 2:
            for col, key in (("median_ms", "time_exponent"), ("peak_mib", "memory_exponent"), ("gflops", "flops_exponent")):
                vals = res.sweep[col].astype(float)
                if (vals > 0).all():
                    res.metrics[key] = benchmark.fit_exponent(res.sweep["n"], vals)
            # time: an exponent only where the work, not per-call overhead, sets the time
            smallest = float(res.sweep["median_ms"].iloc[0])
            work = res.metrics.get("flops_exponent")
            slower_than_work = (work is not None and res.metrics.get("time_exponent") is not None
                                and res.metrics["time_exponent"] < work - OVERHEAD_GAP)
            if device.type == "cpu" and (smallest < OVERHEAD_MS or slower_than_work):
                res.metrics["time_exponent"] = None
                res.metrics["time_fit"] = "overhead"
            elif res.metrics.get("time_exponent") is not None:
                fit = _r_squared(res.sweep["n"], res.sweep["median_ms"])
                if len(res.sweep) >= 3 and fit < MIN_R2:
                    res.metrics["time_exponent"] = None
                    res.metrics["time_fit"] = f"noisy (R^2 {fit:.2f})"
                else:
                    res.metrics["time_fit"] = "fitted"


def _fixed_from_sweep(res: MechanismResult, n: int) -> bool:
    """Copy the sweep's row at size ``n`` into the fixed-size metrics; False when there is none."""
    row = res.sweep[res.sweep["n"] == n] if len(res.sweep) else pd.DataFrame()
    if not len(row):
        return False
    res.metrics["latency_ms"] = float(row.iloc[0]["median_ms"])
    res.metrics["peak_mib"] = float(row.iloc[0]["peak_mib"])
    res.metrics["gflops"] = float(row.iloc[0]["gflops"])
    return True


def sequence_cost(mech: Mechanism, preset: Preset, seed: int, device: torch.device, res: MechanismResult) -> None:
    """A token mixer alone: parameters; the sweep over lengths; latency, memory and FLOPs at the fixed size."""
    assert mech.build is not None
    set_seed(seed)
    layer = mech.build(preset.bench_embed, preset.num_heads).to(device).eval()
    res.metrics["params"] = _n_params(layer)
    res.metrics["implementation"] = implementation_kind(layer.cpu(), preset.bench_embed)
    layer = layer.to(device)
    _cost_at_task_size(mech, preset, seed, device, res)
    sweep_layer(
        res, layer, preset.sweep_lengths, lambda n, g: (torch.randn(1, n, preset.bench_embed, generator=g),),
        preset, seed, device,
    )
    # the fixed size: taken from the sweep when it is one of its points (batch 1), else measured
    if preset.bench_batch == 1 and _fixed_from_sweep(res, preset.bench_n):
        return
    gen = torch.Generator().manual_seed(seed)
    args = (torch.randn(preset.bench_batch, preset.bench_n, preset.bench_embed, generator=gen).to(device),)
    fn = _layer_call(layer, args)
    res.metrics["latency_ms"] = benchmark.time_median(fn, preset.min_run_time) * 1e3
    res.metrics["peak_mib"] = _try(res, "peak memory", lambda: benchmark.peak_memory(fn, device) / 2**20)
    res.metrics["gflops"] = _try(res, "FLOP count", lambda: _flops(layer, args) / 1e9)


def _cost_at_task_size(mech: Mechanism, preset: Preset, seed: int, device: torch.device,
                       res: MechanismResult) -> None:
    """FLOPs and peak memory of one layer at the MQAR point's size (batch 1, its length and width): the cost
    at the length where its accuracy is measured (the frontier plots)."""
    assert mech.build is not None
    cell = preset.mqar_point
    set_seed(seed)
    layer = mech.build(cell.width, preset.mqar_heads).to(device).eval()
    args = (torch.randn(1, cell.length, cell.width, generator=torch.Generator().manual_seed(seed)).to(device),)
    res.metrics["task_gflops"] = _try(res, "FLOP count at the task size", lambda: _flops(layer, args) / 1e9)
    res.metrics["task_peak_kib"] = _try(
        res, "peak memory at the task size",
        lambda: benchmark.peak_memory(_layer_call(layer, args), device) / 2**10)


def own_task_cost(task: OwnTask, preset: Preset, seed: int, device: torch.device, res: MechanismResult) -> None:
    """The attention layer of a mechanism's own task: sweep over ``task.sizes``; the fixed size is the largest measured."""
    layer = task.layer.to(device).eval()
    res.metrics["params"] = _n_params(layer)
    sweep_layer(res, layer, task.sizes, task.inputs, preset, seed, device)
    if len(res.sweep):
        _fixed_from_sweep(res, int(res.sweep["n"].max()))
