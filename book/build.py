"""The book pipeline: sync notebooks, fetch front-end assets, execute, build.

Usage (the Makefile calls these; run from anywhere)::

    python book/build.py sync [--check]   # text notebooks -> committed .ipynb (Colab), install cell from _config.yml
    python book/build.py assets           # npm packages the book serves itself (require.js, widgets, MathJax)
    python book/build.py execute [NAME..] # papermill the changed notebooks into _build/src/notebooks, N at a time
    python book/build.py html [--force]   # stage sources and build the HTML book with Jupyter Book 1, -W
    python book/build.py all              # all of the above, in order

Notebook sources are MyST Markdown files ``notebooks/NN_slug.md`` (jupytext).
Their ``.ipynb`` twins are committed without outputs, so that Colab can open
them; ``sync --check`` fails when the two drift apart.

``execute`` and ``html`` are incremental. A notebook is executed again only
when its key changes: a hash of its ``.ipynb``, its parameters, every file of
the ``attn`` package and the installed distributions' versions
(:func:`notebook_key`); ``_build/reports/execution.json`` keeps each key with
the wall and kernel CPU times measured when the notebook last ran. The HTML is
rebuilt only when the executed notebooks, ``book/``, the config, the package or
the environment changed (:func:`html_key`). Delete ``_build`` to start afresh.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
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
#: Pages written by the build into the staged source (not committed): the evidence appendix.
GENERATED_PAGES = ("evidence",)


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
            '    target = os.environ.get("ATTN_INSTALL_TARGET")',
            f'    target = target or "{install_target()}"',
            '    pip = [sys.executable, "-m", "pip", "install", "-q", target]',
            "    subprocess.run(pip, check=True)",
            "# Colab: let it render third-party widgets (the explorers)",
            'if "google.colab" in sys.modules:',
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
    lines += ["  - caption: Reference", "    chapters:", "      - file: book/notation"]
    lines += [f"      - file: book/{page}" for page in GENERATED_PAGES] + ["      - file: book/bibliography"]
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
        for problem in problems:
            log(problem)
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


# A notebook is executed again only when its key changes: the key hashes
# everything its outputs can depend on. Bump CACHE_VERSION when the way
# notebooks are executed or post-processed changes.
CACHE_VERSION = "1"
PACKAGE = ROOT / "attn"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Per-notebook budget, in seconds of the kernel's CPU time (its own threads and
# the processes it starts). Every notebook runs with one torch thread, so its
# CPU time is about what it would take alone on one idle core, however many
# notebooks run beside it and whatever else loads the machine; wall time is
# recorded too, but several notebooks at a time stretch it. The numbers are the
# former wall-time budgets (one notebook at a time on an idle 2-core machine).
# The comparison trains and sweeps every registered mechanism (over forty models,
# in `workers = 2` processes, whose CPU time counts).
BUDGET_S = 60.0
BUDGETS = {"24_comparison": 150.0}


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def _tree_digest(folder: Path, skip: tuple[str, ...] = ("__pycache__",)) -> str:
    """Hash of every file under ``folder`` (relative path and bytes), in a stable order."""
    parts: list[bytes] = []
    if folder.exists():
        for f in sorted(folder.rglob("*")):
            rel = f.relative_to(folder)
            if f.is_file() and not any(s in rel.parts for s in skip) and f.suffix != ".pyc":
                parts += [str(rel.as_posix()).encode(), f.read_bytes()]
    return _sha256(*parts)


def package_digest() -> str:
    """Hash of the ``attn`` package: every file under ``attn/`` (sources, static front end)."""
    return _tree_digest(PACKAGE)


def environment_digest() -> str:
    """Hash of the locked environment: the Python version and every installed distribution's version.

    ``attn`` itself is left out (its files are hashed by :func:`package_digest`).
    """
    from importlib import metadata

    dists = set()
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name != "attn":
            dists.add(f"{name}=={dist.version}")
    return _sha256(sys.version.encode(), "\n".join(sorted(dists)).encode())


def notebook_key(source: Path, parameters: dict, package: str, environment: str) -> str:
    """The cache key of one notebook: its source, its parameters, the package and the environment."""
    return _sha256(
        CACHE_VERSION.encode(),
        source.read_bytes(),
        json.dumps(parameters, sort_keys=True).encode(),
        package.encode(),
        environment.encode(),
    )


def budget(name: str) -> float:
    """The notebook's budget in seconds of kernel CPU time."""
    return BUDGETS.get(name, BUDGET_S)


