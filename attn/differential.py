r"""Chapter 30 -- differential attention and attention sinks: subtract a second softmax map; keep the first tokens in a sliding cache.

**Differential attention** (Ye et al., "Differential Transformer", ICLR 2025,
arXiv 2024). Per head, queries and keys are split in two halves
``Q_1, Q_2, K_1, K_2`` (width ``d``), values have width ``2d``:

.. math::

    \operatorname{DiffAttn}(X) = \Big(\operatorname{softmax}\!\Big(\frac{Q_1 K_1^\top}{\sqrt d}\Big)
        - \lambda\, \operatorname{softmax}\!\Big(\frac{Q_2 K_2^\top}{\sqrt d}\Big)\Big) V,

    \lambda = \exp(\lambda_{q_1} \cdot \lambda_{k_1}) - \exp(\lambda_{q_2} \cdot \lambda_{k_2}) + \lambda_{\text{init}},
    \qquad \lambda_{\text{init}} = 0.8 - 0.6\, e^{-0.3 (l - 1)},

    \text{head}_i = (1 - \lambda_{\text{init}})\, \operatorname{RMSNorm}(\operatorname{DiffAttn}_i(X)), \qquad
    y = [\text{head}_1; \dots; \text{head}_h]\, W^O,

with learnable vectors ``\lambda_{q_1}, \lambda_{k_1}, \lambda_{q_2}, \lambda_{k_2} \in \mathbb{R}^d``
(one ``\lambda`` per layer, shared by its heads) and ``l`` the layer's
index (1-based). ``h = E / (2d)``: a differential layer of width ``E`` with
``h`` heads has the parameters of a standard layer with ``2h`` heads of
width ``d``. The output is two fused attention calls, ``A_1 V - \lambda A_2 V``:
no ``n x n`` map is formed unless the weights are asked for. The fused kernels
want values as wide as queries (``d``), and ``V`` is ``2d`` wide: as in the
authors' code, ``V`` is split into halves ``V^{(1)}, V^{(2)}`` and
``A_i V = [A_i V^{(1)}; A_i V^{(2)}]``; the two halves ride as extra heads of
one call per map (:func:`attend_wide_values`). Memory is linear in ``n``
(causal: ``is_causal``, no mask tensor); ``need_weights=True`` takes the exact
dense path.

**Attention sinks** (Xiao et al., "Efficient Streaming Language Models with
Attention Sinks", ICLR 2024). A causal LM decoding past its training length
with a sliding KV cache of ``w`` tokens breaks as soon as the first tokens
are evicted: softmax heads that had nothing to attend to parked their weight
there (the *sink*). Keeping the first ``s`` tokens' keys and values beside the
``w - s`` most recent ones (:class:`SinkCache`), with positions assigned
inside the cache, restores it. The chapter's small rotary LM that streams
through such a cache (``RotaryLM``, an :class:`attn.models.TokenLM`) and its
data live in :mod:`attn.experiments.differential`.

**A learned sink logit** (the "softmax plus one" of Miller, 2023, with a learned
bias; gpt-oss, OpenAI 2025): each head ``h`` gets a learned scalar ``b_h`` added to
its softmax denominator, a virtual key that every query sees, with value zero,

.. math::

    a_{tj} = \frac{e^{s_{tj}}}{e^{b_h} + \sum_{j' \le t} e^{s_{tj'}}}, \qquad o_t = \sum_{j \le t} a_{tj} v_j ,

so a row may sum to less than one and a head with nothing to read can put its
mass on the virtual key instead of on the first token
(:func:`sink_logit_attention`).

Shapes: ``x`` ``(B, n, E)``; output ``(B, n, E)``; weights (the difference
map ``A_1 - \lambda A_2``, not a distribution: rows sum to ``1 - \lambda``)
``(B, h, n, n)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .checks import check_int, check_same_dtype, check_tensor, check_tokens, empty_batch
from .core import AttentionOutput, check_qkv, scaled_dot_product_attention
from .masks import check_key_mask
from .positions import fused_attention
from .registry import register

__all__ = ["lambda_init", "attend_wide_values", "DifferentialAttention", "SinkCache", "sink_logit_attention"]


def _check_lambda_init(value: object) -> float:
    """``lambda_init_value`` must be a finite real number in ``[0, 1)``; the message says why."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"lambda_init_value must be a real number in [0, 1), got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"lambda_init_value must be a finite number in [0, 1), got {value}")
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"lambda_init_value must be in [0, 1), got {value}: every head is scaled by (1 - lambda_init), "
            "so 1 makes the layer's output exactly zero (and no gradient reaches it) and values above 1 flip its sign; "
            "the paper's schedule lambda_init(l) stays in [0.2, 0.8)")
    return value


