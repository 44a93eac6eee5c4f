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

from ..adaptive import AdaptiveSpanAttention, SentinelAttention, SentinelGate
from ..core import masked_softmax
from ..registry import OwnTask
from . import sized

__all__ = ["SentinelPointer", "sentinel_loss", "make_sentinel_task", "LagTask", "SpanModel", "lag_loss",
           "head_weight_at", "CaptionTask", "SentinelCaptioner", "caption_loss", "OWN_TASKS"]


class SentinelPointer(nn.Module):
    r"""A pointer over ``k`` items plus "none": :class:`SentinelAttention` with a sentinel.

    Items and the query are symbols from a codebook of ``n_symbols``; the query
    state is ``h = W_q e(query)``. The prediction is the attention itself:
    ``log alpha`` over the ``k`` items and the sentinel ("none"). ``sentinel``:

    * ``"gated"`` (Lu et al.): :math:`s = \sigma(W_x e(q) + W_h h) \odot \tanh(W_m e(q))`, a vector
      computed from the query by :class:`SentinelGate` (``W_m e(q)`` stands in for the LSTM's memory);
    * ``"null"`` (or ``True``): a learned constant null key, the same vector for every query (its
      score still depends on ``h`` through :math:`W_g h`);
    * ``"none"`` (or ``False``): no extra slot, the pointer cannot say "none" (a floor).
    """

    def __init__(self, n_symbols: int, dim: int = 32, sentinel: bool | str = True) -> None:
        super().__init__()
        kind = {True: "null", False: "none"}.get(sentinel, sentinel) if isinstance(sentinel, bool) else sentinel
        if kind not in ("gated", "null", "none"):
            raise ValueError(f"sentinel must be 'gated', 'null', 'none' or a bool, got {sentinel!r}")
        self.kind = kind
        self.embed = nn.Embedding(n_symbols, dim)
        self.query = nn.Linear(dim, dim)
        self.attention = SentinelAttention(dim)
        self.sentinel = nn.Parameter(torch.randn(dim) / math.sqrt(dim)) if kind == "null" else None
        self.gate = SentinelGate(dim, dim) if kind == "gated" else None
        self.memory = nn.Linear(dim, dim) if kind == "gated" else None

    def forward(self, items: Tensor, query: Tensor) -> Tensor:
        """``items (B, k)``, ``query (B,)`` ids -> attention ``(B, k + 1)`` (last column: the sentinel, 0 without one)."""
        v = self.embed(items)  # (B, k, d)
        h = self.query(self.embed(query))  # (B, d)
        if self.gate is not None and self.memory is not None:
            e_q = self.embed(query)
            return self.attention(v, h, self.gate(e_q, h, self.memory(e_q))).weights
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
    """Random tokens; at every position ``i >= max(lags)`` predict the earlier tokens ``x[i - lag]``, one per lag.

    Each target needs a span of its lag: with lags ``(10, 20)`` a model with
    several heads can give one head a span of about 10 and another one of about
    20 (the L1 cost makes two spans of 10 and 20 cheaper than two of 20), and
    needs no other head. ``sample`` returns ``x (B, n)`` and targets
    ``y (B, n, len(lags))`` (``-1`` where undefined).
    """

    def __init__(self, n: int = 64, vocab: int = 16, lags: tuple[int, ...] = (1, 24)) -> None:
        lags = tuple(int(lag) for lag in lags)
        if not lags or not all(0 < lag < n for lag in lags) or len(set(lags)) != len(lags):
            raise ValueError(f"lags must be distinct, each with 0 < lag < n, got lags={lags}, n={n}")
        self.n, self.vocab, self.lags = n, vocab, lags

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x = torch.randint(self.vocab, (batch_size, self.n), generator=generator)
        y = torch.full((batch_size, self.n, len(self.lags)), -1, dtype=torch.long)
        start = max(self.lags)
        for t, lag in enumerate(self.lags):
            y[:, start:, t] = x[:, start - lag : self.n - lag]  # x[i - lag]
        return {"x": x, "y": y}


