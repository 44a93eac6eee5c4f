"""attn: attention mechanisms, implemented for real and checked against references.

The package behind *The Attention Book*. One module per mechanism; the shared
pieces live once:

* :mod:`attn.masks` -- mask constructors; boolean ``True`` = *may attend* everywhere;
* :mod:`attn.core` -- the scaled-dot-product core (fused SDPA path when no weights are needed);
* :mod:`attn.attention` -- the one attention module (:class:`Attention`), the kernel registry and the
  sequence-mixer protocol every token mixer follows;
* :mod:`attn.registry` -- the book's parts and chapters (one numbering) and the registered mechanisms;
* :mod:`attn.checks` -- the input checks every layer calls first;
* :mod:`attn.benchmark` -- timing, FLOPs, peak memory, sweeps with fitted exponents;
* :mod:`attn.plotting`, :mod:`attn.widgets` -- heatmaps, curves, the attention explorer;
* :mod:`attn.tasks`, :mod:`attn.train` -- synthetic tasks and a small seeded trainer;
* :mod:`attn.experiments` -- each chapter's tasks, task models and losses, apart from its layers;
* :mod:`attn.compare` -- every mechanism measured on the same axes.
"""

from . import masks
from .adaptive import AdaptiveSpanAttention, SentinelAttention
from .adversarial import AttentionPooling
from .attention import KERNELS, Attention, SequenceMixer, get_kernel, register_kernel
from .attention_pooling import PMA, AttentionPool, NadarayaWatson
from .axial import AxialAttention
from .bert import BidirectionalSelfAttention
from .co_attention import AlternatingCoAttention, DCNCoAttention, ParallelCoAttention
from .convolutional import CBAM, MultiDConvHeadAttention
from .core import AttentionOutput, masked_softmax, scaled_dot_product_attention
from .cross import CrossAttention, LatentCrossAttention
from .differential import DifferentialAttention, SinkCache
from .distillation import RecordingAttention
from .experiments.adversarial import AttentionClassifier  # chapter 22's task model (the layer: AttentionPooling)
from .experiments.distillation import Distiller  # chapter 23's teacher-student pair (the layer: RecordingAttention)
from .flash import FlashAttention, flash_attention, merge_partial_attention
from .frequency import FourierMixing, FrequencyEnhancedAttention, FrequencyEnhancedBlock
from .gated import GatedAttention, GatedAttentionUnit, GatedMILPooling
from .global_attention import GlobalTokenAttention, LuongGlobalAttention, LuongSeq2Seq
from .gqa import GroupedQueryAttention, KVCache
from .graph import GraphAttention, GraphAttentionV2
from .hard import HardAttention, HardSelfAttention
from .hierarchical import ContextAttention, HierarchicalAttentionNetwork
from .hybrid import BigBirdAttention
from .latent import LatentCache, MultiHeadLatentAttention
from .linear import LinearAttention, PerformerAttention, linear_attention
from .local import LocalAttention, LocalPAttention, local_attention
from .memory_attention import KNNMemory, MemorizingAttention, PersistentMemoryAttention
from .multihead import MultiHeadAttention
from .positions import PositionalAttention, RotaryEmbedding, alibi_bias
from .registry import CHAPTERS, MECHANISMS, chapter, get, mechanisms
from .self_attention import SelfAttention
from .soft import AdditiveAttention, MultiplicativeAttention, Seq2SeqAttention
from .sparse import SparseAttention, TopKAttention
from .sparsemax import EntmaxAttention, SparsemaxAttention
from .transformer_xl import TransformerXLAttention

__version__ = "0.1.0"

__all__ = [
    "masks",
    "AttentionOutput",
    "masked_softmax",
    "Attention",
    "SequenceMixer",
    "KERNELS",
    "get_kernel",
    "register_kernel",
    "scaled_dot_product_attention",
    "MultiHeadAttention",
    "CrossAttention",
    "LatentCrossAttention",
    "GlobalTokenAttention",
    "LuongGlobalAttention",
    "LuongSeq2Seq",
    "LocalAttention",
    "LocalPAttention",
    "local_attention",
    "BidirectionalSelfAttention",
    "SparseAttention",
    "TopKAttention",
    "EntmaxAttention",
    "SparsemaxAttention",
    "SelfAttention",
    "AdditiveAttention",
    "MultiplicativeAttention",
    "Seq2SeqAttention",
    "ParallelCoAttention",
    "AlternatingCoAttention",
    "DCNCoAttention",
    "BigBirdAttention",
    "AxialAttention",
    "FourierMixing",
    "FrequencyEnhancedBlock",
    "FrequencyEnhancedAttention",
    "AdaptiveSpanAttention",
    "SentinelAttention",
    "TransformerXLAttention",
    "PersistentMemoryAttention",
    "MemorizingAttention",
    "KNNMemory",
    "ContextAttention",
    "HierarchicalAttentionNetwork",
    "NadarayaWatson",
    "PMA",
    "AttentionPool",
    "GraphAttention",
    "GraphAttentionV2",
    "CBAM",
    "MultiDConvHeadAttention",
    "GatedAttention",
    "GatedAttentionUnit",
    "GatedMILPooling",
    "HardAttention",
    "HardSelfAttention",
    "AttentionClassifier",
    "AttentionPooling",
    "Distiller",
    "RecordingAttention",
    "FlashAttention",
    "flash_attention",
    "merge_partial_attention",
    "LinearAttention",
    "PerformerAttention",
    "linear_attention",
    "GroupedQueryAttention",
    "KVCache",
    "PositionalAttention",
    "RotaryEmbedding",
    "alibi_bias",
    "MultiHeadLatentAttention",
    "LatentCache",
    "DifferentialAttention",
    "SinkCache",
    "CHAPTERS",
    "MECHANISMS",
    "chapter",
    "get",
    "mechanisms",
]
