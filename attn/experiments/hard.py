r"""Chapter 21's experiments (hard attention): the lookup task, its model, losses and the gradient-variance helpers.

* :class:`LookupTask`: find the item whose key matches a rotated, noisy query and answer its label.
* :class:`LookupModel`: :class:`attn.hard.HardAttention` from the query to the items, reading a label embedding.
* :func:`lookup_loss` (cross-entropy, or the REINFORCE surrogate :func:`attn.hard.reinforce_loss`),
  :func:`expected_loss` (the exact expected loss of the hard model), :func:`gradient_samples` (independent
  gradient estimates, for the estimators' bias and variance).
* :data:`LOOKUP_ARMS`, :func:`train_lookup`: the convergence comparison's estimators (soft, REINFORCE with the
  moving average, with soft substitution, with ``K = 4`` picks and the moving average or the leave-one-out
  baseline, straight-through Gumbel at three temperatures) and one seeded run of each.
* :class:`NearestTask`, :class:`NearestModel`, :func:`nearest_loss`, :func:`nearest_comparison`: read the value
  nearest a target under a squared loss, where straight-through's tangent is a biased guide (its regret stays
  above REINFORCE's).
* :func:`make_lookup_task`: the comparison's own task for REINFORCE hard attention (``OWN_TASKS["hard_reinforce"]``).

Xu et al., "Show, Attend and Tell", ICML 2015. Jang, Gu, Poole, "Categorical Reparameterization with
Gumbel-Softmax", ICLR 2017. Williams, "Simple Statistical Gradient-Following Algorithms", Machine Learning 1992.
Kool, van Hoof, Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", ICLR 2019 workshop. Tucker et al.,
"REBAR", NeurIPS 2017.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hard import (
    Estimator,
    HardAttention,
    HardAttentionOutput,
    MovingAverageBaseline,
    reinforce_loss,
    rloo_loss,
    soft_substitution,
)
from ..registry import OwnTask
from ..train import History, cpu_threads, set_seed, train
from . import sized

__all__ = [
    "LookupTask", "LookupModel", "lookup_loss", "expected_loss", "gradient_samples", "make_lookup_task", "OWN_TASKS",
    "LOOKUP_ARMS", "train_lookup", "NearestTask", "NearestModel", "nearest_loss", "nearest_eval", "NEAREST_ARMS",
    "nearest_comparison",
]


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


Baseline = Literal["moving", "loo"]


class LookupModel(nn.Module):
    """Hard (or soft) attention from the query to the items; the read value is the item's label embedding.

    ``values = E[labels]`` ``(B, n, d_v)``; logits ``= W_o · read`` over the classes.
    REINFORCE runs carry their baseline (``self.baseline``) and entropy weight, and may train with
    ``samples = K`` picks per example: ``baseline="moving"`` (Xu et al.'s moving average, every pick
    its own REINFORCE sample) or ``"loo"`` (the leave-one-out baseline, :func:`attn.hard.rloo_loss`,
    ``K >= 2``); ``soft_prob > 0``: Xu et al.'s soft substitution (:func:`attn.hard.soft_substitution`).
    """

    def __init__(self, task: LookupTask, estimator: Estimator = "gumbel", tau: float = 1.0, attn_dim: int = 16,
                 value_dim: int = 16, entropy_weight: float = 0.01, momentum: float = 0.9, samples: int = 1,
                 baseline: Baseline = "moving", soft_prob: float = 0.0) -> None:
        super().__init__()
        if samples < 1 or (baseline == "loo" and samples < 2) or baseline not in ("moving", "loo"):
            raise ValueError(f"need samples >= 1 (>= 2 for baseline='loo') and baseline 'moving' or 'loo', "
                             f"got samples={samples}, baseline={baseline!r}")
        if (samples > 1 or soft_prob) and estimator != "reinforce":
            raise ValueError(f"samples > 1 and soft_prob are REINFORCE options, got estimator={estimator!r}")
        if soft_prob and samples > 1:
            raise ValueError("soft substitution is implemented for one sample per example")
        self.task, self.entropy_weight = task, entropy_weight
        self.samples, self.baseline_kind, self.soft_prob = samples, baseline, soft_prob
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
    """Cross-entropy; for REINFORCE the surrogate with baseline and entropy bonus. Metrics: ``acc``, ``pick_acc`` (picked the target).

    While training, a REINFORCE model with ``samples = K > 1`` draws ``K`` picks per example (the query
    repeated ``K`` times) and reports the metrics of all of them; ``soft_prob > 0`` reads the soft
    expectation for that share of the examples (their ``pick_acc`` counts the argmax).
    """
    training_reinforce = model.attention.estimator == "reinforce" and model.training
    if training_reinforce and model.samples > 1:
        k = model.samples
        values = model.label_embed(batch["labels"])
        att = model.attention(batch["query"].expand(-1, k, -1), batch["keys"], values, generator=generator)
        logits = model.head(att.output)  # (B, K, C)
        y = batch["y"][:, None].expand(-1, k)
        per_sample = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, K)
        if model.baseline_kind == "loo":
            loss = rloo_loss(per_sample, att.log_prob, att.entropy, model.entropy_weight)
        else:
            b = model.baseline.update(per_sample) if update_baseline else model.baseline.value
            loss = reinforce_loss(per_sample.flatten(), att.log_prob.flatten(), b, att.entropy.flatten(),
                                  model.entropy_weight)
        return loss, {"acc": float((logits.argmax(-1) == y).float().mean()),
                      "pick_acc": float((att.index == batch["target"][:, None]).float().mean())}
    if training_reinforce and model.soft_prob:
        values = model.label_embed(batch["labels"])
        att = model.attention(batch["query"], batch["keys"], values, generator=generator)
        read, sampled = soft_substitution(att, values, model.soft_prob, generator)
        logits = model.head(read[:, 0])
        per_example = F.cross_entropy(logits, batch["y"], reduction="none")
        b = model.baseline.update(per_example) if update_baseline else model.baseline.value
        loss = reinforce_loss(per_example, att.log_prob[:, 0] * sampled, b, att.entropy[:, 0], model.entropy_weight)
    else:
        logits, att = model(batch, generator)
        per_example = F.cross_entropy(logits, batch["y"], reduction="none")
        if training_reinforce:
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


#: The lookup comparison's arms: the :class:`LookupModel` keyword arguments of each estimator.
LOOKUP_ARMS: dict[str, dict[str, Any]] = {
    "soft": {"estimator": "soft"},
    "REINFORCE, moving average": {"estimator": "reinforce"},
    "REINFORCE, soft substitution 0.5": {"estimator": "reinforce", "soft_prob": 0.5},
    "REINFORCE, K = 4, moving average": {"estimator": "reinforce", "samples": 4},
    "RLOO, K = 4": {"estimator": "reinforce", "samples": 4, "baseline": "loo"},
    "ST Gumbel, tau = 0.5": {"estimator": "gumbel", "tau": 0.5},
    "ST Gumbel, tau = 1": {"estimator": "gumbel", "tau": 1.0},
    "ST Gumbel, tau = 2": {"estimator": "gumbel", "tau": 2.0},
}


def train_lookup(task: LookupTask, arm: dict[str, Any], seed: int, steps: int, log_every: int = 5,
                 device: torch.device | str = "cpu") -> tuple[LookupModel, History]:
    """Train one :class:`LookupModel` arm (``LOOKUP_ARMS`` entry) on ``task``: Adam 0.01, batches of 32.

    The initial model depends on ``seed`` only (``set_seed(1000 + seed)``: every arm of a seed starts from
    the same weights), the batches too (``train(seed=seed)``). Returns the model (on the CPU) and its history.
    """
    set_seed(1000 + seed)
    model = LookupModel(task, **arm)
    hist = train(model, task.sample, lookup_loss, steps=steps, batch_size=32, lr=1e-2, seed=seed,
                 log_every=log_every, progress=False, device=device)
    return model.cpu(), hist


# ----------------------------------------------------------------------------- where the bias costs


@dataclass
class NearestTask:
    r"""Read the item whose value is nearest the query's target; the loss is the squared error of the read.

    Each example has ``n_items`` scalar values ``v_j ~ U(-1, 1)`` and a target ``t ~ U(-1, 1)``. The keys
    are ``scale (v_j, v_j^2)`` and the query ``scale t``, so a bilinear score can express
    ``-(v_j - t)^2 = 2 t v_j - v_j^2 + const``; the read value ``v_z`` *is* the prediction (no head), and
    the loss ``l(z) = (v_z - t)^2`` is fixed, not learned. The hard model's objective
    ``E_{z ~ p}[(v_z - t)^2]`` is smallest when ``p`` puts all its mass on the nearest item.
    Straight-through Gumbel replaces ``l(j) - l(z)`` by the loss's tangent at the read,
    ``2 (v_z - t)(v_j - v_z)``, which rates an item beyond ``t`` as better than one just short of it
    (the toy problem of Tucker et al. 2017, REBAR): its gradient is biased where the loss curves.
    """

    n_items: int = 6
    scale: float = 5.0

    def __post_init__(self) -> None:
        if self.n_items < 2 or not self.scale > 0:
            raise ValueError(f"need n_items >= 2 and scale > 0, got {self.n_items}, {self.scale}")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``query (B, 1, 1)``, ``keys (B, n, 2)``, ``values (B, n, 1)``, ``t (B,)``, ``target (B,)`` the nearest item."""
        v = torch.rand(batch_size, self.n_items, generator=generator) * 2 - 1
        t = torch.rand(batch_size, generator=generator) * 2 - 1
        return {"query": self.scale * t[:, None, None], "keys": self.scale * torch.stack([v, v * v], -1),
                "values": v[..., None], "t": t, "target": (v - t[:, None]).abs().argmin(-1)}


