"""Synthetic tasks the chapters share, each seeded and small enough for a CPU.

Every task returns a dict of tensors from ``sample(batch_size, generator)``,
so a fixed :class:`torch.Generator` seed gives the same batches everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["PermutationTask", "AssociativeRecall", "MQARTask"]


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


@dataclass
class MQARTask:
    """Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): many lookups per sequence.

    Layout of one sequence of ``seq_len`` tokens::

        k_1 v_1 k_2 v_2 ... k_P v_P | . q_1 . . q_2 ... q_Q .
        <---- 2 P tokens: pairs --->  <-- seq_len - 2 P: queries among filler -->

    Keys and values are **separate tokens** (a key is immediately followed by its value). The ``P =
    num_pairs`` keys of a sequence are distinct; each query ``q_j`` is one of them, asked once
    (``num_queries <= num_pairs`` distinct keys), at a random position of the query region in the
    order of the positions; the other positions of that region hold the filler token. The **target at
    a query's position is the value stored with its key** (the model reads the query token and must
    output the value at the same position, as a causal language model predicts its next token);
    ``loss_mask`` is ``True`` exactly at the query positions.

    A causal model must store all ``P`` pairs as it reads them, since it learns which keys are asked only
    afterwards: softmax attention keeps every pair (its KV cache grows with the length), a recurrent or
    linear-attention model must fit them into a state of fixed size -- which is what the task measures.

    Tokens: ``0`` the filler, keys ``1 .. n_keys``, values ``n_keys + 1 .. n_keys + n_values`` with
    ``n_keys = n_values = (vocab - 1) // 2`` (a spare last token when ``vocab`` is even).

    Args:
        vocab: vocabulary size (``>= 2 num_pairs + 1``: ``num_pairs`` distinct keys are drawn).
        num_pairs: key-value pairs ``P`` per sequence.
        num_queries: queries ``Q`` per sequence (``1 <= Q <= P``); default ``P`` (every key asked once).
        seq_len: tokens per sequence (``>= 2 P + Q``); default ``2 P + Q`` (no filler).
    """

    vocab: int = 64
    num_pairs: int = 8
    num_queries: int | None = None
    seq_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab", "num_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {self.num_pairs}")
        if self.num_queries is None:
            self.num_queries = self.num_pairs
        if not 1 <= self.num_queries <= self.num_pairs:
            raise ValueError(f"num_queries must be in 1..num_pairs={self.num_pairs}, got {self.num_queries}")
        if self.n_keys < self.num_pairs:
            raise ValueError(f"vocab={self.vocab} gives {self.n_keys} keys: need vocab >= 2 num_pairs + 1 "
                             f"= {2 * self.num_pairs + 1} for {self.num_pairs} distinct keys")
        if self.seq_len is None:
            self.seq_len = 2 * self.num_pairs + self.num_queries
        if self.seq_len < 2 * self.num_pairs + self.num_queries:
            raise ValueError(f"seq_len must be >= 2 num_pairs + num_queries = "
                             f"{2 * self.num_pairs + self.num_queries}, got {self.seq_len}")

    @property
    def n_keys(self) -> int:
        """Size of the key alphabet (tokens ``1 .. n_keys``)."""
        return (self.vocab - 1) // 2

    @property
    def n_values(self) -> int:
        """Size of the value alphabet (tokens ``n_keys + 1 .. n_keys + n_values``)."""
        return (self.vocab - 1) // 2

    @property
    def length(self) -> int:
        """Tokens per sequence (``seq_len`` after its default is filled in)."""
        assert self.seq_len is not None
        return self.seq_len

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One seeded batch.

        Returns:
            ``x (B, seq_len)`` long tokens; ``y (B, seq_len)`` long, the value at each query position and
            ``-100`` elsewhere (``F.cross_entropy``'s ``ignore_index``); ``loss_mask (B, seq_len)`` bool,
            ``True`` at the query positions; ``source (B, seq_len)`` long, the position of the queried
            key's value token at each query position and ``-1`` elsewhere.
        """
        assert self.num_queries is not None and self.seq_len is not None
        p, nq, n = self.num_pairs, self.num_queries, self.seq_len
        rows = torch.arange(batch_size)[:, None]
        keys = 1 + torch.rand(batch_size, self.n_keys, generator=generator).argsort(-1)[:, :p]  # (B, P) distinct
        values = 1 + self.n_keys + torch.randint(0, self.n_values, (batch_size, p), generator=generator)
        asked = torch.rand(batch_size, p, generator=generator).argsort(-1)[:, :nq]  # (B, Q) distinct pairs
        region = n - 2 * p  # positions of the query region
        slots = torch.rand(batch_size, region, generator=generator).argsort(-1)[:, :nq].sort(-1).values
        where = 2 * p + slots  # (B, Q) query positions, increasing
        x = torch.zeros(batch_size, n, dtype=torch.long)
        x[:, : 2 * p] = torch.stack([keys, values], -1).flatten(1)  # k_1 v_1 k_2 v_2 ...
        x[rows, where] = keys[rows, asked]
        y = torch.full((batch_size, n), -100, dtype=torch.long)
        y[rows, where] = values[rows, asked]
        source = torch.full((batch_size, n), -1, dtype=torch.long)
        source[rows, where] = 2 * asked + 1
        return {"x": x, "y": y, "loss_mask": y >= 0, "source": source}
