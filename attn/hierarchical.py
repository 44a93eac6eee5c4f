r"""Chapter 16 -- Hierarchical attention: words attend inside sentences, sentences inside the document.

**Hierarchical attention network** (Yang et al. 2016, HAN). A document is
``S`` sentences of ``T_i`` words. Each level encodes its sequence with a
bidirectional GRU and pools it with attention against a *learned context
vector* (a query that belongs to the model, not to the input):

.. math::

    h_{it} &= [\overrightarrow{\mathrm{GRU}}(x_{it}); \overleftarrow{\mathrm{GRU}}(x_{it})],
        \quad x_{it} = W_e w_{it}                                   && \text{word encoder} \\
    u_{it} &= \tanh(W_w h_{it} + b_w), \quad
    \alpha_{it} = \frac{\exp(u_{it}^\top u_w)}{\sum_{t'} \exp(u_{it'}^\top u_w)}, \quad
    s_i = \sum_t \alpha_{it} h_{it}                                 && \text{word attention} \\
    h_i &= [\overrightarrow{\mathrm{GRU}}(s_i); \overleftarrow{\mathrm{GRU}}(s_i)]
                                                                    && \text{sentence encoder} \\
    u_i &= \tanh(W_s h_i + b_s), \quad
    \alpha_i = \operatorname{softmax}_i(u_i^\top u_s), \quad
    v = \sum_i \alpha_i h_i                                         && \text{sentence attention} \\
    p &= \operatorname{softmax}(W_c v + b_c)                       && \text{classifier}

Shapes: token ids ``(B, S, T)`` (``S`` sentences, ``T`` words, padded),
``word_mask (B, S, T)`` boolean, ``True`` = real word, real words first in each
sentence and real sentences first in each document. Word weights
``(B, S, T)``, sentence weights ``(B, S)``, logits ``(B, C)``.

Padding changes nothing: both GRUs run on packed sequences (only the real
words of a sentence, only the real sentences of a document), the softmaxes
skip padded positions, and empty (padding) sentences never enter the word
encoder. A batch therefore gives the same numbers as its documents one at a
time. Cost: ``O(N h^2)`` for ``N`` real words, with a sequential depth of
``T + S`` GRU steps instead of ``S T`` for one flat recurrent pass.

Yang, Yang, Dyer, He, Smola, Hovy, "Hierarchical Attention Networks for
Document Classification", NAACL 2016.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .checks import check_tensor, check_token_ids
from .core import AttentionOutput, masked_softmax
from .registry import register

__all__ = ["ContextAttention", "HierarchicalAttentionNetwork", "HANOutput", "pad_documents", "check_documents"]

Pooling = Literal["attention", "mean"]
_IDS = "(batch, sentences, words)"


class HANOutput(NamedTuple):
    """``logits (B, C)``; ``sentence_weights (B, S)`` and ``word_weights (B, S, T)`` when asked for, else ``None``."""

    logits: Tensor
    sentence_weights: Tensor | None
    word_weights: Tensor | None


class ContextAttention(nn.Module):
    r"""Attention pooling against a learned context vector (one HAN level).

    .. math::

        u_t = \tanh(W h_t + b), \qquad \alpha_t = \operatorname{softmax}_t(u_t^\top c), \qquad
        \text{out} = \sum_t \alpha_t h_t

    Shapes: ``h (B, n, dim)``, ``key_mask (B, n)`` (``True`` = real) -> output
    ``(B, dim)``, weights ``(B, n)``. Masked positions get weight 0; a row
    with no real position gives a zero output and zero weights.

    Args:
        dim: width of ``h``.
        attn_dim: width of ``u`` and of the context vector ``c`` (default ``dim``).
    """

    def __init__(self, dim: int, attn_dim: int | None = None) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        attn_dim = dim if attn_dim is None else attn_dim
        self.dim, self.attn_dim = dim, attn_dim
        self.proj = nn.Linear(dim, attn_dim)  # W, b
        self.context = nn.Parameter(torch.randn(attn_dim) / attn_dim**0.5)  # c (u_w or u_s in the paper)

    def forward(self, h: Tensor, *, key_mask: Tensor | None = None) -> AttentionOutput:
        """``h (B, n, dim)``, ``key_mask (B, n)`` -> ``(output (B, dim), weights (B, n))``."""
        h = check_tensor(h, "h", f"(batch, n, dim={self.dim})", 3)
        if h.shape[-1] != self.dim:
            raise ValueError(f"h must have shape (batch, n, dim={self.dim}), got {tuple(h.shape)}")
        if key_mask is not None:
            _check_bool(key_mask, "key_mask", tuple(h.shape[:2]), "(batch, n)")
        u = torch.tanh(self.proj(h))  # (B, n, attn_dim)
        scores = u @ self.context  # (B, n): u_t^T c
        alpha = masked_softmax(scores, key_mask)  # (B, n), zeros where masked
        return AttentionOutput((alpha.unsqueeze(-1) * h).sum(1), alpha)  # (B, dim), (B, n)


def _check_bool(mask: object, name: str, shape: tuple[int, ...], shape_name: str) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise TypeError(f"{name} must be a torch.bool tensor of shape {shape_name} (True = real), got {got}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_name} = {shape}, got {tuple(mask.shape)}")
    return mask


def check_documents(ids: object, word_mask: object, vocab_size: int, padding_idx: int | None = 0) -> Tensor:
    """Validate a batch of padded documents; return the word mask ``(B, S, T)``.

    The padding id is reserved: its embedding is the zero vector and gets no
    gradient, so a *real* word (``word_mask`` ``True``) with that id would silently
    read as nothing. It is rejected. ``padding_idx=None`` declares that there is
    no reserved id (every id is a word; the word mask alone marks padding).

    Raises:
        TypeError: ``ids`` not an integer tensor (a nested list: use :func:`pad_documents`), ``word_mask`` not boolean.
        ValueError: wrong rank, ids out of ``[0, vocab_size)``, padding ids with no mask
            (ragged documents), the padding id at a real word, a mask whose real
            words or sentences are not first, a document with no word.
    """
    if not isinstance(ids, Tensor):
        raise TypeError(
            f"ids must be a torch.Tensor of token ids with shape {_IDS}, got {type(ids).__name__}; "
            "pad ragged documents with attn.hierarchical.pad_documents(docs), which returns (ids, word_mask)"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor of token ids with shape {_IDS}, got dtype {ids.dtype}")
    if ids.ndim != 3:
        raise ValueError(f"ids must have shape {_IDS}, got {ids.ndim}-D shape {tuple(ids.shape)}")
    if ids.shape[0] > 0 and ids.shape[1] * ids.shape[2] == 0:
        raise ValueError(f"ids must hold at least one sentence of one word: shape {_IDS}, got {tuple(ids.shape)}")
    check_token_ids(ids, vocab_size, "ids", ndim=3)  # in [0, vocab_size)
    if word_mask is None:
        if padding_idx is not None and ids.numel() and bool((ids == padding_idx).any()):
            raise ValueError(
                f"ids contain the padding id {padding_idx} but no word_mask was given: documents with different numbers "
                f"of sentences or words need word_mask {_IDS}, True = real word (pad_documents returns both)"
            )
        return torch.ones_like(ids, dtype=torch.bool)
    mask = _check_bool(word_mask, "word_mask", tuple(ids.shape), _IDS)
    if mask.numel():
        if bool((mask[..., 1:] & ~mask[..., :-1]).any()):
            raise ValueError("word_mask must put the real words of each sentence first (True...True, False...False)")
        real_sentence = mask.any(-1)  # (B, S)
        if bool((real_sentence[:, 1:] & ~real_sentence[:, :-1]).any()):
            raise ValueError("word_mask must put the real sentences of each document first (no empty sentence before a real one)")
        empty = (~real_sentence.any(-1)).nonzero()
        if len(empty):
            raise ValueError(f"every document needs at least one real word; document {int(empty[0])} has none")
    if padding_idx is not None and mask.numel():
        clash = (mask & (ids == padding_idx)).nonzero()
        if len(clash):
            b, i, t = (int(v) for v in clash[0])
            raise ValueError(
                f"ids hold the padding id {padding_idx} at {len(clash)} real word(s) (word_mask True), first at document {b}, "
                f"sentence {i}, word {t}: the padding id embeds to the zero vector, so that word would be silently "
                f"blank; give real words other ids, mark that position False in word_mask, or build the model with "
                f"padding_idx=None (no reserved id)"
            )
    return mask


def pad_documents(docs: Sequence[Sequence[Sequence[int]]], padding_idx: int = 0,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Ragged documents (lists of sentences of token ids) -> ``ids (B, S, T)`` and ``word_mask (B, S, T)``.

    Raises:
        ValueError: an empty document or an empty sentence.
    """
    s_max = max((len(d) for d in docs), default=0)
    t_max = max((len(s) for d in docs for s in d), default=0)
    ids = torch.full((len(docs), s_max, t_max), padding_idx, dtype=torch.long)
    mask = torch.zeros(len(docs), s_max, t_max, dtype=torch.bool)
    for b, doc in enumerate(docs):
        if len(doc) == 0:
            raise ValueError(f"document {b} is empty: each document needs at least one sentence")
        for i, sentence in enumerate(doc):
            if len(sentence) == 0:
                raise ValueError(f"sentence {i} of document {b} is empty: each sentence needs at least one word")
            ids[b, i, : len(sentence)] = torch.as_tensor(list(sentence), dtype=torch.long)
            mask[b, i, : len(sentence)] = True
    return ids.to(device), mask.to(device)