class NearestModel(nn.Module):
    """:class:`attn.hard.HardAttention` from the target to the values (``d = 8``); the read value is the prediction.

    ``samples``/``baseline`` as in :class:`LookupModel` (REINFORCE only); no entropy bonus.
    """

    def __init__(self, estimator: Estimator = "reinforce", tau: float = 1.0, samples: int = 1,
                 baseline: Baseline = "moving", attn_dim: int = 8) -> None:
        super().__init__()
        if samples < 1 or (baseline == "loo" and samples < 2) or baseline not in ("moving", "loo"):
            raise ValueError(f"need samples >= 1 (>= 2 for baseline='loo'), got samples={samples}, baseline={baseline!r}")
        self.samples, self.baseline_kind = samples, baseline
        self.attention = HardAttention(1, 2, attn_dim, estimator, tau)
        self.baseline = MovingAverageBaseline(0.9)


def nearest_loss(model: NearestModel, batch: dict[str, Tensor], generator: torch.Generator | None = None
                 ) -> tuple[Tensor, dict[str, float]]:
    """Squared error of the read (REINFORCE: its surrogate). Metrics: ``regret`` and ``pick_acc``.

    ``regret``: the exact expected loss of the policy, ``mean_b sum_j p_j (v_j - t)^2``, minus the
    nearest item's loss (0 = all mass on the nearest item); ``pick_acc``: the (first) pick was the nearest
    item (the argmax in eval mode).
    """
    att = model.attention
    reinforce = att.estimator == "reinforce" and model.training
    k = model.samples if reinforce else 1
    out = att(batch["query"].expand(-1, k, -1), batch["keys"], batch["values"], generator=generator)
    v, t = batch["values"][..., 0], batch["t"]
    per_sample = (out.output[..., 0] - t[:, None]) ** 2  # (B, K)
    if reinforce and model.baseline_kind == "loo":
        loss = rloo_loss(per_sample, out.log_prob)
    elif reinforce:
        b = model.baseline.update(per_sample)
        loss = reinforce_loss(per_sample.flatten(), out.log_prob.flatten(), b)
    else:
        loss = per_sample.mean()
    with torch.no_grad():
        item_loss = (v - t[:, None]) ** 2  # (B, n)
        regret = (out.probs[:, 0] * item_loss).sum(-1) - item_loss.min(-1).values
    return loss, {"regret": float(regret.mean()), "pick_acc": float((out.index[:, 0] == batch["target"]).float().mean())}