class SpanModel(nn.Module):
    """Embedding -> one :class:`AdaptiveSpanAttention` layer (residual, LayerNorm) -> ``n_targets`` readouts of ``vocab`` classes.

    ``span_cost`` is :math:`\\lambda` of the L1 span penalty added by :func:`lag_loss`.
    ``span_warmup``: training steps (calls of :func:`lag_loss` in training mode) before the cost is
    switched on, so that the heads find their distances at full span before the spans shrink (with
    Adam a span moves about ``lr * S`` tokens per step, whatever :math:`\\lambda`).
    Other arguments go to :class:`AdaptiveSpanAttention`.
    """

    def __init__(self, vocab: int, embed_dim: int = 32, num_heads: int = 4, span_cost: float = 0.0,
                 n_targets: int = 2, span_warmup: int = 0, **span_kwargs: Any) -> None:
        super().__init__()
        self.vocab, self.span_cost, self.n_targets = vocab, span_cost, n_targets
        self.span_warmup, self.steps_seen = span_warmup, 0
        self.embed = nn.Embedding(vocab, embed_dim)
        self.attention = AdaptiveSpanAttention(embed_dim, num_heads, **span_kwargs)
        self.norm = nn.LayerNorm(embed_dim)
        self.readout = nn.Linear(embed_dim, n_targets * vocab)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.embed(x)  # (B, n, E)
        out, weights = self.attention(h, need_weights=need_weights)
        logits = self.readout(self.norm(h + out))  # (B, n, 2 vocab)
        return logits.view(*x.shape, self.n_targets, self.vocab), weights


