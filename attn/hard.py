r"""Chapter 21 -- Hard attention: pick one key, and learn where to look without a smooth path.

Soft attention reads a weighted average ``sum_j p_j v_j`` with
``p = softmax(s)``, ``s_j = (W_q q)^T (W_k k_j) / sqrt(d)``. Hard attention
reads **one** value, ``v_z``, at a position ``z`` drawn from ``p`` (Xu et al.
2015, "stochastic hard attention"). The loss ``l(z)`` then depends on the
scores only through *which* key was picked, and ``dl/ds`` does not exist.
Two ways to get a gradient to ``W_q`` and ``W_k`` anyway:

**REINFORCE** (Williams 1992; Xu et al. 2015, section 4.1). For the expected
loss ``L(theta) = E_{z ~ p_theta}[ l(z) ]``,

.. math::

    \nabla_\theta L = \mathbb{E}_{z \sim p}\big[\, \nabla_\theta l(z)
        + (l(z) - b)\, \nabla_\theta \log p_\theta(z) \,\big]

for any ``b`` that does not depend on ``z`` (``E[grad log p] = 0``). A
one-sample estimate is unbiased; the baseline ``b`` (a moving average of the
loss) lowers its variance, and Xu et al. add an entropy bonus
``-lambda_e H(p)`` to keep exploring. In code: the surrogate
``l(z) + (l(z) - b).detach() * log p(z) - lambda_e H(p)``, see :func:`reinforce_loss`.

**Straight-through Gumbel-softmax** (Jang et al. 2017; Maddison et al. 2017).
With ``g_j = -log(-log u_j)``, ``u_j ~ U(0, 1)``, ``argmax_j (s_j + g_j)`` is a
sample of ``p`` (the Gumbel-max trick), and its relaxation

.. math::

    y = \operatorname{softmax}\big((s + g) / \tau\big)

is differentiable in ``s``. The straight-through estimator uses the one-hot
``onehot(argmax y)`` in the forward pass and ``y``'s gradient in the backward
pass: ``y_{st} = onehot - y.detach() + y``. It is biased (the gradient is that
of the relaxed problem) with a bias that shrinks as ``tau -> 0`` while the
variance grows.

Shapes: ``query`` ``(B, L, d_q)``, ``keys`` ``(B, n, d_k)``, ``values``
``(B, n, d_v)``, ``key_mask`` ``(B, n)`` (``True`` = real key); output ``(B, L, d_v)``,
weights ``(B, L, n)``: the selection actually used (one-hot for hard
estimators; ``p`` for soft), ``index`` ``(B, L)``, ``log_prob`` and
``entropy`` ``(B, L)``. Cost: ``O(L n d)`` for the scores, as soft attention;
reading the values is ``O(L d_v)`` for a hard pick (a gather).

Xu et al., "Show, Attend and Tell: Neural Image Caption Generation with Visual
Attention", ICML 2015. Jang, Gu, Poole, "Categorical Reparameterization with
Gumbel-Softmax", ICLR 2017. Williams, "Simple Statistical Gradient-Following
Algorithms for Connectionist Reinforcement Learning", Machine Learning 1992.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .checks import check_tensor, check_tokens
from .core import AttentionOutput
from .masks import check_key_mask
from .registry import OwnTask, register

__all__ = [
    "Estimator", "HardAttentionOutput", "gumbel_noise", "select", "HardAttention", "HardSelfAttention",
    "MovingAverageBaseline", "reinforce_loss", "LookupTask", "LookupModel", "lookup_loss", "make_lookup_task", "expected_loss", "gradient_samples",
]

Estimator = Literal["soft", "reinforce", "gumbel"]
ESTIMATORS = ("soft", "reinforce", "gumbel")


class HardAttentionOutput(NamedTuple):
    """What :class:`HardAttention` returns.

    ``output`` ``(B, L, d_v)``; ``weights`` ``(B, L, n)`` (the selection used
    in the forward pass); ``probs`` ``(B, L, n)`` (``p = softmax(s)``);
    ``index`` ``(B, L)`` (picked key; argmax of ``p`` for soft);
    ``log_prob`` ``(B, L)`` (``log p_index``, differentiable in the scores);
    ``entropy`` ``(B, L)`` (``H(p)``, differentiable).
    """

    output: Tensor
    weights: Tensor
    probs: Tensor
    # a field named like tuple.index: the public name of the picked key (out.index), kept on purpose
    index: Tensor  # type: ignore[assignment]
    log_prob: Tensor
    entropy: Tensor


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None, dtype=None) -> Tensor:
    """``g = -log(-log u)``, ``u ~ U(0, 1)``, clamped away from 0 and 1 so ``g`` is finite."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1 - torch.finfo(u.dtype).eps)))


