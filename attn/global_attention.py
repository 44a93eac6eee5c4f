r"""Chapter 5 -- global attention: Luong's global attention, and global tokens.

**Luong global attention** (Luong, Pham, Manning, EMNLP 2015, section 3.1).
At target step ``t`` the top decoder state ``h_t`` attends to *every* source
state ``\bar h_s``:

.. math::

    a_t(s) = \frac{\exp \operatorname{score}(h_t, \bar h_s)}{\sum_{s'} \exp \operatorname{score}(h_t, \bar h_{s'})},
    \qquad c_t = \sum_s a_t(s)\, \bar h_s,
    \qquad \tilde h_t = \tanh\big(W_c [c_t; h_t]\big)

with ``score`` one of ``dot`` ``h_t^T \bar h_s``, ``general`` ``h_t^T W_a \bar h_s``
or ``concat`` ``v_a^T \tanh(W_a [h_t; \bar h_s])`` (eq. 8). With *input
feeding* ``\tilde h_{t-1}`` is fed to the decoder RNN next to the embedding of
``y_{t-1}``. Shapes: ``h_t`` ``(B, [T,] d_q)``, source ``(B, S, d_k)``,
``a_t`` ``(B, [T,] S)``, ``\tilde h_t`` ``(B, [T,] d_out)``.

**Global tokens** (Beltagy et al. 2020, Longformer; Ainslie et al. 2020, ETC;
Zaheer et al. 2020, BigBird). A few positions ``G`` attend to all ``n``
positions and are attended to by all; every other position attends only to a
window ``|i - j| <= w`` plus the global positions:

.. math::

    \mathcal{N}(i) = \begin{cases} \{1..n\} & i \in G \\ \{j : |i-j| \le w\} \cup G & i \notin G \end{cases}

Computed without an ``n x n`` matrix: the ``g`` global rows densely
(``g x n``), the band blockwise (blocks of ``w`` queries against three blocks
of keys) plus the ``g`` global columns: ``O(n (w + g) d)`` time and memory.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionBase, register_kernel
from .checks import check_heads, check_int, check_tokens
from .core import AttentionOutput, masked_softmax, scaled_dot_product_attention
from .masks import band_mask, causal_mask, check_key_mask
from .registry import register
from .soft import MultiplicativeAttention, _check_query_keys, _check_seq2seq_inputs, _ScoreAttention

__all__ = [
    "ConcatAttention",
    "make_luong_score",
    "LuongGlobalAttention",
    "LuongSelfAttention",
    "LuongSeq2Seq",
    "global_mask",
    "global_token_attention",
    "global_token_kernel",
    "GlobalTokenAttention",
]

LuongScore = Literal["dot", "general", "concat"]


class ConcatAttention(_ScoreAttention):
    r"""Luong's *concat* score (eq. 8): ``score(h_t, h_s) = v_a^T tanh(W_a [h_t; h_s])``.

    ``W_a`` is one ``hidden x (d_q + d_k)`` matrix applied to the concatenation.
    Splitting its columns, ``W_a [h_t; h_s] = W_q h_t + W_k h_s``, so the
    ``(L, S)`` pairs never need a concatenated ``(L, S, d_q + d_k)`` tensor, only
    the ``(L, S, hidden)`` sum. Up to the bias inside the ``tanh`` this is
    Bahdanau's additive score; what Luong changed is *where* it is used
    (the current top state ``h_t``, then :math:`\tilde h_t`), not the formula.

    Args:
        query_dim: width ``d_q`` of ``h_t``; key_dim: width ``d_k`` of ``h_s``;
        hidden: rows of ``W_a`` (length of ``v_a``).
    """

    def __init__(self, query_dim: int, key_dim: int, hidden: int = 64) -> None:
        super().__init__()
        for name, value in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden", hidden)):
            check_int(name, value)
        self.query_dim, self.key_dim = query_dim, key_dim
        self.w = nn.Linear(query_dim + key_dim, hidden, bias=False)  # W_a
        self.v = nn.Linear(hidden, 1, bias=False)  # v_a

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """``(B, L, d_q), (B, S, d_k) -> (B, L, S)``."""
        w_q, w_k = self.w.weight.split([self.query_dim, self.key_dim], dim=1)  # W_a = [W_q  W_k]
        hidden = torch.tanh((query @ w_q.T)[:, :, None, :] + (keys @ w_k.T)[:, None, :, :])  # (B, L, S, hidden)
        return self.v(hidden).squeeze(-1)


def make_luong_score(kind: LuongScore, query_dim: int, key_dim: int, hidden: int = 64) -> _ScoreAttention:
    """Luong's scores: ``dot`` and ``general`` from :mod:`attn.soft`, ``concat`` from :class:`ConcatAttention`."""
    if kind in ("dot", "general"):
        return MultiplicativeAttention(query_dim, key_dim, kind)
    if kind == "concat":
        return ConcatAttention(query_dim, key_dim, hidden)
    raise ValueError(f"score must be 'dot', 'general' or 'concat', got {kind!r}")


