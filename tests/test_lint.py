"""The code base stays lint- and type-clean: ruff and mypy, configured in pyproject.toml, report nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    """The ruff of this interpreter's environment: the binary next to ``sys.executable``, else its module."""
    binary = Path(sys.executable).parent / "ruff"
    return [str(binary)] if binary.exists() else [sys.executable, "-m", "ruff"]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ruff_reports_nothing():
    proc = _run([*_ruff(), "check", "--no-fix", "--output-format", "concise", "attn", "tests", "book"], timeout=120)
    assert proc.returncode == 0, f"ruff check attn tests book found:\n{proc.stdout}{proc.stderr}"


def test_mypy_reports_nothing():
    # the files to check come from [tool.mypy] in pyproject.toml (see the test below)
    proc = _run([sys.executable, "-m", "mypy"], timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Success" in out, f"mypy (config in pyproject.toml) found:\n{out}"


def test_mypy_config_covers_the_package():
    """An empty or mistyped ``files`` would let mypy succeed while checking nothing."""
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    files = mypy["files"]
    assert isinstance(files, list) and "attn" in files and "book/build.py" in files, files
    assert all((ROOT / f).exists() for f in files), files
    assert mypy.get("warn_unused_ignores") is True  # stale ignore comments are findings too


def test_own_task_is_generic_in_its_model(tmp_path: Path):
    """``OwnTask[M]``: a loss written for another model class is a type error, so tasks pass their real loss functions."""
    snippet = (
        "from attn.experiments.attention_pooling import SetClassifier, _regression_loss, set_loss\n"
        "from attn.registry import OwnTask\n"
        "def good(task: OwnTask[SetClassifier]) -> None:\n"
        "    task.loss = set_loss\n"
        "def bad(task: OwnTask[SetClassifier]) -> None:\n"
        "    task.loss = _regression_loss\n"
    )
    (tmp_path / "own_task_snippet.py").write_text(snippet)
    proc = _run([sys.executable, "-m", "mypy", "--no-error-summary", str(tmp_path / "own_task_snippet.py")], timeout=600)
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "own_task_snippet.py:6:" in errors[0] and "NadarayaWatson" in errors[0], proc.stdout + proc.stderr
