r"""The scaled-dot-product core every mechanism in the package builds on.

.. math::

    \operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\Big(\frac{QK^\top}{\sqrt{d_k}} + M\Big) V

Vaswani et al., "Attention Is All You Need", NeurIPS 2017.

Shapes: ``q`` is ``(batch, [heads,] n_queries, d_k)``, ``k`` is
``(batch, [heads,] n_keys, d_k)``, ``v`` is ``(batch, [heads,] n_keys, d_v)``.
The output is ``(batch, [heads,] n_queries, d_v)``; the weights, when asked
for, are ``(batch, [heads,] n_queries, n_keys)``.

Masks follow :mod:`attn.masks`: boolean ``True`` = may attend. A query whose
every key is masked gets an output of zeros and weights of zeros, never NaN,
and its gradient is zero.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import autocast_active, check_same_dtype
from .masks import causal_mask, check_key_mask, check_mask

__all__ = ["AttentionOutput", "scaled_dot_product_attention", "masked_softmax", "check_qkv", "build_mask", "MIN_TEMPERATURE", "entropy"]

#: The smallest temperature the layers accept: the score scale ``1 / (tau sqrt(d))`` must stay far below
#: float32's largest number (3.4e38) even after multiplying a dot product; at ``tau = 1e-40`` the
#: scale itself is inf and every output NaN.
MIN_TEMPERATURE = 1e-30


class AttentionOutput(NamedTuple):
    """``output`` ``(..., n_queries, d_v)`` and ``weights`` ``(..., n_queries, n_keys)`` or ``None``."""

    output: Tensor
    weights: Tensor | None


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Validate query/key/value shapes and raise an error that names what was expected."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim not in (3, 4):
            raise ValueError(
                f"{name} must have shape (batch, seq, dim) or (batch, heads, seq, dim), got {tuple(t.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not autocast_active(q):  # under autocast torch mixes dtypes on purpose
        check_same_dtype(("query", q), ("key", k), ("value", v))
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(f"query, key, value must have the same rank, got {q.ndim}, {k.ndim}, {v.ndim}")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(
            f"leading (batch[, heads]) dims must match: query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query and key must share d_k: query d={q.shape[-1]}, key d={k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"key and value must have the same length: {k.shape[-2]} vs {v.shape[-2]}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"empty sequence: n_queries={q.shape[-2]}, n_keys={k.shape[-2]}; both must be >= 1")


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` that ignores positions where the boolean ``mask`` is False.

    Rows whose every entry is masked come out as zeros (not NaN, not uniform),
    with a zero gradient.

    Args:
        scores: floating-point scores of any shape.
        mask: ``None`` or a ``torch.bool`` tensor (``True`` = keep) that broadcasts to ``scores``.
        dim: the dimension normalised.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype} (cast with .float())")
    if not -scores.ndim <= dim < max(scores.ndim, 1):
        raise ValueError(f"dim must be in [{-scores.ndim}, {scores.ndim}) for scores of shape {tuple(scores.shape)}, got {dim}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            hint = "; a 0/1 integer mask (1 = keep) converts with mask.bool()" if isinstance(mask, Tensor) and not mask.dtype.is_floating_point else ""
            raise TypeError(f"mask must be a torch.bool tensor (True = keep) broadcastable to the scores, got {got}{hint}")
        try:
            ok = torch.broadcast_shapes(mask.shape, scores.shape) == scores.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the scores of shape {tuple(scores.shape)}")
    if mask is None:
        return scores.softmax(dim)
    very_negative = torch.finfo(scores.dtype).min
    filled = scores.masked_fill(~mask, very_negative)
    weights = filled.softmax(dim)
    return weights.masked_fill(~mask, 0.0)


def build_mask(q: Tensor, k: Tensor, attn_mask: Tensor | None, key_mask: Tensor | None, is_causal: bool) -> Tensor | None:
    """Combine boolean masks into one that broadcasts to the scores ``(batch, [heads,] n_q, n_k)``."""
    score_shape = (*q.shape[:-1], k.shape[-2])
    batch, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
    mask: Tensor | None = None
    if attn_mask is not None:
        check_mask(attn_mask, score_shape, "attn_mask")
        mask = attn_mask
    if key_mask is not None:
        check_key_mask(key_mask, batch, lk)
        km = key_mask.view(batch, *([1] * (q.ndim - 2)), lk)  # (B, [1,] 1, Lk)
        mask = km if mask is None else mask & km
    if is_causal:
        cm = causal_mask(lq, lk, device=q.device)
        mask = cm if mask is None else mask & cm
    return mask


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
) -> AttentionOutput:
    """Scaled dot-product attention, eq. (1) of Vaswani et al. (2017).

    Args:
        q: ``(batch, [heads,] n_queries, d_k)``.
        k: ``(batch, [heads,] n_keys, d_k)``.
        v: ``(batch, [heads,] n_keys, d_v)``.
        attn_mask: boolean ``True`` = may attend, or float additive; broadcastable
            to ``(batch, heads, n_queries, n_keys)``.
        key_mask: ``(batch, n_keys)`` boolean, ``True`` = real token (not padding).
        is_causal: hide keys ``j > i`` from query ``i`` (top-left aligned).
        dropout_p: dropout on the attention weights (pass 0 in eval).
        scale: score scale; default ``1 / sqrt(d_k)``. A *temperature* ``t``
            is ``scale = 1 / (t * sqrt(d_k))``.
        need_weights: also return the attention weights. When False, the fused
            ``torch.nn.functional.scaled_dot_product_attention`` kernel is used.

    Returns:
        :class:`AttentionOutput` ``(output, weights)``.
    """
    check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        try:
            if isinstance(scale, (str, bytes, bool)):
                raise TypeError
            scale = float(scale)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}") from None
        if not math.isfinite(scale) or abs(scale) > torch.finfo(q.dtype).max:
            raise ValueError(f"scale must be a finite number in {q.dtype}, got {scale:g} (a temperature too close to 0?)")

    additive: Tensor | None = None
    if attn_mask is not None and isinstance(attn_mask, Tensor) and attn_mask.dtype.is_floating_point:
        check_mask(attn_mask, (*q.shape[:-1], k.shape[-2]), "attn_mask")
        if not autocast_active(q):
            check_same_dtype(("query", q), ("attn_mask", attn_mask))
        additive = attn_mask
        attn_mask = attn_mask > float("-inf")  # -inf entries block; finite ones shift the scores
    if not need_weights and is_causal and attn_mask is None and key_mask is None:
        # causality alone: the fused kernel applies it itself (top-left aligned, as causal_mask), no n x n mask
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        return AttentionOutput(out, None)
    mask = build_mask(q, k, attn_mask, key_mask, is_causal)

    if not need_weights:
        sdpa_mask: Tensor | None = None
        row_ok: Tensor | None = None
        if mask is not None:
            row_ok = mask.any(-1, keepdim=True)  # queries with at least one visible key
            # give fully-masked rows every key (finite math), then zero their output below
            safe = mask | ~row_ok
            sdpa_mask = safe
            if additive is not None:
                sdpa_mask = torch.where(safe, torch.nan_to_num(additive, neginf=0.0), float("-inf")).to(q.dtype)
        elif additive is not None:
            sdpa_mask = additive.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, scale=scale)
        if row_ok is not None:
            out = out * row_ok.to(out.dtype)
        return AttentionOutput(out, None)

    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (..., Lq, Lk); scaling q costs n*d, not n^2
    if additive is not None:
        scores = scores + torch.nan_to_num(additive.to(scores.dtype), neginf=0.0)
    weights = masked_softmax(scores, mask)
    attn = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.matmul(attn, v)  # (..., Lq, d_v)
    return AttentionOutput(out, weights)


def entropy(p: Tensor | Any, dim: int = -1) -> Tensor:
    """Shannon entropy in nats of distributions along ``dim`` (``0 log 0 = 0``), in float64.

    ``p`` is a tensor or array of attention rows (each summing to 1, or all zero for a padded row).
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim)
