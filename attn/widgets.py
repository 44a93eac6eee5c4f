"""The attention explorer: sliders that redraw attention, live or on a static page.

:class:`AttentionExplorer` is an `anywidget <https://anywidget.dev>`_ widget.
When it is built, it evaluates ``compute`` at *every* combination of slider
positions and stores the results in the widget's state. The front end
(``static/explorer.js``) draws from those stored states, so the sliders work
on the rendered book with no kernel. In a running kernel (Jupyter, Colab),
each slider move is also sent to Python, which calls ``compute`` again with
the live model and sends the result back.

Example::

    def compute(temperature, query):
        w = model(x, temperature=temperature, need_weights=True).weights[0]
        return View([Panel(w, title="weights", highlight_row=query)],
                    caption=f"entropy {entropy(w[query]):.2f} nats")

    AttentionExplorer(compute, {"temperature": [0.5, 1, 2], "query": range(8)})
"""

from __future__ import annotations

import itertools
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anywidget
import numpy as np
import torch
import traitlets

from .core import entropy

__all__ = ["Panel", "Curves", "Graph", "View", "AttentionExplorer", "entropy"]

_STATIC = pathlib.Path(__file__).parent / "static"
MAX_STATES = 600
DROPDOWN_AFTER = 4  # a slider over more named (non-numeric) values than this is drawn as a dropdown
CONTROL_KINDS = ("slider", "toggle", "dropdown")


SCALES = ("fixed", "state")


@dataclass
class Panel:
    """One heatmap: ``z`` ``(rows, cols)``, with axis labels, a colour bar and an optional highlighted row.

    Colours run from ``vmin`` to ``vmax``. ``vmin=None`` (the default) is 0, or the
    smallest value when the panel goes negative (e.g. a tanh affinity in [-1, 1]);
    values above ``vmax`` are drawn in the top colour and the colour bar marks
    the clipping (">= vmax"). ``vmax=None`` with ``scale="fixed"`` (the
    default) takes the largest value this panel (same position in the View)
    reaches over *every* slider state, so a colour means the same value
    whichever way the sliders are set; ``scale="state"`` rescales each state to
    its own maximum (the colour bar then says "scaled per state"). ``unit`` is
    printed on the colour bar; ``xlabel``/``ylabel`` name the axes (index ticks
    are drawn when ``rows``/``cols`` are not given).
    """

    z: Any
    rows: Sequence[Any] | None = None
    cols: Sequence[Any] | None = None
    title: str = ""
    xlabel: str = "key"
    highlight_row: int | None = None
    vmax: float | None = 1.0
    digits: int = 3
    ylabel: str = "query"
    unit: str = ""
    scale: str = "fixed"
    vmin: float | None = None

    def to_json(self) -> dict[str, Any]:
        z = self.z.detach().float().cpu().numpy() if isinstance(self.z, torch.Tensor) else np.asarray(self.z, dtype=float)
        if z.ndim != 2:
            raise ValueError(f"Panel.z must be 2-D (rows, cols), got shape {z.shape}")
        if self.scale not in SCALES:
            raise ValueError(f"Panel.scale must be one of {SCALES}, got {self.scale!r}")
        if self.vmax is not None and not (math.isfinite(self.vmax) and self.vmax > 0):
            raise ValueError(f"Panel.vmax must be a positive finite number or None, got {self.vmax!r}")
        if self.vmin is not None and not (math.isfinite(self.vmin) and (self.vmax is None or self.vmin < self.vmax)):
            raise ValueError(f"Panel.vmin must be a finite number below vmax ({self.vmax}), got {self.vmin!r}")
        z = np.round(z, self.digits)
        finite = z[np.isfinite(z)]
        out: dict[str, Any] = {
            "z": z.tolist(),
            "title": self.title,
            "xlabel": self.xlabel,
            "ylabel": self.ylabel,
            "unit": self.unit,
            "vmax": None if self.vmax is None else float(self.vmax),
            "zmax": round(float(finite.max()), self.digits) if finite.size else 0.0,
            "vmin": None if self.vmin is None else float(self.vmin),
            "zmin": round(float(finite.min()), self.digits) if finite.size else 0.0,
            "scale": "fixed" if self.vmax is not None else self.scale,
        }
        if self.rows is not None:
            out["rows"] = [str(r) for r in self.rows]
        if self.cols is not None:
            out["cols"] = [str(c) for c in self.cols]
        if self.highlight_row is not None:
            out["highlight_row"] = int(self.highlight_row)
        return out


