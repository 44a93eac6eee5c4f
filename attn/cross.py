r"""Chapter 4 -- cross-attention: the queries come from one sequence, the keys and values from another.

.. math::

    \operatorname{CrossAttention}(X, M) = \operatorname{Concat}_{i=1}^{h}\Big(
        \operatorname{softmax}\!\Big(\frac{(X W_i^Q)(M_K W_i^K)^\top}{\sqrt{d_k}} + \Pi\Big)\, M_V W_i^V
    \Big) W^O

``X`` is the *target* (decoder) sequence ``(B, L, E)``; the *memory* is the
encoder output: keys ``M_K`` ``(B, S, kdim)`` and values ``M_V`` ``(B, S, vdim)``,
of a different length ``S`` and widths ``kdim``, ``vdim``. ``W_i^Q`` is
``E x d_k``, ``W_i^K`` is ``kdim x d_k``, ``W_i^V`` is ``vdim x d_k`` with
``d_k = E / h``; ``Pi`` is ``0`` or ``-inf`` and masks *keys* (padding in the
source). The output ``(B, L, E)`` has one row per target position; the weights
``(B, h, L, S)`` are an alignment of target positions to source positions.

The memory's projections ``M_K W^K`` and ``M_V W^V`` depend only on the source,
so a decoder that emits one token at a time computes them once per source
sentence (:meth:`CrossAttention.encode_memory`) and reuses them at every step.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017, section 3.2.3
("encoder-decoder attention").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_int, check_positive_float, check_same_batch, check_same_dtype, check_tensor, check_tokens
from .core import MIN_TEMPERATURE, AttentionOutput, scaled_dot_product_attention
from .masks import check_key_mask
from .multihead import MultiHeadAttention
from .registry import register

__all__ = ["CrossAttention", "MemoryCache", "LatentCrossAttention", "SortUniqueTask", "CrossAttentionDecoder", "sort_unique_loss"]


def _check_states(x: object, name: str, width: int, width_name: str, seq_name: str) -> Tensor:
    """``x`` is a floating-point ``(batch, seq_name, width_name=width)`` tensor with ``seq >= 1`` (unless the batch is empty)."""
    shape = f"(batch, {seq_name}, {width_name}={width})"
    x = check_tensor(x, name, shape, 3)
    if x.shape[-1] != width:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)} (last dimension {x.shape[-1]} != {width})")
    if x.shape[1] == 0 and x.shape[0] > 0:
        raise ValueError(f"{name} is an empty sequence: shape {shape} needs {seq_name} >= 1, got {tuple(x.shape)}")
    return x


class MemoryCache(NamedTuple):
    """Projected memory: keys ``(B, h, S, d_k)``, values ``(B, h, S, d_k)``, key mask ``(B, S)`` or ``None``."""

    k: Tensor
    v: Tensor
    mask: Tensor | None


@register(
    "cross",
    paper="Vaswani et al. 2017",
    complexity="O(L S d)",
    chapter=4,
    summary="queries from one sequence, keys/values from another of other length and width (encoder-decoder attention)",
    build=lambda embed_dim, num_heads: LatentCrossAttention(embed_dim, num_heads),
)
class CrossAttention(nn.Module):
    """Multi-head attention from a target sequence to a source memory of other length and widths.

    Built on :class:`~attn.multihead.MultiHeadAttention` (its projections,
    head split and core are reused as they are); what this class adds is the
    encoder-decoder interface: a memory that is always a *different* tensor,
    a key-side mask on it, and a cache of its projections for step-by-step
    decoding. It equals ``torch.nn.MultiheadAttention(E, h, kdim=kdim,
    vdim=vdim, batch_first=True)`` with the same weights
    (:meth:`load_torch_weights`).

    Args:
        embed_dim: width ``E`` of the queries (target side) and of the output.
        num_heads: number of heads ``h``; must divide ``embed_dim``.
        kdim: width of the memory keys (default ``E``).
        vdim: width of the memory values (default ``kdim``).
        dropout: dropout on the attention weights during training.
        bias: biases on the projections.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None:
                check_int(name, dim)
        kdim = kdim or embed_dim
        vdim = vdim or kdim
        self.mha = MultiHeadAttention(embed_dim, num_heads, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim)
        self.embed_dim, self.num_heads, self.kdim, self.vdim = embed_dim, num_heads, kdim, vdim

    def encode_memory(self, memory: Tensor, memory_values: Tensor | None = None, memory_mask: Tensor | None = None) -> MemoryCache:
        """Project the memory once: ``(B, S, kdim)``, ``(B, S, vdim)`` -> :class:`MemoryCache` of ``(B, h, S, d_k)``.

        A decoder that emits the target one token at a time passes the cache
        to every :meth:`forward` call instead of the memory, saving
        ``2 S E (kdim + vdim)`` FLOPs per step.
        """
        memory, memory_values = self._check_memory(memory, memory_values, memory_mask)
        k = self.mha.split_heads(self.mha.k_proj(memory))  # (B, h, S, d_k)
        v = self.mha.split_heads(self.mha.v_proj(memory_values))  # (B, h, S, d_k)
        return MemoryCache(k, v, memory_mask)

    def _check_memory(self, memory: object, memory_values: Tensor | None, memory_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Validate the memory (errors name ``memory``, ``memory_values``, ``memory_mask``); returns ``(memory, values)``."""
        memory = _check_states(memory, "memory", self.kdim, "kdim", "source_len")
        values = self._values(memory, memory_values)
        if values is not memory:
            values = _check_states(values, "memory_values", self.vdim, "vdim", "source_len")
            if values.shape[:2] != memory.shape[:2]:
                raise ValueError(f"memory_values must share (batch, source_len) with memory: {tuple(values.shape[:2])} vs {tuple(memory.shape[:2])}")
            check_same_dtype(("memory", memory), ("memory_values", values))
        check_key_mask(memory_mask, memory.shape[0], memory.shape[1], name="memory_mask", length_name="source_len", meaning="real source token")
        return memory, values

    def _values(self, memory: Tensor, memory_values: Tensor | None) -> Tensor:
        if memory_values is not None:
            return memory_values
        if self.vdim != self.kdim:
            raise ValueError(f"memory_values (batch, source_len, {self.vdim}) is required when vdim ({self.vdim}) != kdim ({self.kdim})")
        return memory

    def forward(
        self,
        query: Tensor,
        memory: Tensor | None = None,
        memory_values: Tensor | None = None,
        memory_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
        average_weights: bool = False,
        temperature: float = 1.0,
        cache: MemoryCache | None = None,
    ) -> AttentionOutput:
        """Attend every target position to the source memory.

        Args:
            query: ``(B, L, E)`` target-side states.
            memory: ``(B, S, kdim)`` source states (the keys); omit it when ``cache`` is given.
            memory_values: ``(B, S, vdim)``; defaults to ``memory`` (then ``vdim`` must equal ``kdim``).
            memory_mask: ``(B, S)`` boolean, ``True`` = real source token (padding is ``False``).
            attn_mask: ``(L, S)``, ``(B, L, S)`` or ``(B, h, L, S)``; boolean ``True`` = may attend.
            need_weights: return the alignment; otherwise the fused SDPA kernel runs.
            average_weights: average the returned weights over heads, ``(B, L, S)``.
            temperature: divides the scores.
            cache: projected memory from :meth:`encode_memory` (its mask is used).

        Returns:
            ``(output (B, L, E), weights (B, h, L, S) | (B, L, S) | None)``.

        Raises:
            TypeError, ValueError: naming the argument (``query``, ``memory``,
            ``memory_values``, ``memory_mask``, ``cache``, ``temperature``) and what was expected;
            mixed dtypes between the query and the memory are refused.
        """
        query = _check_states(query, "query", self.embed_dim, "embed_dim", "target_len")
        temperature = check_positive_float("temperature", temperature, minimum=MIN_TEMPERATURE)
        if attn_mask is not None and not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor (boolean, True = may attend), got {type(attn_mask).__name__}")
        if cache is None:
            if memory is None:
                raise ValueError("cross-attention needs a memory (batch, source_len, kdim) or a cache from encode_memory")
            memory, memory_values = self._check_memory(memory, memory_values, memory_mask)
            check_same_batch(("query", query), ("memory", memory))
            check_same_dtype(("query", query), ("memory", memory), ("memory_values", memory_values if memory_values is not memory else None))
            return self.mha(query, memory, memory_values, key_mask=memory_mask, attn_mask=attn_mask,
                            need_weights=need_weights, average_weights=average_weights, temperature=temperature)
        if memory is not None or memory_values is not None or memory_mask is not None:
            raise ValueError("pass either memory (and memory_values, memory_mask) or cache, not both")
        if not isinstance(cache, MemoryCache):
            raise TypeError(f"cache must be a MemoryCache from encode_memory, got {type(cache).__name__}")
        if query.shape[0] != cache.k.shape[0]:
            raise ValueError(f"query batch {query.shape[0]} differs from the cached memory's {cache.k.shape[0]}")
        check_same_dtype(("query", query), ("cache", cache.k))
        if attn_mask is not None and attn_mask.ndim == 3:
            attn_mask = attn_mask[:, None]  # (B, L, S) -> (B, 1, L, S)
        q = self.mha.split_heads(self.mha.q_proj(query))  # (B, h, L, d_k)
        out, weights = scaled_dot_product_attention(
            q, cache.k, cache.v,
            attn_mask=attn_mask,
            key_mask=cache.mask,
            dropout_p=self.mha.dropout if self.training else 0.0,
            scale=1.0 / (temperature * math.sqrt(self.mha.head_dim)),
            need_weights=need_weights,
        )
        out = self.mha.out_proj(self.mha.merge_heads(out))  # (B, L, E)
        if weights is not None and average_weights:
            weights = weights.mean(1)
        return AttentionOutput(out, weights)

    def load_torch_weights(self, mha: nn.MultiheadAttention) -> CrossAttention:
        """Copy the weights of ``torch.nn.MultiheadAttention(E, h, kdim=, vdim=)``."""
        self.mha.load_torch_weights(mha)
        return self

    @staticmethod
    def torch_masks(memory_mask: Tensor | None, attn_mask: Tensor | None = None) -> dict[str, Tensor | None]:
        """Our masks as ``nn.MultiheadAttention`` keywords (its booleans mean *blocked*)."""
        return MultiHeadAttention.torch_masks(memory_mask, attn_mask)


class LatentCrossAttention(nn.Module):
    r"""A token mixer made of two cross-attentions through ``m`` latent memory slots.

    Cross-attention needs a second sequence. Inside a single-sequence model
    (the book's comparison) the second sequence is made from the first:
    ``m`` learned latent queries ``Z_0`` *read* the input (cross-attention
    latents -> tokens, ``m x n``), and the tokens then *read* the latents
    (cross-attention tokens -> latents, ``n x m``):

    .. math::

        Z = Z_0 + \operatorname{CrossAttn}(Z_0, X), \qquad Y = \operatorname{CrossAttn}(X, Z)

    This is the induced set attention block of the Set Transformer (Lee et al.
    2019) and the latent bottleneck of the Perceiver (Jaegle et al. 2021),
    without their feed-forward layers. It costs ``O(n m d)`` instead of
    ``O(n^2 d)``: information between tokens flows only through ``m`` slots.

    Shapes: ``x`` ``(B, n, E)`` -> output ``(B, n, E)``. With ``need_weights``
    the weights are the ``(B, n, n)`` *composed* map ``A_write A_read`` (each
    averaged over heads): row ``i`` says how much token ``i`` reads each token
    through the latents (rows sum to 1; an attention-rollout summary, not an
    exact Jacobian, since the value and output projections mix heads). The two
    factors themselves, ``(B, h, n, m)`` and ``(B, h, m, n)``, come from :meth:`maps`.

    Args:
        embed_dim: token width ``E``.
        num_heads: heads of both cross-attentions.
        num_latents: number of memory slots ``m``.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_latents: int = 8) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        check_int("num_latents", num_latents)
        self.latents = nn.Parameter(torch.randn(num_latents, embed_dim) / math.sqrt(embed_dim))  # Z_0 (m, E)
        self.read = CrossAttention(embed_dim, num_heads)  # latents <- tokens
        self.write = CrossAttention(embed_dim, num_heads)  # tokens <- latents
        self.embed_dim = embed_dim

    def maps(self, x: Tensor, key_mask: Tensor | None = None, need_weights: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(output (B, n, E), write weights (B, h, n, m), read weights (B, h, m, n))``."""
        check_tokens(x, self.embed_dim)
        check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="n")  # named as the caller passed it
        z0 = self.latents.expand(x.shape[0], -1, -1)  # (B, m, E)
        read = self.read(z0, x, memory_mask=key_mask, need_weights=need_weights)
        z = z0 + read.output  # (B, m, E)
        write = self.write(x, z, need_weights=need_weights)  # (B, n, E)
        return write.output, write.weights, read.weights

    def forward(self, x: Tensor, need_weights: bool = False, key_mask: Tensor | None = None) -> AttentionOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), composed weights (B, n, n) or None)``."""
        out, w_write, w_read = self.maps(x, key_mask, need_weights)
        if not need_weights:
            return AttentionOutput(out, None)
        assert w_write is not None and w_read is not None
        return AttentionOutput(out, w_write.mean(1) @ w_read.mean(1))  # (B, n, m) @ (B, m, n)


# ----------------------------------------------------------------------------- the chapter's task


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
    """

    def __init__(self, vocab: int, length: int, embed_dim: int = 32, kdim: int = 24, num_heads: int = 2) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(vocab, kdim)
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
        memory = self.src_embed(src)  # (B, S, kdim)
        x = self.tgt_embed(tgt_in) + self.tgt_pos.weight[: tgt_in.shape[1]]  # (B, T, E)
        x = x + self.self_attn(self.norms[0](x), is_causal=True).output
        cross = self.cross(self.norms[1](x), memory, memory_mask=src_mask, need_weights=True)
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
