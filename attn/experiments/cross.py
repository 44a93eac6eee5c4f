"""Chapter 4's experiments (cross-attention): sort the distinct tokens of a source, read through cross-attention.

The layer (:class:`attn.cross.CrossAttention`) stays in :mod:`attn.cross`; the task, the one-layer
decoder around it and the loss live here. The decoder is not :class:`attn.models.TransformerBlock`:
that block holds one sequence mixer, and a decoder layer needs two (causal self-attention, then
cross-attention to a second sequence, Vaswani et al. 2017, fig. 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cross import CrossAttention
from ..multihead import MultiHeadAttention

__all__ = ["SortUniqueTask", "CrossAttentionDecoder", "sort_unique_loss", "KEY_SOURCES", "run_key_control"]

KeySource = Literal["content", "position"]
KEY_SOURCES: tuple[KeySource, ...] = ("content", "position")


@dataclass
class SortUniqueTask:
    """Output the *distinct* source tokens in ascending order, then EOS.

    ``src`` has a random length in ``[min_len, max_len]``, ends with EOS and is
    padded to ``max_len + 1``; tokens repeat, so the target is usually shorter
    than the source. The true alignment of target step ``t`` is every source
    position holding ``tgt[t]`` (the EOS position for the final EOS): it
    depends on the content, not on positions, which is what cross-attention
    (content-based lookup in another sequence) is for.

    Tokens: ``0`` PAD, ``1`` BOS, ``2`` EOS, content ``3 .. 3 + n_values - 1``.
    """

    n_values: int = 16
    min_len: int = 6
    max_len: int = 12

    PAD = 0
    BOS = 1
    EOS = 2

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len or self.n_values < 2:
            raise ValueError(f"need 1 <= min_len <= max_len and n_values >= 2, got {self.min_len}, {self.max_len}, {self.n_values}")

    @property
    def vocab(self) -> int:
        return 3 + self.n_values

    @property
    def length(self) -> int:
        """Padded length of source and target, ``max_len + 1``."""
        return self.max_len + 1

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``src``, ``src_mask``, ``tgt``, ``tgt_in``, ``tgt_mask`` ``(B, max_len + 1)`` and ``align`` ``(B, T, S)`` bool."""
        B, S, V = batch_size, self.length, self.n_values
        lengths = torch.randint(self.min_len, self.max_len + 1, (B,), generator=generator)
        pos = torch.arange(S)
        content = torch.randint(3, 3 + V, (B, S), generator=generator)
        src = torch.where(pos < lengths[:, None], content, torch.full_like(content, self.PAD))
        src = torch.where(pos == lengths[:, None], torch.full_like(src, self.EOS), src)  # (B, S)
        src_mask = pos <= lengths[:, None]
        present = F.one_hot(src, 3 + V)[..., 3:].amax(1).bool()  # (B, V) which content tokens occur
        count = present.sum(1)  # (B,) distinct tokens
        ranked = torch.where(present, torch.arange(V), V).sort(1).values + 3  # present tokens first, ascending
        ranked = torch.cat([ranked, torch.zeros(B, max(S - V, 0), dtype=torch.long)], 1)[:, :S]
        tgt = torch.where(pos < count[:, None], ranked, torch.full_like(ranked, self.PAD))
        tgt = torch.where(pos == count[:, None], torch.full_like(tgt, self.EOS), tgt)  # (B, T)
        tgt_mask = pos <= count[:, None]
        tgt_in = torch.cat([torch.full((B, 1), self.BOS), tgt[:, :-1]], 1)
        align = (tgt[:, :, None] == src[:, None, :]) & tgt_mask[:, :, None] & src_mask[:, None, :]  # (B, T, S)
        return {"src": src, "src_mask": src_mask, "tgt": tgt, "tgt_in": tgt_in, "tgt_mask": tgt_mask, "align": align}


