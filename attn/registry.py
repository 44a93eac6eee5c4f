"""The registry: every chapter of the book, and the mechanisms implemented so far.

``CHAPTERS`` is the book's plan in reading order: the 23 mechanism chapters
(from ``MECHANISMS.md``), the comparison, and "Attention today"; ``PARTS``
groups them. Their numbers are the book's one numbering: file names
(``notebooks/NN_slug``), page titles, the sidebar, the intro's map, ``python -m
attn list`` and the comparison all read it from here (``_toc.yml`` is
generated from it by ``book/build.py sync``). ``MECHANISMS`` holds the
implemented mechanisms, added by :func:`register` in each mechanism's module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "Chapter", "Mechanism", "OwnTask", "PARTS", "CHAPTERS", "MECHANISM_CHAPTERS", "MECHANISMS",
    "register", "get", "chapter", "mechanisms", "load_all", "part_of",
]


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
        kernel: the registered attention kernel (:func:`attn.attention.get_kernel`) the mechanism's
            :class:`~attn.attention.Attention` runs, or ``None`` for a mechanism that is not one kernel
            around projections.
        causal: whether ``build``'s layer is causal as built (query ``i`` sees keys ``<= i`` unless
            ``is_causal=False`` is passed); ``None`` for mechanisms without ``build``.
    """

    name: str
    cls: type[nn.Module]
    paper: str
    complexity: str
    chapter: int
    data: str = "sequence"
    summary: str = ""
    build: Callable[[int, int], nn.Module] | None = field(default=None, compare=False, hash=False)
    kernel: str | None = None
    causal: bool | None = None

    @property
    def own_task(self) -> Callable[[str], OwnTask[Any]] | None:
        """``make(size) -> OwnTask``: the mechanism's own task, declared in ``attn.experiments`` (or ``None``)."""
        from .experiments import own_tasks  # the experiments load on demand: layers never import them

        return own_tasks().get(self.name)


#: The model type of an :class:`OwnTask`: its ``loss`` and ``weights`` take that model class, not any ``nn.Module``.
M = TypeVar("M", bound=nn.Module)


@dataclass
class OwnTask(Generic[M]):
    """A mechanism's own task, for the comparison's second table (graphs, images, sets, documents, pairs).

    A mechanism whose input is not a token sequence declares, in its chapter's
    experiment module ``attn/experiments/<module>.py``, ``OWN_TASKS =
    {"<name>": make}`` where ``make(size) -> OwnTask`` and ``size`` is one of
    ``attn.experiments.SIZES`` (``"quick"``, ``"book"``, ``"full"``,
    ``"large"``; a comparison preset names the size it wants). The comparison
    then measures it on the same axes as the sequence mechanisms:

    * **learning**: ``model`` is trained with :func:`attn.train.train` on
      batches from ``sample(batch_size, generator)`` with ``loss(model, batch)
      -> (loss, {"acc": ...})`` for ``steps`` steps (same seed, same batches for
      every run), then evaluated on a held-out batch: accuracy, convergence
      (first logged step whose training accuracy reaches ``target_acc``), the
      loss curve;
    * **cost of the attention layer alone**: ``layer`` is called as
      ``layer(*inputs(size, generator))`` for each size in ``sizes`` (the axis
      its cost grows along: nodes, pixels, set elements, sentences; named by
      ``size_unit``): parameters, FLOPs, median latency, peak memory and the
      fitted growth exponents; the fixed-size row is the largest size;
    * **how it attends** (optional): ``weights(model, batch)`` returns
      attention rows ``(..., n_keys)`` that sum to 1 (padding rows all zero),
      whose mean entropy is reported.

    Attributes:
        description: one line naming the task, e.g. ``"node classification, 2-block SBM"``.
    """

    description: str
    model: M
    sample: Callable[[int, torch.Generator], dict[str, Tensor]]
    loss: Callable[[M, dict[str, Tensor]], tuple[Tensor, dict[str, float]]]
    layer: nn.Module
    inputs: Callable[[int, torch.Generator], tuple[Any, ...]]
    sizes: tuple[int, ...]
    size_unit: str = "n"
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    log_every: int = 10
    target_acc: float = 0.9
    eval_batch: int = 256
    weights: Callable[[M, dict[str, Tensor]], Tensor] | None = None


