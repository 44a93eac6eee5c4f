r"""Chapter 6 -- BERT: bidirectional self-attention, against causal and prefix-LM masks.

One attention layer, three visibility patterns. With scores
``S = Q K^T / sqrt(d_k)`` per head and a boolean visibility pattern ``G`` (``True`` = may attend;
``A`` stays the attention weights, as in the book's notation),

.. math::

    \operatorname{Attn}(X) = \operatorname{softmax}\big(S + M\big) V, \qquad
    M_{ij} = \begin{cases} 0 & G_{ij} \wedge \text{key } j \text{ is real} \\ -\infty & \text{otherwise} \end{cases}

    G^{\text{bi}}_{ij} = 1, \qquad
    G^{\text{causal}}_{ij} = [\, j \le i \,], \qquad
    G^{\text{prefix}(P)}_{ij} = [\, j \le i \;\vee\; j < P \,]

* **bidirectional** (BERT, Devlin et al. 2019): every token sees every real
  token, left and right; only padding is hidden;
* **causal** (GPT): token ``i`` sees ``j <= i``;
* **prefix-LM** (UniLM, Dong et al. 2019; T5, Raffel et al. 2020): the first
  ``P`` tokens see each other in both directions, later tokens see the whole
  prefix and their own past. ``P = 0`` is causal, ``P = n`` is bidirectional.

Shapes: ``x`` ``(B, n, E)``; ``key_mask`` ``(B, n)`` boolean, ``True`` = real
token; ``prefix_len`` an int or ``(B,)`` integer tensor; output ``(B, n, E)``,
weights ``(B, h, n, n)``.

BERT's self-attention (``transformers``' ``BertSelfAttention``) is multi-head
attention *without* the output projection: the dense layer, dropout, residual
and LayerNorm after it live in ``BertSelfOutput``. :class:`BidirectionalSelfAttention`
with ``output_projection=False`` computes exactly what ``BertSelfAttention``
does; with the default ``output_projection=True`` it also applies ``W^O``
(``BertSelfOutput.dense``), which makes it a complete token-mixing layer.
``transformers`` 5.x takes its mask as an *additive* float tensor
``(B, 1, n, n)``, ``0`` where allowed and ``torch.finfo(dtype).min`` where
blocked; :func:`to_bert_mask` converts ours to that format.

The chapter's toy tasks (a masked-token task whose answer sits to the *right*
of the blank, so a causal model can only guess; a repeat task both a masked LM
and a causal LM can learn, to compare the two objectives per training token)
and its small encoder live in :mod:`attn.experiments.bert`.

Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding", NAACL 2019, section 3.1.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .attention import AttentionBase
from .checks import check_tokens
from .core import AttentionOutput
from .masks import causal_mask, check_key_mask
from .multihead import MultiHeadAttention
from .registry import register

__all__ = [
    "PATTERNS",
    "Pattern",
    "prefix_lm_mask",
    "pattern_mask",
    "to_bert_mask",
    "BidirectionalSelfAttention",
]

Pattern = Literal["bidirectional", "causal", "prefix_lm"]
PATTERNS: tuple[str, ...] = ("bidirectional", "causal", "prefix_lm")


def _check_pattern(pattern: str) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def _prefix_tensor(prefix_len: int | Tensor, n: int, device: torch.device | str | None) -> Tensor:
    """Validate a prefix length (int or ``(B,)`` integers in ``[0, n]``) and return it as a tensor."""
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, Tensor)):
        raise TypeError(f"prefix_len must be an int or a (batch,) integer tensor, got {type(prefix_len).__name__}")
    p = torch.as_tensor(prefix_len, device=device)
    if p.dtype.is_floating_point or p.dtype == torch.bool:
        raise TypeError(f"prefix_len must hold integers, got {p.dtype}")
    if p.ndim > 1:
        raise ValueError(f"prefix_len must be an int or have shape (batch,), got shape {tuple(p.shape)}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) > n):
        raise ValueError(f"prefix_len must lie in [0, n={n}], got values in [{int(p.min())}, {int(p.max())}]")
    return p


def prefix_lm_mask(n: int, prefix_len: int | Tensor, device: torch.device | str | None = None) -> Tensor:
    """Prefix-LM mask: query ``i`` sees key ``j`` when ``j <= i`` or ``j < prefix_len``.

    Args:
        n: sequence length.
        prefix_len: an int (one prefix for all) or a ``(B,)`` integer tensor
            (one prefix per example), each in ``[0, n]``.

    Returns:
        Boolean ``(n, n)`` for an int, ``(B, n, n)`` for a tensor; ``True`` = may attend.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = _prefix_tensor(prefix_len, n, device)
    device = p.device
    j = torch.arange(n, device=device)
    causal = causal_mask(n, device=device)  # (n, n): j <= i
    in_prefix = j < p[..., None]  # (n,) or (B, n): key j lies in the prefix
    return causal | in_prefix[..., None, :]  # (n, n) or (B, n, n)


