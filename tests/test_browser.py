"""The rendered book in a real headless Chromium, served on 127.0.0.1 with no other host reachable.

For every page: no request fails and none leaves 127.0.0.1. For every chapter:
math is typeset, every figure loads, every explorer renders, and moving each
of its sliders with the keyboard changes what it draws (from the states stored
at build time: there is no kernel); every exercise's solution opens from its
toggle and passes its checker. A screenshot of each page is saved under
_build/screenshots/ for review.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest
from browser import CHROMIUM_ARGS, EXPLORER_REPORT_JS, BookServer, chromium_path, move_control

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "_build" / "screenshots"
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.md"))
OTHER_PAGES = ["index", "book/intro", "book/notation", "book/bibliography", "search"]

pytestmark = pytest.mark.slow


def expected_explorers(name: str) -> int:
    """Explorer widgets displayed by the executed notebook."""
    nb = nbformat.read(ROOT / "_build" / "src" / "notebooks" / f"{name}.ipynb", as_version=4)
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    views = [
        o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
        for c in nb.cells if c.cell_type == "code"
        for o in c.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    return sum(1 for m in views if state.get(m, {}).get("model_name") == "AnyModel")


def overlapping_labels(boxes: list[list]) -> list[tuple]:
    """Pairs of drawn axis labels ``[panel, axis, x, y, w, h]`` (canvas pixels) whose boxes intersect."""
    clash = []
    for a_i, a in enumerate(boxes):
        for b in boxes[a_i + 1:]:
            if a[0] == b[0] and a[2] < b[2] + b[4] - 0.5 and b[2] < a[2] + a[4] - 0.5 \
                    and a[3] < b[3] + b[5] - 0.5 and b[3] < a[3] + a[5] - 0.5:
                clash.append((a, b))
    return clash


def test_overlap_detector_finds_overlaps():
    assert overlapping_labels([[0, "col", 0, 0, 10, 8], [0, "col", 5, 0, 10, 8]])
    assert not overlapping_labels([[0, "col", 0, 0, 10, 8], [0, "col", 11, 0, 10, 8], [1, "col", 0, 0, 10, 8]])


@pytest.fixture(scope="module")
def browser(built_book):
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with BookServer(built_book) as server, sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b, server.url
        b.close()


class Visit:
    """Open one page, recording every request and what happened to it."""

    def __init__(self, browser, base: str, path: str) -> None:
        b, _ = browser
        self.page = b.new_page(viewport={"width": 1280, "height": 900})
        self.requests: list[str] = []
        self.failed: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.url} (HTTP {r.status})"))
        self.page.goto(f"{base}/{path}", wait_until="networkidle")

    def offsite(self) -> list[str]:
        return [u for u in self.requests if urlparse(u).scheme in ("http", "https") and urlparse(u).hostname != "127.0.0.1"]

    def close(self, shot: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{shot}.png"), full_page=True)
        self.page.close()


REPORT: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    yield
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "report.json").write_text(json.dumps(REPORT, indent=2))


def check_solutions(page) -> None:
    """Every exercise's solution sits behind a toggle that works offline; the stub's checker says "not
    attempted" and each solution's checker says "passed" (the build ran both)."""
    exercises = page.locator("article div.exercise")
    solutions = page.locator("article div.solution.dropdown")
    assert exercises.count() >= 2 and solutions.count() >= exercises.count()
    assert page.locator("section#exercises").inner_text().count("Not attempted yet.") >= 1
    for i in range(solutions.count()):
        sol = solutions.nth(i)
        code = sol.locator("div.cell_input, pre").first
        sol.scroll_into_view_if_needed()
        assert not code.is_visible(), f"solution {i} is shown before it is asked for"
        sol.locator("button.toggle-button").first.click()
        code.wait_for(state="visible", timeout=5000)
        assert "Passed." in sol.inner_text(), f"solution {i} does not pass its checker on the page"


