r"""Chapter 8's experiments (local attention): the reach of a stacked window, and where local-p learns to look.

The layers are in :mod:`attn.local`; here, what the chapter trains with them.

**Lag-``k`` copy** (:class:`LagCopy`, :func:`run_lag_copy`). Random tokens
``x_0 .. x_{n-1}``; the output at position ``t >= k`` must be ``x_{t-k}``. With a
causal window of ``w`` (query ``t`` reads ``t - w .. t``), the output of ``L``
stacked layers at ``t`` depends only on ``x_{t - Lw} .. x_t`` (the residual stream
keeps what a token had, each layer adds ``w`` more positions, :func:`reach`).
So the task can be learned **exactly when** ``k <= L w``; beyond it the target is
independent of everything the model sees and accuracy is chance, ``1 / vocab``,
whatever the training. Full causal attention reaches every earlier token in one
layer. The local arms run the chapter's blockwise
:class:`~attn.local.LocalAttention` (``causal=True``), never a dense band mask.

**Monotone alignment** (:class:`MonotoneAlignment`, :func:`run_alignment`). A
source of ``S`` tokens (``S`` drawn from ``min_src .. max_src``) and ``T`` target
steps; step ``t`` must output the source token at the monotone position
``a(t) = floor((t + 1/2) S / T)``, a diagonal whose slope ``S / T`` changes from
example to example. Luong et al.'s local-p (2015, section 3.2,
:class:`~attn.local.LocalPAttention`) predicts ``p_t = S sigma(v_p^T tanh(W_p h_t))``;
the diagonal is ``p_t = (t + 1/2) S / T``, i.e. ``sigma(.) = (t + 1/2) / T``, which
the decoder state can express without knowing ``S``. The baseline is Luong's
global attention with the same ``general`` score over the whole source
(:class:`~attn.global_attention.LuongGlobalAttention`). Both read the same
source states (token embedding + fixed sinusoidal position) and the same
decoder state ``h_t = tanh(W (e_t + e_S))`` (a learned embedding of the step and
of the source length, standing in for a recurrent decoder's state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..global_attention import LuongGlobalAttention
from ..local import LocalAttention, LocalPAttention, local_pattern
from ..models import TokenLM
from ..multihead import MultiHeadAttention
from ..positions import sinusoidal_embedding
from ..train import cpu_threads, evaluate, set_seed

__all__ = [
    "LagCopy",
    "LagConfig",
    "LagRuns",
    "lag_model",
    "lag_loss",
    "reach",
    "run_lag_copy",
    "MonotoneAlignment",
    "AlignConfig",
    "AlignModel",
    "AlignRuns",
    "align_loss",
    "run_alignment",
]

Batch = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------- lag-k copy


@dataclass(frozen=True)
class LagCopy:
    """Random tokens ``x (B, n)`` in ``0 .. vocab - 1``; target ``y_t = x_{t - lag}`` for ``t >= lag``.

    ``sample(batch, generator)`` -> ``tokens (B, n)`` long and ``y (B, n)`` long,
    ``-100`` (ignored by the loss) at the first ``lag`` positions. Chance is ``1 / vocab``.
    """

    n: int = 32
    lag: int = 4
    vocab: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.lag < self.n or self.vocab < 2:
            raise ValueError(f"need 1 <= lag < n and vocab >= 2, got lag={self.lag}, n={self.n}, vocab={self.vocab}")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        x = torch.randint(0, self.vocab, (batch_size, self.n), generator=generator)
        y = torch.full_like(x, -100)
        y[:, self.lag :] = x[:, : -self.lag]
        return {"tokens": x, "y": y}


@dataclass(frozen=True)
class LagConfig:
    """Sizes and budget of the lag-copy runs (the same for every arm).

    ``window`` is the one-sided causal window ``w``; a run stops early once the
    training-batch accuracy is at least ``target`` at two consecutive logs
    (every ``log_every`` steps), else after ``steps``.
    """

    n: int = 32
    vocab: int = 8
    embed_dim: int = 32
    num_heads: int = 1
    window: int = 8
    steps: int = 150
    batch_size: int = 32
    lr: float = 2e-2
    position_std: float = 0.3
    eval_batch: int = 256
    target: float = 0.99
    log_every: int = 10


def lag_model(arm: Literal["local", "full"], layers: int, config: LagConfig) -> TokenLM:
    """A causal :class:`~attn.models.TokenLM` (attention only, learned positions) of ``layers`` blocks.

    ``local``: :class:`~attn.local.LocalAttention` with ``window=config.window``,
    ``causal=True`` (blockwise); ``full``: :class:`~attn.multihead.MultiHeadAttention`
    (called with ``is_causal=True``).
    """
    E, H = config.embed_dim, config.num_heads
    if arm == "local":
        def mixer(i: int) -> nn.Module:
            return LocalAttention(E, H, window=config.window, causal=True)
    elif arm == "full":
        def mixer(i: int) -> nn.Module:
            return MultiHeadAttention(E, H)
    else:
        raise ValueError(f"arm must be 'local' or 'full', got {arm!r}")
    return TokenLM(config.vocab, E, layers, mixer, max_len=config.n, position_std=config.position_std, ffn_mult=0)


def lag_loss(model: TokenLM, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy over the positions with a target (``y != -100``), and their accuracy ``acc``."""
    logits = model(batch["tokens"], is_causal=True).logits  # (B, n, vocab)
    y = batch["y"]
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    keep = y != -100
    acc = (logits.argmax(-1) == y)[keep].float().mean()
    return loss, {"acc": float(acc)}


