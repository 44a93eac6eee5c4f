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

**Attention transfer** for CNNs (Zagoruyko & Komodakis 2017): the attention
map of activations ``a`` ``(B, C, H, W)`` is the channel-wise activation energy
``Q = sum_c |a_c|^p`` (``p = 2``), flattened to ``(B, HW)`` and L2-normalised;
the loss between a student and a teacher layer of the same spatial size is

.. math::

    L_{\text{AT-CNN}} = \Big\lVert \frac{Q_S}{\lVert Q_S \rVert_2} - \frac{Q_T}{\lVert Q_T \rVert_2} \Big\rVert_2
    \quad\text{(mean over the batch; the paper weights it by } \beta / 2\text{)}.

The models of this chapter, :class:`RecallTransformer`, are small post-LN
Transformer encoders on :class:`~attn.tasks.AssociativeRecall` (one token per
key-value pair plus the query, as :class:`~attn.models.RecallTokens` embeds
them) that record, per layer, the scores ``(B, h, n, n)``, the attention
``(B, h, n, n)``, the values ``(B, h, n, d_h)`` and the hidden states ``(B, n, E)``.
:class:`Distiller` pairs a frozen teacher with a student and trains the
student on ``cross-entropy + weight * distillation``.

Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
Compression of Pre-Trained Transformers", NeurIPS 2020. Jiao et al.,
"TinyBERT: Distilling BERT for Natural Language Understanding", Findings of
EMNLP 2020. Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .checks import check_positive_float, check_tensor, check_token_ids, check_tokens
from .core import AttentionOutput, masked_softmax
from .models import RecallTokens
from .registry import OwnTask, register
from .tasks import AssociativeRecall

__all__ = [
    "LayerRecord", "RecordingAttention", "RecallTransformer", "Distiller", "Kind",
    "minilm_attention_loss", "value_relation", "minilm_value_loss", "tinybert_attention_loss",
    "tinybert_hidden_loss", "activation_attention", "attention_transfer_loss", "distillation_loss", "make_task",
]

Kind = Literal["none", "minilm", "tinybert"]
_KINDS = ("none", "minilm", "tinybert")


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


# ----------------------------------------------------------------------------- models that expose what is distilled


@dataclass
class LayerRecord:
    """What one attention layer computed: ``scores``, ``attn`` ``(B, h, n, n)``, ``values`` ``(B, h, n, d_h)``, ``hidden`` ``(B, n, E)`` (the block's output)."""

    scores: Tensor
    attn: Tensor
    values: Tensor
    hidden: Tensor


class RecordingAttention(nn.Module):
    """Multi-head self-attention that can also return its scores, weights and values.

    ``forward(x (B, n, E), key_mask (B, n), need_weights)`` -> ``AttentionOutput(
    (B, n, E), (B, h, n, n) | None)``; ``record(x, key_mask)`` -> ``(output, scores,
    weights, values)``, the quantities MiniLM and TinyBERT distil.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def record(self, x: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = check_tokens(x, self.embed_dim)
        _check_mask(key_mask, x.shape[0], x.shape[1])
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, n, n)
        attn = masked_softmax(scores, None if key_mask is None else key_mask[:, None, None, :])
        out = self.out_proj(rearrange(attn @ v, "b h n d -> b n (h d)"))  # (B, n, E)
        return out, scores, attn, v

    def forward(self, x: Tensor, key_mask: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        out, _, attn, _ = self.record(x, key_mask)
        return AttentionOutput(out, attn if need_weights else None)


class _Block(nn.Module):
    """Post-LN Transformer block: ``h = LN(x + Attn(x))``, ``y = LN(h + FFN(h))``."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.attn = RecordingAttention(embed_dim, num_heads)
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(nn.Linear(embed_dim, ffn_mult * embed_dim), nn.GELU(), nn.Linear(ffn_mult * embed_dim, embed_dim))

    def forward(self, x: Tensor) -> LayerRecord:
        out, scores, attn, v = self.attn.record(x)
        h = self.norm1(x + out)
        return LayerRecord(scores, attn, v, self.norm2(h + self.ffn(h)))