def _floats(v: Any, digits: int) -> list:
    a = v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=float)
    return np.round(a, digits).tolist()


@dataclass
class Curves:
    """Line plots over one x axis: ``series`` name -> y values (same length as ``x``).

    ``points`` adds scatter sets (name -> (xs, ys)), ``vline`` a vertical
    marker (e.g. the query being predicted), ``ylim`` fixes the y range so
    that moving a slider does not rescale the axes.
    """

    x: Any
    series: Mapping[str, Any]
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    points: Mapping[str, tuple[Any, Any]] | None = None
    vline: float | None = None
    ylim: tuple[float, float] | None = None
    digits: int = 4

    def to_json(self) -> dict[str, Any]:
        x = _floats(self.x, self.digits)
        series = {}
        for name, y in self.series.items():
            y = _floats(y, self.digits)
            if len(y) != len(x):
                raise ValueError(f"Curves series {name!r} has {len(y)} values, x has {len(x)}")
            series[str(name)] = y
        out: dict[str, Any] = {"kind": "curves", "x": x, "series": series, "title": self.title,
                               "xlabel": self.xlabel, "ylabel": self.ylabel}
        if self.points:
            out["points"] = {str(k): [_floats(px, self.digits), _floats(py, self.digits)] for k, (px, py) in self.points.items()}
        if self.vline is not None:
            out["vline"] = float(self.vline)
        if self.ylim is not None:
            out["ylim"] = [float(self.ylim[0]), float(self.ylim[1])]
        return out


@dataclass
class Graph:
    """A graph drawn at fixed node positions, edges weighted (e.g. by attention).

    Args:
        pos: ``(N, 2)`` node coordinates (any scale; fitted to the panel).
        edges: ``(2, E)`` edge list, rows ``[source; target]``.
        edge_weight: ``(E,)`` values in ``[0, 1]``: line width and opacity (default all 0.15).
        node_value: ``(N,)`` values in ``[0, 1]`` coloured with the palette (default grey).
        highlight: a node drawn with a red ring (the node whose attention is shown).
        labels: optional ``(N,)`` short node labels, drawn when there is room.
        node_label: the legend's name for the node colours.
        node_legend: legend entries ``name -> node value`` (e.g. ``{"class 0": 0, "class 1": 1/3}``);
            by default the distinct node values (up to 8) are listed, or a colour bar 0..1 is drawn.
        edge_label: the legend's name for the edge widths (weights 0.25, 0.5 and 1 are shown).
    """

    pos: Any
    edges: Any
    edge_weight: Any = None
    node_value: Any = None
    highlight: int | None = None
    labels: Sequence[Any] | None = None
    title: str = ""
    digits: int = 3
    node_label: str = "node value"
    node_legend: Mapping[str, float] | None = None
    edge_label: str = "edge weight"

    def to_json(self) -> dict[str, Any]:
        pos = np.asarray(_floats(self.pos, self.digits))
        edges = np.asarray(self.edges.cpu() if isinstance(self.edges, torch.Tensor) else self.edges, dtype=int)
        if pos.ndim != 2 or pos.shape[1] != 2:
            raise ValueError(f"Graph.pos must be (N, 2), got shape {pos.shape}")
        if edges.ndim != 2 or edges.shape[0] != 2:
            raise ValueError(f"Graph.edges must be (2, E), got shape {edges.shape}")
        out: dict[str, Any] = {"kind": "graph", "pos": pos.tolist(), "edges": edges.tolist(), "title": self.title}
        if self.edge_weight is not None:
            out["edge_weight"] = _floats(self.edge_weight, self.digits)
        if self.node_value is not None:
            out["node_value"] = _floats(self.node_value, self.digits)
        if self.highlight is not None:
            out["highlight"] = int(self.highlight)
        if self.labels is not None:
            out["labels"] = [str(v) for v in self.labels]
        legend: dict[str, Any] = {"edge_label": self.edge_label} if self.edge_weight is not None else {}
        if self.node_value is not None:
            legend["node_label"] = self.node_label
            if self.node_legend is not None:
                legend["nodes"] = [[str(k), float(v)] for k, v in self.node_legend.items()]
            else:
                distinct = sorted(set(out["node_value"]))
                if len(distinct) <= 8:
                    legend["nodes"] = [[f"{v:.2g}", v] for v in distinct]
        out["legend"] = legend
        return out