class LuongGlobalAttention(nn.Module):
    r"""Luong global attention: alignment over all source states, context, attentional state.

    ``a_t = softmax_s score(h_t, h_s)``, ``c_t = sum_s a_t(s) h_s``,
    ``\tilde h_t = tanh(W_c [c_t; h_t])`` (Luong et al. 2015, eqs. 5, 7, 8).

    Args:
        query_dim: width of the decoder state ``h_t``.
        key_dim: width of the source states ``h_s`` (must equal ``query_dim`` for ``dot``).
        score: ``dot``, ``general`` or ``concat``.
        hidden: rows of ``W_a`` for ``concat``.
        out_dim: width of ``\tilde h_t`` (default ``query_dim``).
    """

    def __init__(self, query_dim: int, key_dim: int, score: LuongScore = "general", hidden: int = 64, out_dim: int | None = None) -> None:
        super().__init__()
        if out_dim is not None:
            check_int("out_dim", out_dim)
        self.score_kind = score
        self.score = make_luong_score(score, query_dim, key_dim, hidden)
        self.query_dim, self.key_dim = query_dim, key_dim
        self.w_c = nn.Linear(key_dim + query_dim, out_dim or query_dim, bias=False)  # W_c

    def forward(
        self, query: Tensor, memory: Tensor, key_mask: Tensor | None = None, *, attn_mask: Tensor | None = None
    ) -> AttentionOutput:
        """Attend ``h_t`` to the source.

        Args:
            query: ``(B, d_q)`` one step, or ``(B, T, d_q)`` all target steps at once.
            memory: ``(B, S, d_k)`` source states (keys and values).
            key_mask: ``(B, S)`` boolean, ``True`` = real source token.
            attn_mask: ``(T, S)`` or ``(B, T, S)`` boolean, ``True`` = step ``t`` may read state ``s``.

        Returns:
            ``(\tilde h (B, [T,] d_out), a (B, [T,] S))``.

        Raises:
            TypeError, ValueError: naming ``query`` or ``memory`` (not a float tensor of
            the shape above, or mixed dtypes) or ``key_mask``.
        """
        _check_query_keys(query, memory, memory, self.query_dim, self.key_dim, keys_name="memory", values_name="memory")
        context, align = self.score(query, memory, key_mask=key_mask, attn_mask=attn_mask)  # c_t (B, [T,] d_k), a_t (B, [T,] S)
        h_tilde = torch.tanh(self.w_c(torch.cat([context, query], -1)))  # eq. 5
        return AttentionOutput(h_tilde, align)