def select(
    scores: Tensor,
    estimator: Estimator,
    tau: float = 1.0,
    mask: Tensor | None = None,
    sample: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Turn scores ``(..., n)`` into selection weights.

    Returns ``(weights, probs, index, log_prob, entropy)``:

    * ``"soft"``: ``weights = p``; ``index = argmax p``.
    * ``"reinforce"``: ``index ~ p`` (Gumbel-max), ``weights = onehot(index)``
      with **no** gradient to the scores (it reaches them through ``log_prob``).
    * ``"gumbel"``: ``y = softmax((s + g) / tau)``; ``weights = onehot(argmax y) - y.detach() + y``
      (straight-through: the forward value is one-hot, the gradient is ``y``'s).

    ``sample=False`` (evaluation): hard estimators pick ``argmax p``. ``mask``
    ``(..., n)`` boolean, ``True`` = may be picked; rows with no such key give zero weights.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"tau must be a positive number, got {tau!r}")
    neg = torch.finfo(scores.dtype).min
    if mask is not None:
        scores = scores.masked_fill(~mask, neg)
    logp = torch.log_softmax(scores, -1)  # (..., n)
    probs = logp.exp()
    if mask is not None:
        probs = probs * mask
    entropy = -(probs * torch.where(probs > 0, logp, torch.zeros_like(logp))).sum(-1)
    if estimator == "soft" or not sample:
        index = probs.argmax(-1)
        weights = probs if estimator == "soft" else F.one_hot(index, scores.shape[-1]).to(scores.dtype)
    else:
        g = gumbel_noise(tuple(scores.shape), generator, scores.device, scores.dtype)
        perturbed = (scores.detach() if estimator == "reinforce" else scores) + g
        if mask is not None:
            perturbed = perturbed.masked_fill(~mask, neg)
        index = perturbed.argmax(-1)  # Gumbel-max: a sample of p
        hard = F.one_hot(index, scores.shape[-1]).to(scores.dtype)
        if estimator == "reinforce":
            weights = hard
        else:
            z = perturbed / tau
            if mask is not None:
                z = z.masked_fill(~mask, neg)  # finite even when tau < 1
            y = torch.softmax(z, -1)  # the relaxed sample
            weights = hard - y.detach() + y  # straight-through
    log_prob = logp.gather(-1, index[..., None])[..., 0]
    if mask is not None:
        live = mask.any(-1)
        weights = weights * live[..., None]
        log_prob = log_prob * live
    return weights, probs, index, log_prob, entropy


class HardAttention(nn.Module):
    """Hard attention of queries over keys: each query reads the value of one key.

    ``s_j = (W_q q)^T (W_k k_j) / sqrt(d)``; the selection follows ``estimator``
    (:func:`select`). In ``eval()`` mode hard estimators pick ``argmax p``
    (``sample_in_eval=True``: they keep sampling).

    Args:
        query_dim, key_dim: widths ``d_q``, ``d_k`` of the inputs.
        attn_dim: ``d``, width of the projected queries and keys.
        estimator: ``"soft"``, ``"reinforce"`` or ``"gumbel"``.
        tau: Gumbel-softmax temperature.
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int = 16, estimator: Estimator = "gumbel",
                 tau: float = 1.0, sample_in_eval: bool = False) -> None:
        super().__init__()
        if min(query_dim, key_dim, attn_dim) <= 0:
            raise ValueError(f"query_dim, key_dim and attn_dim must be positive, got {query_dim}, {key_dim}, {attn_dim}")
        select(torch.zeros(1), estimator, tau)  # validates estimator and tau
        self.query_dim, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim
        self.estimator, self.tau, self.sample_in_eval = estimator, tau, sample_in_eval
        self.q_proj = nn.Linear(query_dim, attn_dim)
        self.k_proj = nn.Linear(key_dim, attn_dim)

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """``(B, L, d_q), (B, n, d_k) -> (B, L, n)``."""
        return self.q_proj(query) @ self.k_proj(keys).transpose(-1, -2) / math.sqrt(self.attn_dim)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor | None = None,
                generator: torch.Generator | None = None) -> HardAttentionOutput:
        """See :class:`HardAttentionOutput` for the shapes."""
        query = check_tensor(query, "query", f"(batch, n_queries, query_dim={self.query_dim})", 3)
        keys = check_tensor(keys, "keys", f"(batch, n_keys, key_dim={self.key_dim})", 3)
        values = check_tensor(values, "values", "(batch, n_keys, value_dim)", 3)
        if query.shape[-1] != self.query_dim:
            raise ValueError(f"query must have shape (batch, n_queries, query_dim={self.query_dim}), got {tuple(query.shape)}")
        if keys.shape[-1] != self.key_dim:
            raise ValueError(f"keys must have shape (batch, n_keys, key_dim={self.key_dim}), got {tuple(keys.shape)}")
        if keys.shape[:2] != values.shape[:2] or query.shape[0] != keys.shape[0]:
            raise ValueError(f"query, keys and values must share the batch and keys/values the length: "
                             f"query {tuple(query.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}")
        if keys.shape[0] > 0 and keys.shape[1] == 0:
            raise ValueError(f"keys must hold at least one key, got {tuple(keys.shape)}")
        check_key_mask(key_mask, keys.shape[0], keys.shape[1])
        s = self.scores(query, keys)  # (B, L, n)
        mask = None if key_mask is None else key_mask[:, None, :].expand_as(s)
        weights, probs, index, log_prob, entropy = select(
            s, self.estimator, self.tau, mask, sample=self.training or self.sample_in_eval, generator=generator)
        sampling = self.training or self.sample_in_eval
        if self.estimator == "soft" or (self.estimator == "gumbel" and sampling):
            output = weights @ values  # (B, L, d_v); straight-through needs y's gradient, so the dense product
        else:  # a hard pick with no gradient through the weights: gather the one value, O(L d_v)
            output = values.gather(1, index[..., None].expand(*index.shape, values.shape[-1]))
            output = output * weights.sum(-1, keepdim=True)  # zero for a query with no visible key
        return HardAttentionOutput(output, weights, probs, index, log_prob, entropy)


@register(
    "hard_gumbel",
    paper="Jang et al. 2017; Xu et al. 2015",
    complexity="O(n^2 d)",
    chapter=21,
    summary="multi-head self-attention where each query reads one key, trained with straight-through Gumbel-softmax",
    build=lambda embed_dim, num_heads: HardSelfAttention(embed_dim, num_heads, tau=1.0),
)
class HardSelfAttention(nn.Module):
    """Multi-head self-attention in which each head of each token reads **one** token.

    Training: straight-through Gumbel-softmax (``estimator="gumbel"``) or
    REINFORCE (``"reinforce"``: the caller must add :func:`reinforce_loss`
    with :attr:`last` ``.log_prob``); ``"soft"`` is ordinary attention.
    Evaluation: the argmax key. Shapes ``x (B, n, E)`` -> ``(B, n, E)``;
    weights ``(B, h, n, n)``, the one-hot selections used.
    """

    def __init__(self, embed_dim: int, num_heads: int, estimator: Estimator = "gumbel", tau: float = 1.0,
                 causal: bool = False) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        select(torch.zeros(1), estimator, tau)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.estimator, self.tau, self.causal = estimator, tau, causal
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.last: HardAttentionOutput | None = None

    def forward(self, x: Tensor, key_mask: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        x = check_tokens(x, self.embed_dim)
        check_key_mask(key_mask, x.shape[0], x.shape[1])
        b, n, _ = x.shape
        if b == 0:
            return AttentionOutput(x.new_zeros(x.shape), x.new_zeros(0, self.num_heads, n, n) if need_weights else None)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, n, n)
        mask = None
        if self.causal:
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril().expand(b, self.num_heads, n, n)
        if key_mask is not None:
            km = key_mask[:, None, None, :].expand(b, self.num_heads, n, n)
            mask = km if mask is None else mask & km
        weights, probs, index, log_prob, entropy = select(s, self.estimator, self.tau, mask, sample=self.training)
        out = weights @ v  # (B, h, n, d_h)
        self.last = HardAttentionOutput(out, weights, probs, index, log_prob, entropy)
        y = self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
        return AttentionOutput(y, weights if need_weights else None)


class MovingAverageBaseline(nn.Module):
    """``b <- m b + (1 - m) mean(l)``: Xu et al.'s moving-average baseline for REINFORCE (a buffer, not trained)."""

    value: Tensor  # buffer: the baseline, a scalar
    started: Tensor  # buffer: bool scalar, False until the first update

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, loss: Tensor) -> Tensor:
        """Return the baseline to use for ``loss`` (the value *before* this batch), then fold the batch in."""
        current = self.value.clone() if bool(self.started) else loss.mean().detach()
        self.value.copy_(current * self.momentum + (1 - self.momentum) * loss.mean().detach())
        self.started.fill_(True)
        return current


