"""The book pipeline: sync notebooks, fetch front-end assets, execute, build.

Usage (the Makefile calls these; run from anywhere)::

    python book/build.py sync [--check]   # text notebooks -> committed .ipynb (Colab), install cell from _config.yml
    python book/build.py assets           # npm packages the book serves itself (require.js, widgets, MathJax)
    python book/build.py execute [NAME..] # papermill every notebook into _build/src/notebooks, timing report
    python book/build.py html             # stage sources and build the HTML book with Jupyter Book 1, -W
    python book/build.py all              # all of the above, in order

Notebook sources are MyST Markdown files ``notebooks/NN_slug.md`` (jupytext).
Their ``.ipynb`` twins are committed without outputs, so that Colab can open
them; ``sync --check`` fails when the two drift apart.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "_build"
SRC = BUILD / "src"  # staged Sphinx source: config, toc, book/, executed notebooks
HTML = BUILD / "html"
VENDOR = BUILD / "vendor"  # unpacked npm packages
REPORTS = BUILD / "reports"
INSTALL_TAG = "colab-install"
DEFAULT_PARAMETERS = {"seed": 0, "device": "auto"}


def log(msg: str) -> None:
    print(f"[book] {msg}", flush=True)


# --------------------------------------------------------------------------- config


def config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def install_target() -> str:
    """pip target for the ``attn`` package, from the repository URL in ``_config.yml``."""
    repo = config()["repository"]
    return f"git+{repo['url'].rstrip('/')}@{repo.get('branch', 'main')}"


def install_cell_source() -> str:
    return "\n".join(
        [
            "# Colab or a fresh environment: install the `attn` package when it is missing.",
            "import importlib.util, os, subprocess, sys",
            "",
            'if importlib.util.find_spec("attn") is None:',
            f'    target = os.environ.get("ATTN_INSTALL_TARGET", "{install_target()}")',
            '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", target], check=True)',
            'if "google.colab" in sys.modules:  # let Colab render third-party widgets (the explorers)',
            "    from google.colab import output",
            "",
            "    output.enable_custom_widget_manager()",
        ]
    )


def notebook_sources() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md"))


def _registry():
    sys.path.insert(0, str(ROOT))
    from attn import registry

    return registry


def toc_text() -> str:
    """``_toc.yml``, generated from the registry: its parts, in its order, the written chapters only.

    Parts are not numbered by Sphinx (that would number pages by position):
    each page's title carries its registry number, ``"8. Local attention"``.
    """
    reg = _registry()
    lines = [
        "# Table of contents (Jupyter Book 1), generated from attn/registry.py (PARTS, CHAPTERS)",
        "# by `python book/build.py sync` (make sync). Do not edit by hand: a test compares the two.",
        "format: jb-book",
        "root: book/intro",
        "parts:",
    ]
    for caption, numbers in reg.PARTS:
        files = [reg.chapter(n).notebook.removesuffix(".ipynb") for n in numbers]
        files = [f for f in files if (ROOT / f).with_suffix(".md").exists()]
        if files:
            lines += [f"  - caption: {caption}", "    chapters:"] + [f"      - file: {f}" for f in files]
    lines += ["  - caption: Reference", "    chapters:", "      - file: book/notation", "      - file: book/bibliography"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- sync


def _synced(text: str):
    """The notebook as it should be: install cell first, python3 kernel, no outputs."""
    import jupytext
    import nbformat

    nb = jupytext.reads(text, fmt="md:myst")
    cell = nbformat.v4.new_code_cell(install_cell_source(), metadata={"tags": [INSTALL_TAG, "remove-cell"]})
    if nb.cells and INSTALL_TAG in nb.cells[0].metadata.get("tags", []):
        nb.cells[0] = cell
    else:
        nb.cells.insert(0, cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.nbformat, nb.nbformat_minor = 4, 5
    for i, c in enumerate(nb.cells):
        c.id = f"cell-{i:03d}"  # deterministic, so the committed .ipynb only changes with its source
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    return nb


def _without_tool_version(text: str) -> str:
    """The text minus jupytext's own version stamp, which changes with every jupytext release, not with the notebook."""
    return "\n".join(line for line in text.splitlines() if "jupytext_version" not in line)