def lambda_init(layer_index: int) -> float:
    r"""``0.8 - 0.6 \exp(-0.3 (l - 1))`` for layer ``l >= 1`` (Ye et al., section 2.1): 0.2 in layer 1, towards 0.8 deep down."""
    check_int("layer_index (1-based)", layer_index)
    return 0.8 - 0.6 * math.exp(-0.3 * (layer_index - 1))


def attend_wide_values(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False) -> Tensor:
    r"""``softmax(q k^\top / \sqrt d) v`` for values twice as wide as the queries, in linear memory.

    ``q, k`` ``(B, h, n, d)``, ``v`` ``(B, h, n, 2d)`` -> ``(B, h, n, 2d)``. The fused
    kernels need ``d_v = d``: ``v`` is split into its halves, which become heads
    ``2i, 2i+1`` (each paired with the same ``q, k`` of head ``i``) of one
    :func:`attn.positions.fused_attention` call: ``A [V^{(1)}, V^{(2)}] = [A V^{(1)}, A V^{(2)}]``.
    """
    B, h, n, d = q.shape
    two = (B, h, 2, n, d)
    qq = q.unsqueeze(2).expand(two).reshape(B, 2 * h, n, d)  # head i's queries, twice
    kk = k.unsqueeze(2).expand(two).reshape(B, 2 * h, n, d)
    vv = v.reshape(B, h, n, 2, d).transpose(2, 3).reshape(B, 2 * h, n, d)  # halves V^(1), V^(2) as heads 2i, 2i+1
    out = fused_attention(qq, kk, vv, key_mask=key_mask, causal=causal, scale=1.0 / math.sqrt(d))  # (B, 2h, n, d)
    return out.view(B, h, 2, n, d).transpose(2, 3).reshape(B, h, n, 2 * d)


