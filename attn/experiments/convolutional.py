"""Chapter 18's experiments (convolutional attention).

* CBAM (Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018): which class is the target on
  an image that also holds a *marked distractor* (:class:`MarkedDistractor`), learned by a small CNN
  without attention, with channel attention only (squeeze-and-excitation's place), spatial attention only,
  or both (CBAM) -- the paper's ablation (section 4.1) on a task where the spatial map must damp the
  distractor (:func:`run_cbam_ablation`, :func:`gate_on_box`). :class:`ShapeImages` (one shape in clutter)
  is CBAM's own task for the comparison.
* Primer (So et al., "Primer: Searching for Efficient Transformers for Language Modeling", NeurIPS 2021):
  a one-layer induction task ``... A B ... A -> B`` (:class:`InductionTask`) where the causally convolved
  key at ``B``'s position already holds ``A``, so one multi-DConv-head layer does what plain attention needs
  two layers for (:func:`run_induction`).

The layers (:class:`~attn.convolutional.CBAM`, :class:`~attn.convolutional.MultiDConvHeadAttention`) are in
:mod:`attn.convolutional`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_tensor
from ..convolutional import CBAM, CBAMOutput, ChannelAttention, MultiDConvHeadAttention, SpatialAttention
from ..models import TokenLM
from ..multihead import MultiHeadAttention
from ..registry import OwnTask
from ..train import History, train
from . import sized

__all__ = [
    "ShapeImages", "ShapeNet", "shape_loss", "spatial_mass_on_object", "cbam_task", "OWN_TASKS",
    "MarkedDistractor", "BatchStream", "gate_on_box", "AblationResult", "run_cbam_ablation", "GATES",
    "InductionTask", "induction_model", "induction_loss", "train_to_target", "InductionResult", "run_induction",
    "INDUCTION_ARMS",
]

#: The arms of CBAM's ablation: which gates the classifier has.
Gates = Literal["none", "channel", "spatial", "both"]
GATES: tuple[Gates, ...] = ("none", "channel", "spatial", "both")


def _shape_patterns() -> Tensor:
    """Four 5 x 5 binary shapes: plus, cross, ring (square outline), diamond. ``(4, 5, 5)``."""
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    plus = (i == 2) | (j == 2)
    cross = (i == j) | (i + j == 4)
    ring = (i == 0) | (i == 4) | (j == 0) | (j == 4)
    diamond = (i - 2).abs() + (j - 2).abs() == 2
    return torch.stack([plus, cross, ring, diamond]).float()


class ShapeImages:
    """One of four 5 x 5 shapes at a random place on a noisy, cluttered image; the label is the shape.

    The background holds Gaussian noise and ``clutter`` short strokes (1 x 3
    or 3 x 1 bars, pieces the shapes are also made of), so that a small
    filter firing on a stroke does not tell the shapes apart: a classifier
    must find the one place where the strokes form a shape. ``sample``
    returns ``x (B, 1, size, size)``, ``y (B,)`` and ``box (B, size, size)``,
    the object's 5 x 5 square (to measure where the spatial attention goes).

    Args:
        size: image side (``>= 5``).
        noise: standard deviation of the background noise.
        clutter: strokes drawn per image.
    """

    classes = ("plus", "cross", "ring", "diamond")

    def __init__(self, size: int = 16, noise: float = 0.3, clutter: int = 3) -> None:
        if size < 5:
            raise ValueError(f"size must be >= 5 (the shapes are 5 x 5), got {size}")
        self.size, self.noise, self.clutter = size, noise, clutter
        self.patterns = _shape_patterns()

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        s = self.size
        x = torch.randn(batch_size, s, s, generator=generator) * self.noise
        y = torch.randint(0, 4, (batch_size,), generator=generator)
        top = torch.randint(0, s - 4, (batch_size,), generator=generator)
        left = torch.randint(0, s - 4, (batch_size,), generator=generator)
        rows = torch.arange(s)
        box = ((rows[None, :, None] >= top[:, None, None]) & (rows[None, :, None] < top[:, None, None] + 5)
               & (rows[None, None, :] >= left[:, None, None]) & (rows[None, None, :] < left[:, None, None] + 5))  # (B, s, s)
        # clutter: bars of 3 pixels, horizontal or vertical, anywhere
        rows_b = torch.arange(batch_size)
        for _ in range(self.clutter):
            vert = torch.rand(batch_size, generator=generator) < 0.5
            a = torch.randint(0, s - 2, (batch_size,), generator=generator)  # start along the bar
            b = torch.randint(0, s, (batch_size,), generator=generator)  # position across it
            for t in range(3):
                x[rows_b, torch.where(vert, a + t, b), torch.where(vert, b, a + t)] += 1.0
        # the shape, added inside its box: pixel (r, c) takes pattern[y][r - top, c - left]
        dr = (rows[None, :] - top[:, None]).clamp(0, 4)  # (B, s)
        dc = (rows[None, :] - left[:, None]).clamp(0, 4)  # (B, s)
        pattern = self.patterns[y]  # (B, 5, 5)
        shape = pattern[rows_b[:, None, None], dr[:, :, None], dc[:, None, :]]  # (B, s, s)
        x = x + shape * box
        return {"x": x[:, None], "y": y, "box": box}


class ShapeNet(nn.Module):
    """Two 3 x 3 conv layers, optional attention gates, global average pooling, a linear classifier.

    Args:
        channels: feature channels ``C``.
        cbam: insert attention after the convolutions (else the plain baseline, ``gates="none"``).
        kernel_size, reduction: the spatial kernel ``k`` and the channel reduction ``r``.
        n_classes: outputs.
        batch_norm: BatchNorm before the spatial sigmoid (the authors' code; see
            :class:`~attn.convolutional.SpatialAttention`).
        gates: with ``cbam``, which of CBAM's gates: ``"both"`` (:class:`~attn.convolutional.CBAM`,
            channel then spatial), ``"channel"`` (:class:`~attn.convolutional.ChannelAttention` alone, the
            place of squeeze-and-excitation) or ``"spatial"`` (:class:`~attn.convolutional.SpatialAttention`
            alone): the ablation of Woo et al., section 4.1.
        in_channels: input channels (1 for :class:`ShapeImages`, ``n_classes + 1`` for :class:`MarkedDistractor`).

    ``x (B, in_channels, H, W)`` -> logits ``(B, n_classes)``; :meth:`attention` gives the maps.
    """

    def __init__(
        self, channels: int = 16, cbam: bool = True, kernel_size: int = 7, reduction: int = 4, n_classes: int = 4,
        batch_norm: bool = True, *, gates: Gates = "both", in_channels: int = 1,
    ) -> None:
        super().__init__()
        if gates not in GATES:
            raise ValueError(f"gates must be one of {GATES}, got {gates!r}")
        self.gates: Gates = gates if cbam else "none"
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.cbam = (CBAM(channels, reduction=reduction, kernel_size=kernel_size, batch_norm=batch_norm)
                     if self.gates == "both" else None)
        self.channel_attention = (ChannelAttention(channels, reduction) if self.gates == "channel" else None)
        self.spatial_attention = (SpatialAttention(kernel_size, batch_norm=batch_norm)
                                  if self.gates == "spatial" else None)
        self.head = nn.Linear(channels, n_classes)

    def _gate(self, h: Tensor) -> CBAMOutput:
        """The gated features and both maps (a missing gate reads as all ones)."""
        if self.cbam is not None:
            return self.cbam(h)
        b, c, hh, ww = h.shape
        mc, ms = h.new_ones(b, c), h.new_ones(b, hh, ww)
        if self.channel_attention is not None:
            mc = self.channel_attention(h)
            h = h * mc[:, :, None, None]
        if self.spatial_attention is not None:
            ms = self.spatial_attention(h)
            h = h * ms[:, None]
        return CBAMOutput(h, mc, ms)

    def attention(self, x: Tensor) -> CBAMOutput:
        """The gated features and maps for ``x (B, in_channels, H, W)`` (only when built with ``cbam=True``)."""
        if self.gates == "none":
            raise ValueError("this ShapeNet has no CBAM (built with cbam=False)")
        return self._gate(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        x = check_tensor(x, "x", f"(batch, {self.in_channels}, height, width)", 4)
        h = self.features(x)  # (B, C, H, W)
        if self.gates != "none":
            h = self._gate(h).output
        return self.head(h.mean(dim=(2, 3)))  # global average pooling -> (B, n_classes)


def shape_loss(model: ShapeNet, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the shape label, and accuracy."""
    logits = model(batch["x"])
    loss = F.cross_entropy(logits, batch["y"])
    return loss, {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


def spatial_mass_on_object(spatial: Tensor, box: Tensor) -> Tensor:
    """Fraction of the spatial map's total mass inside the object's box: ``(B, H, W), (B, H, W) bool -> (B,)``."""
    return (spatial * box).sum(dim=(1, 2)) / spatial.sum(dim=(1, 2))


def cbam_task(size: str = "book") -> OwnTask[ShapeNet]:
    """CBAM on :class:`ShapeImages` (the comparison's own-task hook).

    The model is :class:`ShapeNet` with CBAM; the layer alone is a
    :class:`CBAM` over ``C`` channels, its cost swept over square maps of
    ``sizes`` pixels; ``weights`` returns the spatial map normalised to sum to
    1 over the pixels ``(B, H*W)``.
    """
    # image side, channels, steps, batch, cost sizes (pixels); "book" is the chapter's setting
    side_, channels, steps, batch, sizes = sized(
        size,
        quick=(12, 8, 20, 16, (64, 256)),
        book=(16, 8, 300, 32, (256, 1024, 4096)),
        full=(16, 16, 600, 64, (256, 1024, 4096, 16384)),
        large=(24, 32, 2000, 128, (1024, 4096, 16384, 65536)),
    )
    data = ShapeImages(size=side_)
    model = ShapeNet(channels=channels, cbam=True)
    layer = CBAM(channels, reduction=4, kernel_size=7)

    def inputs(n_pixels: int, generator: torch.Generator) -> tuple[Tensor]:
        side = max(1, math.isqrt(n_pixels))
        return (torch.randn(1, channels, side, side, generator=generator),)

    def weights(m: ShapeNet, b: dict[str, Tensor]) -> Tensor:
        spatial = m.attention(b["x"]).spatial.flatten(1)
        return spatial / spatial.sum(-1, keepdim=True)

    return OwnTask(
        description=f"shape on a noisy, cluttered {side_}x{side_} image (4 classes)",
        model=model, sample=data.sample, loss=shape_loss, layer=layer, inputs=inputs, sizes=sizes,
        size_unit="pixels (H*W)", steps=steps, batch_size=batch, lr=1e-2, target_acc=0.9, weights=weights,
    )


OWN_TASKS = {"cbam": cbam_task}


# ----------------------------------------------------------------------------- CBAM: a marked distractor


def _box(top: Tensor, left: Tensor, side: int, size: int) -> Tensor:
    """``(B, size, size)`` bool: the ``side x side`` square with corner ``(top, left)`` of each image."""
    r = torch.arange(size)
    rows = (r[None, :] >= top[:, None]) & (r[None, :] < top[:, None] + side)  # (B, size)
    cols = (r[None, :] >= left[:, None]) & (r[None, :] < left[:, None] + side)  # (B, size)
    return rows[:, :, None] & cols[:, None, :]


class MarkedDistractor:
    """Which class is the unmarked one? Two lit pixels of different classes, the distractor ringed.

    Input channels ``0 .. n_classes - 1`` are one per class; channel ``n_classes`` holds the mark. The
    **target** lights one pixel of its class's channel, the **distractor** one pixel of another class's
    channel, and the mark is a ring (the outline of the ``(2 radius + 1)``-square) at Chebyshev distance
    ``radius`` around the distractor, cut where it leaves the image; Gaussian noise lies on every channel.
    The target is never inside the ring's square.

    The design: a 3 x 3 + 3 x 3 convolution stack sees 2 pixels around each position, so the features at
    a lit pixel do not see a ring at distance >= 3 (with ``radius = 3`` only the features between the
    distractor and its ring see both; from ``radius = 5`` none do). After global average pooling the two
    classes are present alike, whichever is marked, and a classifier that cannot use the mark only guesses
    between them (accuracy at most about 1/2). Channel attention weighs channels from pooled statistics, the
    same for both classes. A spatial gate's ``k x k`` convolution over the pooled features (``k = 7``: 3
    positions each way) reaches the ring from the distractor and can damp it: where to look, the point of
    Woo et al.'s spatial attention.

    ``sample(B, generator)`` returns ``x (B, n_classes + 1, size, size)``, ``y (B,)`` (the target's class),
    ``box`` and ``distractor`` ``(B, size, size)`` bool (the two lit pixels), and ``y_distractor (B,)``.

    Args:
        size: image side (``>= radius + 2``).
        noise: standard deviation of the noise.
        n_classes: classes (``>= 2``).
        radius: the ring's Chebyshev distance from the distractor.
    """

    def __init__(self, size: int = 12, noise: float = 0.1, n_classes: int = 4, radius: int = 3) -> None:
        if radius < 1 or size < radius + 2:
            raise ValueError(f"need radius >= 1 and size >= radius + 2 (a target outside the ring), got {size=}, {radius=}")
        self.radius = radius
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.size, self.noise, self.n_classes = size, noise, n_classes
        self.classes = tuple(f"class {i}" for i in range(n_classes))

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        s, b, c = self.size, batch_size, self.n_classes
        y = torch.randint(0, c, (b,), generator=generator)
        y_d = (y + torch.randint(1, c, (b,), generator=generator)) % c  # another class
        d = torch.randint(0, s, (b, 2), generator=generator)  # distractor anywhere (its ring may be cut by the edge)
        t = torch.randint(0, s, (b, 2), generator=generator)
        for _ in range(1000):  # redraw targets inside the ring's square
            bad = (t - d).abs().amax(-1) <= self.radius
            n_bad = int(bad.sum())
            if n_bad == 0:
                break
            t[bad] = torch.randint(0, s, (n_bad, 2), generator=generator)
        box, dist = _box(t[:, 0], t[:, 1], 1, s), _box(d[:, 0], d[:, 1], 1, s)
        rad = self.radius
        ring = _box(d[:, 0] - rad, d[:, 1] - rad, 2 * rad + 1, s) & ~_box(d[:, 0] - rad + 1, d[:, 1] - rad + 1, 2 * rad - 1, s)
        x = torch.randn(b, c + 1, s, s, generator=generator) * self.noise
        rows_b = torch.arange(b)
        x[rows_b, y] += box.float()
        x[rows_b, y_d] += dist.float()
        x[:, c] += ring.float()
        return {"x": x, "y": y, "box": box, "distractor": dist, "y_distractor": y_d}


class BatchStream:
    """A training stream drawn once: ``n_batches`` batches of ``batch_size`` from ``sample`` with ``seed``.

    Called like a task's ``sample`` (``stream(batch_size, generator)``, the generator ignored), it returns the
    next batch, so every arm trained after :meth:`restart` sees the same batches; drawing them in one call
    is many times cheaper than drawing each batch (the chapter's CPU budget).
    """

    def __init__(self, sample: Callable[[int, torch.Generator], dict[str, Tensor]], n_batches: int,
                 batch_size: int, seed: int) -> None:
        self.batch_size, self.n_batches = batch_size, n_batches
        self.data = sample(n_batches * batch_size, torch.Generator().manual_seed(seed))
        self.position = 0

    def restart(self) -> BatchStream:
        self.position = 0
        return self

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        if batch_size != self.batch_size:
            raise ValueError(f"this stream holds batches of {self.batch_size}, asked for {batch_size}")
        if self.position >= self.n_batches:
            raise IndexError(f"the stream's {self.n_batches} batches are used up (restart() it)")
        lo = self.position * batch_size
        self.position += 1
        return {k: v[lo : lo + batch_size] for k, v in self.data.items()}


def gate_on_box(spatial: Tensor, box: Tensor) -> Tensor:
    """Mean gate value inside a box: ``spatial (B, H, W)``, ``box (B, H, W)`` bool -> ``(B,)``."""
    return (spatial * box).sum(dim=(1, 2)) / box.sum(dim=(1, 2))


@dataclass
class AblationResult:
    """Per arm (``GATES``), one value per seed: held-out accuracy, the training accuracy's rise over the last
    ``window`` steps (plateau check), the spatial gate's mean on the target's and the distractor's box;
    the trained models and histories by ``(arm, seed)``."""

    seeds: list[int]
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    late_rise: dict[str, list[float]] = field(default_factory=dict)
    gate_target: dict[str, list[float]] = field(default_factory=dict)
    gate_distractor: dict[str, list[float]] = field(default_factory=dict)
    models: dict[tuple[str, int], ShapeNet] = field(default_factory=dict)
    histories: dict[tuple[str, int], History] = field(default_factory=dict)


def run_cbam_ablation(
    data: MarkedDistractor, seeds: Sequence[int], *, arms: Sequence[Gates] = GATES, steps: int = 500,
    batch_size: int = 16, lr: float = 1e-2, channels: int = 8, kernel_size: int = 7, reduction: int = 4,
    held_out: dict[str, Tensor] | None = None, window: int = 100, device: torch.device | str = "cpu",
) -> AblationResult:
    """Train :class:`ShapeNet` with each of ``arms`` for every seed on the same batches; measure on ``held_out``.

    The seed sets the initialisation and the training stream (one :class:`BatchStream` per seed, shared by
    the arms). ``late_rise``: mean training accuracy over the last ``window`` steps minus the ``window``
    before (near 0 on a plateau). ``gate_target`` / ``gate_distractor``: mean spatial gate inside each
    box (:func:`gate_on_box`), for the arms with a spatial map (NaN otherwise).
    """
    if held_out is None:
        held_out = data.sample(512, torch.Generator().manual_seed(12345))
    res = AblationResult(seeds=list(seeds))
    for seed in seeds:
        stream = BatchStream(data.sample, steps, batch_size, seed)
        for arm in arms:
            torch.manual_seed(seed)
            model = ShapeNet(channels, cbam=arm != "none", kernel_size=kernel_size, reduction=reduction,
                             gates="both" if arm == "none" else arm,
                             in_channels=data.n_classes + 1, n_classes=data.n_classes)
            hist = train(model, stream.restart(), shape_loss, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         log_every=10, progress=False, device=device)
            model.cpu().eval()
            acc_curve = hist.metrics["acc"]
            k = max(1, window // 10)
            late = sum(acc_curve[-k:]) / k - sum(acc_curve[-2 * k : -k]) / max(1, len(acc_curve[-2 * k : -k]))
            with torch.no_grad():
                acc = float((model(held_out["x"]).argmax(-1) == held_out["y"]).float().mean())
                if arm in ("spatial", "both"):
                    sp = model.attention(held_out["x"]).spatial
                    g_t, g_d = float(gate_on_box(sp, held_out["box"]).mean()), float(
                        gate_on_box(sp, held_out["distractor"]).mean())
                else:
                    g_t = g_d = math.nan
            for store, v in ((res.accuracy, acc), (res.late_rise, late), (res.gate_target, g_t),
                             (res.gate_distractor, g_d)):
                store.setdefault(arm, []).append(v)
            res.models[arm, seed], res.histories[arm, seed] = model, hist
    return res


# ----------------------------------------------------------------------------- Primer: one-layer induction


class InductionTask:
    """``... A B ... A -> B``: the sequence's last token ``A`` occurred once before; predict the token after it.

    ``length - 1`` distinct tokens drawn from ``vocab`` (so ``A`` occurs exactly once before the end), then
    ``A`` again; the target is the token that followed the first ``A``. Plain attention needs two layers for
    this (an *induction head*: a first layer copies each token's predecessor into it, a second matches the
    query ``A`` against those copies); in one layer the key at ``B``'s position knows only ``B``. Primer's
    causal depthwise convolution puts the projection of ``A`` into the key at ``B``'s position, so one layer
    can match ``A`` there and read ``B`` (So et al. 2021, section 3).

    ``sample(B, generator)``: ``tokens (B, length)``, ``target (B,)``, ``first (B,)`` (position of the first ``A``).
    """

    def __init__(self, vocab: int = 16, length: int = 12) -> None:
        if length < 3 or vocab < length - 1:
            raise ValueError(f"need length >= 3 and vocab >= length - 1 distinct tokens, got {vocab=}, {length=}")
        self.vocab, self.length = vocab, length

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n, b = self.length, batch_size
        tokens = torch.rand(b, self.vocab, generator=generator).argsort(-1)[:, : n - 1]  # distinct tokens
        first = torch.randint(0, n - 2, (b,), generator=generator)  # A at first, B at first + 1 <= n - 2
        rows = torch.arange(b)
        a, target = tokens[rows, first], tokens[rows, first + 1]
        return {"tokens": torch.cat([tokens, a[:, None]], 1), "target": target, "first": first}


def induction_model(kind: Literal["primer", "plain"], num_layers: int, task: InductionTask, embed_dim: int = 64,
                    num_heads: int = 2, position_std: float = 1.0) -> TokenLM:
    """An attention-only causal :class:`~attn.models.TokenLM` (no feed-forward layers) with learned positions.

    ``kind="primer"``: every block's mixer is :class:`~attn.convolutional.MultiDConvHeadAttention` (width-3
    causal depthwise convolutions on Q, K, V); ``"plain"``: :class:`~attn.multihead.MultiHeadAttention`.
    No feed-forward layer, so Primer's squared-ReLU feed-forward is not part of this comparison.
    """
    def mixer(_: int) -> nn.Module:
        if kind == "primer":
            return MultiDConvHeadAttention(embed_dim, num_heads)
        if kind == "plain":
            return MultiHeadAttention(embed_dim, num_heads)
        raise ValueError(f"kind must be 'primer' or 'plain', got {kind!r}")

    return TokenLM(task.vocab, embed_dim, num_layers, mixer, max_len=task.length, position_std=position_std,
                   ffn_mult=0)


def induction_loss(model: TokenLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the prediction at the last position (the second ``A``) against ``B``; accuracy."""
    logits = model(batch["tokens"], is_causal=True).logits[:, -1]  # (B, vocab)
    loss = F.cross_entropy(logits, batch["target"])
    return loss, {"acc": float((logits.argmax(-1) == batch["target"]).float().mean())}


def train_to_target(model: nn.Module, sample: Callable[[int, torch.Generator], dict[str, Tensor]],
                    loss_fn: Callable[..., tuple[Tensor, dict[str, float]]], max_steps: int, *, target: float = 0.95,
                    window: int = 50, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                    ) -> tuple[int | None, list[float]]:
    """Adam until the training accuracy averaged over the last ``window`` steps reaches ``target``.

    Returns ``(step reached or None if not by max_steps, per-step training accuracy)``; stopping early
    saves the CPU budget for the arms that need it. One CPU thread, gradients clipped at norm 1 (as
    :func:`attn.train.train`).
    """
    from ..train import cpu_threads, set_seed

    gen = set_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    accs: list[float] = []
    model.train()
    with cpu_threads(1):
        for step in range(1, max_steps + 1):
            loss, metrics = loss_fn(model, sample(batch_size, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            accs.append(metrics["acc"])
            if step >= window and sum(accs[-window:]) / window >= target:
                model.eval()
                return step, accs
    model.eval()
    return None, accs


@dataclass
class InductionResult:
    """Per arm, one value per seed: steps to the target (``None``: not reached by ``max_steps``) and held-out
    accuracy at the end; the trained models by ``(arm, seed)``."""

    seeds: list[int]
    max_steps: int
    steps: dict[str, list[int | None]] = field(default_factory=dict)
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    models: dict[tuple[str, int], TokenLM] = field(default_factory=dict)


#: The induction arms: name -> (kind, layers).
INDUCTION_ARMS: dict[str, tuple[Literal["primer", "plain"], int]] = {
    "Primer, 1 layer": ("primer", 1), "plain, 1 layer": ("plain", 1), "plain, 2 layers": ("plain", 2),
}


def run_induction(task: InductionTask, seeds: Sequence[int], *, arms: dict[str, tuple[Literal["primer", "plain"], int]]
                  | None = None, max_steps: int = 800, target: float = 0.95, batch_size: int = 32, lr: float = 3e-3,
                  embed_dim: int = 64, num_heads: int = 2, held_out: int = 512) -> InductionResult:
    """Train every arm (default :data:`INDUCTION_ARMS`) for every seed with :func:`train_to_target`.

    The seed sets the initialisation and the batches (the same for every arm). Held-out accuracy on
    ``held_out`` fresh sequences (generator seed 12345) after training.
    """
    arms = INDUCTION_ARMS if arms is None else arms
    test = task.sample(held_out, torch.Generator().manual_seed(12345))
    res = InductionResult(seeds=list(seeds), max_steps=max_steps)
    for name, (kind, layers) in arms.items():
        for seed in seeds:
            torch.manual_seed(seed)
            model = induction_model(kind, layers, task, embed_dim, num_heads)
            reached, _ = train_to_target(model, task.sample, induction_loss, max_steps, target=target,
                                         batch_size=batch_size, lr=lr, seed=seed)
            with torch.no_grad():
                _, m = induction_loss(model, test)
            res.steps.setdefault(name, []).append(reached)
            res.accuracy.setdefault(name, []).append(m["acc"])
            res.models[name, seed] = model
    return res
