r"""Chapter 19 -- Attention pooling: a query that belongs to the model reads a set of any size into a fixed-size vector.

**Nadaraya-Watson kernel regression** (Nadaraya 1964; Watson 1964) is
attention with a fixed score. Given pairs ``(x_i, y_i)``, the estimate at a
query ``x`` is a weighted average of the ``y_i`` with Gaussian kernel weights:

.. math::

    \hat f(x) = \sum_i \frac{K_h(x - x_i)}{\sum_j K_h(x - x_j)}\, y_i
              = \sum_i \operatorname{softmax}_i\Big(-\frac{\lVert x - x_i\rVert^2}{2h^2}\Big)\, y_i ,

and since ``-||x - x_i||^2 / 2h^2 = (x^T x_i - ||x_i||^2 / 2) / h^2 - ||x||^2 / 2h^2``
(the last term is the same for every ``i`` and cancels in the softmax), it is
scaled dot-product attention with queries ``x``, keys ``x_i``, values ``y_i``,
scale ``1/h^2`` and an additive key bias ``-||x_i||^2 / 2h^2``
(:func:`nadaraya_watson`). Shapes: queries ``(B, m, d)``, keys ``(B, n, d)``,
values ``(B, n, k)`` -> ``(B, m, k)``, weights ``(B, m, n)``.

**Pooling by multi-head attention** (Lee et al. 2019, Set Transformer, section 3.2).
``k`` learned seed vectors ``S`` attend to the set ``Z``:

.. math::

    \mathrm{MAB}(X, Y) = \mathrm{LN}(H + \mathrm{rFF}(H)), \quad
    H = \mathrm{LN}(X + \mathrm{Multihead}(X, Y, Y)), \qquad
    \mathrm{PMA}_k(Z) = \mathrm{MAB}(S, \mathrm{rFF}(Z)) .

Shapes: ``Z (B, n, d)`` -> ``(B, k, d)``, weights ``(B, h, k, n)``.

**CLIP's attention pool** (Radford et al. 2021, ``AttentionPool2d`` of the
modified ResNet). The query is the *mean* token; it attends to itself and to
all tokens, and a projection maps the result to the output width:

.. math::

    \bar z = \tfrac1n \textstyle\sum_i z_i, \quad
    \text{out} = W_c\, \mathrm{Multihead}\big(\bar z,\, [\bar z; z_1..z_n],\, [\bar z; z_1..z_n]\big) + b_c .

(CLIP adds a learned position embedding to the ``n + 1`` tokens of its image
grid; without it, as here by default, the pool is permutation invariant.)

Every pool is permutation invariant in its set argument and takes a
``key_mask (B, n)`` (``True`` = real element) for batches of sets of
different sizes; an empty set is an error. Cost: ``O(k n d + n d^2)``,
linear in the set size ``n``.

Nadaraya, "On Estimating Regression", Theory Probab. Appl. 1964. Watson,
"Smooth Regression Analysis", Sankhya A 1964. Lee, Lee, Kim, Kosiorek, Choi,
Teh, "Set Transformer", ICML 2019. Radford et al., "Learning Transferable
Visual Models From Natural Language Supervision", ICML 2021.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from .attention import Attention
from .checks import check_tensor, check_tokens
from .core import AttentionOutput, scaled_dot_product_attention
from .masks import check_key_mask
from .registry import register

__all__ = ["nadaraya_watson", "gaussian_kernel_weights", "leave_one_out_mse", "fit_bandwidth_loo", "NadarayaWatson", "RowFF", "MAB", "PMA", "AttentionPool"]


def _check_set(z: object, dim: int | None, key_mask: Tensor | None, name: str = "z") -> Tensor:
    """``z (B, n, dim)`` with ``n >= 1`` and, when masked, at least one real element per set."""
    width = "dim" if dim is None else f"dim={dim}"
    z = check_tokens(z, dim, name, allow_empty_seq=True)
    if z.shape[0] > 0 and z.shape[1] == 0:
        raise ValueError(f"{name} is an empty set: shape (batch, n, {width}) needs n >= 1, got {tuple(z.shape)}")
    check_key_mask(key_mask, z.shape[0], z.shape[1], length_name="n", meaning="real set element")
    if key_mask is not None and z.shape[0] > 0:
        empty = (~key_mask.any(-1)).nonzero()
        if len(empty):
            raise ValueError(f"set {int(empty[0])} is empty: key_mask has no True in its row (every set needs >= 1 element)")
    return z


# ----------------------------------------------------------------------------- Nadaraya-Watson


def _bandwidth(bandwidth: float | Tensor) -> Tensor | float:
    """``h``: a finite number ``> 0`` or a tensor of them (a learnable scalar)."""
    if isinstance(bandwidth, Tensor):
        if bandwidth.is_complex() or not bool(torch.isfinite(bandwidth).all()) or bool((bandwidth <= 0).any()):
            raise ValueError(f"bandwidth must be > 0 and finite, got {bandwidth}")
        return bandwidth
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not bandwidth > 0:
        raise ValueError(f"bandwidth must be a positive number, got {bandwidth!r}")
    if not math.isfinite(bandwidth):
        raise ValueError(f"bandwidth must be a positive number and finite, got {bandwidth!r}")
    return float(bandwidth)


def _check_bandwidth_scale(h2: Tensor | float, q: Tensor, k: Tensor) -> None:
    """Reject ``h`` so small that ``h^2`` underflows or the scores ``(x^T x_i - |x_i|^2/2) / h^2`` overflow in ``q``'s dtype.

    ``q`` and ``k`` are the centred points. Past these limits the estimate is the
    nearest observation's value (the limit ``h -> 0``), but the float
    arithmetic would give NaN; the error says how small ``h`` may be.
    """
    info = torch.finfo(q.dtype)
    smallest = float(h2.detach().min()) if isinstance(h2, Tensor) else h2
    if not smallest >= info.tiny:
        raise ValueError(
            f"bandwidth must be >= {math.sqrt(info.tiny):.3g} in {q.dtype} (its square underflows), got {math.sqrt(smallest):.3g}"
        )
    with torch.no_grad():
        qn = float(q.norm(dim=-1).max()) if q.numel() else 0.0
        kn = float(k.norm(dim=-1).max()) if k.numel() else 0.0
        bound = (qn * kn + kn * kn / 2) / smallest  # the largest |score|
    if not bound < info.max / 4:
        need = math.sqrt((qn * kn + kn * kn / 2) / (info.max / 4))
        raise ValueError(
            f"bandwidth {math.sqrt(smallest):.3g} is too small for points {qn:.3g} apart from the keys' centre in "
            f"{q.dtype}: the scores |x - x_i|^2 / 2h^2 overflow (need bandwidth >= {need:.3g}, or float64)"
        )


def _check_regression(queries: object, keys: object, values: object) -> tuple[Tensor, Tensor, Tensor]:
    q = check_tensor(queries, "queries", "(batch, m, d)", 3)
    k = check_tensor(keys, "keys", "(batch, n, d)", 3)
    v = check_tensor(values, "values", "(batch, n, k)", 3)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"queries (batch, m, d) and keys (batch, n, d) must share d, got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"keys (batch, n, d) and values (batch, n, k) must share (batch, n), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"queries and keys batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    if k.shape[0] > 0 and (k.shape[1] == 0 or q.shape[1] == 0):
        raise ValueError(f"need at least one query and one (x_i, y_i) pair: queries {tuple(q.shape)}, keys {tuple(k.shape)}")
    return q, k, v


def nadaraya_watson(
    queries: Tensor, keys: Tensor, values: Tensor, bandwidth: float | Tensor, *,
    key_mask: Tensor | None = None, need_weights: bool = False,
) -> AttentionOutput:
    r"""Nadaraya-Watson regression with a Gaussian kernel, computed as scaled dot-product attention.

    .. math::

        \hat y(x) = \sum_i \operatorname{softmax}_i\big((\bar x^\top \bar x_i - \tfrac12\lVert \bar x_i\rVert^2)/h^2\big)\, y_i,
        \qquad \bar x = x - c,\ \bar x_i = x_i - c

    The estimate depends only on the differences ``x - x_i``, so every point is
    first shifted by ``c``, the mean of the (real) observed ``x_i``: far from the
    origin the expanded scores would otherwise cancel (in float32 at an offset of
    1,000 the weights lost two digits). The softmax subtracts the largest score,
    so the kernel cannot underflow everywhere; a bandwidth whose square
    underflows, or so small that the scores overflow, is a ``ValueError``.

    Args:
        queries: ``(B, m, d)`` the points ``x`` to predict at.
        keys: ``(B, n, d)`` the observed ``x_i``.
        values: ``(B, n, k)`` the observed ``y_i``.
        bandwidth: ``h > 0``, finite, a number or a (learnable) scalar tensor.
        key_mask: ``(B, n)`` boolean, ``True`` = real observation.
        need_weights: also return the kernel weights ``(B, m, n)``.

    Returns:
        :class:`~attn.core.AttentionOutput` ``(estimate (B, m, k), weights or None)``.
    """
    q, k, v = _check_regression(queries, keys, values)
    h = _bandwidth(bandwidth)
    check_key_mask(key_mask, k.shape[0], k.shape[1], length_name="n")
    if k.shape[0] == 0:
        return AttentionOutput(v.new_zeros(0, q.shape[1], v.shape[-1]), v.new_zeros(0, q.shape[1], k.shape[1]) if need_weights else None)
    # centre: the estimate is shift-invariant; c (B, 1, d) is the mean of the real x_i (constant for autograd: it cancels)
    real = torch.ones(k.shape[:2], dtype=k.dtype, device=k.device) if key_mask is None else key_mask.to(k.dtype)
    c = ((k * real[..., None]).sum(1, keepdim=True) / real.sum(1)[:, None, None].clamp_min(1)).detach()
    q, k = q - c, k - c
    h2 = h * h
    _check_bandwidth_scale(h2, q, k if key_mask is None else k * key_mask[..., None].to(k.dtype))  # real keys set the scale
    bias = (-0.5 * (k * k).sum(-1) / h2)[:, None, :]  # (B, 1, n): -||x_i||^2 / 2h^2, the same for every query
    # scale the queries by 1/h^2 (not SDPA's float scale) so that a tensor h gets a gradient
    return scaled_dot_product_attention(q / h2, k, v, attn_mask=bias, key_mask=key_mask, scale=1.0, need_weights=need_weights)


def gaussian_kernel_weights(queries: Tensor, keys: Tensor, bandwidth: float | Tensor) -> Tensor:
    """The explicit estimator's weights ``K_h(x - x_i) / sum_j K_h(x - x_j)``, ``(B, m, n)`` (a reference: exp of distances)."""
    q, k, _ = _check_regression(queries, keys, keys)
    d2 = ((q[:, :, None, :] - k[:, None, :, :]) ** 2).sum(-1)  # (B, m, n) squared distances
    return (-d2 / (2 * _bandwidth(bandwidth) ** 2)).softmax(-1)  # exp(-d2 / 2h^2) normalised; max-shifted, no 0/0


