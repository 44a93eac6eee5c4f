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

Shapes: ``x`` ``(batch, n, E)`` -> ``(batch, n, E)``; weights ``(batch, heads, n, n)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .checks import check_heads, check_same_dtype, check_tensor, check_tokens, empty_batch
from .core import AttentionOutput, check_qkv, masked_softmax
from .masks import check_key_mask
from .registry import OwnTask, register

__all__ = [
    "span_mask",
    "span_window",
    "adaptive_span_attention",
    "adaptive_span_reference",
    "AdaptiveSpanAttention",
    "SentinelGate",
    "SentinelAttention",
    "SentinelPointer",
    "sentinel_loss",
    "make_sentinel_task",
    "LagTask",
    "SpanModel",
    "lag_loss",
]


def span_mask(distance: Tensor, span: Tensor, ramp: int) -> Tensor:
    r"""The soft mask :math:`m_z(x) = \operatorname{clamp}((R + z - x)/R, 0, 1)`: ``span (H,)``, ``distance (...)`` -> ``(H, ...)``."""
    z = span.reshape(-1, *([1] * distance.ndim))
    return ((ramp + z - distance.to(z.dtype)) / ramp).clamp(0.0, 1.0)


def span_window(span: Tensor, ramp: int, max_span: int) -> int:
    r"""Keys read per query: :math:`K = \min(S, \lceil \max_h z_h \rceil + R)` (distances ``0 .. K-1``; the mask is 0 beyond)."""
    return int(min(max_span, math.ceil(float(span.detach().max())) + ramp))