@register(
    "global",
    paper="Luong et al. 2015",
    complexity="O(n m d)",
    chapter=5,
    summary="Luong global attention: dot/general/concat scores over the whole source, then tanh(W_c[c_t; h_t])",
    build=lambda embed_dim, num_heads: LuongSelfAttention(embed_dim, score="general"),
    kernel=None,
    causal=False,
)
class LuongSelfAttention(nn.Module):
    r"""Luong global attention used as a token mixer: every position is an ``h_t`` and the sequence is the source.

    ``y_i = tanh(W_c [c_i; x_i])``, ``c_i = sum_j a_i(j) x_j``,
    ``a_i = softmax_j score(x_i, x_j)``. No value projection and one head (the
    RNN-era design); ``num_heads`` does not apply. Shapes: ``(B, n, E) -> (B, n, E)``,
    weights ``(B, 1, n, n)`` (one head). With ``dot`` each position tends to attend to itself
    (``x_i^T x_i`` is the largest product), so ``general`` is the default.

    Args:
        embed_dim: width ``E`` of the tokens.
        score: ``dot``, ``general`` or ``concat``.
        hidden: rows of ``W_a`` for ``concat`` (default ``E``).
        causal: the default of ``forward``'s ``is_causal`` (position ``i`` reads ``j <= i``).
    """

    def __init__(self, embed_dim: int, score: LuongScore = "general", hidden: int | None = None, *, causal: bool = False) -> None:
        super().__init__()
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.embed_dim, self.causal = embed_dim, causal
        self.attn = LuongGlobalAttention(embed_dim, embed_dim, score, hidden or embed_dim, embed_dim)

    def forward(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), weights (B, 1, n, n) or None)``; ``is_causal``: ``j <= i`` only."""
        check_tokens(x, self.embed_dim)
        causal = self.causal if is_causal is None else is_causal
        if not isinstance(causal, bool):
            raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
        mask = causal_mask(x.shape[1], device=x.device) if causal else None
        out, weights = self.attn(x, x, key_mask=key_mask, attn_mask=mask)
        return AttentionOutput(out, weights[:, None] if need_weights and weights is not None else None)


class LuongSeq2Seq(nn.Module):
    """LSTM encoder-decoder with Luong global attention (Luong et al. 2015, section 3.1 and 3.3).

    Encoder: embedding + bidirectional LSTM (width ``H`` per direction), source
    states ``(B, S, 2H)``. Decoder: an LSTM of width ``D = 2H`` started from the
    encoder's final states. At step ``t``: ``h_t = LSTM([y_{t-1}; \\tilde h_{t-1}])``
    with input feeding, or ``LSTM(y_{t-1})`` without; then global attention
    gives ``a_t`` and ``\\tilde h_t``, and ``p(y_t) = softmax(W_s \\tilde h_t)``.
    Without input feeding the decoder LSTM runs over the whole target in one
    call and attention is one batched product over all ``T`` steps. (Luong et
    al. used a stacked unidirectional LSTM encoder; the attention is the same.)

    Args:
        vocab: vocabulary size (token 0 is the start token).
        embed: embedding width; hidden: ``H``.
        score: ``dot``, ``general`` or ``concat``.
        input_feeding: feed ``\\tilde h_{t-1}`` to the decoder (section 3.3).
    """

    def __init__(self, vocab: int, embed: int = 32, hidden: int = 32, score: LuongScore = "general", input_feeding: bool = True) -> None:
        super().__init__()
        for name, value in (("vocab", vocab), ("embed", embed), ("hidden", hidden)):
            check_int(name, value)
        d = 2 * hidden
        self.vocab, self.input_feeding, self.d = vocab, input_feeding, d
        self.src_embed = nn.Embedding(vocab, embed)
        self.tgt_embed = nn.Embedding(vocab, embed)
        self.encoder = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.attention = LuongGlobalAttention(d, d, score, hidden=d, out_dim=d)
        if input_feeding:
            self.cell: nn.Module = nn.LSTMCell(embed + d, d)
        else:
            self.cell = nn.LSTM(embed, d, batch_first=True)
        self.out = nn.Linear(d, vocab)  # W_s

    def forward(self, src: Tensor, tgt_in: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced decoding: ``src (B, S)``, ``tgt_in (B, T)`` -> ``logits (B, T, vocab)``, ``a (B, T, S)``.

        ``src`` and ``tgt_in`` are integer token ids in ``[0, vocab)`` (errors name the
        argument and the range found); ``key_mask (B, S)`` is ``True`` at real source tokens.
        """
        empty = _check_seq2seq_inputs(src, tgt_in, key_mask, self.vocab, self.out.weight.dtype)
        if empty is not None:
            return empty
        memory, (h_n, c_n) = self.encoder(self.src_embed(src))  # (B, S, D); (2, B, H) each
        h = torch.cat([h_n[0], h_n[1]], -1)  # (B, D): forward and backward final states
        c = torch.cat([c_n[0], c_n[1]], -1)
        emb = self.tgt_embed(tgt_in)  # (B, T, embed)
        if not self.input_feeding:
            states, _ = self.cell(emb, (h[None], c[None]))  # (B, T, D), all steps in one call
            h_tilde, align = self.attention(states, memory, key_mask)  # (B, T, D), (B, T, S)
            return self.out(h_tilde), align
        h_tilde = torch.zeros_like(h)
        logits, aligns = [], []
        for t in range(tgt_in.shape[1]):
            h, c = self.cell(torch.cat([emb[:, t], h_tilde], -1), (h, c))  # input feeding
            h_tilde, a = self.attention(h, memory, key_mask)  # (B, D), (B, S)
            logits.append(self.out(h_tilde))
            aligns.append(a)
        return torch.stack(logits, 1), torch.stack(aligns, 1)


