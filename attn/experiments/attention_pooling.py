"""Chapter 19's experiments (attention pooling): the set classifier, the content-mean sets, kernel regression, the own tasks.

The pools are in :mod:`attn.attention_pooling`; here, what the chapter does
with them: :class:`SetClassifier` (Deep Sets with a pluggable pool),
:class:`ContentMeanSets` (a label that needs a content-weighted mean),
:class:`KernelRegressionTask` (noisy 1-D regression), their losses, and the
comparison's own tasks for ``pma``, ``clip_pool`` and ``nadaraya_watson``
(:data:`OWN_TASKS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention_pooling import PMA, AttentionPool, NadarayaWatson, _check_set
from ..core import AttentionOutput
from ..registry import OwnTask
from . import sized

__all__ = ["SetClassifier", "ContentMeanSets", "RareCueSets", "set_accuracy", "set_loss", "make_set_task", "KernelRegressionTask",
           "make_regression_task", "OWN_TASKS"]

Pool = Literal["pma", "clip", "mean", "max"]


class SetClassifier(nn.Module):
    """``rho(pool(phi(x_i)))``: row-wise encoder, a permutation-invariant pool, a classifier (Deep Sets form).

    Shapes: ``x (B, n, in_dim)``, ``key_mask (B, n)`` -> logits ``(B, num_classes)``.

    Args:
        decoder_hidden: hidden width of ``rho`` (default ``dim``).
        layer_norm: PMA's two layer norms (the paper's MAB); ``False`` drops them, the default of the
            Set Transformer's official code (``ln=False``).
        pool: ``"pma"`` (:class:`PMA`, one seed), ``"clip"`` (:class:`AttentionPool`), ``"mean"`` or ``"max"``
            (over the real elements).
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 32, pool: Pool = "pma", num_heads: int = 4,
                 decoder_hidden: int | None = None, layer_norm: bool = True) -> None:
        super().__init__()
        if pool not in ("pma", "clip", "mean", "max"):
            raise ValueError(f"pool must be 'pma', 'clip', 'mean' or 'max', got {pool!r}")
        if decoder_hidden is not None and decoder_hidden < 1:
            raise ValueError(f"decoder_hidden must be a positive int or None (= dim), got {decoder_hidden}")
        self.in_dim, self.pool_kind = in_dim, pool
        self.encoder = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))  # phi
        self.pool: nn.Module | None = PMA(dim, num_heads, layer_norm=layer_norm) if pool == "pma" else AttentionPool(dim, num_heads) if pool == "clip" else None
        hidden = decoder_hidden or dim  # a wider decoder gives a parameter-free pool a fairer chance
        self.decoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))  # rho

    def forward(self, x: Tensor, *, key_mask: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        """``(logits (B, C), pooling weights or None)``."""
        x = _check_set(x, self.in_dim, key_mask, "x")
        h = self.encoder(x)  # (B, n, d)
        weights = None
        if self.pool is not None:  # "pma" or "clip"
            pooled, weights = self.pool(h, key_mask=key_mask, need_weights=need_weights)
            if self.pool_kind == "pma":
                pooled = pooled[:, 0]  # the one seed's output
        else:
            real = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if key_mask is None else key_mask
            if self.pool_kind == "mean":
                pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
            else:
                pooled = h.masked_fill(~real[..., None], float("-inf")).amax(1) if h.shape[0] else h.new_zeros(0, h.shape[-1])
        return AttentionOutput(self.decoder(pooled), weights)


@dataclass(frozen=True)
class ContentMeanSets:
    """Sets whose label needs a mean weighted by content: is the mean of the A elements above the mean of the whole set?

    Each element is ``[value, one-hot type]`` with ``n_types`` types (type 0 is
    A, drawn with probability ``a_share``, at least once per set; the others
    uniformly). Per set, each type's values are drawn around its own random
    centre, and the number of A elements varies from set to set. The
    label is ``mean(values of A) > mean(all values)``. A mean over the set gives
    ``sum_A / n`` and ``n_A / n`` but not their ratio, the A mean (the pooled
    features mix in the count); a max gives extremes, not means. An attention
    head that puts its weight on the A elements alone reads the A mean
    directly, and a uniform head reads the overall mean.

    ``sample`` returns ``x (B, n_max, 1 + n_types)``, ``mask (B, n_max)`` (real
    elements first), ``y (B,)``; ``offset`` adds a random shift shared by a set.
    """

    n_types: int = 4
    size: tuple[int, int] = (8, 48)
    spread: float = 1.5
    offset: float = 0.0
    a_share: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.size[0] <= self.size[1] or self.n_types < 2:
            raise ValueError(f"need 1 <= size[0] <= size[1] and n_types >= 2, got size={self.size}, n_types={self.n_types}")

    @property
    def in_dim(self) -> int:
        return 1 + self.n_types

    def sample(self, batch_size: int, generator: torch.Generator | None = None, set_size: int | None = None) -> dict[str, Tensor]:
        """A batch of padded sets (``set_size`` fixes ``n`` for every set)."""
        g = generator
        lo, hi = (set_size, set_size) if set_size is not None else self.size
        n = torch.randint(lo, hi + 1, (batch_size,), generator=g)
        mask = torch.arange(hi) < n[:, None]  # (B, n_max), real elements first
        is_a = torch.rand(batch_size, hi, generator=g) < self.a_share
        types = torch.where(is_a, 0, torch.randint(1, self.n_types, (batch_size, hi), generator=g))
        types[:, 0] = 0  # at least one A (sets are unordered: where it sits does not matter)
        centre = torch.randn(batch_size, self.n_types, generator=g) * 0.5  # per-set centre of every type
        offset = torch.randn(batch_size, 1, generator=g) * self.offset  # shared by all elements of a set
        values = (offset + centre.gather(1, types) + self.spread * torch.randn(batch_size, hi, generator=g)) * mask
        a = (types == 0) & mask
        mean_a = (values * a).sum(1) / a.sum(1)
        mean_all = values.sum(1) / n
        x = torch.cat([values[..., None], F.one_hot(types, self.n_types).float()], -1) * mask[..., None]
        return {"x": x, "mask": mask, "y": (mean_a > mean_all).long()}


@dataclass(frozen=True)
class RareCueSets:
    """Large sets in which a few rare, marked elements decide the label: the sign of their mean value.

    Each set has ``n`` elements, ``n`` uniform in ``size``; ``k`` of them,
    ``k`` uniform in ``1..max_cues``, are **cues** (a flag feature set to 1),
    at random places, so the cue share ``k / n`` is a few percent, about 1 %
    in the larger sets. Every element is ``[flag, value, noise...]`` with ``value ~ N(0, 1)``;
    the label is ``mean(value of the cues) > 0``.

    What each pool can do: attention can put its weight on the flagged
    elements and read their **mean** value exactly, whatever ``n`` and ``k``.
    A mean pool must carry the cues' sum through ``k / n`` of the pooled
    vector, next to the rest of the set's contribution: the signal shrinks as
    the set grows. A max pool sees the largest positive and negative cue
    value, which decides the sign of the mean for ``k <= 2`` but less and less
    often as ``k`` grows (two small positive values against one larger
    negative one).

    ``sample`` returns ``x (B, n_max, 2 + noise_dim)``, ``mask (B, n_max)``
    (real elements first), ``cue (B, n_max)`` and ``y (B,)``.
    """

    size: tuple[int, int] = (20, 200)
    max_cues: int = 6
    noise_dim: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.max_cues <= self.size[0] <= self.size[1] or self.noise_dim < 0:
            raise ValueError(f"need 1 <= max_cues <= size[0] <= size[1] and noise_dim >= 0, got size={self.size}, "
                             f"max_cues={self.max_cues}, noise_dim={self.noise_dim}")

    @property
    def in_dim(self) -> int:
        return 2 + self.noise_dim

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        g = generator
        lo, hi = self.size
        n = torch.randint(lo, hi + 1, (batch_size,), generator=g)
        mask = torch.arange(hi) < n[:, None]
        k = torch.randint(1, self.max_cues + 1, (batch_size,), generator=g)
        # the cues are the k real elements with the smallest random keys: k distinct places among the n real ones
        order = torch.rand(batch_size, hi, generator=g).masked_fill(~mask, 2.0).argsort(1).argsort(1)
        cue = order < k[:, None]
        value = torch.randn(batch_size, hi, generator=g)
        noise = torch.randn(batch_size, hi, self.noise_dim, generator=g)
        x = torch.cat([cue.float()[..., None], value[..., None], noise], -1) * mask[..., None]
        mean_cue = (value * cue).sum(1) / k
        return {"x": x, "mask": mask, "cue": cue, "y": (mean_cue > 0).long()}


def set_accuracy(model: SetClassifier, batch: dict[str, Tensor]) -> float:
    """Accuracy of ``model`` on a batch of sets (evaluation mode, no gradients)."""
    dev = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        logits = model(batch["x"].to(dev), key_mask=batch["mask"].to(dev)).output
    return float((logits.argmax(-1).cpu() == batch["y"]).float().mean())


def set_loss(model: SetClassifier, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy and accuracy of a :class:`SetClassifier`, for :func:`attn.train.train`."""
    logits = model(batch["x"], key_mask=batch["mask"]).output
    return F.cross_entropy(logits, batch["y"]), {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


def _set_sizes(size: str) -> tuple[int, int, tuple[int, ...]]:
    """Steps, batch and the cost sweep (set sizes) of the set tasks at ``size`` (``attn.experiments.SIZES``)."""
    return sized(
        size,
        quick=(20, 32, (16, 64, 256)),
        book=(200, 64, (64, 256, 1024, 4096)),
        full=(600, 64, (64, 256, 1024, 4096, 16384)),
        large=(2000, 256, (256, 1024, 4096, 16384, 65536)),
    )


def make_set_task(size: str = "full", pool: Pool = "pma") -> OwnTask[SetClassifier]:
    """:class:`ContentMeanSets` classified by a :class:`SetClassifier` with the given pool (the comparison's own task).

    Cost: the pool alone on 8 full sets of ``n`` elements of width 32 (no mask), for each ``n`` of the sweep.
    """
    steps, batch, sizes = _set_sizes(size)
    sets = ContentMeanSets()
    model = SetClassifier(sets.in_dim, 2, pool=pool)
    layer: PMA | AttentionPool = PMA(32, 4) if pool == "pma" else AttentionPool(32, 4)

    def inputs(n: int, generator: torch.Generator) -> tuple[Tensor]:
        dev = next(layer.parameters()).device
        return (torch.randn(8, n, 32, generator=generator).to(dev),)  # full sets: every element real

    def weights(m: SetClassifier, b: dict[str, Tensor]) -> Tensor:
        w = m(b["x"], key_mask=b["mask"], need_weights=True).weights  # PMA (B, h, 1, n); CLIP (B, h, n + 1)
        assert w is not None  # asked for
        return w.flatten(0, -2)

    return OwnTask(
        description=f"sets of {sets.size[0]}-{sets.size[1]} elements: is the mean of the A elements above the set's mean?",
        model=model, sample=sets.sample, loss=set_loss, layer=layer, inputs=inputs, sizes=sizes,
        size_unit="set elements", steps=steps, batch_size=batch, lr=3e-3, log_every=10, target_acc=0.9, weights=weights,
    )


@dataclass(frozen=True)
class KernelRegressionTask:
    """Noisy samples of ``f(x) = sin(2x) + x / 2`` on ``[0, 5]``; predict ``f`` at query points from the samples.

    ``sample`` returns ``keys (B, n, 1)``, ``values (B, n, 1)`` (noisy ``y_i``), ``queries (B, m, 1)`` and
    ``targets (B, m, 1)`` (noiseless ``f``).
    """

    n_points: int = 64
    n_queries: int = 32
    noise: float = 0.5

    @staticmethod
    def f(x: Tensor) -> Tensor:
        return torch.sin(2 * x) + 0.5 * x

    def sample(self, batch_size: int, generator: torch.Generator | None = None, n_points: int | None = None) -> dict[str, Tensor]:
        n = n_points or self.n_points
        keys = torch.rand(batch_size, n, 1, generator=generator) * 5
        values = self.f(keys) + self.noise * torch.randn(batch_size, n, 1, generator=generator)
        queries = torch.rand(batch_size, self.n_queries, 1, generator=generator) * 5
        return {"keys": keys, "values": values, "queries": queries, "targets": self.f(queries)}


def _regression_loss(model: NadarayaWatson, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    pred = model(batch["queries"], batch["keys"], batch["values"]).output
    err = (pred - batch["targets"]).abs()
    return F.mse_loss(pred, batch["targets"]), {"acc": float((err < 0.25).float().mean()), "bandwidth": float(torch.as_tensor(model.bandwidth).detach())}


def make_regression_task(size: str = "full") -> OwnTask[NadarayaWatson]:
    """Kernel regression with a learned bandwidth; "acc" is the fraction of predictions within 0.25 of the noiseless ``f``.

    Cost: the estimator on 8 problems with ``n`` observations and ``n`` queries (``O(m n)``), for each ``n`` of the sweep.
    """
    steps, batch, sizes = _set_sizes(size)
    task = KernelRegressionTask()
    layer = NadarayaWatson(0.3, learnable=False)

    def inputs(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        dev = layer.log_bandwidth.device
        b = task.sample(8, generator, n_points=n)
        queries = torch.rand(8, n, 1, generator=generator) * 5  # as many queries as observations
        return queries.to(dev), b["keys"].to(dev), b["values"].to(dev)

    def weights(m: NadarayaWatson, b: dict[str, Tensor]) -> Tensor:
        w = m(b["queries"], b["keys"], b["values"], need_weights=True).weights
        assert w is not None  # asked for
        return w.flatten(0, 1)

    return OwnTask(
        description="1-D kernel regression from 64 noisy samples, bandwidth learned (acc: |error| < 0.25)",
        model=NadarayaWatson(2.0), sample=task.sample, loss=_regression_loss, layer=layer, inputs=inputs,
        sizes=tuple(s for s in sizes if s <= 4096), size_unit="observations", steps=max(steps // 2, 10),
        batch_size=batch, lr=5e-2, log_every=10, target_acc=0.6, weights=weights,
    )


def _set_task(pool: Pool) -> Callable[[str], OwnTask[SetClassifier]]:
    def make(size: str) -> OwnTask[SetClassifier]:
        return make_set_task(size, pool)

    return make


#: the comparison's own tasks of chapter 19, by mechanism name: ``factory(size) -> OwnTask``
OWN_TASKS: dict[str, Callable[[str], OwnTask[Any]]] = {
    "pma": _set_task("pma"),
    "clip_pool": _set_task("clip"),
    "nadaraya_watson": make_regression_task,
}
