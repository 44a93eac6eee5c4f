r"""Chapter 5's experiments (global attention): Luong's three scores, and global tokens over a long window.

The layers are in :mod:`attn.global_attention`; here, what the chapter does with them.

**Part 1: Luong's scores** (Luong, Pham and Manning, EMNLP 2015, section 3.1).
:func:`run_luong_grid` trains :class:`~attn.global_attention.LuongSeq2Seq` (a
bidirectional LSTM encoder, an LSTM decoder and global attention) on the
permutation task of chapter 1 (:class:`~attn.tasks.PermutationTask`: output
step ``t`` copies source position ``pi(t)``, so the true alignment is known) for
every score ``dot``, ``general``, ``concat``, every learning rate of a grid and
every seed, on the same batches. Each score is then read at **its own best
learning rate** (:func:`best_lrs`, the highest mean over seeds), so that a score
is never judged at a learning rate that suits another. Input feeding
(section 3.3) is the same model with :math:`\tilde h_{t-1}` fed back.

**Part 2: global tokens** (Beltagy et al. 2020, Longformer, section 3.1).
:class:`MarkerTask`: ``n`` tokens, ``[CLS]`` at position 0, filler elsewhere,
and in half of the sequences one **marker** at a uniform position ``1 .. n-1``;
the label (read out at position 0) is whether the marker occurs. With a window
``|i - j| <= w`` alone, ``L`` layers let position 0 depend on positions
``0 .. L w`` only (:func:`window_ceiling`: the best accuracy such a model can
reach), while one global token at position 0 reads all ``n`` positions in one
layer. :func:`run_marker` trains :class:`MarkerClassifier` (``L`` pre-norm
:class:`~attn.models.TransformerBlock` around
:class:`~attn.global_attention.GlobalTokenAttention`, computed blockwise) with
and without the global token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..global_attention import GlobalTokenAttention, LuongScore, LuongSeq2Seq
from ..models import TransformerBlock
from ..tasks import PermutationTask
from ..train import Recorder, evaluate, set_seed, train

__all__ = [
    "SCORES",
    "LuongConfig",
    "LuongRun",
    "permutation_loss",
    "train_luong",
    "run_luong_grid",
    "best_lrs",
    "grid_table",
    "MarkerTask",
    "MarkerClassifier",
    "MarkerConfig",
    "MARKER_ARMS",
    "marker_loss",
    "window_ceiling",
    "run_marker",
]

#: Luong's three score functions, in the order the tables list them.
SCORES: tuple[LuongScore, ...] = ("dot", "general", "concat")

Batch = dict[str, Tensor]


# ----------------------------------------------------------------------------- part 1: Luong's scores


@dataclass(frozen=True)
class LuongConfig:
    """Sizes of the score comparison: task, model, learning-rate grid and budget.

    ``seq_len`` source (= target) tokens over ``vocab`` symbols (0 is the start
    token), encoder width ``hidden`` per direction (decoder ``2 hidden``),
    ``steps`` Adam steps of ``batch_size`` sequences at each learning rate of
    ``lrs``; ``task_seed`` draws the permutation.
    """

    vocab: int = 12
    seq_len: int = 8
    hidden: int = 32
    steps: int = 150
    batch_size: int = 32
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    log_every: int = 25
    task_seed: int = 1

    def task(self) -> PermutationTask:
        """The permutation task of these sizes (its permutation drawn from ``task_seed``)."""
        return PermutationTask(vocab=self.vocab, length=self.seq_len, permutation="random", seed=self.task_seed)


def permutation_loss(task: PermutationTask) -> Callable[[LuongSeq2Seq, Batch], tuple[Tensor, dict[str, float]]]:
    """Cross-entropy over the target tokens, with token accuracy ``acc`` and alignment accuracy ``align_acc``.

    ``align_acc`` is the fraction of output steps ``t`` whose largest weight
    :math:`\\arg\\max_s a_t(s)` is on the true source position ``task.perm[t]``.
    """

    def loss_fn(model: LuongSeq2Seq, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits, align = model(batch["src"], batch["tgt_in"])  # (B, T, vocab), (B, T, S)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["tgt"].flatten())
        return loss, {
            "acc": float((logits.argmax(-1) == batch["tgt"]).float().mean()),
            "align_acc": float((align.argmax(-1) == task.perm.to(align.device)).float().mean()),
        }

    return loss_fn


@dataclass
class LuongRun:
    """One trained model: its score, learning rate, seed, held-out accuracies and curves.

    ``acc`` and ``align_acc`` are measured on one held-out batch of 512;
    ``steps_to_align`` is the first logged step whose training-batch alignment
    accuracy reached 0.9 (``None``: not within the budget); ``snapshots`` holds
    ``(step, alignment (4, T, S))`` on the probe sentences when one was given.
    """

    score: str
    lr: float
    seed: int
    input_feeding: bool
    acc: float
    align_acc: float
    steps_to_align: int | None
    history: pd.DataFrame
    model: LuongSeq2Seq
    snapshots: list[tuple[int, Tensor]] = field(default_factory=list)


def train_luong(score: LuongScore, lr: float, seed: int, config: LuongConfig, *, input_feeding: bool = False,
                probe: Batch | None = None, device: torch.device | str = "cpu") -> LuongRun:
    """Train one :class:`~attn.global_attention.LuongSeq2Seq` (initialised from ``seed``, batches from ``seed``).

    The same ``seed`` gives every score and learning rate the same batches.
    ``probe`` (a task batch): record the alignment on it at every logged step.
    """
    task = config.task()
    loss_fn = permutation_loss(task)
    set_seed(seed)
    model = LuongSeq2Seq(config.vocab, config.hidden, config.hidden, score, input_feeding=input_feeding)
    recorder = None
    if probe is not None:
        src, tgt_in = probe["src"].to(device), probe["tgt_in"].to(device)
        recorder = Recorder(lambda m: m(src, tgt_in)[1].cpu())
    hist = train(model, task.sample, loss_fn, steps=config.steps, batch_size=config.batch_size, lr=lr, seed=seed,
                 log_every=config.log_every, device=device, progress=False, callback=recorder)
    held_out = evaluate(model, task.sample, loss_fn, device=device)
    return LuongRun(score, lr, seed, input_feeding, held_out["acc"], held_out["align_acc"],
                    hist.first_step_reaching("align_acc", 0.9), hist.to_frame(), model,
                    list(recorder.records) if recorder is not None else [])


def run_luong_grid(config: LuongConfig, seeds: Sequence[int], scores: Sequence[LuongScore] = SCORES, *,
                   probe: Batch | None = None, device: torch.device | str = "cpu") -> list[LuongRun]:
    """Every score x learning rate (``config.lrs``) x seed, without input feeding.

    ``probe``: recorded (alignment snapshots) for the first seed only.
    Returns the runs in the order score, learning rate, seed.
    """
    if len(seeds) < 1:
        raise ValueError("run_luong_grid needs at least one seed")
    return [
        train_luong(score, lr, s, config, probe=probe if s == seeds[0] else None, device=device)
        for score in scores for lr in config.lrs for s in seeds
    ]


def grid_table(runs: Sequence[LuongRun], metric: str = "align_acc") -> pd.DataFrame:
    """Mean, min and max of ``metric`` over seeds, one row per score and learning rate."""
    df = pd.DataFrame([{"score": r.score, "lr": r.lr, "seed": r.seed, metric: getattr(r, metric)} for r in runs])
    return df.groupby(["score", "lr"], sort=False)[metric].agg(["mean", "min", "max"])


def best_lrs(runs: Sequence[LuongRun], metric: str = "align_acc") -> dict[str, float]:
    """Each score's learning rate with the highest mean ``metric`` over seeds (ties: the smaller rate)."""
    table = grid_table(runs, metric)["mean"]
    out: dict[str, float] = {}
    for (score, lr), mean in table.items():
        if score not in out or mean > table[(score, out[score])] or (
            mean == table[(score, out[score])] and lr < out[score]
        ):
            out[str(score)] = float(lr)
    return out


