"""Chapter 23's experiment -- attention distillation: a small student learns associative recall from a teacher.

:class:`RecallTransformer` is a small post-LN Transformer encoder on :class:`~attn.tasks.AssociativeRecall`
(one token per key-value pair plus the query, as :class:`~attn.models.RecallTokens` embeds them): its blocks
are :class:`~attn.models.TransformerBlock` (``norm_first=False``, Vaswani et al.'s placement, as in BERT, the
teachers MiniLM and TinyBERT distil) around :class:`~attn.distillation.RecordingAttention`, and it returns, per
layer, the scores ``(B, h, n, n)``, the attention ``(B, h, n, n)``, the values ``(B, h, n, d_h)`` and the hidden
states ``(B, n, E)`` (:class:`LayerRecord`). :class:`Distiller` pairs a frozen teacher with a student and
:func:`distillation_loss` trains the student on ``cross-entropy + weight * distillation`` with MiniLM's or
TinyBERT's losses (:mod:`attn.distillation`). ``OWN_TASKS`` gives the comparison both.

Wang et al., "MiniLM", NeurIPS 2020. Jiao et al., "TinyBERT", Findings of EMNLP 2020.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_float, check_token_ids
from ..distillation import (
    RecordingAttention,
    minilm_attention_loss,
    minilm_value_loss,
    tinybert_attention_loss,
    tinybert_hidden_loss,
)
from ..models import RecallTokens, TransformerBlock
from ..registry import OwnTask
from ..tasks import AssociativeRecall
from . import OwnTaskFactory, sized

__all__ = [
    "LayerRecord", "RecallTransformer", "Distiller", "Kind", "distillation_loss", "teacher_loss", "make_task",
    "OWN_TASKS",
]

Kind = Literal["none", "minilm", "tinybert"]
_KINDS = ("none", "minilm", "tinybert")


@dataclass
class LayerRecord:
    """What one block computed: ``scores``, ``attn`` ``(B, h, n, n)``, ``values`` ``(B, h, n, d_h)`` (its attention),
    ``hidden`` ``(B, n, E)`` (the block's output)."""

    scores: Tensor
    attn: Tensor
    values: Tensor
    hidden: Tensor


class RecallTransformer(nn.Module):
    """A small Transformer encoder on :class:`~attn.tasks.AssociativeRecall` that records every layer.

    Tokens: one per key-value pair plus the query (:class:`~attn.models.RecallTokens`),
    ``n = n_pairs + 1``. Blocks: post-norm :class:`~attn.models.TransformerBlock` around
    :class:`~attn.distillation.RecordingAttention` (``h = LN(x + Attn(x))``, ``y = LN(h + FFN(h))``).
    The value is read off the query token's final hidden state.

    Args:
        task: the recall task.
        embed_dim: width ``E`` (teacher and student may differ).
        num_heads: heads ``h`` (MiniLM and TinyBERT pair the heads of teacher and student: keep ``h`` equal).
        num_layers: blocks.
        ffn_mult: feed-forward width is ``ffn_mult * E``.

    ``forward(x (B, 2 n_pairs + 1) long)`` -> ``(logits (B, n_values), [LayerRecord per layer])``.
    """

    def __init__(self, task: AssociativeRecall, embed_dim: int = 64, num_heads: int = 4, num_layers: int = 1,
                 ffn_mult: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.task = task
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.tokens = RecallTokens(task, embed_dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(RecordingAttention(embed_dim, num_heads), embed_dim, ffn_mult, norm_first=False)
            for _ in range(num_layers)
        )
        self.head = nn.Linear(embed_dim, task.n_values)

    def attention(self, layer: int) -> RecordingAttention:
        """The :class:`~attn.distillation.RecordingAttention` of block ``layer`` (``-1``: the last)."""
        mixer = self.blocks[layer].mixer
        assert isinstance(mixer, RecordingAttention)  # every block is built around one
        return mixer

    def forward(self, x: Tensor) -> tuple[Tensor, list[LayerRecord]]:
        x = _check_recall_tokens(x, self.task)
        h = self.tokens(x)  # (B, n, E); checks the shape
        records = []
        for i, block in enumerate(self.blocks):
            h = block(h).output
            last = self.attention(i).last
            assert last is not None  # the block just called it
            records.append(LayerRecord(*last, hidden=h))
        return self.head(h[:, -1]), records


class Distiller(nn.Module):
    """A frozen teacher and a student trained on ``CE + weight * distillation`` of ``kind``.

    ``kind``: ``"none"`` (the student alone, the baseline), ``"minilm"``
    (``L_AT + L_VR`` on the last layers) or ``"tinybert"`` (``L_attn`` on the
    last layers + ``L_hidn`` on the last hidden states through the learned
    projection ``W_h``, which is part of this module's trainable parameters).
    ``forward(x)`` gives the student's logits; the teacher's parameters are frozen.
    """

    def __init__(self, student: RecallTransformer, teacher: RecallTransformer, kind: Kind = "minilm",
                 weight: float = 1.0) -> None:
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


# ----------------------------------------------------------------------------- the comparison's own task


def make_task(size: str = "book", kind: Kind = "minilm") -> OwnTask[Distiller]:
    """The comparison's :class:`~attn.registry.OwnTask`: a width-16 student of a width-64 teacher on associative recall.

    ``size`` is one of :data:`attn.experiments.SIZES`. The teacher is trained here first (seed 0, the size's
    teacher steps); the task's model is the :class:`Distiller`, its loss :func:`distillation_loss`.
    The layer timed alone is the student's attention, over ``size`` tokens.
    """
    from ..train import set_seed, train

    t_steps, s_steps, batch = sized(size, quick=(20, 20, 32), book=(400, 200, 64), full=(800, 400, 64),
                                    large=(1600, 800, 128))
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
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

    return OwnTask(
        description=f"associative recall, width-16 student of a width-64 teacher, {kind} distillation",
        model=model, sample=task.sample, loss=distillation_loss, layer=student.attention(-1), inputs=inputs,
        sizes=(64, 128, 256, 512), size_unit="tokens", steps=s_steps, batch_size=batch, lr=3e-3, log_every=10,
        target_acc=0.9, eval_batch=512, weights=weights,
    )


OWN_TASKS: dict[str, OwnTaskFactory] = {
    "minilm_distillation": partial(make_task, kind="minilm"),
    "tinybert_distillation": partial(make_task, kind="tinybert"),
}
