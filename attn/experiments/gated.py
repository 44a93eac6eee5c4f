"""Chapter 20's experiments (gated attention): multiple-instance bags for gated MIL pooling (prototype bags for
an MLP encoder, product bags whose keys no linear score can rank), the copy task and the small causal LM that
shows the attention sink, the multi-seed runners, and the measures (first-token mass, copy-read weight, gate
values and their correlation with the sink).

The layers (:class:`~attn.gated.GatedAttention`, :class:`~attn.gated.GatedAttentionUnit`,
:class:`~attn.gated.GatedMILPooling`) are in :mod:`attn.gated`. Ilse et al. 2018 (MIL); Qiu et al. 2025 (the sink).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_tensor
from ..gated import Gate, GatedAttention, GatedMILPooling
from ..registry import OwnTask
from ..train import History, set_seed, train
from . import sized

__all__ = ["BagTask", "ProductBagTask", "MILModel", "MILRun", "mil_loss", "mil_runs", "mil_task", "CopyLMTask",
           "SinkLM", "SinkRun", "lm_loss", "sink_runs", "first_token_mass", "gate_values", "gate_sink_correlation",
           "copy_read_weight", "OWN_TASKS"]


# ----------------------------------------------------------------------------- multiple-instance bags


@dataclass
class BagTask:
    """Multiple-instance bags generated in code: is a *key* instance in the bag?

    Each instance is one of ``n_classes`` prototypes (random unit vectors in
    ``R^dim``) plus Gaussian noise ``noise``; a bag holds ``min_size..max_size``
    instances (padding after them); it is positive iff it holds at least one
    instance of class 0 (like MNIST-bags with the digit 9). Half the bags are
    positive, with 1 to 3 key instances.
    """

    dim: int = 16
    n_classes: int = 10
    min_size: int = 5
    max_size: int = 15
    noise: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.n_classes < 2 or self.dim < 1:
            raise ValueError(f"need n_classes >= 2 and dim >= 1, got {self.n_classes}, {self.dim}")
        g = torch.Generator().manual_seed(self.seed)
        self.prototypes = F.normalize(torch.randn(self.n_classes, self.dim, generator=g), dim=-1) * 2.0

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``x (B, max_size, dim)``, ``key_mask (B, max_size)`` (True = real instance), ``y (B,)`` float 0/1,
        ``key (B, max_size)`` bool (the class-0 instances)."""
        b, kmax = batch_size, self.max_size
        sizes = torch.randint(self.min_size, kmax + 1, (b,), generator=generator)
        mask = torch.arange(kmax)[None, :] < sizes[:, None]
        cls = torch.randint(1, self.n_classes, (b, kmax), generator=generator)  # negatives: classes 1..
        y = torch.rand(b, generator=generator) < 0.5
        n_key = torch.randint(1, 4, (b,), generator=generator)
        order = torch.rand(b, kmax, generator=generator).masked_fill(~mask, 2.0).argsort(-1)  # real slots first, shuffled
        rank = order.argsort(-1)
        key = (rank < n_key[:, None]) & y[:, None] & mask
        cls = cls.masked_fill(key, 0)
        x = self.prototypes[cls] + self.noise * torch.randn(b, kmax, self.dim, generator=generator)
        x = x * mask[..., None]
        return {"x": x, "key_mask": mask, "y": y.float(), "key": key}


