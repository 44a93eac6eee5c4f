"""Input checks every layer calls first, so bad input meets a clear error, not a crash deep in torch.

One place for the checks that every mechanism needs before its projections:
the input is a tensor, floating point, of the expected rank and width. The
messages name the expected shape, the value received, and the argument.

Empty batches are legal: a layer given ``(0, n, E)`` returns ``(0, n, E)``
(:func:`empty_batch` tells a layer when to return early).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["check_tensor", "check_tokens", "check_heads", "check_int", "check_same_batch", "empty_batch"]


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
