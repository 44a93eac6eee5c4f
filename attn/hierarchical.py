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
``mask (B, S, T)`` boolean, ``True`` = real word, real words first in each
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
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .checks import check_tensor, check_token_ids
from .core import AttentionOutput, masked_softmax
from .registry import OwnTask, register

__all__ = [
    "ContextAttention", "HierarchicalAttentionNetwork", "HANOutput", "PlantedWordDocuments",
    "pad_documents", "check_documents", "han_loss", "planted_mass", "make_task",
]

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

    Shapes: ``h (B, n, dim)``, ``mask (B, n)`` (``True`` = real) -> output
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

    def forward(self, h: Tensor, mask: Tensor | None = None) -> AttentionOutput:
        """``h (B, n, dim)``, ``mask (B, n)`` -> ``(output (B, dim), weights (B, n))``."""
        h = check_tensor(h, "h", f"(batch, n, dim={self.dim})", 3)
        if h.shape[-1] != self.dim:
            raise ValueError(f"h must have shape (batch, n, dim={self.dim}), got {tuple(h.shape)}")
        if mask is not None:
            _check_bool(mask, "mask", tuple(h.shape[:2]), "(batch, n)")
        u = torch.tanh(self.proj(h))  # (B, n, attn_dim)
        scores = u @ self.context  # (B, n): u_t^T c
        alpha = masked_softmax(scores, mask)  # (B, n), zeros where masked
        return AttentionOutput((alpha.unsqueeze(-1) * h).sum(1), alpha)  # (B, dim), (B, n)


def _check_bool(mask: object, name: str, shape: tuple[int, ...], shape_name: str) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise TypeError(f"{name} must be a torch.bool tensor of shape {shape_name} (True = real), got {got}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_name} = {shape}, got {tuple(mask.shape)}")
    return mask