def sync(check: bool = False) -> int:
    """Write each ``.md`` notebook's committed ``.ipynb`` twin (or, with ``check``, report drift)."""
    import jupytext
    import nbformat

    drift = []
    for md in notebook_sources():
        # normalise the text source first, then derive the .ipynb from the normalised text
        md_text = jupytext.writes(_synced(md.read_text()), fmt="md:myst")
        ipynb_text = nbformat.writes(_synced(md_text)) + "\n"
        ipynb = md.with_suffix(".ipynb")
        for path, text in ((md, md_text), (ipynb, ipynb_text)):
            old = path.read_text() if path.exists() else None
            if old is None or _without_tool_version(old) != _without_tool_version(text):
                drift.append(path.relative_to(ROOT))
                if not check:
                    path.write_text(text)
    toc = ROOT / "_toc.yml"
    if NOTEBOOKS == ROOT / "notebooks":  # the real book (tests point NOTEBOOKS at a scratch folder)
        text = toc_text()
        if not toc.exists() or toc.read_text() != text:
            drift.append(toc.relative_to(ROOT))
            if not check:
                toc.write_text(text)
    stray = [p for p in NOTEBOOKS.glob("*.ipynb") if not p.with_suffix(".md").exists()]
    if check:
        problems = [f"out of sync: {p}" for p in drift] + [f"no .md source: {p.relative_to(ROOT)}" for p in stray]
        for p in problems:
            log(p)
        if problems:
            log("run `python book/build.py sync` (or `make sync`) and commit the result")
        return 1 if problems else 0
    for p in drift:
        log(f"wrote {p}")
    return 0


# --------------------------------------------------------------------------- assets


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def assets() -> int:
    """Fetch the pinned npm packages (``book/assets.json``) and unpack them under ``_build/vendor``."""
    spec = json.loads((ROOT / "book" / "assets.json").read_text())["packages"]
    tarballs = BUILD / "npm"
    tarballs.mkdir(parents=True, exist_ok=True)
    for pkg, integrity in spec.items():
        name, version = pkg.rsplit("@", 1)
        dest = VENDOR / name
        stamp = dest / ".integrity"
        if stamp.exists() and stamp.read_text() == integrity:
            continue
        tgz = tarballs / (name.lstrip("@").replace("/", "-") + f"-{version}.tgz")
        if not tgz.exists():
            log(f"npm pack {pkg}")
            subprocess.run(["npm", "pack", "--silent", pkg], cwd=tarballs, check=True, stdout=subprocess.DEVNULL)
        got = _integrity(tgz)
        if got != integrity:
            tgz.unlink()
            raise SystemExit(f"[book] integrity mismatch for {pkg}: expected {integrity}, got {got}")
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        with tarfile.open(tgz) as tar:
            tar.extractall(dest, filter="data")
        stamp.write_text(integrity)
    log(f"assets ready in {VENDOR.relative_to(ROOT)}")
    return 0


def _stage_assets(extra: Path) -> None:
    """Lay out ``_extra/assets`` (copied to the HTML root by ``html_extra_path``)."""
    import anywidget

    out = extra / "assets"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(VENDOR / "requirejs" / "package" / "require.js", out / "require.js")
    # the widget manager, with the fonts it fetches relative to its "CDN" base
    cdn = out / "cdn" / "@jupyter-widgets" / "html-manager" / "dist"
    shutil.copytree(
        VENDOR / "@jupyter-widgets" / "html-manager" / "package" / "dist",
        cdn,
        ignore=shutil.ignore_patterns("*.map", "*.LICENSE.txt"),
    )
    # anywidget's front end, from the installed Python package's nbextension
    nbext = Path(anywidget.__file__).resolve().parents[3] / "share" / "jupyter" / "nbextensions" / "anywidget"
    candidates = [nbext, Path(sys.prefix) / "share" / "jupyter" / "nbextensions" / "anywidget"]
    src = next((c for c in candidates if (c / "index.js").exists()), None)
    if src is None:
        raise SystemExit(f"[book] anywidget front end not found in {candidates}")
    (out / "anywidget").mkdir()
    shutil.copy(src / "index.js", out / "anywidget" / "index.js")
    # MathJax 3 (no speech-rule engine: it is only loaded on demand by the a11y menu)
    mj = VENDOR / "mathjax" / "package" / "es5"
    shutil.copytree(mj, out / "mathjax", ignore=shutil.ignore_patterns("sre", "*-svg*.js", "*-full*.js", "node-main.js"))
    shutil.copy(ROOT / "book" / "static" / "widgets-loader.js", out / "widgets-loader.js")


# --------------------------------------------------------------------------- execute


