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
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .attention import KVStore
from .checks import check_int, check_positive_float, check_same_batch, check_same_dtype, check_tensor, check_tokens
from .core import MIN_TEMPERATURE, AttentionOutput
from .masks import check_key_mask
from .multihead import MultiHeadAttention
from .registry import register

__all__ = ["CrossAttention", "MemoryCache", "LatentCrossAttention"]


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


class CrossAttention(MultiHeadAttention):
    """Multi-head attention from a target sequence to a source memory of other length and widths.

    :class:`~attn.multihead.MultiHeadAttention` with key and value widths (its projections
    ``q_proj, k_proj, v_proj, out_proj``, head split and kernel are reused as they are, so the state
    dict is :class:`~attn.multihead.MultiHeadAttention`'s); what this class adds is the
    encoder-decoder interface: a memory (``key``, ``value``) that must be given, a key-side mask
    on it, and a cache of its projections for step-by-step decoding (:meth:`encode_memory`). It
    equals ``torch.nn.MultiheadAttention(E, h, kdim=kdim, vdim=vdim, batch_first=True)`` with the
    same weights (:meth:`load_torch_weights`, inherited).

    Args:
        embed_dim: width ``E`` of the queries (target side) and of the output.
        num_heads: number of heads ``h``; must divide ``embed_dim``.
        kdim: width of the memory keys (default ``E``).
        vdim: width of the memory values (default ``kdim``: the memory is usually one tensor).
        dropout: dropout on the attention weights during training.
        bias: biases on the projections.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None:
                check_int(name, dim)
        kdim = kdim or embed_dim
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim or kdim)

    def encode_memory(self, key: Tensor, value: Tensor | None = None, key_mask: Tensor | None = None) -> MemoryCache:
        """Project the memory once: ``(B, S, kdim)``, ``(B, S, vdim)`` -> :class:`MemoryCache` of ``(B, h, S, d_k)``.

        A decoder that emits the target one token at a time passes the cache
        to every :meth:`forward` call instead of the memory, saving
        ``2 S E (kdim + vdim)`` FLOPs per step.
        """
        key, value = self._check_memory(key, value, key_mask)
        k = self.split_heads(self.k_proj(key))  # (B, h, S, d_k)
        v = self.split_heads(self.v_proj(value))  # (B, h, S, d_k)
        return MemoryCache(k, v, key_mask)

    def _check_memory(self, key: object, value: Tensor | None, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Validate the memory (errors name ``key``, ``value``, ``key_mask``); returns ``(key, value)``."""
        key = _check_states(key, "key", self.kdim, "kdim", "source_len")
        values = self._values(key, value)
        if values is not key:
            values = _check_states(values, "value", self.vdim, "vdim", "source_len")
            if values.shape[:2] != key.shape[:2]:
                raise ValueError(f"value must share (batch, source_len) with key: {tuple(values.shape[:2])} vs {tuple(key.shape[:2])}")
            check_same_dtype(("key", key), ("value", values))
        check_key_mask(key_mask, key.shape[0], key.shape[1], length_name="source_len", meaning="real source token")
        return key, values

    def _values(self, key: Tensor, value: Tensor | None) -> Tensor:
        if value is not None:
            return value
        if self.vdim != self.kdim:
            raise ValueError(f"value (batch, source_len, {self.vdim}) is required when vdim ({self.vdim}) != kdim ({self.kdim})")
        return key

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        cache: KVStore | MemoryCache | None = None,
        average_weights: bool = False,
        temperature: float = 1.0,
    ) -> AttentionOutput:
        """Attend every target position to the source memory.

        Args:
            query: ``(B, L, E)`` target-side states.
            key: ``(B, S, kdim)`` source states (the memory); omit it when ``cache`` is given.
            value: ``(B, S, vdim)``; defaults to ``key`` (then ``vdim`` must equal ``kdim``).
            key_mask: ``(B, S)`` boolean, ``True`` = real source token (padding is ``False``).
            attn_mask: ``(L, S)``, ``(B, L, S)`` or ``(B, h, L, S)``; boolean ``True`` = may attend.
            is_causal: target ``i`` reads source ``j <= i`` (rarely wanted across two sequences).
            need_weights: return the alignment; otherwise the fused SDPA kernel runs.
            cache: the projected memory from :meth:`encode_memory` (its key mask is used).
            average_weights: average the returned weights over heads, ``(B, L, S)``.
            temperature: divides the scores.

        Returns:
            ``(output (B, L, E), weights (B, h, L, S) | (B, L, S) | None)``.

        Raises:
            TypeError, ValueError: naming the argument (``query``, ``key``, ``value``, ``key_mask``,
            ``cache``, ``temperature``) and what was expected; mixed dtypes between the query and the
            memory are refused.
        """
        query = _check_states(query, "query", self.embed_dim, "embed_dim", "target_len")
        temperature = check_positive_float("temperature", temperature, minimum=MIN_TEMPERATURE)
        if attn_mask is not None and not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor (boolean, True = may attend), got {type(attn_mask).__name__}")
        if cache is None:
            if key is None:
                raise ValueError("cross-attention needs a memory: key (batch, source_len, kdim), or a cache from encode_memory")
            key, value = self._check_memory(key, value, key_mask)
            check_same_batch(("query", query), ("key", key))
            check_same_dtype(("query", query), ("key", key), ("value", value if value is not key else None))
            return self.mix(query, key, value, key_mask=key_mask, attn_mask=attn_mask, is_causal=is_causal,
                            need_weights=need_weights, average_weights=average_weights, temperature=temperature)
        if key is not None or value is not None or key_mask is not None:
            raise ValueError("pass either the memory (key, value, key_mask) or cache, not both")
        if not isinstance(cache, MemoryCache):
            raise TypeError(f"cache must be a MemoryCache from encode_memory, got {type(cache).__name__}")
        if query.shape[0] != cache.k.shape[0]:
            raise ValueError(f"query batch {query.shape[0]} differs from the cached memory's {cache.k.shape[0]}")
        check_same_dtype(("query", query), ("cache", cache.k))
        if attn_mask is not None and attn_mask.ndim == 3:
            attn_mask = attn_mask[:, None]  # (B, L, S) -> (B, 1, L, S)
        q = self.split_heads(self.q_proj(query))  # (B, h, L, d_k)
        out, weights = self.attend(
            q, cache.k, cache.v,
            attn_mask=attn_mask,
            key_mask=cache.mask,
            is_causal=self.causal if is_causal is None else is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / (temperature * math.sqrt(self.head_dim)),
            need_weights=need_weights,
        )
        out = self.out_proj(self.merge_heads(out))  # (B, L, E)
        if weights is not None and average_weights:
            weights = weights.mean(1)
        return AttentionOutput(out, weights)



