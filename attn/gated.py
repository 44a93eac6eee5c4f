r"""Chapter 20 -- Gated attention: a sigmoid gate multiplies what attention returns.

Three gates, three papers.

**Output gate after SDPA** (Qiu et al. 2025, "Gated Attention for Large
Language Models", position G1, elementwise and head-specific). With the
layer input ``X`` ``(B, n, E)``, head ``i``'s attention output
``O_i = softmax(Q_i K_i^T / sqrt(d_h)) V_i`` ``(B, n, d_h)`` is multiplied,
element by element, by a gate computed from the *query's own* input:

.. math::

    Y = \big[\, O_1 \odot \sigma(X W^G_1 + b^G_1) \;\|\; \dots \;\|\;
              O_h \odot \sigma(X W^G_h + b^G_h) \,\big]\, W^O ,
    \qquad W^G_i \in \mathbb{R}^{E \times d_h}

(``headwise``: one scalar gate per head and token, ``W^G_i \in \mathbb{R}^{E \times 1}``).
A gate of exactly 1 gives back multi-head attention; :attr:`GatedAttention.gate_offset`
adds a constant to the gate logits (``+inf``: the gate is 1 and the layer is
the ungated one, bit for bit). A gate can also *close*: a head can output
(almost) nothing for a token, which softmax alone cannot do without parking
its weight somewhere, the *attention sink* on the first token.

**Gated attention unit** (Hua et al. 2022, "Transformer Quality in Linear
Time", GAU). One head, one shared low-dimensional ``Z``:

.. math::

    U = \phi(X W_u),\; V = \phi(X W_v) \in \mathbb{R}^{n \times e}, \quad
    Z = \phi(X W_z) \in \mathbb{R}^{n \times s}, \quad
    Q = Z \odot \gamma_q + \beta_q,\; K = Z \odot \gamma_k + \beta_k

    A = \operatorname{relu}^2\!\big(Q K^\top / n\big), \qquad
    Y = \big(U \odot A V\big) W_o

with ``\phi`` = SiLU, ``e = 2E`` and ``s = 128`` in the paper. ``A`` is not a
softmax: its rows do not sum to one and can be all zero. The paper adds a
T5-style relative position bias inside the ``relu``; it is left out here
(positions come from the model's embeddings). ``n`` is the number of real
keys (per example, with a ``key_mask``). Cost ``O(n^2 s + n E e)``.

**Gated attention MIL pooling** (Ilse et al. 2018, "Attention-based Deep
Multiple Instance Learning"). A bag of ``K`` instance embeddings
``h_k \in \mathbb{R}^M`` is pooled with

.. math::

    a_k = \operatorname{softmax}_k\Big( w^\top \big(\tanh(V h_k) \odot \sigma(U h_k)\big) \Big),
    \qquad z = \sum_k a_k h_k

(``gated=False``: ``w^\top \tanh(V h_k)``, the paper's plain attention pooling).
Cost ``O(K M L)``.

Shapes: ``x`` ``(batch, seq, embed_dim)``; weights ``(batch, heads, seq, seq)``
(GAU: ``heads = 1``, unnormalised ``A``); bags ``(batch, K, M)`` with
``mask`` ``(batch, K)`` (``True`` = real instance), pooled ``(batch, M)``,
weights ``(batch, K)``.

Qiu et al., "Gated Attention for Large Language Models: Non-linearity,
Sparsity, and Attention-Sink-Free", 2025. Hua, Dai, Liu, Le, "Transformer
Quality in Linear Time", ICML 2022. Ilse, Tomczak, Welling, "Attention-based
Deep Multiple Instance Learning", ICML 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .checks import check_tensor, check_tokens
from .core import AttentionOutput
from .masks import check_key_mask
from .multihead import MultiHeadAttention
from .registry import OwnTask, register

__all__ = [
    "GatedAttention", "GatedAttentionUnit", "GatedMILPooling", "MILModel", "BagTask", "make_mil_task",
    "SinkLM", "CopyLMTask", "first_token_mass", "lm_loss", "mil_loss",
]

Gate = Literal["elementwise", "headwise"]


# ----------------------------------------------------------------------------- Qiu et al. 2025: gate after SDPA


@register(
    "gated",
    paper="Qiu et al. 2025",
    complexity="O(n^2 d + n d^2)",
    chapter=20,
    summary="multi-head attention whose per-head output is multiplied by an elementwise sigmoid gate of the query's input",
    build=lambda embed_dim, num_heads: GatedAttention(embed_dim, num_heads),
)
class GatedAttention(MultiHeadAttention):
    """Multi-head self-attention with Qiu et al.'s head-specific sigmoid output gate (G1).

    Args:
        embed_dim: model width ``E``.
        num_heads: heads ``h`` (must divide ``E``).
        gate: ``"elementwise"`` (one gate per head channel, ``W^G`` is ``E x E``),
            ``"headwise"`` (one per head, ``E x h``) or ``None`` (no gate: plain
            multi-head attention, the baseline with the same code path).
        causal: token ``i`` sees tokens ``<= i``.
        dropout: dropout on the attention weights during training.
        bias: biases on the projections (the gate always has one).

    Attributes:
        gate_offset: a constant added to every gate logit (default 0). ``inf``
            forces the gate to 1; ``-inf`` closes it. Used to probe a trained model.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        gate: Gate | None = "elementwise",
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias)
        if gate not in ("elementwise", "headwise", None):
            raise ValueError(f"gate must be 'elementwise', 'headwise' or None, got {gate!r}")
        self.gate_kind, self.causal = gate, causal
        self.gate_offset = 0.0
        self.gate_proj: nn.Linear | None = None
        if gate is not None:
            self.gate_proj = nn.Linear(embed_dim, embed_dim if gate == "elementwise" else num_heads)

    def gate(self, x: Tensor) -> Tensor:
        """The gate scores ``sigma(X W^G + b^G + offset)``, ``(B, h, n, d_h)`` (``d_h = 1`` when headwise)."""
        x = check_tokens(x, self.embed_dim)
        if self.gate_proj is None:
            return x.new_ones(x.shape[0], self.num_heads, x.shape[1], 1)
        logits = self.gate_proj(x) + self.gate_offset  # (B, n, h * d_h) or (B, n, h)
        return torch.sigmoid(rearrange(logits, "b n (h d) -> b h n d", h=self.num_heads))

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        key_mask: Tensor | None = None,
        need_weights: bool = False,
        return_gate: bool = False,
    ) -> AttentionOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), weights (B, h, n, n) | None)``.

        ``key_mask (B, n)``: ``True`` = real token. ``return_gate``: the weights
        slot carries ``(weights, gate)`` instead (for inspection).
        """
        x = check_tokens(x, self.embed_dim)
        check_key_mask(key_mask, x.shape[0], x.shape[1])
        if x.shape[0] == 0:
            w = x.new_zeros(0, self.num_heads, x.shape[1], x.shape[1]) if need_weights else None
            return AttentionOutput(x.new_zeros(x.shape), w)
        q, k, v = (self.split_heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, h, n, d_h)
        out, weights = self.attend(
            q, k, v, attn_mask=None, key_mask=key_mask, is_causal=self.causal,
            dropout_p=self.dropout if self.training else 0.0, scale=1.0 / math.sqrt(self.head_dim),
            need_weights=need_weights or return_gate,
        )
        g = self.gate(x)  # (B, h, n, d_h | 1); all ones without a gate
        if self.gate_proj is not None:
            out = out * g  # O_i (.) sigma(X W^G_i): the head's output, scaled per token and channel
        y = self.out_proj(self.merge_heads(out))  # (B, n, E)
        if return_gate:
            # the weights slot carries a (weights, gate) pair here, not a tensor: the interface redesign (issue 23) replaces it
            return AttentionOutput(y, (weights, g))  # type: ignore[arg-type]
        return AttentionOutput(y, weights if need_weights else None)


# ----------------------------------------------------------------------------- Hua et al. 2022: GAU


@register(
    "gau",
    paper="Hua et al. 2022",
    complexity="O(n^2 s + n d e)",
    chapter=20,
    summary="gated attention unit: one shared low-dim Q/K, squared-ReLU attention, output U * (A V)",
    build=lambda embed_dim, num_heads: GatedAttentionUnit(embed_dim),
)
class GatedAttentionUnit(nn.Module):
    """Hua et al.'s gated attention unit (GAU), a single-head gated layer.

    Args:
        embed_dim: model width ``E``.
        expansion: ``e = expansion * E``, the width of ``U`` and ``V`` (paper: 2).
        qk_dim: ``s``, the width of the shared ``Z`` (paper: 128); default ``min(128, E)``.
        causal: token ``i`` sees tokens ``<= i``.

    ``gamma`` ``(2, s)`` and ``beta`` ``(2, s)`` are the per-dimension scales and
    offsets that turn ``Z`` into ``Q`` (row 0) and ``K`` (row 1).
    """

    def __init__(self, embed_dim: int, expansion: int = 2, qk_dim: int | None = None, causal: bool = False) -> None:
        super().__init__()
        if embed_dim <= 0 or expansion <= 0:
            raise ValueError(f"embed_dim and expansion must be positive, got {embed_dim} and {expansion}")
        s = min(128, embed_dim) if qk_dim is None else qk_dim
        if s <= 0:
            raise ValueError(f"qk_dim must be positive, got {s}")
        self.embed_dim, self.e, self.s, self.causal = embed_dim, expansion * embed_dim, s, causal
        self.num_heads = 1
        self.uvz = nn.Linear(embed_dim, 2 * self.e + s)  # [W_u, W_v, W_z] in one matrix
        self.gamma = nn.Parameter(torch.empty(2, s))
        self.beta = nn.Parameter(torch.zeros(2, s))
        self.out = nn.Linear(self.e, embed_dim)  # W_o
        nn.init.normal_(self.gamma, mean=1.0, std=0.02)  # near 1, so Q . K starts at Z . Z, not at zero

    def kernel(self, x: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(U (B, n, e), V (B, n, e), A (B, n, n))`` for input ``x (B, n, E)``."""
        u, v, z = F.silu(self.uvz(x)).split([self.e, self.e, self.s], -1)  # phi = SiLU
        q = z * self.gamma[0] + self.beta[0]  # (B, n, s): per-dimension scale and offset
        k = z * self.gamma[1] + self.beta[1]
        n_real = x.new_full((x.shape[0], 1, 1), x.shape[1]) if key_mask is None else key_mask.sum(-1).clamp(min=1)[:, None, None].to(x.dtype)
        a = F.relu(q @ k.transpose(-1, -2) / n_real) ** 2  # (B, n, n), squared ReLU, no softmax
        keep = None
        if self.causal:
            keep = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        if key_mask is not None:
            keep = key_mask[:, None, :] if keep is None else keep & key_mask[:, None, :]
        if keep is not None:
            a = a.masked_fill(~keep, 0.0)
        return u, v, a

    def forward(self, x: Tensor, key_mask: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), A (B, 1, n, n) | None)``; ``key_mask (B, n)``, ``True`` = real."""
        x = check_tokens(x, self.embed_dim)
        check_key_mask(key_mask, x.shape[0], x.shape[1])
        u, v, a = self.kernel(x, key_mask)
        y = self.out(u * (a @ v))  # (B, n, E): U gates A V elementwise
        return AttentionOutput(y, a[:, None] if need_weights else None)


# ----------------------------------------------------------------------------- Ilse et al. 2018: gated MIL pooling


class GatedMILPooling(nn.Module):
    """Ilse et al.'s (gated) attention-based MIL pooling of a bag of instances.

    Args:
        in_dim: instance width ``M``.
        hidden_dim: ``L``, the width of ``V h`` and ``U h``.
        gated: ``True``: ``w^T(tanh(V h) * sigm(U h))``; ``False``: ``w^T tanh(V h)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 32, gated: bool = True) -> None:
        super().__init__()
        if in_dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"in_dim and hidden_dim must be positive, got {in_dim} and {hidden_dim}")
        self.in_dim, self.hidden_dim, self.gated = in_dim, hidden_dim, gated
        self.V = nn.Linear(in_dim, hidden_dim)
        self.U = nn.Linear(in_dim, hidden_dim) if gated else None
        self.w = nn.Linear(hidden_dim, 1, bias=False)

    def scores(self, h: Tensor) -> Tensor:
        """Unnormalised scores ``(B, K)`` of instances ``h (B, K, M)``."""
        hidden = torch.tanh(self.V(h))  # (B, K, L)
        if self.U is not None:
            hidden = hidden * torch.sigmoid(self.U(h))  # the gate: sigm(U h) in (0, 1), per hidden unit
        return self.w(hidden)[..., 0]

    def forward(self, h: Tensor, mask: Tensor | None = None) -> AttentionOutput:
        """``h (B, K, M)``, ``mask (B, K)`` (``True`` = real) -> ``(z (B, M), a (B, K))``. Empty bags pool to zeros."""
        h = check_tensor(h, "h", f"(batch, instances, in_dim={self.in_dim})", 3)
        if h.shape[-1] != self.in_dim:
            raise ValueError(f"h must have shape (batch, instances, in_dim={self.in_dim}), got {tuple(h.shape)}")
        check_key_mask(mask, h.shape[0], h.shape[1], name="mask", length_name="instances", meaning="real instance")
        if h.shape[0] == 0 or h.shape[1] == 0:
            return AttentionOutput(h.new_zeros(h.shape[0], self.in_dim), h.new_zeros(h.shape[:2]))
        s = self.scores(h)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        a = torch.softmax(s, -1).nan_to_num(0.0)  # (B, K); an all-padding bag gives zeros
        z = torch.einsum("bk,bkm->bm", a, h)  # sum_k a_k h_k
        return AttentionOutput(z, a)


