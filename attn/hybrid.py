r"""Chapter 10 -- hybrid attention: BigBird's window + global + random blocks, computed blockwise.

**BigBird** (Zaheer et al. 2020, "Big Bird: Transformers for Longer
Sequences", section 2 and appendix D). The sequence of ``n`` tokens is cut
into ``n_b = n / b`` blocks of ``b`` tokens. Query block ``i`` attends to the
key blocks

.. math::

    \mathcal{K}(i) = \underbrace{\{i - w, \dots, i + w\}}_{\text{sliding window}}
        \;\cup\; \underbrace{\mathcal{G}}_{\text{global blocks}}
        \;\cup\; \underbrace{\mathcal{R}_h(i)}_{r \text{ random blocks}}

and a query in a **global** block attends to every key (and every query
attends to it: ``G`` is in every ``K(i)``). The ``r`` random blocks are drawn
per head ``h`` and per query block, uniformly among the blocks that are
neither in the window nor global, from a seeded generator (the pattern is a
fixed part of the layer, like its weights). Within the chosen blocks attention
is ordinary scaled dot-product attention:

.. math::

    y_t = \sum_{j \in \mathcal{K}(\lfloor t/b \rfloor)\text{'s tokens}}
          \operatorname{softmax}_j\Big(\frac{q_t^\top k_j}{\sqrt d}\Big) v_j .

It is computed **by gathering key blocks**: an index tensor ``(h, n_b, K)``
with ``K = 2w + 1 + g + r`` slots names the key blocks of every query block
(window blocks that are global or outside the sequence are switched off, so
no key is counted twice); keys and values are gathered into
``(B, h, n_b, K b, d)`` and each query block scores ``b x K b`` keys. The
``g b`` global queries attend densely to all ``n`` keys. Time and memory
``O(n K b d + g b n d)`` per head, linear in ``n`` for fixed ``b, w, g, r``;
no ``n x n`` tensor is built unless the weights are asked for.

:func:`bigbird_mask` gives the same pattern as a dense ``(h, n, n)`` boolean
mask: the labelled baseline the blockwise code is checked against.

**Longformer** (Beltagy et al. 2020) is the other hybrid: a per-token sliding
window plus a few global tokens. It is already in the package, built from the
blockwise window of chapter 8 (:mod:`attn.local`) and the global tokens of
chapter 5: :class:`attn.global_attention.GlobalTokenAttention` (registered as
``global-tokens``). This chapter uses it as is.

Shapes: ``q, k, v`` ``(batch, heads, n, d)`` (or ``(batch, n, d)``, one head);
``key_mask`` ``(batch, n)``, ``True`` = real token; weights, when asked for,
``(batch, heads, n, n)``. Boolean masks: ``True`` = may attend (:mod:`attn.masks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .attention import AttentionBase, register_kernel
from .checks import check_heads, check_int, check_positive_float, check_same_dtype, check_tokens
from .core import AttentionOutput, check_qkv, scaled_dot_product_attention
from .masks import check_key_mask
from .registry import register

__all__ = ["BlockLayout", "bigbird_layout", "bigbird_mask", "bigbird_attention", "bigbird_kernel", "BigBirdAttention"]


def _global_blocks(n_blocks: int, global_blocks: Sequence[int]) -> Tensor:
    """Sorted unique block indices in ``[0, n_blocks)``; negative ones count from the end."""
    idx = [int(g) for g in global_blocks]
    bad = [g for g in idx if g < -n_blocks or g >= n_blocks]
    if bad:
        raise ValueError(f"global_blocks must lie in [-{n_blocks}, {n_blocks}) for {n_blocks} blocks, got {list(global_blocks)}")
    return torch.tensor(sorted({g % n_blocks for g in idx}), dtype=torch.long)


@dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each query block reads.

    Attributes:
        index: ``(heads, n_blocks, K)`` key-block index per slot (clamped into range).
        valid: ``(heads, n_blocks, K)`` boolean, ``False`` for slots that are switched off
            (window blocks outside the sequence or already global, random slots with no candidate).
        global_blocks: ``(g,)`` sorted global block indices.
        window, num_random: the window half-width (in blocks) and random blocks per query block.
    """

    index: Tensor
    valid: Tensor
    global_blocks: Tensor
    window: int
    num_random: int

    @property
    def n_blocks(self) -> int:
        return self.index.shape[1]

    @property
    def heads(self) -> int:
        return self.index.shape[0]

    def to(self, device: torch.device | str) -> BlockLayout:
        return BlockLayout(self.index.to(device), self.valid.to(device), self.global_blocks.to(device), self.window, self.num_random)

    def block_mask(self) -> Tensor:
        """Dense ``(heads, n_blocks, n_blocks)`` block pattern, ``True`` = query block reads key block."""
        h, nb, _ = self.index.shape
        # count the switched-on slots per (query block, key block): a switched-off slot may alias a real block
        m = torch.zeros(h, nb, nb, dtype=torch.long, device=self.index.device)
        m.scatter_add_(-1, self.index, self.valid.long())
        m = m > 0
        g = self.global_blocks
        m[:, g, :] = True  # global query blocks read everything
        return m


