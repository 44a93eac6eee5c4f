r"""Chapter 8 -- local attention: each token reads only a window of its neighbours.

**Sliding window** (Beltagy et al. 2020, Longformer, section 3.1). Query ``i``
attends to the keys within ``w`` positions of it:

.. math::

    y_i = \sum_{j \in \mathcal{W}(i)} \operatorname{softmax}_{j \in \mathcal{W}(i)}
          \Big(\frac{q_i^\top k_j}{\sqrt{d}}\Big)\, v_j, \qquad
    \mathcal{W}(i) = \begin{cases} \{ j : |i - j| \le w \} & \text{two-sided} \\
                                   \{ j : i - w \le j \le i \} & \text{causal} \end{cases}

which is dense attention with the band mask :func:`attn.masks.band_mask`, but
computed **blockwise**: the sequence is cut into ``n / w`` blocks of ``w``
tokens; block ``b`` of queries reads the keys of blocks ``b-1, b, b+1``
(``b-1, b`` when causal), gathered into one ``(…, n/w, 3w, d)`` tensor, and a
small ``(w, 3w)`` band mask picks the exact window. Time and memory are
``O(n w d)`` instead of ``O(n^2 d)``. With ``exact_band=False`` the band mask
is dropped and every query reads its whole neighbouring blocks: the
block-aligned window of the ``local-attention`` package (its default,
``exact_windowsize=False``).

**Local-p** (Luong et al. 2015, section 3.2). A decoder state ``h_t`` predicts
where to look in a source of length ``S``, attends to ``2D + 1`` source
states around that point, and favours the ones near it:

.. math::

    p_t = S \cdot \sigma\big(v_p^\top \tanh(W_p h_t)\big), \qquad
    a_t(s) = \operatorname{softmax}_{s \in [c_t - D,\, c_t + D]}\big(h_t^\top W_a \bar h_s\big)
             \exp\!\Big(-\frac{(s - p_t)^2}{2\sigma^2}\Big), \quad \sigma = \tfrac{D}{2}

with ``c_t = \lfloor p_t + 1/2 \rfloor`` the nearest position, and context
``c_t = \sum_s a_t(s) \bar h_s``. Only the ``2D + 1`` keys of the window are
gathered: ``O(T D d)`` for ``T`` queries.

Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer", arXiv 2020.
Luong, Pham, Manning, "Effective Approaches to Attention-based Neural Machine
Translation", EMNLP 2015.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import AttentionBase, register_kernel
from .checks import check_int, check_same_dtype, check_tokens
from .core import AttentionOutput, check_qkv, masked_softmax, scaled_dot_product_attention
from .masks import band_mask, check_key_mask
from .registry import register

__all__ = ["local_attention", "local_kernel", "local_pattern", "LocalAttention", "LocalPAttention"]


def _check_window(window: int, exact_band: bool) -> None:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    lowest = 0 if exact_band else 1
    if window < lowest:
        raise ValueError(f"window must be >= {lowest}{'' if exact_band else ' with exact_band=False'}, got {window}")


def local_pattern(n: int, window: int, causal: bool = False, exact_band: bool = True, device: torch.device | str | None = None) -> Tensor:
    """The dense ``(n, n)`` boolean pattern that :func:`local_attention` computes (a reference; ``True`` = may attend).

    ``exact_band=True``: the band :func:`attn.masks.band_mask`. ``exact_band=False``:
    query ``i`` in block ``b = i // window`` sees every key of blocks ``b-1..b+1``
    (``b-1..b`` and ``j <= i`` when causal).
    """
    _check_window(window, exact_band)
    if exact_band:
        return band_mask(n, window, causal, device=device)
    blk = torch.arange(n, device=device) // window
    diff = blk[None, :] - blk[:, None]  # key block - query block
    keep = (diff >= -1) & (diff <= (0 if causal else 1))
    if causal:
        keep &= torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return keep


def _unfold(x: Tensor, block: int, back: int, fwd: int, n_pad: int, value: float | bool = 0.0) -> Tensor:
    """``(..., n, d) -> (..., n_pad / block, (back + 1 + fwd) * block, d)``: each block with its neighbours.

    The sequence is padded with ``back * block`` entries in front and enough at
    the end; block ``b`` of the result holds positions ``(b - back) * block``
    to ``(b + 1 + fwd) * block - 1``. (Works on ``(..., n)`` too, with ``d`` absent.)
    """
    span = (back + 1 + fwd) * block
    has_feature = x.dtype != torch.bool
    seq_dim = -2 if has_feature else -1
    n = x.shape[seq_dim]
    pad = (back * block, n_pad - n + fwd * block)
    if has_feature:
        padded = F.pad(x, (0, 0, *pad), value=value)  # (..., back*w + n_pad + fwd*w, d)
        return padded.unfold(-2, span, block).transpose(-1, -2)  # (..., n_pad/w, span, d)
    padded = F.pad(x, pad, value=bool(value))
    return padded.unfold(-1, span, block)  # (..., n_pad/w, span)


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    causal: bool = False,
    key_mask: Tensor | None = None,
    exact_band: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    *,
    blockwise: bool | None = None,
) -> AttentionOutput:
    r"""Sliding-window attention computed blockwise in ``O(n w d)`` time and memory.

    Equal to :func:`attn.core.scaled_dot_product_attention` with
    ``attn_mask=band_mask(n, window, causal)`` (or :func:`local_pattern` with
    ``exact_band=False``), without building any ``n x n`` tensor unless
    ``need_weights`` asks for the weights.

    **Never dearer than dense attention.** The block size is ``min(window, n)``
    (a window of ``n`` or more is the whole sequence: same output). The
    blocks score ``ceil(n / w) w x 3w`` pairs (``2w`` causal), plus the edge
    blocks redone with their key mask; when that is at least the ``n^2`` of
    dense attention (``n <= 3w`` or so), the band is applied to the dense
    scores instead, whose ``n x n`` mask is then no larger than the blocks.

    Args:
        q, k, v: ``(batch, [heads,] n, d)``; queries and keys are the same sequence.
        window: ``w``; query ``i`` sees keys ``|i - j| <= w`` (``i - w <= j <= i``
            when causal). Also the block size.
        causal: one-sided window (no future keys).
        key_mask: ``(batch, n)`` boolean, ``True`` = real token.
        exact_band: ``True``: the per-token band above. ``False``: the
            block-aligned window (whole neighbouring blocks), as the
            ``local-attention`` package computes by default.
        scale: score scale, default ``1 / sqrt(d)``.
        dropout_p: dropout on the weights (pass 0 in eval).
        need_weights: also return the dense ``(batch, [heads,] n, n)`` weights,
            scattered from the blocks. This materialises ``n^2`` numbers: use it
            for inspection at small ``n`` only.
        blockwise: ``None`` (default) takes the cheaper of the blockwise and
            the dense computation (the same output); ``True`` forces the
            blocks, ``False`` the dense band (to measure or check either).

    Returns:
        :class:`~attn.core.AttentionOutput` ``(output (batch, [heads,] n, d_v), weights or None)``.
        Queries with no visible key get zeros; an empty batch gives an empty output.
    """
    check_qkv(q, k, v)
    check_same_dtype(("q", q), ("k", k), ("v", v))
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"local attention needs as many queries as keys (self-attention), got {q.shape[-2]} and {k.shape[-2]}")
    _check_window(window, exact_band)
    check_key_mask(key_mask, q.shape[0], k.shape[-2], length_name="n")
    if blockwise is not None and not isinstance(blockwise, bool):
        raise TypeError(f"blockwise must be None, True or False, got {blockwise!r}")
    n = q.shape[-2]
    if q.shape[0] == 0:  # empty batch: empty output (and weights)
        out = v.new_zeros(*q.shape[:-1], v.shape[-1])
        return AttentionOutput(out, q.new_zeros(*q.shape[:-1], n) if need_weights else None)
    squeeze = q.ndim == 3
    if squeeze:  # (B, n, d) -> (B, 1, n, d)
        q, k, v = q[:, None], k[:, None], v[:, None]
    batch, _heads, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    w = min(max(window, 1), n)  # block size; a window of n or more already covers the whole sequence
    back, fwd = 1, 0 if causal else 1  # neighbouring blocks read before / after
    nb = -(-n // w)  # number of blocks
    n_pad = nb * w
    span = (back + 1 + fwd) * w  # keys per query block: 3w (2w causal)

    # which keys exist: inside [0, n) and not padding -> (B, nb, span)
    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    real = rearrange(_unfold(real, w, back, fwd, n_pad, value=False), "b nb s -> (b nb) s")
    whole = real.all(-1)  # (B*nb,): blocks whose keys all exist need only the shared (w, span) band
    if blockwise is None:  # scores the blocks would compute (edge blocks twice) against dense attention's n^2
        n_whole = int(whole.sum())
        redone = 0 if n_whole in (whole.numel(), 0) or n_whole < whole.numel() / 2 else whole.numel() - n_whole
        blockwise = (batch * nb + redone) * w * span < batch * n * n
    if not blockwise:
        pattern = local_pattern(n, window, causal, exact_band, device=q.device)  # (n, n) <= the blocks' scores
        out, weights = scaled_dot_product_attention(
            q, k, v, attn_mask=pattern, key_mask=key_mask, scale=scale, dropout_p=dropout_p, need_weights=need_weights)
        if squeeze:
            return AttentionOutput(out[:, 0], weights[:, 0] if weights is not None else None)
        return AttentionOutput(out, weights)

    # queries in blocks, one batch row per (batch, block): (B*nb, H, w, d)
    qb = rearrange(F.pad(q, (0, 0, 0, n_pad - n)), "b h (nb w) d -> (b nb) h w d", w=w)
    # keys and values of each block and its neighbours: (B*nb, H, span, d)
    kb = rearrange(_unfold(k, w, back, fwd, n_pad), "b h nb s d -> (b nb) h s d")
    vb = rearrange(_unfold(v, w, back, fwd, n_pad), "b h nb s d -> (b nb) h s d")
    # the band inside a block, the same for every block: query r, key c, i - j = back*w + r - c
    r = torch.arange(w, device=q.device)[:, None]
    c = torch.arange(span, device=q.device)[None, :]
    dist = back * w + r - c  # (w, span)
    if exact_band:
        band = (dist >= 0) & (dist <= window) if causal else dist.abs() <= window
    else:
        band = dist >= 0 if causal else torch.ones_like(dist, dtype=torch.bool)
    if bool(whole.all()):
        out, wb = scaled_dot_product_attention(qb, kb, vb, attn_mask=band, scale=scale, dropout_p=dropout_p,
                                               need_weights=need_weights)
    else:  # the edge (and padded) blocks also mask their missing keys: (blocks, 1, w, span)
        out, wb = _attend_split(qb, kb, vb, band, real, whole, scale, dropout_p, need_weights)
    out = rearrange(out, "(b nb) h w d -> b h (nb w) d", b=batch)[:, :, :n]  # (B, H, n, d_v)

    weights = None
    if wb is not None:
        weights = _scatter_weights(wb, batch, nb, w, back, fwd)[:, :, :n, :n]
    if squeeze:
        out = out[:, 0]
        weights = weights[:, 0] if weights is not None else None
    return AttentionOutput(out, weights)


def _attend_split(qb: Tensor, kb: Tensor, vb: Tensor, band: Tensor, real: Tensor, whole: Tensor, scale: float,
                  dropout_p: float, need_weights: bool) -> AttentionOutput:
    """Attend every block under the shared ``(w, span)`` band, then redo the blocks with missing keys.

    Only edge blocks (and blocks holding padding) have keys that do not exist;
    keeping the per-block mask off all the others keeps the mask tiny. When
    most blocks have missing keys, one pass with the full per-block mask is
    cheaper. Shapes: ``qb (blocks, H, w, d)``, ``kb, vb (blocks, H, span, d)``,
    ``band (w, span)``, ``real (blocks, span)``, ``whole (blocks,)``.
    """
    attend = functools.partial(scaled_dot_product_attention, scale=scale, dropout_p=dropout_p, need_weights=need_weights)
    if whole.float().mean() < 0.5:
        return attend(qb, kb, vb, attn_mask=band & real[:, None, None, :])
    out, weights = attend(qb, kb, vb, attn_mask=band)
    rows = (~whole).nonzero()[:, 0]
    mask = band & real[rows][:, None, None, :]  # (edge blocks, 1, w, span)
    fix = attend(qb[rows], kb[rows], vb[rows], attn_mask=mask)
    out = out.index_copy(0, rows, fix.output)
    if weights is not None:
        assert fix.weights is not None  # both calls share need_weights
        weights = weights.index_copy(0, rows, fix.weights)
    return AttentionOutput(out, weights)


def _scatter_weights(wb: Tensor, batch: int, nb: int, w: int, back: int, fwd: int) -> Tensor:
    """Block weights ``(B*nb, H, w, span)`` -> dense ``(B, H, nb*w, nb*w)`` (zeros off the window)."""
    span = wb.shape[-1]
    wb = rearrange(wb, "(b nb) h w s -> b h nb w s", b=batch)
    width = (nb + back + fwd) * w  # padded key axis: position j sits at column j + back*w
    cols = (torch.arange(nb, device=wb.device)[:, None] * w + torch.arange(span, device=wb.device)[None, :])  # (nb, span)
    dense = wb.new_zeros(*wb.shape[:-1], width)
    dense = dense.scatter(-1, cols[:, None, :].expand(wb.shape[2:]).expand_as(wb), wb)
    dense = rearrange(dense, "b h nb w j -> b h (nb w) j")
    return dense[..., back * w : back * w + nb * w]


@register_kernel("local", attn_mask=False, dense=False,
                 summary="sliding window |i - j| <= w (i - w <= j <= i causal), blockwise in O(n w d)")
def local_kernel(
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
    window: int = 8,
    exact_band: bool = True,
    blockwise: bool | None = None,
) -> AttentionOutput:
    """:func:`local_attention` as a kernel of :class:`~attn.attention.Attention` (the window is the pattern).

    ``q, k, v`` ``(B, h, n, d)``; the window is an option (``window=8`` by default); a general
    ``attn_mask`` is refused (the band *is* the mask; pass ``key_mask`` and ``is_causal``).
    """
    if attn_mask is not None:
        raise ValueError("the local kernel takes no attn_mask (its window is the pattern); pass key_mask and is_causal")
    return local_attention(q, k, v, window, causal=is_causal, key_mask=key_mask, exact_band=exact_band,
                           scale=scale, dropout_p=dropout_p, need_weights=need_weights, blockwise=blockwise)


@register(
    "local",
    paper="Beltagy et al. 2020; Luong et al. 2015",
    complexity="O(n w d)",
    chapter=8,
    summary="sliding-window multi-head attention, computed blockwise",
    build=lambda embed_dim, num_heads: LocalAttention(embed_dim, num_heads, window=8, causal=False),
    kernel="local",
    causal=False,
)
class LocalAttention(AttentionBase):
    """Multi-head sliding-window self-attention (Longformer's local attention).

    :class:`~attn.attention.AttentionBase` (the projections ``q_proj, k_proj, v_proj, out_proj`` and
    heads of :class:`~attn.multihead.MultiHeadAttention`: their state dicts are interchangeable) with
    the ``"local"`` kernel, :func:`local_attention` per head. Shapes: ``x`` ``(B, n, E)`` -> output
    ``(B, n, E)``; weights, when asked for, ``(B, h, n, n)``.

    Args:
        embed_dim: model width ``E``.
        num_heads: heads ``h`` (must divide ``E``).
        window: ``w``; token ``i`` sees tokens ``|i - j| <= w`` (``i - w .. i``
            when causal). The registry's ``build`` uses ``w = 8``, two-sided.
        causal: one-sided window (the default of ``forward``'s ``is_causal``).
        exact_band: per-token band (``True``) or whole neighbouring blocks (``False``).
        dropout: dropout on the attention weights during training.
        bias: biases on the projections.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        window: int = 8,
        causal: bool = False,
        exact_band: bool = True,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        _check_window(window, exact_band)
        super().__init__(embed_dim, num_heads, kernel="local", dropout=dropout, bias=bias, causal=causal,
                         window=window, exact_band=exact_band)
        self.window, self.exact_band = window, exact_band

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)``, ``key_mask (B, n)`` (``True`` = real) -> ``(output (B, n, E), weights (B, h, n, n) | None)``.

        ``is_causal`` (``None``: the layer's ``causal``) picks the one-sided window.
        """
        check_tokens(x, self.embed_dim)  # errors name x, the argument the caller passed
        return self.mix(x, x, x, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights)


class LocalPAttention(nn.Module):
    r"""Luong et al. (2015) local-p attention: predict a centre, attend to ``2D + 1`` states around it.

    .. math::

        p_t = S\,\sigma(v_p^\top \tanh(W_p h_t)),\quad
        a_t(s) = \operatorname{softmax}_{|s - c_t| \le D}(\operatorname{score}(h_t, \bar h_s))\,
                 e^{-(s - p_t)^2 / (2\sigma^2)},\quad \sigma = D/2

    ``c_t`` is ``p_t`` rounded to the nearest position; ``S`` is each example's
    source length (the count of real tokens in ``key_mask``). Positions outside
    ``[0, S)`` or masked are left out of the softmax. The weights do not sum to
    1: the Gaussian pulls them down away from ``p_t``, as in the paper.

    Args:
        query_dim: width of ``h_t`` (the decoder state).
        key_dim: width of ``\bar h_s`` (the source states).
        half_window: ``D``; the window holds ``2D + 1`` positions (the paper uses 10).
        score: ``"general"`` ``h_t^T W_a \bar h_s`` or ``"dot"`` ``h_t^T \bar h_s``.
        hidden: width of ``W_p`` (default ``query_dim``).

    Shapes: ``query`` ``(B, T, d_q)`` or ``(B, d_q)``, ``keys`` ``(B, S, d_k)``,
    ``values`` ``(B, S, d_v)`` (default: the keys) -> context ``(B, T, d_v)``.
    """

    def __init__(self, query_dim: int, key_dim: int, half_window: int = 10, score: Literal["general", "dot"] = "general", hidden: int | None = None) -> None:
        super().__init__()
        if isinstance(half_window, bool) or not isinstance(half_window, int) or half_window < 1:
            raise ValueError(f"half_window D must be an int >= 1, got {half_window!r}")
        check_int("query_dim", query_dim)
        check_int("key_dim", key_dim)
        if hidden is not None:
            check_int("hidden", hidden)
        if score not in ("general", "dot"):
            raise ValueError(f"score must be 'general' or 'dot', got {score!r}")
        if score == "dot" and query_dim != key_dim:
            raise ValueError(f"dot scores need query_dim == key_dim, got {query_dim} and {key_dim}")
        self.query_dim, self.key_dim, self.half_window, self.score = query_dim, key_dim, half_window, score
        self.sigma = half_window / 2
        hidden = hidden or query_dim
        self.w_p = nn.Linear(query_dim, hidden, bias=False)  # W_p
        self.v_p = nn.Linear(hidden, 1, bias=False)  # v_p
        self.w_a = nn.Linear(key_dim, query_dim, bias=False) if score == "general" else None  # W_a

    def positions(self, query: Tensor, lengths: Tensor) -> Tensor:
        """Predicted centres ``p_t = S sigma(v_p^T tanh(W_p h_t))``: ``(B, T, d_q), (B,) -> (B, T)``."""
        return lengths[:, None].to(query.dtype) * torch.sigmoid(self.v_p(torch.tanh(self.w_p(query)))).squeeze(-1)

    def _check(self, query: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor | None) -> None:
        for name, t in (("query", query), ("keys", keys), ("values", values)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        check_same_dtype(("query", query), ("keys", keys), ("values", values if values is not keys else None))
        if query.ndim not in (2, 3) or query.shape[-1] != self.query_dim:
            raise ValueError(f"query must have shape (batch, {self.query_dim}) or (batch, T, {self.query_dim}), got {tuple(query.shape)}")
        if keys.ndim != 3 or keys.shape[-1] != self.key_dim or keys.shape[0] != query.shape[0]:
            raise ValueError(f"keys must have shape (batch={query.shape[0]}, S, {self.key_dim}), got {tuple(keys.shape)}")
        if values.ndim != 3 or values.shape[:2] != keys.shape[:2]:
            raise ValueError(f"values must have shape (batch, S={keys.shape[1]}, d_v), got {tuple(values.shape)}")
        if keys.shape[1] == 0:
            raise ValueError("keys is an empty sequence (S = 0)")
        check_key_mask(key_mask, keys.shape[0], keys.shape[1], length_name="n")

    def forward(
        self, query: Tensor, keys: Tensor, values: Tensor | None = None, key_mask: Tensor | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """Context ``(B, [T,] d_v)`` and, with ``need_weights``, the dense ``(B, [T,] S)`` weights (small ``S`` only)."""
        values = keys if values is None else values
        self._check(query, keys, values, key_mask)
        single = query.ndim == 2
        h = query[:, None] if single else query  # (B, T, d_q)
        batch, src = keys.shape[:2]
        D = self.half_window
        lengths = key_mask.sum(-1) if key_mask is not None else torch.full((batch,), src, device=keys.device)
        p = self.positions(h, lengths)  # (B, T), real-valued centres
        centre = torch.floor(p.detach() + 0.5).long()  # c_t, nearest position
        idx = centre[..., None] + torch.arange(-D, D + 1, device=keys.device)  # (B, T, 2D+1) source positions
        valid = (idx >= 0) & (idx < lengths[:, None, None])
        idx_c = idx.clamp(0, src - 1)
        rows = torch.arange(batch, device=keys.device)[:, None, None]
        if key_mask is not None:
            valid &= key_mask[rows, idx_c]
        k = self.w_a(keys) if self.w_a is not None else keys  # (B, S, d_q): W_a h_s
        kg, vg = k[rows, idx_c], values[rows, idx_c]  # (B, T, 2D+1, d): the gathered window only
        scores = torch.einsum("btd,btjd->btj", h, kg)  # (B, T, 2D+1)
        align = masked_softmax(scores, valid)
        gauss = torch.exp(-((idx.to(p.dtype) - p[..., None]) ** 2) / (2 * self.sigma**2))  # (B, T, 2D+1)
        a = align * gauss
        context = torch.einsum("btj,btjd->btd", a, vg)  # (B, T, d_v)
        weights = None
        if need_weights:
            weights = a.new_zeros(batch, h.shape[1], src).scatter_add(-1, idx_c, a.masked_fill(~valid, 0.0))
        if single:
            return AttentionOutput(context[:, 0], weights[:, 0] if weights is not None else None)
        return AttentionOutput(context, weights)