# ----------------------------------------------------------------------------- global tokens


def _index_tensor(global_idx: object) -> Tensor:
    """``global_idx`` as a 1-D tensor: integer positions (``long``) or a boolean mask (``bool``).

    Accepted: a sequence (list, tuple, range) of ints, a sequence of bools (a
    mask), a 1-D integer or boolean tensor (or array). Floats are refused, not
    truncated to positions.

    Raises:
        TypeError: not a sequence or tensor, floats, or ints mixed with bools.
        ValueError: a tensor of more than one dimension.
    """
    expected = "int positions (a sequence or a 1-D integer tensor) or a boolean mask of shape (n,)"
    if isinstance(global_idx, Tensor):
        idx = global_idx
    elif isinstance(global_idx, (list, tuple, range)):
        items = list(global_idx)
        if items and all(isinstance(i, (bool, np.bool_)) for i in items):
            idx = torch.tensor([bool(i) for i in items], dtype=torch.bool)
        elif all(isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_)) for i in items):
            idx = torch.tensor([int(i) for i in items], dtype=torch.long)
        else:
            kinds = sorted({type(i).__name__ for i in items})
            raise TypeError(f"global_idx must be {expected}, got a {type(global_idx).__name__} of {', '.join(kinds)}")
    elif isinstance(global_idx, np.ndarray):
        idx = torch.as_tensor(global_idx)
    else:
        raise TypeError(f"global_idx must be {expected}, got {type(global_idx).__name__}")
    if idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"global_idx must be {expected}, got dtype {idx.dtype}")
    if idx.ndim > 1:
        raise ValueError(f"global_idx must be 1-D ({expected}), got shape {tuple(idx.shape)}")
    return idx.reshape(-1) if idx.dtype == torch.bool else idx.reshape(-1).long()


def _global_index(n: int, global_idx: Sequence[int] | Tensor, device: torch.device | str | None = None) -> Tensor:
    """Sorted unique non-negative positions ``(g,)``.

    ``global_idx`` holds positions (negative ones count from the end) or is a
    boolean mask of length ``n`` (``True`` = global), see :func:`_index_tensor`.
    """
    idx = _index_tensor(global_idx).to(device)
    if idx.dtype == torch.bool:
        if idx.numel() != n:
            raise ValueError(f"global_idx as a boolean mask must have shape (n={n},), got ({idx.numel()},)")
        return idx.nonzero()[:, 0]
    if idx.numel() and (idx.min() < -n or idx.max() >= n):
        raise ValueError(f"global_idx must lie in [-{n}, {n}) for a sequence of length {n}, got {idx.tolist()}")
    return torch.unique(torch.where(idx < 0, idx + n, idx))


def global_mask(n: int, global_idx: Sequence[int] | Tensor, window: int, device: torch.device | str | None = None) -> Tensor:
    """Dense ``(n, n)`` reference mask: band ``|i - j| <= window``, plus full rows and columns at ``global_idx``.

    ``True`` = may attend. The efficient :class:`GlobalTokenAttention` never builds it.
    """
    keep = band_mask(n, window, device=device)
    g = _global_index(n, global_idx, device)
    keep[g, :] = True  # global tokens see everything
    keep[:, g] = True  # and everything sees them
    return keep


