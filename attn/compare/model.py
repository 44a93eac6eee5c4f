"""The shared task model: any registered token mixer on associative recall."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..models import RecallTokens
from ..tasks import AssociativeRecall

__all__ = ["PositionalRecallModel", "recall_loss", "POSITION_INIT_STD"]

POSITION_INIT_STD = 0.3


class PositionalRecallModel(nn.Module):
    """The comparison's model: any registered token-mixing layer on associative recall.

    Each key-value pair of :class:`~attn.tasks.AssociativeRecall` becomes one
    token ``E_k[k] + E_v[v] + P[i]`` (``P`` a learned position embedding);
    the query key becomes the **last** token ``E_k[q] + e_query + P[n]``.
    ``layers`` pre-norm residual blocks ``h <- h + A(LayerNorm(h))`` mix the
    tokens, where ``A = build(embed_dim, num_heads)`` is the mechanism under
    test; a linear readout of the query token predicts the value.

    Shapes: ``x`` ``(B, 2 n_pairs + 1)`` task tokens -> logits ``(B, n_values)``;
    with ``need_weights``, one weight tensor per layer, ``(B, heads, n + 1, n + 1)``.

    Args:
        task: the recall task (alphabet sizes, number of pairs).
        build: ``build(embed_dim, num_heads) -> nn.Module`` from the registry.
        embed_dim, num_heads, layers: model sizes.
    """

    def __init__(
        self,
        task: AssociativeRecall,
        build: Callable[[int, int], nn.Module],
        embed_dim: int = 32,
        num_heads: int = 4,
        layers: int = 1,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.task = task
        # small position init: content first, position learnable
        self.tokens = RecallTokens(task, embed_dim, position_std=POSITION_INIT_STD)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(layers))
        self.mixers = nn.ModuleList(build(embed_dim, num_heads) for _ in range(layers))
        self.out_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_values)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor | None]]:
        """Logits ``(B, n_values)`` and, if asked, each layer's attention weights."""
        h = self.tokens(x)
        weights: list[Tensor | None] = []
        for norm, mixer in zip(self.norms, self.mixers, strict=True):
            out = mixer(norm(h), need_weights=need_weights)
            h = h + out[0]
            weights.append(out[1] if need_weights else None)
        return self.head(self.out_norm(h[:, -1])), weights


def recall_loss(model: PositionalRecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the recalled value, and accuracy."""
    logits, _ = model(batch["x"])
    target = batch["y"] - model.task.n_keys
    return F.cross_entropy(logits, target), {"acc": float((logits.argmax(-1) == target).float().mean())}
