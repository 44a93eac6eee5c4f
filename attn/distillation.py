r"""Chapter 23 -- Attention distillation: a small student learns from a teacher's attention, not only from its labels.

**MiniLM** (Wang et al. 2020) transfers the teacher's *last-layer*
self-attention distributions and value relations. For head ``a`` with
attention rows ``A_{a,t} = softmax(q_t K^T / sqrt(d_k))`` and value relation
``VR_a = softmax(V_a V_a^T / sqrt(d_k))`` (each ``(n, n)``, ``d_k`` the head
width of *that* model, so teacher and student widths may differ; the number
of heads must match):

.. math::

    L_{\text{AT}} = \frac{1}{A_h\, |x|} \sum_{a=1}^{A_h} \sum_{t=1}^{|x|}
        \operatorname{KL}\big(A^T_{a,t} \,\|\, A^S_{a,t}\big), \qquad
    L_{\text{VR}} = \frac{1}{A_h\, |x|} \sum_{a,t} \operatorname{KL}\big(VR^T_{a,t} \,\|\, VR^S_{a,t}\big).

**TinyBERT** (Jiao et al. 2020) fits the *unnormalised* attention scores with
a mean squared error, and the hidden states through a learned projection
``W_h`` ``(d_S, d_T)``:

.. math::

    L_{\text{attn}} = \frac{1}{h} \sum_{i=1}^{h} \operatorname{MSE}(A_i^S, A_i^T), \qquad
    L_{\text{hidn}} = \operatorname{MSE}(H^S W_h, H^T).

**Logit distillation** (Hinton et al. 2015), the baseline every attention
loss must beat: the KL divergence between the teacher's and the student's
output distributions (logits ``z^T``, ``z^S``) softened by a temperature
``tau``, scaled by ``tau^2`` so that its gradients keep their size as ``tau`` grows:

.. math::

    L_{\text{KD}} = \tau^2\, \operatorname{KL}\big(\operatorname{softmax}(z^T / \tau) \,\|\,
        \operatorname{softmax}(z^S / \tau)\big).

**Attention transfer** for CNNs (Zagoruyko & Komodakis 2017): the attention
map of activations ``a`` ``(B, C, H, W)`` is the channel-wise activation energy
``Q = sum_c |a_c|^p`` (``p = 2``), flattened to ``(B, HW)`` and L2-normalised;
the loss between a student and a teacher layer of the same spatial size is

.. math::

    L_{\text{AT-CNN}} = \Big\lVert \frac{Q_S}{\lVert Q_S \rVert_2} - \frac{Q_T}{\lVert Q_T \rVert_2} \Big\rVert_2
    \quad\text{(mean over the batch; the paper weights it by } \beta / 2\text{)}.

What is distilled comes from :class:`RecordingAttention`, multi-head
self-attention (:class:`~attn.attention.AttentionBase`, the sdpa kernel) that
keeps, on every call, its scores ``(B, h, n, n)``, its attention ``(B, h, n, n)``
and its values ``(B, h, n, d_h)``. This module holds the mechanism: those
losses and the recorder. The chapter's experiment -- small post-LN Transformer
encoders on associative recall built from :class:`~attn.models.TransformerBlock`
around the recorder, the teacher-student pair ``Distiller`` and its loss, the
comparison's own task -- is in :mod:`attn.experiments.distillation`.

Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
Compression of Pre-Trained Transformers", NeurIPS 2020. Jiao et al.,
"TinyBERT: Distilling BERT for Natural Language Understanding", Findings of
EMNLP 2020. Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionBase
from .checks import check_tensor, check_tokens
from .core import AttentionOutput, build_mask, masked_softmax
from .registry import register

__all__ = [
    "AttentionRecord", "RecordingAttention",
    "minilm_attention_loss", "value_relation", "minilm_value_loss", "tinybert_attention_loss",
    "tinybert_hidden_loss", "activation_attention", "attention_transfer_loss", "logit_distillation_loss",
]


# ----------------------------------------------------------------------------- checks


def _check_maps(name_s: str, s: object, name_t: str, t: object) -> tuple[Tensor, Tensor]:
    """Two ``(B, h, n, n)`` tensors of the same shape."""
    s = check_tensor(s, name_s, "(batch, heads, n, n)", 4)
    t = check_tensor(t, name_t, "(batch, heads, n, n)", 4)
    if s.shape[-1] != s.shape[-2]:
        raise ValueError(f"{name_s} must have shape (batch, heads, n, n), got {tuple(s.shape)}")
    if s.shape != t.shape:
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"{name_s} and {name_t} must have the same number of heads (MiniLM and TinyBERT pair heads one to one), "
                             f"got {s.shape[1]} and {t.shape[1]}")
        raise ValueError(f"{name_s} and {name_t} must have the same shape (batch, heads, n, n), got {tuple(s.shape)} and {tuple(t.shape)}")
    return s, t


def _check_mask(mask: Tensor | None, batch: int, n: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a torch.bool tensor of shape (batch, n) (True = real token), got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != (batch, n):
        raise ValueError(f"mask must have shape (batch={batch}, n={n}), got {tuple(mask.shape)}")


def _row_kl(p: Tensor, q: Tensor) -> Tensor:
    """``KL(p || q)`` along the last dim with ``0 log 0 = 0``: ``(..., n) -> (...)``."""
    logp = torch.where(p > 0, p.clamp_min(1e-30).log(), torch.zeros_like(p))
    logq = q.clamp_min(1e-30).log()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _mean_rows(per_row: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``(B, h, n)`` per-row values over heads and real query rows."""
    if per_row.numel() == 0:
        return per_row.sum()
    if mask is None:
        return per_row.mean()
    w = mask[:, None, :].to(per_row.dtype).expand_as(per_row)
    return (per_row * w).sum() / w.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------- the losses