def global_token_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    global_idx: Sequence[int] | Sequence[bool] | Tensor = (0,),
    key_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    *,
    blockwise: bool | None = None,
) -> AttentionOutput:
    """Window ``|i - j| <= window`` plus global tokens, per head, without an ``n x n`` tensor.

    Equal to :func:`attn.core.scaled_dot_product_attention` with ``attn_mask=global_mask(n, global_idx, window)``.
    The ``g`` global rows attend densely (``g x n``); the other rows in blocks of ``b = min(window, n)``
    queries against three blocks of keys plus the ``g`` global columns: ``O(n (3b + g) d)``. When the
    blocks would score at least the ``n^2`` pairs of dense attention (``n`` up to about ``3w + g``), the
    dense masked scores are used instead (same output): the cost never exceeds dense attention's.

    Args:
        q, k, v: ``(B, h, n, d)``; self-attention (queries and keys are the same sequence).
        window: one-sided window ``w >= 0``.
        global_idx: global positions (ints, negative = from the end) or a boolean mask ``(n,)``.
        key_mask: ``(B, n)`` boolean, ``True`` = real token.
        scale: default ``1 / sqrt(d)``; dropout_p: dropout on the weights (0 in eval).
        need_weights: also return the dense ``(B, h, n, n)`` weights (small ``n`` only).
        blockwise: ``None`` takes the cheaper path; ``True``/``False`` forces the blocks / the dense mask.
    """
    check_int("window", window, 0)
    if blockwise is not None and not isinstance(blockwise, bool):
        raise TypeError(f"blockwise must be None, True or False, got {blockwise!r}")
    if q.ndim != 4 or k.shape[-2] != q.shape[-2]:
        raise ValueError(f"global-token attention needs q, k, v (B, h, n, d) of one sequence, got {tuple(q.shape)} and {tuple(k.shape)}")
    B, heads, n, d = q.shape
    check_key_mask(key_mask, B, n, length_name="n")
    g_idx = _global_index(n, global_idx, q.device)  # (g,)
    if B == 0:
        return AttentionOutput(v.new_zeros(*q.shape[:-1], v.shape[-1]), q.new_zeros(0, heads, n, n) if need_weights else None)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    b = min(max(window, 1), n)  # block size: a block of b queries needs keys from its own and the two neighbouring blocks
    nb = -(-n // b)
    g = g_idx.numel()
    if blockwise is None:  # scores per (batch, head): blocks (band + global columns) and global rows, vs n^2
        blockwise = nb * b * (3 * b + g) + g * n < n * n
    if not blockwise:
        mask = global_mask(n, g_idx, window, q.device)
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, key_mask=key_mask, scale=scale,
                                            dropout_p=dropout_p, need_weights=need_weights)
    w = window
    pad = nb * b - n
    is_global = torch.zeros(n, dtype=torch.bool, device=q.device)
    is_global[g_idx] = True
    real = key_mask if key_mask is not None else torch.ones(B, n, dtype=torch.bool, device=q.device)

    # banded part: queries in blocks (B, h, nb, b, d) against key windows (B, h, nb, 3b, d)
    qb = F.pad(q, (0, 0, 0, pad)).view(B, heads, nb, b, -1)
    kw = F.pad(k, (0, 0, b, pad + b)).unfold(2, 3 * b, b)  # (B, h, nb, d, 3b), a view
    vw = F.pad(v, (0, 0, b, pad + b)).unfold(2, 3 * b, b)  # (B, h, nb, d_v, 3b)
    s_band = (qb @ kw) * scale  # (B, h, nb, b, 3b)
    qpos = torch.arange(nb * b, device=q.device).view(nb, b)  # query position of each block row
    kpos = (torch.arange(nb, device=q.device) * b - b)[:, None] + torch.arange(3 * b, device=q.device)  # (nb, 3b)
    inside = (kpos >= 0) & (kpos < n)
    kc = kpos.clamp(0, n - 1)
    # a key in the band that is also global is left to the global columns (no double counting)
    band_ok = ((qpos[:, :, None] - kpos[:, None, :]).abs() <= w) & (inside & ~is_global[kc])[:, None, :]  # (nb, b, 3b)
    band_ok = band_ok & (real[:, kc] & inside)[:, None, :, None, :]  # (B, 1, nb, b, 3b)

    # global columns: every query scores the g global keys
    k_g, v_g = k[:, :, g_idx], v[:, :, g_idx]  # (B, h, g, d)
    s_gcol = (qb @ k_g[:, :, None].transpose(-1, -2)) * scale  # (B, h, nb, b, g)
    gcol_ok = real[:, g_idx][:, None, None, None, :].expand(B, 1, nb, b, -1)  # (B, 1, nb, b, g)

    p = masked_softmax(torch.cat([s_band, s_gcol], -1), torch.cat([band_ok, gcol_ok], -1))  # (B, h, nb, b, 3b + g)
    p_drop = F.dropout(p, dropout_p) if dropout_p > 0 else p
    p_band, p_gcol = p_drop.split([3 * b, g], -1)
    out = p_band @ vw.transpose(-1, -2) + p_gcol @ v_g[:, :, None]  # (B, h, nb, b, d_v)
    out = out.reshape(B, heads, nb * b, -1)[:, :, :n]  # (B, h, n, d_v)

    # global rows: the g global queries attend densely to all n keys (g x n)
    p_grow = None
    if g:
        out_g, p_grow = scaled_dot_product_attention(q[:, :, g_idx], k, v, key_mask=key_mask, scale=scale,
                                                     dropout_p=dropout_p, need_weights=need_weights)
        out = out.index_copy(2, g_idx, out_g)
    if not need_weights:
        return AttentionOutput(out, None)

    # dense (B, h, n, n) weights, for drawing (small n only)
    p_band, p_gcol = p.split([3 * b, g], -1)
    col = (kpos + b)[:, None, :].expand(nb, b, 3 * b).reshape(1, 1, nb * b, 3 * b)  # key column of each row, padded coords
    dense = torch.zeros(B, heads, nb * b, (nb + 2) * b, dtype=p.dtype, device=q.device)
    dense = dense.scatter_add(-1, col.expand(B, heads, -1, -1), p_band.reshape(B, heads, nb * b, 3 * b))
    dense = dense[:, :, :n, b : b + n]
    dense = dense.index_add(-1, g_idx, p_gcol.reshape(B, heads, nb * b, -1)[:, :, :n])
    if p_grow is not None:
        dense = dense.index_copy(2, g_idx, p_grow)
    return AttentionOutput(out, dense)


