"""The book pipeline: it stops on a failing cell and names it; its cache executes only what changed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book"))
import build  # noqa: E402


def _point_build_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the pipeline at a scratch book in ``tmp_path`` (sources, staging, reports, config); returns its notebooks/."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    monkeypatch.setattr(build, "NOTEBOOKS", nbdir)
    monkeypatch.setattr(build, "SRC", tmp_path / "src")
    monkeypatch.setattr(build, "REPORTS", tmp_path / "reports")
    monkeypatch.setattr(build, "ROOT", tmp_path)
    (tmp_path / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    return nbdir


def test_failing_cell_stops_execution_and_is_named(tmp_path, monkeypatch, capsys):
    nbdir = _point_build_at(tmp_path, monkeypatch)
    (nbdir / "98_broken.md").write_text(
        "---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n"
        "kernelspec:\n  display_name: Python 3\n  language: python\n  name: python3\n---\n\n# Broken\n\n"
        "```{code-cell} ipython3\n:tags: [parameters]\nseed = 0\ndevice = \"auto\"\n```\n\n"
        "```{code-cell} ipython3\nx = 1\n```\n\n"
        "```{code-cell} ipython3\nraise RuntimeError(\"boom\")\n```\n\n"
        "```{code-cell} ipython3\nnever_reached = True\n```\n"
    )
    assert build.sync() == 0
    assert build.execute() == 1
    out = capsys.readouterr().out
    assert "FAILED notebooks/98_broken.ipynb" in out and "RuntimeError: boom" in out
    assert "cell " in out
    report = (tmp_path / "reports" / "execution.json").read_text()
    assert '"failed"' in report


def _scratch_book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """A book of one tiny text notebook (a parameters cell) in ``tmp_path``; returns its source."""
    src = _point_build_at(tmp_path, monkeypatch) / name
    src.write_text("---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n---\n\n# Scratch\n\n```{code-cell} ipython3\n:tags: [parameters]\nseed = 0\n```\n")
    return src


def test_sync_check_detects_drift(tmp_path, monkeypatch):
    src = _scratch_book(tmp_path, monkeypatch, "97_tiny.md")
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
    src = _scratch_book(tmp_path, monkeypatch, "96_stamp.md")
    assert build.sync() == 0
    for path in (src, src.with_suffix(".ipynb")):
        text = path.read_text()
        assert "jupytext_version" in text
        path.write_text(text.replace("jupytext_version: 1.", "jupytext_version: 0.").replace('"jupytext_version": "1.', '"jupytext_version": "0.'))
    assert build.sync(check=True) == 0
    src.write_text(src.read_text().replace("seed = 0", "seed = 2"))
    assert build.sync(check=True) == 1


# --------------------------------------------------------------------------- the execution cache

TINY = (
    "---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n"
    "kernelspec:\n  display_name: Python 3\n  language: python\n  name: python3\n---\n\n# {title}\n\n"
    "```{{code-cell}} ipython3\n:tags: [parameters]\nseed = 0\ndevice = \"auto\"\n```\n\n"
    "```{{code-cell}} ipython3\n{code}\n```\n"
)


class FakeRunner:
    """Stands in for papermill: writes the output notebook, returns the times it is told to."""

    def __init__(self, cpu: dict[str, float] | None = None):
        self.calls: list[str] = []
        self.cpu = cpu or {}

    def __call__(self, job: build.Job) -> dict:
        self.calls.append(job.name)
        Path(job.output).write_text(Path(job.source).read_text())
        cpu = self.cpu.get(job.name, 1.0)
        return {"status": "ok", "seconds": cpu + 0.5, "cpu_seconds": cpu}


@pytest.fixture
def tiny_book(tmp_path, monkeypatch):
    """Two tiny chapters and a tiny `attn` package in a scratch folder, the pipeline pointed at them."""
    nbdir = _point_build_at(tmp_path, monkeypatch)
    for name, code in (("01_one", "x = 1"), ("02_two", "y = 2")):
        (nbdir / f"{name}.md").write_text(TINY.format(title=name, code=code))
    pkg = tmp_path / "attn"
    pkg.mkdir()
    (pkg / "core.py").write_text("A = 1\n")
    monkeypatch.setattr(build, "PACKAGE", pkg)
    assert build.sync() == 0
    return tmp_path


def _report(root: Path) -> dict:
    return json.loads((root / "reports" / "execution.json").read_text())


def test_unchanged_notebooks_are_not_executed_again(tiny_book):
    run = FakeRunner()
    assert build.execute(runner=run) == 0
    assert sorted(run.calls) == ["01_one", "02_two"]
    first = _report(tiny_book)
    assert not any(e["cached"] for e in first.values())
    run.calls.clear()
    assert build.execute(runner=run) == 0
    assert run.calls == []
    second = _report(tiny_book)
    assert all(e["cached"] for e in second.values())
    for name in first:  # the times measured when it did execute are kept
        assert second[name]["seconds"] == first[name]["seconds"]
        assert second[name]["cpu_seconds"] == first[name]["cpu_seconds"]


def test_a_changed_source_re_executes_only_that_notebook(tiny_book):
    run = FakeRunner()
    build.execute(runner=run)
    run.calls.clear()
    md = tiny_book / "notebooks" / "02_two.md"
    md.write_text(md.read_text().replace("y = 2", "y = 3"))
    build.sync()
    assert build.execute(runner=run) == 0
    assert run.calls == ["02_two"]
    report = _report(tiny_book)
    assert report["01_one"]["cached"] and not report["02_two"]["cached"]


def test_a_changed_package_file_re_executes_everything(tiny_book):
    run = FakeRunner()
    build.execute(runner=run)
    run.calls.clear()
    (tiny_book / "attn" / "core.py").write_text("A = 2\n")
    build.execute(runner=run)
    assert sorted(run.calls) == ["01_one", "02_two"]
    run.calls.clear()
    (tiny_book / "attn" / "static").mkdir()
    (tiny_book / "attn" / "static" / "explorer.js").write_text("// new\n")  # the front end counts too
    build.execute(runner=run)
    assert sorted(run.calls) == ["01_one", "02_two"]


def test_changed_parameters_or_environment_re_execute(tiny_book, monkeypatch):
    run = FakeRunner()
    build.execute(runner=run)
    run.calls.clear()
    build.execute(parameters={"seed": 1}, runner=run)
    assert sorted(run.calls) == ["01_one", "02_two"]
    run.calls.clear()
    build.execute(parameters={"seed": 1}, runner=run)
    assert run.calls == []
    monkeypatch.setattr(build, "environment_digest", lambda: "another torch")
    build.execute(parameters={"seed": 1}, runner=run)
    assert sorted(run.calls) == ["01_one", "02_two"]


def test_a_missing_or_altered_output_is_executed_again(tiny_book):
    run = FakeRunner()
    build.execute(runner=run)
    run.calls.clear()
    (tiny_book / "src" / "notebooks" / "01_one.ipynb").unlink()
    out = tiny_book / "src" / "notebooks" / "02_two.ipynb"
    out.write_text(out.read_text() + " ")
    build.execute(runner=run)
    assert sorted(run.calls) == ["01_one", "02_two"]


def test_a_cached_notebook_over_budget_still_fails_the_budget_check(tiny_book):
    run = FakeRunner(cpu={"02_two": build.budget("02_two") + 5})
    build.execute(runner=run)
    run.calls.clear()
    assert build.execute(runner=run) == 0
    assert run.calls == []
    report = _report(tiny_book)
    assert report["02_two"]["cached"]
    assert build.budget_problem("01_one", report["01_one"]) is None
    problem = build.budget_problem("02_two", report["02_two"])
    assert problem and "02_two" in problem and "budget" in problem
    assert build.budget_problem("03_three", None) and build.budget_problem("x", {"status": "ok"})


def test_a_failed_notebook_is_never_taken_from_the_cache(tiny_book):
    calls = []

    def failing(job):
        calls.append(job.name)
        return {"status": "failed", "cell": 2, "exec_count": 1, "error": "RuntimeError: boom", "seconds": 1.0, "cpu_seconds": 1.0}

    assert build.execute(runner=failing) == 1
    assert calls == ["01_one"]  # stops at the first failure
    assert build.execute(runner=FakeRunner()) == 0
    assert not any(e["cached"] for e in _report(tiny_book).values())


def test_html_key_follows_the_executed_notebooks_and_the_book(tiny_book, monkeypatch):
    build.execute(runner=FakeRunner())
    (tiny_book / "_toc.yml").write_text("format: jb-book\n")
    (tiny_book / "book").mkdir()
    (tiny_book / "book" / "intro.md").write_text("# Intro\n")
    key = build.html_key()
    assert build.html_key() == key
    out = tiny_book / "src" / "notebooks" / "01_one.ipynb"
    out.write_text(out.read_text() + " ")
    assert build.html_key() != key
    key = build.html_key()
    (tiny_book / "book" / "intro.md").write_text("# Introduction\n")
    assert build.html_key() != key


@pytest.mark.slow  # two real kernels (~20 s)
def test_papermill_runs_in_parallel_workers_and_measures_the_kernels_cpu_time(tmp_path, monkeypatch, capfd):
    """Two real notebooks, two at a time: each kernel burns ~1 s of CPU on one thread, and reports it."""
    nbdir = _point_build_at(tmp_path, monkeypatch)
    burn = ("import os, time, torch\\nt = time.process_time()\\nwhile time.process_time() - t < 1.0:\\n    pass\\n"
            "print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    for name in ("01_burn", "02_burn"):
        (nbdir / f"{name}.md").write_text(TINY.format(title=name, code=burn.replace("\\n", "\n")))
    assert build.sync() == 0
    assert build.execute(jobs=2) == 0
    logs = capfd.readouterr()
    for noise in ("Unable to parse", "without encryption", "frozen modules", "Input Notebook", "WARNING"):
        assert noise not in logs.out + logs.err, noise
    report = _report(tmp_path)
    import nbformat

    for name in ("01_burn", "02_burn"):
        assert report[name]["jobs"] == 2
        assert 1.0 <= report[name]["cpu_seconds"] < 30, report[name]
        nb = nbformat.read(tmp_path / "src" / "notebooks" / f"{name}.ipynb", as_version=4)
        assert nb.cells[-1].outputs[0]["text"].split() == ["1", "1"]  # one thread in the kernel
    assert build.execute(jobs=2) == 0
    assert all(e["cached"] for e in _report(tmp_path).values())
    build.execute(["01_burn"], parameters={"sead": 1}, jobs=1)  # a real warning (a misspelt parameter) still shows
    assert "Passed unknown parameter: sead" in capfd.readouterr().err


def test_every_parameters_cell_parses_with_papermill(caplog):
    """papermill's inspection (`papermill --help-notebook`) finds every assignment, with no warning."""
    import jupytext
    from papermill.translators import PythonTranslator

    for md in build.notebook_sources():
        nb = jupytext.read(md)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assigned = [m.group(1) for m in re.finditer(r"^([A-Za-z_]\w*)\s*(?::[^=]*)?=", cell.source, re.M)]
        caplog.clear()
        found = [p.name for p in PythonTranslator.inspect(cell)]
        assert found == assigned, f"{md.name}: papermill sees {found}, the cell assigns {assigned}"
        assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()], md.name


