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
keys (per example, with a ``key_mask``). As in the paper's pseudo-code, ``n``
divides the scores *inside* the squared ReLU: for scores of a given size a
weight scales as ``1/n^2`` and a row (``n`` of them) as ``1/n``; it does not
keep ``AV`` at a length-independent scale. Cost ``O(n^2 s + n E e)``.

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
``key_mask`` ``(batch, K)`` (``True`` = real instance), pooled ``(batch, M)``,
weights ``(batch, K)``. The chapter's experiments (the MIL bags, the copy task
and its small LM, the first-token mass) live in :mod:`attn.experiments.gated`.

Qiu et al., "Gated Attention for Large Language Models: Non-linearity,
Sparsity, and Attention-Sink-Free", 2025. Hua, Dai, Liu, Le, "Transformer
Quality in Linear Time", ICML 2022. Ilse, Tomczak, Welling, "Attention-based
Deep Multiple Instance Learning", ICML 2018.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import AttentionBase
from .checks import check_int, check_tensor, check_tokens
from .core import AttentionOutput, masked_softmax
from .masks import check_key_mask
from .registry import register

__all__ = ["GatedAttention", "GatedOutput", "GatedAttentionUnit", "GatedMILPooling"]

Gate = Literal["elementwise", "headwise"]


class GatedOutput(NamedTuple):
    """:meth:`GatedAttention.forward` with ``return_gate=True``: ``output (B, n, E)``, ``weights (B, h, n, n)``,
    ``gate (B, h, n, d_h)`` (``d_h = 1`` when headwise; all ones without a gate)."""

    output: Tensor
    weights: Tensor
    gate: Tensor


# ----------------------------------------------------------------------------- Qiu et al. 2025: gate after SDPA


