"""Helpers for the browser tests: a Chromium to drive, and the built book served on 127.0.0.1."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """Debian's Chromium, installed with apt-get when missing (CI runs as root)."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("Chromium is missing; install Debian's `chromium` package (apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, stdout=subprocess.DEVNULL)
    return shutil.which("chromium") or "/usr/bin/chromium"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


class BookServer:
    """Serve a folder over HTTP on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_Quiet, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> BookServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# What every explorer on a page drew, read from the data attributes that static/explorer.js sets:
# the canvas's drawn size against its backing store (aspect ratio), how far it reaches past its
# column, its panels, colour bars, legends and label boxes, and the last redraw's time.
EXPLORER_REPORT_JS = """
() => Array.from(document.querySelectorAll('.attn-explorer')).map((root) => {
  const c = root.querySelector('canvas'), r = c.getBoundingClientRect();
  const box = root.getBoundingClientRect(), col = (root.closest('article, main') || root).getBoundingClientRect();
  const j = (k, d) => JSON.parse(c.dataset[k] || d);
  return {
    key: root.dataset.key,
    css: [r.width, r.height], store: [c.width, c.height],
    aspect_error: Math.abs(r.width / r.height - c.width / c.height) / (c.width / c.height),
    overflow: Math.max(r.right - box.right, r.right - col.right, box.left - r.left,
                       r.right - document.documentElement.clientWidth),
    panels: j('panels', '[]'), colorbars: j('colorbars', '[]'), legends: j('legends', '[]'),
    boxes: j('labelBoxes', '[]'), layout: j('layout', '{}'), draw_ms: parseFloat(c.dataset.drawMs || 'NaN'),
    controls: Array.from(root.querySelectorAll('[data-control]')).map((e) => [e.dataset.control, e.dataset.kind,
      +e.dataset.position, +e.dataset.count]),
  };
})
"""


def move_control(page, explorer, j: int) -> tuple[str, str]:
    """Move control ``j`` of an explorer one position with the keyboard (forward, or back at the end).

    Returns the keys that move it forward and back again: a range slider takes ArrowRight/ArrowLeft,
    a toggle (two radio buttons) ArrowRight/ArrowLeft on the checked one, a dropdown ArrowDown/ArrowUp.
    """
    row = explorer.locator("[data-control]").nth(j)
    kind, pos, count = row.get_attribute("data-kind"), int(row.get_attribute("data-position")), int(row.get_attribute("data-count"))
    at_end = pos == count - 1
    if kind == "dropdown":
        row.locator("select").focus()
        keys = ("ArrowUp", "ArrowDown") if at_end else ("ArrowDown", "ArrowUp")
    else:
        row.locator("input:checked" if kind == "toggle" else "input[type=range]").focus()
        keys = ("ArrowLeft", "ArrowRight") if at_end else ("ArrowRight", "ArrowLeft")
    page.keyboard.press(keys[0])
    return keys