# --------------------------------------------------------------------------- publishing

WORKFLOWS = ROOT / ".github" / "workflows"


def _actionlint() -> str:
    """The actionlint binary of the test extra (next to this interpreter), else one on PATH."""
    import shutil

    here = Path(sys.executable).with_name("actionlint")
    found = str(here) if here.exists() else shutil.which("actionlint")
    assert found, "actionlint is missing: install the test extra (pip install -e '.[test]')"
    return found


def test_workflows_pass_actionlint():
    import subprocess

    files = sorted(WORKFLOWS.glob("*.yml"))
    assert len(files) >= 2
    proc = subprocess.run([_actionlint(), "-no-color", "-oneline", *map(str, files)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflows_test_the_clone_and_publish_the_book():
    import yaml

    test = yaml.safe_load((WORKFLOWS / "test.yml").read_text())
    runs = [s.get("run", "") for job in test["jobs"].values() for s in job["steps"]]
    assert any("make test" in r for r in runs)
    pages = yaml.safe_load((WORKFLOWS / "pages.yml").read_text())
    steps = [s for job in pages["jobs"].values() for s in job["steps"]]
    uses = {s["uses"].split("@")[0] for s in steps if "uses" in s}
    assert {"actions/configure-pages", "actions/upload-pages-artifact", "actions/deploy-pages"} <= uses
    assert any("make book" in s.get("run", "") for s in steps)
    uploaded = " ".join(str(s.get("with", {}).get("path", "")) for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert "_build/src/notebooks" in uploaded and ".zip" in uploaded  # the executed notebooks, the HTML zipped
    assert pages[True]["push"]["branches"] == ["main"]  # yaml reads the key `on` as True
    assert pages["permissions"]["pages"] == "write" and pages["permissions"]["id-token"] == "write"


def test_license_and_readme_are_ready_to_publish():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Permission is hereby granted" in license_text
    readme = (ROOT / "README.md").read_text()
    assert "repository.url" in readme and "GitHub Pages" in readme and "fork" in readme
    assert "marked *coming*" not in readme


def test_html_build_is_skipped_when_its_inputs_are_unchanged(tiny_book, monkeypatch):
    build.execute(runner=FakeRunner())
    (tiny_book / "_toc.yml").write_text("format: jb-book\n")
    (tiny_book / "book").mkdir()
    html = tiny_book / "html"
    html.mkdir()
    (html / "index.html").write_text("<html></html>")
    monkeypatch.setattr(build, "HTML", html)
    (tiny_book / "reports" / "html.json").write_text(json.dumps({"key": build.html_key(), "status": "ok", "seconds": 1.0}))

    def no_build(*args, **kwargs):
        raise AssertionError("jupyter-book must not run")

    monkeypatch.setattr(build, "hero_figure", no_build)
    monkeypatch.setattr(build.subprocess, "run", no_build)
    assert build.html() == 0
    out = tiny_book / "src" / "notebooks" / "01_one.ipynb"
    out.write_text(out.read_text() + " ")  # a re-executed notebook: the book is built again
    with pytest.raises(AssertionError, match="must not run"):
        build.html()
    assert not (tiny_book / "reports" / "html.json").exists()
