"""Each chapter's experiments, apart from its layers: tasks, task models, losses and own-task factories.

A mechanism module (``attn/local.py``, ``attn/graph.py``, ...) holds the layer
and its kernel only; what a chapter *does* with the layer -- the synthetic
task that shows what the mechanism is for, the small model around the layer,
the loss, the sizes -- lives in ``attn/experiments/<module>.py``, named after
the mechanism module of its chapter. Layers never import from here.

Own tasks. A mechanism whose data is not a token sequence (graphs, images,
sets, documents, pairs) is measured by the comparison on its own task: its
experiment module declares ``OWN_TASKS = {"mechanism-name": factory}`` with
``factory(size) -> attn.registry.OwnTask`` and ``size`` one of :data:`SIZES`.
A comparison preset names the size it wants (``Preset.task_size``), so a new
preset edits no experiment.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args

from ..registry import OwnTask

__all__ = ["TaskSize", "SIZES", "sized", "own_tasks", "own_task"]

#: The sizes of an own task: a smoke run (tests), the book's executed page, a full CPU run, a GPU run.
TaskSize = Literal["quick", "book", "full", "large"]
SIZES: tuple[str, ...] = get_args(TaskSize)

T = TypeVar("T")


def sized(size: str, *, quick: T, book: T, full: T, large: T) -> T:
    """The value for ``size``; a ``ValueError`` names the valid sizes."""
    table: dict[str, T] = {"quick": quick, "book": book, "full": full, "large": large}
    try:
        return table[size]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task size {size!r}; one of {', '.join(SIZES)}") from None


OwnTaskFactory = Callable[[str], OwnTask[Any]]

_OWN: dict[str, OwnTaskFactory] | None = None


def own_tasks() -> dict[str, OwnTaskFactory]:
    """Every own-task factory of the book, by mechanism name (imports every experiment module once)."""
    global _OWN
    if _OWN is None:
        found: dict[str, OwnTaskFactory] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            for name, factory in getattr(module, "OWN_TASKS", {}).items():
                if name in found:
                    raise ValueError(f"own task {name!r} is declared twice (again in attn.experiments.{info.name})")
                found[name] = factory
        _OWN = found
    return _OWN


def own_task(name: str, size: str = "book") -> OwnTask[Any]:
    """Build mechanism ``name``'s own task at ``size``; a ``KeyError`` lists the mechanisms that have one."""
    tasks = own_tasks()
    if name not in tasks:
        raise KeyError(f"no own task for {name!r}; mechanisms with one: {', '.join(sorted(tasks))}")
    return tasks[name](size)