@register(
    "latent-cross",
    paper="Vaswani et al. 2017; Lee et al. 2019",
    complexity="O(n m d)",
    chapter=4,
    summary="cross-attention as a token mixer: m learned latents read the tokens, the tokens read the latents",
    build=lambda embed_dim, num_heads: LatentCrossAttention(embed_dim, num_heads),
    kernel=None,
    causal=False,
)
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
    the weights are the ``(B, 1, n, n)`` *composed* map ``A_write A_read`` (each
    averaged over heads, hence one "head"): row ``i`` says how much token ``i`` reads each token
    through the latents (rows sum to 1; an attention-rollout summary, not an
    exact Jacobian, since the value and output projections mix heads). The two
    factors themselves, ``(B, h, n, m)`` and ``(B, h, m, n)``, come from :meth:`maps`.

    Args:
        embed_dim: token width ``E``.
        num_heads: heads of both cross-attentions.
        num_latents: number of memory slots ``m``.

    It is what the comparison measures as ``cross`` (the registry's ``build``); it cannot be causal
    (every latent reads every token).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_latents: int = 8) -> None:
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
        read = self.read(z0, x, key_mask=key_mask, need_weights=need_weights)
        z = z0 + read.output  # (B, m, E)
        write = self.write(x, z, need_weights=need_weights)  # (B, n, E)
        return write.output, write.weights, read.weights

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), composed weights (B, 1, n, n) or None)``.

        ``is_causal=True`` is refused (a ``ValueError``): every latent reads every token, later ones too.
        """
        if is_causal:
            raise ValueError("LatentCrossAttention cannot be causal: every latent reads every token, later ones too")
        out, w_write, w_read = self.maps(x, key_mask, need_weights)
        if not need_weights:
            return AttentionOutput(out, None)
        assert w_write is not None and w_read is not None
        return AttentionOutput(out, (w_write.mean(1) @ w_read.mean(1))[:, None])  # (B, n, m) @ (B, m, n) -> (B, 1, n, n)
