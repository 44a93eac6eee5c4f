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

from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from .attention import Attention
from .checks import check_heads, check_tensor, empty_batch
from .core import AttentionOutput, scaled_dot_product_attention
from .registry import register

__all__ = ["AxialWeights", "AxialOutput", "axis_attention", "AxialAttention"]


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

    Each pass has its own projections, those of the book's one attention module: ``row`` and ``col``
    are :class:`~attn.attention.Attention` layers (``q_proj, k_proj, v_proj, out_proj``; each
    loads a :class:`~attn.multihead.MultiHeadAttention` state dict), applied to the grid along one
    axis by :func:`axis_attention`: ``z = col(row(x))``. No residual connections or norms inside:
    a model wraps the layer as it wraps any attention layer.

    Not a sequence mixer (its input is a grid, not a token sequence): ``forward(x, *, grid=None,
    need_weights=False)`` returns an :class:`AxialOutput`, whose ``weights`` are an :class:`AxialWeights`.

    Args:
        embed_dim: channels ``C``; num_heads: heads ``h`` (must divide ``C``).
        dropout: dropout on the attention weights during training.
        bias: biases on the projections.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_heads(embed_dim, num_heads)
        self.embed_dim, self.num_heads, self.head_dim, self.dropout = embed_dim, num_heads, embed_dim // num_heads, dropout
        self.row = Attention(embed_dim, num_heads, dropout=dropout, bias=bias)  # W^Q, W^K, W^V, W^O of the row pass
        self.col = Attention(embed_dim, num_heads, dropout=dropout, bias=bias)  # ... of the column pass

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

    def _pass(self, x: Tensor, proj: Attention, axis: str, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """One pass over the grid ``x (B, H, W, C)`` with ``proj``'s projections: ``(B, H, W, C)`` and its weights."""
        split = lambda t: rearrange(t, "b H W (h d) -> b h H W d", h=self.num_heads)  # noqa: E731
        q, k, v = split(proj.q_proj(x)), split(proj.k_proj(x)), split(proj.v_proj(x))
        y, w = axis_attention(q, k, v, axis, need_weights, proj.dropout if self.training else 0.0)
        return proj.out_proj(rearrange(y, "b h H W d -> b H W (h d)")), w

    def forward(self, x: Tensor, *, grid: tuple[int, int] | None = None, need_weights: bool = False) -> AxialOutput:
        """``x (B, H, W, C)`` (or ``(B, H W, C)`` with ``grid``) -> ``(z, AxialWeights | None)``, ``z`` shaped like ``x``."""
        x4, flat = self._grid(x, grid)
        if empty_batch(x4):
            _, H, W, _ = x4.shape
            w = AxialWeights(x4.new_zeros(0, self.num_heads, H, W, W), x4.new_zeros(0, self.num_heads, W, H, H)) if need_weights else None
            return AxialOutput(x4.new_zeros(x.shape), w)
        y, w_row = self._pass(x4, self.row, "row", need_weights)  # along W, within each row
        z, w_col = self._pass(y, self.col, "col", need_weights)  # along H, within each column
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


register(
    "axial",
    paper="Ho et al. 2019",
    complexity="O(HW(H+W) d)",
    chapter=11,
    data="grid",
    summary="multi-head attention along the rows, then along the columns, of a 2-D grid",
)(AxialAttention)
