"""Chapter 28's experiments: the last-value and first-value tasks (length extrapolation), the one-layer model per
position scheme, training to a target accuracy, RoPE rescaled for a longer context, and the RoPE layout conversion.

:class:`PositionModel` stays a model of its own rather than an :class:`attn.models.TokenLM`: it places positions
inside its one attention layer for the RoPE and ALiBi arms (:class:`~attn.positions.PositionalAttention`), has no
feed-forward sublayer, and a biased output head.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..positions import PositionalAttention, RotaryEmbedding, half_to_interleaved, sinusoidal_embedding
from ..train import evaluate, set_seed, train

__all__ = [
    "LastValueTask", "FirstValueTask", "PositionModel", "position_loss", "accuracy_at", "train_to_target",
    "LengthRun", "length_runs", "rescale_rope", "tune_at_length", "convert_layout",
]


class LastValueTask:
    """Length-extrapolation task: tokens are values ``0..V-1`` or a READ token ``V``; at every READ, output the most recent value.

    The answer is the nearest earlier value token: content (skip READ tokens)
    plus recency (the nearest one), the kind of local dependency text is full of.
    The first token is always a value, so every READ has an answer.

    ``sample(batch, length, generator)`` -> ``x (B, n)`` tokens, ``y (B, n)`` targets
    (``-100`` where not a READ, ignored by the loss).
    """

    def __init__(self, n_values: int = 8, read_prob: float = 0.4) -> None:
        self.n_values, self.read_prob = n_values, read_prob
        self.read = n_values
        self.vocab = n_values + 1

    def sample(self, batch: int, length: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        values = torch.randint(0, self.n_values, (batch, length), generator=generator)
        is_read = torch.rand(batch, length, generator=generator) < self.read_prob
        is_read[:, 0] = False
        x = torch.where(is_read, torch.full_like(values, self.read), values)
        idx = torch.where(is_read, 0, torch.arange(length).expand(batch, length))  # position of each value, 0 at READs
        last = torch.cummax(idx, 1).values  # position of the most recent value at or before t
        y = torch.where(is_read, values.gather(1, last), torch.full_like(values, -100))
        return {"x": x, "y": y}


class FirstValueTask(LastValueTask):
    """Far-recall task: the sequences of :class:`LastValueTask`, but at every READ output the *first* value (token 0).

    The answer lies ``t`` positions back from a READ at ``t``: up to ``4n - 1`` at length ``4n``. Every value token
    looks alike, so only position tells the first one apart: a recency bias (ALiBi) points the wrong way.
    """

    def sample(self, batch: int, length: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        data = super().sample(batch, length, generator)
        x, y = data["x"], data["y"]
        return {"x": x, "y": torch.where(y >= 0, x[:, :1].expand_as(x), y)}


class PositionModel(nn.Module):
    """Embedding (+ sinusoidal positions if chosen) -> causal :class:`~attn.positions.PositionalAttention` -> LayerNorm -> linear head.

    ``forward(x (B, n) tokens, need_weights=False) -> (logits (B, n, V), weights)``.
    """

    def __init__(self, vocab: int, position: str, embed_dim: int = 32, num_heads: int = 4, base: float = 10000.0,
                 interleaved: bool = False) -> None:
        super().__init__()
        self.position = position
        self.embed = nn.Embedding(vocab, embed_dim)
        self.attention = PositionalAttention(embed_dim, num_heads, position, causal=True, base=base,
                                             interleaved=interleaved)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.embed(x)  # (B, n, E)
        if self.position == "sinusoidal":
            h = h + sinusoidal_embedding(torch.arange(x.shape[1], device=x.device), h.shape[-1]).to(h)
        out, w = self.attention(h, need_weights=need_weights)
        return self.head(self.norm(h + out)), w


def position_loss(model: PositionModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy and accuracy over the READ positions."""
    logits, _ = model(batch["x"])
    y = batch["y"]
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    keep = y >= 0
    acc = (logits.argmax(-1)[keep] == y[keep]).float().mean()
    return loss, {"acc": float(acc)}


Task = LastValueTask  # FirstValueTask is one too


def accuracy_at(model: PositionModel, task: Task, length: int, batch_size: int = 256, seed: int = 12345) -> float:
    """Accuracy at the READ tokens of one held-out batch of ``batch_size`` sequences of ``length`` tokens."""
    return evaluate(model, lambda b, g: task.sample(b, length, g), position_loss, batch_size=batch_size,
                    seed=seed)["acc"]


class _Reached(Exception):
    """Raised by :func:`train_to_target`'s callback to end training at the target."""


