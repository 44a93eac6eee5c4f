r"""Chapter 11 -- axial attention: attend along the rows of a grid, then along its columns.

**Axial attention** (Ho, Kalchbrenner, Weissenborn, Salimans 2019, "Axial
Attention in Multidimensional Transformers"). A grid ``x`` of shape
``(B, H, W, C)`` holds ``HW`` tokens. Full self-attention over them costs
``O((HW)^2 C)``. Axial attention factorises it into two passes of ordinary
multi-head attention, each along one axis:

.. math::

    \text{row pass:}\quad y_{i,j} = \sum_{l=1}^{W} \operatorname{softmax}_l
        \Big(\frac{q_{i,j}^\top k_{i,l}}{\sqrt d}\Big) v_{i,l}
    \qquad
    \text{column pass:}\quad z_{i,j} = \sum_{m=1}^{H} \operatorname{softmax}_m
        \Big(\frac{q'_{i,j}{}^\top k'_{m,j}}{\sqrt d}\Big) v'_{m,j}

where ``q, k, v`` are projections of ``x`` and ``q', k', v'`` projections of
``y`` (each pass has its own ``W^Q, W^K, W^V, W^O``, split into heads). The
row pass is ``H`` independent attentions of length ``W`` (the rows, batched as
``(B H, heads, W, d)``), the column pass ``W`` of length ``H``: time
``O(HW(H + W) C)``, memory for the scores ``O(HW(H + W))``. After both passes
every output depends on every input (``z_{i,j}`` reads column ``j`` of ``y``,
and ``y_{m,j}`` read row ``m`` of ``x``): the receptive field is the whole
grid, at the cost of two layers of work instead of one.

Shapes: ``x`` ``(B, H, W, C)``, or ``(B, H W, C)`` tokens in row-major order
with ``grid=(H, W)``; output the same shape. Weights, when asked for,
:class:`AxialWeights` ``row (B, heads, H, W, W)`` and ``col (B, heads, W, H, H)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .checks import check_heads, check_tensor, empty_batch
from .core import AttentionOutput, scaled_dot_product_attention
from .registry import OwnTask, register

__all__ = ["AxialWeights", "AxialOutput", "axis_attention", "AxialAttention", "GridRecall", "GridRecallModel", "make_task"]


class AxialWeights(NamedTuple):
    """Attention weights of the two passes: ``row (B, h, H, W, W)``, ``col (B, h, W, H, H)``."""

    row: Tensor
    col: Tensor


class AxialOutput(NamedTuple):
    """What :class:`AxialAttention` returns: ``output`` shaped like its input, and both passes' weights or ``None``.

    The same two fields as :class:`~attn.core.AttentionOutput`, but ``weights`` is an :class:`AxialWeights`.
    """

    output: Tensor
    weights: AxialWeights | None


def axis_attention(q: Tensor, k: Tensor, v: Tensor, axis: str, need_weights: bool = False, dropout_p: float = 0.0) -> AttentionOutput:
    """Attention along one axis of a grid: ``q, k, v`` ``(B, heads, H, W, d)``.

    ``axis="row"``: each query ``(i, j)`` attends to the ``W`` keys of its row ``i``.
    ``axis="col"``: to the ``H`` keys of its column ``j``. The other axis becomes a
    batch axis, so each pass is one batched scaled dot-product attention.

    Returns:
        output ``(B, heads, H, W, d_v)``; weights ``(B, heads, H, W, W)`` (row) or
        ``(B, heads, W, H, H)`` (col) when asked for.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, "(batch, heads, H, W, d)", 5)
    if q.shape[:4] != k.shape[:4] or k.shape[:4] != v.shape[:4]:
        raise ValueError(f"q, k, v must share (batch, heads, H, W): {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if axis not in ("row", "col"):
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    B = q.shape[0]
    if axis == "row":  # the H rows are independent sequences of length W
        seq = lambda t: rearrange(t, "b h H W d -> (b H) h W d")  # noqa: E731
        out, w = scaled_dot_product_attention(seq(q), seq(k), seq(v), need_weights=need_weights, dropout_p=dropout_p)
        out = rearrange(out, "(b H) h W d -> b h H W d", b=B)
        w = rearrange(w, "(b H) h W V -> b h H W V", b=B) if w is not None else None
    else:  # the W columns are independent sequences of length H
        seq = lambda t: rearrange(t, "b h H W d -> (b W) h H d")  # noqa: E731
        out, w = scaled_dot_product_attention(seq(q), seq(k), seq(v), need_weights=need_weights, dropout_p=dropout_p)
        out = rearrange(out, "(b W) h H d -> b h H W d", b=B)
        w = rearrange(w, "(b W) h H G -> b h W H G", b=B) if w is not None else None
    return AttentionOutput(out, w)


class AxialAttention(nn.Module):
    """Multi-head axial self-attention on a 2-D grid: a row pass, then a column pass.

    Each pass is multi-head attention with its own projections
    (``row_qkv``/``row_out``, ``col_qkv``/``col_out``): ``z = col(row(x))``.
    No residual connections or norms inside: a model wraps the layer as it
    wraps any attention layer.

    Args:
        embed_dim: channels ``C``; num_heads: heads ``h`` (must divide ``C``).
        dropout: dropout on the attention weights during training.
        bias: biases on the projections.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_heads(embed_dim, num_heads)
        self.embed_dim, self.num_heads, self.head_dim, self.dropout = embed_dim, num_heads, embed_dim // num_heads, dropout
        self.row_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)  # [W^Q; W^K; W^V] of the row pass
        self.row_out = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.col_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)  # ... of the column pass
        self.col_out = nn.Linear(embed_dim, embed_dim, bias=bias)

    def _grid(self, x: object, grid: tuple[int, int] | None) -> tuple[Tensor, bool]:
        """Validate; return ``x`` as ``(B, H, W, C)`` and whether it came flattened."""
        C = self.embed_dim
        x = check_tensor(x, "x", f"(batch, H, W, {C}) or (batch, H*W, {C}) with grid=(H, W)", (3, 4))
        if x.shape[-1] != C:
            raise ValueError(f"x must have {C} channels in its last dimension, got shape {tuple(x.shape)}")
        if x.ndim == 4:
            if grid is not None and tuple(grid) != tuple(x.shape[1:3]):
                raise ValueError(f"grid={tuple(grid)} does not match x of shape {tuple(x.shape)} (batch, H, W, C)")
            if x.shape[1] == 0 or x.shape[2] == 0:
                raise ValueError(f"x must be a non-empty grid (H, W >= 1), got shape {tuple(x.shape)}")
            return x, False
        if grid is None:
            raise ValueError(f"x of shape {tuple(x.shape)} is a flat token sequence: pass grid=(H, W) with H*W = {x.shape[1]}")
        if len(tuple(grid)) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
            raise ValueError(f"grid must be two positive ints (H, W), got {grid!r}")
        H, W = grid
        if x.shape[1] != H * W:
            raise ValueError(f"grid=({H}, {W}) holds H*W = {H * W} tokens, but x has {x.shape[1]} (shape {tuple(x.shape)})")
        return x.reshape(x.shape[0], H, W, C), True

    def _pass(self, x: Tensor, qkv: nn.Linear, out: nn.Linear, axis: str, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        q, k, v = rearrange(qkv(x), "b H W (three h d) -> three b h H W d", three=3, h=self.num_heads)
        y, w = axis_attention(q, k, v, axis, need_weights, self.dropout if self.training else 0.0)
        return out(rearrange(y, "b h H W d -> b H W (h d)")), w

    def forward(self, x: Tensor, need_weights: bool = False, grid: tuple[int, int] | None = None) -> AxialOutput:
        """``x (B, H, W, C)`` (or ``(B, H W, C)`` with ``grid``) -> ``(z, AxialWeights | None)``, ``z`` shaped like ``x``."""
        x4, flat = self._grid(x, grid)
        if empty_batch(x4):
            _, H, W, _ = x4.shape
            w = AxialWeights(x4.new_zeros(0, self.num_heads, H, W, W), x4.new_zeros(0, self.num_heads, W, H, H)) if need_weights else None
            return AxialOutput(x4.new_zeros(x.shape), w)
        y, w_row = self._pass(x4, self.row_qkv, self.row_out, "row", need_weights)  # along W, within each row
        z, w_col = self._pass(y, self.col_qkv, self.col_out, "col", need_weights)  # along H, within each column
        if flat:
            z = z.reshape(x.shape)
        if not need_weights:
            return AxialOutput(z, None)
        assert w_row is not None and w_col is not None, "axis_attention returns weights when need_weights=True"
        return AxialOutput(z, AxialWeights(w_row, w_col))

    @staticmethod
    def receptive_weights(weights: AxialWeights) -> Tensor:
        """How much output ``(i, j)`` draws on input ``(m, l)`` through both passes: ``(B, h, H, W, H, W)``.

        ``sum_m col[j][i, m] * row[m][j, l]`` per head: the column weights of
        query ``(i, j)`` times the row weights of the pixels it read (the
        attention-only path, ignoring the projections).
        """
        row, col = weights  # row (B, h, H, W, W'), col (B, h, W, H, H')
        return torch.einsum("bhjim,bhmjl->bhijml", col, row)


# ----------------------------------------------------------------------------- its own task: recall on a grid


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


_PRESETS = {  # preset -> (H, W, n_values, embed_dim, heads, steps, batch, sizes: pixel counts of (s, 2s) grids)
    "quick": (4, 6, 4, 16, 2, 40, 32, (32, 128, 512)),
    "book": (6, 10, 8, 32, 4, 150, 64, (128, 512, 2048)),
    "default": (8, 12, 8, 32, 4, 600, 64, (128, 512, 2048, 8192)),
    "gpu": (16, 24, 16, 64, 4, 2000, 128, (512, 2048, 8192, 32768)),
}


def make_task(preset: str = "book") -> OwnTask[GridRecallModel]:
    """The comparison's own-task hook: grid recall for the model, ``(s, 2s)`` grids for the cost sweep.

    ``inputs(size, generator)`` makes one grid of ``size`` pixels, ``H = sqrt(size/2)``, ``W = 2H``.
    """
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(_PRESETS)}")
    H, W, n_values, E, heads, steps, batch, sizes = _PRESETS[preset]
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


register(
    "axial",
    paper="Ho et al. 2019",
    complexity="O(HW(H+W) d)",
    chapter=11,
    data="grid",
    summary="multi-head attention along the rows, then along the columns, of a 2-D grid",
    task=make_task,
)(AxialAttention)
