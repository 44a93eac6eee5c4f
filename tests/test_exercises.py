"""Every exercise, both ways: its solution passes, its stub is "not attempted", each typical mistake fails with
its own diagnosis; and every mechanism chapter has at least two exercises on its page, each with a checker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from attn.exercises import NOT_ATTEMPTED, Case, Exercise, Mistake, all_exercises, by_chapter, describe_difference
from attn.registry import CHAPTERS

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = all_exercises()
MISTAKES = [(ex, m) for ex in EXERCISES for m in ex.mistakes]


def _stub(*args: object, **kwargs: object) -> object:
    raise NotImplementedError


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda e: f"ch{e.chapter}-{e.name}")
def test_solution_passes_and_stub_is_not_attempted(ex: Exercise) -> None:
    report = ex.check(ex.solution if ex.kind == "function" else ex.solution())
    assert report.passed, report.text()
    stub = _stub if ex.kind == "function" else None
    assert ex.check(stub).status == NOT_ATTEMPTED


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda e: f"ch{e.chapter}-{e.name}")
def test_every_exercise_has_a_mistake_table_and_a_checker(ex: Exercise) -> None:
    import importlib

    assert len(ex.mistakes) >= 2, f"{ex.name}: at least two typical mistakes with their diagnoses"
    modules = list(importlib.import_module("attn.exercises")._modules())
    found = [m for m in modules if getattr(importlib.import_module(f"attn.exercises.{m}"), f"check_{ex.name}", None)]
    assert found, f"no module defines check_{ex.name}"
    assert ex.title and ex.solution.__doc__, f"{ex.name}: a title and a solution docstring"


@pytest.mark.parametrize(("ex", "mistake"), MISTAKES, ids=lambda x: getattr(x, "name", ""))
def test_each_mistake_fails_with_its_own_diagnosis(ex: Exercise, mistake: Mistake) -> None:
    answer = mistake.fn if ex.kind == "function" else mistake.fn()
    report = ex.check(answer)
    assert not report.passed, f"{ex.name}: the mistake {mistake.name!r} passes the checker"
    assert report.mistake == mistake.name, (
        f"{ex.name}: the mistake {mistake.name!r} is diagnosed as {report.mistake!r}: {report.diagnosis}")
    assert report.diagnosis == mistake.diagnosis


def test_diagnoses_are_distinct_within_an_exercise() -> None:
    for ex in EXERCISES:
        texts = [m.diagnosis for m in ex.mistakes]
        assert len(set(texts)) == len(texts), ex.name


MECHANISM_CHAPTERS = [c for c in CHAPTERS if c.number != 24]


@pytest.mark.parametrize("chapter", MECHANISM_CHAPTERS, ids=lambda c: f"ch{c.number:02d}")
def test_chapter_has_checked_exercises_on_its_page(chapter) -> None:  # type: ignore[no-untyped-def]
    exercises = by_chapter().get(chapter.number, [])
    assert len(exercises) >= 2, f"chapter {chapter.number} has {len(exercises)} exercise(s); at least 2"
    page = (ROOT / chapter.notebook).with_suffix(".md").read_text()
    assert "\n## Exercises\n" in page, f"chapter {chapter.number}: no '## Exercises' section"
    directives = re.findall(r"```\{exercise\}", page)
    assert len(directives) >= len(exercises), f"chapter {chapter.number}: an exercise directive per exercise"
    for ex in exercises:
        assert f"check_{ex.name}(" in page, f"chapter {chapter.number}: the page never calls check_{ex.name}"
        assert re.search(rf"show_solution\(\w+\.{ex.name.upper()}\b", page), (
            f"chapter {chapter.number}: no show_solution(...{ex.name.upper()}) behind a solution toggle")
    starts = re.findall(r"```\{solution-start\}[^\n]*\n(?::[^\n]*\n)*", page)
    assert len(starts) >= len(exercises), f"chapter {chapter.number}: a solution block per exercise"
    assert all(":class: dropdown" in s for s in starts), f"chapter {chapter.number}: solutions hidden (dropdown)"


def test_framework_reports_what_differs() -> None:
    e = torch.arange(6.0).reshape(2, 3)
    assert describe_difference(e, e) is None
    assert "constant 2" in (describe_difference(2 * e, e) or "")
    assert "shape (3, 2)" in (describe_difference(e.T, e) or "")
    assert "NaN" in (describe_difference(e * float("nan"), e) or "")
    m = torch.tensor([[True, False], [True, True]])
    assert "inverted" in (describe_difference(~m, m) or "")
    assert "too high" in (describe_difference(3.0, 2.0) or "")
    assert describe_difference((1, e), (1, e)) is None


def test_framework_diagnoses_exceptions_mutation_and_gradients() -> None:
    def double(x: torch.Tensor) -> torch.Tensor:
        """Twice x."""
        return 2 * x

    ex = Exercise("double", 0, "Double", double, cases=lambda g: [Case((torch.randn(3, generator=g),))], grad=True)
    assert ex.check(double).passed
    assert "raised `ValueError: no`" in ex.check(lambda x: (_ for _ in ()).throw(ValueError("no"))).diagnosis

    def mutate(x: torch.Tensor) -> torch.Tensor:
        x.data.mul_(2)
        return x.detach().clone()

    assert "in place" in ex.check(mutate).diagnosis
    assert "no gradient reaches `x`" in ex.check(lambda x: 2 * x.detach()).diagnosis
    assert ex.check(lambda x: 2 * x + 1).mistake == "generic"
    with pytest.raises(AssertionError, match="Double"):
        ex.check(lambda x: x).require()
