"""Chapter 29's experiments: MHA, GQA and multi-head latent attention trained from scratch at a matched KV cache.

The task is :class:`attn.experiments.gated.CopyLMTask` (``BOS``, a random segment, the same segment again): the
second half can only be predicted by attending to the first (an induction head), so each arm's attention must
work. Every arm is the book's :class:`attn.models.TokenLM` (pre-norm blocks, learned absolute positions) with a
different mixer; :func:`matched_mixers` sizes multi-head latent attention (DeepSeek-AI 2024, "DeepSeek-V2",
section 2.1) so that its cache per token, ``d_c + d_R`` numbers, equals that of grouped-query attention with
``g`` key/value heads, ``2 g d`` (Ainslie et al. 2023), and :func:`train_copy_lms` trains them on the same seeds
and batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gqa import GroupedQueryAttention
from ..latent import MultiHeadLatentAttention
from ..models import TokenLM
from ..train import set_seed, train
from .gated import CopyLMTask

__all__ = ["absorbed_prefill_ratio", "cache_numbers_per_token", "copy_loss", "matched_mixers", "CopyRuns",
           "train_copy_lms"]


def absorbed_prefill_ratio(kv_rank: int, rope_dim: int, head_dim: int, v_head_dim: int) -> float:
    r"""How much more attention arithmetic the absorbed form does than the unabsorbed one when every token queries.

    Per head and per (query, key) pair, absorbed attention forms a score over :math:`d_c + d_R` numbers and sums
    :math:`d_c` value numbers; unabsorbed, :math:`d + d_R` and :math:`d_v`:
    :math:`(2 d_c + d_R) / (d + d_R + d_v)` (DeepSeek-V2's sizes: :math:`1088 / 320 = 3.4`).
    """
    return (2 * kv_rank + rope_dim) / (head_dim + rope_dim + v_head_dim)


@torch.no_grad()
def cache_numbers_per_token(mixer: nn.Module, embed_dim: int) -> int:
    """Numbers a layer caches per token, read off its own cache tensors after one token: ``nbytes / itemsize``."""
    new_cache = getattr(mixer, "new_cache", None)
    if new_cache is None:
        raise TypeError(f"{type(mixer).__name__} has no new_cache(batch, max_len)")
    cache = new_cache(1, 1)
    weight = next(mixer.parameters())
    mixer(torch.zeros(1, 1, embed_dim, dtype=weight.dtype, device=weight.device), cache=cache)
    return int(cache.nbytes // cache.dtype.itemsize)


def matched_mixers(embed_dim: int, num_heads: int, num_kv_heads: int, rope_dim: int) -> dict[str, Callable[[int], nn.Module]]:
    r"""Three mixer factories (``layer index -> module``): MHA, GQA with ``num_kv_heads`` heads, and MLA sized to GQA's cache.

    Heads of width ``d = embed_dim / num_heads`` everywhere. MLA gets ``h = num_heads`` heads with keys and values
    of width ``d``, a rotary key of width ``d_R = rope_dim`` and a latent of rank ``d_c = 2 g d - d_R``, so that
    its cache :math:`d_c + d_R` equals GQA's :math:`2 g d` (MHA's is :math:`2 h d`). Queries are not compressed
    (``q_rank=None``: query compression saves activations, not cache).
    """
    d = embed_dim // num_heads
    kv_rank = 2 * num_kv_heads * d - rope_dim
    if embed_dim % num_heads or kv_rank < 1:
        raise ValueError(f"need embed_dim divisible by num_heads and 2 g d > rope_dim, got E={embed_dim}, "
                         f"h={num_heads}, g={num_kv_heads}, d_R={rope_dim}")
    return {
        "MHA": lambda i: GroupedQueryAttention(embed_dim, num_heads, num_heads),
        f"GQA (g = {num_kv_heads})": lambda i: GroupedQueryAttention(embed_dim, num_heads, num_kv_heads),
        f"MLA (d_c = {kv_rank}, d_R = {rope_dim})": lambda i: MultiHeadLatentAttention(
            embed_dim, num_heads, kv_rank=kv_rank, rope_dim=rope_dim),
    }


def copy_loss(model: TokenLM, batch: dict[str, Tensor], segment: int) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy on the whole sequence; ``acc``: accuracy on the repeated half (the copy)."""
    x = batch["x"]
    logits = model(x[:, :-1]).logits  # (B, n - 1, vocab)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    copied = (logits.argmax(-1) == x[:, 1:])[:, segment:]
    return loss, {"acc": float(copied.float().mean())}


@dataclass
class CopyRuns:
    """Per arm, one value per seed (seed order): held-out copy ``accuracy`` after the budget, ``steps_to_target``
    (``None``: not reached within the budget), the cache ``numbers`` per token and layer, ``params``, the models."""

    seeds: list[int]
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    steps_to_target: dict[str, list[int | None]] = field(default_factory=dict)
    numbers: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    models: dict[str, list[TokenLM]] = field(default_factory=dict)


def train_copy_lms(task: CopyLMTask, mixers: Mapping[str, Callable[[int], nn.Module]], seeds: Sequence[int], *,
                   embed_dim: int, num_layers: int = 2, steps: int = 100, lr: float = 1e-2, batch_size: int = 32,
                   target: float = 0.95, log_every: int = 10, held_out: int = 256,
                   device: torch.device | str = "cpu") -> CopyRuns:
    """Train one :class:`~attn.models.TokenLM` per arm and seed on the copy task; same seed, same batches per arm.

    ``steps_to_target``: the first logged step (every ``log_every``) at which the copy accuracy on that step's
    training batch, a fresh sample measured before the update, reached ``target``. ``accuracy``: on ``held_out``
    fresh sequences after ``steps`` steps. Positions are learned, initialised ``N(0, 1)``.
    """
    runs = CopyRuns(list(seeds))
    test = task.sample(held_out, torch.Generator().manual_seed(10_000))
    seg = task.segment

    def loss_fn(model: TokenLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return copy_loss(model, batch, seg)

    for name, mixer in mixers.items():
        for s in seeds:
            set_seed(s)
            lm = TokenLM(task.vocab, embed_dim, num_layers, mixer=mixer, max_len=task.length, position_std=1.0)
            hist = train(lm, task.sample, loss_fn, steps, batch_size=batch_size, lr=lr, seed=s, progress=False,
                         log_every=log_every, device=device)
            runs.steps_to_target.setdefault(name, []).append(hist.first_step_reaching("acc", target))
            with torch.no_grad():
                _, metrics = loss_fn(lm.eval(), {k: v.to(device) for k, v in test.items()})
            runs.accuracy.setdefault(name, []).append(metrics["acc"])
            runs.models.setdefault(name, []).append(lm)
        first = runs.models[name][0].blocks[0]
        assert isinstance(first, nn.Module) and isinstance(first.mixer, nn.Module)
        runs.numbers[name] = cache_numbers_per_token(first.mixer, embed_dim)
        runs.params[name] = sum(p.numel() for p in runs.models[name][0].parameters())
    return runs
