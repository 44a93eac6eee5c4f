"""attn: attention mechanisms, implemented for real and checked against references.

The package behind *The Attention Book*. One module per mechanism; the shared
pieces live once:

* :mod:`attn.masks` -- mask constructors; boolean ``True`` = *may attend* everywhere;
* :mod:`attn.core` -- the scaled-dot-product core (fused SDPA path when no weights are needed);
* :mod:`attn.registry` -- the 23 chapters and the registered mechanisms;
* :mod:`attn.benchmark` -- timing, FLOPs, peak memory, sweeps with fitted exponents;
* :mod:`attn.plotting`, :mod:`attn.widgets` -- heatmaps, curves, the attention explorer;
* :mod:`attn.tasks`, :mod:`attn.train` -- synthetic tasks and a small seeded trainer.
"""

from . import masks
from .bert import BidirectionalSelfAttention
from .core import AttentionOutput, masked_softmax, scaled_dot_product_attention
from .cross import CrossAttention, LatentCrossAttention
from .global_attention import GlobalTokenAttention, LuongGlobalAttention, LuongSeq2Seq
from .local import LocalAttention, LocalPAttention, local_attention
from .multihead import MultiHeadAttention
from .registry import CHAPTERS, MECHANISMS, chapter, get, mechanisms
from .self_attention import SelfAttention
from .sparse import SparseAttention, TopKAttention
from .sparsemax import EntmaxAttention, SparsemaxAttention
from .soft import AdditiveAttention, MultiplicativeAttention, Seq2SeqAttention

__version__ = "0.1.0"

__all__ = [
    "masks",
    "AttentionOutput",
    "masked_softmax",
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
    "CHAPTERS",
    "MECHANISMS",
    "chapter",
    "get",
    "mechanisms",
]
