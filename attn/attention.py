r"""One attention interface: a kernel registry, one :class:`Attention` module, and the sequence-mixer protocol.

Every multi-head mechanism of the book is the same module around a different
*kernel*: the projections, the head split and merge, the positions, the KV
cache, the dropout and the input checks are written once, here; a mechanism
that changes only how the attention weights are formed (local windows, strided
or top-k sparsity, entmax, FlashAttention's tiling, linear attention, BigBird,
...) registers a kernel and reuses :class:`Attention`.

.. math::

    \operatorname{Attention}(X_q, X_{kv}) = \operatorname{Concat}_i\big(
        \kappa(X_q W_i^Q,\; X_{kv} W_{g(i)}^K,\; X_{kv} W_{g(i)}^V)\big)\, W^O

with ``kappa`` the kernel (scaled dot-product attention by default) and
``g(i)`` the key/value head that query head ``i`` reads (``g(i) = i`` for
multi-head attention, ``i // (h / h_kv)`` for grouped-query attention).

**Kernels** have one signature (:class:`Kernel`)::

    kernel(q, k, v, *, attn_mask, key_mask, is_causal, scale, dropout_p, need_weights, **options)
        -> AttentionOutput

with ``q`` ``(B, h, L, d)``, ``k`` ``(B, h, S, d)``, ``v`` ``(B, h, S, d_v)``
(``h_kv`` heads instead of ``h`` when the kernel is registered
``grouped=True``), the masks passed *unmaterialised* -- ``attn_mask``
broadcastable to ``(B, h, L, S)`` or ``None``, ``key_mask`` ``(B, S)`` with
``True`` = real token, ``is_causal`` a flag -- so a blockwise kernel never
builds an ``L x S`` mask. The output is ``(B, h, L, d_v)``; the weights, when
asked for, ``(B, h, L, S)``.

**Sequence mixers** that are not one kernel around projections (multi-head
latent attention, differential attention, Transformer-XL, FNet, ...) follow
the :class:`SequenceMixer` protocol: ``forward(x, *, key_mask=None,
is_causal=None, need_weights=False) -> AttentionOutput`` with weights
``(B, h, L, S)`` or ``None``. :class:`Attention` follows it too.

The shape of the interface follows Hugging Face ``transformers``' attention
functions and x-transformers' single ``Attention``; the equations are those of
Vaswani et al., "Attention Is All You Need", NeurIPS 2017, and (grouped keys)
Ainslie et al., "GQA", EMNLP 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Protocol, runtime_checkable

import torch
from einops import rearrange
from torch import Tensor, nn

from .checks import check_heads, check_int, check_positive_float, check_same_dtype, check_tokens
from .core import MIN_TEMPERATURE, AttentionOutput, scaled_dot_product_attention

__all__ = [
    "Kernel", "KernelSpec", "KERNELS", "register_kernel", "get_kernel", "kernels",
    "KVStore", "SequenceMixer", "AttentionBase", "Attention", "Position",
]


class Kernel(Protocol):
    """The signature every attention kernel has (see the module docstring)."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attn_mask: Tensor | None,
        key_mask: Tensor | None,
        is_causal: bool,
        scale: float,
        dropout_p: float,
        need_weights: bool,
        **options: Any,
    ) -> AttentionOutput: ...


@dataclass(frozen=True)
class KernelSpec:
    """A registered kernel.

    Attributes:
        name: registry key (``Attention(..., kernel=name)``).
        fn: the kernel.
        summary: one line on how it forms the weights.
        grouped: it reads ``h_kv <= h`` key/value heads itself (no copy of the keys per query head);
            otherwise :class:`Attention` repeats each key/value head ``h / h_kv`` times first.
        attn_mask: it accepts a general ``attn_mask`` (a pattern kernel may accept only ``key_mask`` and
            ``is_causal``: it raises a ``ValueError`` on an ``attn_mask``).
        dense: it forms the ``L x S`` score matrix (the reference kernels); ``False`` for the
            blockwise, gathered and linear-time ones.
    """

    name: str
    fn: Kernel
    summary: str = ""
    grouped: bool = False
    attn_mask: bool = True
    dense: bool = True


KERNELS: dict[str, KernelSpec] = {}