@register_kernel("global-tokens", attn_mask=False, dense=False,
                 summary="window |i - j| <= w plus global tokens that see and are seen by all, in O(n (w + g) d)")
def global_token_kernel(
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
    global_idx: Sequence[int] | Sequence[bool] | Tensor = (0,),
    blockwise: bool | None = None,
) -> AttentionOutput:
    """:func:`global_token_attention` as a kernel; global tokens see every key, so it cannot be causal."""
    if attn_mask is not None:
        raise ValueError("the global-tokens kernel takes no attn_mask (window and global tokens are the pattern); pass key_mask")
    if is_causal:
        raise ValueError("global-token attention cannot be causal: a global token attends to every position, later ones too")
    return global_token_attention(q, k, v, window, global_idx, key_mask, scale, dropout_p, need_weights, blockwise=blockwise)


@register(
    "global-tokens",
    paper="Beltagy et al. 2020",
    complexity="O(n (w + g) d)",
    chapter=5,
    summary="sliding window plus a few global tokens that see and are seen by all (Longformer/ETC/BigBird)",
    build=lambda embed_dim, num_heads: GlobalTokenAttention(embed_dim, num_heads, window=8, global_idx=(0,)),
    kernel="global-tokens",
    causal=False,
)
class GlobalTokenAttention(AttentionBase):
    """Multi-head attention with a local window plus global tokens, computed blockwise.

    Query ``i`` attends to keys ``|i - j| <= window`` and to the global
    positions; a global position attends to every key. Projections are shared
    by local and global attention (as in ETC/BigBird; Longformer trains a
    second set for the global part): :class:`~attn.attention.AttentionBase`'s
    ``q_proj, k_proj, v_proj, out_proj``, so the state dict is
    :class:`~attn.multihead.MultiHeadAttention`'s. The kernel is
    :func:`global_token_attention` (registered as ``"global-tokens"``).

    Cost: ``O(n (3w + g) d)`` for the banded rows and ``O(g n d)`` for the
    global rows, time and memory, per head. No ``n x n`` tensor is built unless
    ``need_weights=True``, which returns the dense ``(B, h, n, n)`` weights
    (for small ``n``, to draw them). The block size is ``min(window, n)`` (a
    window of ``n`` or more is the whole sequence); when the blocks would score
    at least the ``n^2`` pairs of dense attention (``n`` up to about
    ``3w + g``), the same pattern is applied to the dense scores instead
    (:meth:`reference`): the cost never exceeds dense attention's.

    Args:
        embed_dim: width ``E``; num_heads: heads ``h`` (must divide ``E``).
        window: one-sided window ``w`` (``0`` = each token sees itself and the globals).
        global_idx: default global positions (ints, negative = from the end; ``()`` for
            none), or a boolean mask of length ``n`` (``True`` = global) for inputs of
            that length only.
        dropout: dropout on the attention weights during training.
        bias: biases on the projections.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        window: int = 8,
        global_idx: Sequence[int] | Sequence[bool] | Tensor = (0,),
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        check_heads(embed_dim, num_heads)
        check_int("window", window, 0)
        super().__init__(embed_dim, num_heads, kernel="global-tokens", dropout=dropout, bias=bias)
        self.window = window
        self.global_idx = tuple(_index_tensor(global_idx).tolist())  # ints, or bools (a mask)
        self._call_global: Tensor | None = None  # this call's global positions and path, read by attend
        self._call_blockwise: bool | None = None

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        global_idx: Sequence[int] | Sequence[bool] | Tensor | None = None,
        blockwise: bool | None = None,
    ) -> AttentionOutput:
        """``x (B, n, E)`` -> ``(output (B, n, E), weights (B, h, n, n) or None)``.

        Args:
            key_mask: ``(B, n)`` boolean, ``True`` = real token.
            is_causal: ``True`` is refused (a ``ValueError``): global tokens see later positions.
            global_idx: global positions for this call (default: the constructor's):
                ints (negative = from the end) or a boolean mask ``(n,)``, ``True`` = global.
            blockwise: ``None`` takes the cheaper of the blockwise and the dense
                computation (same output); ``True``/``False`` forces one.
        """
        self._check(x, key_mask)
        if blockwise is not None and not isinstance(blockwise, bool):
            raise TypeError(f"blockwise must be None, True or False, got {blockwise!r}")
        g_idx = _global_index(x.shape[1], self.global_idx if global_idx is None else global_idx, x.device)
        self._call_global, self._call_blockwise = g_idx, blockwise
        try:
            return self.mix(x, x, x, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights)
        finally:
            self._call_global, self._call_blockwise = None, None

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
        """The ``"global-tokens"`` kernel with this layer's window and this call's global positions."""
        g_idx = self.global_idx if self._call_global is None else self._call_global
        return global_token_kernel(
            q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
            need_weights=need_weights, window=self.window, global_idx=g_idx, blockwise=self._call_blockwise,
        )

    def _check(self, x: Tensor, key_mask: Tensor | None) -> None:
        check_tokens(x, self.embed_dim)
        check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="n")

    def reference(self, x: Tensor, *, key_mask: Tensor | None = None, need_weights: bool = False,
                  global_idx: Sequence[int] | Sequence[bool] | Tensor | None = None) -> AttentionOutput:
        """The labelled baseline: the same layer as dense attention over an ``n x n`` :func:`global_mask`."""
        return self(x, key_mask=key_mask, need_weights=need_weights, global_idx=global_idx, blockwise=False)
