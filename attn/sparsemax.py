r"""Chapter 9 -- sparse *normalisers*: sparsemax and alpha-entmax in place of softmax.

Softmax never gives a key exactly zero weight. **Sparsemax** (Martins &
Astudillo, "From Softmax to Sparsemax", ICML 2016) is the Euclidean projection
of the scores onto the probability simplex,

.. math::

    \operatorname{sparsemax}(z) = \arg\min_{p \in \Delta} \lVert p - z \rVert^2 = [z - \tau(z)]_+ ,
    \qquad \tau = \frac{\sum_{j \le k(z)} z_{(j)} - 1}{k(z)},\quad
    k(z) = \max\{k : 1 + k z_{(k)} > \textstyle\sum_{j \le k} z_{(j)}\}

with :math:`z_{(1)} \ge z_{(2)} \ge \dots` the sorted scores. **alpha-entmax**
(Peters, Niculae & Martins, "Sparse Sequence-to-Sequence Models", ACL 2019)
interpolates: :math:`\alpha = 1` is softmax, :math:`\alpha = 2` sparsemax,

.. math::

    \alpha\text{-entmax}(z) = [(\alpha - 1) z - \tau]_+^{1/(\alpha - 1)},
    \qquad \tau \text{ such that the result sums to } 1 .

For :math:`\alpha = 1.5` :math:`\tau` has an exact sort-based solution; for
any :math:`\alpha > 1` it is found by bisection. The two exact solutions sort
only the entries that can be in the support (every support entry lies within 1
of the row's maximum on the :math:`(\alpha - 1) z` scale): a partial sort with
``torch.topk``, as the sparsemax papers suggest, exact and faster than a full sort. The Jacobian is, with
:math:`s_j = p_j^{2-\alpha}` on the support and 0 elsewhere,
:math:`\partial p / \partial z = \operatorname{diag}(s) - s s^\top / \textstyle\sum_j s_j`
(for sparsemax :math:`s` is the support indicator).

Masks: blocked entries get exactly zero probability; a row with every entry
blocked comes out as zeros, never NaN. Shapes: any ``(..., n)``, over ``dim``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import Attention, register_kernel
from .core import AttentionOutput, build_mask, check_qkv, masked_softmax
from .registry import register

__all__ = [
    "sparsemax", "entmax15", "entmax_bisect", "entmax", "entmax_attention", "entmax_kernel", "sparsemax_kernel",
    "EntmaxAttention", "SparsemaxAttention",
]


def _prepare(z: Tensor, mask: Tensor | None, dim: int) -> tuple[Tensor, int]:
    """Blocked entries -> ``-inf``; move ``dim`` last."""
    if not isinstance(z, Tensor) or not z.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point torch.Tensor, got {getattr(z, 'dtype', type(z).__name__)}")
    if z.ndim == 0:
        raise ValueError("scores must have at least one dimension (..., n)")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a torch.bool tensor (True = may attend), got {getattr(mask, 'dtype', type(mask).__name__)}")
        z = z.masked_fill(~mask, float("-inf"))
    return z.movedim(dim, -1), dim


def _simplex_backward(grad: Tensor, s: Tensor) -> Tensor:
    r"""``(diag(s) - s s^T / sum(s)) grad`` along the last dim (rows with ``sum(s) = 0`` give 0)."""
    g = grad * s
    coef = g.sum(-1, keepdim=True) / s.sum(-1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)  # 0 on empty rows
    return g.sub_(coef * s)


def _top(x: Tensor, k: int) -> Tensor:
    """The ``k`` largest entries of each row, in descending order (a full sort when ``k`` is most of ``n``)."""
    if 2 * k >= x.shape[-1]:
        return torch.sort(x, dim=-1, descending=True).values
    return torch.topk(x, k, dim=-1, sorted=True).values


def _threshold(x: Tensor, floor: Tensor | float, solve: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    r"""``(tau, support size)`` per row of ``x`` ``(..., n)``, sorting only what can be in the support.

    No probability exceeds 1, so every entry of the support lies above
    ``floor`` (sparsemax: :math:`z_j > \max z - 1`; 1.5-entmax:
    :math:`x_j > \max x - 1` on :math:`x = (z - \max z)/2`). One pass counts
    those entries; only the ``k`` largest of each row, ``k`` the largest
    count, are then sorted (``torch.topk``): the partial sort the sparsemax
    papers suggest, with a ``k`` that is never too small.
    ``solve(top (..., k)) -> (tau (..., 1), size (..., 1))``.
    """
    k = max(1, int((x > floor).sum(-1).max())) if x.numel() else 1
    return solve(_top(x, min(k, x.shape[-1])))


def _sparsemax_solve(zs: Tensor) -> tuple[Tensor, Tensor]:
    """Sparsemax threshold from the sorted top entries: ``k(z) = #{k : 1 + k z_(k) > sum_{j<=k} z_(j)}``."""
    ks = torch.arange(1, zs.shape[-1] + 1, device=zs.device, dtype=zs.dtype)
    cum = zs.cumsum(-1)  # -inf entries (masked) make the rest -inf: they never enter the support
    size = ((1 + ks * zs) > cum).sum(-1, keepdim=True)  # the support is a prefix, so its size is a count
    tau = (cum.gather(-1, (size - 1).clamp(min=0)) - 1) / size.clamp(min=1).to(zs.dtype)
    return tau, size


