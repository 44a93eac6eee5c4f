"""Attention masks, with one meaning for the whole package.

**Convention.** A boolean mask is ``True`` where a query *may attend* to a key,
``False`` where it is blocked. This is the convention of
:func:`torch.nn.functional.scaled_dot_product_attention`. Note that
:class:`torch.nn.MultiheadAttention` uses the opposite one for its boolean
``attn_mask`` and ``key_padding_mask`` (``True`` = blocked);
:func:`mha_convention` converts at that edge, and nowhere else.

A floating-point mask is *additive*: it is added to the scores before the
softmax (``0`` keeps, ``-inf`` blocks).

Shapes: an attention mask broadcasts to ``(batch, heads, n_queries, n_keys)``;
a key mask is ``(batch, n_keys)`` and marks the real (non-padding) keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "causal_mask",
    "padding_mask",
    "band_mask",
    "block_mask",
    "key_mask_to_attn_mask",
    "combine_masks",
    "mha_convention",
    "to_additive",
    "check_mask",
    "check_key_mask",
]


def causal_mask(n_queries: int, n_keys: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Lower-triangular mask ``(n_queries, n_keys)``: query ``i`` sees keys ``j <= i``.

    Aligned top-left, like ``F.scaled_dot_product_attention(is_causal=True)``.
    """
    n_keys = n_queries if n_keys is None else n_keys
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: Tensor | list[int], max_len: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Key mask ``(batch, max_len)``: ``True`` for the first ``lengths[b]`` positions of row ``b``."""
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (batch,), got shape {tuple(lengths.shape)}")
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def band_mask(n: int, window: int, causal: bool = False, device: torch.device | str | None = None) -> Tensor:
    """Sliding-window mask ``(n, n)``: query ``i`` sees keys with ``|i - j| <= window``.

    With ``causal=True`` only ``i - window <= j <= i``. This dense mask is the
    *reference* for local attention; efficient code never materialises it.
    """
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    i = torch.arange(n, device=device)
    diff = i[:, None] - i[None, :]  # (n, n): i - j
    keep = diff.abs() <= window
    if causal:
        keep &= diff >= 0
    return keep


def block_mask(n: int, block: int, device: torch.device | str | None = None) -> Tensor:
    """Block-diagonal mask ``(n, n)``: positions attend within their block of ``block`` tokens."""
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    idx = torch.arange(n, device=device) // block
    return idx[:, None] == idx[None, :]


def key_mask_to_attn_mask(key_mask: Tensor) -> Tensor:
    """``(batch, n_keys)`` key mask -> ``(batch, 1, 1, n_keys)`` attention mask."""
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be torch.bool (True = real token), got {key_mask.dtype}")
    if key_mask.ndim != 2:
        raise ValueError(f"key_mask must have shape (batch, n_keys), got {tuple(key_mask.shape)}")
    return key_mask[:, None, None, :]


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of boolean masks (``None`` entries are ignored); broadcasts."""
    out: Tensor | None = None
    for m in masks:
        if m is None:
            continue
        if m.dtype != torch.bool:
            raise TypeError(f"combine_masks takes boolean masks, got {m.dtype}")
        out = m if out is None else out & m
    return out


def mha_convention(mask: Tensor | None) -> Tensor | None:
    """Convert a boolean mask between our convention and ``torch.nn.MultiheadAttention``'s.

    Ours: ``True`` = may attend; ``nn.MultiheadAttention``: ``True`` = blocked.
    The conversion is a negation, so it is its own inverse. Float masks pass through.
    """
    if mask is None:
        return None
    return ~mask if mask.dtype == torch.bool else mask


def to_additive(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean mask -> additive float mask (``0`` where kept, ``-inf`` where blocked)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"to_additive takes a boolean mask, got {mask.dtype}")
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.tensor(float("-inf"), dtype=dtype, device=mask.device))


def check_mask(mask: Tensor, score_shape: tuple[int, ...], name: str = "attn_mask") -> None:
    """Raise a clear error unless ``mask`` is bool/float and broadcasts to ``score_shape``.

    ``score_shape`` is ``(batch, [heads,] n_queries, n_keys)``, the shape of the scores.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be torch.bool (True = may attend) or a float additive mask, got {mask.dtype}"
        )
    try:
        ok = torch.broadcast_shapes(tuple(mask.shape), score_shape) == torch.Size(score_shape)
    except RuntimeError:
        ok = False
    if not ok:
        dims = "(batch, heads, n_queries, n_keys)" if len(score_shape) == 4 else "(batch, n_queries, n_keys)"
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the scores {tuple(score_shape)} "
            f"{dims}; use e.g. {tuple(score_shape[-2:])} or {tuple(score_shape)}"
        )


def check_key_mask(
    key_mask: Tensor | None,
    batch: int | None,
    n: int,
    name: str = "key_mask",
    length_name: str = "n_keys",
    meaning: str = "real token",
) -> None:
    """Raise a clear error unless ``key_mask`` is ``None`` or a bool tensor of shape ``(batch, n)``.

    ``batch=None`` accepts any batch size.
    """
    if key_mask is None:
        return
    if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
        got = getattr(key_mask, "dtype", type(key_mask).__name__)
        raise TypeError(f"{name} must be a torch.bool tensor (True = {meaning}), got {got}")
    if key_mask.ndim != 2 or key_mask.shape[1] != n or (batch is not None and key_mask.shape[0] != batch):
        b = "batch" if batch is None else f"batch={batch}"
        raise ValueError(f"{name} must have shape ({b}, {length_name}={n}), got {tuple(key_mask.shape)}")
