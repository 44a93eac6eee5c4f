r"""Chapter 2 -- self-attention: one sequence attends to itself.

.. math::

    Q = XW_Q,\quad K = XW_K,\quad V = XW_V,\qquad
    Y = \operatorname{softmax}\!\Big(\frac{QK^\top}{\tau\sqrt{d_k}} + M\Big) V

``X`` is ``(batch, n, d_model)``; ``Q, K`` are ``(batch, n, d_k)``, ``V`` is
``(batch, n, d_v)``; ``Y`` is ``(batch, n, d_v)``; the weights
``softmax(...)`` are ``(batch, 1, n, n)`` (one head, the book's one weight
layout ``(batch, heads, n, n)``); ``tau`` is a temperature
(``1`` in the paper). Without positional information the map is
permutation-equivariant: permuting the rows of ``X`` permutes the rows of ``Y``.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017, section 3.2.1.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .checks import check_int, check_positive_float, check_tokens
from .core import MIN_TEMPERATURE, AttentionOutput, scaled_dot_product_attention
from .registry import register

__all__ = ["SelfAttention"]


@register(
    "self",
    paper="Vaswani et al. 2017",
    complexity="O(n^2 d)",
    chapter=2,
    summary="single-head scaled dot-product self-attention",
    build=lambda embed_dim, num_heads: SelfAttention(embed_dim),
    kernel=None,
    causal=False,
)
class SelfAttention(nn.Module):
    """Single-head scaled dot-product self-attention.

    Args:
        d_model: width of the input ``X``.
        d_k: width of queries and keys (default ``d_model``).
        d_v: width of values and of the output (default ``d_k``).
        bias: add biases to the three projections.
        dropout: dropout on the attention weights during training.
        causal: the default of ``forward``'s ``is_causal`` (token ``i`` sees tokens ``<= i``).
    """

    def __init__(
        self,
        d_model: int,
        d_k: int | None = None,
        d_v: int | None = None,
        *,
        bias: bool = False,
        dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model)
        for name, width in (("d_k", d_k), ("d_v", d_v)):
            if width is not None:
                check_int(name, width)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.d_k = d_k or d_model
        self.d_v = d_v or self.d_k
        self.w_q = nn.Linear(d_model, self.d_k, bias=bias)
        self.w_k = nn.Linear(d_model, self.d_k, bias=bias)
        self.w_v = nn.Linear(d_model, self.d_v, bias=bias)
        self.dropout, self.causal = dropout, causal

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        temperature: float = 1.0,
    ) -> AttentionOutput:
        """Attend ``x`` ``(batch, n, d_model)`` to itself.

        Args:
            attn_mask: ``(n, n)`` or ``(batch, n, n)``, boolean ``True`` = may attend.
            key_mask: ``(batch, n)``, ``True`` = real token.
            is_causal: token ``i`` sees only tokens ``<= i`` (``None``: the layer's ``causal``).
            need_weights: also return the ``(batch, 1, n, n)`` weights (one head).
            temperature: divides the scores; ``> 1`` flattens, ``< 1`` sharpens; at least
                :data:`~attn.core.MIN_TEMPERATURE` (1e-30), below which the scores overflow.

        Returns:
            ``(output (batch, n, d_v), weights (batch, 1, n, n) or None)``.
        """
        x = check_tokens(x, self.d_model)
        temperature = check_positive_float("temperature", temperature, minimum=MIN_TEMPERATURE)
        q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # (B, n, d_k), (B, n, d_k), (B, n, d_v)
        out, weights = scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            key_mask=key_mask,
            is_causal=self.causal if is_causal is None else is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / (temperature * math.sqrt(self.d_k)),
            need_weights=need_weights,
        )  # weights (B, n, n)
        return AttentionOutput(out, weights[:, None] if weights is not None else None)  # one head: (B, 1, n, n)
