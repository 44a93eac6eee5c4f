"""Running the comparison: :func:`run` and :func:`run_one`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

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
) -> MechanismResult:
    """Measure one mechanism (see :func:`run`); ``cost``/``learn`` switch the two halves."""
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


def _run_one_in_worker(name: str, preset: Preset, seed: int, device: str, cost: bool, learn: bool) -> MechanismResult:
    return run_one(name, preset, seed, device, progress=False, cost=cost, learn=learn)


def run(
    modes: Sequence[str] | None = None,
    preset: str | Preset | None = "book",
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    cost: bool = True,
    learn: bool = True,
    workers: int = 1,
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
        workers: on the CPU, measure this many mechanisms at once, each in its
            own process on one thread (``torch.multiprocessing``, spawned). What
            is learned is identical to ``workers=1`` (each mechanism is seeded
            and trains on one thread either way); timings are single-threaded,
            so compare them within one run. Mechanisms registered at run time
            (not by an ``attn`` module) are not visible to the workers.

    Returns:
        a :class:`Comparison`, in chapter order whatever the order of ``modes``.

    Raises:
        KeyError: an unknown name in ``modes`` (the message lists the valid ones).
        ValueError: an unknown preset, an unavailable device, or ``workers < 1``.
    """
    from tqdm.auto import tqdm

    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    chosen = _select(modes)
    dev = resolve_device(device)
    p = get_preset(preset, dev)
    t0 = time.perf_counter()
    bar = tqdm(total=len(chosen), desc="compare", disable=not progress, unit="mechanism")
    if workers == 1 or dev.type != "cpu" or len(chosen) < 2:
        results = []
        for mech in chosen:
            bar.set_postfix_str(mech.name)
            results.append(run_one(mech, p, seed, dev, progress=progress, cost=cost, learn=learn))
            bar.update()
    else:
        import concurrent.futures as cf

        import torch.multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
            futures = [pool.submit(_run_one_in_worker, m.name, p, seed, str(dev), cost, learn) for m in chosen]
            for _ in cf.as_completed(futures):
                bar.update()
            results = [f.result() for f in futures]
    bar.close()
    return Comparison(p, seed, str(dev), results, wall_s=time.perf_counter() - t0)
