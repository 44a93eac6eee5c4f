"""Chapter 11's experiments: grid recall, the own task on which the comparison measures axial attention.

:class:`GridRecall` (a flagged cell whose value must be read at the corner, along a row and then a
column), :class:`GridRecallModel` (embeddings, one pre-norm residual
:class:`~attn.axial.AxialAttention` layer, a readout), :func:`grid_loss`, and :func:`make_task`,
the own-task factory (``OWN_TASKS["axial"]``, by size). The layer is in :mod:`attn.axial`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..axial import AxialAttention, AxialWeights
from ..multihead import MultiHeadAttention
from ..registry import OwnTask
from . import sized

__all__ = ["GridRecall", "GridRecallModel", "MIXERS", "grid_loss", "GridRun", "run_grid_recall", "corner_field",
           "make_task", "OWN_TASKS"]

Mixer = Literal["axial", "axial+ff", "row", "dense"]
#: The attention layers :class:`GridRecallModel` can hold.
MIXERS: tuple[str, ...] = ("axial", "axial+ff", "row", "dense")

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
    r"""Value + flag + row + column embeddings, one attention layer over the grid, readout at cell (0, 0).

    ``h = e_value + e_flag + p_row + p_col`` ``(B, H, W, C)``, then by ``mixer``:

    * ``"axial"``: ``h <- h + Axial(LayerNorm(h))``, the row pass then the column pass
      (:class:`~attn.axial.AxialAttention`, no residual between them);
    * ``"axial+ff"``: Ho et al.'s arrangement, each pass its own residual sublayer with a
      feed-forward sublayer between them: ``h <- h + Row(LN h)``, ``h <- h + FF(LN h)``,
      ``h <- h + Col(LN h)`` (the same two passes' projections);
    * ``"row"``: ``h <- h + Row(LN h)``: the row pass alone, whose reach is the row of the
      reading cell (a bound, not a competitor: it cannot see a flag outside row 0);
    * ``"dense"``: ``h <- h + MHA(LN h)`` over the ``HW`` cells as one sequence (every cell
      reads every cell in one hop, :math:`O((HW)^2)` scores).

    logits ``= Linear(LayerNorm(h[:, 0, 0]))``. Shapes: ``values, flag (B, H, W)`` -> ``(B, n_values)``;
    the weights are :class:`~attn.axial.AxialWeights` (axial mixers) or ``(B, heads, L, L)``
    (``"row"``: ``L = W`` per row, ``(B, heads, H, W, W)``; ``"dense"``: ``L = HW``).
    """

    def __init__(self, task: GridRecall, embed_dim: int = 32, num_heads: int = 4, mixer: Mixer = "axial") -> None:
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        self.task, self.mixer = task, mixer
        self.value = nn.Embedding(task.n_values, embed_dim)
        self.flag = nn.Embedding(2, embed_dim)
        self.row_pos = nn.Parameter(torch.randn(task.height, 1, embed_dim) * 0.3)
        self.col_pos = nn.Parameter(torch.randn(1, task.width, embed_dim) * 0.3)
        self.norm = nn.LayerNorm(embed_dim)
        self.dense: MultiHeadAttention | None = None
        self.attention: AxialAttention | None = None
        if mixer == "dense":
            self.dense = MultiHeadAttention(embed_dim, num_heads)
        else:
            self.attention = AxialAttention(embed_dim, num_heads)
        self.ff: nn.Sequential | None = None
        if mixer == "axial+ff":
            self.norm_ff, self.norm_col = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
            self.ff = nn.Sequential(nn.Linear(embed_dim, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, embed_dim))
        self.out_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_values)

    def embed(self, values: Tensor, flag: Tensor) -> Tensor:
        """The cells' input vectors ``(B, H, W, C)``."""
        return self.value(values) + self.flag(flag.long()) + self.row_pos + self.col_pos

    def forward(self, values: Tensor, flag: Tensor, need_weights: bool = False) -> tuple[Tensor, Any]:
        h = self.embed(values, flag)  # (B, H, W, C)
        w: Any = None
        if self.dense is not None:
            B, H, W, C = h.shape
            out, w = self.dense(self.norm(h).reshape(B, H * W, C), need_weights=need_weights)
            h = h + out.reshape(B, H, W, C)
        elif self.mixer == "axial":
            assert self.attention is not None
            out, w = self.attention(self.norm(h), need_weights=need_weights)
            h = h + out
        else:
            assert self.attention is not None
            out, w_row = self.attention._pass(self.norm(h), self.attention.row, "row", need_weights)
            h = h + out
            w = w_row
            if self.ff is not None:  # Ho et al.: a feed-forward sublayer, then the column pass on its own residual
                h = h + self.ff(self.norm_ff(h))
                out, w_col = self.attention._pass(self.norm_col(h), self.attention.col, "col", need_weights)
                h = h + out
                w = AxialWeights(w_row, w_col) if w_row is not None and w_col is not None else None
        return self.head(self.out_norm(h[:, 0, 0])), w


def grid_loss(model: GridRecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the flagged cell's value, and accuracy."""
    logits, _ = model(batch["values"], batch["flag"])
    return F.cross_entropy(logits, batch["y"]), {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


def _grid_weights(model: GridRecallModel, batch: dict[str, Tensor]) -> Tensor:
    """Row-pass attention rows ``(B, h, H, W, W)``, each summing to 1 (for the entropy column)."""
    _, w = model(batch["values"], batch["flag"], need_weights=True)
    assert isinstance(w, AxialWeights), "an axial model with need_weights=True returns AxialWeights"
    return w.row


def corner_field(model: GridRecallModel, values: Tensor, flag: Tensor) -> Tensor:
    r"""The trained model's composed receptive field of the reading cell (0, 0): ``(B, heads, H, W)``.

    :math:`r_{0,0;\,m,l} = \beta_{0,0,m}\, \alpha_{m,0,l}` per head
    (:meth:`attn.axial.AxialAttention.receptive_weights`): the column weights of cell (0, 0)
    times the row weights of the cells (m, 0) it reads. Each map sums to 1. Axial mixers only.
    """
    with torch.no_grad():
        _, w = model(values, flag, need_weights=True)
    if not isinstance(w, AxialWeights):
        raise ValueError(f"corner_field needs an axial model (mixer 'axial' or 'axial+ff'), got {model.mixer!r}")
    return AxialAttention.receptive_weights(w)[:, :, 0, 0]


@dataclass
class GridRun:
    """What :func:`run_grid_recall` returns: held-out accuracies per mixer, one per seed, and the trained models.

    ``acc[mixer]``: accuracy on a held-out batch; ``acc_row0`` / ``acc_elsewhere``: the same batch
    split by whether the flag lies in row 0 (the row pass's reach from cell (0, 0)) or not;
    ``reach_bound``: the best a model that sees only row 0 can score, :math:`1/H + (1 - 1/H)/V`.
    """

    seeds: list[int]
    acc: dict[str, list[float]] = field(default_factory=dict)
    acc_row0: dict[str, list[float]] = field(default_factory=dict)
    acc_elsewhere: dict[str, list[float]] = field(default_factory=dict)
    models: dict[tuple[str, int], GridRecallModel] = field(default_factory=dict)
    reach_bound: float = 0.0


def run_grid_recall(
    task: GridRecall,
    mixers: tuple[str, ...] = ("row", "axial", "dense"),
    seeds: tuple[int, ...] | list[int] = (0, 1, 2),
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    embed_dim: int = 32,
    num_heads: int = 2,
    eval_batch: int = 1024,
) -> GridRun:
    """Train one :class:`GridRecallModel` per mixer and seed on the same batches and budget; evaluate held out.

    For seed ``s`` every mixer starts from ``set_seed(s)`` and trains on the batches of
    :func:`attn.train.train` with ``seed=s``; all are evaluated on one held-out batch
    (seed ``10_000 + s``).
    """
    from ..train import set_seed, train

    run = GridRun(seeds=list(seeds), reach_bound=1 / task.height + (1 - 1 / task.height) / task.n_values)
    for s in seeds:
        held = task.sample(eval_batch, torch.Generator().manual_seed(10_000 + s))
        in_row0 = held["where"] < task.width
        for mixer in mixers:
            set_seed(s)
            model = GridRecallModel(task, embed_dim, num_heads, mixer=mixer)  # type: ignore[arg-type]
            train(model, task.sample, grid_loss, steps=steps, batch_size=batch_size, lr=lr, seed=s, progress=False)
            model.eval()
            with torch.no_grad():
                right = (model(held["values"], held["flag"])[0].argmax(-1) == held["y"]).float()
            run.acc.setdefault(mixer, []).append(float(right.mean()))
            run.acc_row0.setdefault(mixer, []).append(float(right[in_row0].mean()))
            run.acc_elsewhere.setdefault(mixer, []).append(float(right[~in_row0].mean()))
            run.models[mixer, s] = model
    return run


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
