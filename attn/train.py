"""A small seeded trainer the chapters share.

``train`` runs Adam for a fixed number of steps on batches drawn from a
seeded generator, with a progress bar, and returns a :class:`History` of the
loss and of whatever metrics the loss function reports.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["History", "Recorder", "cpu_threads", "set_seed", "train", "evaluate"]

Batch = dict[str, Tensor]
ModelT = TypeVar("ModelT", bound=nn.Module)
# ``(model, batch) -> (loss, metrics)``, generic in the model so a loss written for one model class type-checks
LossFn = Callable[[ModelT, Batch], tuple[Tensor, dict[str, float]]]


def set_seed(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same, for data."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` CPU threads (``None``: leave torch's setting), then restore it.

    The chapters' models are tiny: their matrix products are far too small to
    gain from several threads, and the threads' synchronisation then costs more
    than it saves. Measured on the book's 2-core machine, training chapter 1's
    model took 4.5 s on one thread and 198 s on two while other processes
    competed for the cores.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class History:
    """Logged training curves: ``step``, ``loss`` and one list per metric."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def log(self, step: int, loss: float, metrics: dict[str, float]) -> None:
        self.step.append(step)
        self.loss.append(loss)
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append(v)

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd  # loaded on use: ``import attn`` stays free of pandas

        return pd.DataFrame({"step": self.step, "loss": self.loss, **self.metrics})

    def first_step_reaching(self, metric: str, target: float) -> int | None:
        """First logged step at which ``metric >= target`` (``None`` if never)."""
        # strict=False: a metric that was never logged gives [], and then no step reaches the target
        for s, v in zip(self.step, self.metrics.get(metric, []), strict=False):
            if v >= target:
                return s
        return None


class Recorder:
    """A ``train`` callback that records ``(step, fn(model))`` in eval mode, without gradients.

    Use it to watch something (attention maps, a probe's output) change during training.
    """

    def __init__(self, fn: Callable[[nn.Module], Any]) -> None:
        self.fn = fn
        self.records: list[tuple[int, Any]] = []

    def __call__(self, step: int, model: nn.Module) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.records.append((step, self.fn(model)))
        model.train(was_training)


def train(
    model: ModelT,
    sample: Callable[[int, torch.Generator], Batch],
    loss_fn: LossFn[ModelT],
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 10,
    device: torch.device | str = "cpu",
    progress: bool = True,
    callback: Callable[[int, ModelT], Any] | None = None,
    grad_clip: float | None = 1.0,
    num_threads: int | None = 1,
    foreach: bool | None = None,
) -> History:
    """Train ``model`` with Adam for ``steps`` steps.

    Args:
        sample: ``(batch_size, generator) -> batch`` (e.g. a task's ``sample``).
        loss_fn: ``(model, batch) -> (loss, metrics)``.
        seed: seeds the model-independent randomness (data order, dropout).
        callback: called as ``callback(step, model)`` at every logged step.
        num_threads: CPU threads while training (see :func:`cpu_threads`); ``None`` keeps
            torch's setting. Ignored on CUDA.
        foreach: Adam's and the gradient clipping's multi-tensor implementation (``True``: one
            call for all parameters, the same arithmetic with less Python overhead per step, which
            dominates tiny models on a CPU); ``None`` keeps torch's default (off on a CPU).

    Returns:
        The :class:`History`, logged every ``log_every`` steps (metrics from the
        training batch, in eval mode for nothing: they are cheap running values).
    """
    from tqdm.auto import tqdm

    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    gen = set_seed(seed)
    with cpu_threads(num_threads if torch.device(device).type == "cpu" else None):
        return _train_loop(model, sample, loss_fn, steps, batch_size, lr, gen, log_every, device, progress, callback,
                           grad_clip, tqdm, foreach)


def _train_loop(
    model: ModelT,
    sample: Callable[[int, torch.Generator], Batch],
    loss_fn: LossFn[ModelT],
    steps: int,
    batch_size: int,
    lr: float,
    gen: torch.Generator,
    log_every: int,
    device: torch.device | str,
    progress: bool,
    callback: Callable[[int, ModelT], Any] | None,
    grad_clip: float | None,
    tqdm: Any,
    foreach: bool | None = None,
) -> History:
    """The body of :func:`train`, run inside its thread setting."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=foreach)
    hist = History()
    bar = tqdm(range(1, steps + 1), disable=not progress, desc=type(model).__name__, mininterval=1.0)
    for step in bar:
        batch = {k: v.to(device) for k, v in sample(batch_size, gen).items()}
        loss, metrics = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=foreach)
        opt.step()
        if step % log_every == 0 or step == steps:
            hist.log(step, float(loss.detach()), {k: float(v) for k, v in metrics.items()})
            bar.set_postfix(loss=f"{hist.loss[-1]:.3f}", refresh=False)
            if callback is not None:
                callback(step, model)
    model.eval()
    return hist


@torch.no_grad()
def evaluate(
    model: ModelT,
    sample: Callable[[int, torch.Generator], Batch],
    loss_fn: LossFn[ModelT],
    batch_size: int = 512,
    seed: int = 12345,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Loss and metrics of ``model`` (eval mode) on one fresh held-out batch."""
    model.to(device).eval()
    batch = {k: v.to(device) for k, v in sample(batch_size, torch.Generator().manual_seed(seed)).items()}
    loss, metrics = loss_fn(model, batch)
    return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