class RecallTransformer(nn.Module):
    """A small Transformer encoder on :class:`~attn.tasks.AssociativeRecall` that records every layer.

    Tokens: one per key-value pair plus the query (:class:`~attn.models.RecallTokens`),
    ``n = n_pairs + 1``. The value is read off the query token's final hidden state.

    Args:
        task: the recall task.
        embed_dim: width ``E`` (teacher and student may differ).
        num_heads: heads ``h`` (MiniLM and TinyBERT pair the heads of teacher and student: keep ``h`` equal).
        num_layers: blocks.
        ffn_mult: feed-forward width is ``ffn_mult * E``.

    ``forward(x (B, 2 n_pairs + 1) long)`` -> ``(logits (B, n_values), [LayerRecord per layer])``.
    """

    def __init__(self, task: AssociativeRecall, embed_dim: int = 64, num_heads: int = 4, num_layers: int = 1, ffn_mult: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.task = task
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.tokens = RecallTokens(task, embed_dim)
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, ffn_mult) for _ in range(num_layers))
        self.head = nn.Linear(embed_dim, task.n_values)

    def forward(self, x: Tensor) -> tuple[Tensor, list[LayerRecord]]:
        x = _check_recall_tokens(x, self.task)
        h = self.tokens(x)  # (B, n, E); checks the shape
        records = []
        for block in self.blocks:
            rec = block(h)
            records.append(rec)
            h = rec.hidden
        return self.head(h[:, -1]), records


class Distiller(nn.Module):
    """A frozen teacher and a student trained on ``CE + weight * distillation`` of ``kind``.

    ``kind``: ``"none"`` (the student alone, the baseline), ``"minilm"``
    (``L_AT + L_VR`` on the last layers) or ``"tinybert"`` (``L_attn`` on the
    last layers + ``L_hidn`` on the last hidden states through the learned
    projection ``W_h``, which is part of this module's trainable parameters).
    ``forward(x)`` gives the student's logits; the teacher's parameters are frozen.
    """

    def __init__(self, student: RecallTransformer, teacher: RecallTransformer, kind: Kind = "minilm", weight: float = 1.0) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if kind != "none" and student.num_heads != teacher.num_heads:
            raise ValueError(f"{kind} pairs heads one to one: student has {student.num_heads} heads, teacher {teacher.num_heads}")
        weight = check_positive_float("weight", weight, allow_zero=True)
        self.student, self.kind, self.weight = student, kind, weight
        self.teacher = teacher.eval().requires_grad_(False)
        self.projection = nn.Linear(student.embed_dim, teacher.embed_dim, bias=False) if kind == "tinybert" else None  # W_h

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)[0]


def _check_recall_tokens(x: object, task: AssociativeRecall) -> Tensor:
    """``x`` ``(B, 2 n_pairs + 1)``: keys (ids ``[0, n_keys)``) at even positions, values (``[n_keys, vocab)``) at odd ones."""
    x = check_token_ids(x, task.vocab, "x", ndim=None)
    if x.ndim != 2 or x.shape[1] != task.length:
        raise ValueError(f"x must have shape (batch, {task.length}) (token ids), got {tuple(x.shape)}")
    if x.numel():
        keys, values = x[:, 0::2], x[:, 1::2]  # k1 k2 ... q and v1 v2 ...
        if int(keys.max()) >= task.n_keys:
            raise ValueError(f"x must hold key ids in [0, {task.n_keys}) at even positions, got {int(keys.max())}")
        if int(values.min()) < task.n_keys:
            raise ValueError(f"x must hold value ids in [{task.n_keys}, {task.vocab}) at odd positions, got {int(values.min())}")
    return x


def _targets(batch: dict[str, Tensor], task: AssociativeRecall) -> Tensor:
    """``batch["y"]`` ``(B,)``: value tokens in ``[n_keys, n_keys + n_values)``; returns the class index ``y - n_keys``."""
    y = check_token_ids(batch.get("y"), task.vocab, 'batch["y"]', ndim=1)
    if y.numel() and int(y.min()) < task.n_keys:
        raise ValueError(f'batch["y"] must be value tokens in [{task.n_keys}, {task.vocab}), got a minimum of {int(y.min())}')
    return y - task.n_keys


