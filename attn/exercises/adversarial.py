"""Chapter 22's exercises: the fast-gradient perturbation, the loss it buys, and VAT's power-iteration step.

Solutions: :func:`fgm_perturbation`, :func:`loss_rise`, :func:`vat_direction`. Checkers:
:func:`check_fgm_perturbation`, :func:`check_loss_rise`, :func:`check_vat_direction`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "fgm_perturbation", "loss_rise", "vat_direction",
    "check_fgm_perturbation", "check_loss_rise", "check_vat_direction",
    "FGM_PERTURBATION", "LOSS_RISE", "VAT_DIRECTION", "EXERCISES",
]


def _example_norms(t: Tensor) -> Tensor:
    """The L2 norm of each example (every dimension but the first), shaped ``(B, 1, ...)`` to broadcast."""
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.ndim - 1)))


# ----------------------------------------------------------------------------- 1. the FGM perturbation
def fgm_perturbation(grad: Tensor, epsilon: float) -> Tensor:
    r"""The worst first-order step of L2 norm ``epsilon``: ``r = epsilon * g / ||g||_2``, one norm per example.

    Shapes: ``grad (B, ...)`` (embeddings ``(B, n, E)`` or scores ``(B, n)``) -> ``r`` of the same shape. The
    norm runs over every dimension but the batch (all of one sentence's numbers), so each example's ``r`` has
    norm ``epsilon``; an example whose gradient is zero gets ``r = 0``.
    """
    norm = grad.flatten(1).norm(dim=1)  # (B,): one norm per example
    norm = norm.reshape(-1, *([1] * (grad.ndim - 1)))  # (B, 1, ...) to broadcast
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))  # a zero gradient -> r = 0, not 0/0
    return epsilon * grad / safe


def _fgm_cases(g: torch.Generator) -> list[Case]:
    emb = torch.randn(3, 5, 4, generator=g) * torch.tensor([0.5, 1.0, 3.0]).reshape(3, 1, 1)
    scores = torch.randn(4, 6, generator=g)
    scores[0, 4:] = 0.0  # padding: no gradient reaches a padded score
    scores[2, 2:] = 0.0
    zero = torch.randn(2, 3, 4, generator=g)
    zero[1] = 0.0  # an example whose loss does not depend on its embeddings
    one = torch.randn(1, 1, 8, generator=g)
    return [
        Case((emb, 0.5), label="embedding gradient (3, 5, 4), epsilon 0.5"),
        Case((scores, 2.0), label="score gradient (4, 6) with padded (zero) scores, epsilon 2"),
        Case((zero, 1.0), label="gradient (2, 3, 4) whose second example is all zero, epsilon 1"),
        Case((one, 0.25), label="one sentence of one token (1, 1, 8), epsilon 0.25"),
    ]


def _fgm_sign(grad: Tensor, epsilon: float) -> Tensor:
    return epsilon * grad.sign()


def _fgm_per_token(grad: Tensor, epsilon: float) -> Tensor:
    return epsilon * grad / grad.norm(dim=-1, keepdim=True)


def _fgm_whole_batch(grad: Tensor, epsilon: float) -> Tensor:
    return epsilon * grad / grad.norm()


def _fgm_unnormalised(grad: Tensor, epsilon: float) -> Tensor:
    return epsilon * grad


def _fgm_descent(grad: Tensor, epsilon: float) -> Tensor:
    return -epsilon * grad / _example_norms(grad)


def _fgm_no_guard(grad: Tensor, epsilon: float) -> Tensor:
    return epsilon * grad / _example_norms(grad)


FGM_PERTURBATION = Exercise(
    name="fgm_perturbation",
    chapter=22,
    title="The fast-gradient perturbation",
    solution=fgm_perturbation,
    cases=_fgm_cases,
    hint="Flatten every dimension but the batch, take one L2 norm per example, divide, multiply by epsilon.",
    mistakes=(
        Mistake("sign_step", "that is Goodfellow et al.'s `epsilon * g.sign()`, a step in the L∞ ball: the "
                "chapter's perturbation is the L2 one, `epsilon * g / ||g||₂`, which "
                "keeps the gradient's direction and has norm exactly epsilon.", _fgm_sign),
        Mistake("norm_per_token", "the norm is taken over the last dimension only, so every *token* gets a "
                "step of norm epsilon: epsilon is a budget per sentence, so take one norm over every "
                "dimension but the batch (`grad.flatten(1).norm(dim=1)`).", _fgm_per_token),
        Mistake("norm_over_batch", "one norm over the whole batch: then an example's step depends on the other "
                "examples and is shorter than epsilon. Take one norm per example (every dimension but dim 0).",
                _fgm_whole_batch),
        Mistake("not_normalised", "the gradient is not divided by its norm: `epsilon * g` has norm "
                "`epsilon * ||g||`, not epsilon; divide each example by its own L2 norm.", _fgm_unnormalised),
        Mistake("descent", "the step goes *down* the gradient (`-epsilon * g / ||g||`), which lowers the loss: "
                "the adversary raises it, so step along `+g`.", _fgm_descent),
        Mistake("zero_gradient_nan", "right wherever the gradient is non-zero, but an example whose gradient is "
                "all zero gets 0/0 = NaN: give it `r = 0` (divide by `torch.where(norm > 0, norm, 1)` or "
                "clamp the norm away from zero).", _fgm_no_guard),
    ),
)


# ----------------------------------------------------------------------------- 2. the loss it buys
def loss_rise() -> tuple[float, float]:
    r"""The rise of the linear loss ``L(z) = wᵀz``, ``w = (3, 4)``, under two steps of budget ``epsilon = 0.1``.

    The L2 step ``r = epsilon w / ||w||₂`` raises it by ``epsilon ||w||₂ = 0.5`` (the chapter's first-order
    rise, exact for a linear loss); the sign step ``r = epsilon sign(w)`` (an L∞ ball of radius epsilon) by
    ``epsilon ||w||₁ = 0.7``. Returns both.
    """
    w = torch.tensor([3.0, 4.0], dtype=torch.float64)
    epsilon = 0.1
    l2_step = epsilon * w / w.norm()
    sign_step = epsilon * w.sign()
    return float(w @ l2_step), float(w @ sign_step)


LOSS_RISE = Exercise(
    name="loss_rise",
    chapter=22,
    title="The loss a perturbation buys",
    solution=loss_rise,
    kind="value",
    atol=1e-6,
    rtol=1e-6,
    hint="For a linear loss the Taylor expansion is exact: the rise is wᵀr; compute r for each step.",
    mistakes=(
        Mistake("budget_only", "the rise is not epsilon: it is wᵀr, and for the L2 step that is "
                "epsilon ‖w‖₂ (‖w‖₂ = 5 here), for the sign step epsilon ‖w‖₁.", lambda: (0.1, 0.1)),
        Mistake("same_rise", "the two steps do not buy the same rise: the sign step lies in the L∞ ball, "
                "which holds the L2 ball of the same radius, so it raises a linear loss more "
                "(epsilon ‖w‖₁ against epsilon ‖w‖₂).", lambda: (0.5, 0.5)),
        Mistake("squared_norm", "that uses ‖w‖² = 25: the L2 step is r = epsilon w / ‖w‖, so wᵀr = "
                "epsilon ‖w‖²/‖w‖ = epsilon ‖w‖.", lambda: (2.5, 0.7)),
        Mistake("swapped", "the two numbers are swapped: the first is the L2 step's rise, epsilon ‖w‖₂, the "
                "second the sign step's, epsilon ‖w‖₁.", lambda: (0.7, 0.5)),
    ),
)


# ----------------------------------------------------------------------------- 3. VAT's power-iteration step
def vat_direction(logits_at: Callable[[Tensor], Tensor], clean_logits: Tensor, d: Tensor, xi: float) -> Tensor:
    r"""One power-iteration step of VAT: the unit direction ``g / ||g||`` per example.

    ``D(r) = KL(p(·|z) || p(·|z + r))`` with ``p(·|z) = softmax(clean_logits)`` held constant, and
    ``g = ∇_r D(r)`` at ``r = xi d``; since ``∇_r D(xi d) ≈ xi H d``, ``g / ||g||`` is one step of
    ``d <- H d / ||H d||``.

    Shapes: ``logits_at: r (B, ...) -> logits (B, C)``, ``clean_logits (B, C)``, ``d (B, ...)`` a unit
    vector per example -> ``(B, ...)``, unit norm per example (the norm over every dimension but the batch).
    """
    log_p = torch.log_softmax(clean_logits.detach(), dim=-1)  # (B, C), the target: held constant
    r = (xi * d).detach().requires_grad_()  # (B, ...)
    with torch.enable_grad():
        log_q = torch.log_softmax(logits_at(r), dim=-1)  # (B, C)
        kl = (log_p.exp() * (log_p - log_q)).sum()  # sum over the batch of KL(p || q)
        (g,) = torch.autograd.grad(kl, r)
    return g / g.flatten(1).norm(dim=1).reshape(-1, *([1] * (g.ndim - 1)))


def _linear_model(base: Tensor, w: Tensor) -> Callable[[Tensor], Tensor]:
    def logits_at(r: Tensor) -> Tensor:
        return torch.tanh(base + r).flatten(1) @ w  # (B, C)

    return logits_at


def _vat_cases(g: torch.Generator) -> list[Case]:
    out = []
    for shape, classes, xi, label in [
        ((3, 4, 5), 3, 1e-2, "embeddings (3, 4, 5), 3 classes, xi 0.01"),
        ((4, 6), 2, 1e-2, "scores (4, 6), 2 classes, xi 0.01"),
        ((1, 2, 3), 4, 0.1, "one sentence (1, 2, 3), 4 classes, xi 0.1"),
    ]:
        base = torch.randn(*shape, generator=g, dtype=torch.float64)
        w = 2 * torch.randn(math.prod(shape[1:]), classes, generator=g, dtype=torch.float64)
        model = _linear_model(base, w)
        d = torch.randn(*shape, generator=g, dtype=torch.float64)
        d = d / _example_norms(d)
        out.append(Case((model, model(torch.zeros(shape, dtype=torch.float64)), d, xi), label=label))
    return out


def _vat_grad(logits_at: Callable[[Tensor], Tensor], clean_logits: Tensor, r: Tensor) -> Tensor:
    r = r.detach().requires_grad_()
    with torch.enable_grad():
        log_p = torch.log_softmax(clean_logits, -1)
        log_q = torch.log_softmax(logits_at(r), -1)
        (g,) = torch.autograd.grad((log_p.exp() * (log_p - log_q)).sum(), r)
    return g


def _vat_at_d(logits_at: Callable[[Tensor], Tensor], clean_logits: Tensor, d: Tensor, xi: float) -> Tensor:
    g = _vat_grad(logits_at, clean_logits, d)
    return g / _example_norms(g)


def _vat_unnormalised(logits_at: Callable[[Tensor], Tensor], clean_logits: Tensor, d: Tensor,
                      xi: float) -> Tensor:
    return _vat_grad(logits_at, clean_logits, xi * d)


def _vat_batch_norm(logits_at: Callable[[Tensor], Tensor], clean_logits: Tensor, d: Tensor, xi: float) -> Tensor:
    g = _vat_grad(logits_at, clean_logits, xi * d)
    return g / g.norm()


def _vat_no_step(logits_at: Callable[[Tensor], Tensor], clean_logits: Tensor, d: Tensor, xi: float) -> Tensor:
    return d.clone()


def _vat_descent(logits_at: Callable[[Tensor], Tensor], clean_logits: Tensor, d: Tensor, xi: float) -> Tensor:
    g = _vat_grad(logits_at, clean_logits, xi * d)
    return -g / _example_norms(g)


VAT_DIRECTION = Exercise(
    name="vat_direction",
    chapter=22,
    title="VAT's power-iteration step",
    solution=vat_direction,
    cases=_vat_cases,
    atol=1e-6,
    rtol=1e-5,
    hint="Make r = xi * d a leaf that requires grad, compute KL(softmax(clean) || softmax(logits_at(r))), "
         "differentiate with respect to r, normalise per example.",
    mistakes=(
        Mistake("no_xi", "the gradient is taken at r = d, a full unit step: the finite difference "
                "∇D(xi d) ≈ xi H d holds for a *small* xi, so evaluate it at r = xi * d.", _vat_at_d),
        Mistake("not_normalised", "the gradient is returned as it is: the power iteration keeps the "
                "direction only, so divide each example's g by its own L2 norm.", _vat_unnormalised),
        Mistake("norm_over_batch", "one norm over the whole batch: normalise each example by its own norm "
                "(every dimension but dim 0), so that every d has norm 1.", _vat_batch_norm),
        Mistake("no_step", "that returns d itself: the step replaces d by the normalised gradient of the "
                "KL at xi * d, i.e. H d / ‖H d‖.", _vat_no_step),
        Mistake("descent", "the direction is the negative gradient: the adversary *raises* the divergence, "
                "so keep the sign of ∇D (the KL is D = Σ p (log p − log q), with q the perturbed "
                "prediction).", _vat_descent),
    ),
)

check_fgm_perturbation = FGM_PERTURBATION.checker()
check_loss_rise = LOSS_RISE.checker()
check_vat_direction = VAT_DIRECTION.checker()

EXERCISES = (FGM_PERTURBATION, LOSS_RISE, VAT_DIRECTION)