@pytest.mark.parametrize("path", OTHER_PAGES)
def test_page_loads_only_from_the_book(browser, path):
    v = Visit(browser, browser[1], f"{path}.html" + ("?q=softmax" if path == "search" else ""))
    try:
        if path == "search":
            v.page.wait_for_selector("#search-results li, ul.search li", timeout=15000)
        assert not v.failed, v.failed
        assert not v.offsite(), v.offsite()
        REPORT[path] = {"requests": len(v.requests), "failed": len(v.failed)}
    finally:
        v.close(path.replace("/", "_"))


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_page_works_offline(browser, name):
    v = Visit(browser, browser[1], f"notebooks/{name}.html")
    page = v.page
    try:
        # math: MathJax output present, no raw TeX delimiters left in the text
        page.wait_for_selector("article mjx-container", state="attached", timeout=20000)
        text = page.locator("article").inner_text()
        assert "$$" not in text and "\\begin{" not in text
        # figures: scroll through the page so lazy images load, then all must have pixels
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_load_state("networkidle")
        broken = page.evaluate(
            "Array.from(document.querySelectorAll('article img')).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
        )
        assert not broken, broken
        n_images = page.locator("article img").count()
        assert n_images >= 1
        # explorers: all rendered, and every control (slider, toggle, dropdown) redraws on a key press
        want = expected_explorers(name)
        assert want >= 1, "chapter has no explorer"
        page.wait_for_function(f"document.querySelectorAll('.attn-explorer canvas').length >= {want}", timeout=20000)
        explorers = page.locator(".attn-explorer")
        assert explorers.count() == want
        moved = 0
        for i in range(want):
            ex = explorers.nth(i)
            ex.scroll_into_view_if_needed()
            clash = overlapping_labels(json.loads(ex.locator("canvas").get_attribute("data-label-boxes") or "[]"))
            assert not clash, f"explorer {i}: axis labels overlap: {clash[:3]}"
            controls = ex.locator("[data-control]")
            assert controls.count() >= 1
            for j in range(controls.count()):
                before = (ex.get_attribute("data-key"), ex.locator("canvas").evaluate("c => c.toDataURL()"))
                _, back = move_control(page, ex, j)
                after = (ex.get_attribute("data-key"), ex.locator("canvas").evaluate("c => c.toDataURL()"))
                assert after[0] != before[0], f"explorer {i} slider {j}: state key did not change"
                clash = overlapping_labels(json.loads(ex.locator("canvas").get_attribute("data-label-boxes") or "[]"))
                assert not clash, f"explorer {i} slider {j}: axis labels overlap: {clash[:3]}"
                assert after[1] != before[1], f"explorer {i} slider {j}: drawing did not change"
                assert ex.get_attribute("data-source") == "stored"
                page.keyboard.press(back)  # back to the initial setting, so each slider is checked from it
                assert ex.get_attribute("data-key") == before[0]
                moved += 1
        # every request stayed on the book's own server, and none failed
        assert not v.failed, v.failed
        assert not v.offsite(), v.offsite()
        # the page offers its notebook for download, and the file is served
        dl = page.locator(f"a[href$='{name}.ipynb']:not([href^='https://'])")
        assert dl.count() >= 1
        resp = page.request.get(page.url.rsplit("/", 1)[0] + "/" + dl.first.get_attribute("href"))
        assert resp.ok
        # book polish every chapter carries
        assert "Prerequisites" in text and "When to use it" in text
        if not name.startswith("24_"):
            check_solutions(page)
        REPORT[name] = {"requests": len(v.requests), "failed": len(v.failed), "images": n_images,
                        "explorers": want, "slider_moves_checked": moved,
                        "math_elements": page.locator("mjx-container").count()}
    finally:
        v.close(name)


# chapter -> width -> what its explorers drew (for the note: aspect ratio, colour bars, redraw time)
EXPLORER_FIT: dict[str, dict] = {}