class CrossAttentionDecoder(nn.Module):
    """A one-layer Transformer decoder reading a source memory of another width through :class:`CrossAttention`.

    Source: token embeddings of width ``kdim`` (the "encoder" output; no
    position embeddings, since sorting a multiset does not depend on order).
    Target: token + position embeddings of width ``E``; then, pre-norm with
    residuals, causal self-attention, cross-attention to the source, a
    feed-forward layer, and a linear read-out (Vaswani et al. 2017, fig. 1,
    one decoder layer).

    Args:
        vocab: vocabulary size; ``length``: padded source/target length.
        embed_dim: decoder width ``E``; ``kdim``: source width; ``num_heads``: heads.
        keys: what the cross-attention's keys are made of. ``"content"`` (the model): keys and values are
            the source token embeddings, ``K = V = C``. ``"position"`` (the control): keys are learned
            embeddings of the source *positions* only, values are still the token embeddings; the weights
            can then depend on where a source token sits and on the target prefix, never on which token
            sits there, so any alignment they express is a fixed positional pattern.
    """

    def __init__(self, vocab: int, length: int, embed_dim: int = 32, kdim: int = 24, num_heads: int = 2,
                 keys: KeySource = "content") -> None:
        super().__init__()
        if keys not in KEY_SOURCES:
            raise ValueError(f"keys must be one of {KEY_SOURCES}, got {keys!r}")
        self.keys = keys
        self.src_embed = nn.Embedding(vocab, kdim)
        self.src_pos: nn.Embedding | None = nn.Embedding(length, kdim) if keys == "position" else None
        self.tgt_embed, self.tgt_pos = nn.Embedding(vocab, embed_dim), nn.Embedding(length, embed_dim)
        self.self_attn = MultiHeadAttention(embed_dim, num_heads)
        self.cross = CrossAttention(embed_dim, num_heads, kdim=kdim, vdim=kdim)
        self.ff = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.ReLU(), nn.Linear(4 * embed_dim, embed_dim))
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(4))
        self.out = nn.Linear(embed_dim, vocab)

    def forward(self, src: Tensor, tgt_in: Tensor, src_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``src (B, S)``, ``tgt_in (B, T)`` -> ``logits (B, T, vocab)``, cross weights ``(B, h, T, S)``."""
        if src.ndim != 2 or tgt_in.ndim != 2 or src.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"src (B, S) and tgt_in (B, T) token ids expected, got {tuple(src.shape)} and {tuple(tgt_in.shape)}")
        memory = self.src_embed(src)  # (B, S, kdim): the values, and the keys of the content model
        key_memory = memory
        if self.src_pos is not None:  # the control: keys carry the source positions only
            key_memory = self.src_pos.weight[: src.shape[1]].expand(src.shape[0], -1, -1)  # (B, S, kdim)
        x = self.tgt_embed(tgt_in) + self.tgt_pos.weight[: tgt_in.shape[1]]  # (B, T, E)
        x = x + self.self_attn(self.norms[0](x), is_causal=True).output
        cross = self.cross(self.norms[1](x), key_memory, memory, key_mask=src_mask, need_weights=True)
        x = x + cross.output  # (B, T, E)
        x = x + self.ff(self.norms[2](x))
        return self.out(self.norms[3](x)), cross.weights  # (B, T, V), (B, h, T, S)


def sort_unique_loss(model: CrossAttentionDecoder, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on real target positions; token accuracy, sequence accuracy, alignment accuracy.

    Alignment accuracy: the share of real target steps whose largest
    head-averaged cross-attention weight falls on a source position that holds
    the token being emitted.
    """
    logits, w = model(batch["src"], batch["tgt_in"], batch["src_mask"])
    m = batch["tgt_mask"]
    loss = F.cross_entropy(logits[m], batch["tgt"][m])
    right = (logits.argmax(-1) == batch["tgt"]) | ~m
    top = w.mean(1).argmax(-1, keepdim=True)  # (B, T, 1)
    hit = batch["align"].gather(-1, top)[..., 0]
    return loss, {
        "acc": float(right[m].float().mean()),
        "seq_acc": float(right.all(1).float().mean()),
        "align_acc": float(hit[m].float().mean()),
    }


def run_key_control(seeds: list[int], steps: int = 400, lr: float = 3e-3, batch_size: int = 64,
                    task: SortUniqueTask | None = None,
                    device: torch.device | str = "cpu") -> dict[str, dict[str, list[float]]]:
    """Train the one-head decoder with content keys and with position-only keys, one run per seed each.

    Both arms see the same batches (the trainer's batch stream follows ``seed``) for the same ``steps``.
    Returns ``{metric: {arm: [one held-out value per seed]}}`` for ``acc``, ``seq_acc`` and ``align_acc``
    (see :func:`sort_unique_loss`), measured on one fresh held-out batch of 512 sources.
    """
    from ..train import evaluate, train  # the trainer imports nothing from the experiments; keep it lazy

    if not seeds:
        raise ValueError("run_key_control needs at least one seed")
    task = task or SortUniqueTask()
    out: dict[str, dict[str, list[float]]] = {m: {k: [] for k in KEY_SOURCES} for m in ("acc", "seq_acc", "align_acc")}
    for keys in KEY_SOURCES:
        for seed in seeds:
            torch.manual_seed(seed)
            model = CrossAttentionDecoder(task.vocab, task.length, embed_dim=32, kdim=24, num_heads=1, keys=keys)
            train(model, task.sample, sort_unique_loss, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                  log_every=steps, device=device, progress=False)
            held = evaluate(model, task.sample, sort_unique_loss, device=device)
            for m in out:
                out[m][keys].append(held[m])
    return out
