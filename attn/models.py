"""The book's small models: one Transformer block and one token language model around any sequence mixer,
and the recall models of the shared synthetic task.

:class:`TransformerBlock` is the block chapter 3 teaches (Vaswani et al. 2017, with the pre-norm placement of
Xiong et al., "On Layer Normalization in the Transformer Architecture", ICML 2020, by default):
``h = x + Mix(LN(x))``, ``y = h + FFN(LN(h))``; ``norm_first=False`` gives the paper's post-norm
``h = LN(x + Mix(x))``, ``y = LN(h + FFN(h))``. :class:`TokenLM` stacks blocks over token and (optional) learned
position embeddings (learned, or the fixed sinusoids of Vaswani et al. 2017, section 3.5, with
``positions="sinusoidal"``); every chapter's language model or encoder is one of these with its mechanism as the
mixer. :func:`greedy_decode` continues a prompt one argmax token at a time through the blocks' key/value caches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_int, check_token_ids
from .core import AttentionOutput
from .multihead import MultiHeadAttention
from .positions import sinusoidal_embedding
from .tasks import AssociativeRecall

__all__ = ["TransformerBlock", "TokenLM", "LMOutput", "greedy_decode", "RecallTokens", "RecallModel", "recall_loss"]

PositionKind = Literal["learned", "sinusoidal", "none"]


class TransformerBlock(nn.Module):
    r"""One Transformer block around a sequence mixer: ``(B, n, E) -> (B, n, E)``.

    Two residual sublayers write into the residual stream ``x``: the mixer (attention: tokens exchange
    information) and the position-wise feed-forward layer (each token alone). Pre-norm (Xiong et al. 2020,
    the default) normalises what enters a sublayer and leaves the stream itself untouched::

        u = x + Mix(LN_1(x))                     (B, n, E)
        y = u + FFN(LN_2(u)),  FFN(z) = W_2 GELU(W_1 z + b_1) + b_2,  W_1: E -> ffn_mult * E

    Post-norm (``norm_first=False``, Vaswani et al. 2017) normalises the stream after each addition::

        u = LN_1(x + Mix(x)),   y = LN_2(u + FFN(u))

    ``LN(z) = gamma * (z - mean(z)) / sqrt(var(z) + eps) + beta`` over the ``E`` features of each token
    (Ba et al. 2016).

    Args:
        mixer: a :class:`~attn.attention.SequenceMixer` of width ``embed_dim`` (any registered ``build``).
        embed_dim: width ``E``.
        ffn_mult: the feed-forward width is ``ffn_mult * E`` (GELU); ``0`` drops the feed-forward sublayer.
        norm_first: pre-norm (default) or the original post-norm placement.
        dropout: on both residual branches while training.

    ``forward(x, *, key_mask=None, is_causal=None, need_weights=False, **mixer_kwargs)`` returns an
    :class:`~attn.core.AttentionOutput`: the block's output and the mixer's weights; extra keywords
    (a ``cache``) go to the mixer.
    """

    def __init__(self, mixer: nn.Module, embed_dim: int, ffn_mult: int = 4, norm_first: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        check_int("ffn_mult", ffn_mult, 0)
        self.mixer, self.norm_first = mixer, norm_first
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn: nn.Module | None = None
        self.norm2: nn.Module | None = None
        if ffn_mult:
            self.ffn = nn.Sequential(
                nn.Linear(embed_dim, ffn_mult * embed_dim), nn.GELU(), nn.Linear(ffn_mult * embed_dim, embed_dim)
            )
            self.norm2 = nn.LayerNorm(embed_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None,
                need_weights: bool = False, **mixer_kwargs: Any) -> AttentionOutput:
        kw = dict(key_mask=key_mask, is_causal=is_causal, need_weights=need_weights, **mixer_kwargs)
        if self.norm_first:  # pre-LN: the stream x is only ever added to
            out, weights = self.mixer(self.norm1(x), **kw)
            u = x + self.drop(out)
            if self.ffn is not None and self.norm2 is not None:
                u = u + self.drop(self.ffn(self.norm2(u)))
        else:  # post-LN: normalise after each residual addition
            out, weights = self.mixer(x, **kw)
            u = self.norm1(x + self.drop(out))
            if self.ffn is not None and self.norm2 is not None:
                u = self.norm2(u + self.drop(self.ffn(u)))
        return AttentionOutput(u, weights)


class LMOutput(NamedTuple):
    """``logits`` ``(B, n, vocab)`` and, when asked, each layer's weights ``[(B, h, n, n)]`` (else ``[]``)."""

    logits: Tensor
    weights: list[Tensor | None]