# ----------------------------------------------------------------------------- part 2: global tokens


@dataclass(frozen=True)
class MarkerTask:
    """Is there a marker anywhere? ``[CLS]`` at position 0, filler elsewhere, one marker in half the sequences.

    Tokens: ``0`` = ``[CLS]``, ``1`` = marker, ``2`` = filler. ``y = 1`` (probability
    1/2) places one marker at a uniform position ``1 .. length - 1``; ``y = 0``
    none. ``sample(batch, generator)`` -> ``tokens (B, n)`` long, ``y (B,)`` long,
    ``where (B,)`` (the marker's position, ``-1`` when there is none).
    """

    length: int = 256
    vocab: int = 3

    def __post_init__(self) -> None:
        if self.length < 2:
            raise ValueError(f"length must be >= 2 ([CLS] and one more position), got {self.length}")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        tokens = torch.full((batch_size, self.length), 2, dtype=torch.long)
        tokens[:, 0] = 0
        y = torch.randint(0, 2, (batch_size,), generator=generator)
        pos = torch.randint(1, self.length, (batch_size,), generator=generator)
        where = torch.where(y == 1, pos, torch.full_like(pos, -1))
        rows = torch.nonzero(y == 1)[:, 0]
        tokens[rows, pos[rows]] = 1
        return {"tokens": tokens, "y": y, "where": where}