@dataclass
class BagTask:
    """Multiple-instance bags generated in code: is a *key* instance in the bag?

    Each instance is one of ``n_classes`` prototypes (random unit vectors in
    ``R^dim``) plus Gaussian noise ``noise``; a bag holds ``min_size..max_size``
    instances (padding after them); it is positive iff it holds at least one
    instance of class 0 (like MNIST-bags with the digit 9). Half the bags are
    positive, with 1 to 3 key instances.
    """

    dim: int = 16
    n_classes: int = 10
    min_size: int = 5
    max_size: int = 15
    noise: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.n_classes < 2 or self.dim < 1:
            raise ValueError(f"need n_classes >= 2 and dim >= 1, got {self.n_classes}, {self.dim}")
        g = torch.Generator().manual_seed(self.seed)
        self.prototypes = F.normalize(torch.randn(self.n_classes, self.dim, generator=g), dim=-1) * 2.0

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``x (B, max_size, dim)``, ``mask (B, max_size)``, ``y (B,)`` float 0/1, ``key (B, max_size)`` bool."""
        b, kmax = batch_size, self.max_size
        sizes = torch.randint(self.min_size, kmax + 1, (b,), generator=generator)
        mask = torch.arange(kmax)[None, :] < sizes[:, None]
        cls = torch.randint(1, self.n_classes, (b, kmax), generator=generator)  # negatives: classes 1..
        y = torch.rand(b, generator=generator) < 0.5
        n_key = torch.randint(1, 4, (b,), generator=generator)
        order = torch.rand(b, kmax, generator=generator).masked_fill(~mask, 2.0).argsort(-1)  # real slots first, shuffled
        rank = order.argsort(-1)
        key = (rank < n_key[:, None]) & y[:, None] & mask
        cls = cls.masked_fill(key, 0)
        x = self.prototypes[cls] + self.noise * torch.randn(b, kmax, self.dim, generator=generator)
        x = x * mask[..., None]
        return {"x": x, "mask": mask, "y": y.float(), "key": key}


class MILModel(nn.Module):
    """Instance encoder (two-layer MLP) -> (gated) attention pooling -> bag logit."""

    def __init__(self, in_dim: int, hidden: int = 32, attn_dim: int = 16, gated: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.pool = GatedMILPooling(hidden, attn_dim, gated=gated)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x (B, K, M)`` -> bag logits ``(B,)`` and instance weights ``(B, K)``."""
        z, a = self.pool(self.encoder(x), mask)
        return self.head(z)[:, 0], a


