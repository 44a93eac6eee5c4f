"""Chapter 1's experiments (soft attention): the permutation task's loss, greedy decoding, the bottleneck sweep.

The layer and the encoder-decoder (:class:`attn.soft.Seq2SeqAttention`, Bahdanau et al. 2015) stay in
:mod:`attn.soft`; what the chapter does with them -- reorder a sequence of tokens, score the alignment,
decode greedily, and measure the fixed-vector bottleneck against attention as the source grows
(Bahdanau et al. 2015, figure 2) -- lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import OwnTask
from ..soft import AdditiveAttention, ScoreKind, Seq2SeqAttention, make_score
from ..tasks import PermutationTask
from ..train import evaluate, set_seed, train
from . import sized

__all__ = [
    "permutation_loss",
    "greedy_decode",
    "RankedReorderTask",
    "BottleneckSeq2Seq",
    "reorder_loss",
    "bottleneck_sweep",
    "seq2seq_task",
    "OWN_TASKS",
]

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


@torch.no_grad()
def greedy_decode(model: Seq2SeqAttention, src: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Greedy decoding with :class:`~attn.soft.Seq2SeqAttention`: each step feeds back its own argmax.

    Teacher forcing feeds the true previous token ``y_{i-1}``; at test time the decoder has
    only its own guess ``\\hat y_{i-1} = argmax p(y_{i-1} | ...)``, so an early mistake can
    derail the rest. Step ``i`` attends with ``s_{i-1}`` (the model's own recursion, run one
    step at a time: ``tgt_in`` grows by one token per step).

    Args:
        model: a trained encoder-decoder (eval mode is set here).
        src: ``(B, S)`` source token ids.
        length: target length ``T`` (default ``S``).

    Returns:
        ``tokens (B, T)`` (the greedy output) and the alignments ``(B, T, S)`` of that decoding.
    """
    model.eval()
    length = src.shape[1] if length is None else length
    tgt_in = torch.zeros(src.shape[0], 1, dtype=torch.long, device=src.device)  # the start token
    for _ in range(length):
        logits, align = model(src, tgt_in)  # (B, i, V), (B, i, S)
        tgt_in = torch.cat([tgt_in, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return tgt_in[:, 1:], align


@dataclass
class RankedReorderTask:
    """Reorder a sentence by a per-example permutation that the source itself carries.

    Source word ``j`` is a pair (value ``v_j`` in ``1 .. n_values``, rank ``r_j``), the ranks a
    fresh random permutation of ``0 .. S-1`` for every example; the target writes the values in
    rank order, ``y_t = v_j`` with ``r_j = t``. The true alignment of output step ``t`` is
    ``j = r^{-1}(t)``: it depends on the input, so no fixed positional pattern solves the task,
    and the target holds ``S log2(n_values)`` bits that a fixed-size summary of the source must
    carry when there is no attention (the bottleneck of Cho et al. 2014 that Bahdanau et al. 2015
    remove). Token 0 is the decoder's start token.

    Args:
        length: source length ``S`` (= target length ``T``).
        n_values: number of distinct values (chance accuracy ``1 / n_values``).
    """

    length: int
    n_values: int = 8

    def __post_init__(self) -> None:
        if self.length < 1 or self.n_values < 2:
            raise ValueError(f"need length >= 1 and n_values >= 2, got {self.length}, {self.n_values}")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``values, ranks (B, S)``; ``tgt, tgt_in (B, T)``; ``align (B, T)`` (source position of output ``t``)."""
        B, S = batch_size, self.length
        values = torch.randint(1, self.n_values + 1, (B, S), generator=generator)
        ranks = torch.argsort(torch.rand(B, S, generator=generator), -1)  # a permutation per example
        align = torch.argsort(ranks, -1)  # align[b, t] = j with ranks[b, j] = t
        tgt = values.gather(1, align)
        tgt_in = torch.cat([torch.zeros(B, 1, dtype=torch.long), tgt[:, :-1]], 1)
        return {"values": values, "ranks": ranks, "tgt": tgt, "tgt_in": tgt_in, "align": align}


class BottleneckSeq2Seq(nn.Module):
    r"""A GRU encoder-decoder that reads the source through attention or through one fixed vector.

    Encoder (Cho et al. 2014): a forward ``nn.GRU`` over the source words
    (``embed(v_j) + embed(r_j)``), annotations ``h_1 .. h_S`` ``(B, S, H)`` and the summary
    :math:`c = h_S`, its last state. Decoder: a GRU over the teacher-forced inputs
    ``[embed(y_{i-1}) + pos(i); c]`` (Cho et al. feed ``c`` at every step), started from
    :math:`s_0 = \tanh(W c)`. The output reads :math:`[s_i; c_i]` with

    * ``attention=False``: :math:`c_i = c` for every ``i`` (the bottleneck);
    * ``attention=True``: :math:`c_i = \sum_j \alpha_{ij} h_j`,
      :math:`\alpha_{i\cdot} = \operatorname{softmax}_j \operatorname{score}(s_{i-1}, h_j)`
      (Bahdanau et al. 2015: the query is the state before step ``i``).

    The two arms are the same network but for the context the output layer reads. Unlike
    :class:`~attn.soft.Seq2SeqAttention`, ``c_i`` enters the output layer only, not the GRU's
    recursion, so all ``T`` teacher-forced steps run in one ``nn.GRU`` call and one batched
    attention call ``(B, T, S)``.

    Args:
        n_values: values ``1 .. n_values`` (0 = start token).
        max_len: largest ``S`` (rank and step embeddings).
        embed, hidden: widths ``E`` and ``H``.
        attention: read the source through attention (else through ``c`` only).
        score: ``general`` (default: one matrix product for all steps), ``dot`` or ``additive``.
    """

    def __init__(self, n_values: int, max_len: int, embed: int = 32, hidden: int = 32, attention: bool = True,
                 score: ScoreKind = "general") -> None:
        super().__init__()
        self.value_embed = nn.Embedding(n_values + 1, embed)
        self.rank_embed = nn.Embedding(max_len, embed)
        self.encoder = nn.GRU(embed, hidden, batch_first=True)
        self.init_state = nn.Linear(hidden, hidden)
        self.tgt_embed = nn.Embedding(n_values + 1, embed)
        self.step_embed = nn.Embedding(max_len, embed)
        self.decoder = nn.GRU(embed + hidden, hidden, batch_first=True)
        self.attention = make_score(score, hidden, hidden, hidden) if attention else None
        self.out = nn.Linear(2 * hidden, n_values + 1)

    def forward(self, values: Tensor, ranks: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor | None]:
        """``values, ranks (B, S)``, ``tgt_in (B, T)`` -> ``logits (B, T, n_values + 1)``, alignments ``(B, T, S)`` or ``None``."""
        B, T = tgt_in.shape
        annotations, last = self.encoder(self.value_embed(values) + self.rank_embed(ranks))  # (B, S, H), (1, B, H)
        c = last[0]  # (B, H): the encoder's last state, the fixed-size summary
        s0 = torch.tanh(self.init_state(c))  # (B, H)
        steps = torch.arange(T, device=tgt_in.device)
        x = torch.cat([self.tgt_embed(tgt_in) + self.step_embed(steps), c[:, None].expand(B, T, -1)], -1)
        s, _ = self.decoder(x, s0[None].contiguous())  # (B, T, H): s_1 .. s_T
        if self.attention is None:
            return self.out(torch.cat([s, c[:, None].expand_as(s)], -1)), None
        queries = torch.cat([s0[:, None], s[:, :-1]], 1)  # s_0 .. s_{T-1}: step i attends with s_{i-1}
        context, alpha = self.attention(queries, annotations)  # (B, T, H), (B, T, S)
        return self.out(torch.cat([s, context], -1)), alpha


def reorder_loss(model: BottleneckSeq2Seq, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the reordered values; metrics ``acc`` (tokens) and ``align_acc`` (argmax on ``align``, attention only)."""
    logits, alpha = model(batch["values"], batch["ranks"], batch["tgt_in"])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["tgt"].flatten())
    metrics = {"acc": float((logits.argmax(-1) == batch["tgt"]).float().mean())}
    if alpha is not None:
        metrics["align_acc"] = float((alpha.argmax(-1) == batch["align"]).float().mean())
    return loss, metrics


def bottleneck_sweep(lengths: Sequence[int] = (8, 16, 32, 64), seeds: Sequence[int] = (0, 1, 2), steps: int = 80,
                     batch_size: int = 64, lr: float = 2e-2, n_values: int = 8, embed: int = 32, hidden: int = 32,
                     score: ScoreKind = "general", eval_batch: int = 256,
                     device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Attention against the fixed-vector bottleneck on :class:`RankedReorderTask`, over source lengths and seeds.

    For every length and seed both arms (``"attention"``, ``"no attention"``) start from the same
    seed (:func:`~attn.train.set_seed` before building the model), see the same batches
    (:func:`~attn.train.train` draws them from ``seed``) and get the same budget; the held-out
    batch is fixed per length. Bahdanau et al. 2015, figure 2 (BLEU against sentence length).

    Returns:
        One record per (length, seed, arm): ``length, seed, arm, acc`` (held-out token accuracy),
        ``align_acc`` (attention arm, else ``None``), ``history`` (the training log, a DataFrame).
    """
    records: list[dict[str, Any]] = []
    for length in lengths:
        task = RankedReorderTask(length, n_values)
        for seed in seeds:
            for arm, attention in (("attention", True), ("no attention", False)):
                set_seed(seed)
                model = BottleneckSeq2Seq(n_values, max(lengths), embed, hidden, attention, score)
                hist = train(model, task.sample, reorder_loss, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                             log_every=max(1, steps // 8), device=device, progress=False)
                held = evaluate(model, task.sample, reorder_loss, batch_size=eval_batch, seed=10_000 + length,
                                device=device)
                records.append({"length": length, "seed": seed, "arm": arm, "acc": held["acc"],
                                "align_acc": held.get("align_acc"), "history": hist.to_frame()})
    return records


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