@dataclass
class View:
    """What the explorer draws for one slider setting: panels side by side and a caption.

    A panel is a :class:`Panel` (heatmap), :class:`Curves` (lines) or :class:`Graph`.
    """

    panels: list[Panel | Curves | Graph]
    caption: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, key: str) -> dict[str, Any]:
        return {"key": key, "panels": [p.to_json() for p in self.panels], "caption": self.caption}


def _palette(n: int = 64) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    from .plotting import CMAP

    cmap = colormaps[CMAP]
    return [to_hex(cmap(i / (n - 1))) for i in range(n)]


def _default_kind(vals: Sequence[Any]) -> str:
    if len(vals) == 2:
        return "toggle"
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in vals)
    return "dropdown" if len(vals) > DROPDOWN_AFTER and not numeric else "slider"


def _value_labels(name: str, vals: Sequence[Any], given: Mapping[Any, str] | Sequence[str] | None) -> list[str]:
    if given is None:
        return [_label(v) for v in vals]
    if isinstance(given, Mapping):
        return [str(given.get(v, _label(v))) for v in vals]
    given = list(given)
    if len(given) != len(vals):
        raise ValueError(f"value_labels[{name!r}] has {len(given)} entries, slider has {len(vals)} values")
    return [str(g) for g in given]


def _fixed_scales(states: Any) -> dict[int, tuple[float, float]]:
    """Panel index -> (smallest, largest) value that heatmap takes over all states (panels with scale 'fixed')."""
    span: dict[int, tuple[float, float]] = {}
    for state in states:
        for i, p in enumerate(state["panels"]):
            if "z" in p and p["scale"] == "fixed":
                lo, hi = span.get(i, (math.inf, -math.inf))
                span[i] = (min(lo, p["zmin"]), max(hi, p["zmax"]))
    return span