def mil_loss(model: MILModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Binary cross-entropy on the bag label; accuracy."""
    logit, _ = model(batch["x"], batch["mask"])
    loss = F.binary_cross_entropy_with_logits(logit, batch["y"])
    return loss, {"acc": float(((logit > 0).float() == batch["y"]).float().mean())}


def make_mil_task(preset: str = "default") -> OwnTask[MILModel]:
    """The comparison's own task for gated MIL pooling: :class:`BagTask` bags, the pooling layer alone for the cost."""
    steps = {"quick": 30, "book": 150, "default": 300, "gpu": 600}
    if preset not in steps:
        raise ValueError(f"unknown preset {preset!r}; one of {sorted(steps)}")
    task = BagTask()
    model = MILModel(task.dim)
    layer = GatedMILPooling(64, 32)

    def inputs(size: int, generator: torch.Generator) -> tuple[Tensor]:
        return (torch.randn(8, size, 64, generator=generator),)

    def weights(m: MILModel, b: dict[str, Tensor]) -> Tensor:
        return m(b["x"], b["mask"])[1]

    sizes = (16, 64, 256) if preset == "quick" else (64, 256, 1024, 4096)
    return OwnTask(
        description="MIL bags: is a class-0 instance in the bag? (5-15 noisy prototype instances)",
        model=model, sample=task.sample, loss=mil_loss, layer=layer, inputs=inputs, sizes=sizes,
        size_unit="instances", steps=steps[preset], batch_size=32, lr=3e-3, target_acc=0.9, weights=weights,
    )


register(
    "gated_mil",
    paper="Ilse et al. 2018",
    complexity="O(K M L)",
    chapter=20,
    data="set",
    summary="gated attention MIL pooling: a_k = softmax(w^T (tanh(V h_k) * sigm(U h_k)))",
    task=make_mil_task,
)(GatedMILPooling)


# ----------------------------------------------------------------------------- the attention sink experiment


@dataclass
class CopyLMTask:
    """Sequences for a tiny causal LM: ``BOS``, a random segment, then the same segment again.

    Token 0 is ``BOS`` (always first). The first half is random
    (``1 .. vocab-1``, nothing to predict from context beyond chance); the
    second half repeats it, so predicting it needs attention to the copy
    (induction). Heads have nothing useful to read in the first half: the
    situation in which softmax attention parks its weight on a sink.
    """

    vocab: int = 32
    segment: int = 16

    def __post_init__(self) -> None:
        if self.vocab < 3 or self.segment < 1:
            raise ValueError(f"need vocab >= 3 and segment >= 1, got {self.vocab}, {self.segment}")

    @property
    def length(self) -> int:
        return 1 + 2 * self.segment

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``x (B, 2 segment + 1)`` tokens; the target is ``x`` shifted by one."""
        seg = torch.randint(1, self.vocab, (batch_size, self.segment), generator=generator)
        bos = torch.zeros(batch_size, 1, dtype=torch.long)
        return {"x": torch.cat([bos, seg, seg], 1)}


class SinkLM(nn.Module):
    """A small pre-norm causal transformer LM whose attention layers are :class:`GatedAttention`.

    ``gate=None`` gives the ungated baseline with otherwise identical layers.
    Shapes: ``x (B, n)`` token ids -> logits ``(B, n, vocab)`` and, with
    ``need_weights``, one ``(B, h, n, n)`` weight tensor per layer.
    """

    def __init__(self, vocab: int, max_len: int, embed_dim: int = 64, num_heads: int = 4, layers: int = 2,
                 gate: Gate | None = "elementwise") -> None:
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.embed = nn.Embedding(vocab, embed_dim)
        self.pos = nn.Parameter(torch.randn(max_len, embed_dim) * 0.02)
        self.attn = nn.ModuleList(GatedAttention(embed_dim, num_heads, gate=gate, causal=True) for _ in range(layers))
        self.norm1 = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(layers))
        self.norm2 = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(layers))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.GELU(), nn.Linear(4 * embed_dim, embed_dim)) for _ in range(layers)
        )
        self.out_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab)

    def set_gate_offset(self, offset: float) -> None:
        """Add ``offset`` to every layer's gate logits (``inf``: gates forced to 1)."""
        for layer in self.attn:
            assert isinstance(layer, GatedAttention)  # self.attn holds only GatedAttention layers
            layer.gate_offset = offset

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor]]:
        if not isinstance(x, Tensor) or x.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"x must be an integer tensor of token ids (batch, seq), got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2 or not 1 <= x.shape[1] <= self.max_len:
            raise ValueError(f"x must have shape (batch, seq) with 1 <= seq <= {self.max_len}, got {tuple(x.shape)}")
        h = self.embed(x) + self.pos[: x.shape[1]]
        weights = []
        for attn, n1, n2, mlp in zip(self.attn, self.norm1, self.norm2, self.mlp, strict=True):
            out = attn(n1(h), need_weights=need_weights)
            h = h + out.output
            h = h + mlp(n2(h))
            if need_weights:
                weights.append(out.weights)
        return self.head(self.out_norm(h)), weights


def lm_loss(model: SinkLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy on every position; ``acc`` and ``copy_acc`` (accuracy on the repeated half)."""
    x = batch["x"]
    logits, _ = model(x[:, :-1])
    target = x[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    pred = logits.argmax(-1) == target
    half = (x.shape[1] - 1) // 2
    return loss, {"acc": float(pred.float().mean()), "copy_acc": float(pred[:, half:].float().mean())}


def first_token_mass(weights: Tensor, first_query: int = 1) -> Tensor:
    """Mean attention weight on key 0 over queries ``first_query..n-1``: ``(..., n, n) -> (...)``.

    Query 0 sees only key 0 under a causal mask (its weight is 1 by
    construction), so it is left out by default.
    """
    w = check_tensor(weights, "weights", "(..., n, n)")
    if w.ndim < 2 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights must have shape (..., n, n), got {tuple(w.shape)}")
    if not 0 <= first_query < w.shape[-2]:
        raise ValueError(f"first_query must be in [0, {w.shape[-2]}), got {first_query}")
    return w[..., first_query:, 0].mean(-1)
