"""Chapter 18's experiment (convolutional attention): which of four shapes sits on a noisy, cluttered image,
learned by a small CNN with and without CBAM; CBAM's own task for the comparison.

The layers (:class:`~attn.convolutional.CBAM`, :class:`~attn.convolutional.MultiDConvHeadAttention`) are in
:mod:`attn.convolutional`. Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_tensor
from ..convolutional import CBAM, CBAMOutput
from ..registry import OwnTask
from . import sized

__all__ = ["ShapeImages", "ShapeNet", "shape_loss", "spatial_mass_on_object", "cbam_task", "OWN_TASKS"]


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
    """Two 3 x 3 conv layers, optional CBAM, global average pooling, a linear classifier.

    Args:
        channels: feature channels ``C``.
        cbam: insert :class:`CBAM` after the convolutions (else the plain baseline).
        kernel_size, reduction: CBAM's spatial kernel and channel reduction.
        n_classes: outputs.

    ``x (B, 1, H, W)`` -> logits ``(B, n_classes)``; :meth:`attention` gives CBAM's maps.
    """

    def __init__(
        self, channels: int = 16, cbam: bool = True, kernel_size: int = 7, reduction: int = 4, n_classes: int = 4, batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        )
        self.cbam = CBAM(channels, reduction=reduction, kernel_size=kernel_size, batch_norm=batch_norm) if cbam else None
        self.head = nn.Linear(channels, n_classes)

    def attention(self, x: Tensor) -> CBAMOutput:
        """CBAM's output and maps for ``x (B, 1, H, W)`` (only when built with ``cbam=True``)."""
        if self.cbam is None:
            raise ValueError("this ShapeNet has no CBAM (built with cbam=False)")
        return self.cbam(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        x = check_tensor(x, "x", "(batch, 1, height, width)", 4)
        h = self.features(x)  # (B, C, H, W)
        if self.cbam is not None:
            h = self.cbam(h).output
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
