"""Input checks every layer calls first, so bad input meets a clear error, not a crash deep in torch.

One place for the checks that every mechanism needs before its projections:
the input is a tensor, floating point, of the expected rank and width. The
messages name the expected shape, the value received, and the argument.

Empty batches are legal: a layer given ``(0, n, E)`` returns ``(0, n, E)``
(:func:`empty_batch` tells a layer when to return early).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_tensor",
    "check_tokens",
    "check_heads",
    "check_int",
    "check_positive_float",
    "check_same_batch",
    "check_same_dtype",
    "check_layer_dtype",
    "autocast_active",
    "check_token_ids",
    "empty_batch",
]


def check_tensor(x: object, name: str, shape: str, ndim: int | Sequence[int] | None = None) -> Tensor:
    """``x`` must be a floating-point tensor of rank ``ndim``; ``shape`` is how the error names the expected shape.

    Raises:
        TypeError: not a tensor (a list, a NumPy array...), or an integer/bool tensor.
        ValueError: the wrong rank.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(
            f"{name} must be a floating-point tensor of shape {shape}, got dtype {x.dtype} "
            "(token ids go through an nn.Embedding first; cast other integer data with .float())"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            raise ValueError(f"{name} must have shape {shape}, got {x.ndim}-D shape {tuple(x.shape)}")
    return x


def check_tokens(x: object, embed_dim: int | None = None, name: str = "x", *, allow_empty_seq: bool = False) -> Tensor:
    """``x`` must be a ``(batch, seq, embed_dim)`` floating-point tensor.

    Args:
        x: the input.
        embed_dim: the width the layer was built for (``None``: any width).
        name: the argument's name, for the message.
        allow_empty_seq: accept ``seq == 0`` (most layers need at least one key).

    Raises:
        TypeError, ValueError: naming the expected ``(batch, seq, embed_dim)``.
    """
    width = "embed_dim" if embed_dim is None else f"embed_dim={embed_dim}"
    shape = f"(batch, seq, {width})"
    x = check_tensor(x, name, shape, 3)
    if embed_dim is not None and x.shape[-1] != embed_dim:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)} (last dimension {x.shape[-1]} != {embed_dim})")
    if x.shape[1] == 0 and x.shape[0] > 0 and not allow_empty_seq:
        raise ValueError(f"{name} is an empty sequence: shape {shape} needs seq >= 1, got {tuple(x.shape)}")
    return x


def check_same_batch(*named: tuple[str, Tensor]) -> None:
    """All tensors share the batch dimension (dim 0)."""
    sizes = {name: t.shape[0] for name, t in named}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch sizes differ: {', '.join(f'{k}={v}' for k, v in sizes.items())}")


def empty_batch(x: Tensor) -> bool:
    """True when ``x`` has no examples (batch 0): the layer should return an empty output of the right shape."""
    return x.shape[0] == 0 or x.numel() == 0


def check_heads(embed_dim: int, num_heads: int) -> int:
    """``embed_dim`` and ``num_heads`` are positive and ``num_heads`` divides ``embed_dim``; returns the head width."""
    if embed_dim <= 0 or num_heads <= 0:
        raise ValueError(f"embed_dim and num_heads must be positive, got {embed_dim} and {num_heads}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    return embed_dim // num_heads


def check_int(name: str, value: object, low: int = 1) -> int:
    """``value`` is an ``int`` (not a bool) and ``>= low``; returns it. Errors name the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_positive_float(name: str, value: object, *, allow_zero: bool = False, minimum: float | None = None) -> float:
    """``value`` is a finite real number ``> 0`` (``>= 0`` with ``allow_zero``); returns it as a float.

    ``minimum`` rejects values so small that the computation would underflow (a temperature of
    1e-40 turns every score into inf); the message says so.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    if minimum is not None and 0 < value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g} (smaller values overflow the scores to inf), got {value:g}")
    return value


def check_same_dtype(*named: tuple[str, Tensor | None]) -> None:
    """All given tensors (``None`` entries skipped) share one dtype; the error names each argument and its dtype.

    Mixed dtypes (a float64 memory into a float32 layer, a float32 cache beside a bf16 layer) otherwise
    fail deep inside a matmul or silently upcast.
    """
    present = [(n, t) for n, t in named if t is not None]
    dtypes = {t.dtype for _, t in present}
    if len(dtypes) > 1:
        listing = ", ".join(f"{n}: {t.dtype}" for n, t in present)
        raise TypeError(f"dtypes must match ({listing}); cast them to one dtype first, e.g. .to({present[0][1].dtype})")


def check_token_ids(ids: object, vocab_size: int, name: str = "tokens", ndim: int | None = 2) -> Tensor:
    """``ids`` is an integer tensor of token ids in ``[0, vocab_size)`` (rank ``ndim`` when given), not empty.

    Raises:
        TypeError: not a tensor, or a floating-point/bool tensor.
        ValueError: wrong rank, an empty sequence, or an id out of range (the message gives the range found).
    """
    shape = "(batch, seq)" if ndim == 2 else f"a {ndim}-D tensor" if ndim is not None else "a tensor"
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer token ids {shape}, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer token ids {shape}, got dtype {ids.dtype}")
    if ndim is not None and ids.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape}, got {ids.ndim}-D shape {tuple(ids.shape)}")
    if ids.ndim >= 2 and ids.shape[-1] == 0 and ids.shape[0] > 0:
        raise ValueError(f"{name} is an empty sequence: shape {shape} needs seq >= 1, got {tuple(ids.shape)}")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got values in [{lo}, {hi}]")
    return ids


def autocast_active(t: Tensor) -> bool:
    """True when autocast is on for ``t``'s device: torch then mixes dtypes on purpose, and dtype checks stand aside."""
    return torch.is_autocast_enabled(t.device.type)


def check_layer_dtype(x: Tensor, weight: Tensor, name: str = "x") -> None:
    """``x`` has the dtype of the layer's parameters ``weight`` (outside autocast, where torch mixes them itself).

    A float64 input into a float32 layer otherwise fails inside ``nn.Linear`` with a message that names neither.
    """
    if not autocast_active(x):
        check_same_dtype(("the layer's parameters", weight), (name, x))