def register_kernel(
    name: str, *, summary: str = "", grouped: bool = False, attn_mask: bool = True, dense: bool = True
) -> Callable[[Callable[..., AttentionOutput]], Callable[..., AttentionOutput]]:
    """Function decorator: add a kernel to :data:`KERNELS` under ``name``."""

    def deco(fn: Callable[..., AttentionOutput]) -> Callable[..., AttentionOutput]:
        if name in KERNELS and KERNELS[name].fn is not fn:
            raise ValueError(f"kernel {name!r} is already registered by {getattr(KERNELS[name].fn, '__qualname__', '?')}")
        doc = next(iter((fn.__doc__ or "").strip().splitlines()), "")
        KERNELS[name] = KernelSpec(name, fn, summary or doc, grouped, attn_mask, dense)
        return fn

    return deco


def get_kernel(name: str) -> KernelSpec:
    """The registered kernel ``name`` (every mechanism module is imported first); a ``KeyError`` lists them."""
    if name not in KERNELS:
        from .registry import load_all

        load_all()
    try:
        return KERNELS[name]
    except KeyError:
        raise KeyError(f"unknown attention kernel {name!r}; registered: {', '.join(sorted(KERNELS))}") from None


def kernels() -> list[KernelSpec]:
    """Every registered kernel, by name."""
    from .registry import load_all

    load_all()
    return [KERNELS[n] for n in sorted(KERNELS)]


@register_kernel("sdpa", summary="softmax(q k^T * scale + mask) v: the reference, fused SDPA when no weights are asked")
def sdpa_kernel(
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
    """Scaled dot-product attention, :func:`attn.core.scaled_dot_product_attention` as a kernel."""
    return scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal,
        dropout_p=dropout_p, scale=scale, need_weights=need_weights,
    )


class KVStore(Protocol):
    """What :class:`Attention` needs of a key/value cache (:class:`attn.gqa.KVCache` is one).

    ``length`` tokens are stored; ``append(k, v)`` stores ``(B, h_kv, t, d)`` more and returns every
    stored key and value, ``(B, h_kv, length, d)``.
    """

    length: int

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class SequenceMixer(Protocol):
    """A token-mixing layer: ``(B, n, E) -> (B, n, E)``, with the book's common keywords.

    ``forward(x, *, key_mask=None, is_causal=None, need_weights=False)``:
    ``key_mask`` ``(B, n)`` ``True`` = real token (padded keys never reach a real
    output); ``is_causal`` ``None`` keeps the layer's own setting; the weights are
    ``(B, h, n, n)`` (``h = 1`` for a single-head layer) or ``None``.
    """

    def __call__(
        self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None, need_weights: bool = False
    ) -> AttentionOutput: ...


Position = Literal["rope", "alibi"]


def causal_offset_mask(n_queries: int, n_keys: int, device: torch.device | str | None = None) -> Tensor:
    """``(L, S)`` boolean, bottom-right aligned: query ``i`` is token ``S - L + i`` and sees keys ``<= S - L + i``.

    With a cache of ``S - L`` earlier tokens this is the causal mask of the new queries.
    """
    rows = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)
    return torch.arange(n_keys, device=device)[None, :] <= rows


