r"""Chapter 26 -- Linear attention: a kernel feature map makes attention associative, O(n) in the length.

**Kernelised attention** (Katharopoulos et al. 2020). Replace the softmax
similarity ``exp(q.k / sqrt(d))`` by ``phi(q)^T phi(k)`` for a feature map
``phi: R^d -> R^r_+``; then

.. math::

    y_i = \frac{\sum_j \phi(q_i)^\top \phi(k_j)\, v_j^\top}{\sum_j \phi(q_i)^\top \phi(k_j)}
        = \frac{\phi(q_i)^\top \big(\sum_j \phi(k_j) v_j^\top\big)}{\phi(q_i)^\top \sum_j \phi(k_j)}

and the bracket ``S = phi(K)^T V`` (``r x d_v``) and ``z = phi(K)^T 1`` are
computed once: ``O(n r d)`` time, no ``n x n`` matrix. The paper's map is
``phi(x) = elu(x) + 1``.

**Causal** attention needs prefix sums ``S_i = sum_{j<=i} phi(k_j) v_j^T``.
Computed in chunks of ``c`` tokens: inside a chunk the ``c x c`` masked
product, across chunks a running state ``S`` carried from chunk to chunk:
``O(n c r + n r d)``. The same sums one token at a time are
the **recurrent form** (a linear RNN with matrix state ``S_i``).

**FAVOR+** (Choromanski et al. 2021, Performer). Positive random features make
``phi(q)^T phi(k)`` an unbiased estimate of the softmax kernel ``exp(q^T k)``:

.. math::

    \phi(x) = \frac{1}{\sqrt m}\exp\!\Big(W x - \frac{\lVert x\rVert^2}{2}\Big),\quad
    W \in \mathbb{R}^{m \times d},\ w_i \sim \mathcal N(0, I_d),\qquad
    \mathbb E_W\big[\phi(q)^\top \phi(k)\big] = e^{q^\top k},

with queries and keys scaled by ``d^{-1/4}`` so that ``q^T k`` becomes
``q^T k / sqrt(d)``. Orthogonal rows (blocks of ``d`` orthogonal directions,
Gaussian norms) keep it unbiased and lower its variance.

Shapes: ``q, k (B, [H,] n, d)``, ``v (B, [H,] n, d_v)`` -> ``(B, [H,] n, d_v)``.

**As kernels** of :mod:`attn.attention`: :func:`linear_kernel` (``"linear"``) and
:func:`performer_kernel` (``"performer"``, its random projection passed in by
:class:`PerformerAttention`, whose state it is); both take the padding mask and ``is_causal`` only.

Katharopoulos, Vyas, Pappas, Fleuret, "Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention", ICML 2020.
Choromanski et al., "Rethinking Attention with Performers", ICLR 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import Attention, register_kernel
from .checks import check_int, check_positive_float
from .core import AttentionOutput, check_qkv
from .masks import check_key_mask
from .registry import register

__all__ = [
    "elu_feature", "linear_attention", "linear_attention_recurrent", "linear_attention_quadratic",
    "orthogonal_gaussian", "favor_features", "favor_feature_pair", "softmax_kernel_estimate", "linear_kernel", "performer_kernel",
    "LinearAttention", "PerformerAttention", "linear_attention_step", "delta_rule_step", "delta_rule_recurrent",
]


def elu_feature(x: Tensor) -> Tensor:
    """Katharopoulos et al.'s feature map ``phi(x) = elu(x) + 1`` (positive, same width)."""
    return F.elu(x) + 1.0