@pytest.mark.parametrize("width", [1366, 390], ids=["desktop", "phone"])
@pytest.mark.parametrize("name", CHAPTERS)
def test_explorers_fit_the_column(browser, name, width):
    """At a desktop and a phone width every explorer is drawn for the width it has: the canvas's drawn
    aspect ratio is its intrinsic one (no CSS squeeze), it does not reach past its column, every heatmap
    panel has a colour bar, and no two tick labels overlap. Fails on a canvas drawn at a fixed size and
    shrunk by max-width (chapter 8 was drawn at 0.52 of its width on a phone)."""
    b, base = browser
    page = b.new_page(viewport={"width": width, "height": 900}, device_scale_factor=2 if width < 500 else 1)
    try:
        page.goto(f"{base}/notebooks/{name}.html", wait_until="networkidle")
        want = expected_explorers(name)
        page.wait_for_function(f"document.querySelectorAll('.attn-explorer canvas').length >= {want}", timeout=20000)
        page.wait_for_timeout(200)  # a redraw after the first layout, if the column settled late
        report = page.evaluate(EXPLORER_REPORT_JS)
        assert len(report) == want
        for i, ex in enumerate(report):
            assert ex["aspect_error"] < 0.01, f"explorer {i}: drawn {ex['css']} for a {ex['store']} canvas"
            assert ex["overflow"] <= 1, f"explorer {i}: {ex['overflow']:.0f} px past its column ({ex['layout']})"
            heatmaps = [p[0] for p in ex["panels"] if p[1] == "heatmap"]
            assert sorted(c[0] for c in ex["colorbars"]) == heatmaps, f"explorer {i}: heatmap without a colour bar"
            assert all(c[2] > c[1] for c in ex["colorbars"]), f"explorer {i}: empty colour range {ex['colorbars']}"
            assert not overlapping_labels(ex["boxes"]), f"explorer {i}: {overlapping_labels(ex['boxes'])[:3]}"
            assert all(e[1] in ("slider", "toggle", "dropdown") for e in ex["controls"])
            assert all(e[1] == "toggle" for e in ex["controls"] if e[3] == 2), f"explorer {i}: {ex['controls']}"
        # one keyboard move per explorer: the redraw's time, as the explorer measured it
        move_ms = []
        for i in range(want):
            ex = page.locator(".attn-explorer").nth(i)
            ex.scroll_into_view_if_needed()
            move_control(page, ex, 0)
            move_ms.append(float(ex.locator("canvas").get_attribute("data-draw-ms")))
        EXPLORER_FIT.setdefault(name, {})[str(width)] = [
            {"css": ex["css"], "aspect_error": round(ex["aspect_error"], 5), "overflow": round(ex["overflow"], 1),
             "heatmaps": sum(p[1] == "heatmap" for p in ex["panels"]), "colorbars": len(ex["colorbars"]),
             "rows": ex["layout"].get("rows"), "scale": ex["layout"].get("scale"), "draw_ms": ex["draw_ms"],
             "move_ms": ms, "controls": [c[1] for c in ex["controls"]]} for ex, ms in zip(report, move_ms, strict=True)]
        SHOTS.mkdir(parents=True, exist_ok=True)
        (SHOTS / "explorers.json").write_text(json.dumps(EXPLORER_FIT, indent=1))
        if name[:2] in ("02", "08", "17", "24", "25", "30"):  # the explorers to look at, at both widths
            for i in range(want):
                page.locator(".attn-explorer").nth(i).screenshot(path=str(SHOTS / f"explorer_{name}_{i}_{width}.png"))
    finally:
        page.close()


def _sidebar_left(page) -> float:
    return page.evaluate("document.querySelector('.bd-sidebar-primary').getBoundingClientRect().left")


@pytest.mark.parametrize("width,height", [(1366, 900), (390, 844)], ids=["desktop", "phone"])
def test_chapter_list_opens_and_closes(browser, width, height):
    """The sidebar button works: on a phone it brings the chapter list on screen (and a chapter link there
    navigates); on a desktop it folds the list away. Fails with a theme pair whose toggle is bound to a
    checkbox or dialog the other theme does not render."""
    b, base = browser
    page = b.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{base}/notebooks/08_local_attention.html", wait_until="networkidle")
        toggles = [t for t in page.query_selector_all(".primary-toggle") if t.is_visible()]
        assert len(toggles) == 1, f"{len(toggles)} visible sidebar buttons"
        before = _sidebar_left(page)
        toggles[0].click()
        page.wait_for_timeout(600)  # the slide-in transition
        after = _sidebar_left(page)
        if width < 960:
            assert before < 0 <= after, f"phone: the chapter list stays off-screen (left {before} -> {after})"
            link = page.locator(".bd-sidebar-primary a[href*='02_self_attention']").first
            assert link.is_visible()
            link.click()
            page.wait_for_load_state("networkidle")
            assert page.url.endswith("02_self_attention.html")
        else:
            assert before >= 0 > after, f"desktop: the button does not fold the chapter list (left {before} -> {after})"
        headers = page.evaluate("document.querySelectorAll('header.bd-header, .bd-header').length")
        assert headers <= 1, f"{headers} page headers"
        assert not errors, errors  # e.g. "THEBE_JS_URL has already been declared" (a script included twice)
    finally:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"navigation_{width}.png"))
        page.close()


