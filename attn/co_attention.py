r"""Chapter 7 -- Co-attention: two inputs attend to each other through one affinity matrix.

Two sequences of different lengths and widths: a *question*
``Q (B, T, d_q)`` and a *passage* (an image's regions, a document)
``V (B, N, d_v)``, each with its own padding mask (``True`` = real). Below,
as in the papers, columns are positions: :math:`Q \in \mathbb{R}^{d_q \times T}`,
:math:`V \in \mathbb{R}^{d_v \times N}`.

**Parallel co-attention** (Lu et al. 2016, "Hierarchical Question-Image
Co-Attention for Visual Question Answering", NeurIPS, section 3.3):

.. math::

    C = \tanh(Q^\top W_b V) \in \mathbb{R}^{T \times N},\qquad
    H^v = \tanh(W_v V + (W_q Q) C),\qquad H^q = \tanh(W_q Q + (W_v V) C^\top),

    a^v = \operatorname{softmax}(w_{hv}^\top H^v) \in \mathbb{R}^N,\quad
    a^q = \operatorname{softmax}(w_{hq}^\top H^q) \in \mathbb{R}^T,\quad
    \hat v = \textstyle\sum_n a^v_n v_n,\quad \hat q = \sum_t a^q_t q_t,

with :math:`W_b \in \mathbb{R}^{d_q \times d_v}`, :math:`W_v \in \mathbb{R}^{k \times d_v}`,
:math:`W_q \in \mathbb{R}^{k \times d_q}`, :math:`w_{hv}, w_{hq} \in \mathbb{R}^k`.

**Alternating co-attention** (Lu et al. 2016): one attention operation
:math:`\hat x = \mathcal{A}(X; g)`,
:math:`H = \tanh(W_x X + (W_g g)\mathbf{1}^\top)`, :math:`a^x = \operatorname{softmax}(w_{hx}^\top H)`,
:math:`\hat x = \sum_i a^x_i x_i`, applied three times (own parameters each):
:math:`\hat s = \mathcal{A}(Q; 0)`, :math:`\hat v = \mathcal{A}(V; \hat s)`,
:math:`\hat q = \mathcal{A}(Q; \hat v)`.

**DCN co-attention encoder** (Xiong et al. 2017, "Dynamic Coattention Networks
for Question Answering", ICLR, section 2.2): document ``D (ℓ x (m+1))`` and
question :math:`Q = \tanh(W^{(Q)} Q' + b^{(Q)})` ``(ℓ x (n+1))``, each with a
learned sentinel column appended (as in the paper, the question's sentinel
:math:`q_\varnothing` is appended to :math:`Q'` *before* the projection, the
document's :math:`d_\varnothing` to ``D``);

.. math::

    L = D^\top Q,\quad A^Q = \operatorname{softmax}_{\text{over } D}(L),\quad
    A^D = \operatorname{softmax}_{\text{over } Q}(L^\top),\quad
    C^Q = D A^Q,\quad C^D = [Q; C^Q] A^D,\quad U = \operatorname{BiLSTM}([D; C^D]).

Shapes here are batch-first: ``L (B, m+1, n+1)``; ``C^D (B, m+1, 2ℓ)``.

**BiDAF's attention flow layer** (Seo et al. 2017, "Bidirectional Attention
Flow for Machine Comprehension", ICLR, section 2.4). The paper's context
``H (2d x T)`` and query ``U (2d x J)`` are our passage ``V`` (``N`` positions)
and question ``Q`` (``T`` positions), of one width ``d``. A trilinear
similarity :math:`S_{nt} = w_S^\top [v_n; q_t; v_n \circ q_t]`
(:math:`w_S \in \mathbb{R}^{3d}`), then

.. math::

    a_n = \operatorname{softmax}_t(S_{n:}),\quad \tilde q_n = \textstyle\sum_t a_{nt} q_t
    \quad\text{(context-to-query)},\qquad
    b = \operatorname{softmax}_n(\max_t S_{nt}),\quad \tilde v = \textstyle\sum_n b_n v_n
    \quad\text{(query-to-context)},

    G_n = [v_n;\ \tilde q_n;\ v_n \circ \tilde q_n;\ v_n \circ \tilde v] \in \mathbb{R}^{4d}.

Costs: all four are ``O(T N d)``, dominated by the ``T x N`` affinity
(alternating co-attention, ``O((T + N) d k)``, forms none).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .checks import autocast_active, check_int, check_same_batch, check_same_dtype, check_tensor
from .core import masked_softmax
from .masks import check_key_mask
from .registry import register

__all__ = [
    "CoAttentionOutput",
    "DCNOutput",
    "BiDAFOutput",
    "ParallelCoAttention",
    "AlternatingCoAttention",
    "DCNCoAttention",
    "BiDAFAttention",
]


class CoAttentionOutput(NamedTuple):
    """``question_summary`` q^ ``(B, d_q)``, ``passage_summary`` v^ ``(B, d_v)``, ``question_weights`` a^q ``(B, T)``,
    ``passage_weights`` a^v ``(B, N)``, ``affinity`` C ``(B, T, N)`` (parallel) or ``None`` (alternating)."""

    question_summary: Tensor
    passage_summary: Tensor
    question_weights: Tensor
    passage_weights: Tensor
    affinity: Tensor | None


class DCNOutput(NamedTuple):
    """DCN's co-attention, batch-first, sentinel last on both axes.

    ``context`` C^D ``(B, m+1, 2ℓ)``; ``question_context`` C^Q ``(B, n+1, ℓ)``;
    ``affinity`` L ``(B, m+1, n+1)``; ``passage_weights`` A^D ``(B, m+1, n+1)``
    (each document word over the question); ``question_weights`` (A^Q)^T
    ``(B, n+1, m+1)`` (each question word over the document); ``encoding`` U
    ``(B, m, 2ℓ)`` or ``None`` without the BiLSTM.
    """

    context: Tensor
    question_context: Tensor
    affinity: Tensor
    passage_weights: Tensor
    question_weights: Tensor
    encoding: Tensor | None


class BiDAFOutput(NamedTuple):
    """BiDAF's attention flow, batch-first (passage = the paper's context, question = its query).

    ``similarity`` S ``(B, N, T)``; ``question_weights`` a ``(B, N, T)``
    (context-to-query: each passage position over the question);
    ``passage_weights`` b ``(B, N)`` (query-to-context); ``attended_question``
    q~ ``(B, N, d)``; ``attended_passage`` v~ ``(B, d)``; ``merged`` G
    ``(B, N, 4d)`` (zero at padded passage positions).
    """

    similarity: Tensor
    question_weights: Tensor
    passage_weights: Tensor
    attended_question: Tensor
    attended_passage: Tensor
    merged: Tensor


def _check_pair(layer: ParallelCoAttention | AlternatingCoAttention | DCNCoAttention | BiDAFAttention, question: object, passage: object,
                question_mask: Tensor | None, passage_mask: Tensor | None,
                ) -> tuple[Tensor, Tensor]:
    """Both inputs are real floating-point ``(batch, len >= 1, width)`` tensors of the layer's widths, one dtype (the
    layer's, outside autocast) and one batch; masks are ``None`` or bool ``(batch, len)`` with a real position per row."""
    dq, dv = layer.question_dim, layer.passage_dim
    q_name, p_name = "question", "passage"
    question = check_tensor(question, q_name, f"(batch, T, question_dim={dq})", 3)
    passage = check_tensor(passage, p_name, f"(batch, N, passage_dim={dv})", 3)
    for name, t, d, ln in ((q_name, question, dq, "T"), (p_name, passage, dv, "N")):
        if t.shape[-1] != d:
            raise ValueError(f"{name} must have shape (batch, {ln}, {d}), got {tuple(t.shape)} (width {t.shape[-1]} != {d})")
        if t.shape[1] == 0 and t.shape[0] > 0:
            raise ValueError(f"{name} must hold at least one position: shape (batch, {ln} >= 1, {d}), got {tuple(t.shape)}")
    for name, t in ((q_name, question), (p_name, passage)):
        if t.is_complex():
            raise TypeError(f"{name} must be a real floating-point tensor, got dtype {t.dtype}")
    check_same_dtype((q_name, question), (p_name, passage))
    param = next(layer.parameters(), None)
    if param is not None and param.dtype != question.dtype and not autocast_active(question):
        raise TypeError(f"{q_name} and {p_name} are {question.dtype} but the layer's parameters are {param.dtype}: "
                        f"cast the inputs (.to({param.dtype})) or the layer (.to({question.dtype}))")
    check_same_batch((q_name, question), (p_name, passage))
    check_key_mask(question_mask, question.shape[0], question.shape[1], name=f"{q_name}_mask", length_name="T")
    check_key_mask(passage_mask, passage.shape[0], passage.shape[1], name=f"{p_name}_mask", length_name="N")
    for name, m in ((f"{q_name}_mask", question_mask), (f"{p_name}_mask", passage_mask)):
        if m is not None and m.shape[0] > 0 and not bool(m.any(-1).all()):
            raise ValueError(f"{name}: every example needs at least one real position (a row of {name} is all False)")
    return question, passage


