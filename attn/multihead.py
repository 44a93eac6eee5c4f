r"""Chapter 3 -- multi-head attention: ``h`` attentions in parallel subspaces.

.. math::

    \operatorname{MultiHead}(Q, K, V) = \operatorname{Concat}(\text{head}_1, \dots, \text{head}_h)\,W^O,
    \qquad \text{head}_i = \operatorname{Attention}(QW_i^Q, KW_i^K, VW_i^V)

Shapes (batch first): ``query`` ``(B, L, E)``, ``key`` ``(B, S, kdim)``,
``value`` ``(B, S, vdim)``; each head has width ``E / h``; the output is
``(B, L, E)`` and the weights ``(B, h, L, S)``.

Cost: the four projections take ``O(n E^2)``, the scores and the weighted sum
``O(n^2 E)``; all ``h`` heads together take the matrix-product FLOPs of one head
of width ``E``. The softmax and, when returned, the weights are ``B h L S``
numbers: ``h`` times those of one wide head.

Per-head sum view (:func:`head_contributions`): splitting the rows of ``W^O``
into the blocks ``W_i^O`` (``d_v x E``) that multiply head ``i``'s columns,

.. math::

    \operatorname{Concat}(\text{head}_1, \dots, \text{head}_h)\,W^O
    = \sum_{i=1}^{h} \text{head}_i W_i^O = \sum_{i=1}^{h} A_i\, V W_i^V W_i^O ,

so each head writes its own rank-``d_v`` update into the output.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017, section 3.2.2.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor, nn

from .attention import Attention
from .masks import mha_convention
from .registry import register

__all__ = ["MultiHeadAttention", "head_contributions"]

_MHA = TypeVar("_MHA", bound="MultiHeadAttention")  # load_torch_weights returns the subclass it was called on


@register(
    "multihead",
    paper="Vaswani et al. 2017",
    complexity="O(n^2 d + n d^2)",
    chapter=3,
    summary="h scaled dot-product heads over learned projections, concatenated",
    build=lambda embed_dim, num_heads: MultiHeadAttention(embed_dim, num_heads),
    kernel="sdpa",
    causal=False,
)
class MultiHeadAttention(Attention):
    """Multi-head attention with batch-first tensors, like ``nn.MultiheadAttention(batch_first=True)``.

    :class:`~attn.attention.Attention` with the scaled-dot-product kernel and
    ``torch.nn.MultiheadAttention``'s constructor order; ``forward(query,
    key=None, value=None, *, key_mask=None, attn_mask=None, is_causal=None,
    need_weights=False, ...)`` is :meth:`Attention.forward`.

    Args:
        embed_dim: model width ``E`` (queries and output).
        num_heads: number of heads ``h``; must divide ``embed_dim``.
        dropout: dropout on the attention weights during training.
        bias: biases on the input and output projections.
        kdim, vdim: widths of ``key`` and ``value`` inputs (default ``E``), for
            cross-attention between sequences of different widths.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
    ) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim)

    @torch.no_grad()
    def load_torch_weights(self: _MHA, mha: nn.MultiheadAttention) -> _MHA:
        """Copy the parameters of a ``torch.nn.MultiheadAttention`` with the same sizes.

        Its packed ``in_proj_weight`` is ``(3E, E)`` with rows ``[W_q; W_k; W_v]``;
        with ``kdim``/``vdim`` it keeps separate ``q/k/v_proj_weight`` instead.
        """
        if (mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim) != (self.embed_dim, self.num_heads, self.kdim, self.vdim):
            raise ValueError("nn.MultiheadAttention sizes (embed_dim, num_heads, kdim, vdim) differ from this module's")
        assert isinstance(self.out_proj, nn.Linear)  # a subclass without W^O refuses before calling this (BERT's)
        e = self.embed_dim
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.split(e, dim=0)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        for lin, w in ((self.q_proj, wq), (self.k_proj, wk), (self.v_proj, wv)):
            lin.weight.copy_(w)
        if mha.in_proj_bias is not None:
            bq, bk, bv = mha.in_proj_bias.split(e)
            for lin, b in ((self.q_proj, bq), (self.k_proj, bk), (self.v_proj, bv)):
                lin.bias.copy_(b)
        self.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            self.out_proj.bias.copy_(mha.out_proj.bias)
        return self

    @staticmethod
    def torch_masks(key_mask: Tensor | None, attn_mask: Tensor | None) -> dict[str, Tensor | None]:
        """Our masks as ``nn.MultiheadAttention`` keyword arguments (its booleans mean *blocked*)."""
        return {"key_padding_mask": mha_convention(key_mask), "attn_mask": mha_convention(attn_mask)}


@torch.no_grad()
def head_contributions(
    layer: MultiHeadAttention,
    query: Tensor,
    key: Tensor | None = None,
    value: Tensor | None = None,
    *,
    key_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    r"""What each head writes into the output: ``(B, h, L, E)``, summing over ``h`` to the layer's output less ``b^O``.

    .. math::

        \operatorname{Concat}(\text{head}_1, \dots, \text{head}_h)\,W^O
        = \sum_{i=1}^{h} \text{head}_i\, W_i^O,
        \qquad \text{head}_i = A_i\,(V W_i^V + \mathbf{1} b_i^{V\top}),
        \qquad A_i = \operatorname{softmax}\!\big(Q W_i^Q (K W_i^K)^\top / \sqrt{d_k}\big),

    with :math:`W_i^O` the rows ``i d_v .. (i + 1) d_v - 1`` of :math:`W^O` (``E x E``, acting as
    ``y = x W^O``; torch's ``out_proj.weight`` is its transpose, so :math:`W_i^O` is the column
    block ``out_proj.weight[:, i d_v:(i + 1) d_v]`` transposed). A block matrix product, written
    head by head: ``layer(query, ...).output == head_contributions(...).sum(1) + b^O``.

    The scores and weights are formed explicitly (a reference for teaching and tests, not a fast
    path). Masks follow the book's convention (``True`` = may attend): ``key_mask (B, S)``,
    ``attn_mask (L, S)``. Shapes: ``query (B, L, E)``, ``key (B, S, kdim)``, ``value (B, S, vdim)``.

    Vaswani et al., "Attention Is All You Need", NeurIPS 2017, eq. for MultiHead in section 3.2.2.
    """
    if not isinstance(layer.out_proj, nn.Linear):
        raise TypeError("head_contributions needs a layer with an output projection W^O (out_proj is a Linear)")
    key = query if key is None else key
    value = key if value is None else value
    layer.check_inputs(query, key, value)
    h, d = layer.num_heads, layer.head_dim
    q = layer.split_heads(layer.q_proj(query))  # (B, h, L, d)
    k = layer.split_heads(layer.k_proj(key), layer.num_kv_heads)  # (B, h, S, d)
    v = layer.split_heads(layer.v_proj(value), layer.num_kv_heads)  # (B, h, S, d)
    if layer.num_kv_heads != h:
        k, v = (t.repeat_interleave(h // layer.num_kv_heads, dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, h, L, S)
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device)
    if attn_mask is not None:
        allowed = allowed & attn_mask
    allowed = allowed.expand(scores.shape[0], 1, *scores.shape[-2:])
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # (B, h, L, S)
    heads = weights @ v  # (B, h, L, d): head_i
    w_out = layer.out_proj.weight.unflatten(1, (h, d))  # (E, h, d): column block i is (W_i^O)^T
    return torch.einsum("bhld,ehd->bhle", heads, w_out)  # head_i W_i^O, (B, h, L, E)