def _hide_injected_parameters(path: Path) -> None:
    """Keep papermill's injected-parameters cell in the executed notebook, but off the page.

    The ``parameters`` cell stays visible (it is what a reader edits in Colab);
    the injected copy below it would show the same values twice.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
            changed = True
    if changed:
        nbformat.write(nb, path)


def execute(names: list[str] | None = None, parameters: dict | None = None) -> int:
    """Execute notebooks with papermill into ``_build/src/notebooks``; write a timing report."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    params = {**DEFAULT_PARAMETERS, **(parameters or {})}
    out_dir = SRC / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    REPORTS.mkdir(parents=True, exist_ok=True)
    sources = [p.with_suffix(".ipynb") for p in notebook_sources()]
    if names:
        sources = [p for p in sources if any(n in p.stem for n in names)]
        if not sources:
            raise SystemExit(f"[book] no notebook matches {names}")
    report_path = REPORTS / "execution.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    for nb in sources:
        log(f"executing {nb.relative_to(ROOT)}")
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(
                str(nb),
                str(out_dir / nb.name),
                parameters=params,
                kernel_name="python3",
                cwd=str(NOTEBOOKS),
                progress_bar=False,
                request_save_on_cell_execute=False,
            )
        except PapermillExecutionError as err:
            wall = time.perf_counter() - t0
            report[nb.stem] = {"seconds": round(wall, 2), "status": "failed", "cell": err.cell_index}
            report_path.write_text(json.dumps(report, indent=2))
            log(
                f"FAILED {nb.relative_to(ROOT)}: cell {err.cell_index} (execution count {err.exec_count}) "
                f"raised {err.ename}: {err.evalue}"
            )
            return 1
        wall = time.perf_counter() - t0
        _hide_injected_parameters(out_dir / nb.name)
        report[nb.stem] = {"seconds": round(wall, 2), "status": "ok"}
        log(f"  {nb.stem}: {wall:.1f} s")
        report_path.write_text(json.dumps(report, indent=2))
    lines = ["| notebook | seconds | status |", "|---|---:|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} | {v['status']} |" for k, v in sorted(report.items())]
    lines.append(f"| **total** | {sum(v['seconds'] for v in report.values()):.1f} | |")
    (REPORTS / "execution.md").write_text("\n".join(lines) + "\n")
    log(f"timing report: {(REPORTS / 'execution.md').relative_to(ROOT)}")
    return 0


# --------------------------------------------------------------------------- html


def chapter_map() -> str:
    """The intro page's map of all chapters, from the registry; unwritten ones marked as coming."""
    reg = _registry()
    rows = ["| # | Chapter | Part | Papers | Status |", "|---:|---|---|---|---|"]
    for c in reg.CHAPTERS:
        written = (ROOT / c.notebook).exists()
        title = f"[{c.title}](../{c.notebook.removesuffix('.ipynb')}.ipynb)" if written else c.title
        rows.append(f"| {c.number} | {title} | {reg.part_of(c.number)} | {c.papers} | {'ready' if written else 'coming'} |")
    return "\n".join(rows) + "\n"


def hero_figure(path: Path) -> None:
    """The landing page's figure, drawn by the package: three attention patterns side by side."""
    sys.path.insert(0, str(ROOT))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from attn import plotting
    from attn.core import scaled_dot_product_attention
    from attn.masks import band_mask, causal_mask

    plotting.use_style()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, generator=g)
    panels = {
        "bidirectional": None,
        "causal": causal_mask(16),
        "local window (w = 2)": band_mask(16, 2),
    }
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4), constrained_layout=True)
    for ax, (title, mask) in zip(axes, panels.items()):
        w = scaled_dot_product_attention(x, x, x, attn_mask=mask, need_weights=True, scale=0.6).weights[0]
        plotting.heatmap(w, ax=ax, title=title, colorbar=False, vmax=None)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def html() -> int:
    """Stage the sources and build the HTML book; warnings are errors."""
    executed = sorted((SRC / "notebooks").glob("*.ipynb"))
    expected = {p.with_suffix(".ipynb").name for p in notebook_sources()}
    missing = expected - {p.name for p in executed}
    if missing:
        raise SystemExit(f"[book] not executed yet: {sorted(missing)}; run `python book/build.py execute` first")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, SRC / name)
    shutil.rmtree(SRC / "book", ignore_errors=True)
    shutil.copytree(ROOT / "book", SRC / "book", ignore=shutil.ignore_patterns("build.py", "assets.json", "__pycache__"))
    (SRC / "book" / "chapter_map.md").write_text(chapter_map())
    hero_figure(SRC / "book" / "static" / "hero.png")
    _stage_assets(SRC / "_extra")
    log("building HTML with Jupyter Book (warnings are errors)")
    t0 = time.perf_counter()
    cmd = [
        str(Path(sys.executable).with_name("jupyter-book")), "build", str(SRC),
        "--path-output", str(ROOT), "--warningiserror", "--nitpick", "--keep-going", "--all",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (REPORTS).mkdir(parents=True, exist_ok=True)
    (REPORTS / "sphinx.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (HTML / "index.html").exists():
        print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n")
        log(f"book build FAILED (full log: {(REPORTS / 'sphinx.log').relative_to(ROOT)})")
        return proc.returncode or 1
    log(f"built in {time.perf_counter() - t0:.1f} s")
    log(f"the book is at {HTML / 'index.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sync")
    s.add_argument("--check", action="store_true", help="fail on drift instead of writing")
    sub.add_parser("assets")
    e = sub.add_parser("execute")
    e.add_argument("names", nargs="*", help="substrings of notebook names (default: all)")
    e.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    sub.add_parser("html")
    sub.add_parser("all")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if args.cmd == "sync":
        return sync(check=args.check)
    if args.cmd == "assets":
        return assets()
    if args.cmd == "execute":
        return execute(args.names, {k: yaml.safe_load(v) for k, v in args.parameter})
    if args.cmd == "html":
        return html()
    t0 = time.perf_counter()
    for step in (sync, assets, execute, html):
        rc = step()
        if rc:
            return rc
    log(f"make book finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
