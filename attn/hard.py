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

Lowering REINFORCE's variance: :func:`rloo_loss` (``K`` picks per example, each compared with the mean of
the others: the leave-one-out baseline of Kool et al. 2019, unbiased) and :func:`soft_substitution` (Xu et
al.'s trick: with probability 0.5 an example reads the soft expectation and is trained by backpropagation).

Shapes: ``query`` ``(B, L, d_q)``, ``keys`` ``(B, n, d_k)``, ``values``
``(B, n, d_v)``, ``key_mask`` ``(B, n)`` (``True`` = real key); output ``(B, L, d_v)``,
weights ``(B, L, n)``: the selection actually used (one-hot for hard
estimators; ``p`` for soft), ``index`` ``(B, L)``, ``log_prob`` and
``entropy`` ``(B, L)``. Cost: ``O(L n d)`` for the scores, as soft attention;
reading the values is ``O(L d_v)`` for a hard pick (a gather).

As a kernel of :mod:`attn.attention`: :func:`hard_kernel` (``"hard"``, over :func:`hard_attention`);
:class:`HardSelfAttention` passes it its estimator. The chapter's lookup task, model and losses are in
:mod:`attn.experiments.hard`.

Xu et al., "Show, Attend and Tell: Neural Image Caption Generation with Visual
Attention", ICML 2015. Jang, Gu, Poole, "Categorical Reparameterization with
Gumbel-Softmax", ICLR 2017. Williams, "Simple Statistical Gradient-Following
Algorithms for Connectionist Reinforcement Learning", Machine Learning 1992.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionBase, register_kernel
from .checks import check_tensor, check_tokens
from .core import AttentionOutput, check_qkv
from .masks import check_key_mask
from .registry import register

__all__ = [
    "Estimator", "HardAttentionOutput", "gumbel_noise", "select", "HardAttention", "hard_attention", "hard_kernel",
    "HardSelfAttention", "MovingAverageBaseline", "reinforce_loss", "rloo_loss", "soft_substitution",
]

Estimator = Literal["soft", "reinforce", "gumbel"]
ESTIMATORS = ("soft", "reinforce", "gumbel")


@dataclass(frozen=True)
class HardAttentionOutput:
    """What :class:`HardAttention` and :func:`hard_attention` return (fields read by name: ``out.index``).

    ``output`` ``(B, L, d_v)``; ``weights`` ``(B, L, n)`` (the selection used
    in the forward pass); ``probs`` ``(B, L, n)`` (``p = softmax(s)``);
    ``index`` ``(B, L)`` (picked key; argmax of ``p`` for soft);
    ``log_prob`` ``(B, L)`` (``log p_index``, differentiable in the scores);
    ``entropy`` ``(B, L)`` (``H(p)``, differentiable).
    """

    output: Tensor
    weights: Tensor
    probs: Tensor
    index: Tensor
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


def hard_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    estimator: Estimator = "gumbel",
    tau: float = 1.0,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> HardAttentionOutput:
    r"""Multi-head hard attention on split heads: each query of each head reads one key (:func:`select`).

    ``s = q k^T * scale`` (``scale`` default ``1/sqrt(d)``), masked by ``attn_mask`` (boolean ``True`` = may
    attend, or additive), ``key_mask`` ``(B, S)`` (``True`` = real key) and ``is_causal`` (query ``i`` sees
    keys ``j <= i``); the selection follows ``estimator``; ``sample=False`` picks ``argmax p`` (evaluation).
    Shapes: ``q (B, h, L, d)``, ``k (B, h, S, d)``, ``v (B, h, S, d_v)`` -> :class:`HardAttentionOutput` with
    output ``(B, h, L, d_v)``, weights and probs ``(B, h, L, S)``, index, log_prob, entropy ``(B, h, L)``.
    The scores are ``L x S``, as in soft attention: ``O(L S d)``.
    """
    check_qkv(q, k, v)
    check_key_mask(key_mask, q.shape[0], k.shape[-2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, h, L, S)
    mask: Tensor | None = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = attn_mask
        else:
            s = s + attn_mask
    if is_causal:
        tri = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = tri if mask is None else mask & tri
    if key_mask is not None:
        km = key_mask[:, None, None, :] if q.ndim == 4 else key_mask[:, None, :]
        mask = km if mask is None else mask & km
    if mask is not None:
        mask = mask.expand(s.shape)
    weights, probs, index, log_prob, entropy = select(s, estimator, tau, mask, sample=sample, generator=generator)
    return HardAttentionOutput(weights @ v, weights, probs, index, log_prob, entropy)


@register_kernel("hard", summary="each query reads one key: argmax (a Gumbel-max sample when sampling) of softmax(q k^T * scale)")
def hard_kernel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    estimator: Estimator = "gumbel",
    tau: float = 1.0,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> AttentionOutput:
    """:func:`hard_attention` as a kernel: the output and, when asked for, the selection used ``(B, h, L, S)``.

    With the defaults (``sample=False``) each query reads the value of its most probable key. Attention
    dropout has no meaning for a one-key read: ``dropout_p`` must be 0.
    """
    if dropout_p:
        raise ValueError(f"the hard kernel reads one key per query and has no attention dropout: dropout_p must be 0, got {dropout_p}")
    res = hard_attention(q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal, scale=scale,
                         estimator=estimator, tau=tau, sample=sample, generator=generator)
    return AttentionOutput(res.output, res.weights if need_weights else None)


@register(
    "hard_gumbel",
    paper="Jang et al. 2017; Xu et al. 2015",
    complexity="O(n^2 d)",
    chapter=21,
    summary="multi-head self-attention where each query reads one key, trained with straight-through Gumbel-softmax",
    build=lambda embed_dim, num_heads: HardSelfAttention(embed_dim, num_heads, tau=1.0),
    kernel="hard",
    causal=False,
)
class HardSelfAttention(AttentionBase):
    """Multi-head self-attention in which each head of each token reads **one** token.

    An :class:`~attn.attention.AttentionBase` around :func:`hard_kernel` whose estimator is state:
    :meth:`attend` samples while training and keeps the last selection in :attr:`last`.
    Training: straight-through Gumbel-softmax (``estimator="gumbel"``) or
    REINFORCE (``"reinforce"``: the caller must add :func:`reinforce_loss`
    with :attr:`last` ``.log_prob``); ``"soft"`` is ordinary attention.
    Evaluation: the argmax key. Shapes ``x (B, n, E)`` -> ``(B, n, E)``;
    weights ``(B, h, n, n)``, the one-hot selections used. Projections are
    :class:`~attn.attention.AttentionBase`'s (state dicts interchangeable with
    :class:`attn.multihead.MultiHeadAttention`'s).

    Args:
        embed_dim, num_heads: width ``E`` and heads ``h``.
        estimator: ``"gumbel"``, ``"reinforce"`` or ``"soft"`` (:func:`select`).
        tau: the Gumbel-softmax temperature.
        causal: the default of ``is_causal``.
        bias: biases on the projections.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, estimator: Estimator = "gumbel", tau: float = 1.0,
                 causal: bool = False, bias: bool = True) -> None:
        select(torch.zeros(1), estimator, tau)  # validates estimator and tau
        super().__init__(embed_dim, num_heads, kernel="hard", causal=causal, bias=bias)
        self.estimator, self.tau = estimator, tau
        self.last: HardAttentionOutput | None = None

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)``, ``key_mask (B, n)`` -> ``(output (B, n, E), weights (B, h, n, n) | None)``."""
        x = check_tokens(x, self.embed_dim, "x")
        return self.mix(x, x, x, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attn_mask: Tensor | None,
        key_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
        scale: float,
        need_weights: bool,
    ) -> AttentionOutput:
        """:func:`hard_attention` with this layer's estimator, sampling while training; keeps it in :attr:`last`."""
        if dropout_p:
            raise ValueError(f"hard attention has no attention dropout: dropout_p must be 0, got {dropout_p}")
        res = hard_attention(q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal, scale=scale,
                             estimator=self.estimator, tau=self.tau, sample=self.training)
        self.last = res
        return AttentionOutput(res.output, res.weights if need_weights else None)


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


register(
    "hard_reinforce",
    paper="Xu et al. 2015; Williams 1992",
    complexity="O(n d)",
    chapter=21,
    data="lookup",
    summary="stochastic hard attention trained with REINFORCE, a moving-average baseline and an entropy bonus",
)(HardAttention)


def rloo_loss(loss: Tensor, log_prob: Tensor, entropy: Tensor | None = None, entropy_weight: float = 0.0) -> Tensor:
    r"""REINFORCE with ``K`` samples per example and the leave-one-out baseline (RLOO), averaged over the batch.

    ``loss`` ``(B, K)``: ``l(z_k)`` for ``K >= 2`` independent picks ``z_1..z_K ~ p`` of the same
    example (differentiable in what does not depend on ``z``); ``log_prob`` ``(B, K)``: ``log p(z_k)``;
    ``entropy`` ``(B,)`` or ``(B, K)`` (averaged over ``K``). Each sample's baseline is the mean loss of
    the *other* ``K - 1`` samples, ``b_k = (sum_j l(z_j) - l(z_k)) / (K - 1)``, which does not depend on
    ``z_k``, so the estimate

    .. math::

        \hat g = \frac{1}{K} \sum_{k=1}^{K} \Big[\nabla_\theta l(z_k)
            + \big(l(z_k) - b_k\big)\, \nabla_\theta \log p_\theta(z_k)\Big],
        \qquad b_k = \frac{1}{K - 1} \sum_{j \ne k} l(z_j),

    is unbiased for ``grad E_z[l(z)]`` (``E[(l(z_k) - b_k) grad log p(z_k)] = E[l(z_k) grad log p(z_k)]``,
    as ``b_k`` is independent of ``z_k``) with no baseline to track. ``l(z_k) - b_k = K / (K - 1)
    (l(z_k) - mean_j l(z_j))``. Kool, van Hoof, Welling, "Buy 4 REINFORCE Samples, Get a Baseline for
    Free!", ICLR 2019 workshop. The gradient of the returned surrogate is ``mean_b g_hat - lambda_e grad H``.
    """
    loss = check_tensor(loss, "loss", "(batch, n_samples)", 2)
    log_prob = check_tensor(log_prob, "log_prob", "(batch, n_samples)", 2)
    if log_prob.shape != loss.shape:
        raise ValueError(f"loss and log_prob must have the same shape (batch, n_samples): "
                         f"{tuple(loss.shape)} vs {tuple(log_prob.shape)}")
    k = loss.shape[1]
    if k < 2:
        raise ValueError(f"the leave-one-out baseline needs n_samples >= 2, got {k}")
    detached = loss.detach()
    baseline = (detached.sum(1, keepdim=True) - detached) / (k - 1)  # (B, K): mean of the other samples
    surrogate = (loss + (detached - baseline) * log_prob).mean(1)  # (B,)
    if entropy is not None and entropy_weight:
        surrogate = surrogate - entropy_weight * (entropy if entropy.ndim == 1 else entropy.mean(-1))
    return surrogate.mean()


def soft_substitution(out: HardAttentionOutput, values: Tensor, prob: float = 0.5,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    r"""Xu et al.'s (2015, section 4.1) variance trick: with probability ``prob`` an example reads the soft expectation.

    ``out``: a sampled (REINFORCE) :class:`HardAttentionOutput` of queries ``(B, L)`` over keys;
    ``values`` ``(B, n, d_v)``. For each example ``b``, ``m_b ~ Bernoulli(prob)``; the read is

    .. math::

        c_b = m_b \sum_j p_{bj} v_{bj} + (1 - m_b)\, v_{b z_b},

    soft attention's read (trained by backpropagation through ``p``) for the substituted examples and
    the sampled value for the others. Returns ``(output (B, L, d_v), sampled (B,))``: ``sampled`` is
    ``True`` where the example read its sample; only those examples carry the REINFORCE term, so pass
    ``out.log_prob * sampled[:, None]`` to :func:`reinforce_loss`. The mix of the two gradients is
    biased towards soft attention's (the substituted examples follow the soft objective).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    values = check_tensor(values, "values", "(batch, n_keys, value_dim)", 3)
    b = out.probs.shape[0]
    sampled = torch.rand(b, generator=generator, device=out.probs.device) >= prob  # (B,)
    weights = torch.where(sampled[:, None, None], out.weights, out.probs)  # (B, L, n)
    return weights @ values, sampled