#: The book's parts, in reading order: (caption, chapter numbers).
PARTS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("Foundations", (1, 2, 3, 4, 5)),
    ("Masks and directions", (6, 7)),
    ("Long inputs", (8, 9, 10, 11, 12, 13)),
    ("Memory and recurrence", (14, 15)),
    ("Beyond sequences", (16, 17, 18, 19)),
    ("Training signals", (20, 21, 22, 23)),
    ("The comparison", (24,)),
    ("Attention today", (25, 26, 27, 28, 29, 30)),
)

CHAPTERS: tuple[Chapter, ...] = (
    Chapter(1, "soft_attention", "Soft attention", "Bahdanau et al. 2015; Luong et al. 2015"),
    Chapter(2, "self_attention", "Self-attention", "Vaswani et al. 2017"),
    Chapter(3, "multi_head_attention", "Multi-head attention", "Vaswani et al. 2017"),
    Chapter(4, "cross_attention", "Cross-attention", "Vaswani et al. 2017"),
    Chapter(5, "global_attention", "Global attention", "Luong et al. 2015; Beltagy et al. 2020"),
    Chapter(6, "bert_bidirectional", "BERT bidirectional attention", "Devlin et al. 2019"),
    Chapter(7, "co_attention", "Co-attention", "Lu et al. 2016; Xiong et al. 2017"),
    Chapter(8, "local_attention", "Local attention", "Luong et al. 2015; Beltagy et al. 2020"),
    Chapter(9, "sparse_attention", "Sparse attention", "Child et al. 2019; Zhao et al. 2019; Martins & Astudillo 2016; Peters et al. 2019"),
    Chapter(10, "hybrid_attention", "Hybrid attention", "Zaheer et al. 2020; Beltagy et al. 2020"),
    Chapter(11, "axial_attention", "Axial attention", "Ho et al. 2019"),
    Chapter(12, "frequency_attention", "Frequency-domain attention", "Lee-Thorp et al. 2022; Zhou et al. 2022"),
    Chapter(13, "adaptive_attention", "Adaptive attention", "Sukhbaatar et al. 2019; Lu et al. 2017"),
    Chapter(14, "transformer_xl", "Transformer-XL recurrence", "Dai et al. 2019"),
    Chapter(15, "memory_attention", "Memory-augmented attention", "Sukhbaatar et al. 2019; Wu et al. 2022"),
    Chapter(16, "hierarchical_attention", "Hierarchical attention", "Yang et al. 2016"),
    Chapter(17, "graph_attention", "Graph attention", "Velickovic et al. 2018; Brody et al. 2022"),
    Chapter(18, "convolutional_attention", "Convolutional attention", "Woo et al. 2018; So et al. 2021"),
    Chapter(19, "attention_pooling", "Attention pooling", "Nadaraya 1964; Watson 1964; Lee et al. 2019"),
    Chapter(20, "gated_attention", "Gated attention", "Qiu et al. 2025; Hua et al. 2022; Ilse et al. 2018"),
    Chapter(21, "hard_attention", "Hard attention", "Xu et al. 2015; Jang et al. 2017"),
    Chapter(22, "adversarial_attention", "Adversarial attention", "Miyato et al. 2017; Kitada & Iyatomi 2021"),
    Chapter(23, "attention_distillation", "Attention distillation", "Wang et al. 2020; Jiao et al. 2020; Zagoruyko & Komodakis 2017"),
    Chapter(24, "comparison", "The comparison", "all of the above"),
    Chapter(25, "flash_attention", "FlashAttention from scratch", "Dao et al. 2022; Milakov & Gimelshein 2018"),
    Chapter(26, "linear_attention", "Linear attention", "Katharopoulos et al. 2020; Choromanski et al. 2021"),
    Chapter(27, "gqa_kv_cache", "Grouped-query attention and the KV cache", "Shazeer 2019; Ainslie et al. 2023"),
    Chapter(28, "positions", "Positions in attention", "Vaswani et al. 2017; Su et al. 2021; Press et al. 2022"),
    Chapter(29, "latent_attention", "Multi-head latent attention", "DeepSeek-AI 2024"),
    Chapter(30, "differential_attention", "Differential attention and attention sinks", "Ye et al. 2024; Xiao et al. 2023"),
)

