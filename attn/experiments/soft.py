"""Chapter 1's experiments (soft attention): the permutation task's loss and the own task of the comparison.

The layer and the encoder-decoder (:class:`attn.soft.Seq2SeqAttention`, Bahdanau et al. 2015) stay in
:mod:`attn.soft`; what the chapter does with them -- reverse a sequence of tokens, score the alignment --
lives here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..registry import OwnTask
from ..soft import AdditiveAttention, Seq2SeqAttention
from ..tasks import PermutationTask
from . import sized

__all__ = ["permutation_loss", "seq2seq_task", "OWN_TASKS"]

Seq2SeqLoss = Callable[[Seq2SeqAttention, dict[str, Tensor]], tuple[Tensor, dict[str, float]]]


def permutation_loss(perm: Tensor) -> Seq2SeqLoss:
    """Loss for :class:`~attn.soft.Seq2SeqAttention` on a :class:`~attn.tasks.PermutationTask` with permutation ``perm``.

    Returns ``loss_fn(model, batch) -> (cross-entropy, metrics)``; the metrics are
    token accuracy ``acc`` and ``align_acc``, the fraction of output steps whose
    largest attention weight falls on the true source position ``perm[t]``.
    """

    def loss_fn(model: Seq2SeqAttention, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits, align = model(batch["src"], batch["tgt_in"])  # (B, T, V), (B, T, S)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["tgt"].flatten())
        acc = (logits.argmax(-1) == batch["tgt"]).float().mean()
        align_acc = (align.argmax(-1) == perm.to(align.device)).float().mean()
        return loss, {"acc": float(acc), "align_acc": float(align_acc)}

    return loss_fn


def seq2seq_task(size: str) -> OwnTask[Seq2SeqAttention]:
    """Chapter 1's own task for the comparison: reverse a sequence with the attentive encoder-decoder.

    The cost sweep times the additive attention alone for a whole target of
    ``n`` steps over a source of ``n`` states (``O(n^2 h)``), the work one
    teacher-forced pass does in its attention. ``size``: one of :data:`attn.experiments.SIZES`.
    """
    length, steps = sized(size, quick=(6, 20), book=(8, 150), full=(12, 400), large=(12, 400))
    task = PermutationTask(vocab=12, length=length, permutation="reverse")
    model = Seq2SeqAttention(task.vocab, embed=16, hidden=32)
    width = 2 * model.hidden
    sizes = sized(size, quick=(16, 32, 64), book=(32, 64, 128, 256), full=(64, 128, 256, 512, 1024),
                  large=(64, 128, 256, 512, 1024))

    def weights(m: Seq2SeqAttention, batch: dict[str, Tensor]) -> Tensor:
        return m(batch["src"], batch["tgt_in"])[1]  # (B, T, S) alignments

    return OwnTask(
        description=f"reverse {length} tokens (seq2seq)",
        model=model,
        sample=task.sample,
        loss=permutation_loss(task.perm),
        layer=AdditiveAttention(width, width, hidden=32),
        inputs=lambda n, g: (torch.randn(1, n, width, generator=g), torch.randn(1, n, width, generator=g)),
        sizes=sizes,
        size_unit="source = target tokens",
        steps=steps,
        batch_size=64,
        lr=1e-2,
        target_acc=0.9,
        eval_batch=256,
        weights=weights,
    )


#: The comparison's own task of chapter 1, by mechanism name.
OWN_TASKS = {"seq2seq": seq2seq_task}
