r"""Chapter 15 -- Memory-augmented attention: persistent memory slots and a kNN memory of past keys and values.

**Persistent memory** (Sukhbaatar et al. 2019, "Augmenting Self-attention with
Persistent Memory"). Every layer owns ``N`` learned key/value vectors per head,
``M_k, M_v`` ``(h, N, d)``, concatenated to the keys and values of the
sequence; every query sees them, whatever the mask:

.. math::

    y_i = \sum_{j \in [K; M_k]} \operatorname{softmax}_j\Big(\frac{q_i^\top k_j}{\sqrt d}\Big) v_j, \qquad
    K' = [X W_k;\ M_k],\quad V' = [X W_v;\ M_v]

They hold knowledge that does not depend on the input (in the paper they
replace the feed-forward layer). Shapes: ``x`` ``(B, n, E)`` -> ``(B, n, E)``.

**Memorizing Transformers** (Wu et al. 2022). A long document is read in
segments of ``L`` tokens. After each segment, the layer's keys and values go
into a **kNN memory**, a bank of ``(key, value)`` pairs per head, *not*
differentiable, holding at most ``C`` entries (the oldest leave first). Each
query of the next segments retrieves its ``k`` nearest keys from the bank
(largest ``q^\top k``), attends over those ``k`` only, and a learned per-head
gate mixes the result with ordinary (causal, local) attention over the segment:

.. math::

    \mathcal{N}_k(q_i) = \operatorname{top-}k_{\,s \le S}\; q_i^\top \bar k_s, \qquad
    V^{\mathrm{mem}}_i = \sum_{s \in \mathcal{N}_k(q_i)} \operatorname{softmax}_{s}\Big(\frac{q_i^\top \bar k_s}{\sqrt d}\Big) \bar v_s

.. math::

    V_i = g \odot V^{\mathrm{mem}}_i + (1 - g) \odot V^{\mathrm{local}}_i, \qquad g = \sigma(b_g) \ \text{(one learned scalar per head)}

Search here is exact (:func:`torch.topk` over all ``S`` bank entries,
``O(S d)`` per query); with ``faiss`` installed, ``backend="faiss"`` runs the
same exact search through a ``faiss.IndexFlatIP`` (an approximate index would
make it sublinear in ``S``). Attention then costs ``O(k d)`` per query
instead of ``O(S d)``. Shapes: bank keys/values ``(B, h, S, d)``; a segment's
queries ``(B, h, L, d)`` retrieve indices ``(B, h, L, k)``.

:func:`knn_attention_dense` (all ``S`` scores, a mask keeping the top ``k``
per query) is the labelled dense baseline the gathered version is checked against.

Sukhbaatar, Grave, Lample, Jegou, Joulin, "Augmenting Self-attention with
Persistent Memory", arXiv 2019. Wu, Rabe, Hutchins, Szegedy, "Memorizing
Transformers", ICLR 2022.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import AttentionBase
from .checks import (
    check_heads,
    check_int,
    check_layer_dtype,
    check_positive_float,
    check_same_dtype,
    check_tensor,
    check_tokens,
    empty_batch,
)
from .core import AttentionOutput, masked_softmax, scaled_dot_product_attention
from .masks import check_key_mask
from .registry import register

__all__ = [
    "PersistentMemoryAttention",
    "KNNMemory",
    "Retrieval",
    "knn_attention",
    "knn_attention_dense",
    "faiss_available",
    "MemorizingAttention",
    "SegmentOutput",
]


def faiss_available() -> bool:
    """Whether the optional ``faiss`` package can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- persistent memory