#: The nearest-value comparison's arms (:class:`NearestModel` keyword arguments).
NEAREST_ARMS: dict[str, dict[str, Any]] = {
    "REINFORCE, moving average": {"estimator": "reinforce"},
    "RLOO, K = 4": {"estimator": "reinforce", "samples": 4, "baseline": "loo"},
    "ST Gumbel, tau = 0.5": {"estimator": "gumbel", "tau": 0.5},
    "ST Gumbel, tau = 1": {"estimator": "gumbel", "tau": 1.0},
}


def nearest_eval(model: NearestModel, task: NearestTask, seed: int, batch_size: int = 2000) -> dict[str, float]:
    """``regret`` of the policy ``p`` and ``pick_acc`` of its argmax on one held-out batch (no gradients)."""
    batch = task.sample(batch_size, torch.Generator().manual_seed(seed))
    was = model.training
    model.eval()
    with torch.no_grad():
        _, m = nearest_loss(model, batch)
    model.train(was)
    return m


def nearest_comparison(task: NearestTask, seeds: list[int], steps: int = 400, more_steps: int = 200,
                       start_arm: str = "RLOO, K = 4", arms: dict[str, dict[str, Any]] | None = None,
                       lr: float = 3e-2) -> dict[str, dict[str, list[float]]]:
    """Train every arm on the same seeds and batches, then continue the ``start_arm`` model with each estimator.

    Phase 1: each arm of ``arms`` (default :data:`NEAREST_ARMS`) trains ``steps`` steps (Adam ``lr``,
    batches of 32, the seed's initial weights). Phase 2 (``more_steps > 0``): the trained ``start_arm``
    model is copied and trained ``more_steps`` more steps (Adam 0.01, fresh) with ``start_arm``'s
    estimator and with each straight-through arm: an estimator whose expected gradient points downhill
    keeps improving from that point, a biased one need not. Returns
    ``{"regret": {arm: [per seed]}, "pick_acc": {...}, "continued regret": {arm: [...]}}``
    (held-out batch ``50_000 + seed``).
    """
    arms = NEAREST_ARMS if arms is None else arms
    out: dict[str, dict[str, list[float]]] = {"regret": {}, "pick_acc": {}, "continued regret": {}}
    for seed in seeds:
        for name, kw in arms.items():
            set_seed(1000 + seed)
            model = NearestModel(**kw)
            train(model, task.sample, nearest_loss, steps=steps, batch_size=32, lr=lr, seed=seed,
                  log_every=steps, progress=False)
            m = nearest_eval(model, task, 50_000 + seed)
            out["regret"].setdefault(name, []).append(m["regret"])
            out["pick_acc"].setdefault(name, []).append(m["pick_acc"])
            if more_steps and name == start_arm:
                for name2, kw2 in arms.items():
                    if name2 != start_arm and kw2.get("estimator") != "gumbel":
                        continue
                    cont = NearestModel(**kw2)
                    cont.load_state_dict(model.state_dict())
                    train(cont, task.sample, nearest_loss, steps=more_steps, batch_size=32, lr=1e-2,
                          seed=100 + seed, log_every=more_steps, progress=False)
                    out["continued regret"].setdefault(name2, []).append(nearest_eval(cont, task, 50_000 + seed)["regret"])
    return out


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
