"""Chapter 23's exercises: logit distillation with its temperature, its large-temperature limit, MiniLM's attention
loss and value relation.

Solutions: :func:`logit_distillation_loss`, :func:`kd_limit`, :func:`minilm_attention_loss`, :func:`value_relation`.
Checkers: :func:`check_logit_distillation_loss`, :func:`check_kd_limit`, :func:`check_minilm_attention_loss`,
:func:`check_value_relation`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "logit_distillation_loss", "kd_limit", "minilm_attention_loss", "value_relation",
    "check_logit_distillation_loss", "check_kd_limit", "check_minilm_attention_loss", "check_value_relation",
    "LOGIT_DISTILLATION_LOSS", "KD_LIMIT", "MINILM_ATTENTION_LOSS", "VALUE_RELATION", "EXERCISES",
]


# ----------------------------------------------------------------------------- 1. logit distillation
def logit_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    r"""Hinton et al.'s ``tau² KL(softmax(z^T / tau) || softmax(z^S / tau))``, the mean over the batch.

    Shapes: ``student_logits``, ``teacher_logits`` ``(B, C)``, ``tau > 0`` -> a scalar tensor.
    """
    log_p = torch.log_softmax(teacher_logits / tau, dim=-1)  # (B, C), the teacher's softened targets
    log_q = torch.log_softmax(student_logits / tau, dim=-1)  # (B, C), the student's
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (B,): KL(p || q) per example
    return tau**2 * kl.mean()


def _kd_cases(g: torch.Generator) -> list[Case]:
    def logits(b: int, c: int, scale: float) -> Tensor:
        return scale * torch.randn(b, c, generator=g)

    return [
        Case((logits(4, 5, 2.0), logits(4, 5, 3.0), 2.0), label="logits (4, 5), tau 2"),
        Case((logits(3, 10, 1.0), logits(3, 10, 4.0), 4.0), label="logits (3, 10), tau 4"),
        Case((logits(6, 3, 2.0), logits(6, 3, 2.0), 1.0), label="logits (6, 3), tau 1"),
        Case((logits(1, 7, 1.0), logits(1, 7, 5.0), 0.5), label="one example (1, 7), tau 0.5"),
    ]


def _kd(log_p: Tensor, log_q: Tensor) -> Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


KD_MISTAKES = (
    Mistake("no_tau_squared", "the KL is not multiplied by tau²: the softened KL's gradient shrinks like 1/tau², "
            "so without the factor the distillation term fades as tau grows. Return `tau**2 * kl.mean()`.",
            lambda s, t, tau: _kd(F.log_softmax(t / tau, -1), F.log_softmax(s / tau, -1)).mean()),
    Mistake("tau_not_squared", "the KL is multiplied by tau, not tau²: the gradient of the softened KL "
            "scales like 1/tau², so the factor that restores it is tau².",
            lambda s, t, tau: tau * _kd(F.log_softmax(t / tau, -1), F.log_softmax(s / tau, -1)).mean()),
    Mistake("kl_reversed", "the KL runs the wrong way, KL(student || teacher): distillation weights the "
            "log-ratio by the *teacher's* probabilities, KL(p_T || p_S) = Σ p_T (log p_T − log p_S).",
            lambda s, t, tau: tau**2 * _kd(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1)).mean()),
    Mistake("teacher_not_softened", "only the student's logits are divided by tau: soften both, "
            "softmax(z^T / tau) and softmax(z^S / tau), so that the two distributions are comparable.",
            lambda s, t, tau: tau**2 * _kd(F.log_softmax(t, -1), F.log_softmax(s / tau, -1)).mean()),
    Mistake("sum_over_batch", "the KL is summed over the batch: take the mean over the examples, so that the "
            "loss does not grow with the batch size.",
            lambda s, t, tau: tau**2 * _kd(F.log_softmax(t / tau, -1), F.log_softmax(s / tau, -1)).sum()),
    Mistake("mean_over_classes", "the KL is averaged over the classes too (`F.kl_div(..., reduction='mean')`): "
            "the KL of one example is a *sum* over classes; average over the batch only "
            "(`reduction='batchmean'`).",
            lambda s, t, tau: tau**2 * _kd(F.log_softmax(t / tau, -1), F.log_softmax(s / tau, -1)).mean()
            / s.shape[-1]),
)

LOGIT_DISTILLATION_LOSS = Exercise(
    name="logit_distillation_loss",
    chapter=23,
    title="Logit distillation",
    solution=logit_distillation_loss,
    cases=_kd_cases,
    hint="Soften both logits by tau, take log_softmax of each, KL(teacher || student) per example, "
         "mean over the batch, times tau².",
    mistakes=KD_MISTAKES,
)


# ----------------------------------------------------------------------------- 2. the large-temperature limit
def kd_limit() -> float:
    r"""``lim_{tau -> inf} L_KD`` for ``z^T = (1, 0, -1)``, ``z^S = (0, 0, 0)``: ``(1 / 2C) Σ_c (z^S_c - z^T_c)²``.

    Both logit vectors have mean zero, so the chapter's limit applies: ``(1 / 6) (1 + 0 + 1) = 1/3``.
    """
    z_t = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    z_s = torch.zeros(3, dtype=torch.float64)
    classes = z_t.numel()
    return float(((z_s - z_t) ** 2).sum() / (2 * classes))


KD_LIMIT = Exercise(
    name="kd_limit",
    chapter=23,
    title="Distillation at a high temperature",
    solution=kd_limit,
    kind="value",
    atol=2e-3,
    rtol=1e-3,
    hint="Expand softmax(z / tau) ≈ (1 + z / tau) / C for a large tau, then the KL to second order.",
    mistakes=(
        Mistake("no_tau_squared", "that is the limit of the KL *without* the tau² factor, which vanishes like "
                "1/tau²; the factor tau² is what keeps a finite limit, (1/2C) Σ (z^S − z^T)².", lambda: 0.0),
        Mistake("half_squared_error", "that is (1/2) Σ (z^S − z^T)², missing the 1/C: each softened probability "
                "is about 1/C, which divides the limit by the number of classes C = 3.", lambda: 1.0),
        Mistake("mean_squared_error", "that is the mean squared error (1/C) Σ (z^S − z^T)²: the limit has a "
                "further factor 1/2, from the second-order term of the KL.", lambda: 2 / 3),
        Mistake("squared_error", "that is Σ (z^S − z^T)²: the limit is (1/2C) times it.", lambda: 2.0),
    ),
)


# ----------------------------------------------------------------------------- 3. MiniLM's attention loss
def minilm_attention_loss(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""MiniLM's ``L_AT``: ``KL(A^T_{a,t} || A^S_{a,t})`` per head ``a`` and query row ``t``, averaged.

    Shapes: ``student_attn``, ``teacher_attn`` ``(B, h, n, n)``, rows (over the keys, the last dim) sum to 1;
    ``mask (B, n)`` boolean, True = real token: padded query rows are left out of the mean, padded keys
    carry weight 0 in both (``0 log 0 = 0``). Returns a scalar tensor.
    """
    p, q = teacher_attn, student_attn
    log_p = torch.where(p > 0, p, torch.ones_like(p)).log()  # log 1 = 0 where p = 0: 0 log 0 = 0
    log_q = torch.where(p > 0, q, torch.ones_like(q)).log()
    kl = (p * (log_p - log_q)).sum(dim=-1)  # (B, h, n): one KL per head and query row
    if mask is None:
        return kl.mean()
    rows = mask[:, None, :].expand_as(kl)  # (B, h, n): True for a real query row
    return kl[rows].mean()


