r"""Chapter 9's experiments (sparse attention): recall among distractor keys, and a periodic language model.

The layers are in :mod:`attn.sparse` (strided / fixed patterns, top-k) and
:mod:`attn.sparsemax` (sparsemax, alpha-entmax); here, what the chapter trains with them.

**Recall among distractors** (:class:`DistractorRecall`). A sequence of ``P`` key-value
pairs (one token each) and a query token at the end. Each key is a *compound*
``(a, b)`` drawn without repetition from an ``n_a x n_b`` grid; the query names one of
the keys and the model must output its value. The other keys are distractors, and
``(n_a - 1) + (n_b - 1)`` of them match the query in one half: a dot-product score
gives them about half the score of the true key. A normaliser that keeps every key
(softmax) mixes their values into the read-out unless the scores grow large; a sparse
one (top-k, Zhao et al. 2019; sparsemax, Martins & Astudillo 2016; 1.5-entmax,
Peters et al. 2019) can give them exactly zero. :func:`run_distractor_recall` trains
one attention layer per normaliser (:data:`RECALL_ARMS`) and reports held-out accuracy
and the **support size**: the mean number of nonzero weights in the query's row.

**A periodic language model** (:class:`PeriodicSequence`). The first ``p`` tokens are
uniform; after them ``x_t = f(x_{t-p})`` for a fixed permutation ``f`` of the
vocabulary. Predicting ``x_{i+1}`` at position ``i`` needs the key ``i + 1 - p``. With
``p = 2 l + 1`` that key lies ``2 l`` back: in the column part of the strided pattern of
stride ``l`` (Child et al. 2019, equation (sparse-strided) of the chapter), but outside
the band, and outside the fixed pattern's own block; the fixed pattern reads it
directly only when it is one of the ``c`` summary positions of its block, otherwise
through a summary in a second layer. :func:`run_periodic_lm` trains a small causal
:class:`~attn.models.TokenLM` with dense causal attention, the strided pattern, and the
fixed pattern (:data:`LM_ARMS`), the sparse ones with the chapter's blockwise
:class:`~attn.sparse.SparseAttention` layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AttentionOutput
from ..models import TokenLM
from ..multihead import MultiHeadAttention
from ..sparse import SparseAttention, TopKAttention
from ..sparsemax import EntmaxAttention, SparsemaxAttention
from ..train import evaluate, set_seed, train

__all__ = [
    "RECALL_ARMS",
    "LM_ARMS",
    "DistractorRecall",
    "DistractorRecallModel",
    "RecallConfig",
    "RecallRuns",
    "recall_mixer",
    "distractor_loss",
    "run_distractor_recall",
    "PeriodicSequence",
    "LMConfig",
    "LMRuns",
    "lm_mixer",
    "periodic_loss",
    "run_periodic_lm",
]

#: The normalisers of the recall experiment, in table order.
RECALL_ARMS: tuple[str, ...] = ("softmax", "top-k, k=1", "top-k, k=4", "1.5-entmax", "sparsemax")
#: The patterns of the periodic language model, in table order.
LM_ARMS: tuple[str, ...] = ("dense", "strided", "fixed")


# --------------------------------------------------------------------------- recall among distractors


@dataclass
class DistractorRecall:
    """``P`` pairs ``((a_i, b_i), v_i)`` with distinct compound keys, then a query ``(a, b)``: output its value.

    ``sample(batch, generator)`` -> ``a, b (B, P)`` key halves, ``v (B, P)`` values,
    ``qa, qb (B,)`` the query's key, ``where (B,)`` the index of its pair, ``y (B,)`` its value.
    Every sequence has ``(n_a - 1) + (n_b - 1)`` half-matching distractors when
    ``P = n_a n_b`` (every key of the grid appears), fewer on average otherwise. Chance
    is ``1 / n_values``.
    """

    n_pairs: int = 64
    n_a: int = 8
    n_b: int = 8
    n_values: int = 16

    def __post_init__(self) -> None:
        if self.n_pairs > self.n_a * self.n_b:
            raise ValueError(f"n_pairs ({self.n_pairs}) must be <= n_a * n_b ({self.n_a * self.n_b}) for "
                             "distinct keys")
        if self.n_pairs < 1 or self.n_values < 2:
            raise ValueError(f"need n_pairs >= 1 and n_values >= 2, got {self.n_pairs}, {self.n_values}")

    @property
    def length(self) -> int:
        """Tokens per sequence: the pairs and the query."""
        return self.n_pairs + 1

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        grid = self.n_a * self.n_b
        keys = torch.rand(batch_size, grid, generator=generator).argsort(-1)[:, : self.n_pairs]  # (B, P) distinct
        a, b = keys // self.n_b, keys % self.n_b
        v = torch.randint(0, self.n_values, (batch_size, self.n_pairs), generator=generator)
        where = torch.randint(0, self.n_pairs, (batch_size,), generator=generator)
        rows = torch.arange(batch_size)
        return {"a": a, "b": b, "v": v, "qa": a[rows, where], "qb": b[rows, where], "where": where,
                "y": v[rows, where]}


@dataclass(frozen=True)
class RecallConfig:
    """Sizes and budget of the recall experiment (one attention layer, ``num_heads`` heads)."""

    n_pairs: int = 64
    n_a: int = 8
    n_b: int = 8
    n_values: int = 8
    embed_dim: int = 64
    num_heads: int = 1
    steps: int = 140
    batch_size: int = 32
    lr: float = 3e-3
    eval_batch: int = 256


def recall_mixer(arm: str, embed_dim: int, num_heads: int) -> nn.Module:
    """The attention layer of ``arm`` (one of :data:`RECALL_ARMS`): same projections, another normaliser."""
    if arm == "softmax":
        return MultiHeadAttention(embed_dim, num_heads)
    if arm.startswith("top-k, k="):
        return TopKAttention(embed_dim, num_heads, topk=int(arm.split("=", 1)[1]))
    if arm == "1.5-entmax":
        return EntmaxAttention(embed_dim, num_heads, alpha=1.5)
    if arm == "sparsemax":
        return SparsemaxAttention(embed_dim, num_heads)
    raise ValueError(f"unknown arm {arm!r}; one of {', '.join(RECALL_ARMS)} (or 'top-k, k=<int>')")


class DistractorRecallModel(nn.Module):
    r"""One attention layer over ``P`` pair tokens and a query token; read out at the query.

    Pair token ``h_i = E_a[a_i] + E_b[b_i] + E_v[v_i]``, query token
    ``h_q = E_a[a] + E_b[b] + e_q``; ``z = LN(h_q + \mathrm{Attn}(H)_q)``, logits ``W z``.
    No positions: the pairs form a set. Shapes: ``(B, P)`` tensors -> logits ``(B, n_values)``
    and, when asked, the layer's weights ``(B, h, P + 1, P + 1)``.
    """

    def __init__(self, task: DistractorRecall, attention: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.task = task
        self.emb_a = nn.Embedding(task.n_a, embed_dim)
        self.emb_b = nn.Embedding(task.n_b, embed_dim)
        self.emb_v = nn.Embedding(task.n_values, embed_dim)
        self.query_flag = nn.Parameter(torch.randn(embed_dim) * 0.02)
        self.attention = attention
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_values)

    def forward(self, a: Tensor, b: Tensor, v: Tensor, qa: Tensor, qb: Tensor,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        pairs = self.emb_a(a) + self.emb_b(b) + self.emb_v(v)  # (B, P, E)
        query = self.emb_a(qa) + self.emb_b(qb) + self.query_flag  # (B, E)
        h = torch.cat([pairs, query[:, None]], 1)  # (B, P + 1, E)
        out: AttentionOutput = self.attention(h, need_weights=need_weights)
        return self.head(self.norm(h + out.output)[:, -1]), out.weights


def distractor_loss(model: DistractorRecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the recalled value, and accuracy."""
    logits, _ = model(batch["a"], batch["b"], batch["v"], batch["qa"], batch["qb"])
    return F.cross_entropy(logits, batch["y"]), {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


@dataclass
class RecallRuns:
    """Per arm, one value per seed (in ``seeds`` order).

    ``accuracy``: held-out accuracy after the budget; ``support``: mean number of
    nonzero weights in the query's row (over heads and held-out examples);
    ``weight_on_answer``: mean weight the query puts on the true pair;
    ``train_acc``: training-batch accuracy at the last logs (mean of the last three), to
    judge whether a run has plateaued.
    """

    seeds: list[int]
    config: RecallConfig
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    support: dict[str, list[float]] = field(default_factory=dict)
    weight_on_answer: dict[str, list[float]] = field(default_factory=dict)
    train_acc: dict[str, list[float]] = field(default_factory=dict)


def run_distractor_recall(arms: Sequence[str] = RECALL_ARMS, seeds: Sequence[int] = (0, 1, 2),
                          config: RecallConfig | None = None, device: torch.device | str = "cpu") -> RecallRuns:
    """Train every arm on :class:`DistractorRecall` once per seed: same seeds, batches and budget for every arm.

    Seed ``s`` seeds the initialisation (the arms' parameters have the same shapes, so
    they start from the same weights) and the training batches; Adam (``config.lr``,
    gradient norm clipped at 1) for ``config.steps`` steps on one CPU thread; evaluation
    on one held-out batch (seed ``10_000 + s``).
    """
    cfg = config or RecallConfig()
    task = DistractorRecall(cfg.n_pairs, cfg.n_a, cfg.n_b, cfg.n_values)
    runs = RecallRuns(seeds=list(seeds), config=cfg)
    for arm in arms:
        for d in (runs.accuracy, runs.support, runs.weight_on_answer, runs.train_acc):
            d[arm] = []
        for s in seeds:
            set_seed(s)
            model = DistractorRecallModel(task, recall_mixer(arm, cfg.embed_dim, cfg.num_heads), cfg.embed_dim)
            hist = train(model, task.sample, distractor_loss, cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                         seed=s, log_every=10, device=device, progress=False)
            ev = evaluate(model, task.sample, distractor_loss, batch_size=cfg.eval_batch, seed=10_000 + s,
                          device=device)
            batch = {k: t.to(device) for k, t in
                     task.sample(cfg.eval_batch, torch.Generator().manual_seed(10_000 + s)).items()}
            with torch.no_grad():
                _, w = model(batch["a"], batch["b"], batch["v"], batch["qa"], batch["qb"], need_weights=True)
            assert w is not None
            row = w[:, :, -1, :]  # (B, h, P + 1): the query's weights
            answer = row.gather(-1, batch["where"][:, None, None].expand(-1, row.shape[1], 1))
            runs.accuracy[arm].append(ev["acc"])
            runs.support[arm].append(float((row > 0).sum(-1).float().mean()))
            runs.weight_on_answer[arm].append(float(answer.mean()))
            runs.train_acc[arm].append(sum(hist.metrics["acc"][-3:]) / len(hist.metrics["acc"][-3:]))
    return runs


# --------------------------------------------------------------------------- the periodic language model


@dataclass
class PeriodicSequence:
    """Token sequences with ``x_t = f(x_{t-p})`` for ``t >= p``; the first ``p`` tokens uniform.

    ``f`` is a permutation of the ``vocab`` tokens drawn once from ``rule_seed`` (part of
    the task, the same for every training seed). ``sample(batch, generator)`` ->
    ``x (B, n)`` long. The predictable targets are ``x_t`` for ``t >= p``, i.e. the outputs
    at positions ``i >= p - 1``, each reading the key ``i + 1 - p``.
    """

    length: int = 64
    period: int = 17
    vocab: int = 16
    rule_seed: int = 0
    rule: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.period < self.length:
            raise ValueError(f"need 1 <= period < length, got period {self.period}, length {self.length}")
        self.rule = torch.randperm(self.vocab, generator=torch.Generator().manual_seed(self.rule_seed))

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x = torch.empty(batch_size, self.length, dtype=torch.long)
        x[:, : self.period] = torch.randint(0, self.vocab, (batch_size, self.period), generator=generator)
        for t in range(self.period, self.length):
            x[:, t] = self.rule[x[:, t - self.period]]
        return {"x": x}


@dataclass(frozen=True)
class LMConfig:
    """Sizes and budget of the periodic language model (``stride`` is ``l`` of both patterns)."""

    length: int = 48
    period: int = 17
    vocab: int = 16
    stride: int = 8
    summary: int = 2
    embed_dim: int = 32
    num_heads: int = 2
    num_layers: int = 2
    position_std: float = 0.3
    steps: int = 120
    batch_size: int = 16
    lr: float = 3e-3
    eval_batch: int = 256
    target: float = 0.9


def lm_mixer(arm: str, config: LMConfig) -> nn.Module:
    """The causal attention layer of ``arm`` (one of :data:`LM_ARMS`)."""
    E, h = config.embed_dim, config.num_heads
    if arm == "dense":
        return MultiHeadAttention(E, h)
    if arm == "strided":
        return SparseAttention(E, h, pattern="strided", stride=config.stride, causal=True)
    if arm == "fixed":
        return SparseAttention(E, h, pattern="fixed", stride=config.stride, summary=config.summary, causal=True)
    raise ValueError(f"unknown arm {arm!r}; one of {', '.join(LM_ARMS)}")


def _mixer_at(arm: str, config: LMConfig, _layer: int) -> nn.Module:
    """``TokenLM``'s ``mixer(layer_index)``: the same kind of layer at every depth."""
    return lm_mixer(arm, config)


def periodic_loss(model: TokenLM, batch: dict[str, Tensor], period: int) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy and accuracy on the predictable targets ``x_t, t >= period``."""
    x = batch["x"]
    logits = model(x[:, :-1], is_causal=True).logits[:, period - 1:]  # predicts x[:, period:]
    target = x[:, period:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return loss, {"acc": float((logits.argmax(-1) == target).float().mean())}


@dataclass
class LMRuns:
    """Per arm, one value per seed: held-out next-token ``accuracy`` on the predictable targets, and
    ``train_acc`` (mean of the last three logged training-batch accuracies), ``steps_to_target``: the
    first logged step (every 10) whose training-batch accuracy reached ``config.target`` (``None``: not
    reached within ``config.steps``, censored), and ``curves``: the logged training accuracies."""

    seeds: list[int]
    config: LMConfig
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    train_acc: dict[str, list[float]] = field(default_factory=dict)
    steps_to_target: dict[str, list[int | None]] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)


def run_periodic_lm(arms: Sequence[str] = LM_ARMS, seeds: Sequence[int] = (0, 1, 2),
                    config: LMConfig | None = None, device: torch.device | str = "cpu") -> LMRuns:
    """Train a causal :class:`~attn.models.TokenLM` per arm and seed on :class:`PeriodicSequence`.

    Same seeds (initialisation and batches), budget and sizes for every arm; learned
    absolute positions; Adam, gradient norm clipped at 1, one CPU thread; evaluation on one
    held-out batch (seed ``10_000 + s``).
    """
    cfg = config or LMConfig()
    task = PeriodicSequence(cfg.length, cfg.period, cfg.vocab)
    runs = LMRuns(seeds=list(seeds), config=cfg)

    def loss(model: TokenLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return periodic_loss(model, batch, cfg.period)

    for arm in arms:
        runs.accuracy[arm], runs.train_acc[arm], runs.steps_to_target[arm], runs.curves[arm] = [], [], [], []
        for s in seeds:
            set_seed(s)
            model = TokenLM(cfg.vocab, cfg.embed_dim, cfg.num_layers, partial(_mixer_at, arm, cfg),
                            max_len=cfg.length, position_std=cfg.position_std)
            hist = train(model, task.sample, loss, cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=s,
                         log_every=10, device=device, progress=False)
            ev = evaluate(model, task.sample, loss, batch_size=cfg.eval_batch, seed=10_000 + s, device=device)
            runs.accuracy[arm].append(ev["acc"])
            runs.train_acc[arm].append(sum(hist.metrics["acc"][-3:]) / len(hist.metrics["acc"][-3:]))
            runs.steps_to_target[arm].append(hist.first_step_reaching("acc", cfg.target))
            runs.curves[arm].append(list(hist.metrics["acc"]))
    return runs
