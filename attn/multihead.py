r"""Chapter 3 -- multi-head attention: ``h`` attentions in parallel subspaces.

.. math::

    \operatorname{MultiHead}(Q, K, V) = \operatorname{Concat}(\text{head}_1, \dots, \text{head}_h)\,W^O,
    \qquad \text{head}_i = \operatorname{Attention}(QW_i^Q, KW_i^K, VW_i^V)

Shapes (batch first): ``query`` ``(B, L, E)``, ``key`` ``(B, S, kdim)``,
``value`` ``(B, S, vdim)``; each head has width ``E / h``; the output is
``(B, L, E)`` and the weights ``(B, h, L, S)``.

Cost: the four projections take ``O(n E^2)``, the scores and the weighted sum
``O(n^2 E)``; all ``h`` heads together cost what one head of width ``E`` does.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017, section 3.2.2.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from einops import rearrange
from torch import Tensor, nn

from .checks import check_heads, check_int, check_positive_float, check_same_dtype, check_tokens
from .core import MIN_TEMPERATURE, AttentionOutput, scaled_dot_product_attention
from .masks import mha_convention
from .registry import register

__all__ = ["MultiHeadAttention"]

_MHA = TypeVar("_MHA", bound="MultiHeadAttention")  # load_torch_weights returns the subclass it was called on


@register(
    "multihead",
    paper="Vaswani et al. 2017",
    complexity="O(n^2 d + n d^2)",
    chapter=3,
    summary="h scaled dot-product heads over learned projections, concatenated",
    build=lambda embed_dim, num_heads: MultiHeadAttention(embed_dim, num_heads),
)
class MultiHeadAttention(nn.Module):
    """Multi-head attention with batch-first tensors, like ``nn.MultiheadAttention(batch_first=True)``.

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
        super().__init__()
        check_heads(check_int("embed_dim", embed_dim), check_int("num_heads", num_heads))
        for name, width in (("kdim", kdim), ("vdim", vdim)):
            if width is not None:
                check_int(name, width)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)  # W^Q for all heads, stacked
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        # W^O; a subclass may drop it (BERT's output_projection=False puts nn.Identity here)
        self.out_proj: nn.Linear | nn.Identity = nn.Linear(embed_dim, embed_dim, bias=bias)

    def split_heads(self, x: Tensor) -> Tensor:
        """``(B, n, h * d_h) -> (B, h, n, d_h)``."""
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        """``(B, h, n, d_h) -> (B, n, h * d_h)``, the concatenation of the heads."""
        return rearrange(x, "b h n d -> b n (h d)")

    def _check(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            check_tokens(t, width, name, allow_empty_seq=True)
        check_same_dtype(("query", query), ("key", key), ("value", value))
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must share (batch, seq): {tuple(key.shape[:2])} vs {tuple(value.shape[:2])}")
        if query.shape[0] != key.shape[0]:
            raise ValueError(f"query and key batch sizes differ: {query.shape[0]} vs {key.shape[0]}")
        if query.shape[0] and (query.shape[1] == 0 or key.shape[1] == 0):
            raise ValueError(
                f"empty sequence: query and key need shape (batch, seq, embed_dim) with seq >= 1, "
                f"got query length {query.shape[1]}, key length {key.shape[1]}"
            )

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attn_mask: Tensor | None,
        key_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
        scale: float,
        need_weights: bool,
    ) -> AttentionOutput:
        """The attention kernel on split heads: ``q`` ``(B, h, L, d_h)``, ``k, v`` ``(B, h, S, d_h)``.

        Scaled dot-product attention here; variants that change only how the
        weights are formed (top-k, entmax, ...) override this one method and
        inherit the projections, head split/merge, checks and masks.
        """
        return scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal,
            dropout_p=dropout_p, scale=scale, need_weights=need_weights,
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        average_weights: bool = False,
        temperature: float = 1.0,
    ) -> AttentionOutput:
        """Attend ``query`` to ``key``/``value`` (self-attention when they are omitted).

        Args:
            query: ``(B, L, E)``.
            key: ``(B, S, kdim)``; defaults to ``query``.
            value: ``(B, S, vdim)``; defaults to ``key``.
            key_mask: ``(B, S)`` boolean, ``True`` = real token.
            attn_mask: ``(L, S)``, ``(B, L, S)`` or ``(B, h, L, S)``; boolean ``True`` = may attend.
            is_causal: query ``i`` sees keys ``<= i``.
            need_weights: return the weights; otherwise the fused SDPA kernel runs.
            average_weights: average the returned weights over heads, ``(B, L, S)``.
            temperature: divides the scores; at least :data:`~attn.core.MIN_TEMPERATURE` (1e-30).

        Returns:
            ``(output (B, L, E), weights (B, h, L, S) | (B, L, S) | None)``.
        """
        key = query if key is None else key
        value = key if value is None else value
        self._check(query, key, value)
        temperature = check_positive_float("temperature", temperature, minimum=MIN_TEMPERATURE)
        if attn_mask is not None and isinstance(attn_mask, Tensor) and attn_mask.ndim == 3:
            attn_mask = attn_mask[:, None]  # (B, L, S) -> (B, 1, L, S), shared by the heads
        q = self.split_heads(self.q_proj(query))  # (B, h, L, d_h)
        k = self.split_heads(self.k_proj(key))  # (B, h, S, d_h)
        v = self.split_heads(self.v_proj(value))  # (B, h, S, d_h)
        out, weights = self.attend(
            q, k, v,
            attn_mask=attn_mask,
            key_mask=key_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / (temperature * math.sqrt(self.head_dim)),
            need_weights=need_weights,
        )
        out = self.out_proj(self.merge_heads(out))  # (B, L, E)
        if weights is not None and average_weights:
            weights = weights.mean(1)
        return AttentionOutput(out, weights)

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
