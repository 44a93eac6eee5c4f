r"""Chapter 25 -- FlashAttention from scratch: exact attention in tiles, never storing the n x n scores.

**Online softmax** (Milakov & Gimelshein 2018). The softmax of a row
``s_1..s_n`` needs its maximum and its normaliser; both can be accumulated
block by block. After key block ``j`` with scores ``S^{(j)}`` a query row
keeps a running maximum ``m``, a running sum ``ell`` (:math:`\ell`) and an unnormalised output
``o``:

.. math::

    m^{(j)} = \max\big(m^{(j-1)}, \max_c S^{(j)}_c\big), \qquad
    P^{(j)} = e^{S^{(j)} - m^{(j)}}, \\
    \ell^{(j)} = e^{m^{(j-1)} - m^{(j)}}\, \ell^{(j-1)} + \textstyle\sum_c P^{(j)}_c, \qquad
    o^{(j)} = e^{m^{(j-1)} - m^{(j)}}\, o^{(j-1)} + P^{(j)} V^{(j)},

and at the end ``y = o / ell`` and the log-sum-exp ``L = m + log ell``.

**FlashAttention** (Dao et al. 2022; loop order of FlashAttention-2, Dao
2023). Queries are cut into blocks of ``block_q`` rows, keys and values into
blocks of ``block_k``; each ``(block_q, block_k)`` tile of scores is formed,
folded into ``(m, ell, o)`` and dropped. With ``causal=True`` the tiles that lie
wholly above the diagonal are skipped (never computed). Memory: ``O(n d)``
for ``Q, K, V, O`` plus ``O(n)`` for ``L`` plus one tile; the ``n x n``
matrix never exists.

**Backward by recomputation.** Only ``O`` and ``L`` are saved. With
``D_i = dO_i \cdot O_i``, each tile recomputes ``P = exp(S - L)`` and

.. math::

    dV_j \mathrel{+}= P^\top dO_i, \quad dP = dO_i V_j^\top, \quad
    dS = P \odot (dP - D_i + \bar L_i), \quad dQ_i \mathrel{+}= c\, dS\, K_j, \quad
    dK_j \mathrel{+}= c\, dS^\top Q_i ,

with the score scale ``c = 1/sqrt(d)`` (``scale``), where ``\bar L_i`` is the gradient reaching the returned log-sum-exp
(``\partial L_i / \partial s_{ij} = P_{ij}``; zero when only ``O`` is used).

**Merging partial attentions.** Attention over keys split into disjoint
chunks ``c`` (split-KV decoding, ring attention) is recovered from each
chunk's output ``O_c`` and log-sum-exp ``L_c`` alone
(:func:`merge_partial_attention`):

.. math::

    L = \log \textstyle\sum_c e^{L_c}, \qquad O = \sum_c e^{L_c - L}\, O_c ,

exact in value and, because the backward above carries ``\bar L``, in gradient.

Shapes: ``q (B, [H,] n_q, d)``, ``k (B, [H,] n_k, d)``, ``v (B, [H,] n_k, d_v)``
-> output ``(B, [H,] n_q, d_v)``, log-sum-exp ``(B, [H,] n_q)``.

**As a kernel.** :func:`flash_kernel` is :func:`flash_attention` under the one kernel signature of
:mod:`attn.attention` (registered ``"flash"``, ``dense=False``: the padding mask and ``is_causal`` are
applied per tile, a general ``attn_mask`` is refused); :class:`FlashAttention` is
``Attention(kernel="flash")``.

This is the same algorithm as PyTorch's fused ``F.scaled_dot_product_attention``
kernels, written in plain torch over Python loops so that every step can be
read: it is for teaching and checking, not for speed.

Milakov, Gimelshein, "Online normalizer calculation for softmax", arXiv 2018.
Dao, Fu, Ermon, Rudra, Ré, "FlashAttention: Fast and Memory-Efficient Exact
Attention with IO-Awareness", NeurIPS 2022.
Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", arXiv 2023.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import Attention, register_kernel
from .checks import check_int, check_same_dtype
from .core import AttentionOutput, check_qkv
from .masks import check_key_mask
from .registry import register

__all__ = [
    "flash_attention", "flash_forward", "flash_backward", "FlashAttentionFunction", "naive_attention",
    "merge_partial_attention", "tile_plan", "online_softmax_trace", "flash_kernel", "FlashAttention",
    "naive_traffic", "flash_traffic", "measured_traffic", "sram_block_q",
]


def tile_plan(n_q: int, n_k: int, block_q: int, block_k: int, causal: bool) -> Tensor:
    """Which ``(query block, key block)`` tiles are computed: ``(n_q/block_q, n_k/block_k)`` int tensor.

    ``0`` = skipped (causal, wholly above the diagonal: every key after every
    query), ``1`` = computed and partly masked (the diagonal tiles), ``2`` =
    computed in full. Causal follows SDPA's ``is_causal``: query ``i`` sees keys ``j <= i``.
    """
    check_int("block_q", block_q)
    check_int("block_k", block_k)
    nq, nk = -(-n_q // block_q), -(-n_k // block_k)
    plan = torch.full((nq, nk), 2, dtype=torch.long)
    if causal:
        for i in range(nq):
            q_lo, q_hi = i * block_q, min((i + 1) * block_q, n_q) - 1
            for j in range(nk):
                k_lo, k_hi = j * block_k, min((j + 1) * block_k, n_k) - 1
                if k_lo > q_hi:
                    plan[i, j] = 0
                elif k_hi > q_lo:
                    plan[i, j] = 1
    return plan


def naive_traffic(n_q: int, n_k: int, d: int, d_v: int | None = None) -> dict[str, int]:
    r"""Numbers moved between slow memory (HBM) and the chip by standard attention (Dao et al. 2022, Algorithm 0).

    Three passes, each reading its inputs from and writing its result to slow memory:
    ``S = Q K^T / sqrt(d)`` (read ``Q, K``, write ``S``), ``P = softmax(S)`` (read ``S``, write ``P``),
    ``O = P V`` (read ``P, V``, write ``O``). Total :math:`\Theta(n d + n^2)`; the four ``n_q x n_k``
    terms dominate once ``n > d``. Counts are numbers (multiply by the bytes per number).
    """
    for name, val in (("n_q", n_q), ("n_k", n_k), ("d", d)):
        check_int(name, val)
    d_v = d if d_v is None else check_int("d_v", d_v)
    sp = n_q * n_k
    return {"read Q, K": (n_q + n_k) * d, "write S": sp, "read S": sp, "write P": sp, "read P": sp,
            "read V": n_k * d_v, "write O": n_q * d_v}


def _key_rows_loaded(n_q: int, n_k: int, block_q: int, block_k: int, causal: bool) -> int:
    """Rows of ``K`` (and of ``V``) that :func:`flash_forward` loads over all query blocks."""
    rows = 0
    for q_lo in range(0, n_q, block_q):
        q_hi = min(q_lo + block_q, n_q)
        k_end = min(n_k, q_hi) if causal else n_k  # the loop of flash_forward
        rows += min(n_k, -(-k_end // block_k) * block_k)  # whole key blocks up to k_end, the last one clipped at n_k
    return rows


def flash_traffic(n_q: int, n_k: int, d: int, block_q: int, block_k: int, d_v: int | None = None,
                  causal: bool = False) -> dict[str, int]:
    r"""Numbers moved between slow memory and the chip by the tiled forward (:func:`flash_forward`'s loop order).

    Each query block ``Q_i`` (``block_q`` rows) is loaded once and stays on chip with its statistics
    ``m, ell`` and its accumulator ``o``; the key and value blocks stream past it; ``O_i`` and ``L_i`` are
    written once. ``S`` and ``P`` never leave the chip. With ``T_q = n_q / block_q`` query blocks:

    .. math::

        \text{reads} = n_q d + T_q\, n_k (d + d_v), \qquad \text{writes} = n_q d_v + n_q ,

    (causal: each query block streams only the key blocks it can see). Since the on-chip memory ``M``
    must hold ``Q_i`` and ``o`` (:func:`sram_block_q`), ``block_q = \Theta(M / d)`` and the traffic is
    :math:`\Theta(n^2 d^2 / M)` (Dao et al. 2022, Theorem 2), against :func:`naive_traffic`'s
    :math:`\Theta(n d + n^2)`.
    """
    for name, val in (("n_q", n_q), ("n_k", n_k), ("d", d), ("block_q", block_q), ("block_k", block_k)):
        check_int(name, val)
    d_v = d if d_v is None else check_int("d_v", d_v)
    rows = _key_rows_loaded(n_q, n_k, block_q, block_k, bool(causal))
    return {"read Q": n_q * d, "read K, V": rows * (d + d_v), "write O": n_q * d_v, "write L": n_q}


def sram_block_q(memory: int, d: int, block_k: int = 64, d_v: int | None = None) -> int:
    r"""The largest query block whose working set fits ``memory`` numbers of on-chip memory.

    On chip at once: ``Q_i`` and the accumulator ``o`` (``block_q (d + d_v)``), the statistics ``m, ell``
    (``2 block_q``), one key and value block (``block_k (d + d_v)``) and one tile of scores
    (``block_q block_k``):

    .. math::

        b_q = \Big\lfloor \frac{M - b_k (d + d_v)}{d + d_v + 2 + b_k} \Big\rfloor .

    Raises ``ValueError`` when not even one query row fits.
    """
    for name, val in (("memory", memory), ("d", d), ("block_k", block_k)):
        check_int(name, val)
    d_v = d if d_v is None else check_int("d_v", d_v)
    bq = (memory - block_k * (d + d_v)) // (d + d_v + 2 + block_k)
    if bq < 1:
        raise ValueError(f"memory={memory} numbers cannot hold a key block of {block_k} rows (d={d}, d_v={d_v}) "
                         f"and one query row: it needs at least {block_k * (d + d_v) + d + d_v + 2 + block_k}")
    return int(bq)


def measured_traffic(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, block_q: int = 64,
                     block_k: int = 64) -> dict[str, int]:
    """Run :func:`flash_forward` and count what it reads and writes, as :func:`flash_traffic` labels it.

    Every slice taken of ``q``, ``k`` or ``v`` is a load (a block brought on chip) and every write into the
    output or the log-sum-exp a store; they are counted by intercepting ``Tensor.__getitem__`` and
    ``Tensor.__setitem__`` (:class:`torch.overrides.TorchFunctionMode`). A check that the formula of
    :func:`flash_traffic` describes the code, not an independent measurement of a GPU.
    ``q, k, v``: ``(B, H, n, d)``; counts are per ``(batch, head)``.
    """
    from torch.overrides import TorchFunctionMode

    check_qkv(q, k, v)
    if q.ndim != 4:
        raise ValueError(f"measured_traffic expects q, k, v of shape (B, H, n, d), got {q.ndim}-D {tuple(q.shape)}")
    per = q.shape[0] * q.shape[1]
    counts = {"read Q": 0, "read K, V": 0, "write O": 0, "write L": 0}
    inputs = {id(q): "read Q", id(k): "read K, V", id(v): "read K, V"}

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func is Tensor.__getitem__ and id(args[0]) in inputs:
                counts[inputs[id(args[0])]] += result.numel() // per
            elif func is Tensor.__setitem__:
                counts["write O" if args[0].ndim == 4 else "write L"] += args[0][args[1]].numel() // per
            return result

    with torch.no_grad(), Count():
        flash_forward(q, k, v, causal, None, block_q, block_k)
    return counts


def _tile_mask(q_lo: int, q_hi: int, k_lo: int, k_hi: int, causal: bool, key_mask: Tensor | None, device) -> Tensor | None:
    """Boolean ``(B|1, 1, bq, bk)`` mask of one tile (``True`` = may attend), or ``None`` when all may."""
    mask = None
    if causal and k_hi - 1 > q_lo:  # a diagonal tile
        qi = torch.arange(q_lo, q_hi, device=device)[:, None]
        kj = torch.arange(k_lo, k_hi, device=device)[None, :]
        mask = (kj <= qi)[None, None]
    if key_mask is not None:
        km = key_mask[:, None, None, k_lo:k_hi]  # (B, 1, 1, bk)
        mask = km if mask is None else mask & km
    return mask


def flash_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
    block_q: int = 64, block_k: int = 64, key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The tiled forward with online softmax: ``(output (B, H, n_q, d_v), lse (B, H, n_q))``.

    ``q, k, v`` are 4-D here. Rows with no visible key get output 0 and
    ``lse = -inf``. Only one ``(B, H, block_q, block_k)`` tile of scores lives at a time.
    """
    batch, heads, n_q, _ = q.shape
    n_k, d_v = k.shape[-2], v.shape[-1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = q.new_empty(batch, heads, n_q, d_v)
    lse = q.new_empty(batch, heads, n_q)
    neg_inf = float("-inf")
    for q_lo in range(0, n_q, block_q):
        q_hi = min(q_lo + block_q, n_q)
        qi = q[:, :, q_lo:q_hi] * scale  # (B, H, bq, d): scale the queries once
        m = q.new_full((batch, heads, q_hi - q_lo, 1), neg_inf)  # running max
        ell = q.new_zeros(batch, heads, q_hi - q_lo, 1)  # running sum of exp(s - m)
        o = q.new_zeros(batch, heads, q_hi - q_lo, d_v)  # running sum of exp(s - m) v
        k_end = min(n_k, q_hi) if causal else n_k  # causal: key blocks after the last query are skipped
        for k_lo in range(0, k_end, block_k):
            k_hi = min(k_lo + block_k, n_k)
            s = qi @ k[:, :, k_lo:k_hi].transpose(-1, -2)  # (B, H, bq, bk): one tile of scores
            mask = _tile_mask(q_lo, q_hi, k_lo, k_hi, causal, key_mask, q.device)
            if mask is not None:
                s = s.masked_fill(~mask, neg_inf)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == neg_inf, 0.0)  # rows with nothing visible yet
            p = torch.exp(s - m_safe)  # (B, H, bq, bk)
            gamma = torch.exp(m - m_safe)  # rescales what was accumulated under the old max
            ell = gamma * ell + p.sum(-1, keepdim=True)
            o = gamma * o + p @ v[:, :, k_lo:k_hi]
            m = m_new
        seen = ell > 0
        out[:, :, q_lo:q_hi] = torch.where(seen, o / torch.where(seen, ell, 1.0), 0.0)
        lse[:, :, q_lo:q_hi] = torch.where(seen, m + torch.log(torch.where(seen, ell, 1.0)), neg_inf)[..., 0]
    return out, lse


def flash_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool = False,
    scale: float | None = None, block_q: int = 64, block_k: int = 64, key_mask: Tensor | None = None,
    grad_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` by recomputing each tile's probabilities from ``lse``.

    Outer loop over key blocks (``dK_j, dV_j`` accumulate in registers on a
    GPU), inner loop over query blocks; ``D = rowsum(dO * O)`` replaces the
    ``n x n`` softmax Jacobian. ``grad_lse (B, H, n_q)`` is the gradient that
    reached the log-sum-exp: since ``dL_i/ds_ij = P_ij`` it adds
    ``P * grad_lse`` to ``dS``, folded into ``D`` (``D_i - grad_lse_i``), so no
    tile costs more.
    """
    n_q, n_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    delta = (grad_out * out).sum(-1, keepdim=True)  # D_i = dO_i . O_i, (B, H, n_q, 1)
    if grad_lse is not None:  # dS = P * (dP - D + dlse) = P * (dP - (D - dlse))
        delta = delta - grad_lse[..., None]
    lse_safe = lse.masked_fill(lse == float("-inf"), float("inf"))[..., None]  # rows with no key: P = 0
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for k_lo in range(0, n_k, block_k):
        k_hi = min(k_lo + block_k, n_k)
        kj, vj = k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi]
        q_start = (k_lo // block_q) * block_q if causal else 0  # causal: query blocks before this key block see none of it
        for q_lo in range(q_start, n_q, block_q):
            q_hi = min(q_lo + block_q, n_q)
            qi, doi = q[:, :, q_lo:q_hi], grad_out[:, :, q_lo:q_hi]
            s = (qi @ kj.transpose(-1, -2)) * scale  # recomputed tile of scores
            mask = _tile_mask(q_lo, q_hi, k_lo, k_hi, causal, key_mask, q.device)
            p = torch.exp(s - lse_safe[:, :, q_lo:q_hi])  # the softmax, from the saved log-sum-exp
            if mask is not None:
                p = p.masked_fill(~mask, 0.0)
            dv[:, :, k_lo:k_hi] += p.transpose(-1, -2) @ doi
            dp = doi @ vj.transpose(-1, -2)
            ds = p * (dp - delta[:, :, q_lo:q_hi])  # the softmax Jacobian, plus P * grad_lse
            dq[:, :, q_lo:q_hi] += (ds @ kj) * scale
            dk[:, :, k_lo:k_hi] += (ds.transpose(-1, -2) @ qi) * scale
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """``autograd.Function`` around :func:`flash_forward` / :func:`flash_backward`; saves ``q, k, v, O, lse`` only."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, block_q: int, block_k: int,
                key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        out, lse = flash_forward(q, k, v, causal, scale, block_q, block_k, key_mask)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.key_mask = key_mask
        ctx.args = (causal, scale, block_q, block_k)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, block_q, block_k = ctx.args
        dq, dk, dv = flash_backward(grad_out.contiguous(), q, k, v, out, lse, causal, scale, block_q, block_k, ctx.key_mask,
                                    grad_lse=grad_lse)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
    block_q: int = 64, block_k: int = 64, key_mask: Tensor | None = None, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Exact softmax attention computed in tiles (FlashAttention), with a recomputing backward.

    Equal to ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)``
    (and to a boolean key mask ``key_mask[:, None, None, :]``), without an
    ``n_q x n_k`` tensor in the forward or the backward.

    Args:
        q, k, v: ``(batch, [heads,] n, d)``; keys and values share their length.
        causal: query ``i`` sees keys ``j <= i`` (SDPA's ``is_causal``, top-left aligned).
        scale: the factor the scores are multiplied by, ``s = q.k * scale``; default ``1/sqrt(d)``.
        block_q, block_k: tile sizes (any ``>= 1``; lengths need not be multiples).
        key_mask: ``(batch, n_k)`` boolean, ``True`` = real key.
        return_lse: also return the log-sum-exp ``(batch, [heads,] n_q)`` of each query's scores
            (differentiable: a loss through it gets its gradient, ``dL_i/ds_ij = P_ij``).

    Returns:
        ``output (batch, [heads,] n_q, d_v)`` (and the log-sum-exp). Queries with
        no visible key get zeros (their ``lse`` is ``-inf``).
    """
    check_qkv(q, k, v)
    check_same_dtype(("query", q), ("key", k), ("value", v))
    check_int("block_q", block_q)
    check_int("block_k", block_k)
    check_key_mask(key_mask, q.shape[0], k.shape[-2], length_name="n_keys")
    squeeze = q.ndim == 3
    if squeeze:
        q, k, v = q[:, None], k[:, None], v[:, None]
    out, lse = FlashAttentionFunction.apply(q, k, v, bool(causal), scale, block_q, block_k, key_mask)
    if squeeze:
        out, lse = out[:, 0], lse[:, 0]
    return (out, lse) if return_lse else out


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None) -> Tensor:
    """The baseline: ``softmax(Q K^T scale) V`` with the full ``n_q x n_k`` matrix stored (for comparison only)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = (q * scale) @ k.transpose(-1, -2)  # (..., n_q, n_k): the matrix FlashAttention never stores
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def _check_partials(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> None:
    """The inputs of :func:`merge_partial_attention`: matching non-empty sequences of ``(..., n_q, d_v)`` outputs and
    ``(..., n_q)`` log-sum-exps, one shape, dtype and device, the log-sum-exps finite or ``-inf``."""
    for name, seq in (("outputs", outputs), ("lses", lses)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors, one per key chunk, got {type(seq).__name__}")
    if len(outputs) == 0:
        raise ValueError("outputs must hold at least one chunk, got an empty sequence")
    if len(outputs) != len(lses):
        raise ValueError(f"outputs and lses must have one entry per chunk: got {len(outputs)} outputs and {len(lses)} lses")
    first = outputs[0]
    for c, (o, lse) in enumerate(zip(outputs, lses, strict=True)):  # lengths checked equal above
        if not isinstance(o, Tensor) or not isinstance(lse, Tensor):
            bad, val = (f"outputs[{c}]", o) if not isinstance(o, Tensor) else (f"lses[{c}]", lse)
            raise TypeError(f"{bad} must be a torch.Tensor, got {type(val).__name__}")
        for name, t in ((f"outputs[{c}]", o), (f"lses[{c}]", lse)):
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if o.ndim < 2:
            raise ValueError(f"outputs[{c}] must have shape (..., n_q, d_v), got {o.ndim}-D shape {tuple(o.shape)}")
        if o.shape != first.shape:
            raise ValueError(f"outputs[{c}] has shape {tuple(o.shape)}, outputs[0] {tuple(first.shape)}: every chunk's output has the same shape")
        if lse.shape != o.shape[:-1]:
            raise ValueError(f"lses[{c}] must have shape {tuple(o.shape[:-1])} (outputs[{c}] without its last dimension), got {tuple(lse.shape)}")
        check_same_dtype(("outputs[0]", first), (f"outputs[{c}]", o), (f"lses[{c}]", lse))
        if o.device != first.device or lse.device != first.device:
            raise ValueError(f"outputs[{c}] and lses[{c}] must be on {first.device} like outputs[0], got {o.device} and {lse.device}")
        with torch.no_grad():
            if bool((torch.isnan(lse) | (lse == float("inf"))).any()):
                raise ValueError(f"lses[{c}] must be finite or -inf (a chunk with no visible key), found NaN or +inf")


def merge_partial_attention(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    r"""Merge attentions computed over disjoint chunks of the keys into attention over all of them.

    Chunk ``c`` of the keys gives, for every query, an output ``O_c`` (its
    softmax-weighted values) and the log-sum-exp ``L_c`` of its scores (e.g.
    ``flash_attention(q, k_c, v_c, return_lse=True)``). Since the softmax over
    all keys weighs chunk ``c`` by its share ``e^{L_c} / \sum_{c'} e^{L_{c'}}``
    of the normaliser,

    .. math::

        L = \log \sum_c e^{L_c}, \qquad O = \sum_c e^{L_c - L}\, O_c ,

    which equals one pass over all the keys -- the combine step of split-KV
    ("flash-decoding") inference and of ring attention (Liu, Zaharia & Abbeel, "Ring Attention
    with Blockwise Transformers for Near-Infinite Context", ICLR 2024), the same rescaling as the
    online softmax of Milakov & Gimelshein 2018 applied to whole chunks.
    Gradients flow to every ``O_c`` *and* ``L_c`` (the weights depend on the
    ``L_c``), so with :func:`flash_attention`'s differentiable log-sum-exp the
    gradients w.r.t. ``q, k, v`` equal those of one pass too.

    A chunk in which a query sees no key (all masked) has ``L_c = -inf`` and
    weight 0; a query that sees no key in any chunk gets output 0 and
    ``L = -inf``, with zero (not NaN) gradients. Only ``O(chunks x n_q x d_v)``
    numbers are formed: no score matrix.

    Args:
        outputs: a non-empty sequence of ``(..., n_q, d_v)`` tensors, one per chunk, same shape and dtype.
        lses: the matching sequence of ``(..., n_q)`` log-sum-exps (``-inf`` allowed, not ``+inf`` or NaN).

    Returns:
        ``(output (..., n_q, d_v), lse (..., n_q))``.
    """
    _check_partials(outputs, lses)
    lse_all = torch.stack(list(lses))  # (C, ..., n_q)
    out_all = torch.stack(list(outputs))  # (C, ..., n_q, d_v)
    m = lse_all.detach().amax(0)  # a stabiliser only: the result does not depend on it, so no gradient through it
    m = m.masked_fill(m == float("-inf"), 0.0)  # queries that see no key anywhere
    w = torch.exp(lse_all - m)  # e^{L_c - m}, 0 for empty chunks: (C, ..., n_q)
    total = w.sum(0)  # e^{L - m}
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))  # no log 0 or 0/0, so no NaN in the backward
    lse = torch.where(seen, m + torch.log(safe), torch.full_like(total, float("-inf")))
    out = (w[..., None] * out_all).sum(0) / safe[..., None]  # sum_c e^{L_c - L} O_c (0 where nothing is seen)
    return out, lse


@dataclass
class SoftmaxTrace:
    """The online softmax of one query row, one entry per key block visited.

    ``running_max[j]``, ``running_sum[j]`` are ``m`` and ``ell`` after key block
    ``j`` (``nan`` for skipped blocks); ``block_max[j]`` the block's own max;
    ``lse`` the final log-sum-exp.
    """

    running_max: Tensor
    running_sum: Tensor
    block_max: Tensor
    lse: float


def online_softmax_trace(scores: Tensor, block_k: int, causal_row: int | None = None) -> SoftmaxTrace:
    """Run the online softmax over one row of ``scores (n_k,)`` block by block, recording ``m`` and ``ell``.

    ``causal_row=i`` hides keys ``j > i`` (and skips blocks wholly after it).
    """
    check_int("block_k", block_k)
    n_k = scores.shape[-1]
    nb = -(-n_k // block_k)
    run_m = torch.full((nb,), float("nan"), dtype=torch.float64)
    run_l, blk_m = run_m.clone(), run_m.clone()
    m, ell = float("-inf"), 0.0
    for j in range(nb):
        lo, hi = j * block_k, min((j + 1) * block_k, n_k)
        if causal_row is not None and lo > causal_row:
            continue
        s = scores[lo:hi].double()
        if causal_row is not None:
            s = s[: max(0, min(hi, causal_row + 1) - lo)]
        bm = float(s.max())
        m_new = max(m, bm)
        ell = math.exp(m - m_new) * ell + float(torch.exp(s - m_new).sum())
        m = m_new
        run_m[j], run_l[j], blk_m[j] = m, ell, bm
    return SoftmaxTrace(run_m, run_l, blk_m, m + math.log(ell))


def _flash_weights(q: Tensor, k: Tensor, lse: Tensor, scale: float | None, is_causal: bool,
                   key_mask: Tensor | None) -> Tensor:
    """The weights ``P = exp(S - lse)`` ``(B, h, n_q, n_k)``, rebuilt from the saved log-sum-exp (inspection only).

    This forms the ``n_q x n_k`` matrix the kernel never stores: small ``n`` only, and without a gradient.
    """
    with torch.no_grad():
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        s = (q @ k.transpose(-1, -2)) * scale
        lse_safe = lse.masked_fill(lse == float("-inf"), float("inf"))  # rows with no visible key: P = 0
        weights = torch.exp(s - lse_safe[..., None])
        if is_causal:
            n_q, n_k = q.shape[-2], k.shape[-2]
            weights = weights.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1), 0.0)
        if key_mask is not None:
            weights = weights.masked_fill(~key_mask[:, None, None, :], 0.0)
    return weights


@register_kernel("flash", summary="exact softmax attention in tiles with online softmax and a recomputing backward",
                 attn_mask=False, dense=False)
def flash_kernel(
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
    block_q: int = 64,
    block_k: int = 64,
) -> AttentionOutput:
    """:func:`flash_attention` as a kernel of :class:`attn.attention.Attention` (``q (B, h, L, d)``, ``k, v (B, h, S, d)``).

    Only the padding mask and the causal flag are taken (both applied per tile; no ``L x S`` mask is
    built); a general ``attn_mask`` or attention dropout raises a ``ValueError``. With
    ``need_weights=True`` the weights ``exp(S - lse)`` are rebuilt from the log-sum-exp for inspection.
    """
    if attn_mask is not None:
        raise ValueError("the flash kernel takes only key_mask and is_causal (applied per tile), not an attn_mask")
    if dropout_p:
        raise ValueError(f"the flash kernel has no attention dropout: dropout_p must be 0, got {dropout_p}")
    if q.shape[0] == 0:  # an empty batch: nothing to tile
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        return AttentionOutput(out, q.new_zeros(*q.shape[:-1], k.shape[-2]) if need_weights else None)
    res = flash_attention(q, k, v, is_causal, scale, block_q, block_k, key_mask, return_lse=True)
    assert isinstance(res, tuple)  # return_lse=True
    out, lse = res
    weights = _flash_weights(q, k, lse, scale, is_causal, key_mask) if need_weights else None
    return AttentionOutput(out, weights)


@register(
    "flash",
    paper="Dao et al. 2022; Milakov & Gimelshein 2018",
    complexity="O(n^2 d) time, O(n d) memory",
    chapter=25,
    summary="exact multi-head attention in tiles with online softmax and a recomputing backward",
    build=lambda embed_dim, num_heads: FlashAttention(embed_dim, num_heads, block_q=32, block_k=32),
    kernel="flash",
    causal=False,
)
class FlashAttention(Attention):
    """Multi-head attention whose kernel is :func:`flash_attention` (exact, tiled): :class:`~attn.attention.Attention`
    with ``kernel="flash"``.

    The projections, heads and checks are :class:`~attn.attention.Attention`'s (its state dict is
    interchangeable with :class:`attn.multihead.MultiHeadAttention`'s). Shapes: ``query (B, L, E)``,
    ``key, value (B, S, E)`` (self-attention when omitted) -> output ``(B, L, E)``; weights, when asked for,
    ``(B, h, L, S)``, rebuilt separately from ``exp(S - lse)`` (this stores ``L S`` numbers: inspection at
    small ``n`` only). The kernel takes a padding ``key_mask`` and ``is_causal``, not a general ``attn_mask``.

    Args:
        embed_dim: model width ``E``.
        num_heads: heads ``h`` (must divide ``E``).
        causal: the default of ``is_causal`` (decoder-style mask, top-left aligned as SDPA's).
        block_q, block_k: tile sizes.
        bias: biases on the projections.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, block_q: int = 64, block_k: int = 64,
                 bias: bool = True) -> None:
        check_int("block_q", block_q)
        check_int("block_k", block_k)
        super().__init__(embed_dim, num_heads, kernel="flash", causal=causal, bias=bias, block_q=block_q, block_k=block_k)
        self.block_q, self.block_k = block_q, block_k
