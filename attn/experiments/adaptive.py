r"""Chapter 13's experiments (adaptive attention): the sentinel's pointer task and the lag task for learned spans.

* :func:`make_sentinel_task`: the comparison's own task for :class:`attn.adaptive.SentinelAttention`
  (``OWN_TASKS["sentinel"]``): point at the item equal to a query symbol, or at the sentinel ("none")
  when it is absent; :class:`SentinelPointer` is the pointer, :func:`sentinel_loss` its loss.
* :class:`LagTask`, :class:`SpanModel`, :func:`lag_loss`: two targets at distances 1 and ``lag``, so
  that heads of :class:`attn.adaptive.AdaptiveSpanAttention` need different spans (Sukhbaatar et al. 2019).
  :class:`SpanModel` is one attention sublayer with a residual and a LayerNorm and two readouts, no
  feed-forward sublayer and no positions: not :class:`attn.models.TokenLM`, whose blocks add a
  feed-forward layer and whose single readout predicts one token.

Lu, Xiong, Parikh, Socher, "Knowing When to Look", CVPR 2017.
Sukhbaatar, Grave, Bojanowski, Joulin, "Adaptive Attention Span in Transformers", ACL 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adaptive import AdaptiveSpanAttention, SentinelAttention
from ..core import masked_softmax
from ..registry import OwnTask
from . import sized

__all__ = ["SentinelPointer", "sentinel_loss", "make_sentinel_task", "LagTask", "SpanModel", "lag_loss", "OWN_TASKS"]


class SentinelPointer(nn.Module):
    """A pointer over ``k`` items plus "none": :class:`SentinelAttention` with a learned sentinel vector.

    Items and the query are symbols from a codebook of ``n_symbols``; the query
    state is ``h = W_q e(query)``; the sentinel is a learned vector (its score
    still depends on ``h`` through :math:`W_g h`). The prediction is the
    attention itself: ``log alpha`` over the ``k`` items and the sentinel ("none").
    With ``sentinel=False`` the same pointer has no way to say "none" (the baseline).
    """

    def __init__(self, n_symbols: int, dim: int = 32, sentinel: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_symbols, dim)
        self.query = nn.Linear(dim, dim)
        self.attention = SentinelAttention(dim)
        self.sentinel = nn.Parameter(torch.randn(dim) / math.sqrt(dim)) if sentinel else None

    def forward(self, items: Tensor, query: Tensor) -> Tensor:
        """``items (B, k)``, ``query (B,)`` ids -> attention ``(B, k + 1)`` (last column: the sentinel, 0 without one)."""
        v = self.embed(items)  # (B, k, d)
        h = self.query(self.embed(query))  # (B, d)
        if self.sentinel is None:
            blocked = torch.cat([torch.ones_like(items, dtype=torch.bool), items.new_zeros(items.shape[0], 1, dtype=torch.bool)], 1)
            z = self.attention.w_h(torch.tanh(self.attention.w_v(v) + self.attention.w_g(h)[:, None])).squeeze(-1)
            return masked_softmax(torch.cat([z, z[:, :1]], 1), blocked)
        s = self.sentinel.expand(items.shape[0], -1)
        return self.attention(v, h, s).weights


def _sentinel_sample(n_symbols: int, k: int) -> Callable[[int, torch.Generator], dict[str, Tensor]]:
    def sample(batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        perm = torch.rand(batch_size, n_symbols, generator=generator).argsort(-1)  # distinct symbols per row
        items = perm[:, :k]
        present = torch.rand(batch_size, generator=generator) < 0.5
        slot = torch.randint(k, (batch_size,), generator=generator)
        query = torch.where(present, items[torch.arange(batch_size), slot], perm[:, k])  # perm[:, k] is not among the items
        label = torch.where(present, slot, torch.full_like(slot, k))  # k = "none": the sentinel
        return {"items": items, "query": query, "y": label}

    return sample


def sentinel_loss(model: SentinelPointer, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """NLL of the attention at the right item (or the sentinel when the query is absent); accuracy of its argmax."""
    alpha = model(batch["items"], batch["query"])
    loss = F.nll_loss(alpha.clamp_min(1e-9).log(), batch["y"])
    return loss, {"acc": float((alpha.argmax(-1) == batch["y"]).float().mean())}


def make_sentinel_task(size: str = "book") -> OwnTask[SentinelPointer]:
    """The sentinel's own task: point at the item equal to the query, or at the sentinel when there is none (half the time).

    ``size`` (:func:`attn.experiments.sized`) sets ``(k items, width, steps)``: quick ``(8, 16, 60)``,
    book ``(12, 32, 300)``, full ``(16, 32, 600)``, large ``(32, 64, 1500)``. Chance is 1/(k+1); a pointer
    without a sentinel is capped at 50 %.
    """
    k, dim, steps = sized(size, quick=(8, 16, 60), book=(12, 32, 300), full=(16, 32, 600), large=(32, 64, 1500))
    n_symbols = 4 * k
    layer = SentinelAttention(dim)

    def inputs(size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.randn(1, size, dim, generator=generator), torch.randn(1, dim, generator=generator),
                torch.randn(1, dim, generator=generator))

    return OwnTask(
        description=f"point at the item matching the query among {k}, or at the sentinel when it is absent",
        model=SentinelPointer(n_symbols, dim), sample=_sentinel_sample(n_symbols, k), loss=sentinel_loss,
        layer=layer, inputs=inputs, sizes=(64, 256, 1024, 4096), size_unit="items", steps=steps, batch_size=64,
        lr=1e-2, log_every=10, target_acc=0.9,
        weights=lambda model, batch: model(batch["items"], batch["query"]),
    )


# ----------------------------------------------------------------------------- a task where heads need different spans


class LagTask:
    """Random tokens; at every position ``i >= lag`` predict two earlier tokens: ``x[i - 1]`` and ``x[i - lag]``.

    One needs a span of 1, the other a span of ``lag``: a model with several
    heads can give one head a short span and one a long span, and needs no
    other head. ``sample`` returns ``x (B, n)`` and targets ``y (B, n, 2)`` (``-1`` where undefined).
    """

    def __init__(self, n: int = 64, vocab: int = 16, lag: int = 24) -> None:
        if not 1 < lag < n:
            raise ValueError(f"lag must satisfy 1 < lag < n, got lag={lag}, n={n}")
        self.n, self.vocab, self.lag = n, vocab, lag

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x = torch.randint(self.vocab, (batch_size, self.n), generator=generator)
        y = torch.full((batch_size, self.n, 2), -1, dtype=torch.long)
        y[:, self.lag :, 0] = x[:, self.lag - 1 : -1]  # x[i - 1]
        y[:, self.lag :, 1] = x[:, : self.n - self.lag]  # x[i - lag]
        return {"x": x, "y": y}


class SpanModel(nn.Module):
    """Embedding -> one :class:`AdaptiveSpanAttention` layer (residual, LayerNorm) -> two readouts of ``vocab`` classes.

    ``span_cost`` is :math:`\\lambda` of the L1 span penalty added by :func:`lag_loss`.
    Other arguments go to :class:`AdaptiveSpanAttention`.
    """

    def __init__(self, vocab: int, embed_dim: int = 32, num_heads: int = 4, span_cost: float = 0.0, **span_kwargs: Any) -> None:
        super().__init__()
        self.vocab, self.span_cost = vocab, span_cost
        self.embed = nn.Embedding(vocab, embed_dim)
        self.attention = AdaptiveSpanAttention(embed_dim, num_heads, **span_kwargs)
        self.norm = nn.LayerNorm(embed_dim)
        self.readout = nn.Linear(embed_dim, 2 * vocab)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.embed(x)  # (B, n, E)
        out, weights = self.attention(h, need_weights=need_weights)
        logits = self.readout(self.norm(h + out))  # (B, n, 2 vocab)
        return logits.view(*x.shape, 2, self.vocab), weights


def lag_loss(model: SpanModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on both targets + ``span_cost`` * mean span; accuracy = both targets right."""
    logits, _ = model(batch["x"])
    y = batch["y"]
    valid = y[..., 0] >= 0
    ce = F.cross_entropy(logits[valid].reshape(-1, model.vocab), y[valid].reshape(-1))
    right = (logits[valid].argmax(-1) == y[valid]).all(-1).float().mean()
    loss = ce + model.span_cost * model.attention.span_loss()
    return loss, {"acc": float(right), "span": float(model.attention.spans.detach().mean())}


#: The comparison's own tasks of this chapter (:func:`attn.experiments.own_tasks`).
OWN_TASKS: dict[str, Callable[[str], OwnTask[Any]]] = {"sentinel": make_sentinel_task}
