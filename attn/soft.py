r"""Chapter 1 -- soft attention in an RNN encoder-decoder.

A decoder state ``s`` (the query) scores every encoder annotation ``h_j``
(the keys), the scores are normalised by a softmax into an alignment
``alpha``, and the context is the alignment-weighted sum of the annotations:

.. math::

    e_j = \operatorname{score}(s, h_j), \qquad
    \alpha_j = \frac{\exp e_j}{\sum_{j'} \exp e_{j'}}, \qquad
    c = \sum_j \alpha_j h_j

Scores:

* additive (Bahdanau et al. 2015): ``score(s, h) = v^T tanh(W s + U h)``;
* general (Luong et al. 2015): ``score(s, h) = s^T W h``;
* dot (Luong et al. 2015): ``score(s, h) = s^T h`` (needs equal widths).

Bahdanau, Cho, Bengio, "Neural Machine Translation by Jointly Learning to Align
and Translate", ICLR 2015. Luong, Pham, Manning, "Effective Approaches to
Attention-based Neural Machine Translation", EMNLP 2015.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .checks import check_int, check_same_batch, check_same_dtype, check_tensor, check_token_ids, check_tokens
from .core import AttentionOutput, masked_softmax
from .masks import check_key_mask
from .registry import register

__all__ = ["AdditiveAttention", "AdditiveSelfAttention", "MultiplicativeAttention", "Seq2SeqAttention", "softmax_vjp", "make_score"]

ScoreKind = Literal["additive", "general", "dot"]


def softmax_vjp(p: Tensor, grad_p: Tensor) -> Tensor:
    r"""Hand-derived backward pass of ``p = softmax(z)`` along the last axis.

    The Jacobian is ``dp_i/dz_j = p_i (delta_ij - p_j)``, so for an upstream
    gradient ``g = dL/dp``:

    .. math:: \frac{\partial L}{\partial z} = p \odot \big(g - \langle p, g\rangle\big)

    Shapes: ``p`` and ``grad_p`` are ``(..., n)``; the result is ``(..., n)``.
    """
    return p * (grad_p - (p * grad_p).sum(-1, keepdim=True))


def _check_query_keys(
    query: object, keys: object, values: object, qdim: int, kdim: int, keys_name: str = "keys", values_name: str = "values"
) -> None:
    """``query (B, d_q)`` or ``(B, L, d_q)``, ``keys (B, S, d_k)``, ``values (B, S, d_v)``: floating point, one dtype.

    ``keys_name``/``values_name`` are the caller's argument names (``memory`` in
    :class:`~attn.global_attention.LuongGlobalAttention`), so the errors name
    what the caller passed.
    """
    query = check_tensor(query, "query", f"(batch, {qdim}) or (batch, n_queries, {qdim})", (2, 3))
    if query.shape[-1] != qdim:
        raise ValueError(f"query must have shape (batch, {qdim}) or (batch, n_queries, {qdim}), got {tuple(query.shape)}")
    shape = f"(batch={query.shape[0]}, n_keys, {kdim})"
    keys = check_tensor(keys, keys_name, shape, 3)
    if keys.shape[-1] != kdim or keys.shape[0] != query.shape[0]:
        raise ValueError(f"{keys_name} must have shape {shape}, got {tuple(keys.shape)}")
    if keys.shape[1] == 0:
        raise ValueError(f"{keys_name} is an empty sequence (n_keys = 0)")
    if values is not keys:
        vshape = f"(batch={keys.shape[0]}, n_keys={keys.shape[1]}, d_v)"
        values = check_tensor(values, values_name, vshape, 3)
        if values.shape[:2] != keys.shape[:2]:
            raise ValueError(f"{values_name} must have shape {vshape}, got {tuple(values.shape)}")
    check_same_dtype(("query", query), (keys_name, keys), (values_name, values) if values is not keys else (values_name, None))


class _ScoreAttention(nn.Module):
    """Shared forward: scores -> masked softmax -> weighted sum of the values."""

    query_dim: int
    key_dim: int

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        key_mask: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
    ) -> AttentionOutput:
        """Attend a query to keys.

        Args:
            query: ``(B, d_q)`` or ``(B, L, d_q)``.
            keys: ``(B, S, d_k)``.
            values: ``(B, S, d_v)``; defaults to ``keys`` (the annotations themselves).
            key_mask: ``(B, S)`` boolean, ``True`` = real token.
            attn_mask: ``(L, S)`` or ``(B, L, S)`` boolean, ``True`` = query ``i`` may read key ``j``
                (a causal mask, for the self-attention uses).

        Returns:
            ``(context (B, d_v) | (B, L, d_v), weights (B, S) | (B, L, S))``.
        """
        values = keys if values is None else values
        _check_query_keys(query, keys, values, self.query_dim, self.key_dim)
        single = query.ndim == 2
        q = query[:, None] if single else query  # (B, L, d_q)
        e = self.scores(q, keys)  # (B, L, S)
        mask = None
        if key_mask is not None:
            check_key_mask(key_mask, keys.shape[0], keys.shape[1])
            mask = key_mask[:, None, :]
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool or attn_mask.shape[-2:] != e.shape[-2:]:
                raise ValueError(f"attn_mask must be a boolean tensor (L, S) or (B, L, S) = (..., {e.shape[1]}, {e.shape[2]}), "
                                 f"got {getattr(attn_mask, 'shape', type(attn_mask).__name__)}")
            mask = attn_mask if mask is None else mask & attn_mask
        alpha = masked_softmax(e, mask)  # (B, L, S)
        context = alpha @ values  # (B, L, d_v)
        if single:
            return AttentionOutput(context[:, 0], alpha[:, 0])
        return AttentionOutput(context, alpha)


@register(
    "additive",
    paper="Bahdanau et al. 2015",
    complexity="O(n m d)",
    chapter=1,
    summary="Bahdanau additive scoring v^T tanh(W s + U h) in an RNN encoder-decoder",
    build=lambda embed_dim, num_heads: AdditiveSelfAttention(embed_dim),
    kernel=None,
    causal=False,
)
class AdditiveSelfAttention(nn.Module):
    """Additive scores used as self-attention: every position queries every position.

    ``y_i = sum_j alpha_ij W_v x_j`` with ``alpha_i = softmax_j(v^T tanh(W_q x_i + W_k x_j))``.
    Shapes: ``x`` ``(B, n, E)`` -> ``(B, n, E)``; weights ``(B, 1, n, n)`` (one head). Memory grows
    as ``n^2 * hidden`` (one hidden vector per pair), which is what the comparison measures.

    Args:
        embed_dim: width ``E``; hidden: width of the scoring MLP (default ``E``).
        causal: the default of ``forward``'s ``is_causal`` (position ``i`` reads ``j <= i``).
    """

    def __init__(self, embed_dim: int, hidden: int | None = None, *, causal: bool = False) -> None:
        super().__init__()
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.causal = causal
        self.score = AdditiveAttention(embed_dim, embed_dim, hidden or embed_dim)
        self.value = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), weights (B, 1, n, n) or None)``; ``is_causal``: ``j <= i`` only."""
        check_tokens(x, self.value.in_features)
        causal = self.causal if is_causal is None else is_causal
        if not isinstance(causal, bool):
            raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril() if causal else None
        out, weights = self.score(x, x, self.value(x), key_mask=key_mask, attn_mask=mask)
        return AttentionOutput(out, weights[:, None] if need_weights and weights is not None else None)


