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

__all__ = ["sweep_layer", "sequence_cost", "own_task_cost"]


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


def own_task_cost(task: OwnTask, preset: Preset, seed: int, device: torch.device, res: MechanismResult) -> None:
    """The attention layer of a mechanism's own task: sweep over ``task.sizes``; the fixed size is the largest measured."""
    layer = task.layer.to(device).eval()
    res.metrics["params"] = _n_params(layer)
    sweep_layer(res, layer, task.sizes, task.inputs, preset, seed, device)
    if len(res.sweep):
        _fixed_from_sweep(res, int(res.sweep["n"].max()))