@dataclass
class ProductBagTask:
    r"""Bags whose key instances are defined by a *product* of two coordinates: no linear score ranks them.

    Instances live in ``R^dim`` (no prototypes, no encoder needed). An instance is a **key** iff
    ``x_1 x_2 > threshold`` (both coordinates large, same sign: two opposite quadrant corners). Non-keys
    are ``N(0, I)`` draws whose ``x_1`` is negated wherever ``x_1 x_2 > threshold`` (so the
    opposite corners, ``x_1 x_2 < -threshold``, are crowded with non-keys of the same magnitudes); keys
    are ``x_{1,2} = s (1 + |e_{1,2}|)`` with a random sign ``s`` and ``e \sim N(0, 1)`` (so
    ``x_1 x_2 >= 1``), the other coordinates ``N(0, 1)``. The key set is symmetric under ``x -> -x``:
    every linear score ``w^T x`` takes the same values on keys and on their mirror images, and a
    monotone function of one linear score (``tanh(v^T x)``, one hidden unit of Ilse et al.'s plain
    pooling) cannot put the keys above the non-keys; a product ``tanh(v^T x) sigma(u^T x)`` (one gated
    unit) can. Bags hold ``min_size..max_size`` instances, half the bags are positive with 1 to 3 keys.
    """

    dim: int = 8
    min_size: int = 5
    max_size: int = 15
    threshold: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.dim < 2 or not 0 <= self.threshold <= 1:
            raise ValueError(f"need dim >= 2 and 0 <= threshold <= 1, got {self.dim}, {self.threshold}")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``x (B, max_size, dim)``, ``key_mask (B, max_size)`` (True = real instance), ``y (B,)`` float 0/1,
        ``key (B, max_size)`` bool."""
        b, kmax = batch_size, self.max_size
        sizes = torch.randint(self.min_size, kmax + 1, (b,), generator=generator)
        mask = torch.arange(kmax)[None, :] < sizes[:, None]
        x = torch.randn(b, kmax, self.dim, generator=generator)
        x[..., 0] = torch.where(x[..., 0] * x[..., 1] > self.threshold, -x[..., 0], x[..., 0])  # no key by chance
        y = torch.rand(b, generator=generator) < 0.5
        n_key = torch.randint(1, 4, (b,), generator=generator)
        order = torch.rand(b, kmax, generator=generator).masked_fill(~mask, 2.0).argsort(-1)
        key = (order.argsort(-1) < n_key[:, None]) & y[:, None] & mask  # n_key random real slots of a positive bag
        sign = torch.where(torch.rand(b, kmax, generator=generator) < 0.5, -1.0, 1.0)
        corner = sign[..., None] * (1 + torch.randn(b, kmax, 2, generator=generator).abs())  # x_1 x_2 >= 1
        x[..., :2] = torch.where(key[..., None], corner, x[..., :2])
        x = x * mask[..., None]
        return {"x": x, "key_mask": mask, "y": y.float(), "key": key}


class MILModel(nn.Module):
    """Instance encoder -> (gated) attention pooling -> bag logit.

    ``encoder="mlp"`` (default): a two-layer ReLU MLP per instance, then a linear head (the prototype
    bags). ``encoder="linear"``: one linear map per instance, so the only non-linearity that can *rank*
    instances is the pooling score; the head is then a one-hidden-layer MLP on the pooled vector
    ``z`` (it may read ``z`` non-linearly, but ``z`` holds whatever the pooling picked).
    """

    def __init__(self, in_dim: int, hidden: int = 32, attn_dim: int = 16, gated: bool = True,
                 encoder: Literal["mlp", "linear"] = "mlp") -> None:
        super().__init__()
        self.encoder: nn.Module
        self.head: nn.Module
        if encoder == "mlp":
            self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
            self.head = nn.Linear(hidden, 1)
        elif encoder == "linear":
            self.encoder = nn.Linear(in_dim, hidden)
            self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        else:
            raise ValueError(f"encoder must be 'mlp' or 'linear', got {encoder!r}")
        self.pool = GatedMILPooling(hidden, attn_dim, gated=gated)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x (B, K, M)`` -> bag logits ``(B,)`` and instance weights ``(B, K)``."""
        z, a = self.pool(self.encoder(x), key_mask=key_mask)
        return self.head(z)[:, 0], a