class TokenLM(nn.Module):
    """Token embedding (+ positions) -> ``num_layers`` :class:`TransformerBlock` -> LayerNorm -> logits.

    Args:
        vocab: vocabulary size.
        embed_dim: width ``E``.
        num_layers: blocks.
        mixer: ``mixer(layer_index) -> nn.Module``, the sequence mixer of each block (a causal one makes a
            language model, a bidirectional one an encoder).
        max_len: with ``positions="learned"``, learned absolute positions for up to ``max_len`` tokens,
            initialised ``N(0, position_std^2)``, and ``None`` for no positions (a mixer with RoPE or ALiBi
            places positions itself); otherwise the longest sequence allowed (``None``: any).
        positions: ``"learned"`` (default), ``"sinusoidal"``: the fixed
            ``PE(p)_{2i} = sin(p / 10000^{2i/E})``, ``PE(p)_{2i+1} = cos(p / 10000^{2i/E})`` of Vaswani et al.
            2017 (:func:`attn.positions.sinusoidal_embedding`) added to the token embeddings, or ``"none"``
            (no position signal in the embeddings).
        ffn_mult, norm_first: as :class:`TransformerBlock`.
        tie: share the output matrix with the token embedding.

    ``forward(tokens (B, n) long, *, key_mask=None, is_causal=None, need_weights=False, caches=None)``
    returns :class:`LMOutput`; with ``caches`` (one per block, a :class:`~attn.attention.KVStore` each) the
    tokens continue the cached sequence and the positions start after it.
    """

    def __init__(self, vocab: int, embed_dim: int, num_layers: int, mixer: Callable[[int], nn.Module],
                 max_len: int | None = None, position_std: float = 0.02, ffn_mult: int = 4,
                 norm_first: bool = True, tie: bool = False, positions: PositionKind = "learned") -> None:
        super().__init__()
        check_int("vocab", vocab)
        check_int("num_layers", num_layers)
        if positions not in ("learned", "sinusoidal", "none"):
            raise ValueError(f"positions must be 'learned', 'sinusoidal' or 'none', got {positions!r}")
        if positions == "sinusoidal" and embed_dim % 2:
            raise ValueError(f"sinusoidal positions need an even embed_dim, got {embed_dim}")
        self.embed = nn.Embedding(vocab, embed_dim)
        self.positions = positions
        self.max_tokens = None if max_len is None else check_int("max_len", max_len)
        self.pos: nn.Embedding | None = None
        if max_len is not None and positions == "learned":
            self.pos = nn.Embedding(max_len, embed_dim)
            nn.init.normal_(self.pos.weight, std=position_std)
        self.blocks = nn.ModuleList(
            TransformerBlock(mixer(i), embed_dim, ffn_mult, norm_first) for i in range(num_layers)
        )
        self.norm: nn.Module = nn.LayerNorm(embed_dim) if norm_first else nn.Identity()
        self.head = nn.Linear(embed_dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None,
                need_weights: bool = False, caches: list[Any] | None = None) -> LMOutput:
        check_token_ids(tokens, self.embed.num_embeddings)
        if caches is not None:
            if not isinstance(caches, (list, tuple)) or not all(
                hasattr(c, "length") and hasattr(c, "append") for c in caches
            ):
                raise TypeError("caches must be a list with one KV cache per block (block.mixer.new_cache(batch, "
                                f"max_len) each), got {type(caches).__name__}")
            if len(caches) != len(self.blocks):
                raise ValueError(f"caches must hold one cache per block: {len(self.blocks)} blocks, got {len(caches)}")
        past = caches[0].length if caches else 0
        if self.max_tokens is not None and past + tokens.shape[1] > self.max_tokens:
            raise ValueError(f"sequence of {past + tokens.shape[1]} tokens exceeds max_len {self.max_tokens}")
        h = self.embed(tokens)  # (B, n, E)
        where = torch.arange(past, past + tokens.shape[1], device=tokens.device)  # (n,) absolute positions
        if self.pos is not None:
            h = h + self.pos(where)
        elif self.positions == "sinusoidal":
            h = h + sinusoidal_embedding(where, h.shape[-1], dtype=h.dtype)
        weights: list[Tensor | None] = []
        for i, block in enumerate(self.blocks):
            extra = {} if caches is None else {"cache": caches[i]}
            h, w = block(h, key_mask=key_mask, is_causal=is_causal, need_weights=need_weights, **extra)
            if need_weights:
                weights.append(w)
        return LMOutput(self.head(self.norm(h)), weights)


