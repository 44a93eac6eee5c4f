"""The repository's own contract: dependencies, notebooks in sync, table of contents, Colab cells."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book"))
import build  # noqa: E402  (book/build.py)

from attn.registry import CHAPTERS, mechanisms  # noqa: E402


def _names(reqs: list[str]) -> dict[str, str]:
    out = {}
    for r in reqs:
        m = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", r)
        out[m.group(1).lower()] = m.group(2).replace(" ", "")
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py_deps = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_deps = [d for d in pip_section if not d.startswith("-e")]
    assert _names(env_deps) == _names(py_deps)


def test_torch_pinned_for_install_order():
    pin = (ROOT / ".ci" / "constraints.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", pin, re.M)
    assert "$(TORCH)" in (ROOT / "Makefile").read_text()


def test_committed_notebooks_in_sync_with_sources():
    proc = subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "sync", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_committed_notebooks_are_clean_and_colab_ready():
    target = build.install_target()
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert target.startswith("git+" + repo)
    sources = build.notebook_sources()
    assert sources, "no notebooks found"
    for md in sources:
        nb = nbformat.read(md.with_suffix(".ipynb"), as_version=4)
        nbformat.validate(nb)
        first = nb.cells[0]
        assert build.INSTALL_TAG in first.metadata["tags"] and target in first.source, md.name
        assert "ATTN_INSTALL_TARGET" in first.source
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{md.name} has outputs committed"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{md.name} needs exactly one parameters cell"
        assert "seed" in tagged[0].source and "device" in tagged[0].source
        assert nb.metadata["kernelspec"]["name"] == "python3"


def test_toc_lists_every_notebook_and_chapters_match_registry():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    nbs = sorted(f"notebooks/{p.stem}" for p in build.notebook_sources())
    assert sorted(f for f in files if f.startswith("notebooks/")) == nbs
    generated = {f"book/{page}" for page in build.GENERATED_PAGES}  # written by the build into the staged source
    for f in files:
        assert f in generated or (ROOT / f).with_suffix(".ipynb").exists() or (ROOT / f).with_suffix(".md").exists(), f
    by_stem = {c.notebook.removesuffix(".ipynb"): c for c in CHAPTERS}
    for stem in nbs:
        if stem in by_stem:  # chapter notebooks are named after the registry
            assert (ROOT / by_stem[stem].notebook).exists()
    for m in mechanisms():
        chapter = next(c for c in CHAPTERS if c.number == m.chapter)
        assert (ROOT / chapter.notebook).exists(), f"mechanism {m.name} has no chapter notebook {chapter.notebook}"


def test_chapter_map_covers_all_chapters():
    table = build.chapter_map()
    assert table.count("\n") == 2 + len(CHAPTERS)
    written = [(ROOT / c.notebook).with_suffix(".md").exists() for c in CHAPTERS]
    assert table.count("](../notebooks/") == sum(written)  # a written chapter is linked, an unwritten one is not
    assert "ready" not in table and "Status" not in table  # no status column that says the same thing 30 times


def test_readme_documents_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make book" in readme and "make test" in readme and "How to add a chapter" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("md", [p for p in build.notebook_sources() if int(p.name[:2]) != 24], ids=lambda p: p.stem)
def test_when_to_use_it_names_a_real_model_or_library(md):
    """Each mechanism chapter's "When to use it" box says who uses the mechanism, with a citation."""
    text = md.read_text()
    box = re.search(r":::\{admonition\} When to use it\n(.*?)\n:::", text, re.S)
    assert box, f"{md.name} has no 'When to use it' admonition"
    assert "{cite}`" in box.group(1), f"{md.name}: the 'When to use it' box cites no model or library that uses it"
