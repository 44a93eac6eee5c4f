"""Synthetic tasks the chapters share, each seeded and small enough for a CPU.

Every task returns a dict of tensors from ``sample(batch_size, generator)``,
so a fixed :class:`torch.Generator` seed gives the same batches everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["PermutationTask", "AssociativeRecall"]


@dataclass
class PermutationTask:
    """Output the source tokens in a fixed permuted order: ``tgt[t] = src[perm[t]]``.

    The true alignment of target step ``t`` is source position ``perm[t]``,
    so a model's attention can be scored against it. Token 0 is the start
    token; content tokens are ``1 .. vocab - 1``.

    Args:
        vocab: vocabulary size including the start token.
        length: sequence length ``S = T``.
        permutation: ``"reverse"``, ``"random"`` (drawn from ``seed``) or an explicit list.
        seed: seed of the random permutation.
    """

    vocab: int = 12
    length: int = 8
    permutation: str | list[int] = "reverse"
    seed: int = 0
    perm: Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.vocab < 3 or self.length < 1:
            raise ValueError(f"need vocab >= 3 and length >= 1, got vocab={self.vocab}, length={self.length}")
        if self.permutation == "reverse":
            self.perm = torch.arange(self.length - 1, -1, -1)
        elif self.permutation == "random":
            self.perm = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed))
        else:
            perm = torch.as_tensor(self.permutation)
            if sorted(perm.tolist()) != list(range(self.length)):
                raise ValueError(f"permutation must be a permutation of 0..{self.length - 1}, got {self.permutation}")
            self.perm = perm

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``src (B, S)``, ``tgt (B, T)``, ``tgt_in (B, T)`` (start token + shifted target)."""
        src = torch.randint(1, self.vocab, (batch_size, self.length), generator=generator)
        tgt = src[:, self.perm]
        tgt_in = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), tgt[:, :-1]], 1)
        return {"src": src, "tgt": tgt, "tgt_in": tgt_in}


@dataclass
class AssociativeRecall:
    """Key-value recall: ``k1 v1 k2 v2 ... kn vn q`` -> the value stored with key ``q``.

    Solving it needs content-based lookup across the whole sequence, which is
    what attention does and what a fixed-window or recency bias cannot.
    Keys are tokens ``0 .. n_keys - 1``, values ``n_keys .. n_keys + n_values - 1``.

    Args:
        n_pairs: key-value pairs per sequence (length ``2 n_pairs + 1``).
        n_keys: size of the key alphabet (``>= n_pairs``; keys in a sequence are distinct).
        n_values: size of the value alphabet.
    """

    n_pairs: int = 8
    n_keys: int = 16
    n_values: int = 16

    def __post_init__(self) -> None:
        if self.n_keys < self.n_pairs:
            raise ValueError(f"n_keys ({self.n_keys}) must be >= n_pairs ({self.n_pairs}) for distinct keys")

    @property
    def vocab(self) -> int:
        return self.n_keys + self.n_values

    @property
    def length(self) -> int:
        return 2 * self.n_pairs + 1

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``x (B, 2n+1)`` tokens, ``y (B,)`` the value to recall, ``where (B,)`` its position."""
        keys = torch.rand(batch_size, self.n_keys, generator=generator).argsort(-1)[:, : self.n_pairs]
        values = torch.randint(self.n_keys, self.vocab, (batch_size, self.n_pairs), generator=generator)
        pick = torch.randint(0, self.n_pairs, (batch_size,), generator=generator)
        rows = torch.arange(batch_size)
        x = torch.stack([keys, values], -1).flatten(1)  # (B, 2n): k1 v1 k2 v2 ...
        x = torch.cat([x, keys[rows, pick][:, None]], 1)  # (B, 2n + 1)
        return {"x": x, "y": values[rows, pick], "where": 2 * pick + 1}