def check_documents(ids: object, mask: object, vocab_size: int, padding_idx: int | None = 0) -> Tensor:
    """Validate a batch of padded documents; return the word mask ``(B, S, T)``.

    The padding id is reserved: its embedding is the zero vector and gets no
    gradient, so a *real* word (``mask`` ``True``) with that id would silently
    read as nothing. It is rejected. ``padding_idx=None`` declares that there is
    no reserved id (every id is a word; the mask alone marks padding).

    Raises:
        TypeError: ``ids`` not an integer tensor (a nested list: use :func:`pad_documents`), ``mask`` not boolean.
        ValueError: wrong rank, ids out of ``[0, vocab_size)``, padding ids with no mask
            (ragged documents), the padding id at a real word, a mask whose real
            words or sentences are not first, a document with no word.
    """
    if not isinstance(ids, Tensor):
        raise TypeError(
            f"ids must be a torch.Tensor of token ids with shape {_IDS}, got {type(ids).__name__}; "
            "pad ragged documents with attn.hierarchical.pad_documents(docs), which returns (ids, mask)"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor of token ids with shape {_IDS}, got dtype {ids.dtype}")
    if ids.ndim != 3:
        raise ValueError(f"ids must have shape {_IDS}, got {ids.ndim}-D shape {tuple(ids.shape)}")
    if ids.shape[0] > 0 and ids.shape[1] * ids.shape[2] == 0:
        raise ValueError(f"ids must hold at least one sentence of one word: shape {_IDS}, got {tuple(ids.shape)}")
    check_token_ids(ids, vocab_size, "ids", ndim=3)  # in [0, vocab_size)
    if mask is None:
        if padding_idx is not None and ids.numel() and bool((ids == padding_idx).any()):
            raise ValueError(
                f"ids contain the padding id {padding_idx} but no mask was given: documents with different numbers "
                f"of sentences or words need mask {_IDS}, True = real word (pad_documents returns both)"
            )
        return torch.ones_like(ids, dtype=torch.bool)
    mask = _check_bool(mask, "mask", tuple(ids.shape), _IDS)
    if mask.numel():
        if bool((mask[..., 1:] & ~mask[..., :-1]).any()):
            raise ValueError("mask must put the real words of each sentence first (True...True, False...False)")
        real_sentence = mask.any(-1)  # (B, S)
        if bool((real_sentence[:, 1:] & ~real_sentence[:, :-1]).any()):
            raise ValueError("mask must put the real sentences of each document first (no empty sentence before a real one)")
        empty = (~real_sentence.any(-1)).nonzero()
        if len(empty):
            raise ValueError(f"every document needs at least one real word; document {int(empty[0])} has none")
    if padding_idx is not None and mask.numel():
        clash = (mask & (ids == padding_idx)).nonzero()
        if len(clash):
            b, i, t = (int(v) for v in clash[0])
            raise ValueError(
                f"ids hold the padding id {padding_idx} at {len(clash)} real word(s) (mask True), first at document {b}, "
                f"sentence {i}, word {t}: the padding id embeds to the zero vector, so that word would be silently "
                f"blank; give real words other ids, mark that position False in the mask, or build the model with "
                f"padding_idx=None (no reserved id)"
            )
    return mask


def pad_documents(docs: Sequence[Sequence[Sequence[int]]], padding_idx: int = 0,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Ragged documents (lists of sentences of token ids) -> ``ids (B, S, T)`` and ``mask (B, S, T)``.

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


@dataclass(frozen=True)
class PlantedWordDocuments:
    """Synthetic documents whose class is decided by one planted word in one sentence.

    A document has ``S`` sentences (uniform in ``sentences``) of ``T_i`` words
    (uniform in ``words``), every word a random *filler* id. One position, in
    one sentence, holds a *cue* word instead; the ``cues_per_class`` cue words
    of class ``c`` all mean class ``c``. Everything else is noise, so a
    classifier must find that one word: the ideal attention puts all the
    sentence weight on the planted sentence and all its word weight on the cue.

    Vocabulary: ``0`` padding, ``1..n_filler`` fillers, then the cue words.
    ``sample`` returns ``ids, mask (B, S_max, T_max)``, ``y (B,)``, and the
    planted ``sentence (B,)`` and ``word (B,)`` positions.
    """

    n_classes: int = 4
    cues_per_class: int = 2
    n_filler: int = 40
    sentences: tuple[int, int] = (3, 6)
    words: tuple[int, int] = (4, 9)

    def __post_init__(self) -> None:
        for name, (lo, hi) in (("sentences", self.sentences), ("words", self.words)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
        if self.n_classes < 2 or self.cues_per_class < 1 or self.n_filler < 1:
            raise ValueError("need n_classes >= 2, cues_per_class >= 1, n_filler >= 1")

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_filler + self.n_classes * self.cues_per_class

    def cue_class(self, token: int) -> int | None:
        """The class a token id means (``None`` for padding and fillers)."""
        first = 1 + self.n_filler
        return None if token < first else (token - first) // self.cues_per_class

    def sample(self, batch_size: int, generator: torch.Generator | None = None, num_sentences: int | None = None) -> dict[str, Tensor]:
        """A batch of documents (``num_sentences`` fixes ``S`` for every document: the cost sweep)."""
        g = generator
        s_lo, s_hi = (num_sentences, num_sentences) if num_sentences is not None else self.sentences
        s_max, t_max = s_hi, self.words[1]
        n_sent = torch.randint(s_lo, s_hi + 1, (batch_size,), generator=g)  # (B,)
        n_word = torch.randint(self.words[0], self.words[1] + 1, (batch_size, s_max), generator=g)  # (B, S)
        sent_real = torch.arange(s_max) < n_sent[:, None]  # (B, S)
        mask = (torch.arange(t_max) < n_word[..., None]) & sent_real[..., None]  # (B, S, T)
        ids = torch.randint(1, self.n_filler + 1, (batch_size, s_max, t_max), generator=g) * mask
        sentence = (torch.rand(batch_size, generator=g) * n_sent).long()  # planted sentence, < n_sent
        rows = torch.arange(batch_size)
        word = (torch.rand(batch_size, generator=g) * n_word[rows, sentence]).long()  # planted word
        y = torch.randint(0, self.n_classes, (batch_size,), generator=g)
        cue = 1 + self.n_filler + y * self.cues_per_class + torch.randint(0, self.cues_per_class, (batch_size,), generator=g)
        ids[rows, sentence, word] = cue
        return {"ids": ids, "mask": mask, "y": y, "sentence": sentence, "word": word}


@register(
    "hierarchical",
    paper="Yang et al. 2016",
    complexity="O(N h^2)",
    chapter=16,
    data="document",
    summary="HAN: biGRU + context-vector attention over words, then over sentences",
    task=lambda preset: make_task(preset),
)
class HierarchicalAttentionNetwork(nn.Module):
    """Hierarchical attention network (Yang et al. 2016) for document classification.

    Word embedding -> bidirectional GRU -> word attention (per sentence) ->
    bidirectional GRU over the sentence vectors -> sentence attention -> linear
    classifier. See the module docstring for the equations.

    Shapes: ``ids (B, S, T)`` integer, ``mask (B, S, T)`` boolean (``True`` =
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

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 32, hidden: int = 32,
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
        return level(h, mask) if self.pooling == "attention" else _masked_mean(h, mask)

    def forward(self, ids: Tensor, mask: Tensor | None = None, need_weights: bool = False) -> HANOutput:
        """``ids (B, S, T)``, ``mask (B, S, T)`` -> :class:`HANOutput` (logits ``(B, C)``, weights if asked)."""
        mask = check_documents(ids, mask, self.vocab_size, self.padding_idx)
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


def han_loss(model: HierarchicalAttentionNetwork, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the class and the accuracy, for :func:`attn.train.train`."""
    logits = model(batch["ids"], batch["mask"]).logits
    loss = F.cross_entropy(logits, batch["y"])
    return loss, {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


@torch.no_grad()
def planted_mass(model: HierarchicalAttentionNetwork, batch: dict[str, Tensor]) -> dict[str, float]:
    """Accuracy and the mean attention mass on the planted sentence and, inside it, on the planted word."""
    out = model(batch["ids"], batch["mask"], need_weights=True)
    rows = torch.arange(batch["y"].shape[0], device=batch["y"].device)
    sent_mass = out.sentence_weights[rows, batch["sentence"]]
    word_mass = out.word_weights[rows, batch["sentence"], batch["word"]]
    return {"acc": float((out.logits.argmax(-1) == batch["y"]).float().mean()),
            "sentence mass": float(sent_mass.mean()), "word mass": float(word_mass.mean())}


_PRESETS = {  # steps, batch, cost sweep (sentences per document)
    "quick": (20, 16, (2, 4, 8)),
    "book": (150, 32, (4, 8, 16, 32)),
    "default": (400, 32, (4, 8, 16, 32, 64)),
    "gpu": (1000, 64, (8, 16, 32, 64, 128, 256)),
}


def make_task(preset: str = "default") -> OwnTask[HierarchicalAttentionNetwork]:
    """The planted-word document task for the comparison (``python -m attn compare``).

    Learning: a HAN (embed 32, GRU 32 per direction) classifies
    :class:`PlantedWordDocuments` (4 classes). Cost: the same network on a
    batch of 8 documents of ``size`` sentences of 4 to 9 words.
    """
    if preset not in _PRESETS:
        raise ValueError(f"preset must be one of {sorted(_PRESETS)}, got {preset!r}")
    steps, batch, sizes = _PRESETS[preset]
    docs = PlantedWordDocuments()
    model = HierarchicalAttentionNetwork(docs.vocab_size, docs.n_classes)
    layer = HierarchicalAttentionNetwork(docs.vocab_size, docs.n_classes)

    def inputs(size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        b = docs.sample(8, generator, num_sentences=size)
        dev = layer.classifier.weight.device
        return b["ids"].to(dev), b["mask"].to(dev)

    def weights(m: HierarchicalAttentionNetwork, b: dict[str, Tensor]) -> Tensor:
        return m(b["ids"], b["mask"], need_weights=True).sentence_weights  # (B, S), rows sum to 1

    return OwnTask(
        description=f"document classification, one planted word in {docs.sentences[0]}-{docs.sentences[1]} sentences",
        model=model, sample=docs.sample, loss=han_loss, layer=layer, inputs=inputs, sizes=sizes,
        size_unit="sentences", steps=steps, batch_size=batch, lr=1e-2, log_every=10, target_acc=0.9,
        weights=weights,
    )
