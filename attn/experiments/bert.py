"""Chapter 6's experiment (BERT): a masked-token task whose answer sits to the *right* of the blank, and the
small encoder that learns it under the bidirectional, causal and prefix-LM patterns.

The layer (:class:`~attn.bert.BidirectionalSelfAttention`) and the patterns are in :mod:`attn.bert`.
Devlin et al., "BERT", NAACL 2019.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bert import PATTERNS, BidirectionalSelfAttention, Pattern
from ..models import TransformerBlock

__all__ = ["RightContextTask", "right_context_visible", "MaskedTokenEncoder", "masked_token_loss"]


def _check_pattern(pattern: str) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


@dataclass
class RightContextTask:
    """Fill in masked tokens whose answer is the token to their *right*.

    Each sequence holds ``L`` random content tokens (``L`` uniform in
    ``[min_length, length]``, then padding). At ``n_masks`` non-adjacent
    positions ``p < L - 1`` the token is a copy of its right neighbour (a
    "stutter", ``x_p = x_{p+1}``) and is replaced by ``[MASK]``; the model must
    restore it. Left context carries no information about it, so a model that
    sees only the past is at chance, ``1 / vocab``; a bidirectional model can
    read it off position ``p + 1``.

    Each example also draws a prefix length ``P`` uniform in ``[0, L]`` for
    the prefix-LM pattern: a blank is solvable there when ``p + 1 < P``.

    Token ids: ``0`` = ``[PAD]``, ``1`` = ``[MASK]``, content ``2 .. vocab + 1``.

    Args:
        vocab: number of content tokens.
        length: padded sequence length ``n``.
        min_length: shortest real length.
        n_masks: blanks per sequence.
    """

    vocab: int = 16
    length: int = 16
    min_length: int = 8
    n_masks: int = 2

    PAD = 0
    MASK = 1

    def __post_init__(self) -> None:
        if self.vocab < 2:
            raise ValueError(f"vocab must be >= 2, got {self.vocab}")
        if not 2 <= self.min_length <= self.length:
            raise ValueError(f"need 2 <= min_length <= length, got min_length={self.min_length}, length={self.length}")
        if not self.n_masks >= 1 or 2 * self.n_masks > self.min_length:
            raise ValueError(f"n_masks must be in [1, min_length / 2 = {self.min_length // 2}], got {self.n_masks}")

    @property
    def n_tokens(self) -> int:
        """Size of the embedding table: content + ``[PAD]`` + ``[MASK]``."""
        return self.vocab + 2

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``x (B, n)`` tokens with blanks, ``target (B, n)`` (``-100`` where no blank),
        ``key_mask (B, n)`` (True = real), ``prefix_len (B,)``, ``lengths (B,)``."""
        n, k = self.length, self.n_masks
        lengths = torch.randint(self.min_length, n + 1, (batch_size,), generator=generator)  # (B,)
        tokens = torch.randint(2, self.vocab + 2, (batch_size, n), generator=generator)
        pos = torch.arange(n)
        key_mask = pos[None, :] < lengths[:, None]  # (B, n)
        # k non-adjacent blanks in [0, L - 2]: pick k sorted slots among the first L - k, spread by +i
        room = lengths - k  # slots per row
        scores = torch.rand(batch_size, n, generator=generator).masked_fill(pos[None, :] >= room[:, None], 2.0)
        slots = scores.argsort(-1)[:, :k].sort(-1).values  # (B, k), each < room
        blanks = slots + torch.arange(k)[None, :]  # (B, k): gaps >= 2, last <= L - 2
        rows = torch.arange(batch_size)[:, None]
        target = torch.full((batch_size, n), -100, dtype=torch.long)
        target[rows, blanks] = tokens[rows, blanks + 1]  # the stutter: x_p = x_{p+1}
        x = tokens.clone()
        x[rows, blanks] = self.MASK
        x = x.masked_fill(~key_mask, self.PAD)
        prefix_len = (torch.rand(batch_size, generator=generator) * (lengths + 1)).long().clamp(max=lengths)
        return {"x": x, "target": target, "key_mask": key_mask, "prefix_len": prefix_len, "lengths": lengths}


def right_context_visible(pattern: Pattern, batch: dict[str, Tensor]) -> Tensor:
    """Per blank (``(B, n)``, False elsewhere): can its query see the right neighbour under ``pattern``?

    With the answer a copy of token ``p + 1``, this is the fraction of blanks
    a perfect model solves; the rest it can only guess (``1 / vocab``).
    """
    _check_pattern(pattern)
    blank = batch["target"] != -100
    if pattern == "bidirectional":
        return blank
    if pattern == "causal":
        return torch.zeros_like(blank)
    pos = torch.arange(blank.shape[1], device=blank.device)
    return blank & (pos[None, :] + 1 < batch["prefix_len"][:, None])


class MaskedTokenEncoder(nn.Module):
    """A tiny BERT-like encoder for :class:`RightContextTask`: embeddings, ``num_layers``
    pre-LN :class:`attn.models.TransformerBlock` around :class:`~attn.bert.BidirectionalSelfAttention`,
    a token classifier.

    Not :class:`attn.models.TokenLM`: the prefix-LM pattern needs each block's attention to get
    ``prefix_len``, which :class:`~attn.models.TransformerBlock` passes on and ``TokenLM`` does not, and
    the classifier has a bias (the chapter's printed accuracies were measured with it).

    The same architecture serves all three patterns; only ``pattern`` (the
    mask) changes, so accuracy differences come from what each token may see.

    Args:
        task: gives the vocabulary and the length.
        pattern: ``"bidirectional"``, ``"causal"`` or ``"prefix_lm"``.
        embed_dim, num_heads, num_layers: model size.
    """

    def __init__(self, task: RightContextTask, pattern: Pattern = "bidirectional", embed_dim: int = 64, num_heads: int = 4, num_layers: int = 2) -> None:
        super().__init__()
        _check_pattern(pattern)
        self.task, self.pattern = task, pattern
        self.tok = nn.Embedding(task.n_tokens, embed_dim)
        self.pos = nn.Embedding(task.length, embed_dim)  # learned absolute positions, as in BERT
        self.layers = nn.ModuleList(
            TransformerBlock(BidirectionalSelfAttention(embed_dim, num_heads, pattern=pattern), embed_dim, ffn_mult=4)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_tokens)

    def forward(self, x: Tensor, key_mask: Tensor, prefix_len: Tensor | None = None, need_weights: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Logits ``(B, n, n_tokens)`` and, if asked, each layer's weights ``(B, h, n, n)``."""
        if x.ndim != 2 or x.shape[1] != self.task.length:
            raise ValueError(f"x must have shape (batch, {self.task.length}), got {tuple(x.shape)}")
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))  # (B, n, E)
        p = prefix_len if self.pattern == "prefix_lm" else None
        weights: list[Tensor] = []
        for layer in self.layers:
            h, w = layer(h, key_mask=key_mask, need_weights=need_weights, prefix_len=p)
            if w is not None:
                weights.append(w)
        return self.head(self.norm(h)), weights


def masked_token_loss(model: MaskedTokenEncoder, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the blanks only (BERT's masked-LM loss), and accuracy on them."""
    logits, _ = model(batch["x"], batch["key_mask"], batch["prefix_len"])
    target = batch["target"]
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    blank = target != -100
    acc = (logits.argmax(-1)[blank] == target[blank]).float().mean()
    return loss, {"acc": float(acc)}