def reinforce_loss(loss: Tensor, log_prob: Tensor, baseline: Tensor | float = 0.0, entropy: Tensor | None = None,
                   entropy_weight: float = 0.0) -> Tensor:
    r"""The REINFORCE surrogate, averaged over the batch.

    ``loss`` ``(B,)``: the per-example loss ``l(z)`` (differentiable in what
    does not depend on ``z``); ``log_prob`` ``(B,)`` or ``(B, L)``: ``log p(z)``
    of the sample(s) (summed over ``L``). Its gradient is
    ``grad l(z) + (l(z) - b) grad log p(z) - lambda_e grad H``: one sample of
    an unbiased estimate of ``grad E_z[l(z)]`` (minus the entropy bonus).
    """
    loss = check_tensor(loss, "loss", "(batch,)", 1)
    log_prob = check_tensor(log_prob, "log_prob", "(batch,) or (batch, n_queries)", (1, 2))
    if log_prob.shape[0] != loss.shape[0]:
        raise ValueError(f"loss and log_prob must share the batch: {tuple(loss.shape)} vs {tuple(log_prob.shape)}")
    lp = log_prob if log_prob.ndim == 1 else log_prob.sum(-1)
    advantage = (loss.detach() - baseline)  # l(z) - b, a constant for the gradient
    surrogate = loss + advantage * lp
    if entropy is not None and entropy_weight:
        ent = entropy if entropy.ndim == 1 else entropy.sum(-1)
        surrogate = surrogate - entropy_weight * ent
    return surrogate.mean()


