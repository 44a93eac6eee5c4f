"""Chapter 15's experiments: far recall, a key-value recall whose answer may lie beyond the context window.

:class:`FarRecallTask` (the stream), :class:`MemoryRecallModel` (embeddings, one
:class:`~attn.memory_attention.MemorizingAttention` layer, a readout at the query) and
:func:`far_recall_loss` (accuracy overall, far and near). The layers are in :mod:`attn.memory_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_token_ids
from ..memory_attention import MemorizingAttention

__all__ = ["FarRecallTask", "MemoryRecallModel", "far_recall_loss"]



@dataclass
class FarRecallTask:
    """Key-value recall over a stream of ``segments`` windows of ``segment`` tokens; the query is the last token.

    Each token but the last is a pair ``(key, value)`` (keys distinct); the last
    token asks for one key's value. With probability ``p_near`` the asked pair
    lies in the query's own window (the last segment), else in an earlier
    segment: **beyond the context window**, reachable only through a memory.

    ``sample`` returns ``keys (B, n)`` (the last is the query), ``values (B, n)``
    (the last is 0, unused), ``y (B,)`` the answer, ``where (B,)`` the asked
    pair's position, ``far (B,)`` whether it lies outside the last window.
    """

    n_keys: int = 48
    n_values: int = 8
    segment: int = 8
    segments: int = 4
    p_near: float = 0.5

    def __post_init__(self) -> None:
        if self.segments < 2 or self.segment < 2:
            raise ValueError(f"need segments >= 2 and segment >= 2, got {self.segments} and {self.segment}")
        if self.n_keys < self.length - 1:
            raise ValueError(f"n_keys ({self.n_keys}) must be >= the number of pairs ({self.length - 1}) for distinct keys")
        if not 0.0 <= self.p_near <= 1.0:
            raise ValueError(f"p_near must be in [0, 1], got {self.p_near}")

    @property
    def length(self) -> int:
        return self.segment * self.segments

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n, last = self.length, self.length - self.segment  # the last window starts at `last`
        keys = torch.rand(batch_size, self.n_keys, generator=generator).argsort(-1)[:, : n - 1]  # (B, n-1) distinct
        values = torch.randint(0, self.n_values, (batch_size, n - 1), generator=generator)
        near = torch.rand(batch_size, generator=generator) < self.p_near
        where_near = last + torch.randint(0, self.segment - 1, (batch_size,), generator=generator)
        where_far = torch.randint(0, last, (batch_size,), generator=generator)
        where = torch.where(near, where_near, where_far)
        rows = torch.arange(batch_size)
        keys = torch.cat([keys, keys[rows, where][:, None]], 1)
        values = torch.cat([values, values.new_zeros(batch_size, 1)], 1)
        return {"keys": keys, "values": values, "y": values[rows, where], "where": where, "far": ~near}


class MemoryRecallModel(nn.Module):
    """Embeddings + one :class:`MemorizingAttention` layer (residual, LayerNorm) + a readout at the query.

    Pair ``i`` becomes ``E_k[k_i] + E_v[v_i]``, the query ``E_k[q] + e_query``;
    the layer reads the stream in windows of ``task.segment``. ``top_k = 0``
    gives the same model without memory.
    """

    def __init__(self, task: FarRecallTask, embed_dim: int = 32, num_heads: int = 2, top_k: int = 4, capacity: int | None = None) -> None:
        super().__init__()
        self.task = task
        self.key_embed = nn.Embedding(task.n_keys, embed_dim)
        self.value_embed = nn.Embedding(task.n_values, embed_dim)
        self.query_flag = nn.Parameter(torch.randn(embed_dim) * 0.02)
        capacity = task.length if capacity is None else capacity
        self.attention = MemorizingAttention(embed_dim, num_heads, segment=task.segment, top_k=top_k, capacity=capacity)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_values)

    def embed(self, keys: Tensor, values: Tensor) -> Tensor:
        """``keys, values (B, n)`` -> tokens ``(B, n, E)``: pairs, then the query (which carries no value)."""
        check_token_ids(keys, self.task.n_keys, "keys")
        check_token_ids(values, self.task.n_values, "values")
        if values.shape != keys.shape:
            raise ValueError(f"values must have the shape of keys (batch, n) = {tuple(keys.shape)}, got {tuple(values.shape)}")
        flag = self.query_flag.expand(keys.shape[0], 1, -1)
        return self.key_embed(keys) + torch.cat([self.value_embed(values[:, :-1]), flag], 1)

    def forward(self, keys: Tensor, values: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits ``(B, n_values)`` and, with ``need_weights``, the layer's effective weights ``(B, h, n, n)``."""
        h = self.embed(keys, values)
        out, w = self.attention(h, need_weights=need_weights)
        return self.head(self.norm(h + out)[:, -1]), w


def far_recall_loss(model: MemoryRecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the answer; accuracy overall and on the far and near examples."""
    logits, _ = model(batch["keys"], batch["values"])
    correct = (logits.argmax(-1) == batch["y"]).float()
    far = batch["far"]
    metrics = {"acc": float(correct.mean())}
    if far.any():
        metrics["acc_far"] = float(correct[far].mean())
    if (~far).any():
        metrics["acc_near"] = float(correct[~far].mean())
    return F.cross_entropy(logits, batch["y"]), metrics
