r"""Chapter 10's experiments (hybrid attention): marked-pair recall over 64+ pairs, and the reach of a pattern.

The layers are in :mod:`attn.hybrid` (BigBird) and :mod:`attn.global_attention`
(Longformer's window plus global tokens); here, what the chapter does with them.

**The task** (:class:`MarkedRecall`). A sequence ``[CLS] p_1 ... p_P [Q]``: ``P``
key-value pairs (one token each, ``E_k[k] + E_v[v]``), one of them **marked**; the
query token ``[Q]`` at the end must output the marked pair's value. Finding the
mark needs no knowledge of the query, so an intermediate token can relay it: the
model solves the task exactly when, in ``L`` layers, information can flow from
the marked pair to the query along the attention graph, i.e. when the pair lies
within the query's ``L``-hop **reach** (:func:`reach`). That is the diameter
argument of BigBird (Zaheer et al. 2020, section 2 and the proofs of its
theorems 1 and 2, which route every pair of tokens through a global token).

**The arms** (:data:`ARMS`, :func:`arm_mask`): a sliding window, Longformer's
window plus global tokens (Beltagy et al. 2020), BigBird's window plus a global
block with ``r = 0`` or ``r = 1`` random blocks per query block and head, and
dense attention. The random layout is drawn from the **training seed**, so the
spread over seeds includes the spread over layouts.

**How they are computed.** At 66 tokens the blockwise kernels are dominated by
Python overhead (about twice the time per training step of dense attention on
the book's CPU), so :class:`PatternAttention` trains each pattern as dense
multi-head attention under the pattern's ``(h, n, n)`` mask: the labelled
reference path, which computes the same function as the blockwise layers (the
chapter checks BigBird's; ``tests/test_hybrid.py`` checks that a
:class:`PatternAttention` state loads into :class:`~attn.hybrid.BigBirdAttention`
with the same layout and gives the same output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AttentionOutput
from ..global_attention import global_mask
from ..hybrid import bigbird_layout, bigbird_mask
from ..masks import band_mask
from ..models import TransformerBlock
from ..multihead import MultiHeadAttention
from ..train import cpu_threads, evaluate, set_seed

__all__ = [
    "ARMS",
    "MarkedRecall",
    "PatternAttention",
    "MarkedRecallModel",
    "RecallConfig",
    "RecallRuns",
    "arm_mask",
    "marked_loss",
    "reach",
    "reach_per_hop",
    "run_marked_recall",
]

#: The chapter's arms, in the order the tables list them.
ARMS: tuple[str, ...] = ("local", "global tokens (Longformer)", "BigBird r=0", "BigBird r=1", "dense")


@dataclass
class MarkedRecall:
    """``[CLS] p_1 .. p_P [Q]`` with one pair marked; output the marked pair's value at ``[Q]``.

    Pair ``i`` is a random key ``k_i`` in ``0 .. n_keys - 1`` and value ``v_i`` in
    ``0 .. n_values - 1``; ``where`` (uniform over the pairs) is the marked one.
    The sequence has ``n = n_pairs + 2`` tokens: ``[CLS]`` at position 0, pair
    ``i`` at position ``i + 1``, ``[Q]`` at position ``n - 1``. Chance is ``1 / n_values``.

    ``sample(batch, generator)`` -> ``keys, values (B, P)`` long, ``where (B,)`` (pair index),
    ``y (B,)`` (the marked value).
    """

    n_pairs: int = 64
    n_keys: int = 16
    n_values: int = 8

    def __post_init__(self) -> None:
        if self.n_pairs < 1 or self.n_keys < 1 or self.n_values < 2:
            raise ValueError(f"need n_pairs, n_keys >= 1 and n_values >= 2, got {self.n_pairs}, {self.n_keys}, "
                             f"{self.n_values}")

    @property
    def length(self) -> int:
        """Tokens per sequence: the pairs, ``[CLS]`` and ``[Q]``."""
        return self.n_pairs + 2

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        keys = torch.randint(0, self.n_keys, (batch_size, self.n_pairs), generator=generator)
        values = torch.randint(0, self.n_values, (batch_size, self.n_pairs), generator=generator)
        where = torch.randint(0, self.n_pairs, (batch_size,), generator=generator)
        return {"keys": keys, "values": values, "where": where, "y": values[torch.arange(batch_size), where]}


@dataclass(frozen=True)
class RecallConfig:
    """Sizes of the experiment: task, model, the patterns' parameters and the budget.

    ``window`` is the token window of ``local`` and Longformer (``|t - j| <= window``);
    BigBird uses blocks of ``block`` tokens with one neighbouring block on each side
    (a query reads ``block .. 2 block - 1`` tokens on each side) and the first block
    global; Longformer's global tokens are the same ``block`` first positions
    (``[CLS]`` and the first pairs), so both hubs have the same size.
    """

    n_pairs: int = 64
    n_values: int = 8
    embed_dim: int = 32
    num_heads: int = 2
    num_layers: int = 2
    window: int = 6
    block: int = 4
    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-3
    eval_batch: int = 256
    ffn_mult: int = 0
    mark_std: float = 1.0


def arm_mask(arm: str, n: int, heads: int, seed: int, config: RecallConfig) -> Tensor:
    """The ``(heads, n, n)`` boolean pattern of ``arm`` (``True`` = may attend), its layout drawn from ``seed``.

    ``local``: ``|t - j| <= window``; ``global tokens (Longformer)``: that band plus
    full rows and columns at positions ``0 .. block - 1``
    (:func:`~attn.global_attention.global_mask`); ``BigBird r=<r>``: blocks of
    ``block``, window of one block each side, block 0 global, ``r`` random blocks
    per query block and head (:func:`~attn.hybrid.bigbird_layout` with ``seed``);
    ``dense``: everything.
    """
    if arm == "local":
        m = band_mask(n, config.window)
    elif arm == "global tokens (Longformer)":
        m = global_mask(n, tuple(range(config.block)), config.window)
    elif arm.startswith("BigBird r="):
        r = int(arm.split("=", 1)[1])
        nb = -(-n // config.block)
        layout = bigbird_layout(nb, 1, (0,), r, heads, seed=seed)
        return bigbird_mask(n, config.block, layout)
    elif arm == "dense":
        m = torch.ones(n, n, dtype=torch.bool)
    else:
        raise ValueError(f"unknown arm {arm!r}; one of {', '.join(ARMS)} (or 'BigBird r=<int>')")
    return m.expand(heads, n, n).clone()


def reach(mask: Tensor, layers: int) -> Tensor:
    r"""Which keys each query can be influenced by after ``layers`` layers: ``(n, n)`` boolean.

    ``mask`` is ``(n, n)`` or ``(h, n, n)`` (union over heads: a layer's output
    mixes all heads). With the residual stream a token keeps what it had, so the
    one-layer graph is :math:`A = I \lor \bigvee_h M_h` and the ``L``-layer reach is the
    boolean power :math:`A^L` (:math:`(A^L)_{tj}` = a path of at most ``L`` edges
    from key ``j`` to query ``t``).
    """
    if layers < 0:
        raise ValueError(f"layers must be >= 0, got {layers}")
    a = mask if mask.ndim == 2 else mask.any(0)
    n = a.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    a = a | eye
    r = eye.clone()
    af = a.float()
    for _ in range(layers):
        r = (r.float() @ af) > 0
    return r


def reach_per_hop(mask: Tensor, max_layers: int, query: int = -1) -> list[float]:
    """Fraction of the ``n`` positions that ``query``'s output can depend on after ``1 .. max_layers`` layers."""
    return [float(reach(mask, L)[query].float().mean()) for L in range(1, max_layers + 1)]


