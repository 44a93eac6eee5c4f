r"""Chapter 13 -- Adaptive attention: each head learns how far back to look, and a sentinel lets it look nowhere.

**Adaptive span** (Sukhbaatar, Grave, Bojanowski, Joulin, "Adaptive Attention
Span in Transformers", ACL 2019). Causal attention of head ``h`` over keys at
distance :math:`x = i - j \ge 0` is multiplied by a soft mask with a learned
span :math:`z_h \in [0, S]` and a fixed ramp :math:`R`:

.. math::

    m_z(x) = \operatorname{clamp}\Big(\frac{R + z - x}{R},\, 0,\, 1\Big),\qquad
    a_{ij} = \frac{m_z(i - j)\, e^{s_{ij}}}{\sum_{r \le i} m_z(i - r)\, e^{s_{ir}}},\qquad
    s_{ij} = \frac{q_i^\top k_j}{\sqrt d} + b_h(i - j),

i.e. softmax of :math:`s_{ij} + \log m_z(i-j)`. The mask is 1 up to distance
:math:`z`, falls linearly to 0 over the next :math:`R` positions, and is 0
beyond :math:`z + R`: the gradient reaches :math:`z` through the ramp. The
training loss adds the L1 cost :math:`\lambda \cdot \frac1H\sum_h z_h`
(:meth:`AdaptiveSpanAttention.span_loss`), so spans shrink unless the task
pays for them. ``b_h(x)`` is an optional learned bias per head and distance
(the paper adds learned position embeddings to the keys instead).

**Truncation.** Keys at distance :math:`\ge K = \min(S, \lceil \max_h z_h \rceil + R)`
have mask 0 for every head, so they are never read: the sequence is cut into
blocks of :math:`K` queries, each reading its own and the previous block of
keys (``(n/K, K, 2K)`` scores), as in the paper's code which trims the cache
to the largest current span. Time and memory are :math:`O(nKd)`, and they
fall as the spans shrink. :func:`adaptive_span_reference` is the dense
``n x n`` formula, the labelled baseline.

**Visual sentinel** (Lu, Xiong, Parikh, Socher, "Knowing When to Look:
Adaptive Attention via a Visual Sentinel for Image Captioning", CVPR 2017).
A decoder attends over ``k`` region features :math:`V` *or* a sentinel
vector :math:`s_t` that stands for "what the decoder already knows":

.. math::

    z = w_h^\top \tanh(W_v V + W_g h_t \mathbf 1^\top),\quad
    \hat\alpha = \operatorname{softmax}\big([z;\ w_h^\top \tanh(W_s s_t + W_g h_t)]\big),\quad
    \beta = \hat\alpha_{k+1},\quad
    \hat c = \beta\, s_t + (1 - \beta)\, c,\quad c = \sum_i \frac{\hat\alpha_i}{1-\beta} v_i,

with :math:`s_t = g_t \odot \tanh(m_t)`, :math:`g_t = \sigma(W_x x_t + W_h h_{t-1})`
(:class:`SentinelGate`, from the LSTM's input, previous state and memory cell).
:math:`\beta \to 1` means attend to nothing in the image.

**As a kernel** of :mod:`attn.attention`: :func:`adaptive_span_kernel` (``"adaptive-span"``), to which
:class:`AdaptiveSpanAttention` passes its learned spans. With ``is_causal=False`` the same mask is applied
to ``|i - j|`` on both sides (a two-sided span for an encoder: our extension, not in the paper).
The chapter's tasks (the lag task, the sentinel's pointer task) are in :mod:`attn.experiments.adaptive`.

Shapes: ``x`` ``(batch, n, E)`` -> ``(batch, n, E)``; weights ``(batch, heads, n, n)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import AttentionBase, register_kernel
from .checks import check_heads, check_same_dtype, check_tensor, check_tokens
from .core import AttentionOutput, check_qkv, masked_softmax
from .masks import check_key_mask
from .registry import register

__all__ = [
    "span_mask",
    "span_window",
    "adaptive_span_attention",
    "adaptive_span_reference",
    "adaptive_span_kernel",
    "AdaptiveSpanAttention",
    "SentinelGate",
    "SentinelAttention",
]


def span_mask(distance: Tensor, span: Tensor, ramp: int) -> Tensor:
    r"""The soft mask :math:`m_z(x) = \operatorname{clamp}((R + z - x)/R, 0, 1)`: ``span (H,)``, ``distance (...)`` -> ``(H, ...)``."""
    z = span.reshape(-1, *([1] * distance.ndim))
    return ((ramp + z - distance.to(z.dtype)) / ramp).clamp(0.0, 1.0)


def span_window(span: Tensor, ramp: int, max_span: int) -> int:
    r"""Keys read per query: :math:`K = \min(S, \lceil \max_h z_h \rceil + R)` (distances ``0 .. K-1``; the mask is 0 beyond)."""
    return int(min(max_span, math.ceil(float(span.detach().max())) + ramp))


def _check_span_args(span: Tensor, heads: int, ramp: int, max_span: int, batch: int | None = None,
                     n: int | None = None) -> None:
    static = isinstance(span, Tensor) and span.ndim == 1 and span.shape[0] == heads
    dynamic = isinstance(span, Tensor) and batch is not None and tuple(span.shape) == (batch, heads, n)
    if not (static or dynamic):
        shape = f"(heads={heads},)" + ("" if batch is None else f" or, per query, (batch={batch}, heads={heads}, n={n})")
        raise ValueError(f"span must be a tensor of shape {shape}, got {getattr(span, 'shape', type(span).__name__)}")
    for name, value in (("ramp", ramp), ("max_span", max_span)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _blocks(x: Tensor, w: int, n_pad: int, value: float | bool = 0.0, ahead: bool = False) -> Tensor:
    """``(..., n, d)`` (or bool ``(..., n)``) -> ``(..., n_pad / w, 2w, ...)``: each block with the block before it
    (``ahead=True``: and the block after it, ``3w``)."""
    feature = x.dtype != torch.bool
    n = x.shape[-2] if feature else x.shape[-1]
    size = 3 * w if ahead else 2 * w
    pad = (w, n_pad - n + (w if ahead else 0))  # one block of padding in front, the rest at the end
    if feature:
        return F.pad(x, (0, 0, *pad), value=value).unfold(-2, size, w).transpose(-1, -2)  # (..., nb, size, d)
    return F.pad(x, pad, value=bool(value)).unfold(-1, size, w)  # (..., nb, size)


def adaptive_span_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    span: Tensor,
    ramp: int,
    max_span: int,
    rel_bias: Tensor | None = None,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    truncate: bool = True,
    need_weights: bool = False,
    causal: bool = True,
    dropout_p: float = 0.0,
) -> AttentionOutput:
    r"""Attention under the soft span mask, computed blockwise over the nearest ``K`` keys only.

    Args:
        q, k, v: ``(batch, heads, n, d)``.
        span: ``z`` ``(heads,)``, in tokens, differentiable; values outside ``[0, max_span]`` are clamped.
            ``(batch, heads, n)``: a span per query (the paper's dynamic span, :math:`z_t`); ``K``
            then follows the largest span of the batch.
        ramp: ``R`` (tokens).
        max_span: ``S``: no query reads further than ``S - 1`` positions away.
        rel_bias: optional ``(heads, max_span)`` bias added to the score at each distance.
        key_mask: ``(batch, n)``, ``True`` = real token.
        scale: default ``1 / sqrt(d)``.
        truncate: ``True``: read only keys at distance ``< K`` (:func:`span_window`).
            ``False``: read all ``S`` (same result, full cost: the fixed-span baseline's cost).
        need_weights: also return the dense ``(batch, heads, n, n)`` weights (small ``n`` only).
        causal: ``True`` (the paper's language model): keys ``j <= i`` at distance ``i - j``, each block of
            ``K`` queries reads its own and the previous block. ``False``: the same mask on ``|i - j|`` on both
            sides (an encoder's two-sided span, our extension), each block reading the blocks before and after.
        dropout_p: dropout on the attention weights (pass 0 in evaluation).

    Returns:
        ``(output (batch, heads, n, d_v), weights or None)``; queries that see no key get zeros.
    """
    check_qkv(q, k, v)
    if q.ndim != 4 or q.shape[-2] != k.shape[-2]:
        raise ValueError(f"q, k, v must be (batch, heads, n, d) with as many queries as keys, got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, heads, n, d = q.shape
    _check_span_args(span, heads, ramp, max_span, batch, n)
    check_key_mask(key_mask, batch, n, length_name="n")
    if rel_bias is not None and tuple(rel_bias.shape) != (heads, max_span):
        raise ValueError(f"rel_bias must have shape (heads={heads}, max_span={max_span}), got {tuple(rel_bias.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    z = span.clamp(0.0, float(max_span))

    w = min(span_window(z, ramp, max_span) if truncate else max_span, n)  # K: block size = keys read per query
    nb = -(-n // w)
    n_pad = nb * w
    ahead = not causal
    qb = rearrange(F.pad(q, (0, 0, 0, n_pad - n)), "b h (nb w) d -> (b nb) h w d", w=w)  # (B*nb, H, w, d)
    kb = rearrange(_blocks(k, w, n_pad, ahead=ahead), "b h nb s d -> (b nb) h s d")  # (B*nb, H, 2w or 3w, d)
    vb = rearrange(_blocks(v, w, n_pad, ahead=ahead), "b h nb s d -> (b nb) h s d")

    # the same geometry in every block: query row r, key column c, signed distance x = w + r - c
    cols = kb.shape[-2]
    dist = w + torch.arange(w, device=q.device)[:, None] - torch.arange(cols, device=q.device)[None, :]
    far = dist.abs()
    if z.ndim == 1:
        m = span_mask(far, z, ramp)  # (H, w, cols)
    else:  # a span per query: z (B, H, n) -> (B*nb, H, w, 1), the mask (B*nb, H, w, cols)
        zq = rearrange(F.pad(z, (0, n_pad - n)), "b h (nb w) -> (b nb) h w 1", w=w)
        m = ((ramp + zq - far.to(zq.dtype)) / ramp).clamp(0.0, 1.0)
    allowed = (far < w) & (m > 0)  # within K, inside the span
    if causal:
        allowed = allowed & (dist >= 0)
    neg = torch.full((), torch.finfo(q.dtype).min / 4, dtype=q.dtype, device=q.device)  # "minus infinity", finite when added twice
    bias = m.clamp_min(torch.finfo(m.dtype).tiny).log()  # log m
    if rel_bias is not None:
        bias = bias + rel_bias[:, far.clamp(0, max_span - 1)]
    bias = torch.where(allowed, bias.to(q.dtype), neg)  # (H, w, cols): one mask for every block (static spans)
    # keys that exist: inside [0, n) and not padding -> (B*nb, 1, 1, cols)
    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    real = rearrange(_blocks(real, w, n_pad, value=False, ahead=ahead), "b nb s -> (b nb) 1 1 s")

    if need_weights:  # the weights themselves: explicit scores and softmax
        scores = torch.matmul(qb * scale, kb.transpose(-1, -2)) + bias  # (B*nb, H, w, cols)
        weights_b = masked_softmax(scores, allowed & real)
        out = torch.matmul(F.dropout(weights_b, dropout_p) if dropout_p else weights_b, vb)
    elif key_mask is None and causal and z.ndim == 1:  # fused kernel; only block 0 of each example has missing keys (its "previous block")
        first = bias.clone()
        first[..., :w] = neg  # block 0 reads no previous block
        qn, kn, vn = (t.view(batch, nb, *t.shape[1:]) for t in (qb, kb, vb))  # (B, nb, H, ., d)
        out = F.scaled_dot_product_attention(qn[:, 0], kn[:, 0], vn[:, 0], attn_mask=first, scale=scale,
                                             dropout_p=dropout_p)[:, None]
        if nb > 1:
            rest = F.scaled_dot_product_attention(qn[:, 1:].flatten(0, 1), kn[:, 1:].flatten(0, 1),
                                                  vn[:, 1:].flatten(0, 1), attn_mask=bias, scale=scale, dropout_p=dropout_p)
            out = torch.cat([out, rest.view(batch, nb - 1, *rest.shape[1:])], dim=1)  # (B, nb, H, w, d)
        out = out.flatten(0, 1)
    else:  # padding, spans per query (or keys beyond either end): a per-block mask; queries seeing no real key give 0
        mask = bias + torch.where(real, torch.zeros_like(neg), neg)  # (B*nb, H, w, cols)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, dropout_p=dropout_p)
        out = out * (allowed & real).any(-1, keepdim=True).to(out.dtype)
    out = rearrange(out, "(b nb) h w d -> b h (nb w) d", b=batch)[:, :, :n]

    weights = None
    if need_weights:  # scatter the (w, cols) blocks into the dense (n, n) matrix
        weights_b = rearrange(weights_b, "(b nb) h w s -> b nb h w s", b=batch)
        idx = torch.arange(nb, device=q.device)[:, None] * w + torch.arange(cols, device=q.device)[None, :]  # padded key index
        dense = weights_b.new_zeros(batch, nb, heads, w, n_pad + cols - w)
        dense = dense.scatter(-1, idx[None, :, None, None, :].expand_as(weights_b), weights_b)
        weights = rearrange(dense, "b nb h w j -> b h (nb w) j")[:, :, :n, w : w + n]
    return AttentionOutput(out, weights)


def adaptive_span_reference(
    q: Tensor, k: Tensor, v: Tensor, span: Tensor, ramp: int, max_span: int,
    rel_bias: Tensor | None = None, key_mask: Tensor | None = None, causal: bool = True,
) -> AttentionOutput:
    r"""Baseline: the paper's formula on the dense ``n x n`` scores, ``softmax(s) * m_z`` renormalised (:math:`O(n^2 d)`).

    ``span`` ``(heads,)``, or ``(batch, heads, n)`` for a span per query (dynamic span).

    Softmax over the causal keys within ``max_span`` (``causal=False``: the keys within ``max_span`` on
    both sides, the mask on ``|i - j|``), multiplied by the mask, divided by the row sum (rows with no
    weight left give zeros). For checks only.
    """
    n, d = q.shape[-2], q.shape[-1]
    i = torch.arange(n, device=q.device)
    dist = i[:, None] - i[None, :]  # (n, n)
    far = dist.abs()
    inside = (far < max_span) & (dist >= 0) if causal else far < max_span
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if rel_bias is not None:
        scores = scores + rel_bias[:, far.clamp(0, max_span - 1)] * inside
    mask = inside if key_mask is None else inside & key_mask[:, None, None, :]
    z = span.clamp(0, max_span)
    # (H, n, n); with a span per query (B, H, n): the ramp of each query's own span, (B, H, n, n)
    m = span_mask(far, z, ramp) if z.ndim == 1 else ((ramp + z[..., None] - far.to(z.dtype)) / ramp).clamp(0.0, 1.0)
    a = masked_softmax(scores, mask) * m * mask
    total = a.sum(-1, keepdim=True)
    a = torch.where(total > 0, a / total.clamp_min(1e-30), torch.zeros_like(a))
    return AttentionOutput(a @ v, a)


@register_kernel("adaptive-span", summary="softmax under a soft span mask m_z(|i - j|) per head, read blockwise over K keys",
                 attn_mask=False, dense=False)
def adaptive_span_kernel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    span: Tensor | None = None,
    ramp: int = 32,
    max_span: int = 256,
    rel_bias: Tensor | None = None,
    truncate: bool = True,
) -> AttentionOutput:
    """:func:`adaptive_span_attention` as a kernel: ``q, k, v (B, h, n, d)`` (self-attention: as many queries as keys).

    ``span`` ``(h,)`` (or ``(B, h, n)``, a span per query) is the learned state (:class:`AdaptiveSpanAttention`
    passes its spans); ``None``
    gives every head the full span ``max_span``. Only ``key_mask`` and ``is_causal`` are taken (no
    ``L x S`` mask exists); a general ``attn_mask`` raises a ``ValueError``.
    """
    if attn_mask is not None:
        raise ValueError("the adaptive-span kernel takes only key_mask and is_causal (its span is the pattern), "
                         "not an attn_mask")
    if span is None:
        span = q.new_full((q.shape[1],), float(max_span))
    if q.shape[0] == 0:  # an empty batch
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        return AttentionOutput(out, q.new_zeros(*q.shape[:-1], k.shape[-2]) if need_weights else None)
    return adaptive_span_attention(q, k, v, span, ramp, max_span, rel_bias=rel_bias, key_mask=key_mask, scale=scale,
                                   truncate=truncate, need_weights=need_weights, causal=is_causal, dropout_p=dropout_p)


def _build_adaptive(embed_dim: int, num_heads: int) -> AdaptiveSpanAttention:
    return AdaptiveSpanAttention(embed_dim, num_heads, max_span=64, ramp=8, init_span=1.0)


@register(
    "adaptive-span",
    paper="Sukhbaatar et al. 2019",
    complexity="O(n K d), K = max span + R",
    chapter=13,
    summary="causal attention with a learned soft span per head, truncated to the largest span",
    build=_build_adaptive,
    kernel="adaptive-span",
    causal=True,
)
class AdaptiveSpanAttention(AttentionBase):
    r"""Multi-head self-attention with a learned span per head (Sukhbaatar et al. 2019), causal by default.

    An :class:`~attn.attention.AttentionBase` around :func:`adaptive_span_kernel`, whose learned spans
    (and distance biases) are state: :meth:`attend` passes them to the kernel.

    Args:
        embed_dim, num_heads: ``E`` and ``H``.
        max_span: ``S``, the longest span (keys at distance ``>= S`` are never read).
        ramp: ``R``, the width of the soft edge (the paper uses 32).
        init_span: initial ``z / S`` in ``[0, 1]`` (the paper starts at 0 and lets spans grow;
            ``1.0`` starts as full causal attention over ``S`` keys).
        rel_bias: learn a bias per head and distance ``b_h(x)`` (zeros at init).
        adaptive: ``False`` freezes the spans at ``init_span`` (the fixed-span baseline).
        dynamic: a span per token instead of per head, the paper's *dynamic attention span*:
            :math:`z_{t,h} = S\,\sigma(v_h^\top x_t + b_h)` (``span_proj``, a linear map ``E -> H``
            whose bias starts at ``logit(init_span)`` and weight at 0). The L1 cost is then the mean
            of the last forward's :math:`z_{t,h}`, and the window ``K`` follows the batch's largest span.
        truncate: read only the keys inside the largest current span (``False``: all ``S``).
        causal: the default of ``is_causal`` (``True``, the paper's language model; ``False``: the span on both sides).
        dropout: dropout on the attention weights while training.
        bias: biases of the projections.

    The spans are ``z = S * p`` with ``p`` a parameter kept in ``[0, 1]`` (clamped
    before each training forward, as the paper clamps after each step). Projections are
    :class:`~attn.attention.AttentionBase`'s (state dicts interchangeable with
    :class:`attn.multihead.MultiHeadAttention`'s, plus ``span_param`` and ``rel_bias``).
    Shapes: ``x (B, n, E)`` -> ``(B, n, E)``; weights ``(B, H, n, n)``.
    """

    rel_bias: nn.Parameter | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        max_span: int = 256,
        ramp: int = 32,
        init_span: float = 1.0,
        rel_bias: bool = True,
        adaptive: bool = True,
        dynamic: bool = False,
        truncate: bool = True,
        causal: bool = True,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        check_heads(embed_dim, num_heads)
        _check_span_args(torch.zeros(num_heads), num_heads, ramp, max_span)
        if not 0.0 <= init_span <= 1.0:
            raise ValueError(f"init_span is z / max_span and must be in [0, 1], got {init_span}")
        super().__init__(embed_dim, num_heads, kernel="adaptive-span", causal=causal, dropout=dropout, bias=bias)
        self.max_span, self.ramp, self.truncate = max_span, ramp, truncate
        self.span_param = nn.Parameter(torch.full((num_heads,), float(init_span)), requires_grad=adaptive)  # p = z / S
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, max_span)) if rel_bias else None
        self.dynamic = dynamic
        self.span_proj: nn.Linear | None = None
        self._token_spans: Tensor | None = None  # z_{t,h} of the last forward (dynamic span), (B, H, n)
        if dynamic:
            self.span_proj = nn.Linear(embed_dim, num_heads)  # v_h, b_h
            p0 = min(max(float(init_span), 1e-3), 1 - 1e-3)
            nn.init.zeros_(self.span_proj.weight)
            nn.init.constant_(self.span_proj.bias, math.log(p0 / (1 - p0)))

    @property
    def spans(self) -> Tensor:
        """``z`` per head, in tokens: ``(H,)``. Dynamic span: the mean over the last forward's tokens, per head."""
        if self.dynamic:
            if self._token_spans is None:
                raise RuntimeError("a dynamic span exists per token: call the layer first")
            return self._token_spans.mean((0, 2))
        return self.max_span * self.span_param.clamp(0.0, 1.0)

    def token_spans(self, x: Tensor) -> Tensor:
        r"""Dynamic span: :math:`z_{t,h} = S\,\sigma(v_h^\top x_t + b_h)` for ``x (B, n, E)`` -> ``(B, H, n)``."""
        if self.span_proj is None:
            raise RuntimeError("token_spans needs a layer built with dynamic=True")
        return self.max_span * torch.sigmoid(self.span_proj(x)).transpose(1, 2)

    def window(self) -> int:
        """Keys read per query now: :func:`span_window` of the current spans (``S`` without truncation).

        Dynamic span: of the largest span per token of the last forward.
        """
        if not self.truncate:
            return self.max_span
        if self.dynamic:
            if self._token_spans is None:
                raise RuntimeError("a dynamic span exists per token: call the layer first")
            return span_window(self._token_spans.amax((0, 2)), self.ramp, self.max_span)
        return span_window(self.spans, self.ramp, self.max_span)

    def span_loss(self) -> Tensor:
        r"""The L1 span cost :math:`\frac1H\sum_h z_h` in tokens (multiply by :math:`\lambda` and add to the loss).

        Dynamic span: the mean of :math:`z_{t,h}` over the last forward's tokens and heads.
        """
        if self.dynamic:
            if self._token_spans is None:
                raise RuntimeError("a dynamic span exists per token: call the layer first")
            return self._token_spans.mean()
        return self.spans.mean()

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)``, ``key_mask (B, n)`` (``True`` = real) -> ``(output (B, n, E), weights (B, H, n, n) | None)``.

        ``is_causal`` ``None`` keeps the layer's ``causal``; ``False`` reads the span on both sides.
        """
        x = check_tokens(x, self.embed_dim, "x")
        if self.training and self.span_param.requires_grad:
            with torch.no_grad():
                self.span_param.clamp_(0.0, 1.0)
        if self.dynamic:
            self._token_spans = self.token_spans(x)
        return self.mix(x, x, x, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attn_mask: Tensor | None,
        key_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
        scale: float,
        need_weights: bool,
    ) -> AttentionOutput:
        """:func:`adaptive_span_kernel` with this layer's spans and distance biases."""
        span = self._token_spans if self.dynamic else self.spans
        if span is None:
            raise RuntimeError("a dynamic span exists per token: call the layer (forward), not attend, directly")
        return adaptive_span_kernel(
            q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
            need_weights=need_weights, span=span, ramp=self.ramp, max_span=self.max_span,
            rel_bias=self.rel_bias, truncate=self.truncate,
        )


# ----------------------------------------------------------------------------- the visual sentinel


class SentinelGate(nn.Module):
    r"""The sentinel :math:`s_t = \sigma(W_x x_t + W_h h_{t-1}) \odot \tanh(m_t)` (Lu et al. 2017, eq. 9-10).

    ``x_t (B, input_dim)``, ``h_prev (B, hidden_dim)``, ``m_t (B, hidden_dim)`` (the LSTM's memory cell) -> ``s_t (B, hidden_dim)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.w_x = nn.Linear(input_dim, hidden_dim)
        self.w_h = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x_t: Tensor, h_prev: Tensor, m_t: Tensor) -> Tensor:
        x_t = check_tensor(x_t, "x_t", f"(batch, {self.input_dim})", 2)
        for name, t in (("h_prev", h_prev), ("m_t", m_t)):
            check_tensor(t, name, f"(batch, {self.hidden_dim})", 2)
            if t.shape != (x_t.shape[0], self.hidden_dim):
                raise ValueError(f"{name} must have shape (batch={x_t.shape[0]}, {self.hidden_dim}), got {tuple(t.shape)}")
        if x_t.shape[-1] != self.input_dim:
            raise ValueError(f"x_t must have shape (batch, {self.input_dim}), got {tuple(x_t.shape)}")
        return torch.sigmoid(self.w_x(x_t) + self.w_h(h_prev)) * torch.tanh(m_t)


@register(
    "sentinel",
    paper="Lu et al. 2017",
    complexity="O(k d a)",
    chapter=13,
    data="set",
    summary="additive attention over k features plus a visual sentinel: a gate to attend to nothing",
)
class SentinelAttention(nn.Module):
    r"""Adaptive attention with a visual sentinel (Lu et al. 2017, eq. 6 and 11-12): attend to ``k`` features or to nothing.

    Args:
        dim: width ``d`` of the features, the hidden state and the sentinel (the paper projects all to one width).
        attn_dim: width of the additive scoring layer.

    ``forward(features (B, k, d), h (B, d), sentinel (B, d), key_mask (B, k))`` returns
    ``(context (B, d), weights (B, k + 1))``: the last weight is :math:`\beta`, the
    share given to the sentinel. With every feature masked, :math:`\beta = 1`.
    """

    def __init__(self, dim: int, attn_dim: int | None = None) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        attn_dim = attn_dim or dim
        self.dim, self.attn_dim = dim, attn_dim
        self.w_v = nn.Linear(dim, attn_dim, bias=False)  # W_v
        self.w_g = nn.Linear(dim, attn_dim, bias=False)  # W_g
        self.w_s = nn.Linear(dim, attn_dim, bias=False)  # W_s
        self.w_h = nn.Linear(attn_dim, 1, bias=False)  # w_h

    def forward(self, features: Tensor, h: Tensor, sentinel: Tensor, key_mask: Tensor | None = None) -> AttentionOutput:
        """Context :math:`\\hat c` ``(B, d)`` and weights :math:`\\hat\\alpha` ``(B, k + 1)`` (sentinel last)."""
        features = check_tensor(features, "features", f"(batch, k, {self.dim})", 3)
        if features.shape[-1] != self.dim:
            raise ValueError(f"features must have shape (batch, k, {self.dim}), got {tuple(features.shape)}")
        b, k = features.shape[:2]
        for name, t in (("h", h), ("sentinel", sentinel)):
            check_tensor(t, name, f"(batch, {self.dim})", 2)
            if tuple(t.shape) != (b, self.dim):
                raise ValueError(f"{name} must have shape (batch={b}, {self.dim}), got {tuple(t.shape)}")
        check_same_dtype(("features", features), ("h", h), ("sentinel", sentinel))
        check_key_mask(key_mask, b, k, length_name="k")
        g = self.w_g(h)[:, None, :]  # (B, 1, a)
        z = self.w_h(torch.tanh(self.w_v(features) + g)).squeeze(-1)  # (B, k): scores of the features
        z_s = self.w_h(torch.tanh(self.w_s(sentinel)[:, None, :] + g)).squeeze(-1)  # (B, 1): score of the sentinel
        mask = None
        if key_mask is not None:
            mask = torch.cat([key_mask, key_mask.new_ones(b, 1)], dim=1)  # the sentinel is always visible
        alpha = masked_softmax(torch.cat([z, z_s], dim=1), mask)  # (B, k + 1)
        beta = alpha[:, -1:]  # (B, 1)
        # beta s + (1 - beta) c with c = sum_i alpha_i / (1 - beta) v_i  ==  beta s + sum_i alpha_i v_i
        context = beta * sentinel + torch.einsum("bk,bkd->bd", alpha[:, :-1], features)
        return AttentionOutput(context, alpha)