@register(
    "parallel_coattention",
    paper="Lu et al. 2016",
    complexity="O(T N d)",
    chapter=7,
    data="pair",
    summary="affinity C = tanh(Q^T W_b V) guides attention over both inputs at once",
)
class ParallelCoAttention(nn.Module):
    """Lu et al.'s parallel co-attention between a question ``(B, T, d_q)`` and a passage ``(B, N, d_v)``.

    Args:
        question_dim, passage_dim: widths ``d_q``, ``d_v``.
        hidden: ``k``, the width of ``H^q`` and ``H^v``.

    ``forward(question, passage, *, question_mask=None, passage_mask=None)`` ->
    :class:`CoAttentionOutput`. Padded positions take no part: their
    affinities are set to 0 (they add nothing to the other side's ``H``) and
    their weights are 0.
    """

    def __init__(self, question_dim: int, passage_dim: int, *, hidden: int = 32) -> None:
        super().__init__()
        for name, value in (("question_dim", question_dim), ("passage_dim", passage_dim), ("hidden", hidden)):
            check_int(name, value)
        self.question_dim, self.passage_dim, self.hidden = question_dim, passage_dim, hidden
        self.w_b = nn.Parameter(torch.randn(question_dim, passage_dim) / math.sqrt(question_dim * passage_dim))  # W_b
        self.w_v = nn.Linear(passage_dim, hidden, bias=False)  # W_v
        self.w_q = nn.Linear(question_dim, hidden, bias=False)  # W_q
        self.w_hv = nn.Linear(hidden, 1, bias=False)  # w_hv
        self.w_hq = nn.Linear(hidden, 1, bias=False)  # w_hq

    def forward(
        self, question: Tensor, passage: Tensor, *, question_mask: Tensor | None = None, passage_mask: Tensor | None = None
    ) -> CoAttentionOutput:
        question, passage = _check_pair(self, question, passage, question_mask, passage_mask)
        b, t, n = question.shape[0], question.shape[1], passage.shape[1]
        if b == 0:
            return CoAttentionOutput(question.new_zeros(0, self.question_dim), passage.new_zeros(0, self.passage_dim),
                                     question.new_zeros(0, t), passage.new_zeros(0, n), question.new_zeros(0, t, n))
        qm = question_mask if question_mask is not None else question.new_ones(b, t, dtype=torch.bool)
        vm = passage_mask if passage_mask is not None else passage.new_ones(b, n, dtype=torch.bool)
        c = torch.tanh(question @ self.w_b @ passage.transpose(1, 2))  # C = tanh(Q^T W_b V): (B, T, N)
        c = c * (qm[:, :, None] & vm[:, None, :])  # padded rows and columns contribute nothing
        wv, wq = self.w_v(passage), self.w_q(question)  # (W_v V)^T (B, N, k), (W_q Q)^T (B, T, k)
        h_v = torch.tanh(wv + c.transpose(1, 2) @ wq)  # H^v = tanh(W_v V + (W_q Q) C), transposed: (B, N, k)
        h_q = torch.tanh(wq + c @ wv)  # H^q = tanh(W_q Q + (W_v V) C^T), transposed: (B, T, k)
        a_v = masked_softmax(self.w_hv(h_v)[..., 0], vm)  # (B, N)
        a_q = masked_softmax(self.w_hq(h_q)[..., 0], qm)  # (B, T)
        v_hat = (a_v[:, :, None] * passage).sum(1)  # (B, d_v)
        q_hat = (a_q[:, :, None] * question).sum(1)  # (B, d_q)
        return CoAttentionOutput(q_hat, v_hat, a_q, a_v, c)