class PatternAttention(nn.Module):
    """Multi-head self-attention under a fixed ``(h, n, n)`` pattern, computed as dense scores with the mask.

    The labelled reference path of every pattern of the chapter (module docstring):
    :class:`~attn.multihead.MultiHeadAttention` (its parameters, so a state dict
    loads into :class:`~attn.hybrid.BigBirdAttention` or
    :class:`~attn.global_attention.GlobalTokenAttention`) with ``attn_mask = pattern``.
    ``forward(x (B, n, E), ...)`` -> :class:`~attn.core.AttentionOutput`.
    """

    pattern: Tensor

    def __init__(self, embed_dim: int, num_heads: int, pattern: Tensor) -> None:
        super().__init__()
        if pattern.ndim != 3 or pattern.shape[0] != num_heads or pattern.dtype != torch.bool:
            raise ValueError(f"pattern must be a bool tensor (num_heads={num_heads}, n, n), got "
                             f"{tuple(pattern.shape)} {pattern.dtype}")
        self.attention = MultiHeadAttention(embed_dim, num_heads)
        self.register_buffer("pattern", pattern, persistent=False)

    def forward(self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None,
                need_weights: bool = False) -> AttentionOutput:
        out: AttentionOutput = self.attention(x, key_mask=key_mask, attn_mask=self.pattern[None],
                                              need_weights=need_weights)
        return out