def reach(n: int, window: int, layers: int, causal: bool = True) -> Tensor:
    r"""``(n, n)`` boolean: which inputs ``x_j`` the output at ``t`` can depend on after ``layers`` window layers.

    One layer's graph is :func:`~attn.local.local_pattern` ``(n, window, causal)``
    (it includes ``j = t``, and the residual stream keeps ``x_t`` anyway); ``L`` layers
    compose it: :math:`R_L = R_1^L` as a boolean matrix power, ``t - L w <= j <= t``
    when causal, ``|t - j| <= L w`` two-sided. (A dense ``n x n`` reference for the
    explorer and the tests, small ``n`` only.)
    """
    if layers < 0:
        raise ValueError(f"layers must be >= 0, got {layers}")
    one = local_pattern(n, window, causal=causal).float()
    r = torch.eye(n)
    for _ in range(layers):
        r = ((r @ one) > 0).float()
    return r.bool()


@dataclass
class LagRuns:
    """``accuracy[arm][lag]``: held-out accuracy (positions ``t >= lag``), one value per seed in ``seeds`` order.

    ``steps[arm][lag]``: steps run (``config.steps`` when the run never reached
    ``config.target``). Arms are labelled ``"local, L=1"``, ``"full, L=1"`` ...
    """

    seeds: list[int]
    config: LagConfig
    accuracy: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    steps: dict[str, dict[int, list[int]]] = field(default_factory=dict)

    @property
    def chance(self) -> float:
        """Accuracy of a guess, ``1 / vocab``."""
        return 1.0 / self.config.vocab