def distillation_loss(model: Distiller, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """``CE(student) + weight * distillation``; metrics ``acc`` (student), ``ce`` and ``distill``."""
    x = batch["x"]
    target = _targets(batch, model.student.task)
    logits, recs = model.student(x)
    ce = F.cross_entropy(logits, target)
    distill = ce.new_zeros(())
    if model.kind != "none":
        with torch.no_grad():
            _, trecs = model.teacher(x)
        s, t = recs[-1], trecs[-1]
        if model.kind == "minilm":
            distill = minilm_attention_loss(s.attn, t.attn) + minilm_value_loss(s.values, t.values)
        else:
            assert model.projection is not None  # kind "tinybert" builds W_h
            distill = tinybert_attention_loss(s.scores, t.scores) + tinybert_hidden_loss(s.hidden, t.hidden, model.projection)
    acc = float((logits.argmax(-1) == target).float().mean()) if target.numel() else float("nan")
    return ce + model.weight * distill, {"acc": acc, "ce": float(ce.detach()), "distill": float(distill.detach())}


def teacher_loss(model: RecallTransformer, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy and accuracy of a :class:`RecallTransformer` trained on its own."""
    logits, _ = model(batch["x"])
    target = _targets(batch, model.task)
    return F.cross_entropy(logits, target), {"acc": float((logits.argmax(-1) == target).float().mean())}


# ----------------------------------------------------------------------------- registry: the comparison's own-task hook

#: preset -> (teacher steps, student steps, batch)
_PRESETS = {"quick": (20, 20, 32), "book": (400, 200, 64), "default": (800, 400, 64), "gpu": (1600, 800, 128)}


def make_task(preset: str = "book", kind: Kind = "minilm") -> OwnTask[Distiller]:
    """The comparison's :class:`~attn.registry.OwnTask`: a width-16 student of a width-64 teacher on associative recall.

    The teacher is trained here first (seed 0, ``teacher steps`` of the preset);
    the task's model is the :class:`Distiller`, its loss :func:`distillation_loss`.
    The layer timed alone is the student's attention, over ``size`` tokens.
    """
    from .train import set_seed, train

    if preset not in _PRESETS:
        raise ValueError(f"preset must be one of {sorted(_PRESETS)}, got {preset!r}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    t_steps, s_steps, batch = _PRESETS[preset]
    task = AssociativeRecall(n_pairs=8, n_keys=16, n_values=16)
    set_seed(0)
    teacher = RecallTransformer(task, embed_dim=64, num_heads=4)

    train(teacher, task.sample, teacher_loss, steps=t_steps, batch_size=batch, seed=0, progress=False)
    student = RecallTransformer(task, embed_dim=16, num_heads=4)
    model = Distiller(student, teacher, kind)

    def inputs(size: int, generator: torch.Generator) -> tuple[Tensor]:
        return (torch.randn(8, size, 16, generator=generator),)

    def weights(m: Distiller, b: dict[str, Tensor]) -> Tensor:
        return m.student(b["x"])[1][-1].attn[:, :, -1, :]  # the query token's attention, (B, h, n)

    last = student.blocks[-1]
    assert isinstance(last, _Block)  # blocks holds only _Block layers

    return OwnTask(
        description=f"associative recall, width-16 student of a width-64 teacher, {kind} distillation",
        model=model, sample=task.sample, loss=distillation_loss, layer=last.attn, inputs=inputs,
        sizes=(64, 128, 256, 512), size_unit="tokens", steps=s_steps, batch_size=batch, lr=3e-3, log_every=10,
        target_acc=0.9, eval_batch=512, weights=weights,
    )


register(
    "minilm_distillation", paper="Wang et al. 2020", complexity="O(n^2 h) extra per step (teacher forward + KL)",
    chapter=23, data="recall", summary="student trained on KL to the teacher's last-layer attention and value relations",
    task=partial(make_task, kind="minilm"),
)(Distiller)
register(
    "tinybert_distillation", paper="Jiao et al. 2020", complexity="O(n^2 h + n d_S d_T) extra per step",
    chapter=23, data="recall", summary="student trained on MSE to the teacher's attention scores and projected hidden states",
    task=partial(make_task, kind="tinybert"),
)(Distiller)
