"""Small models that wrap an attention layer for the shared synthetic tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import AttentionOutput
from .multihead import MultiHeadAttention
from .tasks import AssociativeRecall

__all__ = ["RecallTokens", "RecallModel", "recall_loss"]


class RecallTokens(nn.Module):
    """Embed :class:`~attn.tasks.AssociativeRecall` inputs as one token per pair plus the query.

    Pair ``i`` becomes ``E_k[k_i] + E_v[v_i]`` and the query key becomes the
    last token ``E_k[q] + e_query``; with ``position_std`` set, a learned
    position embedding ``P`` (initialised with that standard deviation) is added.

    Shapes: ``x`` ``(B, 2 n_pairs + 1)`` task tokens -> ``(B, n_pairs + 1, E)``.
    """

    def __init__(self, task: AssociativeRecall, embed_dim: int, position_std: float | None = None) -> None:
        super().__init__()
        self.task = task
        self.key_embed = nn.Embedding(task.n_keys, embed_dim)
        self.value_embed = nn.Embedding(task.n_values, embed_dim)
        self.query_flag = nn.Parameter(torch.randn(embed_dim) * 0.02)
        self.position: nn.Embedding | None = None
        if position_std is not None:
            self.position = nn.Embedding(task.n_pairs + 1, embed_dim)
            nn.init.normal_(self.position.weight, std=position_std)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.task.length:
            raise ValueError(f"x must have shape (batch, {self.task.length}), got {tuple(x.shape)}")
        keys, values = x[:, :-1:2], x[:, 1:-1:2] - self.task.n_keys  # (B, n), (B, n)
        pairs = self.key_embed(keys) + self.value_embed(values)  # (B, n, E)
        query = self.key_embed(x[:, -1]) + self.query_flag  # (B, E)
        h = torch.cat([pairs, query[:, None]], 1)  # (B, n + 1, E)
        return h if self.position is None else h + self.position.weight


class RecallModel(nn.Module):
    """One attention layer solving :class:`~attn.tasks.AssociativeRecall`.

    Each key-value pair becomes one token ``E_k[k] + E_v[v]``; the query key
    becomes a final token ``E_k[q] + e_query``. One self-attention layer over
    these ``n + 1`` tokens lets the query token find the pair whose key matches
    and read its value, which a linear head classifies.

    Args:
        task: the recall task (sizes of the alphabets).
        embed_dim: token width ``E``.
        attention: a module ``(x (B, n, E), need_weights=...) -> AttentionOutput``;
            default :class:`~attn.multihead.MultiHeadAttention` with ``num_heads`` heads.
    """

    def __init__(self, task: AssociativeRecall, embed_dim: int = 64, num_heads: int = 4, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.task = task
        self.tokens = RecallTokens(task, embed_dim)
        self.attention = attention if attention is not None else MultiHeadAttention(embed_dim, num_heads)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_values)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits over values ``(B, n_values)`` and, if asked, the attention weights."""
        h = self.tokens(x)
        out: AttentionOutput = self.attention(h, need_weights=need_weights)
        z = self.norm(h + out.output)[:, -1]  # the query token, (B, E)
        return self.head(z), out.weights


def recall_loss(model: RecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the recalled value, and accuracy."""
    logits, _ = model(batch["x"])
    target = batch["y"] - model.task.n_keys
    loss = F.cross_entropy(logits, target)
    return loss, {"acc": float((logits.argmax(-1) == target).float().mean())}