def _train_lag(model: TokenLM, task: LagCopy, cfg: LagConfig, gen: torch.Generator) -> int:
    """Adam until two consecutive logged training accuracies reach ``cfg.target``, or ``cfg.steps``; returns steps run."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    curve: list[float] = []
    for step in range(1, cfg.steps + 1):
        loss, metrics = lag_loss(model, task.sample(cfg.batch_size, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0:
            curve.append(metrics["acc"])
            if len(curve) >= 2 and min(curve[-2:]) >= cfg.target:
                return step
    return cfg.steps


def run_lag_copy(lags: Sequence[int] = (4, 12, 20), arms: Sequence[tuple[str, int]] = (("local", 1), ("local", 2), ("full", 1)),
                 seeds: Sequence[int] = (0, 1, 2), config: LagConfig | None = None) -> LagRuns:
    """Train every ``(arm, layers)`` on :class:`LagCopy` for every lag and seed; same seeds, batches and budget.

    Seed ``s`` seeds the initialisation and the batches (the same batches for every
    arm at a given lag); evaluation on one held-out batch (seed ``10_000 + s``).
    One CPU thread.
    """
    cfg = config or LagConfig()
    runs = LagRuns(seeds=list(seeds), config=cfg)
    for arm, layers in arms:
        label = f"{arm}, L={layers}"
        runs.accuracy[label], runs.steps[label] = {}, {}
        for lag in lags:
            task = LagCopy(cfg.n, lag, cfg.vocab)
            accs, steps = [], []
            for s in seeds:
                gen = set_seed(s)
                model = lag_model(arm, layers, cfg)  # type: ignore[arg-type]
                with cpu_threads(1):
                    steps.append(_train_lag(model, task, cfg, gen))
                    accs.append(evaluate(model, task.sample, lag_loss, batch_size=cfg.eval_batch, seed=10_000 + s)["acc"])
            runs.accuracy[label][lag], runs.steps[label][lag] = accs, steps
    return runs


# ---------------------------------------------------------------------------------------- monotone alignment


@dataclass(frozen=True)
class MonotoneAlignment:
    """Source ``S`` tokens (``min_src <= S <= max_src``), ``T`` target steps, ``y_t = x_{a(t)}``, ``a(t) = floor((t + 1/2) S / T)``.

    ``sample(batch, generator)`` -> ``src (B, max_src)`` long (0 after the end),
    ``key_mask (B, max_src)`` (``True`` = real), ``lengths (B,)``, ``align (B, T)``
    (the aligned source position ``a(t)``), ``y (B, T)``. Chance is ``1 / vocab``.
    """

    vocab: int = 16
    target_len: int = 20
    min_src: int = 40
    max_src: int = 60

    def __post_init__(self) -> None:
        if not 1 <= self.target_len <= self.min_src <= self.max_src or self.vocab < 2:
            raise ValueError("need 1 <= target_len <= min_src <= max_src and vocab >= 2")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        S = torch.randint(self.min_src, self.max_src + 1, (batch_size,), generator=generator)
        x = torch.randint(0, self.vocab, (batch_size, self.max_src), generator=generator)
        key_mask = torch.arange(self.max_src)[None] < S[:, None]
        x = x.masked_fill(~key_mask, 0)
        t = torch.arange(self.target_len, dtype=torch.float64)
        align = ((t[None] + 0.5) * S[:, None] / self.target_len).floor().long()  # (B, T)
        return {"src": x, "key_mask": key_mask, "lengths": S, "align": align, "y": x.gather(1, align)}


@dataclass(frozen=True)
class AlignConfig:
    """Sizes and budget of the alignment runs (the same for both arms); ``half_window`` is local-p's ``D``."""

    vocab: int = 16
    target_len: int = 20
    min_src: int = 40
    max_src: int = 60
    embed_dim: int = 32
    half_window: int = 8
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-2
    eval_batch: int = 512


