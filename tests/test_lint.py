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