class AttentionBase(nn.Module):
    """Projections, heads, positions, cache and the kernel call, without a ``forward``.

    :class:`Attention` adds the general ``forward(query, key=None, value=None, *, ...)``; a
    self-attention-only mechanism (strided sparsity, BERT's patterns, Primer, ...) subclasses this base
    and writes ``forward(x, *, key_mask=None, is_causal=None, need_weights=False, ...)`` around
    :meth:`mix`, so that no subclass narrows a parent's ``forward``.

    Args:
        embed_dim: model width ``E`` (queries and output).
        num_heads: query heads ``h``.
        kernel: name of a registered kernel (:func:`get_kernel`), ``"sdpa"`` by default.
        num_kv_heads: key/value heads ``h_kv`` (grouped-query attention; must divide ``h``); default ``h``.
        head_dim: width ``d`` of a head; default ``E / h`` (``h`` must then divide ``E``).
        kdim, vdim: widths of the ``key`` and ``value`` inputs; default ``E``.
        dropout: dropout on the attention weights while training, in ``[0, 1)``.
        bias: biases on the four projections.
        causal: the layer's default for ``is_causal`` (query ``i`` sees keys ``<= i``).
        position: ``None``, ``"rope"`` (rotary, applied to queries and keys) or ``"alibi"`` (linear biases:
            the ``"alibi"`` kernel of :mod:`attn.positions`, chosen for you).
        rope_base: the rotary frequency base.
        **kernel_options: passed to the kernel on every call (a window, ``k`` of top-k, entmax's ``alpha``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kernel: str = "sdpa",
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
        position: Position | None = None,
        rope_base: float = 10000.0,
        **kernel_options: Any,
    ) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        if head_dim is None:
            check_heads(embed_dim, num_heads)
            head_dim = embed_dim // num_heads
        check_int("head_dim", head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        for name, width in (("kdim", kdim), ("vdim", vdim)):
            if width is not None:
                check_int(name, width)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if position not in (None, "rope", "alibi"):
            raise ValueError(f"position must be None, 'rope' or 'alibi', got {position!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if not isinstance(kernel, str):
            _bad_kernel(kernel)
        if position == "alibi":
            # ALiBi is a bias on the scores: the "alibi" kernel (attn.positions) builds it a block of queries at a
            # time, never (L, S); another kernel would have to take it as a dense attn_mask
            if kernel not in ("sdpa", "alibi"):
                raise ValueError(f"position='alibi' runs the 'alibi' kernel; it cannot be combined with kernel={kernel!r}")
            kernel = "alibi"
        self.kernel_spec = get_kernel(kernel)
        self.kernel_options = dict(kernel_options)
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.causal, self.position = float(dropout), causal, position
        inner, kv_inner = num_heads * head_dim, num_kv_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)  # W^Q of every head, stacked
        self.k_proj = nn.Linear(self.kdim, kv_inner, bias=bias)
        self.v_proj = nn.Linear(self.vdim, kv_inner, bias=bias)
        # W^O; a subclass may drop it (BERT's output_projection=False puts nn.Identity here)
        self.out_proj: nn.Linear | nn.Identity = nn.Linear(inner, embed_dim, bias=bias)
        self.rotary: nn.Module | None = None
        if position == "rope":
            from .positions import RotaryEmbedding  # positions' one RoPE (loaded here: positions imports this module)

            self.rotary = RotaryEmbedding(head_dim, rope_base)

    @property
    def kernel(self) -> str:
        """The name of the kernel this layer runs."""
        return self.kernel_spec.name

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        opts = "".join(f", {k}={v!r}" for k, v in self.kernel_options.items())
        pos = f", position={self.position!r}" if self.position else ""
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{kv}, head_dim={self.head_dim}, "
                f"kernel={self.kernel!r}{opts}, causal={self.causal}{pos}, dropout={self.dropout}")

    def split_heads(self, x: Tensor, heads: int | None = None) -> Tensor:
        """``(B, n, h * d) -> (B, h, n, d)``."""
        return rearrange(x, "b n (h d) -> b h n d", h=heads or self.num_heads)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        """``(B, h, n, d) -> (B, n, h * d)``, the concatenation of the heads."""
        return rearrange(x, "b h n d -> b n (h d)")

    def check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        """Shapes, dtypes and non-empty sequences, with errors that name the expected shape."""
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            check_tokens(t, width, name, allow_empty_seq=True)
        check_same_dtype(("query", query), ("key", key), ("value", value))
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must share (batch, seq): {tuple(key.shape[:2])} vs {tuple(value.shape[:2])}")
        if query.shape[0] != key.shape[0]:
            raise ValueError(f"query and key batch sizes differ: {query.shape[0]} vs {key.shape[0]}")
        if query.shape[0] and (query.shape[1] == 0 or key.shape[1] == 0):
            raise ValueError(
                f"empty sequence: query and key need shape (batch, seq, embed_dim) with seq >= 1, "
                f"got query length {query.shape[1]}, key length {key.shape[1]}"
            )

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
        """Run the kernel on split heads: ``q`` ``(B, h, L, d)``, ``k, v`` ``(B, h_kv, S, d)``.

        A mechanism whose kernel keeps learned state (an adaptive span, a random block layout, random
        features) overrides this one method and passes its state to its kernel.
        """
        return self.kernel_spec.fn(
            q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal,
            scale=scale, dropout_p=dropout_p, need_weights=need_weights, **self.kernel_options,
        )

    def mix(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        cache: KVStore | None = None,
        average_weights: bool = False,
        temperature: float = 1.0,
    ) -> AttentionOutput:
        """Project, split heads, place positions, read/extend the cache, run the kernel, merge, project out."""
        self.check_inputs(query, key, value)
        temperature = check_positive_float("temperature", temperature, minimum=MIN_TEMPERATURE)
        causal = self.causal if is_causal is None else is_causal
        if not isinstance(causal, bool):
            raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
        if attn_mask is not None and isinstance(attn_mask, Tensor) and attn_mask.ndim == 3:
            attn_mask = attn_mask[:, None]  # (B, L, S) -> (B, 1, L, S), shared by the heads
        q = self.split_heads(self.q_proj(query))  # (B, h, L, d)
        k = self.split_heads(self.k_proj(key), self.num_kv_heads)  # (B, h_kv, S, d)
        v = self.split_heads(self.v_proj(value), self.num_kv_heads)
        past = 0 if cache is None else cache.length
        if self.rotary is not None:
            q = self.rotary(q, torch.arange(past, past + q.shape[-2], device=q.device))
            k = self.rotary(k, torch.arange(past, past + k.shape[-2], device=k.device))
        if cache is not None:
            k, v = cache.append(k, v)
            if key_mask is not None and key_mask.shape[-1] != k.shape[-2]:
                raise ValueError(f"with a cache, key_mask must cover every cached and new key: (B, {k.shape[-2]}), "
                                 f"got {tuple(key_mask.shape)}")
        if past and causal:
            # the new queries are the last L of S tokens: bottom-right aligned, an (L, S) mask (L is small when decoding)
            offset = causal_offset_mask(q.shape[-2], k.shape[-2], q.device)
            attn_mask = offset if attn_mask is None else attn_mask & offset
            causal = False
        if not self.kernel_spec.grouped and self.num_kv_heads != self.num_heads:
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out, weights = self.attend(
            q, k, v,
            attn_mask=attn_mask,
            key_mask=key_mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / (temperature * math.sqrt(self.head_dim)),
            need_weights=need_weights,
        )
        out = self.out_proj(self.merge_heads(out))  # (B, L, E)
        if weights is not None and average_weights:
            weights = weights.mean(1)
        return AttentionOutput(out, weights)

    def new_cache(self, batch: int, max_len: int) -> KVStore:
        """An empty :class:`attn.gqa.KVCache` for this layer (its dtype, device and key/value heads)."""
        from .gqa import KVCache

        w = self.k_proj.weight
        return KVCache(batch, self.num_kv_heads, self.head_dim, max_len, device=w.device, dtype=w.dtype)


def _bad_kernel(kernel: object) -> NoReturn:
    raise TypeError(f"kernel must be the name of a registered kernel (a str), got {type(kernel).__name__}")


class Attention(AttentionBase):
    """Multi-head attention around any registered kernel: the one attention module of the package.

    ``Attention(E, h)`` is multi-head attention (Vaswani et al. 2017); ``kernel="local", window=8`` a
    sliding window; ``num_kv_heads=2`` grouped-query attention; ``position="rope"`` rotary positions;
    ``causal=True`` a decoder layer. See :class:`AttentionBase` for the arguments.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        cache: KVStore | None = None,
        average_weights: bool = False,
        temperature: float = 1.0,
    ) -> AttentionOutput:
        """Attend ``query`` to ``key``/``value`` (self-attention when they are omitted).

        Args:
            query: ``(B, L, E)``.
            key: ``(B, S, kdim)``; defaults to ``query``.
            value: ``(B, S, vdim)``; defaults to ``key``.
            key_mask: ``(B, S)`` boolean, ``True`` = real token (with a cache: every cached and new key).
            attn_mask: ``(L, S)``, ``(B, L, S)`` or ``(B, h, L, S)``; boolean ``True`` = may attend, or additive.
            is_causal: query ``i`` sees keys ``<= i``; ``None`` keeps the layer's ``causal``.
            need_weights: return the weights ``(B, h, L, S)``; otherwise the fastest path of the kernel runs.
            cache: a :class:`KVStore` (``layer.new_cache(batch, max_len)``): the new keys and values are
                appended and the queries attend to everything stored; positions continue after it.
            average_weights: average the returned weights over heads, ``(B, L, S)``.
            temperature: divides the scores; at least :data:`~attn.core.MIN_TEMPERATURE` (1e-30).

        Returns:
            ``(output (B, L, E), weights (B, h, L, S) | (B, L, S) | None)``.
        """
        key = query if key is None else key
        value = key if value is None else value
        return self.mix(
            query, key, value, key_mask=key_mask, attn_mask=attn_mask, is_causal=is_causal,
            need_weights=need_weights, cache=cache, average_weights=average_weights, temperature=temperature,
        )