@torch.no_grad()
def greedy_decode(model: TokenLM, prompt: Tensor, steps: int, use_cache: bool = True) -> Tensor:
    r"""Greedy decoding: append ``argmax_v p(v | tokens so far)`` ``steps`` times after ``prompt`` ``(B, p)``.

    Returns ``(B, p + steps)``. With ``use_cache`` (every block's mixer needs ``new_cache(batch, max_len)``, as
    :class:`~attn.attention.Attention` has) the prompt runs once (prefill) and each step feeds only the newest
    token, which attends to the cached keys and values of all earlier ones; without, every step reruns the
    whole sequence. Both give the same tokens (the model must be causal: a bidirectional one would let
    earlier tokens change with later ones, which a cache cannot express).
    """
    check_token_ids(prompt, model.embed.num_embeddings, "prompt")
    check_int("steps", steps, 0)
    was_training = model.training
    model.eval()
    seq = prompt
    caches: list[Any] | None = None
    if use_cache and steps:
        mixers = [getattr(block, "mixer", None) for block in model.blocks]
        if not all(hasattr(m, "new_cache") for m in mixers):
            raise TypeError("use_cache=True needs every block's mixer to have new_cache(batch, max_len)")
        caches = [m.new_cache(prompt.shape[0], prompt.shape[1] + steps) for m in mixers]  # type: ignore[union-attr]
    new = prompt
    for _ in range(steps):
        logits = model(new if caches is not None else seq, caches=caches).logits  # (B, t, vocab)
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        seq = torch.cat([seq, nxt], 1)
        new = nxt
    model.train(was_training)
    return seq


class RecallTokens(nn.Module):
    """Embed :class:`~attn.tasks.AssociativeRecall` inputs as one token per pair plus the query.

    Pair ``i`` becomes ``E_k[k_i] + E_v[v_i]`` and the query key becomes the
    last token ``E_k[q] + e_query``; with ``position_std`` set, a learned
    position embedding ``P`` (initialised with that standard deviation) is added.

    Shapes: ``x`` ``(B, 2 n_pairs + 1)`` task tokens -> ``(B, n_pairs + 1, E)``.
    """

    def __init__(self, task: AssociativeRecall, embed_dim: int, position_std: float | None = None) -> None:
        super().__init__()
        self.task = task
        self.key_embed = nn.Embedding(task.n_keys, embed_dim)
        self.value_embed = nn.Embedding(task.n_values, embed_dim)
        self.query_flag = nn.Parameter(torch.randn(embed_dim) * 0.02)
        self.position: nn.Embedding | None = None
        if position_std is not None:
            self.position = nn.Embedding(task.n_pairs + 1, embed_dim)
            nn.init.normal_(self.position.weight, std=position_std)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.task.length:
            raise ValueError(f"x must have shape (batch, {self.task.length}), got {tuple(x.shape)}")
        keys, values = x[:, :-1:2], x[:, 1:-1:2] - self.task.n_keys  # (B, n), (B, n)
        pairs = self.key_embed(keys) + self.value_embed(values)  # (B, n, E)
        query = self.key_embed(x[:, -1]) + self.query_flag  # (B, E)
        h = torch.cat([pairs, query[:, None]], 1)  # (B, n + 1, E)
        return h if self.position is None else h + self.position.weight


class RecallModel(nn.Module):
    """One attention layer solving :class:`~attn.tasks.AssociativeRecall`.

    Each key-value pair becomes one token ``E_k[k] + E_v[v]``; the query key
    becomes a final token ``E_k[q] + e_query``. One self-attention layer over
    these ``n + 1`` tokens lets the query token find the pair whose key matches
    and read its value, which a linear head classifies.

    Args:
        task: the recall task (sizes of the alphabets).
        embed_dim: token width ``E``.
        attention: a module ``(x (B, n, E), need_weights=...) -> AttentionOutput``;
            default :class:`~attn.multihead.MultiHeadAttention` with ``num_heads`` heads.
    """

    def __init__(self, task: AssociativeRecall, embed_dim: int = 64, num_heads: int = 4, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.task = task
        self.tokens = RecallTokens(task, embed_dim)
        self.attention = attention if attention is not None else MultiHeadAttention(embed_dim, num_heads)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_values)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits over values ``(B, n_values)`` and, if asked, the attention weights."""
        h = self.tokens(x)
        out: AttentionOutput = self.attention(h, need_weights=need_weights)
        z = self.norm(h + out.output)[:, -1]  # the query token, (B, E)
        return self.head(z), out.weights


def recall_loss(model: RecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the recalled value, and accuracy."""
    logits, _ = model(batch["x"])
    target = batch["y"] - model.task.n_keys
    loss = F.cross_entropy(logits, target)
    return loss, {"acc": float((logits.argmax(-1) == target).float().mean())}