def _run_gru(gru: nn.GRU, x: Tensor, lengths: Tensor) -> Tensor:
    """Bidirectional GRU over ``x (N, L, D)`` reading only the first ``lengths[n] >= 1`` steps -> ``(N, L, 2h)``, zeros after."""
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


def _masked_mean(h: Tensor, mask: Tensor) -> AttentionOutput:
    """Average pooling baseline: uniform weights over the real positions."""
    w = mask.to(h.dtype) / mask.sum(-1, keepdim=True).clamp(min=1).to(h.dtype)  # (B, n)
    return AttentionOutput((w.unsqueeze(-1) * h).sum(1), w)


@register(
    "hierarchical",
    paper="Yang et al. 2016",
    complexity="O(N h^2)",
    chapter=16,
    data="document",
    summary="HAN: biGRU + context-vector attention over words, then over sentences",
)
class HierarchicalAttentionNetwork(nn.Module):
    """Hierarchical attention network (Yang et al. 2016) for document classification.

    Word embedding -> bidirectional GRU -> word attention (per sentence) ->
    bidirectional GRU over the sentence vectors -> sentence attention -> linear
    classifier. See the module docstring for the equations.

    Shapes: ``ids (B, S, T)`` integer, ``word_mask (B, S, T)`` boolean (``True`` =
    real word; required when documents differ in length) -> :class:`HANOutput`
    with ``logits (B, C)``, and with ``need_weights`` the sentence weights
    ``(B, S)`` and word weights ``(B, S, T)`` (zeros on padding).

    Args:
        vocab_size: number of token ids (``padding_idx`` included).
        num_classes: ``C``.
        embed_dim: word embedding width.
        hidden: GRU width per direction (the encoders output ``2 * hidden``).
        attn_dim: width of ``u`` and of the context vectors (default ``2 * hidden``).
        pooling: ``"attention"`` (HAN) or ``"mean"`` (the average-pooling baseline:
            uniform weights over real words and real sentences, same encoders).
        padding_idx: the id reserved for padding (its embedding is zero and never trained;
            a real word with this id is an error); ``None``: no reserved id, the mask alone marks padding.
    """

    def __init__(self, vocab_size: int, num_classes: int, *, embed_dim: int = 32, hidden: int = 32,
                 attn_dim: int | None = None, pooling: Pooling = "attention", padding_idx: int | None = 0) -> None:
        super().__init__()
        if min(vocab_size, num_classes, embed_dim, hidden) <= 0:
            raise ValueError("vocab_size, num_classes, embed_dim and hidden must be positive")
        if pooling not in ("attention", "mean"):
            raise ValueError(f"pooling must be 'attention' or 'mean', got {pooling!r}")
        if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
                                        or not 0 <= padding_idx < vocab_size):
            raise ValueError(f"padding_idx must be None or an int in [0, vocab_size={vocab_size}), got {padding_idx!r}")
        self.vocab_size, self.num_classes, self.padding_idx, self.pooling = vocab_size, num_classes, padding_idx, pooling
        width = 2 * hidden
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.word_encoder = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.word_attention = ContextAttention(width, attn_dim)
        self.sentence_encoder = nn.GRU(width, hidden, batch_first=True, bidirectional=True)
        self.sentence_attention = ContextAttention(width, attn_dim)
        self.classifier = nn.Linear(width, num_classes)

    def _pool(self, level: ContextAttention, h: Tensor, mask: Tensor) -> AttentionOutput:
        return level(h, key_mask=mask) if self.pooling == "attention" else _masked_mean(h, mask)

    def forward(self, ids: Tensor, *, word_mask: Tensor | None = None, need_weights: bool = False) -> HANOutput:
        """``ids (B, S, T)``, ``word_mask (B, S, T)`` (``True`` = real word) -> :class:`HANOutput` (logits ``(B, C)``,
        weights if asked)."""
        mask = check_documents(ids, word_mask, self.vocab_size, self.padding_idx)
        batch, n_sent, n_word = ids.shape
        if batch == 0:
            logits = self.classifier.weight.new_zeros(0, self.num_classes)
            empty = self.classifier.weight.new_zeros
            return HANOutput(logits, empty(0, n_sent) if need_weights else None, empty(0, n_sent, n_word) if need_weights else None)
        word_len = mask.sum(-1)  # (B, S) real words per sentence
        sent_len = (word_len > 0).sum(-1)  # (B,) real sentences per document
        real = (word_len > 0).reshape(-1).nonzero()[:, 0]  # flat indices of real sentences, (N_s,)

        # word level: every real sentence of the batch is one sequence -> (N_s, T, E)
        x = self.embed(ids.reshape(-1, n_word)[real])
        h_words = _run_gru(self.word_encoder, x, word_len.reshape(-1)[real])  # (N_s, T, 2h)
        s, alpha_w = self._pool(self.word_attention, h_words, mask.reshape(-1, n_word)[real])  # (N_s, 2h), (N_s, T)

        # sentence level: scatter the sentence vectors back into their documents -> (B, S, 2h)
        sent = s.new_zeros(batch * n_sent, s.shape[-1]).index_copy(0, real, s).view(batch, n_sent, -1)
        h_sent = _run_gru(self.sentence_encoder, sent, sent_len)  # (B, S, 2h)
        v, alpha_s = self._pool(self.sentence_attention, h_sent, word_len > 0)  # (B, 2h), (B, S)

        logits = self.classifier(v)  # (B, C)
        if not need_weights:
            return HANOutput(logits, None, None)
        assert alpha_w is not None  # both pools return their weights (attention and mean alike)
        word_weights = alpha_w.new_zeros(batch * n_sent, n_word).index_copy(0, real, alpha_w).view(batch, n_sent, n_word)
        return HANOutput(logits, alpha_s, word_weights)
