"""A small Sphinx extension for the book's pages (loaded by ``_config.yml``'s ``local_extensions``).

* each page's scripts once (below);
* ``book.css``: code at a size that fits 88 columns in the text column;
* ``book-print.css``: printing a chapter wraps code instead of cutting it at the right edge;
* ``search-snippets.js``: search results quote the page's text, not its launch buttons.

``sphinx-thebe`` registers its configuration script each time Sphinx reads the
sources (``env-before-read-docs``), so an incremental build that reads twice
puts ``const THEBE_JS_URL = ...`` on every page twice, and the browser reports
"Identifier 'THEBE_JS_URL' has already been declared". Here each page's
scripts are kept once each, in their first position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STATIC = Path(__file__).parent / "static"


def _dedupe_scripts(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple[str, str]] = set()
    kept = []
    for js in scripts:
        key = (getattr(js, "filename", None) or "", str(getattr(js, "attributes", {}).get("body", "")))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"] = kept


def _add_static(app: Any) -> None:
    app.config.html_static_path.append(str(STATIC))


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", _add_static)
    app.add_css_file("book.css")
    app.add_css_file("book-print.css")
    app.add_js_file("search-snippets.js")
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
