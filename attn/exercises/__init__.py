"""Exercises a reader can check: one module per chapter, each checker diagnoses the likely mistake.

Each chapter's exercises live in ``attn/exercises/<module>.py``, named like the chapter's layer module
(``local.py`` for chapter 8). A module defines ``EXERCISES``, a tuple of :class:`Exercise`, and one
``check_<name>`` per exercise (``check_<name> = EXERCISE.checker()``); the solutions are ordinary functions
of that module, so the page shows them from the package and the build runs them.

In a chapter::

    from attn.exercises import local as ex

    def band_mask(n: int, w: int) -> torch.Tensor:
        raise NotImplementedError  # your code here

    ex.check_band_mask(band_mask)        # "Not attempted yet" until the stub is replaced

and, behind the solution's toggle, ``show_solution(ex.BAND_MASK)``: the solution's source, checked.

:func:`all_exercises` finds every module's exercises; ``tests/test_exercises.py`` checks, for each one,
that its solution passes, that the stub is "not attempted", and that every mistake in its table fails
with its own diagnosis.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ._core import NOT_ATTEMPTED, Case, Exercise, Mistake, Report, describe_difference, letter_set

__all__ = [
    "Case", "Exercise", "Mistake", "Report", "NOT_ATTEMPTED", "describe_difference", "letter_set",
    "all_exercises", "by_chapter", "show_solution",
]


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def all_exercises() -> list[Exercise]:
    """Every exercise of every chapter module, in chapter order then as each module lists them."""
    found: list[Exercise] = []
    for name in _modules():
        module = importlib.import_module(f"{__name__}.{name}")
        exercises = getattr(module, "EXERCISES", ())
        for ex in exercises:
            if not isinstance(ex, Exercise):
                raise TypeError(f"attn.exercises.{name}.EXERCISES holds {type(ex).__name__}, not Exercise")
        found.extend(exercises)
    return sorted(found, key=lambda e: e.chapter)


def by_chapter() -> dict[int, list[Exercise]]:
    """The exercises grouped by chapter number."""
    out: dict[int, list[Exercise]] = {}
    for ex in all_exercises():
        out.setdefault(ex.chapter, []).append(ex)
    return out


def show_solution(exercise: Exercise, answer: Any = None) -> Any:
    """Display the solution's source from the package and check it (raises if it does not pass).

    For a ``"value"`` exercise, ``answer`` (the value the solution computes, by default) is checked and shown.
    """
    from IPython.display import Markdown, display

    from ..notebook import show_source

    display(show_source(exercise.solution))
    if exercise.kind == "value":
        value = exercise.solution() if answer is None else answer
        report = exercise.check(value).require()
        display(Markdown(f"The answer: `{value!r}`. " + report._repr_markdown_()))
        return None
    return exercise.check(exercise.solution if answer is None else answer).require()