def _check_chunk(chunk: int) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(f"chunk must be an int, got {type(chunk).__name__}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


def _prepare(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, self_attention: bool) -> None:
    check_qkv(q, k, v)
    if self_attention and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal linear attention needs as many queries as keys, got {q.shape[-2]} and {k.shape[-2]}")
    check_key_mask(key_mask, q.shape[0], k.shape[-2])


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, feature_map: Callable[[Tensor], Tensor] | None = elu_feature,
    causal: bool = False, chunk: int = 64, key_mask: Tensor | None = None, eps: float = 0.0,
) -> Tensor:
    r"""Linear attention ``phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)``, in ``O(n r d)``; causal by chunked prefix sums.

    Args:
        q, k, v: ``(batch, [heads,] n, d)``; ``v`` may be wider.
        feature_map: ``phi``, applied to queries and keys (default ``elu + 1``);
            ``None``: ``q`` and ``k`` are already features (``r`` = their width).
        causal: query ``i`` sums over keys ``j <= i`` (needs as many queries as keys).
        chunk: ``c``, tokens per chunk: both forms loop over chunks, so the working set stays small.
        key_mask: ``(batch, n_keys)`` boolean, ``True`` = real key (masked keys get ``phi = 0``).
        eps: added to the normaliser (default 0: the features are positive; a
            row whose normaliser is exactly 0, no visible key, gets output 0).

    Returns:
        ``(batch, [heads,] n_q, d_v)``.
    """
    _prepare(q, k, v, key_mask, causal)
    _check_chunk(chunk)
    eps = check_positive_float("eps", eps, allow_zero=True)
    squeeze = q.ndim == 3
    if squeeze:
        q, k, v = q[:, None], k[:, None], v[:, None]
    phi = (lambda t: t) if feature_map is None else feature_map
    n_k = k.shape[-2]
    mask = None if key_mask is None else key_mask[:, None, :, None]  # (B, 1, n_k, 1)

    def keys(lo: int) -> Tensor:  # phi(K) of one chunk, masked keys zeroed: (B, H, c, r)
        fk = phi(k[..., lo : lo + chunk, :])
        return fk if mask is None else fk * mask[:, :, lo : lo + chunk].to(fk.dtype)

    if causal:
        out = _causal_chunked(q, k, v, phi, keys, chunk, eps)
    else:
        # S = phi(K)^T V and z = phi(K)^T 1, accumulated chunk by chunk (the working set stays one chunk)
        state: Tensor | None = None  # None until the first chunk
        norm: Tensor | None = None
        for lo in range(0, n_k, chunk):
            fk = keys(lo)
            kv = fk.transpose(-1, -2) @ v[..., lo : lo + chunk, :]  # (B, H, r, d_v)
            z = fk.sum(-2)[..., None]  # (B, H, r, 1)
            state, norm = (kv, z) if state is None or norm is None else (state + kv, norm + z)
        assert state is not None and norm is not None, "n_k >= 1 (checked by _prepare): at least one chunk"
        outs = []
        for lo in range(0, q.shape[-2], chunk):
            fq = phi(q[..., lo : lo + chunk, :])  # (B, H, c, r)
            outs.append((fq @ state) / _safe(fq @ norm + eps))
        out = torch.cat(outs, -2)
    return out[:, 0] if squeeze else out


def _safe(den: Tensor) -> Tensor:
    """The normaliser with exact zeros (no visible key, padding) replaced by 1: such rows get output 0, not NaN."""
    return den.masked_fill(den == 0, 1.0)


