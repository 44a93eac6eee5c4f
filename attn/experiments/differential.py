"""Chapter 30's experiments: a small rotary LM that streams through an attention-sink cache, and its data.

:class:`RotaryLM` is :class:`attn.models.TokenLM` (pre-norm blocks, no learned positions) with a causal
:class:`attn.attention.Attention` with rotary positions (``position="rope"``, the package's one RoPE) in every
block; :meth:`RotaryLM.stream` decodes token by token through an :class:`attn.differential.SinkCache` (Xiao et
al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024). :class:`MotifStream` makes its
token streams; :func:`window_recompute_logits` is the baseline a streaming cache replaces.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import Attention
from ..checks import check_int
from ..differential import SinkCache
from ..models import TokenLM, TransformerBlock
from ..positions import RotaryEmbedding, apply_rotary

__all__ = ["MotifStream", "RotaryLM", "window_recompute_logits"]


@dataclass
class MotifStream:
    """Token streams for a small LM: ``BOS`` then a random motif of ``min_period..max_period`` tokens, repeated, with noise.

    Token 0 is ``BOS``. Each position copies the token one period back, except
    that with probability ``noise`` it is a fresh random token. Predicting it
    needs the last period of context (a few tokens), never the distant past:
    a sliding window should lose nothing, which is what makes an attention
    sink's eviction visible.
    """

    vocab: int = 24
    min_period: int = 3
    max_period: int = 8
    noise: float = 0.1

    def __post_init__(self) -> None:
        if self.vocab < 3 or not 1 <= self.min_period <= self.max_period or not 0 <= self.noise < 1:
            raise ValueError(f"need vocab >= 3, 1 <= min_period <= max_period, 0 <= noise < 1; got {self}")

    def stream(self, batch: int, length: int, generator: torch.Generator | None = None) -> Tensor:
        """``(batch, length)`` tokens, ``BOS`` first."""
        period = torch.randint(self.min_period, self.max_period + 1, (batch, 1), generator=generator)
        motif = torch.randint(1, self.vocab, (batch, self.max_period), generator=generator)
        pos = torch.arange(length - 1)[None, :] % period  # (B, length - 1)
        body = motif.gather(1, pos)
        fresh = torch.randint(1, self.vocab, body.shape, generator=generator)
        body = torch.where(torch.rand(body.shape, generator=generator) < self.noise, fresh, body)
        return torch.cat([torch.zeros(batch, 1, dtype=torch.long), body], 1)


class RotaryLM(TokenLM):
    """A small pre-norm causal LM with rotary positions (Su et al. 2021), for streaming past its training length.

    :class:`~attn.models.TokenLM` whose blocks mix with ``Attention(E, h, causal=True, position="rope",
    bias=False)``. ``forward(tokens (B, n), *, need_weights=False) -> LMOutput(logits (B, n, vocab), weights)``
    with positions ``0..n-1``; :meth:`stream` decodes token by token with a :class:`~attn.differential.SinkCache`.
    """

    def __init__(self, vocab: int, embed_dim: int = 32, num_heads: int = 4, num_layers: int = 2,
                 rope_base: float = 10000.0) -> None:
        check_int("vocab", vocab)
        if embed_dim % num_heads or (embed_dim // num_heads) % 2:
            raise ValueError(f"embed_dim ({embed_dim}) / num_heads ({num_heads}) must be an even integer")
        super().__init__(vocab, embed_dim, num_layers, mixer=lambda i: Attention(
            embed_dim, num_heads, causal=True, position="rope", rope_base=rope_base, bias=False))
        self.embed_dim, self.num_heads, self.head_dim, self.rope_base = (
            embed_dim, num_heads, embed_dim // num_heads, rope_base)

    def _layers(self) -> Iterator[tuple[TransformerBlock, Attention]]:
        """Each block and its attention, typed."""
        for block in self.blocks:
            assert isinstance(block, TransformerBlock) and isinstance(block.mixer, Attention)
            yield block, block.mixer

    @torch.no_grad()
    def stream(self, tokens: Tensor, window: int | None, sinks: int | Tensor = 0) -> Tensor:
        """Logits ``(B, n, vocab)`` of decoding ``tokens`` one at a time through a :class:`~attn.differential.SinkCache`.

        Each token's keys and values are computed once, when it arrives, and
        stored un-rotated; at each step the cached keys get positions
        ``0..size-1`` and the new query position ``size - 1``. ``sinks`` may be
        a ``(B,)`` tensor: one cache policy per row.
        """
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a (batch, n) long tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}")
        n = tokens.shape[1]
        cache = SinkCache(len(self.blocks), window, sinks)
        longest = n if window is None else min(n, window)
        rope = RotaryEmbedding(self.head_dim, self.rope_base)
        cos, sin = rope.cos_sin(torch.arange(longest, device=tokens.device), self.embed.weight.dtype)  # in-cache positions
        out = []
        for t in range(n):
            h = self.embed(tokens[:, t : t + 1])  # (B, 1, E)
            for i, (block, attn) in enumerate(self._layers()):
                x = block.norm1(h)
                q, k, v = (attn.split_heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # (B, h, 1, d)
                ks, vs = cache.append(i, k, v)
                size = ks.shape[2]
                att = F.scaled_dot_product_attention(apply_rotary(q, cos[size - 1 : size], sin[size - 1 : size]),
                                                     apply_rotary(ks, cos[:size], sin[:size]), vs)
                h = h + attn.out_proj(attn.merge_heads(att))
                if block.ffn is not None and block.norm2 is not None:
                    h = h + block.ffn(block.norm2(h))
            cache.seen += 1
            out.append(h)
        return self.head(self.norm(torch.cat(out, 1)))


@torch.no_grad()
def window_recompute_logits(model: RotaryLM, tokens: Tensor, window: int, start: int) -> Tensor:
    """The baseline a streaming cache replaces: for each position ``t >= start``, re-encode ``BOS`` + the last ``window - 1`` tokens.

    Returns the logits at positions ``start..n-1``, ``(B, n - start, vocab)``.
    """
    B, n = tokens.shape
    if not window - 1 <= start < n:
        raise ValueError(f"need window - 1 <= start < n, got window={window}, start={start}, n={n}")
    ctx = tokens[:, 1:].unfold(1, window - 1, 1)[:, start - window + 1 :]  # (B, n - start, window - 1): ends at t
    bos = tokens[:, :1, None].expand(B, ctx.shape[1], 1)
    seqs = torch.cat([bos, ctx], -1).reshape(-1, window)  # (B (n - start), window)
    return model(seqs).logits[:, -1].view(B, n - start, -1)
