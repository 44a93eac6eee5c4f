"""The registry: every chapter of the book, and the mechanisms implemented so far.

``CHAPTERS`` is the book's plan (all 23 chapters, from ``MECHANISMS.md``).
``MECHANISMS`` holds the implemented ones, added by :func:`register` in each
mechanism's module. The intro page's chapter map and the comparison read both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, TypeVar

from torch import nn

__all__ = ["Chapter", "Mechanism", "CHAPTERS", "MECHANISMS", "register", "get", "chapter", "mechanisms"]


@dataclass(frozen=True)
class Chapter:
    """One chapter of the book: number, slug (notebook stem), title and papers."""

    number: int
    slug: str
    title: str
    papers: str

    @property
    def notebook(self) -> str:
        """Path of the chapter notebook, relative to the repository root."""
        return f"notebooks/{self.number:02d}_{self.slug}.ipynb"


@dataclass(frozen=True)
class Mechanism:
    """An implemented mechanism.

    Attributes:
        name: short registry key (``--mode`` in the comparison).
        cls: the ``nn.Module`` implementing it.
        paper: the canonical citation, ``"Author et al. YEAR"``.
        complexity: time complexity in the sequence length, e.g. ``"O(n^2 d)"``.
        chapter: chapter number in :data:`CHAPTERS`.
        data: the kind of input it works on (``"sequence"``, ``"graph"``, ...).
        summary: one line on what it does.
        build: for sequence mechanisms, ``build(embed_dim, num_heads) -> nn.Module``
            giving a token-mixing layer whose ``forward(x (B, n, E), need_weights=False)``
            returns an :class:`~attn.core.AttentionOutput` with output ``(B, n, E)``.
            The comparison (``python -m attn compare``) plugs it into its task
            models; ``None`` for mechanisms with their own data kind.
    """

    name: str
    cls: type[nn.Module]
    paper: str
    complexity: str
    chapter: int
    data: str = "sequence"
    summary: str = ""
    build: Callable[[int, int], nn.Module] | None = field(default=None, compare=False, hash=False)


CHAPTERS: tuple[Chapter, ...] = (
    Chapter(1, "soft_attention", "Soft attention", "Bahdanau et al. 2015; Luong et al. 2015"),
    Chapter(2, "self_attention", "Self-attention", "Vaswani et al. 2017"),
    Chapter(3, "multi_head_attention", "Multi-head attention", "Vaswani et al. 2017"),
    Chapter(4, "cross_attention", "Cross-attention", "Vaswani et al. 2017"),
    Chapter(5, "global_attention", "Global attention", "Luong et al. 2015; Beltagy et al. 2020"),
    Chapter(6, "local_attention", "Local attention", "Luong et al. 2015; Beltagy et al. 2020"),
    Chapter(7, "hierarchical_attention", "Hierarchical attention", "Yang et al. 2016"),
    Chapter(8, "sparse_attention", "Sparse attention", "Child et al. 2019; Zhao et al. 2019; Martins & Astudillo 2016; Peters et al. 2019"),
    Chapter(9, "convolutional_attention", "Convolutional attention", "Woo et al. 2018; So et al. 2021"),
    Chapter(10, "gated_attention", "Gated attention", "Qiu et al. 2025; Hua et al. 2022; Ilse et al. 2018"),
    Chapter(11, "adversarial_attention", "Adversarial attention", "Miyato et al. 2017; Kitada & Iyatomi 2021"),
    Chapter(12, "graph_attention", "Graph attention", "Velickovic et al. 2018; Brody et al. 2022"),
    Chapter(13, "hard_attention", "Hard attention", "Xu et al. 2015; Jang et al. 2017"),
    Chapter(14, "transformer_xl", "Transformer-XL recurrence", "Dai et al. 2019"),
    Chapter(15, "bert_bidirectional", "BERT bidirectional attention", "Devlin et al. 2019"),
    Chapter(16, "hybrid_attention", "Hybrid attention", "Zaheer et al. 2020; Beltagy et al. 2020"),
    Chapter(17, "co_attention", "Co-attention", "Lu et al. 2016; Xiong et al. 2017"),
    Chapter(18, "axial_attention", "Axial attention", "Ho et al. 2019"),
    Chapter(19, "frequency_attention", "Frequency-domain attention", "Lee-Thorp et al. 2022; Zhou et al. 2022"),
    Chapter(20, "attention_distillation", "Attention distillation", "Wang et al. 2020; Jiao et al. 2020; Zagoruyko & Komodakis 2017"),
    Chapter(21, "attention_pooling", "Attention pooling", "Nadaraya 1964; Watson 1964; Lee et al. 2019"),
    Chapter(22, "adaptive_attention", "Adaptive attention", "Sukhbaatar et al. 2019; Lu et al. 2017"),
    Chapter(23, "memory_attention", "Memory-augmented attention", "Sukhbaatar et al. 2019; Wu et al. 2022"),
)

MECHANISMS: dict[str, Mechanism] = {}

M = TypeVar("M", bound=type[nn.Module])


def register(
    name: str,
    *,
    paper: str,
    complexity: str,
    chapter: int,
    data: str = "sequence",
    summary: str = "",
    build: Callable[[int, int], nn.Module] | None = None,
) -> Callable[[M], M]:
    """Class decorator: add a mechanism to :data:`MECHANISMS` under ``name``."""

    def deco(cls: M) -> M:
        if name in MECHANISMS and MECHANISMS[name].cls is not cls:
            raise ValueError(f"mechanism {name!r} is already registered by {MECHANISMS[name].cls.__qualname__}")
        if not any(c.number == chapter for c in CHAPTERS):
            raise ValueError(f"chapter {chapter} is not in CHAPTERS (1..{len(CHAPTERS)})")
        MECHANISMS[name] = Mechanism(
            name, cls, paper, complexity, chapter, data,
            summary or next(iter((cls.__doc__ or "").strip().splitlines()), ""),
            build,
        )
        return cls

    return deco


def get(name: str) -> Mechanism:
    """The registered mechanism ``name``; a ``KeyError`` lists the valid names."""
    try:
        return MECHANISMS[name]
    except KeyError:
        raise KeyError(f"unknown mechanism {name!r}; registered: {', '.join(sorted(MECHANISMS))}") from None


def chapter(number: int) -> Chapter:
    """The chapter with this number."""
    for c in CHAPTERS:
        if c.number == number:
            return c
    raise KeyError(f"no chapter {number}; chapters are 1..{len(CHAPTERS)}")


def mechanisms(chapter_number: int | None = None) -> list[Mechanism]:
    """Registered mechanisms, in chapter order, optionally only those of one chapter."""
    ms = sorted(MECHANISMS.values(), key=lambda m: (m.chapter, m.name))
    return [m for m in ms if chapter_number is None or m.chapter == chapter_number]