def leave_one_out_mse(keys: Tensor, values: Tensor, bandwidth: float | Tensor) -> Tensor:
    r"""Leave-one-out error of Nadaraya-Watson: each ``y_i`` predicted from the other observations.

    .. math::

        \mathrm{LOO}(h) = \frac1n \sum_i \big(\hat f_{-i}(x_i) - y_i\big)^2,
        \qquad \hat f_{-i}(x_i) = \sum_{j \ne i} \operatorname{softmax}_j\big(-\lVert x_i - x_j\rVert^2 / 2h^2\big)\, y_j

    Without leaving ``x_i`` out, ``h -> 0`` would predict each ``y_i`` by itself
    (error 0): the held-out point is what makes the criterion choose a bandwidth.
    Computed with :func:`nadaraya_watson`, one query per observation and the
    observation itself masked out (``(n, n)`` key masks: a criterion on a
    small dataset, not an efficient path).

    Args:
        keys: ``(B, n, d)`` observed ``x_i``, ``n >= 2``.
        values: ``(B, n, k)`` observed ``y_i``.
        bandwidth: ``h > 0`` (a tensor gets a gradient).

    Returns:
        ``(B,)`` the mean squared leave-one-out error of each dataset.
    """
    q, k, v = _check_regression(keys, keys, values)
    b, n, d = k.shape
    if n < 2:
        raise ValueError(f"leave_one_out_mse needs n >= 2 observations, got keys of shape {tuple(k.shape)}")
    others = ~torch.eye(n, dtype=torch.bool, device=k.device)  # row i: every observation but i
    # dataset b, query i -> batch row b * n + i, with its own key mask
    qs = q.reshape(b * n, 1, d)
    ks = k[:, None].expand(b, n, n, d).reshape(b * n, n, d)
    vs = v[:, None].expand(b, n, n, v.shape[-1]).reshape(b * n, n, v.shape[-1])
    pred = nadaraya_watson(qs, ks, vs, bandwidth, key_mask=others.repeat(b, 1)).output.reshape(b, n, -1)
    return ((pred - v) ** 2).mean((1, 2))


