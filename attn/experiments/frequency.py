r"""Chapter 12's experiments: a seasonal + trend forecast and associative recall, for FNet and FEDformer's FEB-f.

The layers are in :mod:`attn.frequency`; here, what the chapter trains with them.

**Forecast.** :class:`SeasonalTrendForecast` draws series
:math:`y_t = a + b\,t/n + \sum_j A_j \sin(2\pi t / P_j + \phi_j) + \varepsilon_t`
(random level, slope, amplitudes and phases per series; fixed periods
:math:`P_j`) and asks for the next ``horizon`` values from ``context`` values.
:class:`ForecastModel` follows FEDformer's decoder input
(Zhou et al. 2022, section 3.1): the context is split by
:func:`~attn.frequency.series_decomposition` into a trend, forecast by a linear
map over the context's trend, and a seasonal part, which is padded with zeros
for the horizon, embedded, mixed by one Transformer block whose token mixer is
the arm (FEB-f with random or lowest modes, dense attention, FNet), and read out
at the horizon positions (FEB-f also with the authors' slot write-back).
:class:`LinearForecaster` (DLinear, Zeng et al. 2023)
maps both parts linearly: the strongest simple baseline of this task.

**Recall.** :class:`RecallStack` runs :class:`~attn.tasks.AssociativeRecall`
through two pre-norm blocks whose mixers are the arm (attention, FNet, or FNet's
hybrid: Fourier mixing first, attention in the last layer, Lee-Thorp et al. 2022,
section 4).

:func:`run_arms` trains every arm on the same seeds and batches with
:func:`attn.train.train` and returns one held-out metric per seed per arm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..frequency import FourierMixing, FrequencyEnhancedBlock, series_decomposition
from ..models import RecallTokens, TransformerBlock
from ..multihead import MultiHeadAttention
from ..tasks import AssociativeRecall
from ..train import History, evaluate, set_seed, train

__all__ = [
    "SeasonalTrendForecast",
    "ForecastModel",
    "LinearForecaster",
    "forecast_loss",
    "forecast_arms",
    "RecallStack",
    "recall_loss",
    "recall_arms",
    "ArmRuns",
    "run_arms",
]

Batch = dict[str, Tensor]
ArmFactory = Callable[[int], nn.Module]  # seed -> a freshly initialised model


@dataclass(frozen=True)
class SeasonalTrendForecast:
    """Forecast ``horizon`` values of a trend plus fixed-period seasonal components from ``context`` values.

    Series of ``n = context + horizon`` steps,
    :math:`y_t = a + 2b\\,t/n + \\sum_j A_j \\sin(2\\pi t / P_j + \\phi_j) + \\varepsilon_t` with
    :math:`a, b \\sim N(0, 1)`, :math:`A_j \\sim U(0.5, 1.5)`,
    :math:`\\phi_j \\sim U(0, 2\\pi)` per series and :math:`\\varepsilon_t \\sim N(0, \\text{noise}^2)`.
    The default periods 8 and 3.2 put the seasonal energy at frequencies
    ``n / P`` = 8 and 20 of the ``n = 64`` grid (:meth:`seasonal_frequencies`):
    above the lowest 8 Fourier modes, where a trend would sit.

    ``sample`` returns ``x (B, context)``, ``y (B, horizon)`` and the noiseless
    ``seasonal (B, n)`` and ``trend (B, n)`` of the whole series.
    """

    context: int = 40
    horizon: int = 24
    periods: tuple[float, ...] = (8.0, 3.2)
    noise: float = 0.1

    def __post_init__(self) -> None:
        if self.context < 2 or self.horizon < 1:
            raise ValueError(f"need context >= 2 and horizon >= 1, got {self.context}, {self.horizon}")
        if not self.periods or any(p <= 2 for p in self.periods):
            raise ValueError(f"periods must be > 2 steps (above the Nyquist limit), got {self.periods}")

    @property
    def length(self) -> int:
        """``n = context + horizon``, the length the seasonal mixer sees."""
        return self.context + self.horizon

    def seasonal_frequencies(self) -> list[float]:
        """Each period as a frequency on the ``n``-point grid: ``n / P`` cycles per ``n`` steps."""
        return [self.length / p for p in self.periods]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        n = self.length
        t = torch.arange(n, dtype=torch.float32)
        level = torch.randn(batch_size, 1, generator=generator)
        slope = torch.randn(batch_size, 1, generator=generator)
        trend = level + slope * 2 * t / n  # (B, n)
        seasonal = torch.zeros(batch_size, n)
        for p in self.periods:
            amp = 0.5 + torch.rand(batch_size, 1, generator=generator)
            phase = 2 * math.pi * torch.rand(batch_size, 1, generator=generator)
            seasonal = seasonal + amp * torch.sin(2 * math.pi * t / p + phase)
        y = trend + seasonal + self.noise * torch.randn(batch_size, n, generator=generator)
        return {"x": y[:, : self.context], "y": y[:, self.context :], "seasonal": seasonal, "trend": trend}


class ForecastModel(nn.Module):
    r"""Decomposition, a linear trend forecast, and one Transformer block on the zero-padded seasonal part.

    .. math::

        (x^{\text{s}}, x^{\text{t}}) = \operatorname{Decomp}_k(x),\quad
        \hat y^{\text{trend}} = x^{\text{t}} W_{\text{t}},\quad
        h = [x^{\text{s}}, 0_T]\, w_{\text{in}} + P,\quad
        \hat y^{\text{seasonal}} = \operatorname{LN}(\operatorname{Block}(h))_{L:}\, w_{\text{out}}

    with ``x (B, L)`` the context, ``0_T`` the ``T`` zeros FEDformer's decoder puts
    where the forecast goes, ``P (L + T, E)`` learned positions (FEDformer's
    time-stamp embeddings play this part), and ``Block`` a pre-norm
    :class:`~attn.models.TransformerBlock` around ``mixer``. The forecast is
    :math:`\hat y^{\text{trend}} + \hat y^{\text{seasonal}}`, ``(B, T)``.
    """

    def __init__(self, task: SeasonalTrendForecast, mixer: nn.Module, embed_dim: int = 32, kernel_size: int = 9,
                 ffn_mult: int = 2) -> None:
        super().__init__()
        self.task, self.kernel_size = task, kernel_size
        self.trend = nn.Linear(task.context, task.horizon)
        self.embed = nn.Linear(1, embed_dim)
        self.position = nn.Parameter(0.1 * torch.randn(task.length, embed_dim))
        self.block = TransformerBlock(mixer, embed_dim, ffn_mult)
        self.norm = nn.LayerNorm(embed_dim)
        self.out = nn.Linear(embed_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, context)`` -> forecast ``(B, horizon)``."""
        seasonal, trend = series_decomposition(x, self.kernel_size)
        z = F.pad(seasonal, (0, self.task.horizon))  # (B, n): zeros where the forecast goes
        h = self.embed(z[..., None]) + self.position  # (B, n, E)
        h = self.block(h).output
        return self.trend(trend) + self.out(self.norm(h[:, self.task.context :]))[..., 0]