class MarkerClassifier(nn.Module):
    """Embedding -> ``num_layers`` pre-norm blocks of window (+ global) attention -> LayerNorm -> 2 logits at position 0.

    Each block is a :class:`~attn.models.TransformerBlock` around
    :class:`~attn.global_attention.GlobalTokenAttention` (``window``, ``global_idx``:
    ``()`` for the window alone, ``(0,)`` to make ``[CLS]`` global). The global
    rows and columns use the layer's one set of projections (Longformer trains a
    second set for them). No position embedding: the window is the only locality.
    ``forward(tokens (B, n)) -> logits (B, 2)``.
    """

    def __init__(self, vocab: int, embed_dim: int, num_heads: int, num_layers: int, window: int,
                 global_idx: Sequence[int], ffn_mult: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed_dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(GlobalTokenAttention(embed_dim, num_heads, window=window, global_idx=tuple(global_idx)),
                             embed_dim, ffn_mult)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)  # (B, n, E)
        for block in self.blocks:
            h = block(h).output
        return self.head(self.norm(h[:, 0]))  # read out at position 0: (B, 2)


def marker_loss(model: MarkerClassifier, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the label at position 0, with accuracy ``acc``."""
    logits = model(batch["tokens"])
    return F.cross_entropy(logits, batch["y"]), {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


@dataclass(frozen=True)
class MarkerConfig:
    """Sizes of the global-token experiment: ``length`` tokens, one-sided ``window``, ``num_layers`` blocks."""

    length: int = 256
    window: int = 4
    num_layers: int = 2
    embed_dim: int = 16
    num_heads: int = 1
    ffn_mult: int = 0
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-2
    eval_batch: int = 256
    log_every: int = 25


#: The arms: name -> global positions (``()``: the window alone).
MARKER_ARMS: dict[str, tuple[int, ...]] = {"window only": (), "window + global [CLS]": (0,)}


def window_ceiling(length: int, window: int, num_layers: int) -> float:
    """Best accuracy of a window-only model on :class:`MarkerTask`: it sees positions ``1 .. L w`` from position 0.

    It can answer "yes" only when the marker lies within reach and must answer
    "no" otherwise: every negative and a fraction ``min(L w, n - 1) / (n - 1)`` of
    the positives are right, ``1/2 + 1/2 * min(L w, n - 1) / (n - 1)``.
    """
    reach = min(num_layers * window, length - 1)
    return 0.5 + 0.5 * reach / (length - 1)


def run_marker(config: MarkerConfig, seeds: Sequence[int], arms: dict[str, tuple[int, ...]] | None = None, *,
               device: torch.device | str = "cpu") -> tuple[dict[str, list[float]], dict[str, list[int | None]]]:
    """Train every arm on every seed (same initialisation seed, same batches); held-out accuracy per seed.

    Returns ``(accuracy, steps)``: per arm, one held-out accuracy (a fresh batch of
    ``eval_batch``) and one first logged step with training-batch accuracy 1.0
    (``None``: not reached within ``steps``) per seed.
    """
    arms = MARKER_ARMS if arms is None else arms
    task = MarkerTask(config.length)
    acc: dict[str, list[float]] = {a: [] for a in arms}
    reached: dict[str, list[int | None]] = {a: [] for a in arms}
    for s in seeds:
        for arm, gidx in arms.items():
            set_seed(s)
            model = MarkerClassifier(task.vocab, config.embed_dim, config.num_heads, config.num_layers,
                                     config.window, gidx, config.ffn_mult)
            hist = train(model, task.sample, marker_loss, steps=config.steps, batch_size=config.batch_size,
                         lr=config.lr, seed=s, log_every=config.log_every, device=device, progress=False)
            acc[arm].append(evaluate(model, task.sample, marker_loss, batch_size=config.eval_batch,
                                     device=device)["acc"])
            reached[arm].append(hist.first_step_reaching("acc", 1.0))
    return acc, reached
