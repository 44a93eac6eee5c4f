"""Chapter 27's experiments: a small decoder language model on grouped-query attention, and cached greedy decoding;
recall models trained as MHA and GQA (from scratch, or converted and uptrained), the similarity of their heads, and
one decoding step against a long cache.

:class:`DecoderLM` is :class:`attn.models.TokenLM` (pre-norm blocks, learned absolute positions) with a causal
:class:`attn.gqa.GroupedQueryAttention` as every block's mixer; :func:`generate` decodes greedily, with the KV
cache (prefill, then one token per step) or by recomputing the whole sequence each step (the baseline).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..gqa import GroupedQueryAttention, KVCache, mha_to_gqa
from ..models import LMOutput, RecallModel, TokenLM, greedy_decode, recall_loss
from ..tasks import AssociativeRecall
from ..train import evaluate, set_seed, train

__all__ = ["DecoderLM", "generate", "head_similarity", "off_diagonal_mean", "RecallRuns", "recall_experiment",
           "decode_bytes_read", "decode_step"]


class DecoderLM(TokenLM):
    """A small pre-norm decoder LM: :class:`~attn.models.TokenLM` with :class:`~attn.gqa.GroupedQueryAttention` mixers.

    Args:
        vocab: vocabulary size.
        embed_dim, num_heads, num_kv_heads: the width and the query/key-value heads of every layer.
        num_layers: blocks.
        max_len: learned absolute positions (initialised ``N(0, 1)``, as ``nn.Embedding``).

    ``forward(tokens (B, t), *, caches=None, ...) -> LMOutput``: with a list of caches (one per layer,
    :meth:`new_caches`) the tokens continue the cached sequence (positions start at the cached length).
    """

    def __init__(self, vocab: int, embed_dim: int = 64, num_heads: int = 4, num_kv_heads: int | None = None,
                 num_layers: int = 2, max_len: int = 512) -> None:
        super().__init__(vocab, embed_dim, num_layers,
                         mixer=lambda i: GroupedQueryAttention(embed_dim, num_heads, num_kv_heads),
                         max_len=max_len, position_std=1.0)
        self.max_len = max_len

    def attention_layers(self) -> list[GroupedQueryAttention]:
        """The mixer of every block."""
        layers = []
        for block in self.blocks:
            mixer = getattr(block, "mixer", None)
            assert isinstance(mixer, GroupedQueryAttention)
            layers.append(mixer)
        return layers

    def new_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        """One empty :class:`~attn.gqa.KVCache` per layer, ``max_len`` tokens (default the model's)."""
        return [layer.new_cache(batch, max_len or self.max_len) for layer in self.attention_layers()]

    def forward(self, tokens: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None,
                need_weights: bool = False, caches: list[Any] | None = None) -> LMOutput:
        if caches is not None:
            if not isinstance(caches, (list, tuple)) or not all(isinstance(c, KVCache) for c in caches):
                raise TypeError(f"caches must be a list of KVCache (one per layer, model.new_caches(batch)), "
                                f"got {type(caches).__name__}")
            if len(caches) != len(self.blocks):
                raise ValueError(f"caches must hold one KVCache per layer: {len(self.blocks)} layers, got {len(caches)}")
            if len({c.length for c in caches}) > 1:
                raise ValueError(f"the caches hold different lengths {[c.length for c in caches]}: they must "
                                 "advance together")
        return super().forward(tokens, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights,
                               caches=None if caches is None else list(caches))


@torch.no_grad()
def generate(model: DecoderLM, prompt: Tensor, steps: int, use_cache: bool = True) -> Tensor:
    """Greedy decoding of ``steps`` tokens after ``prompt`` ``(B, p)``; returns ``(B, p + steps)``.

    :func:`attn.models.greedy_decode` (chapter 3's Transformer block) on this chapter's model.
    ``use_cache=True``: the prompt is run once (prefill), then each step feeds only the newest token
    through the cached layers. ``False``: every step recomputes the whole sequence (the baseline the
    cache replaces).
    """
    return greedy_decode(model, prompt, steps, use_cache=use_cache)


# ---------------------------------------------------------------------------------------------------------------
# Recall: which heads are alike, GQA from scratch, and the uptraining budget after mean-pooling
# ---------------------------------------------------------------------------------------------------------------


def _pair_cosines(rows: Tensor) -> Tensor:
    """``(h, f)`` -> ``(h, h)`` cosine similarities of the rows."""
    unit = torch.nn.functional.normalize(rows, dim=-1)
    return unit @ unit.T


@torch.no_grad()
def head_similarity(model: RecallModel, x: Tensor) -> dict[str, Tensor]:
    r"""Per pair of query heads ``(i, j)``, how alike the heads of a trained recall model are, three ways; ``(h, h)`` each.

    * ``"W^K"``: cosine of the key projections :math:`W^K_i, W^K_j \in \mathbb{R}^{d \times E}` (flattened): what
      mean-pooling (Ainslie et al. 2023, section 2.1) averages.
    * ``"W^Q W^K"``: cosine of the bilinear forms :math:`W^{Q\top}_i W^K_i \in \mathbb{R}^{E \times E}` that the
      scores :math:`x_t^\top W^{Q\top}_i W^K_i x_j` depend on. They are invariant to :math:`W^Q_i \to A W^Q_i`,
      :math:`W^K_i \to A^{-\top} W^K_i`, which leaves a head's scores unchanged but moves its :math:`W^K_i`.
    * ``"scores"``: cosine of the query token's score rows :math:`s_{i} = q_i^\top K_i / \sqrt d` over the
      ``B`` held-out sequences, each row centred over its keys (softmax ignores a shift), flattened ``(B n)``.

    ``model`` is a :class:`~attn.models.RecallModel` whose attention has as many key/value heads as query heads
    (``g = h``); ``x`` ``(B, 2 n_pairs + 1)`` task tokens.
    """
    att = model.attention
    if not isinstance(att, GroupedQueryAttention) or att.num_kv_heads != att.num_heads:
        raise ValueError("head_similarity needs a RecallModel whose attention is a GroupedQueryAttention with g = h")
    h, d, E = att.num_heads, att.head_dim, att.embed_dim
    w_q = att.q_proj.weight.view(h, d, E)
    w_k = att.k_proj.weight.view(h, d, E)
    tokens = model.tokens(x)  # (B, n, E)
    B, n, _ = tokens.shape
    q = att.q_proj(tokens[:, -1]).view(B, h, d)  # the query token, (B, h, d)
    k = att.k_proj(tokens).view(B, n, h, d)  # (B, n, h, d)
    scores = torch.einsum("bhd,bnhd->hbn", q, k) / d**0.5  # (h, B, n)
    scores = scores - scores.mean(-1, keepdim=True)
    return {
        "W^K": _pair_cosines(w_k.reshape(h, -1)),
        "W^Q W^K": _pair_cosines(torch.einsum("hde,hdf->hef", w_q, w_k).reshape(h, -1)),
        "scores": _pair_cosines(scores.reshape(h, -1)),
    }


def off_diagonal_mean(m: Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (the average over pairs of distinct heads)."""
    mask = ~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
    return float(m[mask].mean())


@dataclass
class RecallRuns:
    """What :func:`recall_experiment` measured, one value per seed (in seed order) in every list.

    ``scratch[g]``: held-out accuracy after ``steps`` steps trained from scratch with ``g`` key/value heads
    (``g = h`` is MHA). ``converted[(g, method)]``: the trained MHA converted to ``g`` heads by ``"mean"`` or
    ``"first"``, before any uptraining. ``uptrained[(g, s)]``: the mean-pooled model after ``s`` uptraining
    steps. ``mha``: the trained MHA model of each seed.
    """

    seeds: list[int]
    scratch: dict[int, list[float]] = field(default_factory=dict)
    converted: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    uptrained: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    mha: list[RecallModel] = field(default_factory=list)


def recall_experiment(task: AssociativeRecall, seeds: Sequence[int], *, width: int = 32, heads: int = 8,
                      scratch_kv_heads: Sequence[int] = (8, 4, 2, 1), convert_kv_heads: Sequence[int] = (2, 1),
                      steps: int = 180, uptrain_checkpoints: Sequence[int] = (36, 90, 180), lr: float = 3e-3,
                      batch_size: int = 32, device: torch.device | str = "cpu") -> RecallRuns:
    """GQA trained from scratch against MHA converted by mean-pooling and uptrained (Ainslie et al. 2023).

    For each seed: a :class:`~attn.models.RecallModel` (``heads`` query heads of width ``width / heads``) is
    trained for ``steps`` steps with each ``g`` in ``scratch_kv_heads`` (``g = heads`` is MHA; same seed, same
    batches); the MHA is converted to each ``g`` in ``convert_kv_heads`` by mean-pooling and by keeping the first
    head of each group (:func:`~attn.gqa.mha_to_gqa`), evaluated, and the mean-pooled model is uptrained with the
    pre-training recipe (Adam, ``lr``) for ``max(uptrain_checkpoints)`` steps, evaluated at every checkpoint
    (constant learning rate: the checkpoint at ``s`` steps is a run of ``s`` steps). Accuracy on 512 held-out
    sequences (:func:`~attn.train.evaluate`).
    """
    if heads not in scratch_kv_heads:
        raise ValueError(f"scratch_kv_heads must include g = heads = {heads} (the MHA that is converted)")
    runs = RecallRuns(list(seeds))
    last = max(uptrain_checkpoints)
    for s in seeds:
        for g in scratch_kv_heads:
            set_seed(s)
            model = RecallModel(task, width, attention=GroupedQueryAttention(width, heads, g))
            train(model, task.sample, recall_loss, steps, batch_size=batch_size, lr=lr, seed=s, progress=False,
                  device=device)
            runs.scratch.setdefault(g, []).append(evaluate(model, task.sample, recall_loss, device=device)["acc"])
            if g == heads:
                runs.mha.append(model)
        mha = runs.mha[-1]
        mha_attention = mha.attention
        assert isinstance(mha_attention, GroupedQueryAttention)
        for g in convert_kv_heads:
            for method in ("first", "mean"):
                conv = copy.deepcopy(mha)
                conv.attention = mha_to_gqa(mha_attention, g, method)
                runs.converted.setdefault((g, method), []).append(
                    evaluate(conv, task.sample, recall_loss, device=device)["acc"])
            def checkpoint(step: int, m: RecallModel, g: int = g) -> None:
                if step in uptrain_checkpoints:
                    runs.uptrained.setdefault((g, step), []).append(
                        evaluate(m, task.sample, recall_loss, device=device)["acc"])
                    m.train()
            log_every = math.gcd(*uptrain_checkpoints)
            train(conv, task.sample, recall_loss, last, batch_size=batch_size, lr=lr, seed=s + 100, progress=False,
                  device=device, log_every=log_every, callback=checkpoint)
    return runs


# ---------------------------------------------------------------------------------------------------------------
# One decoding step against a long cache
# ---------------------------------------------------------------------------------------------------------------


def decode_bytes_read(cached: int, num_kv_heads: int, head_dim: int, bytes_per_number: int = 4,
                      num_layers: int = 1, batch: int = 1) -> int:
    """Bytes of cache one decoding step reads: every cached key and value once, ``2 L B m g d b``."""
    return 2 * num_layers * batch * cached * num_kv_heads * head_dim * bytes_per_number


def decode_step(layer: GroupedQueryAttention, cached: int, seed: int = 0) -> Callable[[], Tensor]:
    """A callable that runs one decoding step of ``layer`` (batch 1, one new token) against ``cached`` random keys.

    The cache is filled once; every call resets its length to ``cached`` so it always reads the same
    ``cached + 1`` keys (for timing). Runs under ``torch.no_grad()``; returns the step's output ``(1, 1, E)``.
    """
    gen = torch.Generator().manual_seed(seed)
    w = layer.k_proj.weight
    cache = layer.new_cache(1, cached + 1)
    g, d = layer.num_kv_heads, layer.head_dim
    with torch.no_grad():
        cache.append(torch.randn(1, g, cached, d, generator=gen).to(w),
                     torch.randn(1, g, cached, d, generator=gen).to(w))
    x = torch.randn(1, 1, layer.embed_dim, generator=gen).to(w)

    def step() -> Tensor:
        cache.length = cached
        with torch.no_grad():
            return layer(x, cache=cache).output

    return step
