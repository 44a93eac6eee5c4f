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

import operator
from typing import SupportsIndex

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


def _size(name: str, value: object, low: int = 0) -> int:
    """``value`` is an integer (a Python, NumPy or 0-d integer tensor; not a bool) ``>= low``; returns it as an int."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and (value.dtype == torch.bool or value.is_floating_point())):
        raise TypeError(f"{name} must be an int, got {type(value).__name__ if not isinstance(value, Tensor) else value.dtype}")
    if not isinstance(value, SupportsIndex):  # no __index__: not an integer of any kind
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _bool_mask(mask: object, name: str, expected: str = "(True = may attend)") -> Tensor:
    """``mask`` is a ``torch.bool`` tensor; a TypeError naming ``name`` and ``expected`` otherwise (lists, 0/1 integers, floats)."""
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"{name} must be a torch.bool tensor {expected}, got {type(mask).__name__} "
            "(make one with torch.tensor(..., dtype=torch.bool))"
        )
    if mask.dtype != torch.bool:
        hint = "; a 0/1 integer mask (1 = attend) converts with mask.bool()" if not mask.dtype.is_floating_point else ""
        raise TypeError(f"{name} must be a torch.bool tensor {expected}, got dtype {mask.dtype}{hint}")
    return mask


def causal_mask(n_queries: int, n_keys: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Lower-triangular mask ``(n_queries, n_keys)``: query ``i`` sees keys ``j <= i``.

    Aligned top-left, like ``F.scaled_dot_product_attention(is_causal=True)``.
    """
    n_queries = _size("n_queries", n_queries)
    n_keys = n_queries if n_keys is None else _size("n_keys", n_keys)
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: Tensor | list[int], max_len: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Key mask ``(batch, max_len)``: ``True`` for the first ``lengths[b]`` positions of row ``b``.

    ``lengths`` are integers in ``[0, max_len]`` (``max_len`` defaults to the longest); an empty
    ``lengths`` gives the empty ``(0, max_len)`` mask.
    """
    if not isinstance(lengths, (Tensor, list, tuple, range)):
        raise TypeError(f"lengths must be a 1-D integer tensor or list (batch,), got {type(lengths).__name__}")
    try:
        lengths = torch.as_tensor(lengths, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"lengths must be a 1-D integer tensor or list (batch,): {e}") from None
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (batch,), got shape {tuple(lengths.shape)}")
    if lengths.numel() == 0:
        lengths = lengths.long()  # torch.as_tensor([]) is float32
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(f"lengths must hold integers (batch,), got dtype {lengths.dtype}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is None:
        max_len = longest
    else:
        max_len = _size("max_len", max_len)
        if longest > max_len:
            raise ValueError(f"lengths must be <= max_len={max_len}, got a length of {longest}")
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def band_mask(n: int, window: int, causal: bool = False, device: torch.device | str | None = None) -> Tensor:
    """Sliding-window mask ``(n, n)``: query ``i`` sees keys with ``|i - j| <= window``.

    With ``causal=True`` only ``i - window <= j <= i``. This dense mask is the
    *reference* for local attention; efficient code never materialises it.
    """
    n, window = _size("n", n), _size("window", window)
    i = torch.arange(n, device=device)
    diff = i[:, None] - i[None, :]  # (n, n): i - j
    keep = diff.abs() <= window
    if causal:
        keep &= diff >= 0
    return keep


def block_mask(n: int, block: int, device: torch.device | str | None = None) -> Tensor:
    """Block-diagonal mask ``(n, n)``: positions attend within their block of ``block`` tokens."""
    n, block = _size("n", n), _size("block", block, 1)
    idx = torch.arange(n, device=device) // block
    return idx[:, None] == idx[None, :]


def key_mask_to_attn_mask(key_mask: Tensor) -> Tensor:
    """``(batch, n_keys)`` key mask -> ``(batch, 1, 1, n_keys)`` attention mask."""
    _bool_mask(key_mask, "key_mask", "(batch, n_keys) (True = real token)")
    if key_mask.ndim != 2:
        raise ValueError(f"key_mask must have shape (batch, n_keys), got {tuple(key_mask.shape)}")
    return key_mask[:, None, None, :]


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of boolean masks (``None`` entries are ignored); broadcasts."""
    out: Tensor | None = None
    for i, m in enumerate(masks):
        if m is None:
            continue
        _bool_mask(m, f"combine_masks: mask {i}")
        if out is not None:
            try:
                torch.broadcast_shapes(out.shape, m.shape)
            except RuntimeError:
                raise ValueError(
                    f"combine_masks: mask {i} of shape {tuple(m.shape)} does not broadcast with the masks before it, "
                    f"shape {tuple(out.shape)}"
                ) from None
        out = m if out is None else out & m
    return out


def mha_convention(mask: Tensor | None) -> Tensor | None:
    """Convert a boolean mask between our convention and ``torch.nn.MultiheadAttention``'s.

    Ours: ``True`` = may attend; ``nn.MultiheadAttention``: ``True`` = blocked.
    The conversion is a negation, so it is its own inverse. Float (additive) masks pass through.
    Integer masks are refused: a Hugging Face ``attention_mask`` (1 = attend) is neither
    convention; ``mask.bool()`` makes it ours.
    """
    if mask is None:
        return None
    if isinstance(mask, Tensor) and mask.dtype.is_floating_point:
        return mask
    return ~_bool_mask(mask, "mask", "(True = may attend) or a float additive mask")


def to_additive(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean mask -> additive float mask (``0`` where kept, ``-inf`` where blocked) of floating ``dtype``."""
    _bool_mask(mask, "mask")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (an additive mask holds -inf), got {dtype}")
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
