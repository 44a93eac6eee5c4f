"""Chapter 28's experiments: the last-value task (length extrapolation) and its one-layer model per position scheme.

:class:`PositionModel` stays a model of its own rather than an :class:`attn.models.TokenLM`: it places positions
inside its one attention layer for the RoPE and ALiBi arms (:class:`~attn.positions.PositionalAttention`), has no
feed-forward sublayer, and a biased output head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..positions import PositionalAttention, sinusoidal_embedding

__all__ = ["LastValueTask", "PositionModel", "position_loss"]


class LastValueTask:
    """Length-extrapolation task: tokens are values ``0..V-1`` or a READ token ``V``; at every READ, output the most recent value.

    The answer is the nearest earlier value token: content (skip READ tokens)
    plus recency (the nearest one), the kind of local dependency text is full of.
    The first token is always a value, so every READ has an answer.

    ``sample(batch, length, generator)`` -> ``x (B, n)`` tokens, ``y (B, n)`` targets
    (``-100`` where not a READ, ignored by the loss).
    """

    def __init__(self, n_values: int = 8, read_prob: float = 0.4) -> None:
        self.n_values, self.read_prob = n_values, read_prob
        self.read = n_values
        self.vocab = n_values + 1

    def sample(self, batch: int, length: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        values = torch.randint(0, self.n_values, (batch, length), generator=generator)
        is_read = torch.rand(batch, length, generator=generator) < self.read_prob
        is_read[:, 0] = False
        x = torch.where(is_read, torch.full_like(values, self.read), values)
        idx = torch.where(is_read, 0, torch.arange(length).expand(batch, length))  # position of each value, 0 at READs
        last = torch.cummax(idx, 1).values  # position of the most recent value at or before t
        y = torch.where(is_read, values.gather(1, last), torch.full_like(values, -100))
        return {"x": x, "y": y}


class PositionModel(nn.Module):
    """Embedding (+ sinusoidal positions if chosen) -> causal :class:`~attn.positions.PositionalAttention` -> LayerNorm -> linear head.

    ``forward(x (B, n) tokens, need_weights=False) -> (logits (B, n, V), weights)``.
    """

    def __init__(self, vocab: int, position: str, embed_dim: int = 32, num_heads: int = 4, base: float = 10000.0) -> None:
        super().__init__()
        self.position = position
        self.embed = nn.Embedding(vocab, embed_dim)
        self.attention = PositionalAttention(embed_dim, num_heads, position, causal=True, base=base)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.embed(x)  # (B, n, E)
        if self.position == "sinusoidal":
            h = h + sinusoidal_embedding(torch.arange(x.shape[1], device=x.device), h.shape[-1]).to(h)
        out, w = self.attention(h, need_weights=need_weights)
        return self.head(self.norm(h + out)), w


def position_loss(model: PositionModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy and accuracy over the READ positions."""
    logits, _ = model(batch["x"])
    y = batch["y"]
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    keep = y >= 0
    acc = (logits.argmax(-1)[keep] == y[keep]).float().mean()
    return loss, {"acc": float(acc)}