def fit_bandwidth_loo(keys: Tensor, values: Tensor, init: float = 1.0, steps: int = 100, lr: float = 0.1) -> Tensor:
    """Learn ``h`` by gradient descent (Adam on ``log h``) on the leave-one-out error, one ``h`` per dataset.

    Shapes: ``keys (B, n, d)``, ``values (B, n, k)`` -> ``(B,)`` the learned bandwidths.
    """
    if steps < 1 or not lr > 0 or not init > 0:
        raise ValueError(f"need steps >= 1, lr > 0 and init > 0, got steps={steps}, lr={lr}, init={init}")
    log_h = torch.full((keys.shape[0], 1, 1), math.log(init), dtype=keys.dtype, device=keys.device, requires_grad=True)
    opt = torch.optim.Adam([log_h], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        # the estimate depends on (x - x_i) / h only: dataset b at bandwidth h_b is keys / h_b at bandwidth 1
        leave_one_out_mse(keys / log_h.exp(), values, 1.0).sum().backward()
        opt.step()
    return log_h.detach().exp().flatten()


@register(
    "nadaraya_watson",
    paper="Nadaraya 1964; Watson 1964",
    complexity="O(m n d)",
    chapter=19,
    data="set",
    summary="kernel regression as attention: softmax of -|x - x_i|^2 / 2h^2 over the observations",
)
class NadarayaWatson(nn.Module):
    """Nadaraya-Watson regression with a learnable bandwidth ``h = exp(log_h)``.

    Shapes: ``queries (B, m, d)``, ``keys (B, n, d)``, ``values (B, n, k)``,
    ``key_mask (B, n)`` -> ``(estimate (B, m, k), weights (B, m, n) | None)``.

    Args:
        bandwidth: initial ``h``.
        learnable: train ``log h`` (otherwise a buffer).
    """

    def __init__(self, bandwidth: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        h = _bandwidth(bandwidth)
        h = float(h) if isinstance(h, Tensor) else h
        if h * h < torch.finfo(torch.get_default_dtype()).tiny:
            raise ValueError(f"bandwidth must be >= {math.sqrt(torch.finfo(torch.get_default_dtype()).tiny):.3g} "
                             f"(its square underflows in {torch.get_default_dtype()}), got {h:g}")
        log_h = torch.tensor(math.log(h))
        if learnable:
            self.log_bandwidth = nn.Parameter(log_h)
        else:
            self.register_buffer("log_bandwidth", log_h)

    @property
    def bandwidth(self) -> Tensor:
        return self.log_bandwidth.exp()

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor, *, key_mask: Tensor | None = None,
                need_weights: bool = False) -> AttentionOutput:
        return nadaraya_watson(queries, keys, values, self.bandwidth, key_mask=key_mask, need_weights=need_weights)


# ----------------------------------------------------------------------------- Set Transformer: MAB and PMA


class RowFF(nn.Module):
    """Row-wise feed-forward ``rFF(x) = W_2 relu(W_1 x + b_1) + b_2``, applied to every set element alike."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden or dim), nn.ReLU(), nn.Linear(hidden or dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MAB(nn.Module):
    r"""Multihead attention block (Set Transformer, eq. 6-7): ``LN(H + rFF(H))``, ``H = LN(X + Multihead(X, Y, Y))``.

    Shapes: ``x (B, m, dim)`` queries, ``y (B, n, dim)`` the set, ``key_mask (B, n)``
    -> ``(output (B, m, dim), weights (B, h, m, n) | None)``.

    Args:
        dim: width ``d``; num_heads: ``h`` (divides ``d``); ff_hidden: width of rFF's hidden layer (default ``d``);
        layer_norm: the paper's two layer norms (``False`` drops them, as the paper's ablation).
    """

    def __init__(self, dim: int, num_heads: int, *, ff_hidden: int | None = None, layer_norm: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.attention = Attention(dim, num_heads)  # the book's one multi-head attention (scaled dot-product kernel)
        self.ff = RowFF(dim, ff_hidden)
        self.norm1 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if layer_norm else nn.Identity()

    def forward(self, x: Tensor, y: Tensor, *, key_mask: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        att, weights = self.attention(x, y, y, key_mask=key_mask, need_weights=need_weights)  # (B, m, d)
        h = self.norm1(x + att)  # H = LN(X + Multihead(X, Y, Y))
        return AttentionOutput(self.norm2(h + self.ff(h)), weights)  # LN(H + rFF(H))


@register(
    "pma",
    paper="Lee et al. 2019",
    complexity="O(k n d + n d^2)",
    chapter=19,
    data="set",
    summary="Set Transformer pooling: k learned seeds attend to the set through a MAB block",
)
class PMA(nn.Module):
    r"""Pooling by multi-head attention: ``PMA_k(Z) = MAB(S, rFF(Z))`` with ``k`` learned seeds ``S``.

    Shapes: ``z (B, n, dim)``, ``key_mask (B, n)`` (``True`` = real element)
    -> ``(output (B, k, dim), weights (B, h, k, n) | None)``.

    Args:
        dim: set element width ``d``.
        num_heads: heads of the MAB's attention.
        num_seeds: ``k``, the number of output vectors.
        ff_hidden, layer_norm: passed to the :class:`MAB`.
    """

    def __init__(self, dim: int, num_heads: int = 4, *, num_seeds: int = 1, ff_hidden: int | None = None,
                 layer_norm: bool = True) -> None:
        super().__init__()
        if num_seeds <= 0:
            raise ValueError(f"num_seeds must be positive, got {num_seeds}")
        self.dim, self.num_seeds = dim, num_seeds
        self.seeds = nn.Parameter(torch.randn(num_seeds, dim) / math.sqrt(dim))  # S (k, d); small: near-uniform weights at first
        self.ff = RowFF(dim, ff_hidden)
        self.mab = MAB(dim, num_heads, ff_hidden=ff_hidden, layer_norm=layer_norm)

    def forward(self, z: Tensor, *, key_mask: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        z = _check_set(z, self.dim, key_mask)
        seeds = self.seeds.expand(z.shape[0], -1, -1)  # (B, k, d)
        return self.mab(seeds, self.ff(z), key_mask=key_mask, need_weights=need_weights)  # (B, k, d), (B, h, k, n)


# ----------------------------------------------------------------------------- CLIP attention pool


@register(
    "clip_pool",
    paper="Radford et al. 2021",
    complexity="O(n d + n d^2)",
    chapter=19,
    data="set",
    summary="CLIP's attention pool: the mean token queries the tokens (and itself)",
)
class AttentionPool(nn.Module):
    r"""CLIP's attention pool: the mean of the tokens is the one query.

    ``seq = [mean(z); z] (+ position embedding)``; ``out = c_proj(Multihead(seq[0], seq, seq))``.

    Shapes: ``z (B, n, dim)``, ``key_mask (B, n)`` -> ``(output (B, out_dim), weights (B, h, n + 1) | None)``;
    weight ``0`` is the mean token's own.

    Args:
        dim: token width; num_heads: heads (divides ``dim``); out_dim: output width (default ``dim``).
        num_positions: with a number, a learned position embedding for ``num_positions + 1``
            tokens (CLIP's image grid; breaks permutation invariance); ``None`` for sets.
    """

    def __init__(self, dim: int, num_heads: int = 4, *, out_dim: int | None = None, num_positions: int | None = None) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be positive and divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.out_dim = dim, num_heads, out_dim or dim
        self.position = None if num_positions is None else nn.Parameter(torch.randn(num_positions + 1, dim) / dim**0.5)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, self.out_dim)

    def forward(self, z: Tensor, *, key_mask: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        z = _check_set(z, self.dim, key_mask)
        if self.position is not None and z.shape[1] + 1 != self.position.shape[0]:
            raise ValueError(f"z must have shape (batch, n={self.position.shape[0] - 1}, dim={self.dim}) to match the "
                             f"position embedding, got {tuple(z.shape)}")
        if key_mask is None:
            mean = z.mean(1, keepdim=True)  # (B, 1, d)
            full_mask = None
        else:
            w = key_mask.to(z.dtype)
            mean = (w[..., None] * z).sum(1, keepdim=True) / w.sum(1)[:, None, None]  # mean of the real elements
            full_mask = torch.cat([key_mask.new_ones(z.shape[0], 1), key_mask], 1)  # (B, n + 1): the mean is always real
        seq = torch.cat([mean, z], 1)  # (B, n + 1, d)
        if self.position is not None:
            seq = seq + self.position
        q = rearrange(self.q_proj(seq[:, :1]), "b l (h d) -> b h l d", h=self.num_heads)  # (B, h, 1, d_h)
        k = rearrange(self.k_proj(seq), "b n (h d) -> b h n d", h=self.num_heads)  # (B, h, n + 1, d_h)
        v = rearrange(self.v_proj(seq), "b n (h d) -> b h n d", h=self.num_heads)
        out, weights = scaled_dot_product_attention(q, k, v, key_mask=full_mask, need_weights=need_weights)
        out = self.c_proj(rearrange(out, "b h l d -> b l (h d)"))[:, 0]  # (B, out_dim)
        return AttentionOutput(out, None if weights is None else weights[:, :, 0])  # weights (B, h, n + 1)
