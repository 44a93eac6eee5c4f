"""Chapter 11's experiments: grid recall, the own task on which the comparison measures axial attention.

:class:`GridRecall` (a flagged cell whose value must be read at the corner, along a row and then a
column), :class:`GridRecallModel` (embeddings, one pre-norm residual
:class:`~attn.axial.AxialAttention` layer, a readout), :func:`grid_loss`, and :func:`make_task`,
the own-task factory (``OWN_TASKS["axial"]``, by size). The layer is in :mod:`attn.axial`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..axial import AxialAttention, AxialWeights
from ..registry import OwnTask
from . import sized

__all__ = ["GridRecall", "GridRecallModel", "grid_loss", "make_task", "OWN_TASKS"]




class GridRecall:
    """Every cell of an ``H x W`` grid holds a value in ``0..n_values-1``; one cell is flagged.

    The model must output the value of the flagged cell **at the corner cell
    (0, 0)**: the information has to travel along a row and then along a
    column, which is what the two axial passes do (one pass is not enough
    unless the flag lies in row 0).

    ``sample(batch, generator)`` -> ``values (B, H, W)`` long, ``flag (B, H, W)`` bool, ``y (B,)``.
    """

    def __init__(self, height: int = 6, width: int = 10, n_values: int = 8) -> None:
        if height < 1 or width < 1 or n_values < 2:
            raise ValueError(f"need height, width >= 1 and n_values >= 2, got {height}, {width}, {n_values}")
        self.height, self.width, self.n_values = height, width, n_values

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        H, W = self.height, self.width
        values = torch.randint(0, self.n_values, (batch_size, H, W), generator=generator)
        where = torch.randint(0, H * W, (batch_size,), generator=generator)
        flag = F.one_hot(where, H * W).bool().view(batch_size, H, W)
        return {"values": values, "flag": flag, "y": values.view(batch_size, -1)[torch.arange(batch_size), where], "where": where}


class GridRecallModel(nn.Module):
    """Value + flag + row + column embeddings, one pre-norm residual axial layer, readout at cell (0, 0).

    ``h = e_value + e_flag + p_row + p_col``; ``h <- h + Axial(LayerNorm(h))``;
    logits ``= Linear(LayerNorm(h[:, 0, 0]))``. Shapes: ``values, flag (B, H, W)`` -> ``(B, n_values)``.
    """

    def __init__(self, task: GridRecall, embed_dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.task = task
        self.value = nn.Embedding(task.n_values, embed_dim)
        self.flag = nn.Embedding(2, embed_dim)
        self.row_pos = nn.Parameter(torch.randn(task.height, 1, embed_dim) * 0.3)
        self.col_pos = nn.Parameter(torch.randn(1, task.width, embed_dim) * 0.3)
        self.norm = nn.LayerNorm(embed_dim)
        self.attention = AxialAttention(embed_dim, num_heads)
        self.out_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_values)

    def forward(self, values: Tensor, flag: Tensor, need_weights: bool = False) -> tuple[Tensor, AxialWeights | None]:
        h = self.value(values) + self.flag(flag.long()) + self.row_pos + self.col_pos  # (B, H, W, C)
        out, w = self.attention(self.norm(h), need_weights=need_weights)
        h = h + out
        return self.head(self.out_norm(h[:, 0, 0])), w


def grid_loss(model: GridRecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the flagged cell's value, and accuracy."""
    logits, _ = model(batch["values"], batch["flag"])
    return F.cross_entropy(logits, batch["y"]), {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


def _grid_weights(model: GridRecallModel, batch: dict[str, Tensor]) -> Tensor:
    """Row-pass attention rows ``(B, h, H, W, W)``, each summing to 1 (for the entropy column)."""
    _, w = model(batch["values"], batch["flag"], need_weights=True)
    assert w is not None, "need_weights=True returns the weights"
    return w.row


def make_task(size: str = "book") -> OwnTask[GridRecallModel]:
    """The comparison's own task for ``"axial"``: grid recall for the model, ``(s, 2s)`` grids for the cost sweep.

    ``size`` is one of :data:`attn.experiments.SIZES`. ``inputs(size, generator)`` makes one grid of
    ``size`` pixels, ``H = sqrt(size/2)``, ``W = 2H``.
    """
    # (H, W, n_values, embed_dim, heads, steps, batch, sizes: pixel counts of (s, 2s) grids)
    H, W, n_values, E, heads, steps, batch, sizes = sized(
        size,
        quick=(4, 6, 4, 16, 2, 40, 32, (32, 128, 512)),
        book=(6, 10, 8, 32, 4, 150, 64, (128, 512, 2048)),
        full=(8, 12, 8, 32, 4, 600, 64, (128, 512, 2048, 8192)),
        large=(16, 24, 16, 64, 4, 2000, 128, (512, 2048, 8192, 32768)),
    )
    task = GridRecall(H, W, n_values)
    model = GridRecallModel(task, E, heads)
    layer = AxialAttention(E, heads)

    def inputs(size: int, generator: torch.Generator) -> tuple[Tensor]:
        side = math.isqrt(size // 2)
        if 2 * side * side != size:
            raise ValueError(f"size must be 2 s^2 pixels (an s x 2s grid), got {size}")
        return (torch.randn(1, side, 2 * side, E, generator=generator),)

    return OwnTask(
        description=f"grid recall: read the flagged cell's value at the corner of a {H}x{W} grid",
        model=model, sample=task.sample, loss=grid_loss, layer=layer, inputs=inputs, sizes=sizes,
        size_unit="pixels", steps=steps, batch_size=batch, lr=3e-3, log_every=10, target_acc=0.9,
        weights=_grid_weights,
    )


OWN_TASKS = {"axial": make_task}