def minilm_attention_loss(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""MiniLM's ``L_AT``: ``KL(A^T || A^S)`` per head and query row, averaged over heads and real rows.

    Args:
        student_attn, teacher_attn: attention distributions ``(B, h, n, n)`` (rows sum to 1).
        mask: ``(B, n)`` boolean, ``True`` = real token; padded query rows are left out.
    """
    s, t = _check_maps("student_attn", student_attn, "teacher_attn", teacher_attn)
    _check_mask(mask, s.shape[0], s.shape[-1])
    return _mean_rows(_row_kl(t, s), mask)


def value_relation(values: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""MiniLM's value relation ``softmax(V V^T / sqrt(d_k))``: ``(B, h, n, d_k) -> (B, h, n, n)``; padded keys get 0."""
    v = check_tensor(values, "values", "(batch, heads, n, d_k)", 4)
    _check_mask(mask, v.shape[0], v.shape[2])
    scores = v @ v.transpose(-1, -2) / math.sqrt(v.shape[-1])
    return masked_softmax(scores, None if mask is None else mask[:, None, None, :])


def minilm_value_loss(student_values: Tensor, teacher_values: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""MiniLM's ``L_VR``: ``KL(VR^T || VR^S)``; the head widths ``d_k`` of the two may differ (``(B, h, n, d)`` each)."""
    s = check_tensor(student_values, "student_values", "(batch, heads, n, d_k)", 4)
    t = check_tensor(teacher_values, "teacher_values", "(batch, heads, n, d_k)", 4)
    if s.shape[:3] != t.shape[:3]:
        raise ValueError(f"student_values and teacher_values must share (batch, heads, n), got {tuple(s.shape[:3])} and {tuple(t.shape[:3])}")
    return minilm_attention_loss(value_relation(s, mask), value_relation(t, mask), mask)


def tinybert_attention_loss(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""TinyBERT's ``L_attn``: MSE between the *unnormalised* scores ``(B, h, n, n)``, averaged over heads.

    Entries at padded keys (``mask`` ``(B, n)``, ``True`` = real) are set to 0 in
    both before the error is taken, as the TinyBERT code does with its masked scores.
    """
    s, t = _check_maps("student_scores", student_scores, "teacher_scores", teacher_scores)
    _check_mask(mask, s.shape[0], s.shape[-1])
    if s.numel() == 0:
        return s.sum()
    if mask is not None:
        keep = mask[:, None, None, :]
        s, t = s.masked_fill(~keep, 0.0), t.masked_fill(~keep, 0.0)
    return F.mse_loss(s, t)


def tinybert_hidden_loss(student_hidden: Tensor, teacher_hidden: Tensor, projection: nn.Module) -> Tensor:
    r"""TinyBERT's ``L_hidn = MSE(H^S W_h, H^T)``: ``(B, n, d_S)``, ``(B, n, d_T)``, ``W_h`` a learned ``d_S -> d_T`` map."""
    s = check_tokens(student_hidden, None, "student_hidden")
    t = check_tokens(teacher_hidden, None, "teacher_hidden")
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(f"student_hidden and teacher_hidden must share (batch, n), got {tuple(s.shape[:2])} and {tuple(t.shape[:2])}")
    projected = projection(s)
    if projected.shape != t.shape:
        raise ValueError(f"projection must map width {s.shape[-1]} to the teacher's {t.shape[-1]}, got output {tuple(projected.shape)}")
    if t.numel() == 0:
        return projected.sum()
    return F.mse_loss(projected, t)


def logit_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    r"""Hinton et al.'s soft-target loss ``tau^2 KL(softmax(z^T/tau) || softmax(z^S/tau))``, mean over the batch.

    Args:
        student_logits, teacher_logits: ``(B, C)`` class logits (the widths of the two models may differ,
            the classes may not).
        temperature: ``tau > 0``; ``tau = 1`` compares the plain output distributions, a larger ``tau`` gives
            the small probabilities of the wrong classes (the "dark knowledge") more weight.

    The ``tau^2`` factor keeps the gradient's scale independent of ``tau``: for large ``tau`` and zero-mean
    logits, ``L_KD -> (1 / 2C) sum_c (z^S_c - z^T_c)^2`` (Hinton et al. 2015, section 2.1), logit matching.
    """
    s = check_tensor(student_logits, "student_logits", "(batch, classes)", 2)
    t = check_tensor(teacher_logits, "teacher_logits", "(batch, classes)", 2)
    if s.shape != t.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape (batch, classes), got {tuple(s.shape)} and {tuple(t.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if s.shape[0] == 0:
        return s.sum()
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B,)
    return temperature**2 * kl.mean()


def activation_attention(activations: Tensor, p: float = 2.0) -> Tensor:
    r"""Zagoruyko & Komodakis' attention map ``Q = sum_c |a_c|^p``, flattened and L2-normalised: ``(B, C, H, W) -> (B, H*W)``."""
    a = check_tensor(activations, "activations", "(batch, channels, height, width)", 4)
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    q = a.abs().pow(p).sum(1).flatten(1)  # (B, H*W)
    return q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)


def attention_transfer_loss(student_activations: Tensor, teacher_activations: Tensor, p: float = 2.0) -> Tensor:
    r"""``|| Q_S/||Q_S|| - Q_T/||Q_T|| ||_2``, mean over the batch; channel counts may differ, ``(H, W)`` must match."""
    s = check_tensor(student_activations, "student_activations", "(batch, channels, height, width)", 4)
    t = check_tensor(teacher_activations, "teacher_activations", "(batch, channels, height, width)", 4)
    if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise ValueError(f"student and teacher activations must share batch and (height, width), got {tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[0] == 0:
        return s.sum()
    return (activation_attention(s, p) - activation_attention(t, p)).norm(dim=1).mean()


# ----------------------------------------------------------------------------- the attention that exposes what is distilled


class AttentionRecord(NamedTuple):
    """What one attention call computed: ``scores`` ``q k^T / sqrt(d_h)`` (unmasked) and ``attn`` ``(B, h, L, S)``,
    ``values`` ``(B, h, S, d_h)``."""

    scores: Tensor
    attn: Tensor
    values: Tensor


class RecordingAttention(AttentionBase):
    r"""Multi-head self-attention that keeps its scores, weights and values: what MiniLM and TinyBERT distil.

    ``softmax(q k^T / sqrt(d_h)) v`` per head, on the projections of
    :class:`~attn.attention.AttentionBase` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``: its state dict is
    :class:`~attn.multihead.MultiHeadAttention`'s); only :meth:`attend` differs: it writes out the sdpa
    kernel's weights path and keeps the scores ``q k^T / sqrt(d_h)`` ``(B, h, n, n)``, the weights
    ``(B, h, n, n)`` and the values ``(B, h, n, d_h)`` of the call in :attr:`last` (an
    :class:`AttentionRecord`; tensors in the autograd graph, so that a student's distillation loss reaches its
    parameters).

    ``forward(x (B, n, E), *, key_mask (B, n), is_causal, need_weights)`` -> ``AttentionOutput((B, n, E),
    (B, h, n, n) | None)``; ``record(x, *, key_mask)`` -> ``(output, AttentionRecord)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True,
                 causal: bool = False) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, causal=causal)
        self.last: AttentionRecord | None = None

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
        """The sdpa kernel's weights path, written out to keep ``(scores, weights, values)`` in :attr:`last`.

        ``scores = q k^T * scale`` ``(B, h, L, S)`` (unmasked: what TinyBERT fits), ``weights`` their softmax
        over the keys each query may see (``key_mask``, ``is_causal``; :meth:`forward` passes no ``attn_mask``,
        a boolean one is honoured), ``out = weights v``; the scores are formed once.
        """
        scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, h, L, S)
        weights = masked_softmax(scores, build_mask(q, k, attn_mask, key_mask, is_causal))
        out = torch.matmul(F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights, v)  # (B, h, L, d_h)
        self.last = AttentionRecord(scores, weights, v)
        return AttentionOutput(out, weights if need_weights else None)

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        x = check_tokens(x, self.embed_dim, "x")  # the input is named x here (mix's checks say "query")
        return self.mix(x, x, x, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights)

    def record(self, x: Tensor, *, key_mask: Tensor | None = None) -> tuple[Tensor, AttentionRecord]:
        """``(output (B, n, E), AttentionRecord)`` of one call."""
        out = self(x, key_mask=key_mask).output
        assert self.last is not None  # set by attend
        return out, self.last


# ----------------------------------------------------------------------------- registry
# The comparison measures both on their own task (attn.experiments.distillation.OWN_TASKS): a small student
# of a larger teacher on associative recall. The registered class is the layer whose maps are distilled.

register(
    "minilm_distillation", paper="Wang et al. 2020", complexity="O(n^2 h) extra per step (teacher forward + KL)",
    chapter=23, data="recall", summary="student trained on KL to the teacher's last-layer attention and value relations",
)(RecordingAttention)
register(
    "tinybert_distillation", paper="Jiao et al. 2020", complexity="O(n^2 h + n d_S d_T) extra per step",
    chapter=23, data="recall", summary="student trained on MSE to the teacher's attention scores and projected hidden states",
)(RecordingAttention)