class _GuidedAttention(nn.Module):
    r"""Lu et al.'s :math:`\hat x = \mathcal{A}(X; g)`: ``x (B, L, d_x)``, ``g (B, d_g) | None`` -> (x^ (B, d_x), a (B, L))."""

    def __init__(self, dim: int, guide_dim: int | None, hidden: int) -> None:
        super().__init__()
        self.w_x = nn.Linear(dim, hidden, bias=False)  # W_x
        self.w_g = nn.Linear(guide_dim, hidden, bias=False) if guide_dim is not None else None  # W_g
        self.w_hx = nn.Linear(hidden, 1, bias=False)  # w_hx

    def forward(self, x: Tensor, guide: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.w_x(x)  # (B, L, k)
        if guide is not None and self.w_g is not None:
            h = h + self.w_g(guide)[:, None, :]  # (W_g g) 1^T
        a = masked_softmax(self.w_hx(torch.tanh(h))[..., 0], mask)  # (B, L)
        return (a[:, :, None] * x).sum(1), a


@register(
    "alternating_coattention",
    paper="Lu et al. 2016",
    complexity="O((T + N) d k)",
    chapter=7,
    data="pair",
    summary="summarise the question, attend the passage with it, re-attend the question with the passage summary",
)
class AlternatingCoAttention(nn.Module):
    """Lu et al.'s alternating co-attention: ``s^ = A(Q; 0)``, ``v^ = A(V; s^)``, ``q^ = A(Q; v^)``.

    Args:
        question_dim, passage_dim: widths ``d_q``, ``d_v``.
        hidden: ``k``.
        third_step: run the third step. ``False`` stops after two: the
            question is then attended without ever seeing the passage, and
            only the passage is attended with the question's guidance -- the
            **one-way** baseline of the chapter (``question_weights`` are the
            first step's).

    ``forward(question, passage, *, question_mask=None, passage_mask=None)`` ->
    :class:`CoAttentionOutput` with ``affinity=None``.
    """

    def __init__(self, question_dim: int, passage_dim: int, *, hidden: int = 32, third_step: bool = True) -> None:
        super().__init__()
        for name, value in (("question_dim", question_dim), ("passage_dim", passage_dim), ("hidden", hidden)):
            check_int(name, value)
        self.question_dim, self.passage_dim, self.hidden, self.third_step = question_dim, passage_dim, hidden, third_step
        self.step1 = _GuidedAttention(question_dim, None, hidden)  # s^ = A(Q; 0)
        self.step2 = _GuidedAttention(passage_dim, question_dim, hidden)  # v^ = A(V; s^)
        self.step3 = _GuidedAttention(question_dim, passage_dim, hidden) if third_step else None  # q^ = A(Q; v^)

    def forward(
        self, question: Tensor, passage: Tensor, *, question_mask: Tensor | None = None, passage_mask: Tensor | None = None
    ) -> CoAttentionOutput:
        question, passage = _check_pair(self, question, passage, question_mask, passage_mask)
        b, t, n = question.shape[0], question.shape[1], passage.shape[1]
        if b == 0:
            return CoAttentionOutput(question.new_zeros(0, self.question_dim), passage.new_zeros(0, self.passage_dim),
                                     question.new_zeros(0, t), passage.new_zeros(0, n), None)
        qm = question_mask if question_mask is not None else question.new_ones(b, t, dtype=torch.bool)
        vm = passage_mask if passage_mask is not None else passage.new_ones(b, n, dtype=torch.bool)
        s_hat, a_s = self.step1(question, None, qm)  # (B, d_q), (B, T)
        v_hat, a_v = self.step2(passage, s_hat, vm)  # (B, d_v), (B, N)
        if self.step3 is None:
            return CoAttentionOutput(s_hat, v_hat, a_s, a_v, None)
        q_hat, a_q = self.step3(question, v_hat, qm)  # (B, d_q), (B, T)
        return CoAttentionOutput(q_hat, v_hat, a_q, a_v, None)


@register(
    "dcn_coattention",
    paper="Xiong et al. 2017",
    complexity="O(m n l)",
    chapter=7,
    data="pair",
    summary="DCN encoder: affinity L = D^T Q, attention both ways, co-attention context C^D = [Q; C^Q] A^D",
)
class DCNCoAttention(nn.Module):
    """The co-attention encoder of the Dynamic Coattention Network (Xiong et al. 2017).

    Args:
        question_dim: ``d_q``, projected to ``ℓ`` by ``Q = tanh(W^(Q) Q' + b^(Q))``
            (square ``ℓ x ℓ`` in the paper; here it also bridges two widths).
        passage_dim: ``ℓ``, the document's width.
        fusion: run the BiLSTM ``U = BiLSTM([D; C^D])`` (hidden ``ℓ`` per direction).

    ``forward(question (B, n, d_q), passage (B, m, ℓ), *, question_mask=None, passage_mask=None)`` -> :class:`DCNOutput`;
    the passage is the paper's document ``D`` (the same names as Lu et al.'s layers).
    The learned sentinels ``d_∅``, ``q_∅`` sit at index ``m`` and ``n`` (after
    the padded length) and are always visible. Any masks are accepted (right or
    left padding, holes): the BiLSTM reads each document's real words, in order,
    exactly as it would read them alone. Padded document rows of ``A^D``,
    ``C^D`` and ``U`` are zero.
    """

    def __init__(self, question_dim: int, passage_dim: int, *, fusion: bool = True) -> None:
        super().__init__()
        check_int("question_dim", question_dim)
        check_int("passage_dim", passage_dim)
        self.question_dim, self.passage_dim = question_dim, passage_dim
        self.q_proj = nn.Linear(question_dim, passage_dim)  # W^(Q), b^(Q)
        self.doc_sentinel = nn.Parameter(torch.randn(passage_dim) * 0.1)  # d_∅
        self.q_sentinel = nn.Parameter(torch.randn(question_dim) * 0.1)  # q_∅, in the question's input space (before W^(Q))
        self.lstm = nn.LSTM(3 * passage_dim, passage_dim, batch_first=True, bidirectional=True) if fusion else None

    def forward(
        self, question: Tensor, passage: Tensor, *, question_mask: Tensor | None = None, passage_mask: Tensor | None = None
    ) -> DCNOutput:
        """``question (B, n, d_q)``, ``passage`` (the document ``D``) ``(B, m, ℓ)`` -> :class:`DCNOutput`."""
        question, document = _check_pair(self, question, passage, question_mask, passage_mask)
        b, n, m, ell = question.shape[0], question.shape[1], document.shape[1], self.passage_dim
        if b == 0:
            z = document.new_zeros
            return DCNOutput(z(0, m + 1, 2 * ell), z(0, n + 1, ell), z(0, m + 1, n + 1), z(0, m + 1, n + 1), z(0, n + 1, m + 1),
                             z(0, m, 2 * ell) if self.lstm is not None else None)
        qm = question_mask if question_mask is not None else question.new_ones(b, n, dtype=torch.bool)
        dm = passage_mask if passage_mask is not None else document.new_ones(b, m, dtype=torch.bool)
        ones = qm.new_ones(b, 1)
        qm_s, dm_s = torch.cat([qm, ones], 1), torch.cat([dm, ones], 1)  # sentinels are real: (B, n+1), (B, m+1)
        q_in = torch.cat([question, self.q_sentinel.expand(b, 1, self.question_dim)], 1)  # Q' = [Q'; q_∅]: (B, n+1, d_q)
        q = torch.tanh(self.q_proj(q_in))  # Q = tanh(W^(Q) Q' + b^(Q)), sentinel included: (B, n+1, ℓ)
        d = torch.cat([document, self.doc_sentinel.expand(b, 1, ell)], 1)  # (B, m+1, ℓ)
        aff = d @ q.transpose(1, 2)  # L = D^T Q: (B, m+1, n+1)
        both = dm_s[:, :, None] & qm_s[:, None, :]
        a_q = masked_softmax(aff.transpose(1, 2), both.transpose(1, 2))  # (A^Q)^T: each question word over the document (B, n+1, m+1)
        a_d = masked_softmax(aff, both)  # A^D, transposed: each document word over the question (B, m+1, n+1)
        c_q = a_q @ d  # C^Q = D A^Q, transposed: (B, n+1, ℓ)
        c_d = a_d @ torch.cat([q, c_q], -1)  # C^D = [Q; C^Q] A^D, transposed: (B, m+1, 2ℓ)
        encoding = None
        if self.lstm is not None:
            encoding = self._fuse(torch.cat([d, c_d], -1)[:, :m], dm)  # U = BiLSTM([D; C^D]): (B, m, 2ℓ)
        return DCNOutput(c_d, c_q, aff, a_d, a_q, encoding)

    def _fuse(self, fused: Tensor, mask: Tensor) -> Tensor:
        """The BiLSTM over the real document words only, whatever the mask: ``(B, m, 3ℓ)``, ``(B, m)`` -> ``(B, m, 2ℓ)``.

        Packing by lengths assumes the real words come first (right padding). Any
        other mask (left padding, holes) is handled by gathering each example's
        real words to the front, in order, packing those, and gathering the
        outputs back to their positions; padded rows come out zero. The LSTM
        thus reads exactly the sequence of real words, as if run on them alone.
        """
        assert self.lstm is not None  # called only when fusion=True built the BiLSTM
        m = fused.shape[1]
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # real positions first, in order: (B, m)
        compact = fused.gather(1, order[..., None].expand_as(fused))  # (B, m, 3ℓ): real words, then padding
        lengths = mask.sum(-1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(compact, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=m)  # zeros after each length
        back = order.argsort(1)  # where each original position went in the compact order
        return out.gather(1, back[..., None].expand(-1, -1, out.shape[-1]))  # padded positions read a zero row


class BiDAFAttention(nn.Module):
    r"""BiDAF's attention flow layer (Seo et al. 2017, section 2.4): trilinear similarity, attention both ways.

    Args:
        dim: ``d``, the width of both inputs (the paper's ``2d``: its inputs
            are BiLSTM states of one width, which the product
            :math:`v_n \circ q_t` needs).

    ``forward(question (B, T, d), passage (B, N, d), *, question_mask=None, passage_mask=None)`` ->
    :class:`BiDAFOutput`. The similarity
    :math:`S_{nt} = w_S^\top [v_n; q_t; v_n \circ q_t]` is computed as
    :math:`w_v^\top v_n + w_q^\top q_t + (v_n \circ w_{vq})^\top q_t`
    (the three thirds of :math:`w_S`), never forming the ``(B, N, T, 3d)``
    concatenation. Padded question positions get no context-to-query weight
    and take no part in the max of query-to-context; padded passage positions
    get no query-to-context weight and a zero row of ``G``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        check_int("dim", dim)
        self.question_dim = self.passage_dim = self.dim = dim
        self.w_s = nn.Linear(3 * dim, 1, bias=False)  # w_S = [w_v; w_q; w_vq]

    def forward(
        self, question: Tensor, passage: Tensor, *, question_mask: Tensor | None = None, passage_mask: Tensor | None = None
    ) -> BiDAFOutput:
        question, passage = _check_pair(self, question, passage, question_mask, passage_mask)
        b, t, n, d = question.shape[0], question.shape[1], passage.shape[1], self.dim
        if b == 0:
            z = passage.new_zeros
            return BiDAFOutput(z(0, n, t), z(0, n, t), z(0, n), z(0, n, d), z(0, d), z(0, n, 4 * d))
        qm = question_mask if question_mask is not None else question.new_ones(b, t, dtype=torch.bool)
        vm = passage_mask if passage_mask is not None else passage.new_ones(b, n, dtype=torch.bool)
        w_v, w_q, w_vq = self.w_s.weight[0].split(d)  # (d,) each
        s = (passage @ w_v)[:, :, None] + (question @ w_q)[:, None, :] + (passage * w_vq) @ question.transpose(1, 2)  # S: (B, N, T)
        a = masked_softmax(s, qm[:, None, :].expand(b, n, t))  # context-to-query, over the question: (B, N, T)
        q_tilde = a @ question  # q~_n = sum_t a_nt q_t: (B, N, d)
        s_max = s.masked_fill(~qm[:, None, :], float("-inf")).amax(-1)  # max over real question positions: (B, N)
        b_w = masked_softmax(s_max.masked_fill(~vm, 0.0), vm)  # query-to-context, over the passage: (B, N)
        v_tilde = (b_w[:, :, None] * passage).sum(1)  # v~ = sum_n b_n v_n: (B, d)
        g = torch.cat([passage, q_tilde, passage * q_tilde, passage * v_tilde[:, None, :]], -1)  # G: (B, N, 4d)
        g = g * vm[..., None]  # padded passage rows are zero
        return BiDAFOutput(s, a, b_w, q_tilde, v_tilde, g)
