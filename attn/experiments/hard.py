r"""Chapter 21's experiments (hard attention): the lookup task, its model, losses and the gradient-variance helpers.

* :class:`LookupTask`: find the item whose key matches a rotated, noisy query and answer its label.
* :class:`LookupModel`: :class:`attn.hard.HardAttention` from the query to the items, reading a label embedding.
* :func:`lookup_loss` (cross-entropy, or the REINFORCE surrogate :func:`attn.hard.reinforce_loss`),
  :func:`expected_loss` (the exact expected loss of the hard model), :func:`gradient_samples` (independent
  gradient estimates, for the estimators' bias and variance).
* :func:`make_lookup_task`: the comparison's own task for REINFORCE hard attention (``OWN_TASKS["hard_reinforce"]``).

Xu et al., "Show, Attend and Tell", ICML 2015. Jang, Gu, Poole, "Categorical Reparameterization with
Gumbel-Softmax", ICLR 2017. Williams, "Simple Statistical Gradient-Following Algorithms", Machine Learning 1992.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hard import Estimator, HardAttention, HardAttentionOutput, MovingAverageBaseline, reinforce_loss
from ..registry import OwnTask
from ..train import cpu_threads
from . import sized

__all__ = ["LookupTask", "LookupModel", "lookup_loss", "expected_loss", "gradient_samples", "make_lookup_task", "OWN_TASKS"]


@dataclass
class LookupTask:
    """Find the item whose key matches the query, answer its label (generated in code).

    Each example has ``n_items`` items with random keys ``k_j`` (uniform on the
    sphere of radius ``sqrt(d)``, so that the largest dot product is the nearest key) and
    labels ``y_j`` in ``0..n_classes-1``. The query is ``R k_t + noise`` for
    one target item ``t`` and a fixed random rotation ``R`` (so the model must
    learn ``W_q``, ``W_k`` that undo it); the answer is ``y_t``. Reading any
    other item gives the right label only by chance ``1 / n_classes``.
    """

    n_items: int = 16
    key_dim: int = 8
    n_classes: int = 8
    noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_items < 2 or self.key_dim < 1 or self.n_classes < 2:
            raise ValueError(f"need n_items >= 2, key_dim >= 1, n_classes >= 2, got {self.n_items}, {self.key_dim}, {self.n_classes}")
        g = torch.Generator().manual_seed(self.seed)
        self.rotation = torch.linalg.qr(torch.randn(self.key_dim, self.key_dim, generator=g))[0]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``query (B, 1, d)``, ``keys (B, n, d)``, ``labels (B, n)``, ``target (B,)`` item, ``y (B,)`` answer."""
        keys = F.normalize(torch.randn(batch_size, self.n_items, self.key_dim, generator=generator), dim=-1) * math.sqrt(self.key_dim)
        labels = torch.randint(0, self.n_classes, (batch_size, self.n_items), generator=generator)
        target = torch.randint(0, self.n_items, (batch_size,), generator=generator)
        rows = torch.arange(batch_size)
        query = keys[rows, target] @ self.rotation.T + self.noise * torch.randn(batch_size, self.key_dim, generator=generator)
        return {"query": query[:, None], "keys": keys, "labels": labels, "target": target, "y": labels[rows, target]}


class LookupModel(nn.Module):
    """Hard (or soft) attention from the query to the items; the read value is the item's label embedding.

    ``values = E[labels]`` ``(B, n, d_v)``; logits ``= W_o · read`` over the classes.
    REINFORCE runs carry their baseline (``self.baseline``) and entropy weight.
    """

    def __init__(self, task: LookupTask, estimator: Estimator = "gumbel", tau: float = 1.0, attn_dim: int = 16,
                 value_dim: int = 16, entropy_weight: float = 0.01, momentum: float = 0.9) -> None:
        super().__init__()
        self.task, self.entropy_weight = task, entropy_weight
        self.attention = HardAttention(task.key_dim, task.key_dim, attn_dim, estimator, tau)
        self.label_embed = nn.Embedding(task.n_classes, value_dim)
        self.head = nn.Linear(value_dim, task.n_classes)
        self.baseline = MovingAverageBaseline(momentum)

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, HardAttentionOutput]:
        """Logits ``(B, n_classes)`` and the attention's output."""
        out = self.attention(batch["query"], batch["keys"], self.label_embed(batch["labels"]), generator=generator)
        return self.head(out.output[:, 0]), out