@register(
    "gated",
    paper="Qiu et al. 2025",
    complexity="O(n^2 d + n d^2)",
    chapter=20,
    summary="multi-head attention whose per-head output is multiplied by an elementwise sigmoid gate of the query's input",
    build=lambda embed_dim, num_heads: GatedAttention(embed_dim, num_heads),
    kernel="sdpa",
    causal=False,
)
class GatedAttention(AttentionBase):
    """Multi-head self-attention with Qiu et al.'s head-specific sigmoid output gate (G1).

    :class:`~attn.attention.AttentionBase` with the ``"sdpa"`` kernel (its ``q_proj, k_proj, v_proj,
    out_proj`` are :class:`~attn.multihead.MultiHeadAttention`'s: state dicts load into each other, plus
    ``gate_proj``); the gate multiplies each head's output between the kernel and ``W^O``.

    Args:
        embed_dim: model width ``E``.
        num_heads: heads ``h`` (must divide ``E``).
        gate: ``"elementwise"`` (one gate per head channel, ``W^G`` is ``E x E``),
            ``"headwise"`` (one per head, ``E x h``) or ``None`` (no gate: plain
            multi-head attention, the baseline with the same code path).
        causal: token ``i`` sees tokens ``<= i`` (the default of ``forward(is_causal=)``).
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
        *,
        gate: Gate | None = "elementwise",
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        if gate not in ("elementwise", "headwise", None):
            raise ValueError(f"gate must be 'elementwise', 'headwise' or None, got {gate!r}")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, causal=causal)
        self.gate_kind = gate
        self.gate_offset = 0.0
        self.gate_proj: nn.Linear | None = None
        if gate is not None:
            self.gate_proj = nn.Linear(embed_dim, embed_dim if gate == "elementwise" else num_heads)
        # forward's input and the gate attend() computed from it, for the one attend() call forward makes
        self._gate_input: Tensor | None = None
        self._gate: Tensor | None = None

    def gate(self, x: Tensor) -> Tensor:
        """The gate scores ``sigma(X W^G + b^G + offset)``, ``(B, h, n, d_h)`` (``d_h = 1`` when headwise)."""
        x = check_tokens(x, self.embed_dim)
        if self.gate_proj is None:
            return x.new_ones(x.shape[0], self.num_heads, x.shape[1], 1)
        logits = self.gate_proj(x) + self.gate_offset  # (B, n, h * d_h) or (B, n, h)
        return torch.sigmoid(rearrange(logits, "b n (h d) -> b h n d", h=self.num_heads))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> AttentionOutput:
        """The kernel's per-head output ``O_i`` ``(B, h, n, d_h)``, times the gate ``sigma(X W^G_i)`` of ``forward``'s ``x``."""
        out, weights = super().attend(q, k, v, **kwargs)
        x = self._gate_input
        if x is not None:
            g = self._gate = self.gate(x)  # (B, h, n, d_h | 1); all ones without a gate
            if self.gate_proj is not None:
                out = out * g  # O_i (.) sigma(X W^G_i): the head's output, scaled per token and channel
        return AttentionOutput(out, weights)

    @overload
    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = ..., is_causal: bool | None = ..., need_weights: bool = ...,
        return_gate: Literal[False] = ...,
    ) -> AttentionOutput: ...

    @overload
    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = ..., is_causal: bool | None = ..., need_weights: bool = ...,
        return_gate: Literal[True],
    ) -> GatedOutput: ...

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        return_gate: bool = False,
    ) -> AttentionOutput | GatedOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), weights (B, h, n, n) | None)``.

        ``key_mask (B, n)``: ``True`` = real token. ``is_causal``: ``None`` keeps the layer's ``causal``.
        ``return_gate=True``: a :class:`GatedOutput` ``(output, weights, gate)`` instead (for inspection).
        """
        x = check_tokens(x, self.embed_dim)
        check_key_mask(key_mask, x.shape[0], x.shape[1])
        if x.shape[0] == 0:
            w = x.new_zeros(0, self.num_heads, x.shape[1], x.shape[1])
            y = x.new_zeros(x.shape)
            if return_gate:
                return GatedOutput(y, w, self.gate(x))
            return AttentionOutput(y, w if need_weights else None)
        self._gate_input = x
        try:
            y, weights = self.mix(x, x, x, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights or return_gate)
            g = self._gate
        finally:
            self._gate_input = self._gate = None
        if return_gate:
            assert weights is not None and g is not None  # asked for above; attend() computed the gate
            return GatedOutput(y, weights, g)
        return AttentionOutput(y, weights)


# ----------------------------------------------------------------------------- Hua et al. 2022: GAU