def train_to_target(model: PositionModel, task: Task, length: int, *, target: float = 0.95, max_steps: int = 200,
                    check_every: int = 25, lr: float = 1e-2, batch_size: int = 32, seed: int = 0,
                    device: torch.device | str = "cpu") -> int | None:
    """Train (Adam, :func:`attn.train.train`) at ``length`` until the accuracy on a held-out check batch (128
    sequences, its own seed) reaches ``target``, checked every ``check_every`` steps, at most ``max_steps``.

    The same rule for every position scheme: each is trained to competence rather than for one fixed budget.
    Returns the step at which the target was reached, or ``None`` (censored: not reached by ``max_steps``).
    """
    reached: list[int] = []

    def check(step: int, m: PositionModel) -> None:
        if accuracy_at(m, task, length, batch_size=128, seed=777) >= target:
            reached.append(step)
            raise _Reached
        m.train()

    with contextlib.suppress(_Reached):
        train(model, lambda b, g: task.sample(b, length, g), position_loss, max_steps, batch_size=batch_size, lr=lr,
              seed=seed, log_every=check_every, progress=False, callback=check, device=device)
    model.eval()
    return reached[0] if reached else None


@dataclass
class LengthRun:
    """One scheme's runs: ``steps[i]`` (None = censored) and ``acc[length][i]`` per seed ``seeds[i]``; ``models``."""

    scheme: str
    seeds: list[int]
    steps: list[int | None] = field(default_factory=list)
    acc: dict[int, list[float]] = field(default_factory=dict)
    models: list[PositionModel] = field(default_factory=list)


def length_runs(task: Task, schemes: Sequence[str], seeds: Sequence[int], train_len: int, lengths: Sequence[int], *,
                embed_dim: int = 64, num_heads: int = 8, target: float = 0.95, max_steps: int = 200,
                check_every: int = 25, lr: float = 1e-2, batch_size: int = 32, eval_batch: int = 256,
                device: torch.device | str = "cpu") -> dict[str, LengthRun]:
    """Train one :class:`PositionModel` per scheme and seed with :func:`train_to_target` at ``train_len`` (the
    model's initialisation and the batches follow the seed: every scheme sees the same batches), then measure the
    accuracy at every test length on ``eval_batch`` fresh sequences. Returns ``{scheme: LengthRun}``."""
    runs: dict[str, LengthRun] = {}
    for scheme in schemes:
        run = LengthRun(scheme, list(seeds), acc={L: [] for L in lengths})
        for s in seeds:
            set_seed(s)
            model = PositionModel(task.vocab, scheme, embed_dim, num_heads)
            run.steps.append(train_to_target(model, task, train_len, target=target, max_steps=max_steps,
                                             check_every=check_every, lr=lr, batch_size=batch_size, seed=s,
                                             device=device))
            for L in lengths:
                run.acc[L].append(accuracy_at(model, task, L, batch_size=eval_batch))
            run.models.append(model.cpu())
        runs[scheme] = run
    return runs


def rescale_rope(model: PositionModel, method: str, factor: float, original_length: int) -> PositionModel:
    """Set the RoPE frequencies of ``model``'s attention for a context ``factor`` times ``original_length``
    (:meth:`attn.positions.RotaryEmbedding.rescale`: ``"default"``, ``"pi"``, ``"ntk"``, ``"yarn"``), in place."""
    rotary = model.attention.rotary
    if not isinstance(rotary, RotaryEmbedding):
        raise ValueError(f"rescale_rope needs a RoPE model, got position={model.position!r}")
    rotary.rescale(method, factor, original_length)
    return model


def tune_at_length(model: PositionModel, task: Task, length: int, steps: int, *, lr: float = 3e-3,
                   batch_size: int = 32, seed: int = 0, device: torch.device | str = "cpu") -> PositionModel:
    """A few Adam steps at the new ``length`` on a copy of ``model`` (positions as they are set); returns the copy.

    ``steps = 0`` returns an untrained copy: the rescaled model as is."""
    tuned = copy.deepcopy(model)
    if steps > 0:
        train(tuned, lambda b, g: task.sample(b, length, g), position_loss, steps, batch_size=batch_size, lr=lr,
              seed=seed, log_every=steps, progress=False, device=device)
    return tuned.eval()


def convert_layout(model: PositionModel, permute: bool = True) -> PositionModel:
    """A copy of a half-layout RoPE ``model`` (``rotate_half``, GPT-NeoX / ``transformers``) running the interleaved
    layout (GPT-J / Meta). With ``permute``, every head's rows of ``W^Q``, ``W^K`` (and biases) are reordered by
    :func:`attn.positions.half_to_interleaved`, which makes the copy compute the same function; without it, the
    weights are loaded as they are, the checkpoint-conversion pitfall."""
    attention, rotary = model.attention, model.attention.rotary
    if model.position != "rope" or not isinstance(rotary, RotaryEmbedding) or rotary.interleaved:
        raise ValueError("convert_layout needs a half-layout RoPE PositionModel")
    out = PositionModel(model.embed.num_embeddings, "rope", model.embed.embedding_dim, attention.num_heads,
                        base=rotary.base, interleaved=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if permute:
        d = attention.head_dim
        rows = (torch.arange(attention.num_heads)[:, None] * d + half_to_interleaved(d)[None]).flatten()
        for name in ("q_proj", "k_proj"):
            for p in ("weight", "bias"):
                key = f"attention.{name}.{p}"
                if key in state:
                    state[key] = state[key][rows]
    out.load_state_dict(state)
    return out.eval()