def _attention(g: torch.Generator, b: int, h: int, n: int, scale: float, mask: Tensor | None) -> Tensor:
    scores = scale * torch.randn(b, h, n, n, generator=g)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def _minilm_cases(g: torch.Generator) -> list[Case]:
    out = []
    for b, h, n, masked, label in [
        (2, 3, 5, False, "attention (2, 3, 5, 5), no mask"),
        (1, 1, 4, False, "attention (1, 1, 4, 4), one head"),
        (3, 2, 6, True, "attention (3, 2, 6, 6), key mask (3, 6) with padding"),
    ]:
        mask = None
        if masked:
            lengths = torch.tensor([6, 4, 2])
            mask = torch.arange(n)[None, :] < lengths[:, None]  # (B, n), True = real token
        student = _attention(g, b, h, n, 1.0, mask)
        teacher = _attention(g, b, h, n, 3.0, mask)
        out.append(Case((student, teacher) if mask is None else (student, teacher, mask), label=label))
    return out


def _row_kl(p: Tensor, q: Tensor) -> Tensor:
    return torch.where(p > 0, p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log()), 0.0).sum(-1)


def _masked_mean(kl: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return kl.mean()
    w = mask[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * w).sum() / w.sum()


MINILM_MISTAKES = (
    Mistake("kl_reversed", "the KL runs the wrong way, KL(student || teacher): MiniLM puts the teacher first, "
            "KL(A^T || A^S) = Σ_j A^T_j (log A^T_j − log A^S_j), so the student covers every key the teacher "
            "reads.", lambda s, t, mask=None: _masked_mean(_row_kl(s, t), mask)),
    Mistake("log_softmax_of_student", "the student's rows are already probabilities: `log_softmax` of them "
            "applies a softmax twice (`F.kl_div` wants log-probabilities, but of the attention itself). "
            "Take their plain `log`.",
            lambda s, t, mask=None: _masked_mean(torch.where(
                t > 0, t * (t.clamp_min(1e-30).log() - s.log_softmax(-1)), 0.0).sum(-1), mask)),
    Mistake("softmax_twice", "both rows go through a softmax again, as if they were scores: the attention "
            "rows are already distributions, so compare them as they are, Σ_j A^T_j (log A^T_j − log A^S_j).",
            lambda s, t, mask=None: _masked_mean(
                (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1), mask)),
    Mistake("mean_over_keys", "the KL is averaged over the keys too (`F.kl_div(..., reduction='mean')`), "
            "which divides it by n: a row's KL is a *sum* over its keys; average over heads and query rows "
            "only.", lambda s, t, mask=None: _masked_mean(_row_kl(t, s), mask) / s.shape[-1]),
    Mistake("sum_over_rows", "the row KLs are summed over heads and query rows (`reduction='batchmean'` "
            "divides by the batch only): MiniLM averages over the A_h heads and the |x| positions.",
            lambda s, t, mask=None: _masked_mean(_row_kl(t, s), mask) * s.shape[1] * s.shape[2]),
    Mistake("padded_rows_counted", "the padded query rows are counted in the mean: leave out the rows whose "
            "query is padding (`mask` False), and average over the real ones.",
            lambda s, t, mask=None: _row_kl(t, s).mean()),
    Mistake("zero_log_zero", "right on rows without zeros, but NaN where the attention is exactly 0 (the "
            "padded keys): 0 · log 0 must count as 0. Take the log only where the teacher's weight is "
            "positive (`torch.where(p > 0, ...)`).",
            lambda s, t, mask=None: _masked_mean((t * (t.log() - s.log())).sum(-1), mask)),
)

MINILM_ATTENTION_LOSS = Exercise(
    name="minilm_attention_loss",
    chapter=23,
    title="MiniLM's attention loss",
    solution=minilm_attention_loss,
    cases=_minilm_cases,
    hint="One KL per head and query row (a sum over the keys), then the mean over heads and real query rows.",
    mistakes=MINILM_MISTAKES,
)


# ----------------------------------------------------------------------------- 4. MiniLM's value relation
def value_relation(values: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""MiniLM's value relation ``VR = softmax(V Vᵀ / sqrt(d_k))`` of each head, rows over the keys.

    Shapes: ``values (B, h, n, d_k)``, ``mask (B, n)`` boolean (True = real token; padded keys get weight 0)
    -> ``(B, h, n, n)``, whatever ``d_k``: a teacher and a student of different widths give maps of one shape.
    """
    d_k = values.shape[-1]
    scores = values @ values.transpose(-1, -2) / d_k**0.5  # (B, h, n, n): every pair of tokens
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # padded keys
    return torch.softmax(scores, dim=-1)


def _vr_cases(g: torch.Generator) -> list[Case]:
    mask = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    return [
        Case((torch.randn(2, 3, 5, 8, generator=g),), label="values (2, 3, 5, 8), no mask"),
        Case((torch.randn(1, 2, 4, 16, generator=g),), label="values (1, 2, 4, 16), no mask"),
        Case((torch.randn(2, 2, 6, 4, generator=g), mask), label="values (2, 2, 6, 4), key mask (2, 6)"),
    ]


def _vr(values: Tensor, mask: Tensor | None, scale: float, dim: int = -1, use_mask: bool = True) -> Tensor:
    scores = values @ values.transpose(-1, -2) * scale
    if mask is not None and use_mask:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=dim)


VALUE_RELATION = Exercise(
    name="value_relation",
    chapter=23,
    title="MiniLM's value relation",
    solution=value_relation,
    cases=_vr_cases,
    grad=True,
    hint="Scaled dot products of every pair of value vectors, padded keys to -inf, softmax over the keys.",
    mistakes=(
        Mistake("features_not_tokens", "that is Vᵀ V, a d_k × d_k matrix over the features: the relation is "
                "between *tokens*, V Vᵀ (n × n), which is what lets a narrow student match a wide teacher.",
                lambda values, mask=None: torch.softmax(
                    values.transpose(-1, -2) @ values / values.shape[-1] ** 0.5, dim=-1)),
        Mistake("no_scale", "the dot products are not divided by √d_k: without it the softmax saturates as "
                "the head width grows.", lambda values, mask=None: _vr(values, mask, 1.0)),
        Mistake("scale_by_n", "the dot products are divided by √n (the number of tokens): the scale is √d_k, "
                "the width of the vectors being multiplied.",
                lambda values, mask=None: _vr(values, mask, values.shape[-2] ** -0.5)),
        Mistake("softmax_over_queries", "the softmax runs over dim -2: each row (one token's relation to all "
                "the others) must sum to one, so normalise over the last dimension.",
                lambda values, mask=None: _vr(values, mask, values.shape[-1] ** -0.5, dim=-2)),
        Mistake("mask_ignored", "the padded tokens still get weight: fill their columns with -inf before the "
                "softmax (`mask` True = real token).",
                lambda values, mask=None: _vr(values, mask, values.shape[-1] ** -0.5, use_mask=False)),
    ),
)

check_logit_distillation_loss = LOGIT_DISTILLATION_LOSS.checker()
check_kd_limit = KD_LIMIT.checker()
check_minilm_attention_loss = MINILM_ATTENTION_LOSS.checker()
check_value_relation = VALUE_RELATION.checker()

EXERCISES = (LOGIT_DISTILLATION_LOSS, KD_LIMIT, MINILM_ATTENTION_LOSS, VALUE_RELATION)
