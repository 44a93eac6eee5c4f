"""Labels a reader compares on a page agree with each other (issue 22)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_latent_explorer_layer_slider_matches_its_panel_titles():
    """Chapter 29's explorer: the "layer" slider shows the numbers the panel titles print ("layer 1/2"), not
    0-based indices beside 1-based titles."""
    src = (ROOT / "notebooks" / "29_latent_attention.md").read_text()
    slider = [int(v) for v in re.search(r'"layer": \[([^\]]*)\]', src).group(1).split(",")]
    shifts = re.findall(r"layer \{layer(?: ([+-]) (\d+))?\}", src)
    assert shifts, "the panel titles no longer print the layer"
    for sign, amount in shifts:
        shift = 0 if not sign else (int(amount) if sign == "+" else -int(amount))
        assert [v + shift for v in slider] == slider, f"slider {slider}, titles print {[v + shift for v in slider]}"
