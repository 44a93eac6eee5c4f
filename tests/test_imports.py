"""``import attn`` and ``attn.get(...)`` load the layers, not the book's tooling (matplotlib, anywidget, pandas).

Each check runs in a fresh interpreter, since this test session has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("matplotlib", "anywidget", "ipywidgets", "pandas")


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import attn",
        "import attn; attn.get('local')",
        "import attn; attn.mechanisms()",
        "import attn; attn.MultiHeadAttention(8, 2)",
    ],
)
def test_the_package_loads_no_plotting_widgets_or_pandas(code):
    assert _loaded_after(code) == []


def test_support_modules_register_nothing():
    """The modules that registry.load_all skips really hold no mechanism (else skipping them would lose it)."""
    import importlib

    from attn import registry

    before = set(registry.MECHANISMS)
    for name in sorted(registry.SUPPORT_MODULES):
        importlib.import_module(f"attn.{name}")
    assert set(registry.MECHANISMS) == before