def _label(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


class AttentionExplorer(anywidget.AnyWidget):
    """Sliders over the arguments of ``compute``, drawing the attention it returns.

    Args:
        compute: ``compute(**params) -> View`` (or a single :class:`Panel`, :class:`Curves` or :class:`Graph`).
        sliders: ``name -> values`` (each value list becomes one slider,
            stepped by the reader; booleans show as off/on).
        initial: starting value per slider (default: the middle value).
        labels: display name per slider (default: the name).
        title: heading shown above the sliders.
        value_labels: shown text per slider value, ``name -> {value: text}`` or a list parallel
            to the values (default: the value itself, booleans as off/on).
        controls: how a slider is shown, ``name -> "slider" | "toggle" | "dropdown"``. By default a
            slider with two values is a toggle, one with more than :data:`DROPDOWN_AFTER` values
            that are not all numbers a dropdown, any other a range slider.

    Heatmap panels with ``vmax=None`` and ``scale="fixed"`` get one colour scale across all
    stored states: the largest value that panel (same index in the View) takes in any state.
    """

    _esm = _STATIC / "explorer.js"
    _css = _STATIC / "explorer.css"

    title = traitlets.Unicode("").tag(sync=True)
    controls: traitlets.List[dict[str, Any]] = traitlets.List().tag(sync=True)
    states = traitlets.Dict().tag(sync=True)
    selection = traitlets.List(traitlets.Int()).tag(sync=True)
    live = traitlets.Dict().tag(sync=True)
    palette: traitlets.List[str] = traitlets.List().tag(sync=True)

    def __init__(
        self,
        compute: Callable[..., View | Panel],
        sliders: Mapping[str, Sequence[Any]],
        initial: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        title: str = "",
        *,
        value_labels: Mapping[str, Mapping[Any, str] | Sequence[str]] | None = None,
        controls: Mapping[str, str] | None = None,
    ) -> None:
        values = {name: list(vals) for name, vals in sliders.items()}
        if not values:
            raise ValueError("AttentionExplorer needs at least one slider")
        for name, vals in values.items():
            if not vals:
                raise ValueError(f"slider {name!r} has no values")
        n_states = math.prod(len(v) for v in values.values())
        if n_states > MAX_STATES:
            raise ValueError(
                f"{n_states} slider combinations would be stored in the page; keep it <= {MAX_STATES} "
                "(fewer values per slider)"
            )
        initial = dict(initial or {})
        unknown = set(initial) - set(values)
        if unknown:
            raise ValueError(f"initial names unknown sliders {sorted(unknown)}; sliders are {list(values)}")
        self._compute = compute
        self._values = values
        selection = []
        for name, vals in values.items():
            if name in initial:
                if initial[name] not in vals:
                    raise ValueError(f"initial value {initial[name]!r} is not one of slider {name!r}'s values {vals}")
                selection.append(vals.index(initial[name]))
            else:
                selection.append(len(vals) // 2)
        for arg, given in (("value_labels", value_labels), ("controls", controls)):
            unknown = set(given or {}) - set(values)
            if unknown:
                raise ValueError(f"{arg} names unknown sliders {sorted(unknown)}; sliders are {list(values)}")
        specs = []
        for name, vals in values.items():
            shown = _value_labels(name, vals, (value_labels or {}).get(name))
            kind = (controls or {}).get(name) or _default_kind(vals)
            if kind not in CONTROL_KINDS:
                raise ValueError(f"controls[{name!r}] must be one of {CONTROL_KINDS}, got {kind!r}")
            if kind == "toggle" and len(vals) != 2:
                raise ValueError(f"controls[{name!r}] = 'toggle' needs exactly 2 values, slider has {len(vals)}")
            specs.append({"name": name, "label": (labels or {}).get(name, name), "labels": shown, "kind": kind})
        states = {}
        for idx in itertools.product(*(range(len(v)) for v in values.values())):
            key = "-".join(map(str, idx))
            states[key] = self._view(idx).to_json(key)
        self._span = _fixed_scales(states.values())
        for state in states.values():
            self._apply_scales(state)
        super().__init__(title=title, controls=specs, states=states, selection=selection, palette=_palette())
        self.observe(self._on_selection, names="selection")

    def params(self, idx: Sequence[int]) -> dict[str, Any]:
        """Slider positions -> keyword arguments of ``compute``."""
        return {name: vals[i] for (name, vals), i in zip(self._values.items(), idx, strict=True)}

    def _view(self, idx: Sequence[int]) -> View:
        out = self._compute(**self.params(idx))
        if isinstance(out, (Panel, Curves, Graph)):
            out = View([out])
        if not isinstance(out, View):
            raise TypeError(f"compute must return a View or a Panel, got {type(out).__name__}")
        return out

    def _on_selection(self, change: dict[str, Any]) -> None:
        idx = list(change["new"])
        key = "-".join(map(str, idx))
        with torch.no_grad():
            self.live = self._apply_scales(self._view(idx).to_json(key))

    def _apply_scales(self, state: dict[str, Any]) -> dict[str, Any]:
        """Fill in each heatmap's colour range (vmin, vmax): fixed over all states, or the state's own."""
        for i, p in enumerate(state["panels"]):
            if "z" not in p or "vmax_from" in p:
                continue
            fixed = self._span.get(i) if p["scale"] == "fixed" else None
            lo, hi = fixed if fixed is not None else (p["zmin"], p["zmax"])
            if p["vmin"] is None:
                p["vmin"] = min(0.0, lo)
            if p["vmax"] is None:
                p["vmax"] = max(hi, p["vmin"] + 1e-12)
                p["vmax_from"] = "all states" if fixed is not None else "state"
            else:
                p["vmax_from"] = "panel"
        return state

    def select(self, **params: Any) -> dict[str, Any]:
        """Move sliders from Python (as a reader would); returns the drawn state."""
        idx = list(self.selection)
        for name, value in params.items():
            if name not in self._values:
                raise KeyError(f"no slider {name!r}; sliders are {list(self._values)}")
            idx[list(self._values).index(name)] = self._values[name].index(value)
        self.selection = idx
        return self.live