def lag_loss(model: SpanModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on every target + ``span_cost`` * mean span; accuracy = all targets right."""
    logits, _ = model(batch["x"])
    y = batch["y"]
    valid = y[..., 0] >= 0
    ce = F.cross_entropy(logits[valid].reshape(-1, model.vocab), y[valid].reshape(-1))
    right = (logits[valid].argmax(-1) == y[valid]).all(-1).float().mean()
    if model.training:
        model.steps_seen += 1
    cost = model.span_cost if model.steps_seen > model.span_warmup else 0.0
    loss = ce + cost * model.attention.span_loss()
    return loss, {"acc": float(right), "span": float(model.attention.spans.detach().mean())}


#: The comparison's own tasks of this chapter (:func:`attn.experiments.own_tasks`).
OWN_TASKS: dict[str, Callable[[str], OwnTask[Any]]] = {"sentinel": make_sentinel_task}


def head_weight_at(weights: Tensor, distances: tuple[int, ...], start: int = 0) -> Tensor:
    """Mean attention weight of each head at each distance ``i - j``: ``weights (B, H, n, n)`` -> ``(H, len(distances))``.

    Averaged over the batch and the queries ``i >= start`` (those where every distance exists).
    """
    n = weights.shape[-1]
    i = torch.arange(start, n)
    return torch.stack([weights[:, :, i, i - d].mean((0, 2)) for d in distances], dim=-1)


# ----------------------------------------------------------------------------- Lu et al.'s beta per word: a toy caption


class CaptionTask:
    r"""A toy captioning task: an "image" of ``k`` regions, two of them objects; caption ``a C S and a C S .``.

    Each object has a colour and a shape (``n_colours`` and ``n_shapes`` of them); the other regions
    are background. The caption names the object in the lower region first. The **visual words**
    (the colours and shapes, positions 1, 2, 5, 6) need the image; the **function words** (``a``,
    ``and``, ``.``) follow from the position alone. Regions are given as ids: ``regions (B, k, 2)``
    (colour id, shape id; background ``(n_colours, n_shapes)``). ``sample`` -> ``regions``,
    ``words (B, 7)`` (targets), ``visual (7,)`` bool.
    """

    A, AND, END = 0, 1, 2  # word ids of the function words; colours and shapes follow

    def __init__(self, k: int = 6, n_colours: int = 4, n_shapes: int = 4) -> None:
        if k < 2:
            raise ValueError(f"need k >= 2 regions, got {k}")
        self.k, self.n_colours, self.n_shapes = k, n_colours, n_shapes
        self.vocab = 3 + n_colours + n_shapes
        self.visual = torch.tensor([False, True, True, False, False, True, True, False])[:7]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        B, k = batch_size, self.k
        where = torch.rand(B, k, generator=generator).argsort(-1)[:, :2].sort(-1).values  # two regions, in order
        colour = torch.randint(self.n_colours, (B, 2), generator=generator)
        shape = torch.randint(self.n_shapes, (B, 2), generator=generator)
        regions = torch.stack([torch.full((B, k), self.n_colours), torch.full((B, k), self.n_shapes)], -1)
        rows = torch.arange(B)[:, None]
        regions[rows, where, 0], regions[rows, where, 1] = colour, shape
        c, s = 3 + colour, 3 + self.n_colours + shape
        a, nd, end = (torch.full((B,), w) for w in (self.A, self.AND, self.END))
        words = torch.stack([a, c[:, 0], s[:, 0], nd, a, c[:, 1], s[:, 1]], 1)
        return {"regions": regions, "words": torch.cat([words, end[:, None]], 1)[:, :7]}


class SentinelCaptioner(nn.Module):
    r"""An LSTM decoder with Lu et al.'s adaptive attention: at each word, attend to the regions or the sentinel.

    ``h_t, m_t = LSTM(e(w_{t-1}), (h_{t-1}, m_{t-1}))``; sentinel
    :math:`s_t = \sigma(W_x x_t + W_h h_{t-1}) \odot \tanh(m_t)` (:class:`SentinelGate`);
    :math:`\hat c_t, \hat\alpha_t` = :class:`SentinelAttention` over the region features and
    :math:`s_t`; logits ``W_p(c_hat + h_t)`` (Lu et al. 2017, eq. 6-12). Region features are the sum
    of a colour, a shape and a region-position embedding (the position tells which object comes first). ``forward(regions, words)`` (teacher forcing) ->
    ``(logits (B, T, vocab), beta (B, T))``.
    """

    def __init__(self, task: CaptionTask, dim: int = 32) -> None:
        super().__init__()
        self.task, self.dim = task, dim
        self.colour = nn.Embedding(task.n_colours + 1, dim)
        self.shape = nn.Embedding(task.n_shapes + 1, dim)
        self.place = nn.Parameter(torch.randn(task.k, dim) * 0.3)
        self.word = nn.Embedding(task.vocab + 1, dim)  # + a start token
        self.lstm = nn.LSTMCell(dim, dim)
        self.gate = SentinelGate(dim, dim)
        self.attention = SentinelAttention(dim)
        self.readout = nn.Linear(dim, task.vocab)

    def forward(self, regions: Tensor, words: Tensor) -> tuple[Tensor, Tensor]:
        V = self.colour(regions[..., 0]) + self.shape(regions[..., 1]) + self.place  # (B, k, d)
        B, T = words.shape
        prev = torch.cat([words.new_full((B, 1), self.task.vocab), words[:, :-1]], 1)  # start token, then w_{t-1}
        h, m = V.new_zeros(B, self.dim), V.new_zeros(B, self.dim)
        logits, betas = [], []
        for t in range(T):
            x_t = self.word(prev[:, t])
            h_new, m = self.lstm(x_t, (h, m))
            s_t = self.gate(x_t, h, m)
            c_hat, alpha = self.attention(V, h_new, s_t)
            h = h_new
            logits.append(self.readout(c_hat + h))
            betas.append(alpha[:, -1])
        return torch.stack(logits, 1), torch.stack(betas, 1)


def caption_loss(model: SentinelCaptioner, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy over the caption's words (teacher forcing); accuracy per word."""
    logits, _ = model(batch["regions"], batch["words"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["words"].flatten())
    return loss, {"acc": float((logits.argmax(-1) == batch["words"]).float().mean())}
