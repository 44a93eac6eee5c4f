r"""Chapter 3's experiments (multi-head attention): two-key ordered recall, where one head is not enough.

The layer (:class:`attn.multihead.MultiHeadAttention`) stays in :mod:`attn.multihead`; the task, the
one-layer model around it, the loss and the multi-seed runner live here.

**Why one head fails.** The query token carries two keys ``q1, q2`` and must answer the ordered
pair ``(v(q1), v(q2))``. A single head returns one convex mixture of pair tokens,
:math:`\sum_j a_j\, x_j W^V W^O`; to answer both slots it must weigh both matching pairs, and the sum
of their values is the same whichever value belongs to ``q1``: the order lives only in how unequal
the two weights are, which a linear read-out after LayerNorm cannot decode for the lighter pair.
Two heads can each put their weight on one pair (head 1 on ``q1``'s, head 2 on ``q2``'s), and
:math:`\operatorname{Concat}(\text{head}_1, \text{head}_2) W^O` keeps the two values apart
(Vaswani et al., "Attention Is All You Need", NeurIPS 2017, section 3.2.2: "Multi-head attention
allows the model to jointly attend to information from different representation subspaces at
different positions. With a single attention head, averaging inhibits this.").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int
from ..multihead import MultiHeadAttention
from ..tasks import AssociativeRecall
from ..train import History, set_seed, train

__all__ = [
    "TwoKeyRecall",
    "TwoKeyRecallModel",
    "two_key_loss",
    "pair_weights",
    "specialisation",
    "HeadsRun",
    "run_heads",
]


@dataclass
class TwoKeyRecall(AssociativeRecall):
    """Ordered two-key recall: ``k1 v1 ... kn vn q1 q2`` -> ``(v(q1), v(q2))``.

    Keys in a sequence are distinct (tokens ``0 .. n_keys - 1``), values are drawn with
    replacement (tokens ``n_keys .. n_keys + n_values - 1``), and ``q1 != q2`` are two of the
    sequence's keys, in random order. The answer is the ordered pair of their values, so a model
    must find *two* pairs and keep apart which value belongs to which query slot.

    The fields and the vocabulary are :class:`~attn.tasks.AssociativeRecall`'s (chapter 3's first,
    one-key task):

    Args:
        n_pairs: key-value pairs per sequence (length ``2 n_pairs + 2``); at least 2.
        n_keys: key alphabet (``>= n_pairs``).
        n_values: value alphabet.
    """

    def __post_init__(self) -> None:
        check_int("n_pairs", self.n_pairs, 2)
        check_int("n_values", self.n_values, 2)
        super().__post_init__()

    @property
    def length(self) -> int:
        return 2 * self.n_pairs + 2

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``x (B, 2n + 2)`` tokens; ``y (B, 2)`` the two values as indices ``0 .. n_values - 1``;
        ``where (B, 2)`` the pair index (``0 .. n - 1``) holding ``q1``'s and ``q2``'s value."""
        B, n = batch_size, self.n_pairs
        keys = torch.rand(B, self.n_keys, generator=generator).argsort(-1)[:, :n]  # (B, n) distinct
        values = torch.randint(0, self.n_values, (B, n), generator=generator)  # (B, n)
        where = torch.rand(B, n, generator=generator).argsort(-1)[:, :2]  # (B, 2) two distinct pairs
        rows = torch.arange(B)[:, None]
        x = torch.stack([keys, values + self.n_keys], -1).flatten(1)  # (B, 2n): k1 v1 k2 v2 ...
        x = torch.cat([x, keys[rows, where]], 1)  # (B, 2n + 2): ... q1 q2
        return {"x": x, "y": values[rows, where], "where": where}