def pattern_mask(
    pattern: Pattern,
    n: int,
    prefix_len: int | Tensor | None = None,
    key_mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Dense boolean mask of a visibility ``pattern``, with padding on top.

    The reference for plots and tests: the layer itself does not build it for
    the bidirectional and causal patterns (it passes the key mask and
    ``is_causal`` to the core instead).

    Returns:
        ``(n, n)`` when neither ``key_mask`` nor a per-example ``prefix_len``
        is given, else ``(B, n, n)``; ``True`` = may attend.
    """
    _check_pattern(pattern)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if pattern == "bidirectional":
        mask = torch.ones(n, n, dtype=torch.bool, device=device)
    elif pattern == "causal":
        mask = causal_mask(n, device=device)
    else:
        if prefix_len is None:
            raise ValueError("the prefix_lm pattern needs prefix_len (an int or a (batch,) tensor)")
        mask = prefix_lm_mask(n, prefix_len, device=device)
    if key_mask is not None:
        check_key_mask(key_mask, None, n, length_name="n")
        mask = mask & key_mask.to(mask.device)[:, None, :]  # (B, n, n)
    return mask


def to_bert_mask(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Our boolean mask -> the additive mask ``transformers``' ``BertSelfAttention`` adds to its scores.

    ``(n, n)``, ``(B, n, n)`` or ``(B, 1, n, n)`` boolean (``True`` = may attend)
    -> ``(B or 1, 1, n, n)`` float: ``0`` where allowed, ``torch.finfo(dtype).min``
    where blocked, as ``transformers.masking_utils.create_bidirectional_mask``
    makes for the eager implementation. (A fully blocked row then becomes a
    uniform distribution there, where ours gives zeros.)
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"to_bert_mask takes a boolean mask (True = may attend), got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    elif mask.ndim != 4:
        raise ValueError(f"mask must have shape (n, n), (B, n, n) or (B, 1, n, n), got {tuple(mask.shape)}")
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


@register(
    "bert",
    paper="Devlin et al. 2019",
    complexity="O(n^2 d)",
    chapter=6,
    summary="bidirectional multi-head self-attention (padding mask only); causal and prefix-LM patterns for comparison",
    build=lambda embed_dim, num_heads: BidirectionalSelfAttention(embed_dim, num_heads),
    kernel="sdpa",
    causal=False,
)
class BidirectionalSelfAttention(AttentionBase):
    r"""BERT's multi-head self-attention, with a choice of visibility pattern.

    .. math::

        \text{head}_i = \operatorname{softmax}\Big(\frac{XW_i^Q (XW_i^K)^\top}{\sqrt{d_h}} + M\Big) XW_i^V,
        \qquad Y = \operatorname{Concat}(\text{head}_1..\text{head}_h)\,[W^O]

    with ``M`` from the pattern (``bidirectional``, ``causal`` or ``prefix_lm``)
    and the padding mask. :class:`~attn.attention.AttentionBase` with the ``"sdpa"``
    kernel: the projections ``q_proj, k_proj, v_proj, out_proj`` are those of
    :class:`~attn.multihead.MultiHeadAttention` (state dicts load into each other).

    Args:
        embed_dim: model width ``E`` (BERT's ``hidden_size``).
        num_heads: heads ``h`` (``num_attention_heads``); must divide ``E``.
        dropout: dropout on the attention probabilities (``attention_probs_dropout_prob``).
        bias: biases on the projections (BERT has them).
        pattern: default visibility pattern; ``forward(pattern=...)`` or ``forward(is_causal=...)`` overrides it.
        output_projection: apply ``W^O``. ``False`` gives exactly what
            ``transformers``' ``BertSelfAttention`` returns (the heads
            concatenated; ``W^O`` is ``BertSelfOutput.dense`` there).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        pattern: Pattern = "bidirectional",
        output_projection: bool = True,
    ) -> None:
        _check_pattern(pattern)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, causal=pattern == "causal")
        self.pattern: Pattern = pattern
        self.output_projection = output_projection
        if not output_projection:
            self.out_proj = nn.Identity()

    def _resolve(self, pattern: Pattern | None, is_causal: bool | None) -> Pattern:
        """The pattern of one call: ``pattern`` if given, else the layer's; ``is_causal`` switches causal on or off."""
        if pattern is not None:
            _check_pattern(pattern)
        if is_causal is None:
            return self.pattern if pattern is None else pattern
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
        if pattern is not None and (pattern == "causal") != is_causal:
            raise ValueError(f"is_causal={is_causal} contradicts pattern={pattern!r}; give one of them")
        if is_causal:
            return "causal"
        return "bidirectional" if self.pattern == "causal" else self.pattern

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        prefix_len: int | Tensor | None = None,
        pattern: Pattern | None = None,
        attn_mask: Tensor | None = None,
        average_weights: bool = False,
        temperature: float = 1.0,
    ) -> AttentionOutput:
        """Self-attention of ``x`` under a visibility pattern and a padding mask.

        Args:
            x: ``(B, n, E)``.
            key_mask: ``(B, n)`` boolean, ``True`` = real token (BERT's ``attention_mask == 1``).
            is_causal: ``True``: the causal pattern; ``False``: not causal (a causal layer becomes
                bidirectional); ``None``: the layer's pattern (or ``pattern``).
            need_weights: return the weights ``(B, h, n, n)``; otherwise the fused kernel runs.
            prefix_len: for ``prefix_lm``: int or ``(B,)`` integers in ``[0, n]``.
            pattern: ``"bidirectional"`` | ``"causal"`` | ``"prefix_lm"``; default: the module's.
            attn_mask: optional extra boolean mask ``(n, n)``, ``(B, n, n)`` or
                ``(B, h, n, n)``, ``True`` = may attend, ANDed with the pattern.
            average_weights: average the returned weights over heads.
            temperature: divides the scores.

        Returns:
            ``AttentionOutput(output (B, n, E), weights or None)``.
        """
        pattern = self._resolve(pattern, is_causal)
        check_tokens(x, self.embed_dim)
        batch, n = x.shape[0], x.shape[1]
        if attn_mask is not None and (not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool):
            raise TypeError(f"attn_mask must be a torch.bool tensor (True = may attend), got {getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
        if prefix_len is not None and pattern != "prefix_lm":
            raise ValueError(f"prefix_len is only used by the 'prefix_lm' pattern, not {pattern!r}")
        if pattern == "prefix_lm":
            if prefix_len is None:
                raise ValueError("pattern 'prefix_lm' needs prefix_len (an int or a (batch,) tensor)")
            p = _prefix_tensor(prefix_len, n, x.device)
            if p.ndim == 1 and p.shape[0] != batch:
                raise ValueError(f"prefix_len must have shape (batch={batch},), got {tuple(p.shape)}")
            pm = prefix_lm_mask(n, p, device=x.device)  # (n, n) or (B, n, n)
            if pm.ndim == 3:
                pm = pm[:, None]  # (B, 1, n, n), shared by the heads
            if attn_mask is not None and attn_mask.ndim == 3:
                attn_mask = attn_mask[:, None]
            attn_mask = pm if attn_mask is None else attn_mask & pm
        return self.mix(
            x, x, x,
            key_mask=key_mask,
            attn_mask=attn_mask,
            is_causal=pattern == "causal",  # the kernel applies j <= i; no mask tensor needed
            need_weights=need_weights,
            average_weights=average_weights,
            temperature=temperature,
        )

    @torch.no_grad()
    def load_bert_weights(self, self_attention: nn.Module, self_output: nn.Module | None = None) -> BidirectionalSelfAttention:
        """Copy a ``transformers`` ``BertSelfAttention`` (``query``/``key``/``value`` Linears).

        ``self_output``, a ``BertSelfOutput``, also gives ``W^O`` (its ``dense``
        layer); its LayerNorm and residual are not part of attention.
        """
        pairs: list[tuple[nn.Linear, nn.Linear]] = []
        for ours, name in ((self.q_proj, "query"), (self.k_proj, "key"), (self.v_proj, "value")):
            lin = getattr(self_attention, name, None)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"self_attention must have nn.Linear '{name}' (a BertSelfAttention), got {type(self_attention).__name__}")
            if tuple(lin.weight.shape) != (self.embed_dim, self.embed_dim):
                raise ValueError(f"BertSelfAttention.{name} is {tuple(lin.weight.shape)}, this module needs ({self.embed_dim}, {self.embed_dim})")
            pairs.append((ours, lin))
        heads = getattr(self_attention, "num_attention_heads", self.num_heads)
        if heads != self.num_heads:
            raise ValueError(f"BertSelfAttention has {heads} heads, this module {self.num_heads}")
        if self_output is not None:
            if not self.output_projection:
                raise ValueError("this module has no output projection (output_projection=False) to load BertSelfOutput.dense into")
            dense = getattr(self_output, "dense", None)
            if not isinstance(dense, nn.Linear):
                raise TypeError(f"self_output must have nn.Linear 'dense' (a BertSelfOutput), got {type(self_output).__name__}")
            assert isinstance(self.out_proj, nn.Linear)  # output_projection=True keeps W^O
            pairs.append((self.out_proj, dense))
        for ours, theirs in pairs:
            ours.weight.copy_(theirs.weight)
            if ours.bias is not None:
                ours.bias.copy_(theirs.bias)
        return self

    @torch.no_grad()
    def load_torch_weights(self, mha: nn.MultiheadAttention) -> BidirectionalSelfAttention:
        """Copy a ``torch.nn.MultiheadAttention`` of the same size (through :class:`MultiHeadAttention`'s loader)."""
        if not self.output_projection:
            raise ValueError("this module has no output projection (output_projection=False); nn.MultiheadAttention has one")
        with torch.random.fork_rng(devices=[]):  # the throw-away layer's init leaves the caller's random stream alone
            ref = MultiHeadAttention(self.embed_dim, self.num_heads).to(self.q_proj.weight)
        ref.load_torch_weights(mha)
        self.load_state_dict(ref.state_dict())
        return self
