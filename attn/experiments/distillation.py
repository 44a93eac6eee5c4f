"""Chapter 23's experiment -- attention distillation: a small student learns associative recall from a teacher.

:class:`RecallTransformer` is a small post-LN Transformer encoder on :class:`~attn.tasks.AssociativeRecall`
(one token per key-value pair plus the query, as :class:`~attn.models.RecallTokens` embeds them): its blocks
are :class:`~attn.models.TransformerBlock` (``norm_first=False``, Vaswani et al.'s placement, as in BERT, the
teachers MiniLM and TinyBERT distil) around :class:`~attn.distillation.RecordingAttention`, and it returns, per
layer, the scores ``(B, h, n, n)``, the attention ``(B, h, n, n)``, the values ``(B, h, n, d_h)`` and the hidden
states ``(B, n, E)`` (:class:`LayerRecord`). :class:`Distiller` pairs a frozen teacher with a student and
:func:`distillation_loss` trains the student on ``cross-entropy + weight * distillation`` with one of the
losses of :mod:`attn.distillation`: Hinton et al.'s logit distillation (``"kd"``), MiniLM's attention and
value-relation KLs together (``"minilm"``) or alone (``"minilm_at"``, ``"minilm_vr"``, the ablations), or
TinyBERT's score and hidden-state MSEs (``"tinybert"``). :func:`train_students` trains one student per kind
and seed in lockstep, on the same batches (the teacher runs once per batch), and returns their held-out
accuracy curves (:class:`StudentRuns`: steps to a target, censored, and final accuracy). ``OWN_TASKS`` gives the
comparison MiniLM and TinyBERT.

Hinton et al., "Distilling the Knowledge in a Neural Network", 2015. Wang et al., "MiniLM", NeurIPS 2020.
Jiao et al., "TinyBERT", Findings of EMNLP 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_float, check_token_ids
from ..distillation import (
    RecordingAttention,
    logit_distillation_loss,
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
    "LayerRecord", "RecallTransformer", "Distiller", "Kind", "KINDS", "distillation_loss", "teacher_loss",
    "StudentRuns", "train_students", "make_task", "OWN_TASKS",
]

Kind = Literal["none", "kd", "minilm", "minilm_at", "minilm_vr", "tinybert"]
#: Every kind of student :class:`Distiller` trains: no distillation, logit distillation (Hinton et al.),
#: MiniLM's two KLs together and each alone, TinyBERT's two MSEs.
KINDS: tuple[Kind, ...] = ("none", "kd", "minilm", "minilm_at", "minilm_vr", "tinybert")
_KINDS = KINDS
_ATTENTION_KINDS = ("minilm", "minilm_at", "minilm_vr", "tinybert")  # they pair heads one to one


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

    ``kind``: ``"none"`` (the student alone, the baseline), ``"kd"`` (Hinton et al.'s
    ``tau^2 KL(softmax(z^T/tau) || softmax(z^S/tau))`` on the output logits, ``tau = temperature``),
    ``"minilm"`` (``L_AT + L_VR`` on the last layers), ``"minilm_at"`` (``L_AT`` alone),
    ``"minilm_vr"`` (``L_VR`` alone) or ``"tinybert"`` (``L_attn`` on the
    last layers + ``L_hidn`` on the last hidden states through the learned
    projection ``W_h``, which is part of this module's trainable parameters).
    ``forward(x)`` gives the student's logits; the teacher's parameters are frozen.
    """

    def __init__(self, student: RecallTransformer, teacher: RecallTransformer, kind: Kind = "minilm",
                 weight: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if kind in _ATTENTION_KINDS and student.num_heads != teacher.num_heads:
            raise ValueError(f"{kind} pairs heads one to one: student has {student.num_heads} heads, teacher {teacher.num_heads}")
        weight = check_positive_float("weight", weight, allow_zero=True)
        self.temperature = check_positive_float("temperature", temperature)
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


def distillation_loss(model: Distiller, batch: dict[str, Tensor],
                      teacher_out: tuple[Tensor, list[LayerRecord]] | None = None) -> tuple[Tensor, dict[str, float]]:
    """``CE(student) + weight * distillation``; metrics ``acc`` (student), ``ce`` and ``distill``.

    ``teacher_out``: the teacher's ``(logits, records)`` on ``batch["x"]`` when already computed (several
    students of the same batch share one teacher pass, :func:`train_students`); ``None`` runs the teacher.
    """
    x = batch["x"]
    target = _targets(batch, model.student.task)
    logits, recs = model.student(x)
    ce = F.cross_entropy(logits, target)
    distill = ce.new_zeros(())
    if model.kind != "none":
        if teacher_out is None:
            with torch.no_grad():
                teacher_out = model.teacher(x)
        t_logits, trecs = teacher_out
        s, t = recs[-1], trecs[-1]
        if model.kind == "kd":
            distill = logit_distillation_loss(logits, t_logits, model.temperature)
        elif model.kind == "minilm":
            distill = minilm_attention_loss(s.attn, t.attn) + minilm_value_loss(s.values, t.values)
        elif model.kind == "minilm_at":
            distill = minilm_attention_loss(s.attn, t.attn)
        elif model.kind == "minilm_vr":
            distill = minilm_value_loss(s.values, t.values)
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


# ----------------------------------------------------------------------------- students of every kind, same seeds and batches


@dataclass
class StudentRuns:
    """Held-out accuracy of students trained by :func:`train_students`, one per ``(kind, seed)``.

    ``steps``: the training steps at which the curves were measured; ``curves[kind]``: one list per seed of
    held-out accuracy at those steps; ``final[kind]``: one value per seed, accuracy after the last step on a
    larger held-out batch; ``models[kind, seed]``: the trained :class:`Distiller`; ``records[kind, seed]``:
    ``(step, record(model))`` at each measured step when a ``record`` function was given.
    """

    kinds: list[Kind]
    seeds: list[int]
    steps: list[int]
    curves: dict[Kind, list[list[float]]]
    final: dict[Kind, list[float]]
    models: dict[tuple[Kind, int], Distiller] = field(repr=False)
    records: dict[tuple[Kind, int], list[tuple[int, Any]]] = field(default_factory=dict, repr=False)

    def steps_to(self, target: float) -> dict[Kind, list[int | None]]:
        """First measured step with held-out accuracy ``>= target``, per kind and seed; ``None``: not reached (censored)."""
        return {k: [next((st for st, a in zip(self.steps, curve, strict=True) if a >= target), None) for curve in curves]
                for k, curves in self.curves.items()}

    def late_change(self, last: int) -> dict[Kind, float]:
        """Per kind, ``max |acc(last step) - acc(step)|`` over the steps of the final ``last`` training steps and the seeds.

        Small for every kind: the curves are flat over the end of the budget (trained to convergence).
        """
        start = self.steps[-1] - last
        idx = [i for i, st in enumerate(self.steps) if st >= start]
        return {k: max(abs(c[-1] - c[i]) for c in curves for i in idx) for k, curves in self.curves.items()}


def train_students(task: AssociativeRecall, teacher: RecallTransformer, kinds: Sequence[Kind], seeds: Sequence[int], *,
                   steps: int, student_dim: int = 16, num_heads: int = 4, batch_size: int = 64, lr: float = 3e-3,
                   weight: float = 1.0, temperature: float = 2.0, eval_every: int = 10, eval_batch: int = 256,
                   eval_seed: int = 30_000, test_batch: int = 1024, test_seed: int = 10_000,
                   grad_clip: float | None = 1.0, record: Callable[[Distiller], Any] | None = None,
                   device: torch.device | str = "cpu", num_threads: int | None = 1) -> StudentRuns:
    """Train one student per kind and seed, in lockstep: same initial weights, same batches, same budget.

    For each seed ``s``: every kind's student starts from the weights :func:`~attn.train.set_seed` ``(s)`` gives
    a fresh ``RecallTransformer(task, student_dim, num_heads)`` (TinyBERT's ``W_h`` is drawn after it), then each
    step draws one batch of ``batch_size`` from a generator seeded ``s``, runs the frozen teacher on it once, and
    takes one Adam step (``lr``, gradient norm clipped at ``grad_clip``, as :func:`~attn.train.train`) for every
    student on ``CE + weight * distillation`` (:func:`distillation_loss`). Every ``eval_every`` steps each
    student's accuracy is measured on one fixed held-out batch (``eval_batch`` examples, seed ``eval_seed``);
    after the last step on ``test_batch`` examples (seed ``test_seed``). ``record(model)``, when given, is
    stored at each measured step (eval mode, no gradients). ``num_threads``: CPU threads while training
    (:func:`~attn.train.cpu_threads`; ``None`` keeps torch's setting, ignored on CUDA).
    """
    from ..train import cpu_threads

    if steps <= 0 or eval_every <= 0:
        raise ValueError(f"steps and eval_every must be positive, got {steps} and {eval_every}")
    with cpu_threads(num_threads if torch.device(device).type == "cpu" else None):
        return _train_students(task, teacher, kinds, seeds, steps=steps, student_dim=student_dim, num_heads=num_heads,
                               batch_size=batch_size, lr=lr, weight=weight, temperature=temperature,
                               eval_every=eval_every, eval_batch=eval_batch, eval_seed=eval_seed, test_batch=test_batch,
                               test_seed=test_seed, grad_clip=grad_clip, record=record, device=device)


def _train_students(task: AssociativeRecall, teacher: RecallTransformer, kinds: Sequence[Kind], seeds: Sequence[int], *,
                    steps: int, student_dim: int, num_heads: int, batch_size: int, lr: float, weight: float,
                    temperature: float, eval_every: int, eval_batch: int, eval_seed: int, test_batch: int,
                    test_seed: int, grad_clip: float | None, record: Callable[[Distiller], Any] | None,
                    device: torch.device | str) -> StudentRuns:
    """The body of :func:`train_students`, run inside its thread setting."""
    from ..train import set_seed

    kinds = list(kinds)
    if not kinds or any(k not in _KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct kinds from {_KINDS}, got {kinds}")
    seeds = [int(s) for s in seeds]
    teacher = teacher.to(device).eval()
    held = {k: v.to(device) for k, v in task.sample(eval_batch, torch.Generator().manual_seed(eval_seed)).items()}
    test = {k: v.to(device) for k, v in task.sample(test_batch, torch.Generator().manual_seed(test_seed)).items()}
    measured = [st for st in range(1, steps + 1) if st % eval_every == 0 or st == steps]
    curves: dict[Kind, list[list[float]]] = {k: [] for k in kinds}
    final: dict[Kind, list[float]] = {k: [] for k in kinds}
    models: dict[tuple[Kind, int], Distiller] = {}
    records: dict[tuple[Kind, int], list[tuple[int, Any]]] = {}

    def accuracy(m: Distiller, batch: dict[str, Tensor]) -> float:
        m.eval()
        with torch.no_grad():
            acc = float((m(batch["x"]).argmax(-1) == _targets(batch, task)).float().mean())
        m.train()
        return acc

    for seed in seeds:
        students: dict[Kind, Distiller] = {}
        for k in kinds:
            set_seed(seed)  # the same initial student for every kind
            students[k] = Distiller(RecallTransformer(task, embed_dim=student_dim, num_heads=num_heads), teacher, k,
                                    weight=weight, temperature=temperature).to(device).train()
        params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in students.items()}
        opts = {k: torch.optim.Adam(params[k], lr=lr) for k in kinds}
        curve: dict[Kind, list[float]] = {k: [] for k in kinds}
        gen = torch.Generator().manual_seed(seed)
        for step in range(1, steps + 1):
            batch = {k: v.to(device) for k, v in task.sample(batch_size, gen).items()}
            with torch.no_grad():
                t_out = teacher(batch["x"])
            for k, m in students.items():
                loss, _ = distillation_loss(m, batch, t_out)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{k} student, seed {seed}: loss became {loss.item()} at step {step}")
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(params[k], grad_clip)
                opts[k].step()
            if step in measured:
                for k, m in students.items():
                    curve[k].append(accuracy(m, held))
                    if record is not None:
                        m.eval()
                        with torch.no_grad():
                            records.setdefault((k, seed), []).append((step, record(m)))
                        m.train()
        for k, m in students.items():
            curves[k].append(curve[k])
            final[k].append(accuracy(m, test))
            models[k, seed] = m.eval()
    return StudentRuns(kinds, seeds, measured, curves, final, models, records)


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