class AlignModel(nn.Module):
    r"""Source states, a decoder state per step, Luong attention (local-p or global), ``softmax(W_s tanh(W_c [c_t; h_t]))``.

    ``\bar h_s = E[x_s] + PE(s)`` (fixed sinusoidal positions), ``h_t = tanh(W (e_t + e_S))``.
    ``kind="local-p"``: :class:`~attn.local.LocalPAttention` (``general`` score,
    ``D = half_window``) and ``W_c``; ``kind="global"``:
    :class:`~attn.global_attention.LuongGlobalAttention` (``general``), which holds its ``W_c``.
    ``forward(batch)`` -> ``logits (B, T, vocab)``; :meth:`positions` -> ``p_t (B, T)`` (local-p only).
    """

    pe: Tensor

    def __init__(self, kind: Literal["local-p", "global"], config: AlignConfig) -> None:
        super().__init__()
        E = config.embed_dim
        self.kind = kind
        self.src = nn.Embedding(config.vocab, E)
        self.step = nn.Embedding(config.target_len, E)
        self.length = nn.Embedding(config.max_src + 1, E)
        self.dec = nn.Linear(E, E)
        self.register_buffer("pe", sinusoidal_embedding(torch.arange(config.max_src), E, base=100.0), persistent=False)
        self.local: LocalPAttention | None = None
        self.glob: LuongGlobalAttention | None = None
        if kind == "local-p":
            self.local = LocalPAttention(E, E, config.half_window, "general")
            self.w_c = nn.Linear(2 * E, E, bias=False)
        elif kind == "global":
            self.glob = LuongGlobalAttention(E, E, "general")
        else:
            raise ValueError(f"kind must be 'local-p' or 'global', got {kind!r}")
        self.out = nn.Linear(E, config.vocab)

    def states(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Source states ``(B, S_max, E)`` and decoder states ``(B, T, E)``."""
        hs = self.src(batch["src"]) + self.pe
        h = torch.tanh(self.dec(self.step.weight[None] + self.length(batch["lengths"])[:, None]))
        return hs, h

    def positions(self, batch: Batch) -> Tensor:
        """Local-p's predicted centres ``p_t`` ``(B, T)``."""
        if self.local is None:
            raise ValueError("only the local-p model predicts positions")
        _, h = self.states(batch)
        return self.local.positions(h, batch["lengths"])

    def forward(self, batch: Batch) -> Tensor:
        hs, h = self.states(batch)
        if self.local is not None:
            context = self.local(h, hs, key_mask=batch["key_mask"]).output  # (B, T, E)
            h_tilde = torch.tanh(self.w_c(torch.cat([context, h], -1)))
        else:
            assert self.glob is not None
            h_tilde = self.glob(h, hs, key_mask=batch["key_mask"]).output
        return self.out(h_tilde)


def align_loss(model: AlignModel, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy over the ``T`` steps and the token accuracy ``acc``."""
    logits = model(batch)
    loss = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())
    return loss, {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


@dataclass
class AlignRuns:
    """Per arm, one value per seed: ``accuracy`` (held-out token accuracy).

    Local-p only: ``error`` / ``error_init``, the mean ``|p_t - a(t)|`` after
    training / at initialisation; ``in_window`` / ``in_window_init``, the fraction of
    steps whose window ``|s - round(p_t)| <= D`` holds ``a(t)``; ``curves``: ``p_t``
    for ``t = 0 .. T-1`` at each of ``probe_lengths`` (per seed, a list of lists).
    """

    seeds: list[int]
    config: AlignConfig
    probe_lengths: list[int]
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    error: list[float] = field(default_factory=list)
    error_init: list[float] = field(default_factory=list)
    in_window: list[float] = field(default_factory=list)
    in_window_init: list[float] = field(default_factory=list)
    curves: list[list[list[float]]] = field(default_factory=list)

    @property
    def chance(self) -> float:
        return 1.0 / self.config.vocab


@torch.no_grad()
def _position_stats(model: AlignModel, batch: Batch, D: int) -> tuple[float, float]:
    p = model.positions(batch)
    err = (p - batch["align"]).abs().mean().item()
    inside = ((torch.floor(p + 0.5) - batch["align"]).abs() <= D).float().mean().item()
    return err, inside


def run_alignment(seeds: Sequence[int] = (0, 1, 2), config: AlignConfig | None = None,
                  probe_lengths: Sequence[int] = (40, 50, 60)) -> AlignRuns:
    """Train local-p and global on :class:`MonotoneAlignment`, same seeds, batches and budget (Adam, clip 1, 1 thread).

    Held-out batch: seed ``10_000 + s``. The position statistics of local-p are
    measured on that batch before and after training.
    """
    cfg = config or AlignConfig()
    task = MonotoneAlignment(cfg.vocab, cfg.target_len, cfg.min_src, cfg.max_src)
    runs = AlignRuns(seeds=list(seeds), config=cfg, probe_lengths=list(probe_lengths))
    kinds: tuple[Literal["local-p", "global"], ...] = ("local-p", "global")
    for kind in kinds:
        runs.accuracy[kind] = []
        for s in seeds:
            gen = set_seed(s)
            model = AlignModel(kind, cfg)
            held = task.sample(cfg.eval_batch, torch.Generator().manual_seed(10_000 + s))
            if kind == "local-p":
                e0, w0 = _position_stats(model, held, cfg.half_window)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            with cpu_threads(1):
                model.train()
                for _ in range(cfg.steps):
                    loss, _m = align_loss(model, task.sample(cfg.batch_size, gen))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                model.eval()
                with torch.no_grad():
                    runs.accuracy[kind].append(align_loss(model, held)[1]["acc"])
            if kind == "local-p":
                e1, w1 = _position_stats(model, held, cfg.half_window)
                runs.error_init.append(e0)
                runs.in_window_init.append(w0)
                runs.error.append(e1)
                runs.in_window.append(w1)
                probe = {"lengths": torch.tensor(list(probe_lengths))}
                with torch.no_grad():
                    _, h = model.states({"src": torch.zeros(len(probe_lengths), cfg.max_src, dtype=torch.long), **probe})
                    assert model.local is not None
                    runs.curves.append(model.local.positions(h, probe["lengths"]).tolist())
    return runs