class TwoKeyRecallModel(nn.Module):
    """One multi-head attention layer reading two-key recall from the query token.

    Pair ``j`` is one token ``E_k[k_j] + E_v[v_j]``; the query is one last token
    ``E_1[q1] + E_2[q2]`` with a table per slot (so the token knows which key is first).
    Then ``z = LayerNorm(x_q + MultiHead(X)_q)`` and two linear read-outs give the logits of
    ``v(q1)`` and ``v(q2)``. Only the number of heads varies between arms: the width ``E``,
    the parameters (``4E^2 + 4E`` in the layer) and the FLOPs stay the same.

    Shapes: ``x (B, 2n + 2)`` -> logits ``(B, 2, n_values)`` and weights ``(B, h, n + 1, n + 1)``.
    """

    def __init__(self, task: TwoKeyRecall, embed_dim: int = 64, num_heads: int = 2) -> None:
        super().__init__()
        self.task = task
        self.key_embed = nn.Embedding(task.n_keys, embed_dim)
        self.value_embed = nn.Embedding(task.n_values, embed_dim)
        self.slot_embed = nn.ModuleList(nn.Embedding(task.n_keys, embed_dim) for _ in range(2))
        self.attention = MultiHeadAttention(embed_dim, num_heads)
        self.norm = nn.LayerNorm(embed_dim)
        self.readout = nn.Linear(embed_dim, 2 * task.n_values)

    def tokens(self, x: Tensor) -> Tensor:
        """``(B, 2n + 2)`` task tokens -> ``(B, n + 1, E)``: the pairs, then the query."""
        if x.ndim != 2 or x.shape[1] != self.task.length:
            raise ValueError(f"x must have shape (batch, {self.task.length}), got {tuple(x.shape)}")
        keys, values = x[:, :-2:2], x[:, 1:-2:2] - self.task.n_keys  # (B, n), (B, n)
        pairs = self.key_embed(keys) + self.value_embed(values)  # (B, n, E)
        query = self.slot_embed[0](x[:, -2]) + self.slot_embed[1](x[:, -1])  # (B, E)
        return torch.cat([pairs, query[:, None]], 1)

    def read(self, h: Tensor, mixed: Tensor) -> Tensor:
        """Logits ``(B, 2, n_values)`` from the tokens ``h`` and the attention output ``mixed``."""
        z = self.norm(h + mixed)[:, -1]  # the query token, (B, E)
        return self.readout(z).unflatten(-1, (2, self.task.n_values))

    def forward(self, x: Tensor, need_weights: bool = False, temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
        h = self.tokens(x)
        out = self.attention(h, need_weights=need_weights, temperature=temperature)
        return self.read(h, out.output), out.weights


def two_key_loss(model: TwoKeyRecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy over both slots; ``acc`` = both values right, ``acc1``/``acc2`` per slot."""
    logits, _ = model(batch["x"])
    y = batch["y"]
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    right = logits.argmax(-1) == y  # (B, 2)
    return loss, {
        "acc": float(right.all(1).float().mean()),
        "acc1": float(right[:, 0].float().mean()),
        "acc2": float(right[:, 1].float().mean()),
    }


@torch.no_grad()
def pair_weights(model: TwoKeyRecallModel, batch: dict[str, Tensor]) -> Tensor:
    """Mean weight each head's query row puts on ``q1``'s pair and on ``q2``'s pair: ``(h, 2)``."""
    model.eval()
    _, w = model(batch["x"], need_weights=True)
    assert w is not None
    q = w[:, :, -1]  # (B, h, n + 1): the query token's row
    idx = batch["where"][:, None, :].expand(-1, q.shape[1], -1)  # (B, h, 2)
    return q.gather(-1, idx).mean(0)


def specialisation(weights: Tensor) -> float:
    r"""How well separate heads cover the two keys, from :func:`pair_weights` ``(h, 2)``.

    The best weight any head puts on ``q1``'s pair and the best any *other* head puts on
    ``q2``'s, maximised over the head assignment, averaged over the two keys:
    :math:`\max_{i \ne j} (w_{i,1} + w_{j,2}) / 2`. One head has no second head:
    its value is :math:`(w_{1,1} + w_{1,2}) / 2 \le 1/2`, what one head can give each key.
    Near 1: one head per key, each on its own pair.
    """
    h = weights.shape[0]
    if h == 1:
        return float(weights[0].mean())
    best = max(float(weights[i, 0] + weights[j, 1]) for i in range(h) for j in range(h) if i != j)
    return best / 2


@dataclass
class HeadsRun:
    """Every seed of one arm (one head count): curves, held-out scores, steps to target, head weights."""

    num_heads: int
    histories: list[History] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)  # held-out, both slots right
    slot_accuracy: list[tuple[float, float]] = field(default_factory=list)
    steps_to_target: list[int | None] = field(default_factory=list)  # None: not reached (censored)
    weights: list[Tensor] = field(default_factory=list)  # pair_weights per seed, (h, 2)
    models: list[TwoKeyRecallModel] = field(default_factory=list)

    @property
    def specialisation(self) -> list[float]:
        return [specialisation(w) for w in self.weights]


def run_heads(
    task: TwoKeyRecall,
    heads: Sequence[int] = (1, 2, 4),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 400,
    embed_dim: int = 64,
    batch_size: int = 64,
    lr: float = 3e-3,
    eval_every: int = 25,
    target: float = 0.9,
    eval_size: int = 512,
    device: torch.device | str = "cpu",
) -> dict[int, HeadsRun]:
    """Train one :class:`TwoKeyRecallModel` per head count and seed; same width, batches and budget.

    Seed ``s`` initialises every arm's model (``set_seed(s)``) and draws the same training batches
    for every arm (``train(seed=s)``). Every ``eval_every`` steps the model is scored on one fixed
    held-out batch (``eval_size`` examples, its own generator); ``steps_to_target`` is the first such
    step with held-out accuracy (both slots) ``>= target``, ``None`` when the budget ends first.
    """
    check_int("steps", steps, 1)
    check_int("eval_every", eval_every, 1)
    held_out = {k: v.to(device) for k, v in task.sample(eval_size, torch.Generator().manual_seed(10_000)).items()}
    runs: dict[int, HeadsRun] = {}
    for h in heads:
        run = HeadsRun(h)
        for s in seeds:
            set_seed(s)
            model = TwoKeyRecallModel(task, embed_dim, h)
            scores: list[tuple[int, float]] = []

            def score(step: int, m: TwoKeyRecallModel, scores: list[tuple[int, float]] = scores) -> None:
                m.eval()
                with torch.no_grad():
                    scores.append((step, two_key_loss(m, held_out)[1]["acc"]))
                m.train()

            hist = train(model, task.sample, two_key_loss, steps=steps, batch_size=batch_size, lr=lr, seed=s,
                         log_every=eval_every, device=device, progress=False, callback=score)
            model.eval()
            with torch.no_grad():
                _, metrics = two_key_loss(model, held_out)
            run.histories.append(hist)
            run.accuracy.append(metrics["acc"])
            run.slot_accuracy.append((metrics["acc1"], metrics["acc2"]))
            run.steps_to_target.append(next((st for st, a in scores if a >= target), None))
            run.weights.append(pair_weights(model, held_out).cpu())
            run.models.append(model)
        runs[h] = run
    return runs