class MarkedRecallModel(nn.Module):
    r"""Embeddings, ``L`` pre-norm blocks around one pattern each, readout at ``[Q]``.

    ``h_t = E_k[k] + E_v[v] + p_t`` for a pair, plus ``e_mark`` on the marked pair;
    ``e_cls + p_0`` and ``e_q + p_{n-1}`` for the two special tokens; then
    ``L`` :class:`~attn.models.TransformerBlock` s (attention only with
    ``ffn_mult = 0``) and ``logits = W LN(h_{n-1})``.
    Shapes: ``keys, values (B, P)``, ``where (B,)`` -> ``(B, n_values)``.
    """

    def __init__(self, task: MarkedRecall, config: RecallConfig, patterns: Sequence[Tensor]) -> None:
        super().__init__()
        E = config.embed_dim
        self.task = task
        self.key = nn.Embedding(task.n_keys, E)
        self.value = nn.Embedding(task.n_values, E)
        self.special = nn.Parameter(torch.randn(3, E))  # [CLS], [Q], the mark
        with torch.no_grad():
            self.special[2].mul_(config.mark_std)
        self.pos = nn.Parameter(torch.randn(task.length, E) * 0.3)
        self.blocks = nn.ModuleList(
            TransformerBlock(PatternAttention(E, config.num_heads, p), E, config.ffn_mult) for p in patterns
        )
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, task.n_values)

    def forward(self, keys: Tensor, values: Tensor, where: Tensor, need_weights: bool = False
                ) -> tuple[Tensor, list[Tensor | None]]:
        B = keys.shape[0]
        pairs = self.key(keys) + self.value(values)  # (B, P, E)
        pairs = pairs + F.one_hot(where, self.task.n_pairs).to(pairs.dtype)[..., None] * self.special[2]
        cls, q = self.special[0].expand(B, 1, -1), self.special[1].expand(B, 1, -1)
        h = torch.cat([cls, pairs, q], 1) + self.pos  # (B, n, E)
        weights: list[Tensor | None] = []
        for block in self.blocks:
            h, w = block(h, need_weights=need_weights)
            weights.append(w)
        return self.head(self.norm(h[:, -1])), weights


