"""What a reader meets on a chapter page: figures that fit the column with alt text, code that fits, plumbing
folded away, no warning printed. Read from the executed notebooks (``_build/src/notebooks``) and their sources.
"""

from __future__ import annotations

import base64
import re
import struct
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.md"))
NAMES = [p.stem for p in SOURCES]
#: the widest stored figure, in pixels: attn.plotting.MAX_WIDTH_IN (7.5 in) at attn.plotting.DPI (100),
#: plus the margin a tight bounding box may add around the axes' labels
MAX_FIGURE_PX = 790
CODE_COLUMNS = 88
#: a listing longer than this is folded (the cell tagged ``hide-output``: a click shows it)
LONG_LISTING = 40


def _executed(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "_build" / "src" / "notebooks" / f"{name}.ipynb", as_version=4)


def _png_width(data: str) -> int:
    raw = base64.b64decode(data[:64])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int(struct.unpack(">I", raw[16:20])[0])


def _tags(cell: nbformat.NotebookNode) -> set[str]:
    return set(cell.metadata.get("tags", []))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_no_warning_is_printed_on_the_page(executed_notebooks, name):
    """A warning in an output (a library's UserWarning with the build machine's path) reaches every reader."""
    found = []
    for i, cell in enumerate(_executed(name).cells):
        for out in cell.get("outputs", []):
            text = out.get("text", "") if out.output_type == "stream" else out.get("data", {}).get("text/plain", "")
            if isinstance(text, list):
                text = "".join(text)
            if re.search(r"\b\w*Warning\b|warnings\.warn", text):
                found.append(f"cell {i}: {text.strip().splitlines()[0][:160]}")
    assert not found, found


#: the repr a plotting call returns when it ends a cell (``Text(0, 0.5, 'label')``, ``<matplotlib.legend.Legend
#: at 0x..>``, ``[<matplotlib.lines.Line2D ...>]``, ``<Axes: ...>``): printed above the figure, it means nothing
MATPLOTLIB_REPR = re.compile(r"^\[?<?(Text\(|matplotlib\.|Axes:|Figure size)")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_no_plot_object_repr_is_printed(executed_notebooks, name):
    """A cell that ends with ``ax.set_title(...)`` prints ``Text(0.5, 1.0, '...')`` beside its figure: end it with ``;``."""
    found = []
    for i, cell in enumerate(_executed(name).cells):
        for out in cell.get("outputs", []):
            if out.output_type != "execute_result" or set(out.get("data", {})) - {"text/plain"}:
                continue
            text = out["data"].get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            if MATPLOTLIB_REPR.match(text):
                found.append(f"cell {i}: {text[:80]}")
    assert not found, found


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_figures_fit_the_column_and_carry_alt_text(executed_notebooks, name):
    """Each figure at most 7.5 in wide (shown at its natural size in the 757-px column) and stored at twice that
    pixel density (sharp on high-density screens and when a phone shrinks it), one per cell, with alt text
    (cell metadata ``mystnb: image: alt:``) that says what it shows, not a file name."""
    problems = []
    for i, cell in enumerate(_executed(name).cells):
        pngs = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        if not pngs:
            continue
        where = f"cell {i} ({cell.source.strip().splitlines()[0][:50]!r})"
        if len(pngs) > 1:
            problems.append(f"{where}: {len(pngs)} figures in one cell (one alt text each needs one figure a cell)")
        for out in pngs:
            pixels = _png_width(out["data"]["image/png"])
            shown = out.get("metadata", {}).get("image/png", {}).get("width")  # a retina PNG: its display width
            if shown is None or pixels < 1.9 * int(shown):
                problems.append(f"{where}: not stored at twice its display density ({pixels} px, shown at {shown})")
            elif int(shown) > MAX_FIGURE_PX:
                problems.append(f"{where}: figure shown {shown} px wide > {MAX_FIGURE_PX} (7.5 in at 100 dpi)")
        alt = str(cell.metadata.get("mystnb", {}).get("image", {}).get("alt", ""))
        if len(alt.split()) < 4 or re.search(r"\.(png|svg|jpe?g)\b", alt):
            problems.append(f"{where}: no alt text saying what the figure shows (got {alt!r})")
    assert not problems, "\n".join(problems)


def _code_cells(path: Path) -> list[tuple[int, list[str], str]]:
    """``(line number, tags, source)`` of each ``{code-cell}`` of a MyST notebook.

    A cell's metadata is either a ``:tags: [...]`` line or a YAML block between ``---`` lines (tags and
    ``mystnb`` options); the source is what follows it.
    """
    text = path.read_text().splitlines()
    cells = []
    i = 0
    while i < len(text):
        if text[i].startswith("```{code-cell}"):
            start, j, tags, body = i + 1, i + 1, [], []
            if j < len(text) and text[j].startswith(":tags:"):
                tags = re.findall(r"[\w-]+", text[j].split(":", 2)[2])
                j += 1
            elif j < len(text) and text[j] == "---":
                end = text.index("---", j + 1)
                meta = yaml.safe_load("\n".join(text[j + 1:end])) or {}
                tags = list(meta.get("tags", []))
                j = end + 1
            while j < len(text) and not text[j].startswith("```"):
                body.append(text[j])
                j += 1
            cells.append((start, tags, "\n".join(body)))
            i = j
        i += 1
    return cells


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_code_fits_the_column(path):
    long = [(n, line) for n, _, src in _code_cells(path) for line in src.splitlines() if len(line) > CODE_COLUMNS]
    assert not long, f"{len(long)} code lines wider than {CODE_COLUMNS} columns, e.g. line {long[0][0]}: {long[0][1]!r}"


IMPORT = re.compile(r"^(import |from \S+ import |\s+\w|\)|#|$|use_style\(\)|set_seed\(|torch\.manual_seed\()")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_plumbing_is_folded(path):
    """Imports and set-up cells, and the cells that wire an explorer, are folded (``hide-input``): the page
    shows the code a reader should read."""
    unfolded = []
    for n, tags, src in _code_cells(path):
        lines = src.splitlines()
        folded = {"hide-input", "remove-input", "hide-cell", "remove-cell"} & set(tags)
        if "parameters" in tags or folded:
            continue
        imports_only = lines and all(IMPORT.match(line) for line in lines) and any(
            line.startswith(("import ", "from ")) for line in lines)
        if imports_only or "AttentionExplorer(" in src:
            unfolded.append(n)
    assert not unfolded, f"cells at lines {unfolded} are set-up or explorer plumbing: tag them hide-input"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_long_listings_are_folded(executed_notebooks, name):
    """A ``show_source`` listing longer than 40 lines sits in a dropdown (its cell tagged ``hide-output``)."""
    long = []
    for i, cell in enumerate(_executed(name).cells):
        if "show_source(" not in cell.get("source", "") or _tags(cell) & {"hide-output", "hide-cell"}:
            continue
        for out in cell.get("outputs", []):
            text = out.get("data", {}).get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            if text.count("\n") + 1 > LONG_LISTING:
                long.append(f"cell {i}: {text.count(chr(10)) + 1} lines")
    assert not long, long