def _causal_chunked(q: Tensor, k: Tensor, v: Tensor, phi: Callable[[Tensor], Tensor], keys: Callable[[int], Tensor],
                    chunk: int, eps: float) -> Tensor:
    """Causal linear attention: ``c x c`` products inside each chunk, a running state carried across chunks.

    The loop runs over the ``n / c`` chunks (not the ``n`` tokens): each step
    reads the state of all earlier chunks, adds the masked in-chunk product,
    then folds its own keys and values into the state. The working set is one
    chunk and one ``r x d_v`` state, whatever ``n``. ``keys(lo)`` gives the
    chunk's (masked) key features.
    """
    # S_[<t] (B, H, r, d_v) and z_[<t] (B, H, r, 1): None (zero) before the first chunk
    state: Tensor | None = None
    norm: Tensor | None = None
    outs = []
    for lo in range(0, q.shape[-2], chunk):
        qc, kc, vc = phi(q[..., lo : lo + chunk, :]), keys(lo), v[..., lo : lo + chunk, :]  # (B, H, c, .)
        a = (qc @ kc.transpose(-1, -2)).tril()  # (B, H, c, c): phi(q_i)^T phi(k_j), j <= i inside the chunk
        num = a @ vc  # this chunk's own keys: (B, H, c, d_v)
        den = a.sum(-1, keepdim=True)  # (B, H, c, 1)
        if state is not None and norm is not None:  # lo > 0: + the state of the earlier chunks
            num = num + qc @ state
            den = den + qc @ norm
        outs.append(num / _safe(den + eps))
        kv, z = kc.transpose(-1, -2) @ vc, kc.sum(-2)[..., None]  # fold this chunk in: + phi(K_t)^T V_t
        state, norm = (kv, z) if state is None or norm is None else (state + kv, norm + z)
    return torch.cat(outs, -2)


def linear_attention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, feature_map: Callable[[Tensor], Tensor] | None = elu_feature, eps: float = 0.0,
) -> Tensor:
    r"""Causal linear attention as an RNN: ``S_i = S_{i-1} + phi(k_i) v_i^T``, ``y_i = phi(q_i)^T S_i / phi(q_i)^T z_i``.

    One step per token (a Python loop): what autoregressive decoding does, with
    a state of fixed size ``r x d_v`` whatever the length. Shapes as :func:`linear_attention`.
    """
    _prepare(q, k, v, None, True)
    eps = check_positive_float("eps", eps, allow_zero=True)
    fq, fk = (q, k) if feature_map is None else (feature_map(q), feature_map(k))
    state = fq.new_zeros(*fq.shape[:-2], fq.shape[-1], v.shape[-1])  # S: (..., r, d_v)
    norm = fq.new_zeros(*fq.shape[:-2], fq.shape[-1])  # z: (..., r)
    outs = []
    for i in range(q.shape[-2]):
        state = state + fk[..., i, :, None] * v[..., i, None, :]  # + phi(k_i) v_i^T
        norm = norm + fk[..., i, :]
        num = (fq[..., i, :, None] * state).sum(-2)  # phi(q_i)^T S_i: (..., d_v)
        den = (fq[..., i, :] * norm).sum(-1, keepdim=True)
        outs.append(num / _safe(den + eps))
    return torch.stack(outs, -2)