def _check_span_args(span: Tensor, heads: int, ramp: int, max_span: int) -> None:
    if not isinstance(span, Tensor) or span.ndim != 1 or span.shape[0] != heads:
        raise ValueError(f"span must be a tensor of shape (heads={heads},), got {getattr(span, 'shape', type(span).__name__)}")
    for name, value in (("ramp", ramp), ("max_span", max_span)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _blocks(x: Tensor, w: int, n_pad: int, value: float | bool = 0.0) -> Tensor:
    """``(..., n, d)`` (or bool ``(..., n)``) -> ``(..., n_pad / w, 2w, ...)``: each block with the block before it."""
    feature = x.dtype != torch.bool
    n = x.shape[-2] if feature else x.shape[-1]
    pad = (w, n_pad - n)  # one block of padding in front, the rest at the end
    if feature:
        return F.pad(x, (0, 0, *pad), value=value).unfold(-2, 2 * w, w).transpose(-1, -2)  # (..., nb, 2w, d)
    return F.pad(x, pad, value=bool(value)).unfold(-1, 2 * w, w)  # (..., nb, 2w)


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
) -> AttentionOutput:
    r"""Causal attention under the soft span mask, computed blockwise over the last ``K`` keys only.

    Args:
        q, k, v: ``(batch, heads, n, d)``.
        span: ``z`` ``(heads,)``, in tokens, differentiable; values outside ``[0, max_span]`` are clamped.
        ramp: ``R`` (tokens).
        max_span: ``S``: no query reads further back than ``S - 1`` positions.
        rel_bias: optional ``(heads, max_span)`` bias added to the score at each distance.
        key_mask: ``(batch, n)``, ``True`` = real token.
        scale: default ``1 / sqrt(d)``.
        truncate: ``True``: read only keys at distance ``< K`` (:func:`span_window`).
            ``False``: read all ``S`` (same result, full cost: the fixed-span baseline's cost).
        need_weights: also return the dense ``(batch, heads, n, n)`` weights (small ``n`` only).

    Returns:
        ``(output (batch, heads, n, d_v), weights or None)``; queries that see no key get zeros.
    """
    check_qkv(q, k, v)
    if q.ndim != 4 or q.shape[-2] != k.shape[-2]:
        raise ValueError(f"q, k, v must be (batch, heads, n, d) with as many queries as keys, got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, heads, n, d = q.shape
    _check_span_args(span, heads, ramp, max_span)
    check_key_mask(key_mask, batch, n, length_name="n")
    if rel_bias is not None and tuple(rel_bias.shape) != (heads, max_span):
        raise ValueError(f"rel_bias must have shape (heads={heads}, max_span={max_span}), got {tuple(rel_bias.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    z = span.clamp(0.0, float(max_span))

    w = min(span_window(z, ramp, max_span) if truncate else max_span, n)  # K: block size = keys read per query
    nb = -(-n // w)
    n_pad = nb * w
    qb = rearrange(F.pad(q, (0, 0, 0, n_pad - n)), "b h (nb w) d -> (b nb) h w d", w=w)  # (B*nb, H, w, d)
    kb = rearrange(_blocks(k, w, n_pad), "b h nb s d -> (b nb) h s d")  # (B*nb, H, 2w, d)
    vb = rearrange(_blocks(v, w, n_pad), "b h nb s d -> (b nb) h s d")

    # the same (w, 2w) geometry in every block: query row r, key column c, distance x = w + r - c
    dist = w + torch.arange(w, device=q.device)[:, None] - torch.arange(2 * w, device=q.device)[None, :]
    m = span_mask(dist.clamp(min=0), z, ramp)  # (H, w, 2w)
    allowed = (dist >= 0) & (dist < w) & (m > 0)  # causal, within K, inside the span
    neg = torch.full((), torch.finfo(q.dtype).min / 4, dtype=q.dtype, device=q.device)  # "minus infinity", finite when added twice
    bias = m.clamp_min(torch.finfo(m.dtype).tiny).log()  # log m
    if rel_bias is not None:
        bias = bias + rel_bias[:, dist.clamp(0, max_span - 1)]
    bias = torch.where(allowed, bias.to(q.dtype), neg)  # (H, w, 2w): one additive mask for every block
    # keys that exist: inside [0, n) and not padding -> (B*nb, 1, 1, 2w)
    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    real = rearrange(_blocks(real, w, n_pad, value=False), "b nb s -> (b nb) 1 1 s")

    if need_weights:  # the weights themselves: explicit scores and softmax
        scores = torch.matmul(qb * scale, kb.transpose(-1, -2)) + bias  # (B*nb, H, w, 2w)
        weights_b = masked_softmax(scores, allowed & real)
        out = torch.matmul(weights_b, vb)
    elif key_mask is None:  # fused kernel; only block 0 of each example has missing keys (its "previous block")
        first = bias.clone()
        first[..., :w] = neg  # block 0 reads no previous block
        qn, kn, vn = (t.view(batch, nb, *t.shape[1:]) for t in (qb, kb, vb))  # (B, nb, H, ., d)
        out = F.scaled_dot_product_attention(qn[:, 0], kn[:, 0], vn[:, 0], attn_mask=first, scale=scale)[:, None]
        if nb > 1:
            rest = F.scaled_dot_product_attention(qn[:, 1:].flatten(0, 1), kn[:, 1:].flatten(0, 1),
                                                  vn[:, 1:].flatten(0, 1), attn_mask=bias, scale=scale)
            out = torch.cat([out, rest.view(batch, nb - 1, *rest.shape[1:])], dim=1)  # (B, nb, H, w, d)
        out = out.flatten(0, 1)
    else:  # padding: a per-block mask, and queries that see no real key give zeros
        mask = bias + torch.where(real, torch.zeros_like(neg), neg)  # (B*nb, H, w, 2w)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        out = out * (allowed & real).any(-1, keepdim=True).to(out.dtype)
    out = rearrange(out, "(b nb) h w d -> b h (nb w) d", b=batch)[:, :, :n]

    weights = None
    if need_weights:  # scatter the (w, 2w) blocks into the dense (n, n) matrix
        weights_b = rearrange(weights_b, "(b nb) h w s -> b nb h w s", b=batch)
        cols = torch.arange(nb, device=q.device)[:, None] * w + torch.arange(2 * w, device=q.device)[None, :]  # padded key index
        dense = weights_b.new_zeros(batch, nb, heads, w, n_pad + w)
        dense = dense.scatter(-1, cols[None, :, None, None, :].expand_as(weights_b), weights_b)
        weights = rearrange(dense, "b nb h w j -> b h (nb w) j")[:, :, :n, w : w + n]
    return AttentionOutput(out, weights)


def adaptive_span_reference(
    q: Tensor, k: Tensor, v: Tensor, span: Tensor, ramp: int, max_span: int,
    rel_bias: Tensor | None = None, key_mask: Tensor | None = None,
) -> AttentionOutput:
    r"""Baseline: the paper's formula on the dense ``n x n`` scores, ``softmax(s) * m_z`` renormalised (:math:`O(n^2 d)`).

    Softmax over the causal keys within ``max_span``, multiplied by the mask,
    divided by the row sum (rows with no weight left give zeros). For checks only.
    """
    n, d = q.shape[-2], q.shape[-1]
    i = torch.arange(n, device=q.device)
    dist = i[:, None] - i[None, :]  # (n, n)
    inside = (dist >= 0) & (dist < max_span)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if rel_bias is not None:
        scores = scores + rel_bias[:, dist.clamp(0, max_span - 1)] * inside
    mask = inside if key_mask is None else inside & key_mask[:, None, None, :]
    a = masked_softmax(scores, mask) * span_mask(dist.clamp(min=0), span.clamp(0, max_span), ramp) * mask
    total = a.sum(-1, keepdim=True)
    a = torch.where(total > 0, a / total.clamp_min(1e-30), torch.zeros_like(a))
    return AttentionOutput(a @ v, a)


def _build_adaptive(embed_dim: int, num_heads: int) -> AdaptiveSpanAttention:
    return AdaptiveSpanAttention(embed_dim, num_heads, max_span=64, ramp=8, init_span=1.0)


@register(
    "adaptive-span",
    paper="Sukhbaatar et al. 2019",
    complexity="O(n K d), K = max span + R",
    chapter=13,
    summary="causal attention with a learned soft span per head, truncated to the largest span",
    build=_build_adaptive,
)
class AdaptiveSpanAttention(nn.Module):
    r"""Multi-head causal self-attention with a learned span per head (Sukhbaatar et al. 2019).

    Args:
        embed_dim, num_heads: ``E`` and ``H``.
        max_span: ``S``, the longest span (keys at distance ``>= S`` are never read).
        ramp: ``R``, the width of the soft edge (the paper uses 32).
        init_span: initial ``z / S`` in ``[0, 1]`` (the paper starts at 0 and lets spans grow;
            ``1.0`` starts as full causal attention over ``S`` keys).
        rel_bias: learn a bias per head and distance ``b_h(x)`` (zeros at init).
        adaptive: ``False`` freezes the spans at ``init_span`` (the fixed-span baseline).
        truncate: read only the keys inside the largest current span (``False``: all ``S``).
        bias: biases of the projections.

    The spans are ``z = S * p`` with ``p`` a parameter kept in ``[0, 1]`` (clamped
    before each training forward, as the paper clamps after each step).
    Shapes: ``x (B, n, E)`` -> ``(B, n, E)``; weights ``(B, H, n, n)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_span: int = 256,
        ramp: int = 32,
        init_span: float = 1.0,
        rel_bias: bool = True,
        adaptive: bool = True,
        truncate: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_heads(embed_dim, num_heads)
        _check_span_args(torch.zeros(num_heads), num_heads, ramp, max_span)
        if not 0.0 <= init_span <= 1.0:
            raise ValueError(f"init_span is z / max_span and must be in [0, 1], got {init_span}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.max_span, self.ramp, self.truncate = max_span, ramp, truncate
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.span_param = nn.Parameter(torch.full((num_heads,), float(init_span)), requires_grad=adaptive)  # p = z / S
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, max_span)) if rel_bias else None

    @property
    def spans(self) -> Tensor:
        """``z`` per head, in tokens: ``(H,)``."""
        return self.max_span * self.span_param.clamp(0.0, 1.0)

    def window(self) -> int:
        """Keys read per query now: :func:`span_window` of the current spans (``S`` without truncation)."""
        return span_window(self.spans, self.ramp, self.max_span) if self.truncate else self.max_span

    def span_loss(self) -> Tensor:
        r"""The L1 span cost :math:`\frac1H\sum_h z_h` in tokens (multiply by :math:`\lambda` and add to the loss)."""
        return self.spans.mean()

    def forward(self, x: Tensor, key_mask: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        """``x (B, n, E)``, ``key_mask (B, n)`` (``True`` = real) -> ``(output (B, n, E), weights (B, H, n, n) | None)``."""
        x = check_tokens(x, self.embed_dim, "x")
        check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="n")
        if self.training and self.span_param.requires_grad:
            with torch.no_grad():
                self.span_param.clamp_(0.0, 1.0)
        if empty_batch(x):
            b, n, _ = x.shape
            return AttentionOutput(self.out_proj(x), x.new_zeros(b, self.num_heads, n, n) if need_weights else None)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out, weights = adaptive_span_attention(
            q, k, v, self.spans, self.ramp, self.max_span, rel_bias=self.rel_bias, key_mask=key_mask,
            truncate=self.truncate, need_weights=need_weights,
        )
        return AttentionOutput(self.out_proj(rearrange(out, "b h n d -> b n (h d)")), weights)


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
    task=lambda preset: make_sentinel_task(preset),
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


# ----------------------------------------------------------------------------- the sentinel's own task


class SentinelPointer(nn.Module):
    """A pointer over ``k`` items plus "none": :class:`SentinelAttention` with a learned sentinel vector.

    Items and the query are symbols from a codebook of ``n_symbols``; the query
    state is ``h = W_q e(query)``; the sentinel is a learned vector (its score
    still depends on ``h`` through :math:`W_g h`). The prediction is the
    attention itself: ``log alpha`` over the ``k`` items and the sentinel ("none").
    With ``sentinel=False`` the same pointer has no way to say "none" (the baseline).
    """

    def __init__(self, n_symbols: int, dim: int = 32, sentinel: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_symbols, dim)
        self.query = nn.Linear(dim, dim)
        self.attention = SentinelAttention(dim)
        self.sentinel = nn.Parameter(torch.randn(dim) / math.sqrt(dim)) if sentinel else None

    def forward(self, items: Tensor, query: Tensor) -> Tensor:
        """``items (B, k)``, ``query (B,)`` ids -> attention ``(B, k + 1)`` (last column: the sentinel, 0 without one)."""
        v = self.embed(items)  # (B, k, d)
        h = self.query(self.embed(query))  # (B, d)
        if self.sentinel is None:
            blocked = torch.cat([torch.ones_like(items, dtype=torch.bool), items.new_zeros(items.shape[0], 1, dtype=torch.bool)], 1)
            z = self.attention.w_h(torch.tanh(self.attention.w_v(v) + self.attention.w_g(h)[:, None])).squeeze(-1)
            return masked_softmax(torch.cat([z, z[:, :1]], 1), blocked)
        s = self.sentinel.expand(items.shape[0], -1)
        return self.attention(v, h, s).weights


def _sentinel_sample(n_symbols: int, k: int) -> Callable[[int, torch.Generator], dict[str, Tensor]]:
    def sample(batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        perm = torch.rand(batch_size, n_symbols, generator=generator).argsort(-1)  # distinct symbols per row
        items = perm[:, :k]
        present = torch.rand(batch_size, generator=generator) < 0.5
        slot = torch.randint(k, (batch_size,), generator=generator)
        query = torch.where(present, items[torch.arange(batch_size), slot], perm[:, k])  # perm[:, k] is not among the items
        label = torch.where(present, slot, torch.full_like(slot, k))  # k = "none": the sentinel
        return {"items": items, "query": query, "y": label}

    return sample


def sentinel_loss(model: SentinelPointer, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """NLL of the attention at the right item (or the sentinel when the query is absent); accuracy of its argmax."""
    alpha = model(batch["items"], batch["query"])
    loss = F.nll_loss(alpha.clamp_min(1e-9).log(), batch["y"])
    return loss, {"acc": float((alpha.argmax(-1) == batch["y"]).float().mean())}


_SENTINEL_PRESETS = {"quick": (8, 16, 60), "book": (12, 32, 300), "default": (16, 32, 600), "gpu": (32, 64, 1500)}


def make_sentinel_task(preset: str = "book") -> OwnTask[SentinelPointer]:
    """The sentinel's own task: point at the item equal to the query, or at the sentinel when there is none (half the time).

    ``preset`` sets ``(k items, width, steps)``: quick ``(8, 16, 60)``, book ``(12, 32, 300)``,
    default ``(16, 32, 600)``, gpu ``(32, 64, 1500)``. Chance is 1/(k+1); a pointer without a
    sentinel is capped at 50 %.
    """
    if preset not in _SENTINEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(_SENTINEL_PRESETS)}")
    k, dim, steps = _SENTINEL_PRESETS[preset]
    n_symbols = 4 * k
    layer = SentinelAttention(dim)

    def inputs(size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.randn(1, size, dim, generator=generator), torch.randn(1, dim, generator=generator),
                torch.randn(1, dim, generator=generator))

    return OwnTask(
        description=f"point at the item matching the query among {k}, or at the sentinel when it is absent",
        model=SentinelPointer(n_symbols, dim), sample=_sentinel_sample(n_symbols, k), loss=sentinel_loss,
        layer=layer, inputs=inputs, sizes=(64, 256, 1024, 4096), size_unit="items", steps=steps, batch_size=64,
        lr=1e-2, log_every=10, target_acc=0.9,
        weights=lambda model, batch: model(batch["items"], batch["query"]),
    )


# ----------------------------------------------------------------------------- a task where heads need different spans


class LagTask:
    """Random tokens; at every position ``i >= lag`` predict two earlier tokens: ``x[i - 1]`` and ``x[i - lag]``.

    One needs a span of 1, the other a span of ``lag``: a model with several
    heads can give one head a short span and one a long span, and needs no
    other head. ``sample`` returns ``x (B, n)`` and targets ``y (B, n, 2)`` (``-1`` where undefined).
    """

    def __init__(self, n: int = 64, vocab: int = 16, lag: int = 24) -> None:
        if not 1 < lag < n:
            raise ValueError(f"lag must satisfy 1 < lag < n, got lag={lag}, n={n}")
        self.n, self.vocab, self.lag = n, vocab, lag

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x = torch.randint(self.vocab, (batch_size, self.n), generator=generator)
        y = torch.full((batch_size, self.n, 2), -1, dtype=torch.long)
        y[:, self.lag :, 0] = x[:, self.lag - 1 : -1]  # x[i - 1]
        y[:, self.lag :, 1] = x[:, : self.n - self.lag]  # x[i - lag]
        return {"x": x, "y": y}


class SpanModel(nn.Module):
    """Embedding -> one :class:`AdaptiveSpanAttention` layer (residual, LayerNorm) -> two readouts of ``vocab`` classes.

    ``span_cost`` is :math:`\\lambda` of the L1 span penalty added by :func:`lag_loss`.
    Other arguments go to :class:`AdaptiveSpanAttention`.
    """

    def __init__(self, vocab: int, embed_dim: int = 32, num_heads: int = 4, span_cost: float = 0.0, **span_kwargs) -> None:
        super().__init__()
        self.vocab, self.span_cost = vocab, span_cost
        self.embed = nn.Embedding(vocab, embed_dim)
        self.attention = AdaptiveSpanAttention(embed_dim, num_heads, **span_kwargs)
        self.norm = nn.LayerNorm(embed_dim)
        self.readout = nn.Linear(embed_dim, 2 * vocab)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.embed(x)  # (B, n, E)
        out, weights = self.attention(h, need_weights=need_weights)
        logits = self.readout(self.norm(h + out))  # (B, n, 2 vocab)
        return logits.view(*x.shape, 2, self.vocab), weights


def lag_loss(model: SpanModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on both targets + ``span_cost`` * mean span; accuracy = both targets right."""
    logits, _ = model(batch["x"])
    y = batch["y"]
    valid = y[..., 0] >= 0
    ce = F.cross_entropy(logits[valid].reshape(-1, model.vocab), y[valid].reshape(-1))
    right = (logits[valid].argmax(-1) == y[valid]).all(-1).float().mean()
    loss = ce + model.span_cost * model.attention.span_loss()
    return loss, {"acc": float(right), "span": float(model.attention.spans.detach().mean())}