def mil_loss(model: MILModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Binary cross-entropy on the bag label; accuracy."""
    logit, _ = model(batch["x"], batch["key_mask"])
    loss = F.binary_cross_entropy_with_logits(logit, batch["y"])
    return loss, {"acc": float(((logit > 0).float() == batch["y"]).float().mean())}


def mil_task(size: str = "full") -> OwnTask[MILModel]:
    """The comparison's own task for gated MIL pooling: :class:`BagTask` bags, the pooling layer alone for the cost."""
    steps = sized(size, quick=30, book=150, full=300, large=600)
    task = BagTask()
    model = MILModel(task.dim)
    layer = GatedMILPooling(64, 32)

    def inputs(n: int, generator: torch.Generator) -> tuple[Tensor]:
        return (torch.randn(8, n, 64, generator=generator),)

    def weights(m: MILModel, b: dict[str, Tensor]) -> Tensor:
        return m(b["x"], b["key_mask"])[1]

    sizes = sized(size, quick=(16, 64, 256), book=(64, 256, 1024, 4096), full=(64, 256, 1024, 4096),
                  large=(64, 256, 1024, 4096))
    return OwnTask(
        description="MIL bags: is a class-0 instance in the bag? (5-15 noisy prototype instances)",
        model=model, sample=task.sample, loss=mil_loss, layer=layer, inputs=inputs, sizes=sizes,
        size_unit="instances", steps=steps, batch_size=32, lr=3e-3, target_acc=0.9, weights=weights,
    )


OWN_TASKS = {"gated_mil": mil_task}


@dataclass
class MILRun:
    """One trained MIL model: its arm (``"gated"`` or ``"plain"`` pooling), seed, model and curves."""

    arm: str
    seed: int
    model: MILModel
    history: History


def mil_runs(task: BagTask | ProductBagTask, seeds: Sequence[int], *, steps: int, batch_size: int = 32,
             lr: float = 3e-3, encoder: Literal["mlp", "linear"] = "linear", hidden: int = 16,
             attn_dim: int = 16, device: torch.device | str = "cpu") -> list[MILRun]:
    """Train gated and plain pooling on ``task`` for every seed: same initialisation seed (``2000 + seed``:
    the shared layers start equal), same batches (data seed ``seed``), same steps; models returned on CPU."""
    runs = []
    for s in seeds:
        for arm in ("gated", "plain"):
            set_seed(2000 + s)
            model = MILModel(task.dim, hidden=hidden, attn_dim=attn_dim, gated=arm == "gated", encoder=encoder)
            hist = train(model, task.sample, mil_loss, steps=steps, batch_size=batch_size, lr=lr, seed=s,
                         progress=False, device=device)
            runs.append(MILRun(arm, s, model.cpu().eval(), hist))
    return runs


# ----------------------------------------------------------------------------- the attention sink experiment


@dataclass
class CopyLMTask:
    """Sequences for a tiny causal LM: ``BOS``, a random segment, then the same segment again.

    Token 0 is ``BOS`` (always first). The first half is random
    (``1 .. vocab-1``, nothing to predict from context beyond chance); the
    second half repeats it, so predicting it needs attention to the copy
    (induction). Heads have nothing useful to read in the first half: the
    situation in which softmax attention parks its weight on a sink.
    """

    vocab: int = 32
    segment: int = 16

    def __post_init__(self) -> None:
        if self.vocab < 3 or self.segment < 1:
            raise ValueError(f"need vocab >= 3 and segment >= 1, got {self.vocab}, {self.segment}")

    @property
    def length(self) -> int:
        return 1 + 2 * self.segment

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``x (B, 2 segment + 1)`` tokens; the target is ``x`` shifted by one."""
        seg = torch.randint(1, self.vocab, (batch_size, self.segment), generator=generator)
        bos = torch.zeros(batch_size, 1, dtype=torch.long)
        return {"x": torch.cat([bos, seg, seg], 1)}


class SinkLM(nn.Module):
    """A small pre-norm causal transformer LM whose attention layers are :class:`~attn.gated.GatedAttention`.

    ``gate=None`` gives the ungated baseline with otherwise identical layers. Learned absolute positions
    start at ``N(0, position_std^2)``: with the default 1 (as ``nn.Embedding``, and chapter 29's copy LM) the
    positions are as distinct as the tokens from the start and the copy task is learned in about 50 steps;
    at 0.02 the model spends its budget discovering positions (copy accuracy 0.27-0.35 after 150 steps).
    Shapes: ``x (B, n)`` token ids -> logits ``(B, n, vocab)`` and, with
    ``need_weights``, one ``(B, h, n, n)`` weight tensor per layer.

    Not :class:`attn.models.TokenLM`: its output layer has a bias (TokenLM's has none), and the chapter's
    printed measurements were made with this parameter layout.
    """

    def __init__(self, vocab: int, max_len: int, embed_dim: int = 64, num_heads: int = 4, layers: int = 2,
                 gate: Gate | None = "elementwise", position_std: float = 1.0) -> None:
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.embed = nn.Embedding(vocab, embed_dim)
        self.pos = nn.Parameter(torch.randn(max_len, embed_dim) * position_std)
        self.attn = nn.ModuleList(GatedAttention(embed_dim, num_heads, gate=gate, causal=True) for _ in range(layers))
        self.norm1 = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(layers))
        self.norm2 = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(layers))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.GELU(), nn.Linear(4 * embed_dim, embed_dim)) for _ in range(layers)
        )
        self.out_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab)

    def set_gate_offset(self, offset: float) -> None:
        """Add ``offset`` to every layer's gate logits (``inf``: gates forced to 1)."""
        for layer in self.attn:
            assert isinstance(layer, GatedAttention)  # self.attn holds only GatedAttention layers
            layer.gate_offset = offset

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor | None]]:
        if not isinstance(x, Tensor) or x.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"x must be an integer tensor of token ids (batch, seq), got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2 or not 1 <= x.shape[1] <= self.max_len:
            raise ValueError(f"x must have shape (batch, seq) with 1 <= seq <= {self.max_len}, got {tuple(x.shape)}")
        h = self.embed(x) + self.pos[: x.shape[1]]
        weights: list[Tensor | None] = []
        for attn, n1, n2, mlp in zip(self.attn, self.norm1, self.norm2, self.mlp, strict=True):
            out = attn(n1(h), need_weights=need_weights)
            h = h + out.output
            h = h + mlp(n2(h))
            if need_weights:
                weights.append(out.weights)
        return self.head(self.out_norm(h)), weights


def lm_loss(model: SinkLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy on every position; ``acc`` and ``copy_acc`` (accuracy on the repeated half)."""
    x = batch["x"]
    logits, _ = model(x[:, :-1])
    target = x[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    pred = logits.argmax(-1) == target
    half = (x.shape[1] - 1) // 2
    return loss, {"acc": float(pred.float().mean()), "copy_acc": float(pred[:, half:].float().mean())}


def first_token_mass(weights: Tensor, first_query: int = 1, end_query: int | None = None) -> Tensor:
    """Mean attention weight on key 0 over queries ``first_query .. end_query - 1``: ``(..., n, n) -> (...)``.

    Query 0 sees only key 0 under a causal mask (its weight is 1 by
    construction), so it is left out by default. ``end_query=None``: up to the last query.
    """
    w = check_tensor(weights, "weights", "(..., n, n)")
    if w.ndim < 2 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights must have shape (..., n, n), got {tuple(w.shape)}")
    end = w.shape[-2] if end_query is None else end_query
    if not 0 <= first_query < end <= w.shape[-2]:
        raise ValueError(f"need 0 <= first_query < end_query <= {w.shape[-2]}, got {first_query}, {end_query}")
    return w[..., first_query:end, 0].mean(-1)


def copy_read_weight(weights: Tensor, segment: int) -> Tensor:
    """Weight that the copy's queries put on the token to be copied: ``(..., n, n) -> (...)``.

    On ``BOS, s_1..s_m, s_1..s_m`` (the model reads ``x[:, :-1]``, ``n = 2m``), query ``t = m .. 2m-1``
    predicts ``s_{t-m+1}``, which sits at position ``t - m + 1`` of the first segment: the induction
    diagonal. Returns the mean of ``a_{t, t-m+1}`` over those queries (a uniform row gives about
    ``1 / (1.5 m)``).
    """
    w = check_tensor(weights, "weights", "(..., n, n)")
    if w.ndim < 2 or w.shape[-1] != w.shape[-2] or w.shape[-1] < 2 * segment or segment < 1:
        raise ValueError(f"weights must have shape (..., n, n) with n >= 2 segment = {2 * segment}, "
                         f"got {tuple(w.shape)}")
    t = torch.arange(segment, 2 * segment)
    return w[..., t, t - segment + 1].mean(-1)


def gate_values(model: SinkLM, x: Tensor) -> list[Tensor]:
    """The gate ``sigma(X W^G + b^G + offset)`` of every attention layer on tokens ``x (B, n)``.

    Read with a forward hook on each layer's input (the normed residual stream), without gradients;
    returns one ``(B, h, n, d_h)`` tensor per layer (all ones for an ungated model).
    """
    gates: list[Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, inp, out: gates.append(m.gate(inp[0]))) for layer in model.attn]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return gates


def gate_sink_correlation(gate: Tensor, weights: Tensor, first_query: int = 1) -> float:
    """Pearson correlation, over examples, heads and queries ``t >= first_query``, between a head's mean gate
    for query ``t`` (mean over its ``d_h`` channels) and the weight the same head puts on token 0.

    ``gate (B, h, n, d_h)``, ``weights (B, h, n, n)``. Negative: where a head parks weight on the first
    token, its gate is more closed (the gate and the sink do the same "say nothing" job).
    """
    g = check_tensor(gate, "gate", "(batch, heads, n, d_h)", 4).mean(-1)[..., first_query:]
    w = check_tensor(weights, "weights", "(batch, heads, n, n)", 4)
    if w.shape[:3] != gate.shape[:3]:
        raise ValueError(f"gate {tuple(gate.shape)} and weights {tuple(w.shape)} must share (batch, heads, n)")
    a0 = w[..., first_query:, 0]
    return float(torch.corrcoef(torch.stack([g.flatten(), a0.flatten()]).double())[0, 1])


@dataclass
class SinkRun:
    """One trained LM of the sink experiment: its arm (``"gated"`` or ``"ungated"``), seed, model, curves."""

    arm: str
    seed: int
    model: SinkLM
    history: History


def sink_runs(task: CopyLMTask, seeds: Sequence[int], *, steps: int, batch_size: int = 32, lr: float = 1e-2,
              embed_dim: int = 32, num_heads: int = 2, layers: int = 2, position_std: float = 1.0,
              device: torch.device | str = "cpu") -> list[SinkRun]:
    """Train a gated (``"elementwise"``) and an ungated :class:`SinkLM` on ``task`` for every seed.

    Both arms of a seed share the initialisation seed (``1000 + seed``) and the batches (data seed
    ``seed``), the steps and the learning rate; models are returned on CPU in eval mode.
    """
    runs = []
    arms: tuple[tuple[str, Gate | None], ...] = (("gated", "elementwise"), ("ungated", None))
    for s in seeds:
        for arm, gate in arms:
            set_seed(1000 + s)
            model = SinkLM(task.vocab, task.length, embed_dim, num_heads, layers=layers,
                           gate=gate, position_std=position_std)
            hist = train(model, task.sample, lm_loss, steps=steps, batch_size=batch_size, lr=lr, seed=s,
                         progress=False, device=device)
            runs.append(SinkRun(arm, s, model.cpu().eval(), hist))
    return runs