class LinearForecaster(nn.Module):
    r"""DLinear (Zeng et al. 2023): :math:`\hat y = x^{\text{t}} W_{\text{t}} + x^{\text{s}} W_{\text{s}}` after the same decomposition; no token mixer."""

    def __init__(self, task: SeasonalTrendForecast, kernel_size: int = 9) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.trend = nn.Linear(task.context, task.horizon)
        self.seasonal = nn.Linear(task.context, task.horizon)

    def forward(self, x: Tensor) -> Tensor:
        seasonal, trend = series_decomposition(x, self.kernel_size)
        return self.trend(trend) + self.seasonal(seasonal)


def forecast_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """Mean squared error of the forecast over the horizon (also reported as the metric ``mse``)."""
    loss = F.mse_loss(model(batch["x"]), batch["y"])
    return loss, {"mse": float(loss.detach())}


def forecast_arms(task: SeasonalTrendForecast, embed_dim: int = 32, num_heads: int = 4, modes: int = 8,
                  kernel_size: int = 9) -> dict[str, ArmFactory]:
    """The forecast's arms, each ``seed -> model``; FEB-f's random modes are drawn with the training seed.

    ``"FEB-f, random modes, slot write-back"`` is the authors' ``FourierBlock``
    placement (the ``m``-th kept mode written to mode ``m``), with the same draw.
    """

    def with_mixer(make: Callable[[int], nn.Module]) -> ArmFactory:
        return lambda seed: ForecastModel(task, make(seed), embed_dim, kernel_size)

    return {
        "FEB-f, random modes": with_mixer(
            lambda seed: FrequencyEnhancedBlock(embed_dim, num_heads, modes=modes, mode_select="random", seed=seed)),
        "FEB-f, lowest modes": with_mixer(
            lambda seed: FrequencyEnhancedBlock(embed_dim, num_heads, modes=modes, mode_select="lowest", seed=seed)),
        "FEB-f, random modes, slot write-back": with_mixer(
            lambda seed: FrequencyEnhancedBlock(embed_dim, num_heads, modes=modes, mode_select="random", seed=seed,
                                                write_back="slot")),
        "dense attention": with_mixer(lambda seed: MultiHeadAttention(embed_dim, num_heads)),
        "FNet": with_mixer(lambda seed: FourierMixing(embed_dim, norm="ortho")),
        "DLinear (no mixer)": lambda seed: LinearForecaster(task, kernel_size),
    }