@register(
    "gau",
    paper="Hua et al. 2022",
    complexity="O(n^2 s + n d e)",
    chapter=20,
    summary="gated attention unit: one shared low-dim Q/K, squared-ReLU attention, output U * (A V)",
    build=lambda embed_dim, num_heads: GatedAttentionUnit(embed_dim),
    kernel=None,
    causal=False,
)
class GatedAttentionUnit(nn.Module):
    """Hua et al.'s gated attention unit (GAU), a single-head gated layer (a :class:`~attn.attention.SequenceMixer`).

    Args:
        embed_dim: model width ``E``.
        expansion: ``e = expansion * E``, the width of ``U`` and ``V`` (paper: 2).
        qk_dim: ``s``, the width of the shared ``Z`` (paper: 128); default ``min(128, E)``.
        causal: token ``i`` sees tokens ``<= i`` (the default of ``forward(is_causal=)``).

    ``gamma`` ``(2, s)`` and ``beta`` ``(2, s)`` are the per-dimension scales and
    offsets that turn ``Z`` into ``Q`` (row 0) and ``K`` (row 1); ``out_proj`` is ``W_o``.
    """

    def __init__(self, embed_dim: int, *, expansion: int = 2, qk_dim: int | None = None, causal: bool = False) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        check_int("expansion", expansion)
        s = min(128, embed_dim) if qk_dim is None else check_int("qk_dim", qk_dim)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.embed_dim, self.e, self.s, self.causal = embed_dim, expansion * embed_dim, s, causal
        self.num_heads = 1
        self.uvz = nn.Linear(embed_dim, 2 * self.e + s)  # [W_u, W_v, W_z] in one matrix
        self.gamma = nn.Parameter(torch.empty(2, s))
        self.beta = nn.Parameter(torch.zeros(2, s))
        self.out_proj = nn.Linear(self.e, embed_dim)  # W_o
        nn.init.normal_(self.gamma, mean=1.0, std=0.02)  # near 1, so Q . K starts at Z . Z, not at zero

    def uva(self, x: Tensor, key_mask: Tensor | None = None, causal: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(U (B, n, e), V (B, n, e), A (B, n, n))`` for input ``x (B, n, E)``."""
        causal = self.causal if causal is None else causal
        u, v, z = F.silu(self.uvz(x)).split([self.e, self.e, self.s], -1)  # phi = SiLU
        q = z * self.gamma[0] + self.beta[0]  # (B, n, s): per-dimension scale and offset
        k = z * self.gamma[1] + self.beta[1]
        n_real = x.new_full((x.shape[0], 1, 1), x.shape[1]) if key_mask is None else key_mask.sum(-1).clamp(min=1)[:, None, None].to(x.dtype)
        a = F.relu(q @ k.transpose(-1, -2) / n_real) ** 2  # (B, n, n), squared ReLU, no softmax
        keep = None
        if causal:
            keep = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        if key_mask is not None:
            keep = key_mask[:, None, :] if keep is None else keep & key_mask[:, None, :]
        if keep is not None:
            a = a.masked_fill(~keep, 0.0)
        return u, v, a

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), A (B, 1, n, n) | None)``; ``key_mask (B, n)``, ``True`` = real."""
        x = check_tokens(x, self.embed_dim)
        check_key_mask(key_mask, x.shape[0], x.shape[1])
        if is_causal is not None and not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
        u, v, a = self.uva(x, key_mask, is_causal)
        y = self.out_proj(u * (a @ v))  # (B, n, E): U gates A V elementwise
        return AttentionOutput(y, a[:, None] if need_weights else None)


# ----------------------------------------------------------------------------- Ilse et al. 2018: gated MIL pooling


@register(
    "gated_mil",
    paper="Ilse et al. 2018",
    complexity="O(K M L)",
    chapter=20,
    data="set",
    summary="gated attention MIL pooling: a_k = softmax(w^T (tanh(V h_k) * sigm(U h_k)))",
)
class GatedMILPooling(nn.Module):
    """Ilse et al.'s (gated) attention-based MIL pooling of a bag of instances.

    Args:
        in_dim: instance width ``M``.
        hidden_dim: ``L``, the width of ``V h`` and ``U h``.
        gated: ``True``: ``w^T(tanh(V h) * sigm(U h))``; ``False``: ``w^T tanh(V h)``.

    Its own task (bags of noisy prototypes) is in :mod:`attn.experiments.gated`.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 32, *, gated: bool = True) -> None:
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

    def forward(self, h: Tensor, *, key_mask: Tensor | None = None) -> AttentionOutput:
        """``h (B, K, M)``, ``key_mask (B, K)`` (``True`` = real instance) -> ``(z (B, M), a (B, K))``.

        Empty bags (and all-padding bags) pool to zeros.
        """
        h = check_tensor(h, "h", f"(batch, instances, in_dim={self.in_dim})", 3)
        if h.shape[-1] != self.in_dim:
            raise ValueError(f"h must have shape (batch, instances, in_dim={self.in_dim}), got {tuple(h.shape)}")
        check_key_mask(key_mask, h.shape[0], h.shape[1], length_name="instances", meaning="real instance")
        if h.shape[0] == 0 or h.shape[1] == 0:
            return AttentionOutput(h.new_zeros(h.shape[0], self.in_dim), h.new_zeros(h.shape[:2]))
        a = masked_softmax(self.scores(h), key_mask)  # (B, K); an all-padding bag gives zeros
        z = torch.einsum("bk,bkm->bm", a, h)  # sum_k a_k h_k
        return AttentionOutput(z, a)