def linear_attention_step(
    state: Tensor, norm: Tensor, q: Tensor, k: Tensor, v: Tensor,
    feature_map: Callable[[Tensor], Tensor] | None = elu_feature, eps: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One decoding step of causal linear attention: fold token ``t`` into the state, then read it.

    .. math::

        U_t = U_{t-1} + \phi(k_t)\, v_t^\top,\qquad z_t = z_{t-1} + \phi(k_t),\qquad
        y_t = \frac{\phi(q_t)^\top U_t}{\phi(q_t)^\top z_t}

    Shapes: ``state`` ``U (..., r, d_v)``, ``norm`` ``z (..., r)``, ``q, k (..., d)``, ``v (..., d_v)``;
    returns ``(y (..., d_v), U_t, z_t)``. The state has the same size after every token: this is the
    constant-memory decoding that replaces a KV cache (compare :func:`linear_attention_recurrent`, the same
    loop over a whole sequence). Start from zeros: ``U_0 = 0``, ``z_0 = 0``.
    """
    fq, fk = (q, k) if feature_map is None else (feature_map(q), feature_map(k))
    state = state + fk[..., :, None] * v[..., None, :]
    norm = norm + fk
    num = (fq[..., :, None] * state).sum(-2)
    den = (fq * norm).sum(-1, keepdim=True)
    return num / _safe(den + eps), state, norm


def delta_rule_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    r"""One step of the delta rule (DeltaNet): correct the state's answer for ``k_t`` towards ``v_t``, then read it.

    .. math::

        U_t = U_{t-1} + \beta_t\,\big(v_t - U_{t-1} k_t\big)\, k_t^\top,\qquad y_t = U_t\, q_t

    ``U_{t-1} k_t`` is what the memory currently returns for key ``k_t``; the update moves it a fraction
    ``beta_t`` in ``[0, 1]`` of the way to ``v_t`` (with ``|k_t| = 1`` and ``beta_t = 1`` the memory then
    returns exactly ``v_t`` for ``k_t``, overwriting the old association instead of adding to it). Plain
    linear attention is ``U_t = U_{t-1} + v_t k_t^\top``: it never removes anything.

    Shapes: ``state`` ``U (..., d_v, d_k)``, ``q, k (..., d_k)``, ``v (..., d_v)``, ``beta (...)``;
    returns ``(y (..., d_v), U_t)``. Schlag, Irie, Schmidhuber, "Linear Transformers Are Secretly Fast
    Weight Programmers", ICML 2021; Yang et al., "Parallelizing Linear Transformers with the Delta Rule
    over Sequence Length", NeurIPS 2024.
    """
    recalled = (state * k[..., None, :]).sum(-1)  # U_{t-1} k_t: (..., d_v)
    state = state + beta[..., None, None] * (v - recalled)[..., :, None] * k[..., None, :]
    return (state * q[..., None, :]).sum(-1), state


def delta_rule_recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | float = 1.0) -> Tensor:
    r"""Causal delta-rule attention (DeltaNet), one token at a time: :func:`delta_rule_step` over the sequence.

    ``U_t = U_{t-1} + beta_t (v_t - U_{t-1} k_t) k_t^T``, ``y_t = U_t q_t``, from ``U_0 = 0``. No feature map and
    no normaliser: DeltaNet L2-normalises ``q`` and ``k`` (and takes ``beta_t = sigmoid(w_beta^T x_t)``) before
    calling this. A ``d_v x d_k`` state stores at most ``d_k`` associations exactly (orthogonal keys); the
    delta rule reaches that bound, plain linear attention (the additive update) does not once keys overlap
    or repeat.

    Shapes: ``q, k (..., n, d_k)``, ``v (..., n, d_v)``, ``beta`` a float or ``(..., n)`` -> ``(..., n, d_v)``.
    A Python loop over tokens: the reference and decoding form (the chunked parallel form of Yang et al.
    2024 is not implemented here).
    """
    check_qkv(q, k, v)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"the delta rule is causal self-attention: as many queries as keys, got {q.shape[-2]} "
                         f"and {k.shape[-2]}")
    b = torch.as_tensor(beta, dtype=q.dtype, device=q.device)
    b = b.expand(q.shape[:-1]) if b.ndim == 0 else b
    if b.shape != q.shape[:-1]:
        raise ValueError(f"beta must be a float or have shape {tuple(q.shape[:-1])}, got {tuple(b.shape)}")
    state = q.new_zeros(*q.shape[:-2], v.shape[-1], q.shape[-1])  # U: (..., d_v, d_k)
    outs = []
    for t in range(q.shape[-2]):
        y, state = delta_rule_step(state, q[..., t, :], k[..., t, :], v[..., t, :], b[..., t])
        outs.append(y)
    return torch.stack(outs, -2)


def linear_attention_quadratic(
    q: Tensor, k: Tensor, v: Tensor, feature_map: Callable[[Tensor], Tensor] | None = elu_feature,
    causal: bool = False, key_mask: Tensor | None = None, eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The baseline / reference: the ``n x n`` matrix ``A = phi(Q) phi(K)^T``, masked, row-normalised, times ``V``.

    Returns ``(output, weights)``; weights ``(..., n_q, n_k)`` (rows sum to 1). ``O(n^2)``: for checking and pictures.
    """
    fq, fk = (q, k) if feature_map is None else (feature_map(q), feature_map(k))
    a = fq @ fk.transpose(-1, -2)
    if causal:
        a = a.tril()
    if key_mask is not None:
        a = a * key_mask[:, None, :].to(a.dtype) if a.ndim == 3 else a * key_mask[:, None, None, :].to(a.dtype)
    den = _safe(a.sum(-1, keepdim=True) + eps)
    return (a @ v) / den, a / den


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator | None = None, orthogonal: bool = True,
                        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """``(m, d)`` random projection: rows ``w_i`` with ``w_i ~ N(0, I_d)`` marginally.

    ``orthogonal=True`` (FAVOR+): stacked blocks of ``d`` exactly orthogonal
    directions (QR of a Gaussian matrix), each row rescaled to the norm of an
    independent Gaussian vector, so that each row is still ``N(0, I_d)``.
    ``False``: i.i.d. Gaussian rows.
    """
    if m < 1 or d < 1:
        raise ValueError(f"need m >= 1 features and d >= 1, got m={m}, d={d}")
    gauss = torch.randn(m, d, generator=generator, dtype=torch.float64)
    if not orthogonal:
        return gauss.to(dtype=dtype, device=device)
    blocks = []
    for start in range(0, m, d):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        qmat, rmat = torch.linalg.qr(g)
        qmat = qmat * torch.sign(torch.diagonal(rmat))  # a uniformly (Haar) random rotation
        blocks.append(qmat.T[: min(d, m - start)])
    directions = torch.cat(blocks)  # (m, d), unit rows, orthogonal within a block
    norms = gauss.norm(dim=-1, keepdim=True)  # chi(d) lengths
    return (directions * norms).to(dtype=dtype, device=device)


def _key_mask_like(x: Tensor, key_mask: Tensor | None) -> Tensor | None:
    """``key_mask (B, n)`` viewed to broadcast against features ``x (B, [H,] n, m)``; ``None`` stays ``None``."""
    if key_mask is None:
        return None
    check_key_mask(key_mask, x.shape[0], x.shape[-2])
    return key_mask.reshape(key_mask.shape[0], *([1] * (x.ndim - 3)), key_mask.shape[1], 1)


def _favor_exponent(x: Tensor, projection: Tensor, scale: float | None = None) -> Tensor:
    """``W x' - |x'|^2 / 2`` with ``x' = x d^{-1/4}`` (``x sqrt(scale)`` for a given softmax ``scale``): the exponent
    of the unnormalised FAVOR+ feature, ``(..., n, m)``."""
    x = x * (x.shape[-1] ** -0.25 if scale is None else math.sqrt(scale))
    return x @ projection.to(x.dtype).T - (x * x).sum(-1, keepdim=True) / 2


def favor_features(x: Tensor, projection: Tensor, is_query: bool, stabilise: bool = True,
                   key_mask: Tensor | None = None) -> Tensor:
    r"""FAVOR+ positive features ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)``, ``x' = x d^{-1/4}``.

    ``phi(q)^T phi(k)`` estimates ``exp(q^T k / sqrt(d))`` without bias.
    ``stabilise`` subtracts the maximum of the exponent ``W x' - |x'|^2 / 2``
    (per query row for queries, one value per batch element and head for keys,
    taken over the *real* keys only when ``key_mask`` is given): constant factors that cancel in
    the attention's normalisation but change the raw kernel estimate, so pass
    ``False`` to estimate the kernel itself. Keys where ``key_mask`` is ``False``
    get features exactly 0, whatever their content. Shapes: ``x (..., n, d)``,
    ``projection (m, d)``, ``key_mask (B, n)`` (keys only) -> ``(..., n, m)``.
    For attention, :func:`favor_feature_pair` is the safer choice: it cannot
    underflow to an all-zero row.
    """
    m = projection.shape[0]
    arg = _favor_exponent(x, projection)  # (..., n, m)
    mask = None if is_query else _key_mask_like(arg, key_mask)
    if mask is not None:
        arg = arg.masked_fill(~mask, -math.inf)  # padded keys: exp(-inf) = 0, and they cannot set the maximum
    if stabilise:
        shift = arg.amax(-1, keepdim=True) if is_query else arg.amax(dim=(-1, -2), keepdim=True)
        shift = shift.masked_fill(~torch.isfinite(shift), 0.0)  # no real key at all: nothing to stabilise
        arg = arg - shift.detach()
    return torch.exp(arg) / math.sqrt(m)


def favor_feature_pair(q: Tensor, k: Tensor, projection: Tensor, key_mask: Tensor | None = None,
                       scale: float | None = None) -> tuple[Tensor, Tensor]:
    r"""FAVOR+ features of queries and keys, stabilised together so that no query row can underflow to zero.

    With :math:`a_{jl} = w_l^\top k'_j - \lVert k'_j\rVert^2/2` and
    :math:`b_{il} = w_l^\top q'_i - \lVert q'_i\rVert^2/2` (the exponents of
    :func:`favor_features`), each feature ``l`` is shifted by its maximum over the
    real keys, :math:`M_l = \max_{j\,\text{real}} a_{jl}`, moved from the keys to the queries:

    .. math::

        \tilde\phi(k_j)_l = \frac{e^{a_{jl} - M_l}}{\sqrt m},\qquad
        \tilde\phi(q_i)_l = \frac{e^{b_{il} + M_l - c_i}}{\sqrt m},\qquad
        c_i = \max_l\,(b_{il} + M_l),

    so :math:`\tilde\phi(q_i)^\top\tilde\phi(k_j) = e^{-c_i}\,\phi(q_i)^\top\phi(k_j)`
    exactly (the paper's estimator times a per-query constant, which cancels in
    the row normalisation). Every exponent is ``<= 0`` (no overflow), and for
    each query the feature ``l`` reaching :math:`c_i` meets the key reaching
    :math:`M_l` with product ``1/m``: the normaliser of a query with at least one
    real key is ``>= 1/m``, never 0, however far an outlier key sits. (A single
    global maximum over keys, the usual stabiliser, lets one outlier key push
    every other feature below the underflow threshold.) Padded keys (``key_mask``
    ``False``) get features exactly 0 and take no part in any maximum.

    Shapes: ``q (..., n_q, d)``, ``k (..., n_k, d)``, ``projection (m, d)``,
    ``key_mask (B, n_k)`` -> ``(phi(q) (..., n_q, m), phi(k) (..., n_k, m))``. ``scale``: the softmax scale
    the estimate stands for (``exp(q^T k * scale)``), default ``1 / sqrt(d)``.
    The guarantee is for non-causal attention: with causal prefix sums a query
    sees only the keys before it, and ``M_l`` may come from a later key.
    """
    m = projection.shape[0]
    a = _favor_exponent(k, projection, scale)  # (..., n_k, m)
    mask = _key_mask_like(a, key_mask)
    if mask is not None:
        a = a.masked_fill(~mask, -math.inf)
    top = a.amax(-2, keepdim=True)  # (..., 1, m): M_l over the real keys
    top = top.masked_fill(~torch.isfinite(top), 0.0).detach()  # no real key: features all 0 anyway
    b = _favor_exponent(q, projection, scale) + top  # (..., n_q, m)
    b = b - b.amax(-1, keepdim=True).detach()  # c_i: cancels in the normalisation
    return torch.exp(b) / math.sqrt(m), torch.exp(a - top) / math.sqrt(m)


def softmax_kernel_estimate(q: Tensor, k: Tensor, projection: Tensor) -> Tensor:
    """The FAVOR+ estimate of ``exp(q_i^T k_j / sqrt(d))``: ``(..., n_q, n_k)`` (dense; for measuring the error)."""
    return favor_features(q, projection, True, stabilise=False) @ favor_features(k, projection, False, stabilise=False).transpose(-1, -2)


def _no_mask_no_dropout(kernel: str, attn_mask: Tensor | None, dropout_p: float) -> None:
    """The linear kernels take a padding mask and causality only: no general ``attn_mask``, no attention dropout."""
    if attn_mask is not None:
        raise ValueError(f"the {kernel} kernel takes only key_mask and is_causal (no L x S matrix exists), not an attn_mask")
    if dropout_p:
        raise ValueError(f"the {kernel} kernel has no attention dropout: dropout_p must be 0, got {dropout_p}")


def _feature_attention(fq: Tensor, fk: Tensor, v: Tensor, key_mask: Tensor | None, is_causal: bool, chunk: int,
                       need_weights: bool) -> AttentionOutput:
    """Linear attention on ready features ``phi(q) (B, h, L, r)``, ``phi(k) (B, h, S, r)``; the weights on demand."""
    if fq.shape[0] == 0:  # an empty batch
        out = fq.new_zeros(*fq.shape[:-1], v.shape[-1])
        return AttentionOutput(out, fq.new_zeros(*fq.shape[:-1], fk.shape[-2]) if need_weights else None)
    out = linear_attention(fq, fk, v, None, causal=is_causal, chunk=chunk, key_mask=key_mask)
    weights = None
    if need_weights:  # inspection only: the L x S matrix the linear form never builds
        with torch.no_grad():
            weights = linear_attention_quadratic(fq, fk, v, None, causal=is_causal, key_mask=key_mask)[1]
    return AttentionOutput(out, weights)


@register_kernel("linear", summary="phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1) with phi = elu + 1: linear in the length",
                 attn_mask=False, dense=False)
def linear_kernel(
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
    chunk: int = 64,
    feature_map: Callable[[Tensor], Tensor] = elu_feature,
) -> AttentionOutput:
    """:func:`linear_attention` as a kernel (``q (B, h, L, d)``, ``k, v (B, h, S, d)``), ``phi = elu + 1`` by default.

    ``scale`` is accepted for the one kernel signature and unused: the feature map replaces
    ``exp(q.k * scale)`` (Katharopoulos et al. apply ``elu + 1`` to the unscaled projections). Causal
    attention (prefix sums, in chunks of ``chunk`` tokens) needs as many queries as keys. With
    ``need_weights=True`` the normalised ``(B, h, L, S)`` matrix is built separately (small ``n`` only).
    """
    _no_mask_no_dropout("linear", attn_mask, dropout_p)
    _prepare(q, k, v, key_mask, is_causal)
    _check_chunk(chunk)
    return _feature_attention(feature_map(q), feature_map(k), v, key_mask, is_causal, chunk, need_weights)


@register_kernel("performer", summary="FAVOR+: positive orthogonal random features estimating softmax attention, linear in n",
                 attn_mask=False, dense=False)
def performer_kernel(
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
    projection: Tensor | None = None,
    num_features: int = 64,
    chunk: int = 64,
) -> AttentionOutput:
    r"""Performer attention (FAVOR+) as a kernel: :func:`favor_feature_pair`, then :func:`linear_attention`.

    ``projection`` ``(m, d)`` holds the random features (:class:`PerformerAttention` passes its buffer);
    ``None`` draws ``num_features`` orthogonal ones from a generator seeded 0 (a deterministic default).
    ``scale`` is the softmax's: queries and keys are multiplied by ``sqrt(scale)`` (``d^{-1/4}`` by default),
    so that ``phi(q)^T phi(k)`` estimates ``exp(q^T k * scale)``.
    """
    _no_mask_no_dropout("performer", attn_mask, dropout_p)
    _prepare(q, k, v, key_mask, is_causal)
    _check_chunk(chunk)
    if projection is None:
        check_int("num_features", num_features)
        projection = orthogonal_gaussian(num_features, q.shape[-1], torch.Generator().manual_seed(0),
                                         dtype=q.dtype, device=q.device)
    fq, fk = favor_feature_pair(q, k, projection, key_mask, scale=scale)
    return _feature_attention(fq, fk, v, key_mask, is_causal, chunk, need_weights)


@register(
    "linear",
    paper="Katharopoulos et al. 2020",
    complexity="O(n d^2)",
    chapter=26,
    summary="kernelised attention with phi = elu + 1, associative: O(n) in the length; causal by chunked prefix sums",
    build=lambda embed_dim, num_heads: LinearAttention(embed_dim, num_heads),
    kernel="linear",
    causal=False,
)
class LinearAttention(Attention):
    """Multi-head linear attention with ``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020): ``Attention(kernel="linear")``.

    Args:
        embed_dim, num_heads: width ``E`` and heads ``h``.
        causal: the default of ``is_causal``: prefix sums (decoder), computed in chunks of ``chunk`` tokens.
        bias: biases on the projections.

    Projections and heads are :class:`~attn.attention.Attention`'s (state dicts interchangeable with
    :class:`attn.multihead.MultiHeadAttention`'s). ``need_weights=True`` also returns the normalised
    ``(B, h, L, S)`` matrix ``phi(q_i)^T phi(k_j) / sum_j ...`` (built separately, small ``n`` only).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, chunk: int = 64, bias: bool = True) -> None:
        _check_chunk(chunk)
        super().__init__(embed_dim, num_heads, kernel="linear", causal=causal, bias=bias, chunk=chunk)
        self.chunk = chunk

    def features(self, q: Tensor, k: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``phi(q), phi(k)`` per head, ``(B, h, n, r)``: ``elu + 1`` (``key_mask`` is not needed: padded keys are zeroed after)."""
        return elu_feature(q), elu_feature(k)


@register(
    "performer",
    paper="Choromanski et al. 2021",
    complexity="O(n m d)",
    chapter=26,
    summary="FAVOR+: positive orthogonal random features estimating the softmax kernel, linear in n",
    build=lambda embed_dim, num_heads: PerformerAttention(embed_dim, num_heads, num_features=64),
    kernel="performer",
    causal=False,
)
class PerformerAttention(Attention):
    """Multi-head Performer attention (FAVOR+): softmax attention approximated with ``m`` positive random features.

    ``Attention(kernel="performer")`` whose random projection is state (a buffer): :meth:`attend` passes it
    to :func:`performer_kernel`.

    Args:
        embed_dim, num_heads: width ``E`` and heads ``h``.
        num_features: ``m`` random features per head (shared by the heads).
        orthogonal: orthogonal random features (FAVOR+) or i.i.d. Gaussian.
        causal: the default of ``is_causal``: prefix sums, in chunks of ``chunk`` tokens.
        bias: biases on the projections.
        seed: seeds the projection (a buffer; :meth:`redraw` draws a new one).
    """

    projection: Tensor  # buffer: (m, d_head) random features

    def __init__(self, embed_dim: int, num_heads: int, *, num_features: int = 64, orthogonal: bool = True,
                 causal: bool = False, chunk: int = 64, bias: bool = True, seed: int = 0) -> None:
        _check_chunk(chunk)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
        super().__init__(embed_dim, num_heads, kernel="performer", causal=causal, bias=bias, chunk=chunk)
        self.chunk, self.num_features, self.orthogonal = chunk, num_features, orthogonal
        self.register_buffer("projection", orthogonal_gaussian(num_features, self.head_dim, torch.Generator().manual_seed(seed), orthogonal))

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a new random projection (Performer redraws it periodically during training)."""
        new = orthogonal_gaussian(self.num_features, self.head_dim, generator, self.orthogonal)
        self.projection.copy_(new.to(self.projection))

    def features(self, q: Tensor, k: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:func:`favor_feature_pair`: stabilised over the real keys only, so padded content cannot change the output."""
        return favor_feature_pair(q, k, self.projection, key_mask)

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
        """:func:`performer_kernel` with this layer's random projection."""
        return performer_kernel(
            q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal, scale=scale,
            dropout_p=dropout_p, need_weights=need_weights, projection=self.projection, chunk=self.chunk,
        )
