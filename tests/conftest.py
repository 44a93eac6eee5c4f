"""Shared fixtures. The slow ones execute the notebooks and build the book (incrementally) once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="session")
def executed_notebooks() -> dict:
    """Every notebook executed with papermill; return the timing report (``_build/reports/execution.json``).

    ``book/build.py execute`` executes only the notebooks whose cache key changed
    (source, parameters, the ``attn`` package, the installed environment), so
    right after ``make book`` it executes none. Each entry keeps the wall and
    kernel CPU times measured when the notebook last did execute, and the tests
    check the budgets, the outputs, the build and the browser on every run.
    """
    report = BUILD / "reports" / "execution.json"
    if os.environ.get("ATTN_REUSE_BUILD") and report.exists():  # developer shortcut: test the existing build as it is
        return json.loads(report.read_text())
    proc = _run("execute")
    if proc.returncode != 0:
        pytest.fail(f"notebook execution failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(report.read_text())


@pytest.fixture(scope="session")
def built_book(executed_notebooks) -> Path:
    """Fetch the front-end assets and build the HTML book (warnings are errors); return _build/html.

    The build is skipped when its inputs are those of the last successful build
    (``book/build.py html``); ``_build/reports/sphinx.log`` is that build's log.
    """
    if os.environ.get("ATTN_REUSE_BUILD") and (BUILD / "html" / "index.html").exists():
        return BUILD / "html"
    for step in ("assets", "html"):
        proc = _run(step)
        if proc.returncode != 0:
            pytest.fail(f"`book/build.py {step}` failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return BUILD / "html"