def _random_blocks(excluded: Tensor, n_blocks: int, num_random: int, heads: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``num_random`` distinct blocks per (head, query block), uniform among the blocks not ``excluded``.

    ``excluded`` is ``(n_blocks, E)``: sorted block indices to skip per query block,
    padded with ``n_blocks`` (a sentinel past the end). Floyd's algorithm draws
    distinct ranks among the ``c`` candidates without listing them (no ``n_b x n_b``
    table): for ``j = c - r .. c - 1`` draw ``t`` in ``[0, j]`` and take ``j`` if
    ``t`` was taken already. Rank ``t`` is then mapped to a block index by stepping
    over the excluded blocks in order. Returns ``(blocks, valid)``, each ``(heads, n_blocks, r)``.
    """
    nb, r = n_blocks, num_random
    count = (nb - (excluded < nb).sum(-1)).expand(heads, nb)  # candidates per query block, (h, nb)
    u = torch.rand(heads, nb, r, generator=generator, dtype=torch.float64)
    ranks = torch.zeros(heads, nb, r, dtype=torch.long)
    for s in range(r):
        j = count - r + s  # (h, nb); may be negative when c < r (handled below)
        t = torch.floor(u[..., s] * (j + 1).clamp(min=1)).long()
        taken = (ranks[..., :s] == t[..., None]).any(-1)
        ranks[..., s] = torch.where(taken, j, t)
    few = count < r  # fewer candidates than slots: take all of them
    ranks = torch.where(few[..., None], torch.arange(r).expand(heads, nb, r), ranks)
    valid = torch.arange(r)[None, None, :] < count[..., None]
    blocks = ranks.clone()
    for e in range(excluded.shape[-1]):  # rank -> block: skip each excluded block at or below the running index
        blocks = blocks + (excluded[None, :, e, None] <= blocks).long()
    return blocks.sort(-1).values.clamp(max=nb - 1), valid


def bigbird_layout(
    n_blocks: int,
    window: int = 1,
    global_blocks: Sequence[int] = (0,),
    num_random: int = 1,
    heads: int = 1,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """The BigBird block pattern for ``n_blocks`` blocks: window, global and ``num_random`` random blocks.

    Slots per query block ``i``: ``2 window + 1`` window blocks ``i - window .. i + window``
    (switched off outside ``[0, n_blocks)`` or when global), then the ``g`` global
    blocks, then ``num_random`` random blocks drawn per head from the others
    (seeded by ``seed``). Global query blocks are listed too but attend densely.
    """
    check_int("n_blocks", n_blocks, 1)
    check_int("window", window, 0)
    check_int("num_random", num_random, 0)
    check_int("heads", heads, 1)
    check_int("seed", seed, -(2**63))
    g = _global_blocks(n_blocks, global_blocks)
    is_global = torch.zeros(n_blocks, dtype=torch.bool)
    is_global[g] = True
    i = torch.arange(n_blocks)
    win = i[:, None] + torch.arange(-window, window + 1)[None, :]  # (nb, 2w+1)
    inside = (win >= 0) & (win < n_blocks)
    win_c = win.clamp(0, n_blocks - 1)
    win_ok = inside & ~is_global[win_c]
    glob = g[None, :].expand(n_blocks, -1)  # (nb, g)
    parts_idx, parts_ok = [win_c, glob], [win_ok, torch.ones_like(glob, dtype=torch.bool)]
    idx = torch.cat(parts_idx, -1)[None].expand(heads, -1, -1)
    ok = torch.cat(parts_ok, -1)[None].expand(heads, -1, -1)
    if num_random:
        sentinel = torch.full_like(win, n_blocks)
        excluded = torch.cat([torch.where(win_ok, win, sentinel), glob], -1).sort(-1).values  # (nb, E), no duplicates
        gen = torch.Generator().manual_seed(seed)
        rnd, rnd_ok = _random_blocks(excluded, n_blocks, num_random, heads, gen)
        idx = torch.cat([idx, rnd], -1)
        ok = torch.cat([ok, rnd_ok], -1)
    layout = BlockLayout(idx.contiguous(), ok.contiguous(), g, window, num_random)
    return layout.to(device) if device is not None else layout


def bigbird_mask(n: int, block_size: int, layout: BlockLayout) -> Tensor:
    """The labelled baseline: the layout as a dense ``(heads, n, n)`` token mask (``True`` = may attend).

    Built from :meth:`BlockLayout.block_mask` by repeating each block entry
    ``block_size`` times along both axes; the efficient code never builds it.
    """
    check_int("block_size", block_size, 1)
    nb = -(-n // block_size)
    if layout.n_blocks != nb:
        raise ValueError(f"layout has {layout.n_blocks} blocks, but n={n} with block_size={block_size} needs {nb}")
    m = layout.block_mask()
    m = m.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    return m[:, :n, :n]


def bigbird_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    layout: BlockLayout,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    *,
    blockwise: bool | None = None,
) -> AttentionOutput:
    """BigBird block-sparse attention, by gathering key blocks: ``O(n K b d)``, no ``n x n`` tensor.

    Equal to :func:`attn.core.scaled_dot_product_attention` with
    ``attn_mask=bigbird_mask(n, block_size, layout)``.

    Never dearer than dense attention: a block of ``n`` or more tokens is
    clamped to ``n`` (one block either way: the same layout and output), and
    when the gathered blocks would score at least the ``n^2`` pairs of dense
    attention (``n_b b K b + g b n >= n^2``: short sequences, large blocks),
    the layout's ``(n, n)`` mask is applied to the dense scores instead.

    Args:
        q, k, v: ``(batch, heads, n, d)`` or ``(batch, n, d)``; self-attention (same ``n``).
        block_size: ``b``, tokens per block; ``n`` is padded up to a multiple of it.
        layout: from :func:`bigbird_layout` with ``ceil(n / b)`` blocks and 1 or ``heads`` heads.
        key_mask: ``(batch, n)`` boolean, ``True`` = real token.
        scale: default ``1 / sqrt(d)``.
        dropout_p: dropout on the weights (0 in eval).
        need_weights: also return the dense ``(batch, heads, n, n)`` weights (small ``n`` only).
        blockwise: ``None`` (default) takes the cheaper of the gathered blocks and
            the dense masked scores (same output); ``True``/``False`` forces one.

    Returns:
        :class:`~attn.core.AttentionOutput`; queries with no visible key get zeros;
        an empty batch gives an empty output.
    """
    check_qkv(q, k, v)
    check_same_dtype(("q", q), ("k", k), ("v", v))
    if blockwise is not None and not isinstance(blockwise, bool):
        raise TypeError(f"blockwise must be None, True or False, got {blockwise!r}")
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"bigbird attention needs as many queries as keys (self-attention), got {q.shape[-2]} and {k.shape[-2]}")
    check_int("block_size", block_size, 1)
    squeeze = q.ndim == 3
    if squeeze:  # (B, n, d) -> (B, 1, n, d)
        q, k, v = q[:, None], k[:, None], v[:, None]
    batch, heads, n, d = q.shape
    check_key_mask(key_mask, batch, n, length_name="n")
    b = block_size
    nb = -(-n // b)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout (from bigbird_layout), got {type(layout).__name__}")
    if layout.n_blocks != nb or layout.heads not in (1, heads):
        raise ValueError(
            f"layout is for {layout.n_blocks} blocks and {layout.heads} head(s); n={n}, block_size={b} "
            f"and {heads} heads need {nb} blocks and 1 or {heads} heads"
        )
    if batch == 0:  # empty batch: empty output (and weights)
        out, w0 = v.new_zeros(0, heads, n, v.shape[-1]), q.new_zeros(0, heads, n, n) if need_weights else None
        return AttentionOutput(out[:, 0], w0[:, 0] if w0 is not None else None) if squeeze else AttentionOutput(out, w0)
    layout = layout.to(q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    b = min(b, n)  # one block either way (nb = 1): a larger block only pads
    n_pad = nb * b
    kslots = layout.index.shape[-1]  # K = 2w + 1 + g + r
    g_tok = (layout.global_blocks[:, None] * b + torch.arange(b, device=q.device)).flatten()
    g_tok = g_tok[g_tok < n]  # the tokens of the global blocks
    if blockwise is None:  # scores per (batch, head): gathered blocks + global rows, against dense attention's n^2
        blockwise = nb * b * kslots * b + g_tok.numel() * n < n * n
    if not blockwise:
        out, weights = scaled_dot_product_attention(
            q, k, v, attn_mask=bigbird_mask(n, b, layout), key_mask=key_mask, scale=scale, dropout_p=dropout_p,
            need_weights=need_weights)  # mask (1 or h, n, n), no larger than the gathered blocks here
        if squeeze:
            return AttentionOutput(out[:, 0], weights[:, 0] if weights is not None else None)
        return AttentionOutput(out, weights)

    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    real_p = F.pad(real, (0, n_pad - n), value=False).view(batch, nb, b)  # (B, nb, b)
    pad = lambda t: F.pad(t, (0, 0, 0, n_pad - n))  # noqa: E731
    qb = pad(q).view(batch, heads, nb, b, d)  # query blocks
    kblk, vblk = pad(k).view(batch, heads, nb, b, d), pad(v).view(batch, heads, nb, b, -1)

    # gather the K key blocks of every query block: (B, h, nb, K, b, d) -> (B, h, nb, K b, d)
    idx = layout.index.expand(heads, nb, kslots)
    hsel = torch.arange(heads, device=q.device)[:, None, None]
    kg = rearrange(kblk[:, hsel, idx], "B h nb K b d -> B (h nb) (K b) d")
    vg = rearrange(vblk[:, hsel, idx], "B h nb K b d -> B (h nb) (K b) d")
    # which gathered keys count: the slot is on, and the key is real (not padding)
    ok = layout.valid.expand(heads, nb, kslots)[None, :, :, :, None] & real_p[:, idx]  # (B, h, nb, K, b)
    mask = rearrange(ok, "B h nb K b -> B (h nb) 1 (K b)")
    out, p = scaled_dot_product_attention(
        rearrange(qb, "B h nb b d -> B (h nb) b d"), kg, vg, attn_mask=mask,
        scale=scale, dropout_p=dropout_p, need_weights=need_weights,
    )  # (B, h nb, b, d_v); p (B, h nb, b, K b)
    out = rearrange(out, "B (h nb) b d -> B h (nb b) d", h=heads)[:, :, :n]

    # global query blocks: their queries attend densely to all n keys (g b x n scores)
    p_grow = None
    if g_tok.numel():
        out_g, p_grow = scaled_dot_product_attention(
            q[:, :, g_tok], k, v, key_mask=key_mask, scale=scale, dropout_p=dropout_p, need_weights=need_weights)
        out = out.index_copy(2, g_tok, out_g)

    weights = None
    if need_weights:  # scatter the block weights into a dense (B, h, n, n) matrix, for drawing
        assert p is not None  # asked for with need_weights
        cols = idx[..., None] * b + torch.arange(b, device=q.device)  # (h, nb, K, b): key position of each slot
        cols = rearrange(cols, "h nb K b -> h nb (K b)")[None, :, :, None, :].expand(batch, heads, nb, b, kslots * b)
        pw = rearrange(p, "B (h nb) r c -> B h nb r c", h=heads)
        dense = pw.new_zeros(batch, heads, nb, b, n_pad).scatter_add(-1, cols, pw)
        weights = rearrange(dense, "B h nb r j -> B h (nb r) j")[:, :, :n, :n]
        if p_grow is not None:
            weights = weights.index_copy(2, g_tok, p_grow)
    if squeeze:
        out = out[:, 0]
        weights = weights[:, 0] if weights is not None else None
    return AttentionOutput(out, weights)


@register_kernel("bigbird", attn_mask=False, dense=False,
                 summary="BigBird blocks: window + global + random key blocks, gathered, O(n K b d)")
def bigbird_kernel(
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
    block_size: int = 16,
    window: int = 1,
    global_blocks: Sequence[int] = (0,),
    num_random: int = 1,
    seed: int = 0,
    layout: BlockLayout | None = None,
    blockwise: bool | None = None,
) -> AttentionOutput:
    """:func:`bigbird_attention` as a kernel: the ``layout`` given, or :func:`bigbird_layout` of the options.

    BigBird's global blocks read every key, so the kernel cannot be causal; a general ``attn_mask`` is
    refused (the layout is the pattern).
    """
    if attn_mask is not None:
        raise ValueError("the bigbird kernel takes no attn_mask (its block layout is the pattern); pass key_mask")
    if is_causal:
        raise ValueError("BigBird attention cannot be causal: its global and random blocks read later positions")
    if layout is None:
        check_int("block_size", block_size, 1)
        nb = -(-q.shape[-2] // block_size)
        globals_ = tuple(g for g in global_blocks if -nb <= g < nb)
        layout = bigbird_layout(nb, window, globals_, num_random, q.shape[1] if q.ndim == 4 else 1, seed)
    return bigbird_attention(q, k, v, block_size, layout, key_mask=key_mask, scale=scale, dropout_p=dropout_p,
                             need_weights=need_weights, blockwise=blockwise)


@register(
    "bigbird",
    paper="Zaheer et al. 2020",
    complexity="O(n (2w+1+g+r) b d)",
    chapter=10,
    summary="BigBird block-sparse attention: window + global + random key blocks, gathered blockwise",
    build=lambda embed_dim, num_heads: BigBirdAttention(embed_dim, num_heads, block_size=2, window=1, global_blocks=(0,), num_random=1),
    kernel="bigbird",
    causal=False,
)
class BigBirdAttention(AttentionBase):
    """Multi-head BigBird self-attention (ITC: the global blocks are blocks of the sequence).

    :class:`~attn.attention.AttentionBase` (projections ``q_proj, k_proj, v_proj, out_proj`` and heads
    as in :class:`~attn.multihead.MultiHeadAttention`: the state dicts are interchangeable) with the
    ``"bigbird"`` kernel; each head runs :func:`bigbird_attention` with its own random blocks. The
    layout is the layer's state: it depends only on the number of blocks and ``seed``, is built once
    per length and cached, and :meth:`attend` passes it to the kernel.

    Shapes: ``x`` ``(B, n, E)`` -> output ``(B, n, E)``; weights, when asked
    for, ``(B, h, n, n)``.

    Args:
        embed_dim: model width ``E``; num_heads: heads ``h`` (must divide ``E``).
        block_size: ``b`` tokens per block. The registry's ``build`` uses ``b = 2``,
            one window block each side, the first block global and one random
            block (sized for the comparison's short recall sequences).
        window: ``w``, neighbouring blocks read on each side (BigBird: 1, three blocks in all).
        global_blocks: global block indices (negative = from the end); BigBird-ITC uses
            ``(0, -1)``, the first and last blocks; ``()`` for none.
        num_random: ``r`` random blocks per query block and head.
        seed: seeds the random blocks.
        dropout: dropout on the attention weights during training.
        bias: biases on the projections.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        block_size: int = 16,
        window: int = 1,
        global_blocks: Sequence[int] = (0,),
        num_random: int = 1,
        seed: int = 0,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        check_int("embed_dim", embed_dim, 1)
        check_int("num_heads", num_heads, 1)
        check_heads(embed_dim, num_heads)
        check_int("block_size", block_size, 1)
        check_int("window", window, 0)
        check_int("num_random", num_random, 0)
        check_int("seed", seed, -(2**63))
        check_positive_float("dropout", dropout, allow_zero=True)
        if dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if isinstance(global_blocks, (int, str)) or not all(isinstance(g, int) and not isinstance(g, bool) for g in global_blocks):
            raise TypeError(f"global_blocks must be a sequence of ints (block indices), got {global_blocks!r}")
        super().__init__(embed_dim, num_heads, kernel="bigbird", dropout=dropout, bias=bias)
        self.block_size, self.window, self.num_random, self.seed = block_size, window, num_random, seed
        self.global_blocks = tuple(global_blocks)
        self._layouts: dict[int, BlockLayout] = {}
        self._blockwise: bool | None = None  # this call's path (None: the cheaper), read by attend

    def layout(self, n: int) -> BlockLayout:
        """The block layout used for sequences of length ``n`` (cached per number of blocks)."""
        nb = -(-n // self.block_size)
        if nb not in self._layouts:
            globals_ = tuple(g for g in self.global_blocks if -nb <= g < nb)  # short inputs: drop globals past the end
            self._layouts[nb] = bigbird_layout(nb, self.window, globals_, self.num_random, self.num_heads, self.seed)
        return self._layouts[nb]

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        blockwise: bool | None = None,
    ) -> AttentionOutput:
        """``x (B, n, E)``, ``key_mask (B, n)`` (``True`` = real) -> ``(output (B, n, E), weights (B, h, n, n) | None)``.

        ``is_causal=True`` is refused (a ``ValueError``); ``blockwise`` forces the gathered blocks
        (``True``) or the dense masked scores (``False``, :meth:`reference`); ``None`` takes the cheaper.
        """
        x = check_tokens(x, self.embed_dim)
        check_key_mask(key_mask, x.shape[0], x.shape[1], length_name="n")
        if blockwise is not None and not isinstance(blockwise, bool):
            raise TypeError(f"blockwise must be None, True or False, got {blockwise!r}")
        self._blockwise = blockwise
        try:
            return self.mix(x, x, x, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights)
        finally:
            self._blockwise = None

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
        """The ``"bigbird"`` kernel with this layer's block layout for ``n`` tokens (its state)."""
        return bigbird_kernel(
            q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
            need_weights=need_weights, block_size=self.block_size, layout=self.layout(q.shape[-2]),
            blockwise=self._blockwise,
        )

    def reference(self, x: Tensor, *, key_mask: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        """The labelled baseline: the same layer as dense attention under the ``(h, n, n)`` :func:`bigbird_mask`."""
        return self(x, key_mask=key_mask, need_weights=need_weights, blockwise=False)
