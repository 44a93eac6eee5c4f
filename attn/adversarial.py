r"""Chapter 22 -- Adversarial attention: worst-case perturbations of the embeddings or of the attention scores during training.

**Fast-gradient adversarial training on embeddings** (Miyato et al. 2017, after
Goodfellow et al. 2015). For an example with (normalised) word embeddings
``s`` ``(n, E)`` and loss ``L(s)``, the perturbation of L2 norm ``epsilon`` that
raises the loss most *to first order* is the normalised gradient:

.. math::

    r_{\text{adv}} = \epsilon \frac{g}{\lVert g \rVert_2}, \qquad g = \nabla_s L(s), \qquad
    L(s + r_{\text{adv}}) = L(s) + \epsilon \lVert g \rVert_2 + O(\epsilon^2),

the norm taken over the whole example (all ``n x E`` numbers). Training
minimises ``L(s) + alpha * L(s + r_adv)`` with ``r_adv`` held constant (no
gradient through it). The embeddings are normalised first (each dimension to
zero mean and unit variance over the vocabulary), so that the model cannot
escape a fixed ``epsilon`` by inflating their norm.

**Adversarial training for attention** (Kitada & Iyatomi 2021, "Attention AT").
The same recipe applied to the attention *scores* ``\tilde a`` (before the
softmax) instead of the embeddings:

.. math::

    a = \operatorname{softmax}(\tilde a + r), \qquad
    r_{\text{adv}} = \epsilon \frac{\nabla_{\tilde a} L}{\lVert \nabla_{\tilde a} L \rVert_2}.

Masked (padding) positions get no gradient, hence no perturbation. A model can make a fixed
``epsilon`` on the scores negligible by growing ``||q|| ||W_k||``; ``AttentionPooling(qk_norm=True)``
closes that loophole with a LayerNorm (no gain) on ``q`` and the keys, so that ``|\tilde a_j| <= sqrt(E)``.

**Virtual adversarial training** (Miyato et al. 2016; Miyato, Dai & Goodfellow 2017, section 3).
No label: the perturbation raises the divergence of the model's own prediction,

.. math::

    r_{\text{vadv}} = \epsilon \frac{g}{\lVert g \rVert_2}, \qquad
    g = \nabla_r \operatorname{KL}\big(p(\cdot \mid s) \,\|\, p(\cdot \mid s + r)\big)\big|_{r = \xi d},

``d`` a random unit vector: one step of the power iteration towards the top eigenvector of the
KL's Hessian (:func:`vat_perturbation`).

The attention layer those papers perturb is :class:`AttentionPooling`: one
learned query attending over the tokens, ``\tilde a_j = q^\top W_k s_j / \sqrt{E}``,
``a = \operatorname{softmax}(\tilde a + \delta)`` ``(B, n)``, ``c = \sum_j a_j W_v s_j``
``(B, E)``, with the score offset ``\delta`` that Attention AT sets to ``r_adv``.
This module holds the mechanism: that layer, the worst-case steps
:func:`fgm_perturbation` and :func:`vat_perturbation` (with :func:`kl_logits`), and the distances between two attention rows
(:func:`js_distance`, :func:`tv_distance`) that measure how far an attack moved
them. The chapter's experiment -- the classifier around the layer
(``AttentionClassifier``, after Jain & Wallace 2019), its cue-word task, the
adversarial losses and attacks, the comparison's own task -- is in
:mod:`attn.experiments.adversarial`.

Miyato, Dai, Goodfellow, "Adversarial Training Methods for Semi-Supervised Text
Classification", ICLR 2017. Miyato, Maeda, Koyama, Nakae, Ishii, "Distributional Smoothing with Virtual
Adversarial Training", ICLR 2016. Kitada, Iyatomi, "Attention Meets Perturbations:
Robust and Interpretable Attention with Adversarial Training", IEEE Access 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_tokens
from .core import AttentionOutput, masked_softmax
from .masks import check_key_mask
from .registry import register

__all__ = ["AttentionPooling", "fgm_perturbation", "vat_perturbation", "kl_logits", "js_distance", "tv_distance"]


# ----------------------------------------------------------------------------- the layer whose scores are perturbed


class AttentionPooling(nn.Module):
    r"""One learned query attending over a sequence, with an optional additive perturbation of its scores.

    .. math::

        \tilde a_j = \frac{q^\top W_k x_j}{\sqrt{E}}, \qquad
        a = \operatorname{softmax}_{j:\,\text{mask}_j}(\tilde a + \delta), \qquad
        c = \sum_j a_j\, W_v x_j

    ``qk_norm=True`` (keyword) normalises ``q`` and each ``W_k x_j`` with a LayerNorm without
    gain before the product, so that ``|\tilde a_j| <= sqrt(E)``: the model cannot make a
    fixed perturbation of the scores negligible by growing ``||q|| ||W_k||``.

    Shapes: ``x (B, n, E)``, ``key_mask (B, n)`` (``True`` = real token),
    ``score_delta (B, n)`` -> ``AttentionOutput(c (B, E), a (B, n) or None)``.
    ``scores`` returns ``\tilde a`` alone, the quantity Attention AT perturbs.
    A row whose every key is masked gets weights and output zero.
    """

    def __init__(self, embed_dim: int, *, qk_norm: bool = False) -> None:
        super().__init__()
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if not isinstance(qk_norm, bool):
            raise TypeError(f"qk_norm must be a bool, got {qk_norm!r}")
        self.embed_dim, self.qk_norm = embed_dim, qk_norm
        self.query = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))  # q
        self.key = nn.Linear(embed_dim, embed_dim)  # W_k
        self.value = nn.Linear(embed_dim, embed_dim)  # W_v

    def _check(self, x: object, key_mask: Tensor | None, score_delta: Tensor | None) -> Tensor:
        x = check_tokens(x, self.embed_dim)
        check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="n")
        if score_delta is not None:
            if not isinstance(score_delta, Tensor) or not score_delta.is_floating_point():
                raise TypeError(f"score_delta must be a floating-point tensor of shape (batch, n), got {getattr(score_delta, 'dtype', type(score_delta).__name__)}")
            if score_delta.shape != x.shape[:2]:
                raise ValueError(f"score_delta must have shape (batch, n) = {tuple(x.shape[:2])}, got {tuple(score_delta.shape)}")
        return x

    def scores(self, x: Tensor) -> Tensor:
        r"""The unnormalised scores ``q^T W_k x_j / sqrt(E)``: ``(B, n, E) -> (B, n)``.

        With ``qk_norm`` the query and every key first pass through a LayerNorm without
        learned gain (:math:`\operatorname{LN}(u) = (u - \bar u) / \operatorname{std}(u)`, so
        :math:`\lVert \operatorname{LN}(u) \rVert = \sqrt{E}`), which bounds every score by
        Cauchy-Schwarz: :math:`|\tilde a_j| \le \sqrt{E}`.
        """
        q: Tensor = self.query
        k = self.key(x)
        if self.qk_norm:
            q = F.layer_norm(q, (self.embed_dim,))
            k = F.layer_norm(k, (self.embed_dim,))
        return k @ q / math.sqrt(self.embed_dim)

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, score_delta: Tensor | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        x = self._check(x, key_mask, score_delta)
        s = self.scores(x)  # (B, n)
        if score_delta is not None:
            s = s + score_delta
        a = masked_softmax(s, key_mask)  # (B, n); padding -> 0
        c = torch.einsum("bn,bne->be", a, self.value(x))  # (B, E)
        return AttentionOutput(c, a if need_weights else None)


# ----------------------------------------------------------------------------- the worst-case perturbation and the distances between attention rows


def _norms(t: Tensor) -> Tensor:
    """L2 norm of each example (over every dimension but dim 0), shaped to broadcast against ``t``: ``(B, 1, ...)``."""
    flat = t.flatten(1) if t.ndim > 1 else t[:, None]
    return flat.norm(dim=1).reshape(-1, *([1] * (t.ndim - 1)))


def _check_epsilon(epsilon: float | Tensor, batch: int) -> None:
    if isinstance(epsilon, Tensor):
        if not epsilon.is_floating_point() or epsilon.shape != (batch,):
            raise ValueError(f"a tensor epsilon must be floating-point of shape (batch,) = ({batch},), got {epsilon.dtype} {tuple(epsilon.shape)}")
        if epsilon.numel() and (not bool(torch.isfinite(epsilon).all()) or float(epsilon.min()) < 0):
            raise ValueError("epsilon must be a finite number >= 0 (every entry of a tensor epsilon)")
    elif not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool)) or epsilon < 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")


def _per_example(epsilon: float | Tensor, like: Tensor) -> float | Tensor:
    """``epsilon`` shaped to broadcast against ``like`` ``(B, ...)``: a float as is, a ``(B,)`` tensor as ``(B, 1, ...)``."""
    if isinstance(epsilon, Tensor):
        return epsilon.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    return epsilon


def fgm_perturbation(grad: Tensor, epsilon: float | Tensor) -> Tensor:
    r"""``r = epsilon * g / ||g||_2``, the norm over every dimension but the batch (dim 0).

    ``epsilon``: a number, or a tensor ``(B,)`` with one budget per example (training
    with a random budget). Examples whose gradient is zero get ``r = 0`` (not NaN).
    ``epsilon = 0`` gives zeros.
    """
    if not isinstance(grad, Tensor) or not grad.is_floating_point():
        raise TypeError(f"grad must be a floating-point tensor of shape (batch, ...), got {getattr(grad, 'dtype', type(grad).__name__)}")
    if grad.ndim < 1:
        raise ValueError("grad must have a batch dimension, got a 0-D tensor")
    _check_epsilon(epsilon, grad.shape[0])
    norm = _norms(grad)  # (B, 1, ...)
    return _per_example(epsilon, grad) * grad / norm.clamp_min(torch.finfo(grad.dtype).tiny)


def kl_logits(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    r"""``KL(p || q)`` per example between the categorical distributions of two logit tensors ``(B, C) -> (B,)``."""
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def vat_perturbation(
    logits_at: Callable[[Tensor], Tensor],
    clean_logits: Tensor,
    like: Tensor,
    epsilon: float | Tensor,
    *,
    xi: float = 1e-2,
    iterations: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The virtual adversarial perturbation (Miyato et al. 2016; Miyato, Dai & Goodfellow 2017, section 3).

    No label is needed: the adversary raises the divergence between the model's
    prediction at the clean point ``z`` and at ``z + r``,

    .. math::

        D(r) = \operatorname{KL}\big(p(\cdot \mid z) \,\|\, p(\cdot \mid z + r)\big), \qquad
        r_{\text{vadv}} = \epsilon\, \frac{g}{\lVert g \rVert_2}, \quad
        g = \nabla_r D(r)\big|_{r = \xi d}.

    ``D`` has a minimum 0 at ``r = 0`` (its gradient there vanishes), so to second order
    ``D(r) = \tfrac12 r^\top H r`` and the worst direction is ``H``'s top eigenvector. One
    step of the **power iteration** ``d \leftarrow H d / \lVert H d \rVert`` is computed
    without forming ``H``, from a finite difference of gradients:
    ``\nabla_r D(\xi d) \approx \xi H d``. Start: ``d`` a random unit vector per
    example; ``iterations`` repeats the step.

    Args:
        logits_at: ``r -> logits (B, C)``, the model with ``r`` added to the perturbed
            quantity (embeddings ``(B, n, E)`` or scores ``(B, n)``).
        clean_logits: ``(B, C)`` at ``r = 0`` (detached here: the target distribution).
        like: a tensor of the perturbation's shape ``(B, ...)``, dtype and device.
        epsilon: the L2 budget per example (a number or a ``(B,)`` tensor).
        xi: the finite-difference step. A step as small as 1e-6 drowns in float32 round-off
            (the gradient is a difference of two softmaxes ~xi apart); the default 1e-2 is
            small against an embedding norm of ~sqrt(n E).
        generator: for the random start.

    Returns:
        ``r_vadv`` ``(B, ...)``, detached, of norm ``epsilon`` per example (0 where the
        gradient vanishes, e.g. a padding-only direction).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if not (isinstance(xi, (int, float)) and not isinstance(xi, bool)) or not xi > 0:
        raise ValueError(f"xi must be a number > 0, got {xi!r}")
    _check_epsilon(epsilon, like.shape[0])
    target = clean_logits.detach()
    d = torch.randn(like.shape, generator=generator, dtype=like.dtype, device="cpu").to(like.device)
    d = d / _norms(d).clamp_min(torch.finfo(d.dtype).tiny)
    with torch.enable_grad():
        for _ in range(iterations):
            r = (xi * d).requires_grad_()
            (g,) = torch.autograd.grad(kl_logits(target, logits_at(r)).sum(), r)
            d = g / _norms(g).clamp_min(torch.finfo(g.dtype).tiny)
    return (_per_example(epsilon, d) * d).detach()


def js_distance(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    r"""Jensen-Shannon distance ``sqrt(JS(p, q))`` in nats, between distributions along ``dim`` (in ``[0, sqrt(ln 2)]``)."""
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log()), torch.zeros_like(a)).sum(dim)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0).sqrt()


def tv_distance(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """Total-variation distance ``0.5 * sum |p - q|`` along ``dim`` (in ``[0, 1]``)."""
    return 0.5 * (p - q).abs().sum(dim)


# ----------------------------------------------------------------------------- registry
# The comparison measures both on their own task (attn.experiments.adversarial.OWN_TASKS); the layer it
# times, the one whose scores or inputs are perturbed, is the registered class.

register(
    "adversarial_embedding", paper="Miyato et al. 2017", complexity="O(n d) per example, 2 forward/backward passes",
    chapter=22, data="text", summary="fast-gradient adversarial training on normalised word embeddings",
)(AttentionPooling)
register(
    "adversarial_attention", paper="Kitada & Iyatomi 2021", complexity="O(n d) per example, 2 forward/backward passes",
    chapter=22, data="text", summary="adversarial training on the attention scores (Attention AT)",
)(AttentionPooling)