class AdditiveAttention(_ScoreAttention):
    """Additive (Bahdanau) attention: ``e_j = v^T tanh(W_q s + W_k h_j)``.

    Args:
        query_dim: width of the query (decoder state).
        key_dim: width of the keys (encoder annotations).
        hidden: width of the hidden layer of the scoring MLP.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden: int = 64) -> None:
        super().__init__()
        for name, value in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden", hidden)):
            check_int(name, value)
        self.query_dim, self.key_dim = query_dim, key_dim
        self.w_q = nn.Linear(query_dim, hidden, bias=False)
        self.w_k = nn.Linear(key_dim, hidden, bias=True)
        self.v = nn.Linear(hidden, 1, bias=False)

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """``(B, L, d_q), (B, S, d_k) -> (B, L, S)``."""
        hidden = torch.tanh(self.w_q(query)[:, :, None, :] + self.w_k(keys)[:, None, :, :])  # (B, L, S, hidden)
        return self.v(hidden).squeeze(-1)


class MultiplicativeAttention(_ScoreAttention):
    """Luong's multiplicative scores: ``general`` ``s^T W h`` or ``dot`` ``s^T h``."""

    def __init__(self, query_dim: int, key_dim: int, kind: Literal["general", "dot"] = "general") -> None:
        super().__init__()
        check_int("query_dim", query_dim)
        check_int("key_dim", key_dim)
        if kind not in ("general", "dot"):
            raise ValueError(f"kind must be 'general' or 'dot', got {kind!r}")
        if kind == "dot" and query_dim != key_dim:
            raise ValueError(f"dot scores need query_dim == key_dim, got {query_dim} and {key_dim}")
        self.query_dim, self.key_dim, self.kind = query_dim, key_dim, kind
        self.w = nn.Linear(key_dim, query_dim, bias=False) if kind == "general" else None

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """``(B, L, d_q), (B, S, d_k) -> (B, L, S)``."""
        k = self.w(keys) if self.w is not None else keys  # (B, S, d_q)
        return query @ k.transpose(1, 2)