@register(
    "persistent_memory",
    paper="Sukhbaatar et al. 2019",
    complexity="O(n (n + N) d)",
    chapter=15,
    summary="N learned key/value slots per head concatenated to every query's keys and values",
    build=lambda embed_dim, num_heads: PersistentMemoryAttention(embed_dim, num_heads, slots=8),
    kernel="sdpa",
    causal=False,
)
class PersistentMemoryAttention(AttentionBase):
    """Multi-head self-attention whose keys and values are extended by ``N`` learned persistent slots.

    Args:
        embed_dim: model width ``E``.
        num_heads: heads ``h`` (must divide ``E``).
        slots: ``N``, persistent key/value vectors per head (0: plain multi-head attention).
        dropout, bias, causal: as :class:`~attn.attention.AttentionBase` (``causal``: the layer's default
            for ``is_causal``; the slots stay visible to every query either way).

    Parameters: ``q_proj, k_proj, v_proj, out_proj`` (those of
    :class:`~attn.attention.AttentionBase`: a state dict of
    :class:`~attn.multihead.MultiHeadAttention` plus the slots) and ``memory_k, memory_v`` ``(h, N, d_h)``.
    The slots are the layer's state: :meth:`attend` appends them to the keys and values the kernel reads.
    With ``N = 1`` this is ``torch.nn.MultiheadAttention(add_bias_kv=True)``, whose
    ``bias_k, bias_v`` are one slot appended to every head's keys and values.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, slots: int = 8, *, dropout: float = 0.0, bias: bool = True,
        causal: bool = False,
    ) -> None:
        check_heads(embed_dim, num_heads)
        check_int("slots", slots, 0)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, causal=causal)
        self.slots = slots
        # the paper scales the persistent vectors like the keys and values they join
        self.memory_k = nn.Parameter(torch.randn(num_heads, slots, self.head_dim) / math.sqrt(self.head_dim))
        self.memory_v = nn.Parameter(torch.randn(num_heads, slots, self.head_dim) / math.sqrt(self.head_dim))

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attn_mask: Tensor | None,
        key_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
        scale: float,
        need_weights: bool,
    ) -> AttentionOutput:
        """The kernel over ``K' = [K; M_k]``, ``V' = [V; M_v]``: ``q (B, h, L, d)``, ``k, v (B, h, S, d)``.

        The masks cover the ``S`` tokens; the ``N`` slots are appended visible to every query (a causal
        mask is built here over the tokens only, so that it does not hide the slots). Weights ``(B, h, L, S + N)``.
        """
        batch, n_q, n_k, N = q.shape[0], q.shape[-2], k.shape[-2], self.slots
        k = torch.cat([k, self.memory_k.to(k.dtype).expand(batch, -1, -1, -1)], 2)  # (B, h, S + N, d): [X W_k; M_k]
        v = torch.cat([v, self.memory_v.to(v.dtype).expand(batch, -1, -1, -1)], 2)
        if is_causal:  # query i sees tokens j <= i (bottom-right aligned when S > L), and every slot
            causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
            if attn_mask is None:
                attn_mask = causal
            elif attn_mask.dtype == torch.bool:
                attn_mask = attn_mask & causal
            else:
                attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:  # the slots: visible (True, or 0 added to the score)
            attn_mask = F.pad(attn_mask, (0, N), value=True if attn_mask.dtype == torch.bool else 0.0)
        if key_mask is not None:
            key_mask = F.pad(key_mask, (0, N), value=True)
        return super().attend(
            q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=False,
            dropout_p=dropout_p, scale=scale, need_weights=need_weights,
        )

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        include_memory: bool = False,
    ) -> AttentionOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), weights)``.

        Args:
            key_mask: ``(B, n)`` boolean, ``True`` = real token (the slots are always visible).
            is_causal: token ``i`` sees tokens ``j <= i`` (and every slot); ``None``: the layer's ``causal``.
            need_weights: return the weights.
            include_memory: weights over ``[tokens | slots]`` ``(B, h, n, n + N)``; by default
                only the token part ``(B, h, n, n)``, whose rows then sum to less than 1
                (the rest sits on the slots).
        """
        x = check_tokens(x, self.embed_dim)
        check_layer_dtype(x, self.q_proj.weight)
        check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="n")
        n, N, h = x.shape[1], self.slots, self.num_heads
        if empty_batch(x):
            w = x.new_zeros(0, h, n, n + N if include_memory else n) if need_weights else None
            return AttentionOutput(x.new_zeros(0, n, self.embed_dim), w)
        out, w = self.mix(x, x, x, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights)
        if w is not None and not include_memory:
            w = w[..., :n]
        return AttentionOutput(out, w)

    @torch.no_grad()
    def load_torch_weights(self, mha: nn.MultiheadAttention) -> PersistentMemoryAttention:
        """Copy a ``torch.nn.MultiheadAttention(add_bias_kv=True, batch_first=True)``: its ``bias_k, bias_v`` become one slot."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention(add_bias_kv=True), got {type(mha).__name__}")
        if mha.in_proj_weight is None or mha.in_proj_bias is None:
            raise ValueError("mha must use one packed in_proj with biases (equal kdim/vdim, bias=True)")
        if self.slots != 1 or mha.bias_k is None or mha.bias_v is None:
            raise ValueError("only a 1-slot module matches nn.MultiheadAttention(add_bias_kv=True)")
        if (mha.embed_dim, mha.num_heads) != (self.embed_dim, self.num_heads):
            raise ValueError("nn.MultiheadAttention sizes (embed_dim, num_heads) differ from this module's")
        wq, wk, wv = mha.in_proj_weight.split(self.embed_dim)
        bq, bk, bv = mha.in_proj_bias.split(self.embed_dim)
        for lin, w, b in ((self.q_proj, wq, bq), (self.k_proj, wk, bk), (self.v_proj, wv, bv)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.memory_k.copy_(mha.bias_k.view(self.num_heads, 1, self.head_dim))
        self.memory_v.copy_(mha.bias_v.view(self.num_heads, 1, self.head_dim))
        return self


# --------------------------------------------------------------------------- the kNN memory


class KNNMemory:
    """A bank of past ``(key, value)`` pairs per example and head: not differentiable, at most ``capacity`` entries.

    ``keys``, ``values``: ``(B, h, S, d)`` with ``S <= capacity``; ``positions``
    ``(S,)``: where in the stream each entry came from; ``valid``: ``None`` (every
    entry real) or ``(B, S)`` boolean, ``False`` = the entry came from a padded
    token and is never retrieved. :meth:`add` appends a segment (detached) and
    drops the oldest entries beyond ``capacity`` (padded entries count: the bank
    holds the last ``capacity`` positions of the stream).
    """

    def __init__(self, capacity: int) -> None:
        check_int("capacity", capacity, 1)
        self.capacity = capacity
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.positions: Tensor | None = None
        self.valid: Tensor | None = None

    @property
    def size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def add(self, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor | None = None) -> None:
        """Append ``keys (B, h, L, d)``, ``values (B, h, L, d_v)`` from stream positions ``(L,)``; keep the newest ``capacity``.

        ``valid``: ``(B, L)`` boolean, ``True`` = the entry comes from a real token (``None``: all real).

        Raises:
            TypeError: a non-tensor (a list), integer keys/values, float positions, or dtypes that
                differ from each other or from the bank's.
            ValueError: wrong ranks, or shapes that disagree with each other or with the bank.
        """
        check_tensor(keys, "keys", "(batch, heads, L, d)", 4)
        check_tensor(values, "values", "(batch, heads, L, d_v)", 4)
        L = keys.shape[2]
        if not isinstance(positions, Tensor) or positions.dtype == torch.bool or positions.is_floating_point() or positions.is_complex():
            got = f"dtype {positions.dtype}" if isinstance(positions, Tensor) else type(positions).__name__
            raise TypeError(f"positions must be an integer torch.Tensor of stream positions, shape (L={L},), got {got}")
        if values.shape[:3] != keys.shape[:3]:
            raise ValueError(f"values must have shape (batch, heads, L, d_v) = {tuple(keys.shape[:3])} + (d_v,) like keys, got {tuple(values.shape)}")
        if positions.shape != (L,):
            raise ValueError(f"positions must have shape (L={L},), one per key, got {tuple(positions.shape)}")
        check_same_dtype(("keys", keys), ("values", values), ("the bank's keys", self.keys))
        if self.keys is not None and (self.keys.shape[:2] != keys.shape[:2] or self.keys.shape[-1] != keys.shape[-1]):
            raise ValueError(f"keys (batch, heads, L, d) = {tuple(keys.shape)} do not match the bank's {tuple(self.keys.shape)}")
        if self.values is not None and self.values.shape[-1] != values.shape[-1]:
            raise ValueError(f"values must have d_v = {self.values.shape[-1]} like the bank's, got shape {tuple(values.shape)}")
        check_key_mask(valid, keys.shape[0], L, name="valid", length_name="L", meaning="entry from a real token")
        if L == 0:
            return  # nothing to add
        keys, values = keys.detach(), values.detach()  # the memory is not differentiable
        if self.keys is not None and self.values is not None and self.positions is not None:
            if valid is not None or self.valid is not None:  # one validity mask for the whole bank
                old = self.valid if self.valid is not None else keys.new_ones(keys.shape[0], self.size, dtype=torch.bool)
                valid = torch.cat([old, valid if valid is not None else old.new_ones(keys.shape[0], L)], 1)
            keys = torch.cat([self.keys, keys], 2)
            values = torch.cat([self.values, values], 2)
            positions = torch.cat([self.positions, positions])
        self.keys, self.values, self.positions = keys[:, :, -self.capacity :], values[:, :, -self.capacity :], positions[-self.capacity :]
        self.valid = None if valid is None else valid[:, -self.capacity :]


def _check_memory(memory: object) -> None:
    """``memory`` is ``None`` or a :class:`KNNMemory`."""
    if memory is not None and not isinstance(memory, KNNMemory):
        raise TypeError(f"memory must be a KNNMemory (or None), got {type(memory).__name__}")


class Retrieval(NamedTuple):
    """``output (B, h, L, d_v)``, ``weights (B, h, L, k)`` over the retrieved entries, ``indices (B, h, L, k)`` into the bank."""

    output: Tensor
    weights: Tensor
    indices: Tensor


def _gather(bank: Tensor, idx: Tensor) -> Tensor:
    """``bank (B, h, S, d)``, ``idx (B, h, L, k)`` -> ``(B, h, L, k, d)``: only the retrieved rows are copied."""
    B, h = idx.shape[:2]
    rows = torch.arange(B, device=idx.device)[:, None, None, None]
    heads = torch.arange(h, device=idx.device)[None, :, None, None]
    return bank[rows, heads, idx]


def _faiss_search(q: Tensor, keys: Tensor, k: int) -> Tensor:
    """Exact inner-product search with ``faiss.IndexFlatIP``, one index per (example, head): indices ``(B, h, L, k)``."""
    import faiss
    import numpy as np

    B, h, L, d = q.shape
    out = np.empty((B, h, L, k), dtype=np.int64)
    qs = q.detach().float().cpu().numpy()
    ks = keys.detach().float().cpu().numpy()
    for b in range(B):
        for hh in range(h):
            index = faiss.IndexFlatIP(d)
            index.add(np.ascontiguousarray(ks[b, hh]))
            _, found = index.search(np.ascontiguousarray(qs[b, hh]), k)
            out[b, hh] = found
    return torch.from_numpy(out).to(q.device)


def _check_search(q: Tensor, keys: Tensor, values: Tensor, top_k: int, scale: float | None) -> float:
    """Checks shared by :func:`knn_attention` and :func:`knn_attention_dense`; returns the score scale."""
    check_tensor(q, "q", "(batch, heads, L, d)", 4)
    check_tensor(keys, "keys", "(batch, heads, S, d)", 4)
    check_tensor(values, "values", "(batch, heads, S, d_v)", 4)
    if keys.shape[:2] != q.shape[:2] or keys.shape[-1] != q.shape[-1] or values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, keys {tuple(keys.shape)} and values {tuple(values.shape)} must share (batch, heads) and d; keys and values S")
    check_same_dtype(("q", q), ("keys", keys), ("values", values))
    check_int("top_k", top_k, 1)
    if keys.shape[2] == 0:
        raise ValueError("the bank is empty (S = 0): nothing to retrieve")
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_positive_float("scale", scale)


def knn_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    top_k: int,
    scale: float | None = None,
    backend: Literal["torch", "faiss"] = "torch",
    *,
    key_mask: Tensor | None = None,
) -> Retrieval:
    r"""Attention over the ``top_k`` bank entries with the largest ``q^T k`` (gathered, not masked).

    Args:
        q: ``(B, h, L, d)`` queries.
        keys, values: the bank, ``(B, h, S, d)`` and ``(B, h, S, d_v)``.
        top_k: entries retrieved per query (``min(top_k, S)`` are used).
        scale: score scale, default ``1 / sqrt(d)``.
        backend: ``"torch"``: exact :func:`torch.topk` over all ``S`` scores;
            ``"faiss"``: the same exact search by ``faiss.IndexFlatIP`` (needs ``faiss``).
        key_mask: ``(B, S)`` boolean, ``True`` = a real bank entry (keyword only, torch backend).
            The search runs over the real entries only; a query with fewer than ``k`` real
            entries attends to those, one with none gets zero weights and a zero output.

    Returns:
        :class:`Retrieval`. The softmax runs over the ``k`` retrieved scores;
        gradients reach ``q`` (and the bank, if it required grad).
    """
    scale = _check_search(q, keys, values, top_k, scale)
    check_key_mask(key_mask, q.shape[0], keys.shape[2], length_name="S", meaning="real bank entry")
    k = min(top_k, keys.shape[2])
    if key_mask is not None:
        if backend != "torch":
            raise ValueError(f"key_mask needs backend='torch' (the faiss index searches every entry), got backend={backend!r}")
        scores = torch.matmul(q * scale, keys.transpose(-1, -2)).masked_fill(~key_mask[:, None, None, :], float("-inf"))
        top, idx = scores.topk(k, dim=-1)  # (B, h, L, k): real entries first, padded ones at -inf
        picked = key_mask[torch.arange(q.shape[0], device=q.device)[:, None, None, None], idx]  # (B, h, L, k)
        weights = masked_softmax(top, picked)  # zero on padded entries; all-zero row when none is real
        return Retrieval(torch.einsum("bhlk,bhlkd->bhld", weights, _gather(values, idx)), weights, idx)
    if backend == "torch":
        scores = torch.matmul(q * scale, keys.transpose(-1, -2))  # (B, h, L, S): the exact search
        top, idx = scores.topk(k, dim=-1)  # (B, h, L, k)
    elif backend == "faiss":
        if not faiss_available():
            raise ImportError("backend='faiss' needs the faiss package (pip install faiss-cpu)")
        idx = _faiss_search(q, keys, k)
        top = torch.einsum("bhld,bhlkd->bhlk", q * scale, _gather(keys, idx))  # recomputed in torch: differentiable in q
    else:
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
    weights = top.softmax(-1)  # over the k retrieved entries only
    out = torch.einsum("bhlk,bhlkd->bhld", weights, _gather(values, idx))  # O(L k d)
    return Retrieval(out, weights, idx)


def knn_attention_dense(
    q: Tensor, keys: Tensor, values: Tensor, top_k: int, scale: float | None = None, *, key_mask: Tensor | None = None
) -> AttentionOutput:
    """Baseline: all ``S`` scores, a mask keeping each query's ``top_k`` largest, dense softmax and product.

    Equal to :func:`knn_attention` (ties aside); with ``top_k >= S`` it is
    plain attention over the whole bank. ``O(L S d)`` and an ``(L, S)`` matrix per head.
    ``key_mask (B, S)``: ``True`` = real entry; the top ``k`` are taken among the real ones.
    """
    scale = _check_search(q, keys, values, top_k, scale)
    check_key_mask(key_mask, q.shape[0], keys.shape[2], length_name="S", meaning="real bank entry")
    scores = torch.matmul(q * scale, keys.transpose(-1, -2))
    real = None if key_mask is None else key_mask[:, None, None, :]
    if real is not None:
        scores = scores.masked_fill(~real, float("-inf"))
    k = min(top_k, keys.shape[2])
    kth = scores.topk(k, dim=-1).values[..., -1:]
    keep = scores >= kth
    weights = masked_softmax(scores, keep if real is None else keep & real)
    return AttentionOutput(weights @ values, weights)


# --------------------------------------------------------------------------- Memorizing Transformer attention


def _always_causal(is_causal: object) -> None:
    """Memorizing attention is causal by construction: ``is_causal=False`` is a ``ValueError`` saying so."""
    if is_causal is not None and not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
    if is_causal is False:
        raise ValueError(
            "MemorizingAttention is always causal (local attention is causal inside each segment and the memory "
            "holds only earlier segments): is_causal=False is not supported; pass None or True"
        )


class SegmentOutput(NamedTuple):
    """One segment through :meth:`MemorizingAttention.attend_segment`.

    ``output (B, L, E)``; ``local_weights (B, h, L, L)`` and ``memory_weights (B, h, L, k)``
    (``None`` unless asked for / no memory); ``indices (B, h, L, k)`` into the bank (``None``
    without retrieval); ``keys, values (B, h, L, d)``: what to add to the bank afterwards;
    ``share``: the memory's share of each row, ``g`` ``(1, h, 1, 1)``, or ``(B, h, L, 1)``
    (0 for a query that found no real entry) when the bank holds padded entries; ``None``
    without retrieval.
    """

    output: Tensor
    local_weights: Tensor | None
    memory_weights: Tensor | None
    indices: Tensor | None
    keys: Tensor
    values: Tensor
    share: Tensor | None = None


@register(
    "memorizing",
    paper="Wu et al. 2022",
    complexity="O(n (L + C) d)",
    chapter=15,
    summary="causal attention inside segments of L, gated with top-k attention over a bounded kNN memory of past keys/values",
    build=lambda embed_dim, num_heads: MemorizingAttention(embed_dim, num_heads, segment=8, top_k=4, capacity=64),
    causal=True,
)
class MemorizingAttention(AttentionBase):
    """Memorizing Transformer attention: local causal attention + gated top-k retrieval from a kNN memory.

    A sequence mixer (``forward(x, *, key_mask, is_causal, need_weights, memory)``) with the book's
    one attention module's projections and heads (:class:`~attn.attention.AttentionBase`:
    ``q_proj, k_proj, v_proj, out_proj``, a :class:`~attn.multihead.MultiHeadAttention` state dict
    plus ``gate_bias``); its segments, bank and gate are its own, so it writes ``forward`` itself.

    Args:
        embed_dim: model width ``E``.
        num_heads: heads ``h``.
        segment: ``L``, the context window; :meth:`forward` reads a sequence in segments of ``L``.
        top_k: entries retrieved per query (0: no memory, local attention only).
        capacity: ``C``, the most entries the kNN memory keeps per head (oldest out).
        backend: ``"torch"`` (exact ``topk``) or ``"faiss"`` (exact ``IndexFlatIP``, optional).
        normalize: L2-normalise queries and keys per head (Wu et al. 2022: keys stored by
            older parameters then keep the scale of the current ones) and score with a learned
            per-head scale, ``s_ij = exp(c_h) cos(q_i, k_j)`` (parameter ``qk_log_scale``
            ``(h,)``, ``c_h = log sqrt(d)`` at the start); local attention and retrieval both use it.

    The registry's ``build`` uses ``L = 8``, ``k = 4``, ``C = 64``.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, segment: int = 8, top_k: int = 4, capacity: int = 64,
        backend: Literal["torch", "faiss"] = "torch", *, normalize: bool = False,
    ) -> None:
        check_heads(embed_dim, num_heads)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        check_int("segment", segment, 1)
        check_int("top_k", top_k, 0)
        check_int("capacity", capacity, 1)
        if backend not in ("torch", "faiss"):
            raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
        super().__init__(embed_dim, num_heads, causal=True)
        self.segment, self.top_k, self.capacity, self.backend = segment, top_k, capacity, backend
        self.gate_bias = nn.Parameter(torch.zeros(num_heads))  # b_g: g = sigmoid(b_g) per head, 0.5 at the start
        self.normalize = normalize
        self.qk_log_scale: nn.Parameter | None = None
        if normalize:  # c_h: scores exp(c_h) cos(q, k), sqrt(d) at the start
            self.qk_log_scale = nn.Parameter(torch.full((num_heads,), 0.5 * math.log(self.head_dim)))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of ``x (B, n, E)``, split into heads: ``(B, h, n, d)`` each.

        With ``normalize``: ``k / |k|`` and ``exp(c_h) sqrt(d) q / |q|``, so that the kernels'
        usual ``q^T k / sqrt(d)`` is ``exp(c_h) cos(q, k)``.
        """
        q, k, v = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))
        if self.qk_log_scale is not None:
            scale = self.qk_log_scale.exp().to(q.dtype)[:, None, None] * math.sqrt(self.head_dim)
            q, k = F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1)
        return q, k, v

    @property
    def gate(self) -> Tensor:
        """``g = sigmoid(b_g)``, ``(h,)``: the share of each head's output that comes from the memory."""
        return torch.sigmoid(self.gate_bias)

    def attend_segment(
        self, x: Tensor, memory: KNNMemory | None = None, need_weights: bool = False, *, key_mask: Tensor | None = None
    ) -> SegmentOutput:
        """One segment ``x (B, L, E)``: causal attention inside it, gated with retrieval from ``memory``.

        The memory is read, not written: add ``keys, values`` of the result to it
        afterwards (as :meth:`forward` does, with ``valid=key_mask``). With no memory, an
        empty one or ``top_k = 0``, the output is local attention alone.

        ``key_mask``: ``(B, L)`` boolean, ``True`` = real token; padded tokens are hidden from
        the local attention. Padded *bank* entries are marked in ``memory.valid`` and never
        retrieved; a query that finds no real entry uses local attention alone (share 0).
        """
        x = check_tokens(x, self.embed_dim)
        check_layer_dtype(x, self.q_proj.weight)
        _check_memory(memory)
        batch, _, _ = x.shape
        check_key_mask(key_mask, batch, x.shape[1], length_name="L")
        h, d = self.num_heads, self.head_dim
        q, k, v = self.project(x)  # (B, h, L, d)
        local, local_w = scaled_dot_product_attention(q, k, v, key_mask=key_mask, is_causal=True, need_weights=need_weights)
        mem_w = idx = share = None
        if memory is not None and memory.keys is not None and memory.values is not None and self.top_k > 0:
            bank_k, bank_v = memory.keys, memory.values
            if bank_k.shape[:2] != (batch, h) or bank_k.shape[-1] != d or bank_v.shape[-1] != d:
                raise ValueError(
                    f"memory holds keys (batch, heads, S, d) = {tuple(bank_k.shape)} and values {tuple(bank_v.shape)}, "
                    f"the segment needs ({batch}, {h}, S, {d}) for both"
                )
            # q is x projected (its dtype, or autocast's): the bank must hold the same dtype
            check_same_dtype(("x (projected to queries)", q), ("memory.keys", bank_k), ("memory.values", bank_v))
            found = knn_attention(q, bank_k, bank_v, self.top_k, backend=self.backend, key_mask=memory.valid)
            share = self.gate[None, :, None, None]
            if memory.valid is not None:  # a query that found no real entry keeps its local output
                rows = torch.arange(batch, device=x.device)[:, None, None, None]
                share = share * memory.valid[rows, found.indices].any(-1, keepdim=True).to(share.dtype)  # (B, h, L, 1)
            out = share * found.output + (1 - share) * local  # V = g V_mem + (1 - g) V_local
            mem_w, idx = (found.weights if need_weights else None), found.indices
        else:
            out = local
        return SegmentOutput(self.out_proj(rearrange(out, "b h l d -> b l (h d)")), local_w, mem_w, idx, k, v, share)

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        memory: KNNMemory | None = None,
    ) -> AttentionOutput:
        """Read ``x (B, n, E)`` in segments of ``L``, each one retrieving from the memory of the earlier ones.

        Args:
            x: the sequence.
            is_causal: ``None`` or ``True``: the layer is always causal (local attention is causal inside a
                segment, and the memory holds only earlier segments); ``False`` is a ``ValueError``.
            need_weights: also return the *effective* weights ``(B, h, n, n)``:
                ``(1 - g)`` times the local weights plus ``g`` times the memory
                weights at the stream positions they retrieved (rows sum to 1).
            memory: a :class:`KNNMemory` to read and extend, segment by
                segment (a stream read over several calls). Without one, all
                segments run at once (:meth:`forward_parallel`), with the same result.
            key_mask: ``(B, n)`` boolean, ``True`` = real token (keyword only). A padded
                token is never attended to: it is hidden from its segment's local attention,
                and its key and value enter the bank marked invalid (``KNNMemory.valid``),
                so no later segment (nor a later call sharing ``memory``) retrieves it. A
                query whose window holds no real entry uses local attention alone; a query
                with no visible key at all gets a zero row and the output ``out_proj(0)``.

        Returns:
            ``(output (B, n, E), weights (B, h, n, S=n) | None)``: the key axis is the
            sequence ``x`` itself (bank entries from earlier calls have no column).
        """
        _always_causal(is_causal)
        x = check_tokens(x, self.embed_dim)
        check_layer_dtype(x, self.q_proj.weight)
        _check_memory(memory)
        batch, n, _ = x.shape
        check_key_mask(key_mask, batch, n, length_name="n")
        h, L = self.num_heads, min(self.segment, n)  # a segment longer than x is x (same result, no padding)
        if empty_batch(x):
            return AttentionOutput(x.new_zeros(0, n, self.embed_dim), x.new_zeros(0, h, n, n) if need_weights else None)
        if memory is None and self.backend == "torch":
            return self.forward_parallel(x, key_mask=key_mask, need_weights=need_weights)
        memory = KNNMemory(self.capacity) if memory is None else memory
        offset = 0 if memory.positions is None else int(memory.positions[-1]) + 1  # stream position of x[:, 0]
        outs, dense = [], x.new_zeros(batch, h, n, n) if need_weights else None
        for start in range(0, n, L):
            stop = min(start + L, n)
            seg_mask = None if key_mask is None else key_mask[:, start:stop]
            bank_positions = memory.positions  # the bank this segment reads (before adding it)
            seg = self.attend_segment(x[:, start:stop], memory, need_weights, key_mask=seg_mask)
            outs.append(seg.output)
            if dense is not None:
                assert seg.local_weights is not None  # need_weights was passed on
                share = x.new_zeros(1, h, 1, 1) if seg.share is None else seg.share
                dense[:, :, start:stop, start:stop] = (1 - share) * seg.local_weights
                if seg.indices is not None:
                    assert bank_positions is not None and seg.memory_weights is not None  # a retrieval happened
                    cols = bank_positions[seg.indices] - offset  # (B, h, L, k) in this call's coordinates
                    inside = cols >= 0  # entries from earlier calls have no column here
                    dense[:, :, start:stop] = dense[:, :, start:stop].scatter_add(
                        -1, cols.clamp(min=0), share * seg.memory_weights * inside)
            positions = torch.arange(start, stop, device=x.device) + offset
            memory.add(seg.keys, seg.values, positions, valid=seg_mask)
        return AttentionOutput(torch.cat(outs, 1), dense)


    def effective_sizes(self, n: int) -> tuple[int, int]:
        """``(L, C)`` the parallel form uses on ``n`` tokens: ``L' = min(L, n)``, ``C' = min(C, (ceil(n / L') - 1) L')``.

        A segment longer than the sequence is the sequence, and no segment has more
        than ``(ceil(n / L') - 1) L'`` tokens before it, so a larger window only adds
        slots that are always empty. Same result whatever ``L`` and ``C`` were set to.
        """
        L = max(1, min(self.segment, n))
        return L, min(self.capacity, (-(-n // L) - 1) * L)

    def forward_parallel(self, x: Tensor, *, key_mask: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        """All segments at once: segment ``b`` searches the ``C`` keys just before it (the bank it would hold).

        A bank filled segment by segment and bounded at ``C`` entries holds, when
        segment ``b`` is read, exactly positions ``max(0, bL - C) .. bL - 1``. So
        every segment can gather that window of detached keys and values
        (``Tensor.unfold``, a view), score it, take its top ``k`` and attend,
        all segments in one batch: ``O(n (L + C) d)``, no Python loop. Equal to
        the segment-by-segment :meth:`forward` with a :class:`KNNMemory`.

        Never more work than dense attention over ``n``: ``L`` and ``C`` are clamped to the
        sequence (:meth:`effective_sizes`); segment 0 (nothing to retrieve) and a shorter
        last segment run as their own batches, so no window of empty slots is searched
        for segment 0 and nothing is padded.

        ``key_mask (B, n)``: ``True`` = real token, as in :meth:`forward` (padded tokens are
        hidden locally and are invalid slots of every later window).
        """
        x = check_tokens(x, self.embed_dim)
        check_layer_dtype(x, self.q_proj.weight)
        _, n, _ = x.shape
        check_key_mask(key_mask, x.shape[0], n, length_name="n")
        h = self.num_heads
        if empty_batch(x):
            return AttentionOutput(x.new_zeros(0, n, self.embed_dim), x.new_zeros(0, h, n, n) if need_weights else None)
        L, C = self.effective_sizes(n)
        C = C if self.top_k > 0 else 0
        nb, tail = divmod(n, L)  # nb >= 1 full segments, then a last one of `tail` tokens (if any)
        q, k, v = self.project(x)  # (B, h, n, d)
        first = 1 if C > 0 else 0  # segment 0 retrieves nothing: alone, without a window, when the others search one
        parts = []
        if first:
            parts.append(self._segment_batch(q, k, v, 0, 1, L, 0, need_weights, key_mask))
        if nb > first:
            parts.append(self._segment_batch(q, k, v, first * L, nb - first, L, C, need_weights, key_mask))
        if tail:
            parts.append(self._segment_batch(q, k, v, nb * L, 1, tail, C, need_weights, key_mask))  # C <= nb L: no empty slot
        out = self.out_proj(rearrange(torch.cat([o for o, _ in parts], 2), "b h n d -> b n (h d)"))
        weights = [w for _, w in parts if w is not None]  # one per part when need_weights
        return AttentionOutput(out, torch.cat(weights, 2) if need_weights else None)

    def _segment_batch(
        self, q: Tensor, k: Tensor, v: Tensor, start: int, m: int, length: int, window: int, need_weights: bool,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``m`` segments of ``length`` tokens from position ``start`` of the projected ``q, k, v (B, h, n, d)``, in one batch.

        Causal attention inside each segment, gated with top-``k`` retrieval from the ``window``
        detached keys and values just before it (slots before position 0 are empty; ``window = 0``
        or segment 0: local attention only). Returns the output ``(B, h, m length, d)`` and, with
        ``need_weights``, the effective weights of those rows over the whole sequence ``(B, h, m length, n)``.
        ``key_mask (B, n)``: padded tokens are hidden locally and are invalid window slots; a query
        whose top ``k`` holds no real slot keeps its local output (share 0).
        """
        batch, h, n, d = q.shape
        L, C = length, window
        dev = q.device
        blocks = lambda t: rearrange(t[:, :, start : start + m * L], "b h (m l) d -> b h m l d", l=L)  # noqa: E731
        qb, kb, vb = blocks(q), blocks(k), blocks(v)  # (B, h, m, L, d)
        flat = lambda t: rearrange(t, "b h m l d -> (b m) h l d")  # noqa: E731  (the core takes 4-D tensors)
        local_mask = None if key_mask is None else rearrange(key_mask[:, start : start + m * L], "b (m l) -> (b m) l", l=L)
        local, local_w = scaled_dot_product_attention(
            flat(qb), flat(kb), flat(vb), key_mask=local_mask, is_causal=True, need_weights=need_weights
        )
        local = rearrange(local, "(b m) h l d -> b h m l d", b=batch)
        seg_start = start + torch.arange(m, device=dev) * L  # (m,) stream position of each segment's first token
        share = q.new_zeros(1, h, m, 1, 1)
        mem_w = cols = None
        if C > 0 and self.top_k > 0 and start + (m - 1) * L > 0:
            # the C detached entries before each segment: (B, h, m, C, d), slot c = position s - C + c
            win = lambda t: F.pad(t.detach(), (0, 0, C, 0))[:, :, start : start + (m - 1) * L + C].unfold(2, C, L).transpose(-1, -2)  # noqa: E731
            mem_k, mem_v = win(k), win(v)
            pos = seg_start[:, None] - C + torch.arange(C, device=dev)[None, :]  # (m, C)
            scores = torch.einsum("bhmld,bhmcd->bhmlc", qb / math.sqrt(d), mem_k)  # the exact search, (B, h, m, L, C)
            rows = torch.arange(batch, device=dev)[:, None, None, None, None]
            heads = torch.arange(h, device=dev)[None, :, None, None, None]
            segs = torch.arange(m, device=dev)[None, None, :, None, None]
            if key_mask is None:
                scores = scores.masked_fill(~(pos >= 0)[:, None, :], torch.finfo(scores.dtype).min)  # slots before position 0
                top, idx = scores.topk(min(self.top_k, C), dim=-1)  # (B, h, m, L, k)
                mem_w = top.softmax(-1)  # empty slots get exp(min - max) = 0 (all-empty: segment 0, gated off below)
                has_memory = (seg_start > 0).to(q.dtype)[None, None, :, None, None]
            else:
                # real slots of each window: (B, m, C); slots before position 0 are False too
                real = F.pad(key_mask, (C, 0), value=False)[:, start : start + (m - 1) * L + C].unfold(1, C, L)
                scores = scores.masked_fill(~real[:, None, :, None, :], float("-inf"))
                top, idx = scores.topk(min(self.top_k, C), dim=-1)  # (B, h, m, L, k): real slots first
                picked = real[rows, segs, idx]  # (B, h, m, L, k): which retrieved slots are real
                mem_w = masked_softmax(top, picked)  # zero on padded slots; all-zero row when none is real
                has_memory = picked.any(-1, keepdim=True).to(q.dtype)  # no real slot: local attention alone
            retrieved = torch.einsum("bhmlk,bhmlkd->bhmld", mem_w, mem_v[rows, heads, segs, idx])  # gathered: O(L k d)
            share = self.gate[None, :, None, None, None] * has_memory
            local = share * retrieved + (1 - share) * local
            cols = pos[torch.arange(m, device=dev)[:, None, None], idx]  # (B, h, m, L, k) stream positions
        out = rearrange(local, "b h m l d -> b h (m l) d")
        if not need_weights:
            return out, None
        assert local_w is not None  # need_weights was passed to the core
        local_w = rearrange(local_w, "(b m) h l j -> b h m l j", b=batch)
        own = (seg_start[:, None] + torch.arange(L, device=dev)[None, :])[:, None, :]  # (m, 1, L) columns of the segment
        dense = q.new_zeros(batch, h, m, L, n)
        dense = dense.scatter(-1, own.expand(m, L, L).expand(batch, h, -1, -1, -1), (1 - share) * local_w)
        if mem_w is not None and cols is not None:
            dense = dense.scatter_add(-1, cols.clamp(min=0), share * mem_w * (cols >= 0))
        return out, rearrange(dense, "b h m l p -> b h (m l) p")
