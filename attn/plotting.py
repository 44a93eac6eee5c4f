"""Plots with one consistent style: attention heatmaps, training curves, cost sweeps."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .benchmark import fit_exponent

__all__ = ["use_style", "panels", "heatmap", "heads", "curves", "sweep_plot", "CMAP", "MAX_WIDTH_IN", "DPI"]

CMAP = "viridis"
#: The widest figure the book draws, in inches: at :data:`DPI` it is as wide as the page's text column
#: (757 px at 1366 px), so 10-pt lettering is shown at its natural size, never shrunk.
MAX_WIDTH_IN = 7.5
#: Pixels per inch of the figures stored in the notebooks.
DPI = 100
PALETTE = ["#3b6ea8", "#e07b39", "#4c9f70", "#c44e52", "#8172b2", "#937860", "#da8bc3", "#8c8c8c"]


def use_style() -> None:
    """Apply the book's matplotlib style (call once per notebook).

    In a notebook, figures are stored at twice their pixel density ("retina" PNGs with their display width
    in the output's metadata): a figure of at most :data:`MAX_WIDTH_IN` inches is shown at its natural
    size in the page's column and stays sharp on high-density screens and when a phone shrinks it.
    """
    try:
        from IPython import get_ipython

        if get_ipython() is not None:
            from matplotlib_inline.backend_inline import set_matplotlib_formats

            set_matplotlib_formats("retina")
    except ImportError:  # plain Python: nothing to configure
        pass
    plt.rcParams.update(
        {
            "figure.dpi": DPI,
            "savefig.dpi": DPI,
            "figure.figsize": (6.0, 3.6),
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.prop_cycle": plt.cycler(color=PALETTE),
            "font.size": 10,
            "axes.titlesize": 11,
            "legend.frameon": False,
        }
    )


def panels(
    n: int,
    *,
    ncols: int | None = None,
    panel_width: float = 2.4,
    panel_height: float = 2.2,
    sharex: bool = False,
    sharey: bool = False,
) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` panels laid out in rows no wider than :data:`MAX_WIDTH_IN` inches.

    ``ncols`` defaults to as many ``panel_width``-inch panels as fit in one row; panels that do not fit go on
    the next row (a wide multi-panel figure squeezed into the page column shrinks its lettering below
    legibility). Unused cells of the last row are switched off. Returns ``(figure, [n axes])``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    fit = max(1, int(MAX_WIDTH_IN // panel_width))
    cols = min(n, ncols or fit)
    rows = -(-n // cols)
    width = min(MAX_WIDTH_IN, panel_width * cols)
    fig, grid = plt.subplots(rows, cols, figsize=(width, panel_height * rows), squeeze=False,
                             constrained_layout=True, sharex=sharex, sharey=sharey)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n]


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def heatmap(
    weights: torch.Tensor | np.ndarray,
    ax: Axes | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    xlabel: str = "key",
    ylabel: str = "query",
    vmax: float | None = 1.0,
    colorbar: bool = True,
) -> Axes:
    """Draw one ``(n_queries, n_keys)`` attention matrix."""
    w = _np(weights)
    if w.ndim != 2:
        raise ValueError(f"heatmap takes a 2-D (n_queries, n_keys) matrix, got shape {w.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(min(1.2 + 0.35 * w.shape[1], MAX_WIDTH_IN), min(1.0 + 0.35 * w.shape[0], 6)))
    im = ax.imshow(w, cmap=CMAP, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.grid(False)
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), row_labels)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=90 if max(map(len, col_labels)) > 2 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def heads(weights: torch.Tensor | np.ndarray, title: str | None = None, max_cols: int = 4, **kw) -> Figure:
    """Draw every head of ``(heads, n_queries, n_keys)`` weights in a grid."""
    w = _np(weights)
    if w.ndim != 3:
        raise ValueError(f"heads takes (heads, n_queries, n_keys), got shape {w.shape}")
    h = w.shape[0]
    cols = min(h, max_cols)
    fig, axes = panels(h, ncols=cols, panel_width=MAX_WIDTH_IN / cols, panel_height=2.4)
    for i, ax in enumerate(axes):
        heatmap(w[i], ax=ax, title=f"head {i}", colorbar=False, **kw)
    # one colour bar for all heads: they share the scale (vmax, 1 by default)
    fig.colorbar(axes[0].images[0], ax=axes, shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    return fig


def curves(histories: dict[str, pd.DataFrame], y: str = "loss", ax: Axes | None = None, logy: bool = False) -> Axes:
    """Overlay one training curve per run; ``histories`` maps label -> ``History.to_frame()``."""
    if ax is None:
        _, ax = plt.subplots()
    for label, df in histories.items():
        ax.plot(df["step"], df[y], label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    return ax


def sweep_plot(df: pd.DataFrame, y: str = "median_ms", ax: Axes | None = None, ylabel: str | None = None) -> Axes:
    """Log-log cost against sequence length per implementation, with fitted exponents in the legend."""
    if ax is None:
        _, ax = plt.subplots()
    for name, g in df.groupby("name", sort=False):
        p = fit_exponent(g["n"], g[y])
        ax.loglog(g["n"], g[y], "o-", label=f"{name}  (~n^{p:.2f})")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel(ylabel or y)
    ax.legend()
    return ax
