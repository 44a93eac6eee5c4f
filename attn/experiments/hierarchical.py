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

from ..hierarchical import HANOutput, HierarchicalAttentionNetwork
from ..registry import OwnTask
from . import sized

__all__ = ["PlantedWordDocuments", "han_loss", "planted_mass", "make_task", "OWN_TASKS"]


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