def budget_problem(name: str, entry: dict | None) -> str | None:
    """Why the recorded execution of ``name`` fails its budget (or did not succeed); ``None`` when it is fine.

    The entry is the one in ``_build/reports/execution.json``: for a notebook
    taken from the cache it still holds the times measured when it did execute.
    """
    if entry is None:
        return f"{name}: not executed"
    if entry.get("status") != "ok":
        return f"{name}: status {entry.get('status')!r}"
    cpu = entry.get("cpu_seconds")
    if not isinstance(cpu, (int, float)):
        return f"{name}: no CPU time recorded"
    if cpu >= budget(name):
        return f"{name} took {cpu:.1f} s of CPU time (budget {budget(name):.0f} s; {entry.get('seconds')} s wall)"
    return None


@dataclasses.dataclass(frozen=True)
class Job:
    """One notebook to execute: paths are absolute, so that a worker process needs nothing else."""

    name: str
    source: str
    output: str
    cwd: str
    parameters: dict
    threads: int = 1


def run_papermill(job: Job) -> dict:
    """Execute one notebook with papermill (in a worker process); return its status and times.

    ``cpu_seconds`` is the kernel's CPU time, user plus system, including the
    processes it starts: the worker's children's usage before and after (the
    kernel is this worker's only child and is reaped when papermill shuts it down).
    """
    import resource

    for var in THREAD_VARS:  # inherited by the kernel: one torch thread per notebook
        os.environ[var] = str(job.threads)
    os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # ipykernel's debugger: "frozen modules" notice
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    result: dict = {"status": "ok"}
    try:
        pm.execute_notebook(
            job.source,
            job.output,
            parameters=job.parameters,
            kernel_name="python3",
            cwd=job.cwd,
            progress_bar=False,
            request_save_on_cell_execute=False,
            # the kernel's start-up notice "running over TCP without encryption" (a local kernel, on
            # 127.0.0.1) is noise; errors still show, and cell output goes to the notebook as before
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
        _hide_injected_parameters(Path(job.output))
    except PapermillExecutionError as err:
        result = {"status": "failed", "cell": err.cell_index, "exec_count": err.exec_count,
                  "error": f"{err.ename}: {err.evalue}"}
    except Exception as err:  # kernel died, bad notebook, ...: report it, do not hang the pool
        result = {"status": "failed", "cell": None, "exec_count": None, "error": f"{type(err).__name__}: {err}"}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["cpu_seconds"] = round(cpu() - c0, 2)
    return result


def default_jobs() -> int:
    """Notebooks executed at once: ``ATTN_BOOK_JOBS``, else the CPUs this process may use."""
    env = os.environ.get("ATTN_BOOK_JOBS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _write_reports(report: dict) -> None:
    path = REPORTS / "execution.json"
    path.write_text(json.dumps(dict(sorted(report.items())), indent=2) + "\n")
    lines = ["| notebook | wall s | CPU s | budget (CPU s) | status | this run |", "|---|---:|---:|---:|---|---|"]
    for k, v in sorted(report.items()):
        lines.append(
            f"| {k} | {v.get('seconds', 0):.1f} | {v.get('cpu_seconds', 0) or 0:.1f} | {budget(k):.0f} | "
            f"{v.get('status')} | {'cached' if v.get('cached') else 'executed'} |"
        )
    total_wall = sum(v.get("seconds", 0) for v in report.values())
    total_cpu = sum(v.get("cpu_seconds", 0) or 0 for v in report.values())
    lines.append(f"| **total** | {total_wall:.1f} | {total_cpu:.1f} | | | |")
    (REPORTS / "execution.md").write_text("\n".join(lines) + "\n")


def execute(
    names: list[str] | None = None,
    parameters: dict | None = None,
    jobs: int | None = None,
    runner: Callable[[Job], dict] | None = None,
) -> int:
    """Execute the notebooks whose cache key changed, ``jobs`` at a time, into ``_build/src/notebooks``.

    A notebook is skipped when ``_build/reports/execution.json`` holds a
    successful run with the same key (:func:`notebook_key`) and its executed
    copy is still the one that run wrote. Its entry keeps the times measured
    then, so the budgets are checked on every build. ``runner`` replaces
    papermill (tests); it is then called in this process, one notebook at a time.
    """
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
    if not names:  # forget notebooks that no longer exist
        report = {k: v for k, v in report.items() if k in {p.stem for p in sources}}
    package, environment = package_digest(), environment_digest()
    todo: list[tuple[Job, str]] = []
    for nb in sources:
        key = notebook_key(nb, params, package, environment)
        out = out_dir / nb.name
        entry = report.get(nb.stem, {})
        fresh = (
            entry.get("key") == key
            and entry.get("status") == "ok"
            and out.exists()
            and entry.get("output_sha256") == _sha256(out.read_bytes())
        )
        if fresh:
            entry["cached"] = True
        else:
            job = Job(nb.stem, str(nb), str(out), str(NOTEBOOKS), params)
            todo.append((job, key))
    # longest first (by the last recorded CPU time, else the budget), so that the pool ends together
    todo.sort(key=lambda jk: -(report.get(jk[0].name, {}).get("cpu_seconds") or budget(jk[0].name)))
    jobs = max(1, min(jobs or default_jobs(), len(todo) or 1))
    log(f"{len(sources) - len(todo)} notebook(s) up to date, {len(todo)} to execute" + (f", {jobs} at a time" if todo else ""))
    failed: list[str] = []
    t_all = time.perf_counter()

    def record(job: Job, key: str, result: dict) -> None:
        entry = {**result, "cached": False, "jobs": jobs, "key": key}
        if result["status"] == "ok":
            entry["output_sha256"] = _sha256(Path(job.output).read_bytes())
            log(f"  {job.name}: {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU")
        else:
            failed.append(job.name)
            log(f"FAILED {Path(job.source).relative_to(ROOT)}: cell {result.get('cell')} "
                f"(execution count {result.get('exec_count')}) raised {result.get('error')}")
        report[job.name] = entry
        _write_reports(report)

    if runner is not None:
        for job, key in todo:
            log(f"executing {Path(job.source).relative_to(ROOT)}")
            record(job, key, runner(job))
            if failed:
                break
    elif todo:
        import multiprocessing

        # spawn: fresh workers (no forked threads of the caller); each runs one notebook at a time
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {}
            for job, key in todo:
                futures[pool.submit(run_papermill, job)] = (job, key)
            for fut in as_completed(futures):
                if fut.cancelled():
                    continue
                job, key = futures[fut]
                record(job, key, fut.result())
                if failed:  # stop: start no other notebook, let the running ones finish
                    for other in futures:
                        other.cancel()
    _write_reports(report)
    if todo:
        log(f"executed {len(todo)} notebook(s) in {time.perf_counter() - t_all:.1f} s")
    over = [p for p in (budget_problem(nb.stem, report.get(nb.stem)) for nb in sources) if p]
    for problem in over:
        log(f"over budget or not run: {problem}")
    log(f"timing report: {(REPORTS / 'execution.md').relative_to(ROOT)}")
    return 1 if failed else 0


# --------------------------------------------------------------------------- html


def chapter_map() -> str:
    """The intro page's map of all chapters, from the registry (an unwritten one is listed without a link)."""
    reg = _registry()
    rows = ["| # | Chapter | Part | Papers |", "|---:|---|---|---|"]
    for c in reg.CHAPTERS:
        written = (ROOT / c.notebook).exists()
        title = f"[{c.title}](../{c.notebook.removesuffix('.ipynb')}.ipynb)" if written else c.title
        rows.append(f"| {c.number} | {title} | {reg.part_of(c.number)} | {c.papers} |")
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
    fig, axes = plotting.panels(3, panel_width=plotting.MAX_WIDTH_IN / 3, panel_height=2.7)
    for ax, (title, mask) in zip(axes, panels.items(), strict=True):
        weights = scaled_dot_product_attention(x, x, x, attn_mask=mask, need_weights=True, scale=0.6).weights
        assert weights is not None, "need_weights=True returns the weights"
        w = weights[0]
        plotting.heatmap(w, ax=ax, title=title, colorbar=False, vmax=None)
    fig.savefig(path, dpi=plotting.DPI)
    plt.close(fig)


def collect_claims(executed: list[Path]) -> list[dict]:
    """Every claim the executed notebooks stated (``attn.evidence``), in chapter order, verdicts computed again.

    A claim travels in its output's metadata, so a notebook taken from the cache
    still contributes its claims. Each record is rebuilt with
    :class:`attn.evidence.Claim`, whose verdict and status are recomputed from
    the per-seed values, and carries the page it came from.
    """
    import nbformat

    sys.path.insert(0, str(ROOT))
    from attn.evidence import METADATA_KEY, Claim

    claims = []
    for path in sorted(executed):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                record = out.get("metadata", {}).get(METADATA_KEY)
                if record:
                    claim = Claim.from_json(record)
                    claims.append({**claim.to_json(), "page": path.stem})
    return sorted(claims, key=lambda c: c["chapter"])  # stable: a chapter's claims keep their order


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def evidence_page(claims: list[dict]) -> str:
    """The appendix "The evidence": every claim of the book, its arms over seeds, and its verdict."""
    sys.path.insert(0, str(ROOT))
    from attn.evidence import Claim

    reg = _registry()
    counts = {s: sum(c["status"] == s for c in claims) for s in ("supported", "not shown", "contradicted", "measured")}
    lines = [
        "(the-evidence)=",
        "# The evidence",
        "",
        "Every claim the book makes about what a mechanism learns or costs, collected from the executed chapters "
        "by the build (`_build/reports/claims.json`). Each names its arms, its metric and one value per seed "
        "per arm; the verdict is computed: one arm beats the other only when their ranges over seeds are "
        "disjoint, or a paired test over the same seeds says so at 5 %, or (timings) every interleaved ratio "
        "lies on the same side of 1, by more than the claim's tolerance. A run that never reached its target is counted as censored, never dropped. "
        "The build fails when a verdict contradicts the direction its chapter declared.",
        "",
        f"This build: **{len(claims)} claims** in {len({c['chapter'] for c in claims})} chapter(s); "
        f"{counts['supported']} supported, {counts['not shown']} not shown (no separation at the chapter's "
        f"budget), {counts['contradicted']} contradicted, {counts['measured']} measured without a declared "
        "direction (where the answer depends on the machine).",
        "",
    ]
    for chapter in sorted({c["chapter"] for c in claims}):
        mine = [c for c in claims if c["chapter"] == chapter]
        title = reg.chapter(chapter).title if any(ch.number == chapter for ch in reg.CHAPTERS) else f"Chapter {chapter}"
        lines += [f"## {chapter}. {title}", "",
                  f"From [the chapter](../notebooks/{mine[0]['page']}.ipynb).", "",
                  "| claim | metric | arms: mean (range, seeds) | expected | verdict | status |",
                  "|---|---|---|---|---|---|"]
        for c in mine:
            claim = Claim.from_json(c)
            arms = "<br>".join(f"{_cell(name)}: {claim.describe(name)}" for name in claim.arms)
            lines.append(f"| {_cell(c['claim'])} | {_cell(c['metric'])} | {arms} | {_cell(c['expected'])} | "
                         f"{_cell(c['verdict'])} | {c['status']} |")
        lines.append("")
    return "\n".join(lines)


def write_evidence(executed: list[Path], page: Path) -> list[str]:
    """Write ``claims.json`` and the evidence page; return the contradicted claims (the build fails on them)."""
    claims = collect_claims(executed)
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "claims.json").write_text(json.dumps(claims, indent=2) + "\n")
    page.write_text(evidence_page(claims))
    return [f"chapter {c['chapter']}: {c['claim']!r}: expected {c['expected']}, measured {c['verdict']}"
            for c in claims if c["status"] == "contradicted"]


def html_key() -> str:
    """The cache key of the HTML build: everything the staged sources and the build read."""
    executed = sorted((SRC / "notebooks").glob("*.ipynb"))
    files = [ROOT / "_config.yml", ROOT / "_toc.yml", *executed]
    return _sha256(
        CACHE_VERSION.encode(),
        *[f.name.encode() + b"\0" + f.read_bytes() for f in files],
        _tree_digest(ROOT / "book").encode(),  # prose, bibliography, static files, this pipeline, assets.json
        package_digest().encode(),  # the chapter map and the hero figure come from the package
        environment_digest().encode(),  # Sphinx, the theme, myst-nb, anywidget's front end
    )


def html(force: bool = False) -> int:
    """Stage the sources and build the HTML book; warnings are errors.

    Skipped when the last successful build had the same :func:`html_key` and its
    output is still there: its Sphinx log (``_build/reports/sphinx.log``) stays
    the log of the build that produced the pages.
    """
    executed = sorted((SRC / "notebooks").glob("*.ipynb"))
    expected = {p.with_suffix(".ipynb").name for p in notebook_sources()}
    missing = expected - {p.name for p in executed}
    if missing:
        raise SystemExit(f"[book] not executed yet: {sorted(missing)}; run `python book/build.py execute` first")
    stale = {p for p in executed if p.name not in expected}
    for p in stale:  # a renamed or deleted chapter: its old output must not reach the book
        p.unlink()
    REPORTS.mkdir(parents=True, exist_ok=True)
    stamp = REPORTS / "html.json"
    key = html_key()
    last = json.loads(stamp.read_text()) if stamp.exists() else {}
    if not force and last.get("key") == key and last.get("status") == "ok" and (HTML / "index.html").exists():
        log(f"HTML up to date (built in {last.get('seconds')} s from the same sources): {HTML / 'index.html'}")
        return 0
    stamp.unlink(missing_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, SRC / name)
    shutil.rmtree(SRC / "book", ignore_errors=True)
    shutil.copytree(ROOT / "book", SRC / "book", ignore=shutil.ignore_patterns("build.py", "assets.json", "__pycache__"))
    (SRC / "book" / "chapter_map.md").write_text(chapter_map())
    contradicted = write_evidence(executed, SRC / "book" / "evidence.md")
    if contradicted:
        for problem in contradicted:
            log(f"CONTRADICTED CLAIM {problem}")
        log("a claim's verdict contradicts the direction its chapter declared: fix the chapter, "
            f"its prose and its claim (ledger: {(REPORTS / 'claims.json').relative_to(ROOT)})")
        return 1
    hero_figure(SRC / "book" / "static" / "hero.png")
    _stage_assets(SRC / "_extra")
    log("building HTML with Jupyter Book (warnings are errors)")
    t0 = time.perf_counter()
    cmd = [
        str(Path(sys.executable).with_name("jupyter-book")), "build", str(SRC),
        "--path-output", str(ROOT), "--warningiserror", "--nitpick", "--keep-going", "--all",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (REPORTS / "sphinx.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (HTML / "index.html").exists():
        print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n")
        log(f"book build FAILED (full log: {(REPORTS / 'sphinx.log').relative_to(ROOT)})")
        return proc.returncode or 1
    seconds = round(time.perf_counter() - t0, 1)
    stamp.write_text(json.dumps({"key": key, "status": "ok", "seconds": seconds}, indent=2) + "\n")
    log(f"built in {seconds:.1f} s")
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
    e.add_argument("-j", "--jobs", type=int, default=None, help="notebooks at once (default: ATTN_BOOK_JOBS or the CPU count)")
    h = sub.add_parser("html")
    h.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    sub.add_parser("all")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if args.cmd == "sync":
        return sync(check=args.check)
    if args.cmd == "assets":
        return assets()
    if args.cmd == "execute":
        return execute(args.names, {k: yaml.safe_load(v) for k, v in args.parameter}, jobs=args.jobs)
    if args.cmd == "html":
        return html(force=args.force)
    t0 = time.perf_counter()
    for step in (sync, assets, execute, html):
        rc = step()
        if rc:
            return rc
    log(f"make book finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
