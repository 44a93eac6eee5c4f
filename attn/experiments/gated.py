"""Chapter 20's experiments (gated attention): multiple-instance bags for gated MIL pooling, the copy task and
the small causal LM that shows the attention sink, and the sink's measure (first-token mass).

The layers (:class:`~attn.gated.GatedAttention`, :class:`~attn.gated.GatedAttentionUnit`,
:class:`~attn.gated.GatedMILPooling`) are in :mod:`attn.gated`. Ilse et al. 2018 (MIL); Qiu et al. 2025 (the sink).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_tensor
from ..gated import Gate, GatedAttention, GatedMILPooling
from ..registry import OwnTask
from . import sized

__all__ = ["BagTask", "MILModel", "mil_loss", "mil_task", "CopyLMTask", "SinkLM", "lm_loss", "first_token_mass",
           "OWN_TASKS"]


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


class MILModel(nn.Module):
    """Instance encoder (two-layer MLP) -> (gated) attention pooling -> bag logit."""

    def __init__(self, in_dim: int, hidden: int = 32, attn_dim: int = 16, gated: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.pool = GatedMILPooling(hidden, attn_dim, gated=gated)
        self.head = nn.Linear(hidden, 1)

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

    ``gate=None`` gives the ungated baseline with otherwise identical layers.
    Shapes: ``x (B, n)`` token ids -> logits ``(B, n, vocab)`` and, with
    ``need_weights``, one ``(B, h, n, n)`` weight tensor per layer.

    Not :class:`attn.models.TokenLM`: its output layer has a bias (TokenLM's has none), and the chapter's
    printed measurements were made with this parameter layout.
    """

    def __init__(self, vocab: int, max_len: int, embed_dim: int = 64, num_heads: int = 4, layers: int = 2,
                 gate: Gate | None = "elementwise") -> None:
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.embed = nn.Embedding(vocab, embed_dim)
        self.pos = nn.Parameter(torch.randn(max_len, embed_dim) * 0.02)
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


def first_token_mass(weights: Tensor, first_query: int = 1) -> Tensor:
    """Mean attention weight on key 0 over queries ``first_query..n-1``: ``(..., n, n) -> (...)``.

    Query 0 sees only key 0 under a causal mask (its weight is 1 by
    construction), so it is left out by default.
    """
    w = check_tensor(weights, "weights", "(..., n, n)")
    if w.ndim < 2 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights must have shape (..., n, n), got {tuple(w.shape)}")
    if not 0 <= first_query < w.shape[-2]:
        raise ValueError(f"first_query must be in [0, {w.shape[-2]}), got {first_query}")
    return w[..., first_query:, 0].mean(-1)
