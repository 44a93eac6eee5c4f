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

__all__ = ["use_style", "heatmap", "heads", "curves", "sweep_plot", "CMAP"]

CMAP = "viridis"
PALETTE = ["#3b6ea8", "#e07b39", "#4c9f70", "#c44e52", "#8172b2", "#937860", "#da8bc3", "#8c8c8c"]


def use_style() -> None:
    """Apply the book's matplotlib style (call once per notebook)."""
    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 100,
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
        _, ax = plt.subplots(figsize=(min(1.2 + 0.35 * w.shape[1], 7), min(1.0 + 0.35 * w.shape[0], 6)))
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
    rows = (h + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False, constrained_layout=True)
    for i, ax in enumerate(axes.flat):
        if i < h:
            heatmap(w[i], ax=ax, title=f"head {i}", colorbar=False, **kw)
        else:
            ax.axis("off")
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
