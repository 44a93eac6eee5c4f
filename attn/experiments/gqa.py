"""Chapter 27's experiments: a small decoder language model on grouped-query attention, and cached greedy decoding.

:class:`DecoderLM` is :class:`attn.models.TokenLM` (pre-norm blocks, learned absolute positions) with a causal
:class:`attn.gqa.GroupedQueryAttention` as every block's mixer; :func:`generate` decodes greedily, with the KV
cache (prefill, then one token per step) or by recomputing the whole sequence each step (the baseline).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..gqa import GroupedQueryAttention, KVCache
from ..models import LMOutput, TokenLM, greedy_decode

__all__ = ["DecoderLM", "generate"]


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