def test_search_snippets_quote_the_page_not_its_buttons(browser):
    """Search results quote each page's own text around the query, not the launch buttons it starts with."""
    b, base = browser
    page = b.new_page(viewport={"width": 1366, "height": 900})
    try:
        page.goto(f"{base}/search.html?q=softmax", wait_until="networkidle")
        page.wait_for_selector("#search-results li p.context", timeout=20000)
        page.wait_for_timeout(1500)  # snippets fill in as each page is fetched
        snippets = page.locator("#search-results li p.context").all_inner_texts()
        assert len(snippets) >= 5
        buttons = [s for s in snippets if re.search(r"Colab|\.ipynb|\.pdf|Open issue|repository", s)]
        assert not buttons, buttons[:3]
        assert sum("softmax" in s.lower() for s in snippets) >= len(snippets) // 2
    finally:
        page.close()


def test_printing_a_chapter_wraps_its_code(browser):
    """The ".pdf" button prints the page: code wraps instead of being cut at the right edge, no sidebars."""
    b, base = browser
    page = b.new_page(viewport={"width": 1366, "height": 900})
    try:
        page.goto(f"{base}/notebooks/08_local_attention.html", wait_until="networkidle")
        page.emulate_media(media="print")
        styles = page.evaluate("""() => ({
            pre: getComputedStyle(document.querySelector('div.cell pre')).whiteSpace,
            sidebar: getComputedStyle(document.querySelector('.bd-sidebar-primary')).display})""")
        assert styles == {"pre": "pre-wrap", "sidebar": "none"}, styles
    finally:
        page.close()


@pytest.mark.parametrize("name", ["08_local_attention", "24_comparison", "27_gqa_kv_cache"])
def test_code_and_tables_fit_the_column_on_a_desktop(browser, name):
    """At 1366 px no code cell (88 columns) scrolls sideways, the tables in view fit the column, and a wide
    full table (folded in a dropdown) scrolls inside its own box instead of widening the page."""
    b, base = browser
    page = b.new_page(viewport={"width": 1366, "height": 900})
    try:
        page.goto(f"{base}/notebooks/{name}.html", wait_until="networkidle")
        report = page.evaluate("""() => {
            const shown = (e) => e.offsetParent !== null;
            const col = document.querySelector('article').clientWidth;
            const pres = [...document.querySelectorAll('article div.cell_input pre')].filter(shown);
            const tables = [...document.querySelectorAll('article table')].filter(shown);
            // a full table folded in a dropdown (hide-output) may be wide: it scrolls inside its own box
            const folded = (t) => t.closest('.tag_hide-output') !== null;
            const scrolls = (t) => { for (let e = t.parentElement; e && e.tagName !== 'ARTICLE'; e = e.parentElement) {
                if (['auto', 'scroll'].includes(getComputedStyle(e).overflowX) && e.clientWidth <= col + 1) return true; }
                return false; };
            return {col, code: pres.length, scrolling: pres.filter(p => p.scrollWidth > p.clientWidth + 1).length,
                    wide_tables: tables.filter(t => t.getBoundingClientRect().width > col + 1 && !folded(t)).length,
                    unboxed: tables.filter(t => t.getBoundingClientRect().width > col + 1 && !scrolls(t)).length};
        }""")
        assert report["code"] >= 3 and report["scrolling"] == 0, report
        assert report["wide_tables"] == 0 and report["unboxed"] == 0, report
    finally:
        page.close()