def make_score(kind: ScoreKind, query_dim: int, key_dim: int, hidden: int = 64) -> _ScoreAttention:
    """The scoring attention named ``kind``: ``additive``, ``general`` or ``dot``."""
    if kind == "additive":
        return AdditiveAttention(query_dim, key_dim, hidden)
    if kind in ("general", "dot"):
        return MultiplicativeAttention(query_dim, key_dim, kind)
    raise ValueError(f"score must be 'additive', 'general' or 'dot', got {kind!r}")


@register(
    "seq2seq",
    paper="Bahdanau et al. 2015",
    complexity="O(n m d)",
    chapter=1,
    data="seq2seq",
    summary="GRU encoder-decoder reading its source through additive attention at every output step",
)
class Seq2SeqAttention(nn.Module):
    """RNN encoder-decoder with soft attention (Bahdanau et al. 2015, section 3).

    Encoder: embedding + bidirectional GRU, annotations ``h_j`` ``(B, S, 2H)``.
    Decoder step ``i``: attend with the previous state ``s_{i-1}``, feed
    ``[embed(y_{i-1}); c_i]`` to a GRU cell, predict from ``[s_i; c_i]``.

    Args:
        vocab: vocabulary size (token 0 is the start token).
        embed: embedding width.
        hidden: GRU width ``H``.
        score: ``additive``, ``general`` or ``dot``.
    """

    def __init__(self, vocab: int, embed: int = 32, hidden: int = 64, score: ScoreKind = "additive") -> None:
        super().__init__()
        for name, value in (("vocab", vocab), ("embed", embed), ("hidden", hidden)):
            check_int(name, value)
        self.vocab, self.hidden = vocab, hidden
        self.src_embed = nn.Embedding(vocab, embed)
        self.tgt_embed = nn.Embedding(vocab, embed)
        self.encoder = nn.GRU(embed, hidden, batch_first=True, bidirectional=True)
        self.init_state = nn.Linear(2 * hidden, 2 * hidden)
        self.attention = make_score(score, 2 * hidden, 2 * hidden, hidden)
        self.cell = nn.GRUCell(embed + 2 * hidden, 2 * hidden)
        self.out = nn.Linear(4 * hidden, vocab)

    def forward(self, src: Tensor, tgt_in: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced decoding.

        Args:
            src: ``(B, S)`` source token ids.
            tgt_in: ``(B, T)`` decoder inputs (start token, then the target shifted right).
            key_mask: ``(B, S)`` boolean, ``True`` = real source token.

        Returns:
            ``logits (B, T, vocab)`` and the alignments ``(B, T, S)``.

        Raises:
            TypeError, ValueError: ids that are not integer tensors ``(B, S)`` / ``(B, T)``,
            out of ``[0, vocab)``, empty sequences, or a bad ``key_mask``.
        """
        empty = _check_seq2seq_inputs(src, tgt_in, key_mask, self.vocab, self.out.weight.dtype)
        if empty is not None:
            return empty
        annotations, _ = self.encoder(self.src_embed(src))  # (B, S, 2H)
        s = torch.tanh(self.init_state(annotations.mean(1)))  # (B, 2H)
        emb = self.tgt_embed(tgt_in)  # (B, T, E)
        logits, alignments = [], []
        for i in range(tgt_in.shape[1]):
            context, alpha = self.attention(s, annotations, key_mask=key_mask)  # (B, 2H), (B, S)
            s = self.cell(torch.cat([emb[:, i], context], -1), s)  # (B, 2H)
            logits.append(self.out(torch.cat([s, context], -1)))
            alignments.append(alpha)
        return torch.stack(logits, 1), torch.stack(alignments, 1)


def _check_seq2seq_inputs(src: object, tgt_in: object, key_mask: Tensor | None, vocab: int, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """Token ids ``src (B, S)`` and ``tgt_in (B, T)`` in ``[0, vocab)``, one batch, ``key_mask (B, S)``.

    Shared by the encoder-decoders of chapters 1 and 5. Returns the empty
    outputs ``(logits (0, T, vocab), alignments (0, T, S))`` for an empty batch, else ``None``.
    """
    src = check_token_ids(src, vocab, "src")
    tgt_in = check_token_ids(tgt_in, vocab, "tgt_in")
    check_same_batch(("src", src), ("tgt_in", tgt_in))
    check_key_mask(key_mask, src.shape[0], src.shape[1], length_name="source_len")
    if src.shape[0] == 0:
        B, S, T = 0, src.shape[1], tgt_in.shape[1]
        return torch.zeros(B, T, vocab, dtype=dtype, device=src.device), torch.zeros(B, T, S, dtype=dtype, device=src.device)
    return None