#: The 23 mechanism chapters of the original list (the comparison and "Attention today" come after them).
MECHANISM_CHAPTERS: tuple[int, ...] = tuple(range(1, 24))

MECHANISMS: dict[str, Mechanism] = {}

ClsT = TypeVar("ClsT", bound=type[nn.Module])


def register(
    name: str,
    *,
    paper: str,
    complexity: str,
    chapter: int,
    data: str = "sequence",
    summary: str = "",
    build: Callable[[int, int], nn.Module] | None = None,
    kernel: str | None = None,
    causal: bool | None = None,
) -> Callable[[ClsT], ClsT]:
    """Class decorator: add a mechanism to :data:`MECHANISMS` under ``name``.

    Sequence mechanisms give ``build(embed_dim, num_heads)`` (a token mixer the
    comparison drops into its recall model), ``kernel=`` (the registered kernel
    its :class:`~attn.attention.Attention` runs, or ``None``) and ``causal=``
    (whether the built layer is causal); mechanisms with their own kind of data
    declare their task in ``attn/experiments/<module>.py`` (``OWN_TASKS``, see
    :class:`OwnTask`).
    """

    def deco(cls: ClsT) -> ClsT:
        if name in MECHANISMS and MECHANISMS[name].cls is not cls:
            raise ValueError(f"mechanism {name!r} is already registered by {MECHANISMS[name].cls.__qualname__}")
        if not any(c.number == chapter for c in CHAPTERS):
            raise ValueError(f"chapter {chapter} is not in CHAPTERS (1..{len(CHAPTERS)})")
        if data != "sequence" and build is not None:
            raise ValueError(f"{name}: build is for sequence mechanisms; a {data!r} mechanism declares its own task "
                             "in attn/experiments (OWN_TASKS)")
        MECHANISMS[name] = Mechanism(
            name, cls, paper, complexity, chapter, data,
            summary or next(iter((cls.__doc__ or "").strip().splitlines()), ""),
            build,
            kernel,
            causal,
        )
        return cls

    return deco


def get(name: str) -> Mechanism:
    """The registered mechanism ``name``; a ``KeyError`` lists the valid names."""
    load_all()
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


def part_of(number: int) -> str:
    """The caption of the part that holds chapter ``number``."""
    for caption, numbers in PARTS:
        if number in numbers:
            return caption
    raise KeyError(f"chapter {number} is in no part")


_LOADED = False

#: modules of the package that register no mechanism: the book's tooling (plots, widgets, benchmarks, the
#: trainer, the comparison, the CLI). :func:`load_all` leaves them alone, so that ``attn.get(...)`` loads
#: neither matplotlib, anywidget nor pandas.
SUPPORT_MODULES = frozenset(
    {"benchmark", "checks", "compare", "core", "experiments", "masks", "models", "notebook", "plotting", "registry", "tasks",
     "train", "widgets"}
)


def load_all() -> None:
    """Import every module of the package, so that every mechanism is registered.

    A new mechanism module registers itself by being imported; this finds it
    without a list to keep in step (only the tooling in :data:`SUPPORT_MODULES` is skipped;
    a test checks that none of those registers anything).
    """
    global _LOADED
    if _LOADED:
        return
    import attn

    for info in pkgutil.iter_modules(attn.__path__):
        if not info.name.startswith("_") and info.name not in SUPPORT_MODULES:
            importlib.import_module(f"attn.{info.name}")
    _LOADED = True


def mechanisms(chapter_number: int | None = None) -> list[Mechanism]:
    """Registered mechanisms, in chapter order, optionally only those of one chapter."""
    load_all()
    ms = sorted(MECHANISMS.values(), key=lambda m: (m.chapter, m.name))
    return [m for m in ms if chapter_number is None or m.chapter == chapter_number]
