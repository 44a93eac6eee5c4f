"""Chapter 16's experiments (hierarchical attention): planted-word documents, the loss, the attention mass, the own task.

The network is :class:`attn.hierarchical.HierarchicalAttentionNetwork`; here,
what the chapter does with it: :class:`PlantedWordDocuments` (one cue word
decides the class), :func:`han_loss`, :func:`planted_mass` and the
comparison's own task for ``hierarchical`` (:data:`OWN_TASKS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hierarchical import ContextAttention, HANOutput, HierarchicalAttentionNetwork, _run_gru, check_documents
from ..registry import OwnTask
from ..train import History, set_seed, train
from . import sized

__all__ = [
    "PlantedWordDocuments",
    "TriggeredCueDocuments",
    "FlatAttentionNetwork",
    "han_loss",
    "planted_mass",
    "train_document_model",
    "document_accuracy",
    "make_task",
    "OWN_TASKS",
]


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


@dataclass(frozen=True)
class TriggeredCueDocuments:
    """Documents with conflicting cues: only the sentence that holds the *trigger* word decides the class.

    A document has ``S`` sentences (uniform in ``sentences``) of ``T_i`` words
    (uniform in ``words``) of random fillers. ``cue_sentences`` distinct
    sentences each hold one cue word, of ``cue_sentences`` *different* classes;
    one of those sentences also holds the trigger word (id :attr:`trigger`), and
    the class of *its* cue is the label. Every document thus contains cues of
    the right class and of wrong ones, equally many of each: a model must select
    the triggered sentence and read the cue inside it. An average over the
    sentences mixes every cue with the same weight; it can still win only if
    the word encoder learns to silence an untriggered cue before the pooling.

    Vocabulary: ``0`` padding, ``1..n_filler`` fillers, the trigger, then the
    cue words (``cues_per_class`` per class). ``sample`` returns
    ``ids, mask (B, S_max, T_max)``, ``y (B,)``, the decisive ``sentence (B,)``
    and the ``word (B,)`` position of its cue, and ``cue_sentences (B, k)``.
    """

    n_classes: int = 4
    cues_per_class: int = 2
    n_filler: int = 40
    sentences: tuple[int, int] = (4, 6)
    words: tuple[int, int] = (4, 9)
    cue_sentences: int = 3

    def __post_init__(self) -> None:
        for name, (lo, hi) in (("sentences", self.sentences), ("words", self.words)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
        if self.n_classes < 2 or self.cues_per_class < 1 or self.n_filler < 1:
            raise ValueError("need n_classes >= 2, cues_per_class >= 1, n_filler >= 1")
        if not 2 <= self.cue_sentences <= min(self.n_classes, self.sentences[0]):
            raise ValueError(f"cue_sentences must lie in [2, min(n_classes, sentences[0])], got {self.cue_sentences}")
        if self.words[0] < 2:
            raise ValueError("a sentence needs room for the cue and the trigger: words[0] >= 2")

    @property
    def trigger(self) -> int:
        return 1 + self.n_filler

    @property
    def vocab_size(self) -> int:
        return 2 + self.n_filler + self.n_classes * self.cues_per_class

    def cue_class(self, token: int) -> int | None:
        """The class a token id means (``None`` for padding, fillers and the trigger)."""
        first = 2 + self.n_filler
        return None if token < first else (token - first) // self.cues_per_class

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        g, k, B = generator, self.cue_sentences, batch_size
        s_max, t_max = self.sentences[1], self.words[1]
        n_sent = torch.randint(self.sentences[0], s_max + 1, (B,), generator=g)  # (B,)
        n_word = torch.randint(self.words[0], t_max + 1, (B, s_max), generator=g)  # (B, S)
        sent_real = torch.arange(s_max) < n_sent[:, None]
        mask = (torch.arange(t_max) < n_word[..., None]) & sent_real[..., None]  # (B, S, T)
        ids = torch.randint(1, self.n_filler + 1, (B, s_max, t_max), generator=g) * mask
        # k distinct real sentences (random order of the real ones), k distinct classes
        order = torch.rand(B, s_max, generator=g).masked_fill(~sent_real, 2.0).argsort(-1)[:, :k]  # (B, k)
        classes = torch.rand(B, self.n_classes, generator=g).argsort(-1)[:, :k]  # (B, k)
        rows = torch.arange(B)
        cue_word = torch.empty(B, k, dtype=torch.long)
        trig_word = torch.zeros(B, dtype=torch.long)
        for j in range(k):
            length = n_word[rows, order[:, j]]
            cue_word[:, j] = (torch.rand(B, generator=g) * length).long()
            cue = 2 + self.n_filler + classes[:, j] * self.cues_per_class
            cue = cue + torch.randint(0, self.cues_per_class, (B,), generator=g)
            ids[rows, order[:, j], cue_word[:, j]] = cue
        # the trigger: in sentence order[:, 0], at another word than its cue
        length = n_word[rows, order[:, 0]]
        shift = 1 + (torch.rand(B, generator=g) * (length - 1)).long()  # 1 .. length-1
        trig_word = (cue_word[:, 0] + shift) % length
        ids[rows, order[:, 0], trig_word] = self.trigger
        return {"ids": ids, "mask": mask, "y": classes[:, 0], "sentence": order[:, 0], "word": cue_word[:, 0],
                "cue_sentences": order}


class FlatAttentionNetwork(nn.Module):
    r"""The flat baseline: one bidirectional GRU over all the words of the document, one context-vector attention.

    HAN without the sentence level: the real words of each document, in order,
    form one sequence (packed), encoded by a BiGRU and pooled by the same
    attention :math:`\alpha_t = \operatorname{softmax}_t(\tanh(W h_t + b)^\top u)`
    over all ``N`` words, then classified. Same widths as HAN, so it has fewer
    parameters (no sentence GRU and attention). Yang et al. 2016 compare with
    flat models of this kind (section 3.2.3, their neural-network baselines).

    Shapes: ``ids (B, S, T)``, ``word_mask (B, S, T)`` -> ``logits (B, C)``;
    with ``need_weights`` also the word weights ``(B, S, T)`` (zeros on padding).
    """

    def __init__(self, vocab_size: int, num_classes: int, *, embed_dim: int = 32, hidden: int = 32,
                 padding_idx: int | None = 0) -> None:
        super().__init__()
        self.vocab_size, self.padding_idx = vocab_size, padding_idx
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.encoder = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.attention = ContextAttention(2 * hidden)
        self.classifier = nn.Linear(2 * hidden, num_classes)

    def forward(self, ids: Tensor, *, word_mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        mask = check_documents(ids, word_mask, self.vocab_size, self.padding_idx)
        B, S, T = ids.shape
        flat_mask = mask.reshape(B, S * T)
        # real words first, in document order: a stable sort of "is padding"
        order = (~flat_mask).to(torch.int8).argsort(dim=-1, stable=True)  # (B, S*T)
        lengths = flat_mask.sum(-1).clamp(min=1)  # (B,)
        seq = ids.reshape(B, S * T).gather(1, order)
        seq_mask = torch.arange(S * T, device=ids.device) < flat_mask.sum(-1, keepdim=True)
        h = _run_gru(self.encoder, self.embed(seq), lengths)  # (B, S*T, 2h)
        v, w = self.attention(h, key_mask=seq_mask)
        logits = self.classifier(v)
        if not need_weights:
            return logits, None
        assert w is not None
        back = w.new_zeros(B, S * T).scatter(1, order, w)  # weights back at the words' (S, T) slots
        return logits, back.view(B, S, T)


DocumentModel = HierarchicalAttentionNetwork | FlatAttentionNetwork


def _logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = model(batch["ids"], word_mask=batch["mask"])
    return out.logits if isinstance(out, HANOutput) else out[0]


def train_document_model(
    arm: str,
    docs: TriggeredCueDocuments | PlantedWordDocuments,
    *,
    seed: int,
    steps: int,
    batch_size: int = 32,
    lr: float = 1.5e-2,
    embed_dim: int = 16,
    hidden: int = 16,
    log_every: int = 5,
    callback: Callable[[int, nn.Module], object] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, History]:
    """Train one arm (``"HAN"``, ``"average pooling"`` or ``"flat attention"``) with Adam, seeded.

    Every arm sees the same batches for a given ``seed`` (:func:`attn.train.train` draws them
    from its own generator) and starts from ``set_seed(seed)``. Returns the model (on the CPU)
    and its training :class:`~attn.train.History` (logged every ``log_every`` steps, for
    steps-to-target).
    """

    set_seed(seed)
    model: nn.Module
    if arm == "flat attention":
        model = FlatAttentionNetwork(docs.vocab_size, docs.n_classes, embed_dim=embed_dim, hidden=hidden)
    elif arm in ("HAN", "average pooling"):
        model = HierarchicalAttentionNetwork(docs.vocab_size, docs.n_classes, embed_dim=embed_dim, hidden=hidden,
                                             pooling="attention" if arm == "HAN" else "mean")
    else:
        raise ValueError(f"arm must be 'HAN', 'average pooling' or 'flat attention', got {arm!r}")
    hist = train(model, docs.sample, document_loss, steps, batch_size, lr, seed=seed, device=device, progress=False,
                 log_every=log_every, callback=callback)
    return model.cpu(), hist


def document_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy and accuracy for any of the chapter's document models (HAN or flat)."""
    logits = _logits(model, batch)
    return F.cross_entropy(logits, batch["y"]), {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


@torch.no_grad()
def document_accuracy(model: nn.Module, batch: dict[str, Tensor]) -> float:
    """Accuracy of a trained document model on a held-out batch."""
    model.eval()
    return float((_logits(model, batch).argmax(-1) == batch["y"]).float().mean())


def han_loss(model: HierarchicalAttentionNetwork, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the class and the accuracy, for :func:`attn.train.train`."""
    logits = model(batch["ids"], word_mask=batch["mask"]).logits
    loss = F.cross_entropy(logits, batch["y"])
    return loss, {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}


@torch.no_grad()
def planted_mass(model: HierarchicalAttentionNetwork, batch: dict[str, Tensor]) -> dict[str, float]:
    """Accuracy and the mean attention mass on the planted sentence and, inside it, on the planted word."""
    out = model(batch["ids"], word_mask=batch["mask"], need_weights=True)
    assert out.sentence_weights is not None and out.word_weights is not None  # need_weights=True returns both
    rows = torch.arange(batch["y"].shape[0], device=batch["y"].device)
    sent_mass = out.sentence_weights[rows, batch["sentence"]]
    word_mass = out.word_weights[rows, batch["sentence"], batch["word"]]
    return {"acc": float((out.logits.argmax(-1) == batch["y"]).float().mean()),
            "sentence mass": float(sent_mass.mean()), "word mass": float(word_mass.mean())}


class _PositionalMask(nn.Module):
    """The network as the comparison's cost sweep calls a layer, ``layer(*inputs)``: ``(ids, word_mask)`` positional.

    (:meth:`HierarchicalAttentionNetwork.forward` takes ``word_mask`` by keyword only.)
    """

    def __init__(self, net: HierarchicalAttentionNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids: Tensor, word_mask: Tensor) -> HANOutput:
        out: HANOutput = self.net(ids, word_mask=word_mask)
        return out


def make_task(size: str = "full") -> OwnTask[HierarchicalAttentionNetwork]:
    """The planted-word document task for the comparison (``python -m attn compare``), at ``size`` (``attn.experiments.SIZES``).

    Learning: a HAN (embed 32, GRU 32 per direction) classifies
    :class:`PlantedWordDocuments` (4 classes). Cost: the same network on a
    batch of 8 documents of ``n`` sentences of 4 to 9 words, for each ``n`` of the sweep.
    """
    steps, batch, sizes = sized(  # steps, batch, cost sweep (sentences per document)
        size,
        quick=(20, 16, (2, 4, 8)),
        book=(150, 32, (4, 8, 16, 32)),
        full=(400, 32, (4, 8, 16, 32, 64)),
        large=(1000, 64, (8, 16, 32, 64, 128, 256)),
    )
    docs = PlantedWordDocuments()
    model = HierarchicalAttentionNetwork(docs.vocab_size, docs.n_classes)
    layer = _PositionalMask(HierarchicalAttentionNetwork(docs.vocab_size, docs.n_classes))

    def inputs(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        b = docs.sample(8, generator, num_sentences=n)
        dev = layer.net.classifier.weight.device
        return b["ids"].to(dev), b["mask"].to(dev)

    def weights(m: HierarchicalAttentionNetwork, b: dict[str, Tensor]) -> Tensor:
        w = m(b["ids"], word_mask=b["mask"], need_weights=True).sentence_weights  # (B, S), rows sum to 1
        assert w is not None  # asked for
        return w

    return OwnTask(
        description=f"document classification, one planted word in {docs.sentences[0]}-{docs.sentences[1]} sentences",
        model=model, sample=docs.sample, loss=han_loss, layer=layer, inputs=inputs, sizes=sizes,
        size_unit="sentences", steps=steps, batch_size=batch, lr=1e-2, log_every=10, target_acc=0.9,
        weights=weights,
    )


#: the comparison's own task of chapter 16: ``factory(size) -> OwnTask``
OWN_TASKS: dict[str, Callable[[str], OwnTask[HierarchicalAttentionNetwork]]] = {"hierarchical": make_task}
