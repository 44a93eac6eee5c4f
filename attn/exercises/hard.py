"""Chapter 21's exercises: the REINFORCE surrogate with a baseline, the straight-through Gumbel-softmax, and
which gradient estimators are biased.

Solutions: :func:`reinforce_surrogate`, :func:`straight_through_gumbel`, :func:`biased_estimators`. Checkers:
:func:`check_reinforce_surrogate`, :func:`check_straight_through_gumbel`, :func:`check_biased_estimators`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ._core import Case, Exercise, Mistake, letter_set

__all__ = [
    "reinforce_surrogate", "straight_through_gumbel", "biased_estimators",
    "check_reinforce_surrogate", "check_straight_through_gumbel", "check_biased_estimators",
    "REINFORCE_SURROGATE", "STRAIGHT_THROUGH_GUMBEL", "BIASED_ESTIMATORS", "EXERCISES",
]


# -- 1. REINFORCE ------------------------------------------------------------------------------------------
def reinforce_surrogate(scores: Tensor, z: Tensor, loss: Tensor, baseline: float) -> Tensor:
    r"""The REINFORCE surrogate :math:`\tilde L = \ell(z) + \operatorname{sg}[\ell(z) - b]\, \log p_z`, averaged
    over the batch; its gradient is the one-sample estimate of :math:`\nabla \mathbb{E}_z[\ell(z)]`.

    Shapes: ``scores (B, n)`` (``p = softmax(scores)``), ``z (B,)`` the sampled keys (int64), ``loss (B,)`` the
    loss ``l(z)`` of what each example read, ``baseline`` a number -> a scalar.
    """
    log_p = torch.log_softmax(scores, dim=-1)  # (B, n)
    log_p_z = log_p.gather(-1, z[:, None])[:, 0]  # (B,): log p of the key that was actually picked
    advantage = (loss - baseline).detach()  # sg[l(z) - b]: a weight, not something to differentiate
    return (loss + advantage * log_p_z).mean()


def _reinforce_cases(g: torch.Generator) -> list[Case]:
    def draw(b: int, n: int, baseline: float) -> tuple[Tensor, Tensor, Tensor, float]:
        scores = 2 * torch.randn(b, n, generator=g)
        z = (scores.argmax(-1) + 1 + torch.randint(0, max(n - 1, 1), (b,), generator=g)) % n  # never the argmax
        if n == 1:
            z = torch.zeros(b, dtype=torch.long)
        return scores, z, torch.rand(b, generator=g) * 2, baseline

    return [
        Case(draw(4, 5, 0.7), label="scores (4, 5), z (4,), loss (4,), baseline 0.7"),
        Case(draw(6, 8, 1.5), label="scores (6, 8), z (6,), loss (6,), baseline 1.5 (above most losses)"),
        Case(draw(3, 3, 0.0), label="scores (3, 3), z (3,), loss (3,), baseline 0"),
        Case(draw(2, 1, 0.4), label="scores (2, 1): one key, log p = 0; baseline 0.4"),
    ]


def _surrogate(scores: Tensor, z: Tensor, loss: Tensor, baseline: float, *, sign: float = 1.0,
               use_baseline: bool = True, detach: bool = True, pick: str = "z", log: bool = True,
               pathwise: bool = True, reduce: str = "mean") -> Tensor:
    p = torch.log_softmax(scores, -1) if log else torch.softmax(scores, -1)
    index = z if pick == "z" else scores.argmax(-1)
    chosen = p.gather(-1, index[:, None])[:, 0]
    adv = loss - (baseline if use_baseline else 0.0)
    adv = adv.detach() if detach else adv
    total = (loss if pathwise else 0.0) + sign * adv * chosen
    return total.mean() if reduce == "mean" else total.sum()


REINFORCE_SURROGATE = Exercise(
    name="reinforce_surrogate",
    chapter=21,
    title="The REINFORCE surrogate",
    solution=reinforce_surrogate,
    cases=_reinforce_cases,
    grad=True,
    hint="log p of the sampled key z (log_softmax, then gather), times the detached advantage l(z) - b, plus l(z); "
         "then the mean over the batch.",
    mistakes=(
        Mistake("no_baseline", "the baseline is not subtracted: the weight of `log p_z` must be `l(z) - b`. "
                "Without `b` the estimate stays unbiased but its variance is much larger (every pick is pushed "
                "up, by how much depends on the loss's offset).",
                lambda s, z, loss, b: _surrogate(s, z, loss, b, use_baseline=False)),
        Mistake("wrong_sign", "the score-function term has the wrong sign: gradient descent on "
                "`l(z) - sg[l(z) - b] log p_z` makes picks with a *high* loss more likely. Add the term: "
                "`+ (l(z) - b).detach() * log p_z`.",
                lambda s, z, loss, b: _surrogate(s, z, loss, b, sign=-1.0)),
        Mistake("log_prob_of_argmax", "the log-probability is that of the most probable key (`argmax`), not of "
                "the key `z` that was sampled and read: gather `log p` at `z`.",
                lambda s, z, loss, b: _surrogate(s, z, loss, b, pick="argmax")),
        Mistake("advantage_not_detached", "the advantage `l(z) - b` is not detached, so the gradient also flows "
                "through it into `loss` (twice the pathwise term, plus `log p_z`'s share): wrap it in "
                "`.detach()`: it is a weight, not part of the objective.",
                lambda s, z, loss, b: _surrogate(s, z, loss, b, detach=False)),
        Mistake("prob_not_log_prob", "the advantage multiplies `p_z`, not `log p_z`: the score function is "
                "`∇ log p_z = ∇p_z / p_z`; use `log_softmax`.",
                lambda s, z, loss, b: _surrogate(s, z, loss, b, log=False)),
        Mistake("no_pathwise_term", "the surrogate has no `l(z)` term: the loss can depend on the parameters "
                "along other paths too (the values read, the layers after), and that gradient is lost. Add "
                "`loss` itself.",
                lambda s, z, loss, b: _surrogate(s, z, loss, b, pathwise=False)),
        Mistake("sum_not_mean", "the surrogate is summed over the batch, not averaged: its gradient grows with "
                "the batch size. Use `.mean()`.",
                lambda s, z, loss, b: _surrogate(s, z, loss, b, reduce="sum")),
    ),
)


# -- 2. straight-through Gumbel-softmax --------------------------------------------------------------------
def straight_through_gumbel(scores: Tensor, g: Tensor, tau: float) -> Tensor:
    r"""Straight-through Gumbel-softmax: forward the one-hot pick, backward the gradient of
    :math:`y = \operatorname{softmax}((s + g) / \tau)`: :math:`y_{st} = h - \operatorname{sg}[y] + y`.

    Shapes: ``scores (..., n)``, Gumbel noise ``g (..., n)`` (given, so the result is deterministic),
    ``tau > 0`` -> ``(..., n)``, one-hot in value.
    """
    y = torch.softmax((scores + g) / tau, dim=-1)  # the relaxed sample: differentiable in the scores
    h = F.one_hot(y.argmax(-1), scores.shape[-1]).to(y.dtype)  # the hard pick: argmax of s + g
    return h - y.detach() + y  # value h, gradient dy/ds


def _st_cases(g: torch.Generator) -> list[Case]:
    def draw(*shape: int, tau: float) -> tuple[Tensor, Tensor, float]:
        u = torch.rand(*shape, generator=g).clamp(1e-6, 1 - 1e-6)
        return torch.randn(*shape, generator=g), -torch.log(-torch.log(u)), tau

    return [
        Case(draw(4, 6, tau=1.0), label="scores (4, 6), g (4, 6), tau 1"),
        Case(draw(2, 3, 5, tau=0.5), label="scores (2, 3, 5), g (2, 3, 5), tau 0.5"),
        Case(draw(5, 4, tau=2.0), label="scores (5, 4), g (5, 4), tau 2"),
    ]


def _st(s: Tensor, g: Tensor, tau: float, *, pick_from: str = "y", relax_tau: bool = True,
        forward: str = "hard", sign: float = 1.0) -> Tensor:
    y = torch.softmax((s + g) / tau if relax_tau else s + g, -1)
    base = s if pick_from == "scores" else s + g
    h = F.one_hot(base.argmax(-1), s.shape[-1]).to(y.dtype)
    if forward == "soft":
        return y
    if forward == "detached":
        return h
    return h + sign * (y - y.detach())


STRAIGHT_THROUGH_GUMBEL = Exercise(
    name="straight_through_gumbel",
    chapter=21,
    title="Straight-through Gumbel-softmax",
    solution=straight_through_gumbel,
    cases=_st_cases,
    grad=True,
    hint="y = softmax((scores + g) / tau); h = one_hot(argmax y); return h - y.detach() + y.",
    mistakes=(
        Mistake("no_straight_through", "the forward value is the relaxed `y`, not a one-hot pick: that is the "
                "plain Gumbel-softmax (soft in the forward pass). The straight-through estimator returns "
                "`h - y.detach() + y`, whose value is the one-hot `h`.",
                lambda s, g, tau: _st(s, g, tau, forward="soft")),
        Mistake("noise_ignored_in_pick", "the pick is the argmax of the scores alone, so it is always the most "
                "probable key: the Gumbel noise is what makes `argmax(s + g)` a *sample* of `p`.",
                lambda s, g, tau: _st(s, g, tau, pick_from="scores")),
        Mistake("tau_ignored", "the temperature is not used: the relaxed sample is `softmax((s + g) / tau)`; "
                "the forward value is unchanged but the gradient scales with `1 / tau`.",
                lambda s, g, tau: _st(s, g, tau, relax_tau=False)),
        Mistake("reversed_trick", "the trick is written the wrong way round (`h + y.detach() - y`): the value "
                "is right but the gradient has the opposite sign. It is `h - y.detach() + y`.",
                lambda s, g, tau: _st(s, g, tau, sign=-1.0)),
        Mistake("no_gradient", "the one-hot pick alone has no gradient: `argmax` and `one_hot` are flat. Add "
                "`y - y.detach()`, which is zero in value but carries `y`'s gradient.",
                lambda s, g, tau: _st(s, g, tau, forward="detached")),
    ),
)


# -- 3. which estimators are biased ------------------------------------------------------------------------
@functools.cache
def biased_estimators() -> str:
    """The letters of the biased estimators of ``∇_s E_{z~p}[l(z)]``, measured on 3 keys with fixed losses:
    (a) REINFORCE with a constant (moving-average) baseline, (b) REINFORCE without a baseline, (c) straight-through
    Gumbel-softmax at tau = 1, (d) REINFORCE with a leave-one-out baseline over K = 4 picks. Answer ``"c"``.
    """
    gen = torch.Generator().manual_seed(0)
    s = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64)
    losses = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)  # l(j): the loss of reading key j
    p = s.softmax(0)
    exact = p * (losses - p @ losses)  # ∇_s sum_j p_j l(j)
    draws, n = 100_000, 3

    def picks(count: int) -> Tensor:
        return torch.multinomial(p, count, replacement=True, generator=gen)

    def reinforce(baseline: float) -> Tensor:
        z = picks(draws)
        return (losses[z] - baseline)[:, None] * (F.one_hot(z, n) - p)  # (l(z) - b) ∇_s log p_z

    def straight_through(tau: float) -> Tensor:
        u = torch.rand(draws, n, generator=gen, dtype=torch.float64)
        y = ((s + -torch.log(-torch.log(u))) / tau).softmax(-1)  # forward: l(argmax y); backward through y
        return y * (losses - (y @ losses)[:, None]) / tau  # ∇_s (y · l), (draws, n)

    def leave_one_out(k: int) -> Tensor:
        z = picks(draws * k).reshape(draws, k)
        loss = losses[z]
        advantage = loss - (loss.sum(1, keepdim=True) - loss) / (k - 1)
        return (advantage[..., None] * (F.one_hot(z, n) - p)).mean(1)

    estimates = {"a": reinforce(1.0), "b": reinforce(0.0), "c": straight_through(1.0), "d": leave_one_out(4)}
    found = ""
    for letter, est in estimates.items():
        error = (est.mean(0) - exact).abs()
        standard_error = est.std(0) / draws**0.5
        if bool((error > 6 * standard_error + 1e-12).any()):  # far outside what sampling noise explains
            found += letter
    return found



BIASED_ESTIMATORS = Exercise(
    name="biased_estimators",
    chapter=21,
    title="Which estimators are biased?",
    solution=biased_estimators,
    kind="value",
    compare=letter_set("abcd", "estimators"),
    hint="An estimator is unbiased when its mean over many samples is the exact gradient of the expected loss.",
    mistakes=(
        Mistake("no_baseline_biased", "(b) is unbiased: any baseline that does not depend on the pick may be "
                "subtracted, including none, because E[∇ log p_z] = 0. The baseline changes the variance, not "
                "the mean.", lambda: "bc"),
        Mistake("moving_average_biased", "(a) is unbiased: a moving average of *past* losses does not depend "
                "on the current pick z, so subtracting it leaves the expectation unchanged.", lambda: "ac"),
        Mistake("leave_one_out_biased", "(d) is unbiased: pick k's baseline is the mean loss of the *other* "
                "picks, independent of z_k, so each term keeps its expectation.", lambda: "cd"),
        Mistake("reinforce_biased", "REINFORCE is unbiased, with or without a baseline (a, b, d); the biased "
                "one is (c): straight-through backpropagates the gradient of the relaxed softmax, not of the "
                "expected loss.", lambda: "abd"),
        Mistake("none_biased", "(c) is biased: straight-through Gumbel-softmax computes the gradient of a "
                "*different* function, the relaxed `softmax((s + g) / tau)`, whatever the number of samples.",
                lambda: ""),
    ),
)

check_reinforce_surrogate = REINFORCE_SURROGATE.checker()
check_straight_through_gumbel = STRAIGHT_THROUGH_GUMBEL.checker()
check_biased_estimators = BIASED_ESTIMATORS.checker()

EXERCISES = (REINFORCE_SURROGATE, STRAIGHT_THROUGH_GUMBEL, BIASED_ESTIMATORS)