# ----------------------------------------------------------------------------- the chapter's task


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
        from .train import cpu_threads  # the trainer's helper, loaded on use: layers do not import training

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


def make_lookup_task(preset: str = "default", estimator: Estimator = "reinforce") -> OwnTask[LookupModel]:
    """The comparison's own task for REINFORCE hard attention: :class:`LookupTask`, the :class:`HardAttention` layer alone for the cost."""
    steps = {"quick": 30, "book": 300, "default": 600, "gpu": 1000}
    if preset not in steps:
        raise ValueError(f"unknown preset {preset!r}; one of {sorted(steps)}")
    task = LookupTask()
    model = LookupModel(task, estimator)
    layer = HardAttention(16, 16, 16, estimator)

    def inputs(size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        g = generator
        return (torch.randn(8, 1, 16, generator=g), torch.randn(8, size, 16, generator=g), torch.randn(8, size, 16, generator=g))

    def weights(model: LookupModel, batch: dict[str, Tensor]) -> Tensor:
        return model(batch)[1].probs[:, 0]

    sizes = (16, 64, 256) if preset == "quick" else (64, 256, 1024, 4096)
    return OwnTask(
        description="lookup: read the label of the item whose key matches the (rotated) query, 16 items",
        model=model, sample=task.sample, loss=lookup_loss, layer=layer, inputs=inputs, sizes=sizes, size_unit="keys",
        steps=steps[preset], batch_size=32, lr=1e-2, target_acc=0.9, weights=weights,
    )


register(
    "hard_reinforce",
    paper="Xu et al. 2015; Williams 1992",
    complexity="O(n d)",
    chapter=21,
    data="lookup",
    summary="stochastic hard attention trained with REINFORCE, a moving-average baseline and an entropy bonus",
    task=make_lookup_task,
)(HardAttention)
