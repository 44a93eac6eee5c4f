"""Running the comparison: :func:`run` and :func:`run_one`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import torch

from ..registry import MECHANISMS, Mechanism, OwnTask, mechanisms
from ..train import History, evaluate, set_seed, train
from .cost import _n_params, own_task_cost, sequence_cost
from .learn import _attention_stats, _eval_seed, _reproducible, own_task_learning
from .model import PositionalRecallModel, recall_loss
from .presets import Preset, get_preset, resolve_device
from .report import Comparison
from .results import MechanismResult

__all__ = ["run", "run_one"]

def run_one(
    mech: Mechanism | str,
    preset: str | Preset = "book",
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = False,
    cost: bool = True,
    learn: bool = True,
    task: str = "recall",
) -> MechanismResult:
    """Measure one mechanism for one seed (see :func:`run`); ``cost``/``learn`` switch the two halves.

    ``task="recall"`` trains a sequence mechanism on the one-query recall task; with ``task="mqar"`` its
    learning is left to :func:`attn.compare.mqar.run_mqar` (which :func:`run` calls for all of them at once)
    and only a mechanism with its own task is trained here.
    """
    from ..registry import get

    t_start = time.perf_counter()
    mech = get(mech) if isinstance(mech, str) else mech
    dev = resolve_device(device)
    p = get_preset(preset, dev)
    res = MechanismResult(mech.name, mech.chapter, mech.paper, mech.complexity, mech.data)
    if _own_task_factory(mech, p) is not None:
        _run_own_task(mech, p, seed, dev, res, progress, cost, learn)
        res.metrics["wall_s"] = time.perf_counter() - t_start
        return res
    res.metrics["seq_len"] = p.seq_len
    if mech.build is None or mech.data != "sequence":
        res.status = "own task"
        res.notes.append(f"works on {mech.data} data and registers no task: see chapter {mech.chapter}")
        return res
    try:
        if learn and task == "recall":
            task_ = p.task()
            with _reproducible(dev, p.train_threads if dev.type == "cpu" else torch.get_num_threads()):
                set_seed(seed)
                model = PositionalRecallModel(task_, mech.build, p.embed_dim, p.num_heads, p.layers)
                res.metrics["model_params"] = _n_params(model)
                t0 = time.perf_counter()
                hist: History = train(
                    model, task_.sample, recall_loss, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                    seed=seed, log_every=p.log_every, device=dev, progress=progress, num_threads=None,
                )
                res.metrics["train_s"] = time.perf_counter() - t0
                res.history = hist.to_frame()
                res.metrics["final_train_loss"] = hist.loss[-1]
                res.metrics["steps_to_target"] = hist.first_step_reaching("acc", p.target_acc)
                ev = evaluate(model, task_.sample, recall_loss, batch_size=p.eval_batch, seed=_eval_seed(seed), device=dev)
                res.metrics["accuracy"] = ev["acc"]
                res.metrics["eval_loss"] = ev["loss"]
                _attention_stats(model, p, seed, dev, res)
            del model
        if cost:
            sequence_cost(mech, p, seed, dev, res)
    except Exception as err:
        res.status = "error"
        res.notes.append(f"{type(err).__name__}: {err}")
    res.metrics["wall_s"] = time.perf_counter() - t_start
    return res


def _own_task_factory(mech: Mechanism, p: Preset) -> Callable[[], OwnTask[Any]] | None:
    """The mechanism's own task at the preset's size (``attn.experiments``), or ``None``."""
    from ..experiments import own_tasks

    factory = own_tasks().get(mech.name)
    return None if factory is None else (lambda: factory(p.task_size))


def _run_own_task(
    mech: Mechanism, p: Preset, seed: int, dev: torch.device, res: MechanismResult,
    progress: bool, cost: bool, learn: bool,
) -> None:
    """A mechanism with its own data: its task model trained, its attention layer swept (the second table)."""
    make = _own_task_factory(mech, p)
    assert make is not None
    try:
        set_seed(seed)
        task = make()
        res.task, res.size_unit = task.description, task.size_unit
        if learn:
            own_task_learning(task, p, seed, dev, res, progress)
        if cost:
            own_task_cost(task, p, seed, dev, res)
    except Exception as err:
        res.status = "error"
        res.notes.append(f"{type(err).__name__}: {err}")


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


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per worker: timings stay comparable, no oversubscription


def _run_one_in_worker(name: str, preset: Preset, seed: int, device: str, cost: bool, learn: bool,
                       task: str = "recall") -> MechanismResult:
    return run_one(name, preset, seed, device, progress=False, cost=cost, learn=learn, task=task)


def _seed_list(seed: int, seeds: int | Sequence[int] | None, p: Preset) -> list[int]:
    if seeds is None:
        seeds = p.seeds
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be a positive count or a list of seeds, got {seeds}")
        return list(range(seed, seed + seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    return out


def run(
    modes: Sequence[str] | None = None,
    preset: str | Preset | None = "book",
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    cost: bool = True,
    learn: bool = True,
    workers: int = 1,
    seeds: int | Sequence[int] | None = None,
    task: str = "mqar",
) -> Comparison:
    """Compare the registered mechanisms (or ``modes``) on the shared task and cost axes.

    Args:
        modes: registry names; ``None`` for every registered mechanism.
        preset: a name in :data:`PRESETS`, a :class:`Preset`, or ``None``
            (``"gpu"`` on CUDA, ``"default"`` on the CPU).
        seed: the first seed; ``seeds`` (a count, default the preset's) runs ``seed, seed + 1, ...``, or
            ``seeds`` lists them. Every learning number is measured for every seed; the cost, the
            attention probes and the explorer use the first.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        progress: tqdm bars (mechanisms, training steps).
        cost, learn: run the cost measurements and the training half.
        workers: on the CPU, measure this many mechanisms (or MQAR runs) at once, each in its own process on
            one thread (``torch.multiprocessing``, spawned). What is learned is identical to ``workers=1``
            (each run is seeded and trains on one thread either way); timings are single-threaded, so
            compare them within one run. Mechanisms registered at run time (not by an ``attn`` module)
            are not visible to the workers.
        task: ``"mqar"`` (multi-query associative recall, :mod:`attn.compare.mqar`: the preset's point for
            every sequence mechanism and its grid cells) or ``"recall"`` (the one-query recall task of
            :class:`PositionalRecallModel`, the easy floor).

    Returns:
        a :class:`Comparison`, in chapter order whatever the order of ``modes``.

    Raises:
        KeyError: an unknown name in ``modes`` (the message lists the valid ones).
        ValueError: an unknown preset or task, an unavailable device, ``workers < 1`` or bad ``seeds``.
    """
    from tqdm.auto import tqdm

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    chosen = _select(modes)
    dev = resolve_device(device)
    p = get_preset(preset, dev)
    seed_list = _seed_list(seed, seeds, p)
    t0 = time.perf_counter()
    pool = None
    if workers > 1 and dev.type == "cpu" and len(chosen) >= 2:
        import concurrent.futures as cf

        import torch.multiprocessing as mp

        pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)
    try:
        per_seed: list[list[MechanismResult]] = []
        for i, s in enumerate(seed_list):
            do_cost = cost and i == 0
            do_learn = learn and (task == "recall" or p.own_task_learning)
            if not (do_cost or do_learn):
                break
            bar = tqdm(total=len(chosen), desc=f"compare, seed {s}", disable=not progress, unit="mechanism")
            if pool is None:
                results = []
                for mech in chosen:
                    bar.set_postfix_str(mech.name)
                    results.append(run_one(mech, p, s, dev, progress=progress, cost=do_cost, learn=do_learn,
                                           task=task))
                    bar.update()
            else:
                futures = [pool.submit(_run_one_in_worker, m.name, p, s, str(dev), do_cost, do_learn, task)
                           for m in chosen]
                for _ in cf.as_completed(futures):
                    bar.update()
                results = [f.result() for f in futures]
            bar.close()
            per_seed.append(results)
        results = _merge_seeds(per_seed, seed_list) if per_seed else [
            MechanismResult(m.name, m.chapter, m.paper, m.complexity, m.data) for m in chosen]
        runs = pd.DataFrame()
        if task == "mqar" and learn:
            runs = _run_mqar_all(results, p, seed_list, dev, workers, pool)
            _fold_mqar(results, runs, p)
    finally:
        if pool is not None:
            pool.shutdown()
    return Comparison(p, seed_list[0], str(dev), results, wall_s=time.perf_counter() - t0, seeds=seed_list,
                      task=task, mqar=runs)


TASKS = ("mqar", "recall")

#: metrics averaged over seeds (with their min and max for ``accuracy``) when a run has several seeds
_SEED_MEANS = ("accuracy", "accuracy_near", "accuracy_far", "eval_loss", "final_train_loss", "train_s")


def _merge_seeds(per_seed: list[list[MechanismResult]], seeds: list[int]) -> list[MechanismResult]:
    """The first seed's results, with every learning metric replaced by its mean over the seeds that ran it."""
    first = per_seed[0]
    if len(per_seed) == 1:
        for r in first:
            _spread(r, [r.metrics.get("accuracy")], seeds[:1])
        return first
    for i, r in enumerate(first):
        values = {k: [rs[i].metrics.get(k) for rs in per_seed] for k in (*_SEED_MEANS, "steps_to_target")}
        for k in _SEED_MEANS:
            got = [float(v) for v in values[k] if v is not None and not pd.isna(v)]
            if got:
                r.metrics[k] = sum(got) / len(got)
        steps = values["steps_to_target"]
        r.metrics["steps_to_target"] = _median_censored(steps)
        _spread(r, values["accuracy"], seeds[: len(per_seed)])
    return first


def _spread(r: MechanismResult, accs: list[Any], seeds: list[int]) -> None:
    got = [float(a) for a in accs if a is not None and not pd.isna(a)]
    r.metrics["seeds"] = len(got) or None
    r.metrics["accuracy_min"] = min(got) if got else None
    r.metrics["accuracy_max"] = max(got) if got else None
    r.per_seed = {"seed": seeds[: len(accs)], "accuracy": list(accs)}


def _median_censored(values: list[Any]) -> int | None:
    """Median steps-to-target, a run that never reached the target counting as the largest (``None``)."""
    order = sorted(values, key=lambda v: float("inf") if v is None or pd.isna(v) else float(v))
    mid = order[(len(order) - 1) // 2]
    return None if mid is None or pd.isna(mid) else int(mid)


def _run_mqar_all(results: list[MechanismResult], p: Preset, seeds: list[int], dev: torch.device,
                  workers: int, pool: Any) -> pd.DataFrame:
    """MQAR: the preset's point for every sequence mechanism, and each one's grid cells, for every seed."""
    from .mqar import run_mqar

    names = [r.name for r in results if _mqar_able(r)]
    jobs = [(n, p.mqar_point) for n in names] + [(n, c) for n in names for c in p.mqar_cells(n)]
    if not jobs:
        return pd.DataFrame()
    return run_mqar(jobs, None, seeds, workers=workers, pool=pool, steps_for=p.mqar_steps_for,
                    probe=p.probe_examples, num_heads=p.mqar_heads, batch_size=p.mqar_batch, lr=p.mqar_lr,
                    target_acc=p.target_acc, device=dev)


def _mqar_able(r: MechanismResult) -> bool:
    from ..registry import get

    return r.data == "sequence" and not r.task and get(r.name).build is not None


def _fold_mqar(results: list[MechanismResult], runs: pd.DataFrame, p: Preset) -> None:
    """Put each mechanism's MQAR point (mean and range over seeds) into its summary metrics."""
    if not len(runs):
        return
    c = p.mqar_point
    point = runs[(runs["pairs"] == c.pairs) & (runs["width"] == c.width) & (runs["seq_len"] == c.length)]
    for r in results:
        mine = point[point["name"] == r.name]
        if not len(mine):
            continue
        ok = mine[mine["status"] == "ok"]
        if not len(ok):
            r.status = "error"
            r.notes.append(str(mine["status"].iloc[0]))
            continue
        r.metrics["seq_len"] = c.length
        r.metrics["mqar_pairs"], r.metrics["mqar_width"] = c.pairs, c.width
        r.metrics["task_name"] = f"MQAR, {c.pairs} pairs, width {c.width}"
        for k, col in (("accuracy", "acc"), ("accuracy_near", "acc_near"), ("accuracy_far", "acc_far"),
                       ("eval_loss", "loss"), ("model_params", "params")):
            r.metrics[k] = float(ok[col].mean())
        r.metrics["steps_to_target"] = _median_censored(list(ok["steps_to_target"]))
        _spread(r, list(mine["acc"]), list(mine["seed"]))
        first = ok.iloc[0]
        for k in ("query_entropy", "answer_weight", "uniform_entropy"):
            v = first.get(k)
            r.metrics[k] = None if v is None or pd.isna(v) else float(v)
        if isinstance(first.get("weights_note"), str) and first["weights_note"]:
            r.notes.append(first["weights_note"])
        ents = first.get("query_entropies")
        if ents is not None and not (isinstance(ents, float) and pd.isna(ents)):
            r.query_entropy = ents
        if isinstance(first.get("history"), pd.DataFrame):
            r.history = first["history"]
        probe = first.get("probe")
        if isinstance(probe, dict):
            r.probe = {k: v for k, v in probe.items() if k != "weights"}
            r.probe_weights = probe["weights"]
