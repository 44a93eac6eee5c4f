"""Padding patterns the key-mask tests share (imported by test files; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch


def padding_masks(n: int) -> dict[str, torch.Tensor]:
    """``(3, n)`` boolean masks, True = real token: right- and left-padded rows, and holes (one row nearly empty)."""
    pos = torch.arange(n)
    lengths = torch.tensor([n, n - 5, 3])
    holed = torch.ones(3, n, dtype=torch.bool)
    holed[0, [1, 2, n // 2, n // 2 + 1, n - 2]] = False
    holed[1, ::2] = False
    holed[2] = False
    holed[2, [0, n // 2, n - 1]] = True
    return {"right": pos < lengths[:, None], "left": pos >= (n - lengths)[:, None], "holed": holed}