@register(
    "differential",
    paper="Ye et al. 2024",
    complexity="O(n^2 d)",
    chapter=30,
    summary="differential attention: difference of two softmax maps with a learned lambda, per-head RMSNorm",
    build=lambda embed_dim, num_heads: DifferentialAttention(embed_dim, max(1, num_heads // 2)),
    kernel=None,
    causal=False,
)
class DifferentialAttention(nn.Module):
    """Multi-head differential attention (Ye et al. 2024).

    Args:
        embed_dim: model width ``E``.
        num_heads: differential heads ``h``; each has query/key halves of width
            ``d = E / (2h)`` and values of width ``2d`` (``2h`` standard heads' worth of parameters).
        layer_index: the layer's 1-based depth ``l``, which sets ``lambda_init`` (default 1: 0.2).
        lambda_init_value: override ``lambda_init``: a finite number in ``[0, 1)`` (the heads are
            scaled by ``1 - lambda_init``: 1 would zero the output, above 1 flip its sign).
        causal: hide future keys (a decoder): the layer's default for ``is_causal``.
        bias: biases on the projections (the paper has none).
        eps: epsilon of the per-head RMSNorm.

    ``forward(x (B, n, E), *, key_mask=None, is_causal=None, need_weights=False)`` (the
    :class:`~attn.attention.SequenceMixer` protocol); ``key_mask`` ``(B, n)`` is True for real tokens;
    ``is_causal=None`` keeps ``causal``. The weights are the difference map ``A_1 - lambda A_2`` ``(B, h, n, n)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, layer_index: int = 1,
                 lambda_init_value: float | None = None, causal: bool = False, bias: bool = False,
                 eps: float = 1e-5) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        if embed_dim % (2 * num_heads):
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by 2 * num_heads ({2 * num_heads})")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // (2 * num_heads)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.causal = causal
        self.lambda_init = lambda_init(layer_index) if lambda_init_value is None else _check_lambda_init(lambda_init_value)
        d = self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)  # h heads x [Q_1; Q_2], each of width d
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)  # h heads x [K_1; K_2]
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)  # h heads of width 2d
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)  # W^O
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(d) * 0.1) for _ in range(4))
        self.head_norm = nn.RMSNorm(2 * d, eps=eps)  # per head, over its 2d outputs

    def lam(self) -> Tensor:
        r"""The re-parameterised scalar ``\lambda`` of this layer."""
        return (torch.exp(self.lambda_q1 @ self.lambda_k1) - torch.exp(self.lambda_q2 @ self.lambda_k2)
                + self.lambda_init)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        B, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, n, h, 2, d).permute(3, 0, 2, 1, 4)  # (2, B, h, n, d): Q_1, Q_2
        k = self.k_proj(x).view(B, n, h, 2, d).permute(3, 0, 2, 1, 4)  # (2, B, h, n, d): K_1, K_2
        v = self.v_proj(x).view(B, n, h, 2 * d).transpose(1, 2)  # (B, h, n, 2d)
        return q[0], q[1], k[0], k[1], v

    def _causal(self, is_causal: bool | None) -> bool:
        if is_causal is None:
            return self.causal
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
        return is_causal

    def maps(self, x: Tensor, key_mask: Tensor | None = None, *, is_causal: bool | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """The two softmax maps ``A_1, A_2`` ``(B, h, n, n)`` and ``lambda`` (for drawing them)."""
        x = check_tokens(x, self.embed_dim)
        causal = self._causal(is_causal)
        q1, q2, k1, k2, v = self._qkv(x)
        a1 = scaled_dot_product_attention(q1, k1, v, key_mask=key_mask, is_causal=causal, need_weights=True).weights
        a2 = scaled_dot_product_attention(q2, k2, v, key_mask=key_mask, is_causal=causal, need_weights=True).weights
        assert a1 is not None and a2 is not None, "need_weights=True returns the weights"
        return a1, a2, self.lam()

    def forward(self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None,
                need_weights: bool = False) -> AttentionOutput:
        """``(B, n, E) -> (B, n, E)``; the difference map ``(B, h, n, n)`` when ``need_weights``."""
        causal = self._causal(is_causal)
        x = check_tokens(x, self.embed_dim)
        B, n, _ = x.shape
        if key_mask is not None:
            check_key_mask(key_mask, B, n)
        if empty_batch(x):
            return AttentionOutput(x.new_zeros(B, n, self.embed_dim),
                                   x.new_zeros(B, self.num_heads, n, n) if need_weights else None)
        q1, q2, k1, k2, v = self._qkv(x)
        lam = self.lam()
        weights: Tensor | None = None
        if need_weights:  # the exact dense path: both maps are formed
            o1, a1 = scaled_dot_product_attention(q1, k1, v, key_mask=key_mask, is_causal=causal,
                                                  need_weights=True)  # A_1 V, (B, h, n, 2d)
            o2, a2 = scaled_dot_product_attention(q2, k2, v, key_mask=key_mask, is_causal=causal,
                                                  need_weights=True)  # A_2 V
            assert a1 is not None and a2 is not None, "need_weights=True returns the weights"
            weights = a1 - lam * a2
        else:  # two fused calls, V in halves: memory linear in n
            o1 = attend_wide_values(q1, k1, v, key_mask, causal)
            o2 = attend_wide_values(q2, k2, v, key_mask, causal)
        heads = self.head_norm(o1 - lam * o2) * (1.0 - self.lambda_init)  # (B, h, n, 2d)
        y = self.out_proj(heads.transpose(1, 2).reshape(B, n, self.embed_dim))
        return AttentionOutput(y, weights)


# ============================================================================ attention sinks


class SinkCache:
    """Per-layer keys and values (un-rotated) of a sliding window that keeps the first ``sinks`` tokens.

    Holds at most ``window`` tokens: the first ``sinks`` ever seen and the
    ``window - sinks`` most recent (``sinks = 0``: a plain sliding window;
    ``window = None``: keep everything). ``sinks`` may also be a ``(batch,)``
    tensor, one policy per row (the rows still hold the same number of
    tokens, so several policies run as one batch). Positions are assigned
    inside the cache (0 .. size - 1) when attending, as in StreamingLLM.
    """

    def __init__(self, num_layers: int, window: int | None, sinks: int | Tensor = 0) -> None:
        self.num_layers = check_int("num_layers", num_layers)
        if window is not None:
            check_int("window", window)
        if isinstance(sinks, Tensor):
            if sinks.ndim != 1 or sinks.dtype == torch.bool or sinks.is_floating_point() or sinks.is_complex():
                raise TypeError(f"sinks must be an int or a (batch,) integer tensor (one policy per row), "
                                f"got a {sinks.ndim}-D {sinks.dtype} tensor")
            if sinks.numel() == 0:
                raise ValueError("sinks given as a tensor must have one entry per row, got an empty tensor")
        else:
            check_int("sinks", sinks, low=0)
        most = int(sinks.max()) if isinstance(sinks, Tensor) else sinks
        least = int(sinks.min()) if isinstance(sinks, Tensor) else sinks
        if window is not None and not 0 <= least <= most < window:
            raise ValueError(f"need 0 <= sinks < window, got sinks={sinks}, window={window}")
        if window is None and most:
            raise ValueError("sinks only make sense with a window")
        self.window, self.sinks = window, sinks
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.seen = 0  # tokens appended so far

    def _check(self, layer: object, k: object, v: object) -> tuple[Tensor, Tensor]:
        """Clear errors for a bad layer index, non-tensors, shapes and dtypes that don't fit the cache."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int in [0, {self.num_layers}), got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}) (the cache was built for num_layers="
                             f"{self.num_layers}), got {layer}")
        k = check_tensor(k, "k", "(batch, heads, tokens, head_dim)", 4)
        v = check_tensor(v, "v", "(batch, heads, tokens, head_dim_v)", 4)
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k and v must share (batch, heads, tokens), got k {tuple(k.shape)} and v {tuple(v.shape)}")
        cached_k, cached_v = self.k[layer], self.v[layer]
        check_same_dtype(("k", k), ("v", v), ("cached keys", cached_k))
        if cached_k is not None and cached_v is not None:
            want = (cached_k.shape[0], cached_k.shape[1], cached_k.shape[3])
            if (k.shape[0], k.shape[1], k.shape[3]) != want or v.shape[3] != cached_v.shape[3]:
                raise ValueError(
                    f"layer {layer}'s cache holds (batch={want[0]}, heads={want[1]}, head_dim={want[2]}) with values of "
                    f"width {cached_v.shape[3]}: k and v must continue it, got k {tuple(k.shape)} and v {tuple(v.shape)} "
                    "(start a new SinkCache for a new batch)")
        if isinstance(self.sinks, Tensor) and self.sinks.shape[0] != k.shape[0]:
            raise ValueError(f"sinks has one entry per row: shape ({k.shape[0]},) for this batch of {k.shape[0]}, "
                             f"got {tuple(self.sinks.shape)}")
        return k, v

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add one token's ``k, v`` ``(B, h, 1, d)``; evict; return the cache ``(B, h, size, d)``.

        Raises:
            TypeError: ``k`` or ``v`` not a floating-point tensor, or a dtype other than the cache's.
            ValueError: ``layer`` outside ``[0, num_layers)``; a batch, head count or width other than
                the cache's; per-row ``sinks`` of another batch size.
        """
        k, v = self._check(layer, k, v)
        cached_k, cached_v = self.k[layer], self.v[layer]
        if cached_k is None or cached_v is None:  # set together: both or neither
            ks, vs = k, v
        else:
            ks, vs = torch.cat([cached_k, k], 2), torch.cat([cached_v, v], 2)
        size = ks.shape[2]
        if self.window is not None and size > self.window:
            # slot j keeps token j if j < sinks, else token j + (size - window): the first sinks and the newest rest
            j = torch.arange(self.window, device=ks.device)
            sinks = self.sinks.to(ks.device)[:, None] if isinstance(self.sinks, Tensor) else self.sinks
            idx = torch.where(j < sinks, j, j + (size - self.window))  # (window,) or (B, window)
            idx = idx.expand(ks.shape[0], self.window)[:, None, :, None]
            ks = ks.gather(2, idx.expand(-1, ks.shape[1], -1, ks.shape[3]))
            vs = vs.gather(2, idx.expand(-1, vs.shape[1], -1, vs.shape[3]))
        self.k[layer], self.v[layer] = ks, vs
        return ks, vs


# ============================================================================ a learned sink logit


def sink_logit_attention(q: Tensor, k: Tensor, v: Tensor, sink_logit: Tensor, *, causal: bool = False,
                         attn_mask: Tensor | None = None, key_mask: Tensor | None = None,
                         scale: float | None = None) -> tuple[Tensor, Tensor]:
    r"""Softmax attention with a learned per-head sink logit in the denominator: a virtual key with value zero.

    ``a_{tj} = e^{s_{tj}} / (e^{b_h} + \sum_{j'} e^{s_{tj'}})`` with ``s = \tau q k^\top`` (plus the masks),
    ``o = a v``; the mass ``1 - \sum_j a_{tj} = e^{b_h} / (e^{b_h} + \sum_{j'} e^{s_{tj'}})`` goes to the virtual
    key and writes nothing. Computed as one softmax over ``[s_{t0} .. s_{t,n-1}, b_h]`` whose last column is
    dropped. This is the dense reference (it forms the ``(B, h, n_q, n_k)`` scores), for small models and for
    reading the weights.

    Args:
        q: ``(B, h, n_q, d)``. k: ``(B, h, n_k, d)``. v: ``(B, h, n_k, d_v)``.
        sink_logit: ``(h,)``, the learned ``b_h``.
        causal: query ``i`` sees keys ``j <= i`` (top-left aligned).
        attn_mask: boolean ``(n_q, n_k)`` or broadcastable to ``(B, h, n_q, n_k)``, ``True`` = may attend.
        key_mask: ``(B, n_k)`` boolean, ``True`` = real key.
        scale: ``\tau``, default ``1/sqrt(d)``.

    Returns:
        ``(output (B, h, n_q, d_v), weights (B, h, n_q, n_k))``; each weight row sums to less than 1.
    """
    check_qkv(q, k, v)
    if q.ndim != 4:
        raise ValueError(f"q, k, v must be (batch, heads, tokens, head_dim), got q {tuple(q.shape)}")
    sink_logit = check_tensor(sink_logit, "sink_logit", "(heads,)", 1)
    if sink_logit.shape[0] != q.shape[1]:
        raise ValueError(f"sink_logit must have one entry per head: ({q.shape[1]},), got {tuple(sink_logit.shape)}")
    n_q, n_k = q.shape[-2], k.shape[-2]
    tau = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * tau  # (B, h, n_q, n_k)
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be boolean (True = may attend), got {attn_mask.dtype}")
        allowed = allowed & attn_mask
    if key_mask is not None:
        check_key_mask(key_mask, q.shape[0], n_k)
        allowed = allowed & key_mask[:, None, None, :]
    s = s.masked_fill(~allowed, -math.inf)
    b = sink_logit.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)  # the virtual key's score
    a = torch.cat([s, b], -1).softmax(-1)[..., :-1]  # drop the virtual key: its value is zero
    return a @ v, a