class RecallStack(nn.Module):
    """:class:`~attn.tasks.AssociativeRecall` through pre-norm blocks with the given mixers; read out at the query.

    Tokens as :class:`~attn.models.RecallTokens` (one per key-value pair, then the
    query), one :class:`~attn.models.TransformerBlock` per mixer, a final
    LayerNorm and a linear head over the values at the last (query) token.
    ``forward(x (B, 2 n_pairs + 1))`` -> logits ``(B, n_values)``.
    """

    def __init__(self, task: AssociativeRecall, mixers: Sequence[nn.Module], embed_dim: int = 32,
                 ffn_mult: int = 2) -> None:
        super().__init__()
        self.task = task
        self.tokens = RecallTokens(task, embed_dim)
        self.blocks = nn.ModuleList(TransformerBlock(m, embed_dim, ffn_mult) for m in mixers)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_values)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tokens(x)
        for block in self.blocks:
            h = block(h).output
        return self.head(self.norm(h)[:, -1])


def recall_loss(model: RecallStack, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the recalled value, and accuracy ``acc``."""
    logits = model(batch["x"])
    target = batch["y"] - model.task.n_keys
    return F.cross_entropy(logits, target), {"acc": float((logits.argmax(-1) == target).float().mean())}


def recall_arms(task: AssociativeRecall, embed_dim: int = 32, num_heads: int = 2) -> dict[str, ArmFactory]:
    """Two-layer recall models: attention, FNet, and FNet's hybrid (Fourier first, attention last)."""

    def fnet() -> nn.Module:
        return FourierMixing(embed_dim, norm="ortho")

    def mha() -> nn.Module:
        return MultiHeadAttention(embed_dim, num_heads)

    return {
        "attention": lambda seed: RecallStack(task, [mha(), mha()], embed_dim),
        "FNet": lambda seed: RecallStack(task, [fnet(), fnet()], embed_dim),
        "FNet, attention last": lambda seed: RecallStack(task, [fnet(), mha()], embed_dim),
    }


@dataclass
class ArmRuns:
    """What :func:`run_arms` returns: per arm, the held-out metric, the trained model and the training curve per seed."""

    values: dict[str, list[float]]
    models: dict[str, list[nn.Module]]
    histories: dict[str, list[History]]

    def still_falling(self, tail: float = 0.2) -> dict[str, float]:
        """Per arm, the median over seeds of the training loss's relative drop over the last ``tail`` of the steps.

        ``(mean loss in the window before the tail - mean loss in the tail) / the former``,
        on the logged points: near 0 on a plateau, large while the curve still falls.
        """
        out = {}
        for name, hists in self.histories.items():
            drops = []
            for h in hists:
                k = max(1, round(tail * len(h.loss)))
                before, last = h.loss[-2 * k : -k] or h.loss[:1], h.loss[-k:]
                ref = sum(before) / len(before)
                drops.append((ref - sum(last) / len(last)) / ref if ref else 0.0)
            out[name] = float(torch.tensor(drops).median())
        return out


def run_arms(arms: Mapping[str, ArmFactory], sample: Callable[[int, torch.Generator], Batch],
             loss_fn: Callable[[nn.Module, Batch], tuple[Tensor, dict[str, float]]], metric: str,
             seeds: Sequence[int], steps: int, batch_size: int = 32, lr: float = 3e-3, eval_size: int = 1024,
             device: torch.device | str = "cpu") -> ArmRuns:
    """Train every arm on every seed (same batches and budget per seed), evaluate ``metric`` on one held-out batch.

    The model is built after :func:`~attn.train.set_seed` ``(seed)``, so its
    initialisation follows the seed; :func:`~attn.train.train` with ``seed``
    draws the same batches for every arm. The held-out batch is the same for all
    runs. Returns :class:`ArmRuns` (the models moved back to the CPU).
    """
    runs = ArmRuns({name: [] for name in arms}, {name: [] for name in arms}, {name: [] for name in arms})
    for name, make in arms.items():
        for seed in seeds:
            set_seed(seed)
            model = make(seed)
            hist = train(model, sample, loss_fn, steps, batch_size=batch_size, lr=lr, seed=seed, progress=False,
                         device=device, log_every=max(1, steps // 20))
            runs.values[name].append(evaluate(model, sample, loss_fn, batch_size=eval_size, device=device)[metric])
            runs.models[name].append(model.cpu())
            runs.histories[name].append(hist)
    return runs
