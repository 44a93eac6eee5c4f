"""The book pipeline stops on a failing cell and names the notebook and the cell."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book"))
import build  # noqa: E402


def test_failing_cell_stops_execution_and_is_named(tmp_path, monkeypatch, capsys):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "98_broken.md").write_text(
        "---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n"
        "kernelspec:\n  display_name: Python 3\n  language: python\n  name: python3\n---\n\n# Broken\n\n"
        "```{code-cell} ipython3\n:tags: [parameters]\nseed = 0\ndevice = \"auto\"\n```\n\n"
        "```{code-cell} ipython3\nx = 1\n```\n\n"
        "```{code-cell} ipython3\nraise RuntimeError(\"boom\")\n```\n\n"
        "```{code-cell} ipython3\nnever_reached = True\n```\n"
    )
    monkeypatch.setattr(build, "NOTEBOOKS", nbdir)
    monkeypatch.setattr(build, "SRC", tmp_path / "src")
    monkeypatch.setattr(build, "REPORTS", tmp_path / "reports")
    monkeypatch.setattr(build, "ROOT", tmp_path)
    (tmp_path / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    assert build.sync() == 0
    assert build.execute() == 1
    out = capsys.readouterr().out
    assert "FAILED notebooks/98_broken.ipynb" in out and "RuntimeError: boom" in out
    assert "cell " in out
    report = (tmp_path / "reports" / "execution.json").read_text()
    assert '"failed"' in report


def test_sync_check_detects_drift(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    src = nbdir / "97_tiny.md"
    src.write_text("---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n---\n\n# Tiny\n\n```{code-cell} ipython3\n:tags: [parameters]\nseed = 0\n```\n")
    monkeypatch.setattr(build, "NOTEBOOKS", nbdir)
    monkeypatch.setattr(build, "ROOT", tmp_path)
    (tmp_path / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    assert build.sync(check=True) == 1  # no .ipynb yet
    assert build.sync() == 0
    assert build.sync(check=True) == 0
    src.write_text(src.read_text().replace("seed = 0", "seed = 1"))
    assert build.sync(check=True) == 1
    with pytest.raises(SystemExit):
        build.execute(["no-such-notebook"])


def test_sync_check_ignores_the_jupytext_version_stamp(tmp_path, monkeypatch):
    """A new jupytext release rewrites its own version stamp, not the notebook: that is no drift (a fresh CI venv
    with jupytext 1.19.7 reported all 60 files out of sync against sources stamped 1.19.6)."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    src = nbdir / "96_stamp.md"
    src.write_text("---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n---\n\n# Stamp\n\n```{code-cell} ipython3\n:tags: [parameters]\nseed = 0\n```\n")
    monkeypatch.setattr(build, "NOTEBOOKS", nbdir)
    monkeypatch.setattr(build, "ROOT", tmp_path)
    (tmp_path / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    assert build.sync() == 0
    for path in (src, src.with_suffix(".ipynb")):
        text = path.read_text()
        assert "jupytext_version" in text
        path.write_text(text.replace("jupytext_version: 1.", "jupytext_version: 0.").replace('"jupytext_version": "1.', '"jupytext_version": "0.'))
    assert build.sync(check=True) == 0
    src.write_text(src.read_text().replace("seed = 0", "seed = 2"))
    assert build.sync(check=True) == 1