def marked_loss(model: MarkedRecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the marked value, and accuracy."""
    logits, _ = model(batch["keys"], batch["values"], batch["where"])
    return F.cross_entropy(logits, batch["y"]), {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


@dataclass
class RecallRuns:
    """Per arm, one value per seed (in ``seeds`` order).

    ``accuracy``: held-out accuracy after the budget; ``reachable``: the fraction of
    pairs within the query's ``L``-hop reach under that seed's layout (:func:`reach`);
    ``ceiling``: the accuracy that reach allows, ``reachable + (1 - reachable) / n_values``
    (a pair out of reach is a guess); ``steps_to_target``: the first of two consecutive
    logged steps at which the training-batch accuracy was at least ``target`` (training
    stops there; ``None``: not within ``config.steps``); ``curves``: training accuracy
    per logged step, one list per seed (shorter when the run stopped early).
    """

    seeds: list[int]
    config: RecallConfig
    target: float
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    reachable: dict[str, list[float]] = field(default_factory=dict)
    ceiling: dict[str, list[float]] = field(default_factory=dict)
    steps_to_target: dict[str, list[int | None]] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    log_every: int = 10


def run_marked_recall(arms: Sequence[str] = ARMS, seeds: Sequence[int] = (0, 1, 2),
                      config: RecallConfig | None = None, target: float = 0.95,
                      device: torch.device | str = "cpu", log_every: int = 10) -> RecallRuns:
    """Train every arm on :class:`MarkedRecall` once per seed: same seeds, batches and budget for every arm.

    Seed ``s`` seeds the model's initialisation, the training batches and the
    random layouts of the BigBird arms (layout seed = training seed; layer ``l``
    uses ``1000 s + l``). Adam (``config.lr``, gradient norm clipped at 1), one CPU
    thread, at most ``config.steps`` steps; a run **stops early** once its
    training-batch accuracy is at least ``target`` at two consecutive logs (every
    ``log_every`` steps): it has learned the task, and the budget is spent on the
    runs that have not. Each run is then evaluated on one held-out batch
    (seed ``10_000 + s``).
    """
    cfg = config or RecallConfig()
    task = MarkedRecall(cfg.n_pairs, n_values=cfg.n_values)
    n, P = task.length, cfg.n_pairs
    runs = RecallRuns(seeds=list(seeds), config=cfg, target=target, log_every=log_every)
    for arm in arms:
        for key in ("accuracy", "reachable", "ceiling", "steps_to_target", "curves"):
            getattr(runs, key)[arm] = []
        for s in seeds:
            patterns = [arm_mask(arm, n, cfg.num_heads, s * 1000 + layer, cfg) for layer in range(cfg.num_layers)]
            gen = set_seed(s)
            model = MarkedRecallModel(task, cfg, patterns).to(device)
            with cpu_threads(1 if torch.device(device).type == "cpu" else None):
                curve, reached = _train_until(model, task, cfg, gen, target, log_every, device)
            ev = evaluate(model, task.sample, marked_loss, batch_size=cfg.eval_batch, seed=10_000 + s, device=device)
            r = _reach_layers(patterns)[-1, 1 : P + 1].float().mean().item()
            runs.accuracy[arm].append(ev["acc"])
            runs.reachable[arm].append(r)
            runs.ceiling[arm].append(r + (1 - r) / cfg.n_values)
            runs.steps_to_target[arm].append(reached)
            runs.curves[arm].append(curve)
    return runs


def _train_until(model: MarkedRecallModel, task: MarkedRecall, cfg: RecallConfig, gen: torch.Generator,
                 target: float, log_every: int, device: torch.device | str) -> tuple[list[float], int | None]:
    """Adam on fresh batches until two consecutive logged accuracies reach ``target`` or ``cfg.steps`` run out."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    curve: list[float] = []
    for step in range(1, cfg.steps + 1):
        batch = {k: v.to(device) for k, v in task.sample(cfg.batch_size, gen).items()}
        loss, metrics = marked_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0:
            curve.append(metrics["acc"])
            if len(curve) >= 2 and min(curve[-2:]) >= target:
                model.eval()
                return curve, step - log_every
    model.eval()
    return curve, None


def _reach_layers(patterns: Sequence[Tensor]) -> Tensor:
    """Reach through a stack of (possibly different) per-layer patterns: ``(n, n)`` boolean, query by key."""
    n = patterns[0].shape[-1]
    eye = torch.eye(n, dtype=torch.bool)
    r = eye.clone()
    for p in patterns:  # layer 1 first: the output after layer l depends on keys within reach
        a = (p.any(0) | eye).float()
        r = (a @ r.float()) > 0
    return r