def lookup_loss(model: LookupModel, batch: dict[str, Tensor], generator: torch.Generator | None = None,
                update_baseline: bool = True) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy; for REINFORCE the surrogate with baseline and entropy bonus. Metrics: ``acc``, ``pick_acc`` (picked the target)."""
    logits, att = model(batch, generator)
    per_example = F.cross_entropy(logits, batch["y"], reduction="none")
    if model.attention.estimator == "reinforce" and model.training:
        b = model.baseline.update(per_example) if update_baseline else model.baseline.value
        loss = reinforce_loss(per_example, att.log_prob[:, 0], b, att.entropy[:, 0], model.entropy_weight)
    else:
        loss = per_example.mean()
    return loss, {"acc": float((logits.argmax(-1) == batch["y"]).float().mean()),
                  "pick_acc": float((att.index[:, 0] == batch["target"]).float().mean())}


def expected_loss(model: LookupModel, batch: dict[str, Tensor]) -> Tensor:
    """The exact expected loss ``mean_b sum_j p_j l_j`` of the hard model: every item's loss, weighted by ``p``.

    Its gradient is what an unbiased estimator of the hard model's gradient
    averages to (REINFORCE does; straight-through Gumbel does not).
    """
    att = model.attention
    p = torch.softmax(att.scores(batch["query"], batch["keys"])[:, 0], -1)  # (B, n)
    logits = model.head(model.label_embed(batch["labels"]))  # (B, n, C): the answer if item j is read
    per_item = F.cross_entropy(logits.transpose(1, 2), batch["y"][:, None].expand_as(batch["labels"]), reduction="none")
    return (p * per_item).sum(-1).mean()


def gradient_samples(model: LookupModel, batch: dict[str, Tensor], n_samples: int, baseline: float | None = None,
                     seed: int = 0) -> Tensor:
    """``n_samples`` independent gradient estimates for one batch, flattened over ``W_q, b_q, W_k, b_k``: ``(n_samples, P)``.

    Each sample draws fresh selection noise; REINFORCE uses the fixed
    ``baseline`` (``None``: 0) and no entropy bonus, so that its estimate is of
    exactly ``grad E[l]``. The soft estimator is deterministic (every row equal).
    """
    att = model.attention
    params = [att.q_proj.weight, att.q_proj.bias, att.k_proj.weight, att.k_proj.bias]
    was_training, weight = model.training, model.entropy_weight
    model.train()
    model.entropy_weight = 0.0
    saved = model.baseline.value.clone()
    model.baseline.value.fill_(0.0 if baseline is None else baseline)
    g = torch.Generator(device=batch["keys"].device).manual_seed(seed)
    rows = []
    try:
        with cpu_threads(1 if batch["keys"].device.type == "cpu" else None):  # tiny products: one thread is fastest
            rows = [_one_gradient(model, batch, g, params) for _ in range(n_samples)]
    finally:
        model.baseline.value.copy_(saved)
        model.entropy_weight = weight
        model.train(was_training)
    return torch.stack(rows)


def _one_gradient(model: LookupModel, batch: dict[str, Tensor], g: torch.Generator, params: list[Tensor]) -> Tensor:
    loss, _ = lookup_loss(model, batch, generator=g, update_baseline=False)
    return torch.cat([t.flatten() for t in torch.autograd.grad(loss, params)])


def make_lookup_task(size: str = "full", estimator: Estimator = "reinforce") -> OwnTask[LookupModel]:
    """The comparison's own task for REINFORCE hard attention: :class:`LookupTask`, the :class:`HardAttention` layer alone for the cost.

    ``size`` (:func:`attn.experiments.sized`) sets the training steps: quick 30, book 300, full 600, large 1000.
    """
    steps = sized(size, quick=30, book=300, full=600, large=1000)
    task = LookupTask()
    model = LookupModel(task, estimator)
    layer = HardAttention(16, 16, 16, estimator)

    def inputs(size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        g = generator
        return (torch.randn(8, 1, 16, generator=g), torch.randn(8, size, 16, generator=g), torch.randn(8, size, 16, generator=g))

    def weights(model: LookupModel, batch: dict[str, Tensor]) -> Tensor:
        return model(batch)[1].probs[:, 0]

    sizes = (16, 64, 256) if size == "quick" else (64, 256, 1024, 4096)
    return OwnTask(
        description="lookup: read the label of the item whose key matches the (rotated) query, 16 items",
        model=model, sample=task.sample, loss=lookup_loss, layer=layer, inputs=inputs, sizes=sizes, size_unit="keys",
        steps=steps, batch_size=32, lr=1e-2, target_acc=0.9, weights=weights,
    )


#: The comparison's own tasks of this chapter (:func:`attn.experiments.own_tasks`).
OWN_TASKS: dict[str, Callable[[str], OwnTask[Any]]] = {"hard_reinforce": make_lookup_task}