def _entmax15_solve(xs: Tensor) -> tuple[Tensor, Tensor]:
    """1.5-entmax threshold from the sorted top entries of ``x = (z - max) / 2``."""
    ks = torch.arange(1, xs.shape[-1] + 1, device=xs.device, dtype=xs.dtype)
    mean = xs.cumsum(-1) / ks  # mean of the k largest
    ss = (xs * xs).cumsum(-1) - ks * mean * mean  # their sum of squared deviations
    tau_k = mean - ((1 - ss) / ks).clamp(min=0).sqrt()  # solves sum_{j<=k} (x_(j) - tau)^2 = 1; NaN past -inf
    size = (tau_k <= xs).sum(-1, keepdim=True)
    return tau_k.gather(-1, (size - 1).clamp(min=0)), size


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        tau, size = _threshold(z, z.amax(-1, keepdim=True) - 1, _sparsemax_solve)
        p = (z - tau).clamp_(min=0)
        if not bool(size.all()):  # rows with every entry masked: zeros, not NaN
            p = p.masked_fill(size == 0, 0.0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        support = p > 0
        g = grad.masked_fill(~support, 0.0)
        v_hat = g.sum(-1, keepdim=True) / support.sum(-1, keepdim=True).clamp(min=1).to(grad.dtype)
        return g.sub_(v_hat).masked_fill_(~support, 0.0)


class _Entmax15(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        top = z.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # fully masked rows
        x = (z - top) / 2  # (alpha - 1) z, shifted (entmax is shift-invariant): max 0
        tau, size = _threshold(x, -1.0, _entmax15_solve)  # max x = 0
        p = (x - tau).clamp_(min=0).square_()
        if not bool(size.all()):
            p = p.masked_fill(size == 0, 0.0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        s = p.sqrt()
        return _simplex_backward(grad, s)


class _EntmaxBisect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, alpha: float, n_iter: int) -> Tensor:
        finite = torch.isfinite(z)
        n_valid = finite.sum(-1, keepdim=True)
        x = (alpha - 1) * z
        top = torch.where(finite, x, torch.full_like(x, -math.inf)).amax(-1, keepdim=True)
        top = torch.where(n_valid > 0, top, torch.zeros_like(top))
        x = torch.where(finite, x - top, torch.full_like(x, -math.inf))  # max 0
        power = 1.0 / (alpha - 1)

        def mass(tau: Tensor) -> Tensor:
            return (x - tau).clamp(min=0) ** power

        lo = torch.full_like(top, -1.0)  # tau = max - 1: the largest entry alone has mass 1
        hi = -(1.0 / n_valid.clamp(min=1).to(z.dtype)) ** (alpha - 1)  # every entry <= 1/n: mass <= 1
        for _ in range(n_iter):
            mid = (lo + hi) / 2
            over = mass(mid).sum(-1, keepdim=True) >= 1
            lo = torch.where(over, mid, lo)
            hi = torch.where(over, hi, mid)
        p = mass(lo)
        p = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(z.dtype).tiny)  # exact sum 1
        p = p * (n_valid > 0)
        ctx.save_for_backward(p)
        ctx.alpha = alpha
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (p,) = ctx.saved_tensors
        s = torch.where(p > 0, p ** (2 - ctx.alpha), torch.zeros_like(p))
        return _simplex_backward(grad, s), None, None


def sparsemax(z: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """Sparsemax of ``z`` along ``dim`` (exact, sort-based, Martins & Astudillo 2016, eq. 2-4).

    ``mask`` (bool, ``True`` = allowed, broadcastable to ``z``) gives blocked entries exactly 0.
    """
    x, dim = _prepare(z, mask, dim)
    return _Sparsemax.apply(x).movedim(-1, dim)


def entmax15(z: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """1.5-entmax of ``z`` along ``dim`` (exact, sort-based, Peters et al. 2019)."""
    x, dim = _prepare(z, mask, dim)
    return _Entmax15.apply(x).movedim(-1, dim)


def entmax_bisect(z: Tensor, alpha: float = 1.5, dim: int = -1, n_iter: int = 50, mask: Tensor | None = None) -> Tensor:
    r"""alpha-entmax of ``z`` along ``dim`` for any ``alpha > 1``, :math:`\tau` found by bisection.

    :math:`\tau` lies in :math:`[\max - 1, \max - n^{1-\alpha}]` (on the scale
    :math:`(\alpha - 1) z`); ``n_iter`` halvings, then a renormalisation.
    """
    if not alpha > 1:
        raise ValueError(f"entmax_bisect needs alpha > 1 (alpha = 1 is softmax), got {alpha}")
    x, dim = _prepare(z, mask, dim)
    return _EntmaxBisect.apply(x, float(alpha), int(n_iter)).movedim(-1, dim)


def entmax(z: Tensor, alpha: float = 1.5, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """alpha-entmax: softmax at ``alpha = 1``, exact at 1.5 and 2 (sparsemax), bisection otherwise."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 1:
        raise ValueError(f"alpha must be a number >= 1, got {alpha!r}")
    if alpha == 1:
        z, dim = _prepare(z, mask, dim)
        ok = torch.isfinite(z)
        return masked_softmax(z.masked_fill(~ok, 0.0), ok).movedim(-1, dim)
    if alpha == 2:
        return sparsemax(z, dim, mask)
    if alpha == 1.5:
        return entmax15(z, dim, mask)
    return entmax_bisect(z, alpha, dim, mask=mask)


def entmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float = 1.5,
    attn_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> AttentionOutput:
    r"""Attention with alpha-entmax in place of softmax: :math:`\alpha\text{-entmax}(QK^\top \cdot \text{scale})\,V`.

    ``q`` ``(B, [H,] n_q, d)``, ``k`` ``(B, [H,] n_k, d)``, ``v`` ``(B, [H,] n_k, d_v)``;
    masks as in :func:`attn.core.scaled_dot_product_attention` (boolean, ``True`` =
    may attend). Masked keys get exactly 0; many others do too. ``O(n^2 d)``
    (plus a sort per row for the exact variants).
    """
    check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if attn_mask is not None and (not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool):
        got = getattr(attn_mask, "dtype", type(attn_mask).__name__)
        raise TypeError(f"attn_mask must be a torch.bool tensor (True = may attend), got {got}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mask = build_mask(q, k, attn_mask, key_mask, is_causal)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, [H,] n_q, n_k)
    weights = entmax(scores, alpha, -1, None if mask is None else mask.expand(scores.shape))
    attn = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return AttentionOutput(torch.matmul(attn, v), weights if need_weights else None)


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 1:
        raise ValueError(f"alpha must be a number >= 1, got {alpha!r}")
    return float(alpha)


@register_kernel("entmax", summary="alpha-entmax(q k^T * scale) v: sparse weights with exact zeros (alpha=1.5 default)")
def entmax_kernel(
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
    alpha: float = 1.5,
) -> AttentionOutput:
    """:func:`entmax_attention` as a kernel (option ``alpha``: 1 softmax, 1.5 default, 2 sparsemax); boolean masks."""
    return entmax_attention(q, k, v, alpha, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal, scale=scale,
                            dropout_p=dropout_p, need_weights=need_weights)


@register_kernel("sparsemax", summary="sparsemax(q k^T * scale) v: Euclidean projection of the scores onto the simplex")
def sparsemax_kernel(
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
) -> AttentionOutput:
    """:func:`entmax_attention` at ``alpha = 2`` as a kernel."""
    return entmax_attention(q, k, v, 2.0, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal, scale=scale,
                            dropout_p=dropout_p, need_weights=need_weights)


@register(
    "entmax",
    paper="Peters et al. 2019",
    complexity="O(n^2 d + n^2 log n)",
    chapter=9,
    summary="multi-head attention normalised by 1.5-entmax: sparse weights, exact zeros",
    build=lambda embed_dim, num_heads: EntmaxAttention(embed_dim, num_heads, alpha=1.5),
    kernel="entmax",
    causal=False,
)
class EntmaxAttention(Attention):
    """Multi-head attention with alpha-entmax instead of softmax (Peters et al. 2019).

    :class:`~attn.attention.Attention` with the ``"entmax"`` kernel (:func:`entmax_kernel`;
    ``alpha = 2`` runs the ``"sparsemax"`` kernel, the same weights).

    Args:
        embed_dim, num_heads, dropout, bias, kdim, vdim: as in :class:`~attn.multihead.MultiHeadAttention`.
        alpha: ``1`` softmax, ``1.5`` (default) entmax, ``2`` sparsemax; any ``>= 1``.
        causal: the layer's default ``is_causal``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, alpha: float = 1.5, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, causal: bool = False) -> None:
        alpha = _check_alpha(alpha)
        if alpha == 2:  # sparsemax: its own kernel, no option
            super().__init__(embed_dim, num_heads, kernel="sparsemax", dropout=dropout, bias=bias, kdim=kdim,
                             vdim=vdim, causal=causal)
        else:
            super().__init__(embed_dim, num_heads, kernel="entmax", dropout=dropout, bias=bias, kdim=kdim, vdim=vdim,
                             causal=causal, alpha=alpha)
        self.alpha = alpha


@register(
    "sparsemax",
    paper="Martins & Astudillo 2016",
    complexity="O(n^2 d + n^2 log n)",
    chapter=9,
    summary="multi-head attention normalised by sparsemax (projection onto the simplex)",
    build=lambda embed_dim, num_heads: SparsemaxAttention(embed_dim, num_heads),
    kernel="sparsemax",
    causal=False,
)
class SparsemaxAttention(EntmaxAttention):
    """Multi-head attention with sparsemax instead of softmax (Martins & Astudillo 2016): alpha-entmax at ``alpha = 2``."""

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, causal: bool = False) -> None:
        super().__init__(embed_dim, num_heads, alpha=2.0, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim, causal=causal)
