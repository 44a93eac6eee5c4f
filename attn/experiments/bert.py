"""Chapter 6's experiments (BERT).

1. :class:`RightContextTask`: a masked-token task whose answer sits to the *right* of the blank, and the
   small encoder (:class:`MaskedTokenEncoder`) that learns it under the bidirectional, causal and prefix-LM
   patterns. A causal model is at chance there *by construction*: it illustrates what the mask hides.
2. :class:`RepeatTask`: a task both a bidirectional and a causal model can learn (the second half of each
   sequence repeats the first), on which a masked-LM encoder (BERT's objective, loss on 15% of the tokens)
   and a causal LM (loss on every next token) are trained on the same batches and compared per training
   token and per predicted token (:func:`run_mlm_vs_lm`).

The layer (:class:`~attn.bert.BidirectionalSelfAttention`) and the patterns are in :mod:`attn.bert`.
Devlin et al., "BERT", NAACL 2019.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bert import PATTERNS, BidirectionalSelfAttention, Pattern
from ..models import TransformerBlock
from ..train import train

__all__ = [
    "RightContextTask",
    "right_context_visible",
    "MaskedTokenEncoder",
    "masked_token_loss",
    "RepeatTask",
    "Objective",
    "OBJECTIVES",
    "mlm_loss",
    "lm_loss",
    "second_half_accuracy",
    "MlmVsLm",
    "run_mlm_vs_lm",
]


class TokenTask(Protocol):
    """What :class:`MaskedTokenEncoder` needs from a task: the embedding-table size and the length."""

    @property
    def n_tokens(self) -> int: ...

    @property
    def length(self) -> int: ...


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
        task: gives the vocabulary and the length (:class:`RightContextTask` or :class:`RepeatTask`).
        pattern: ``"bidirectional"``, ``"causal"`` or ``"prefix_lm"``.
        embed_dim, num_heads, num_layers: model size.
    """

    def __init__(self, task: TokenTask, pattern: Pattern = "bidirectional", embed_dim: int = 64, num_heads: int = 4, num_layers: int = 2) -> None:
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


# ----------------------------------------------------------------------------- masked LM against causal LM

Objective = Literal["masked LM", "causal LM"]
OBJECTIVES: tuple[Objective, ...] = ("masked LM", "causal LM")


@dataclass
class RepeatTask:
    """A task both a bidirectional and a causal model can learn: the second half repeats the first.

    Each sequence is ``m = length / 2`` tokens uniform over ``vocab`` symbols, then the same ``m`` tokens
    again: ``x_{m+i} = x_i``. The first half is unpredictable; every token of the second half is a copy of
    one to its *left*, so a causal language model can predict it (attend ``m - 1`` positions back) as well
    as a bidirectional encoder can.

    ``sample`` also draws BERT's corruption for the masked-LM objective (Devlin et al. 2019, section 3.1
    and appendix A.1): ``k = max(1, round(mask_rate * length))`` positions per sequence, as BERT's
    pre-training data code picks them; of those, 80 % become ``[MASK]``, 10 % a random token and 10 % stay.
    Both objectives train on the same batches: the causal LM reads ``tokens`` and ignores the corruption.

    Token ids: ``0`` = ``[PAD]`` (unused: no padding here), ``1`` = ``[MASK]``, content ``2 .. vocab + 1``.

    Args:
        vocab: content symbols (chance is ``1 / vocab``).
        length: ``n``, even.
        mask_rate: fraction of the tokens the masked LM predicts (BERT: 0.15).
    """

    vocab: int = 16
    length: int = 20
    mask_rate: float = 0.15

    PAD = 0
    MASK = 1

    def __post_init__(self) -> None:
        if self.vocab < 2:
            raise ValueError(f"vocab must be >= 2, got {self.vocab}")
        if self.length < 4 or self.length % 2:
            raise ValueError(f"length must be even and >= 4, got {self.length}")
        if not 0.0 < self.mask_rate <= 0.5:
            raise ValueError(f"mask_rate must be in (0, 0.5], got {self.mask_rate}")

    @property
    def n_tokens(self) -> int:
        """Size of the embedding table: content + ``[PAD]`` + ``[MASK]``."""
        return self.vocab + 2

    @property
    def half(self) -> int:
        """``m``: the length of the segment that is repeated."""
        return self.length // 2

    @property
    def n_masked(self) -> int:
        """``k``: the tokens per sequence the masked LM predicts."""
        return max(1, round(self.mask_rate * self.length))

    def _corrupt(self, tokens: Tensor, allowed: Tensor, generator: torch.Generator | None,
                 bert_rule: bool) -> tuple[Tensor, Tensor]:
        """Pick ``k`` positions per row among ``allowed`` ``(n,)`` and corrupt them; ``(x, target)``."""
        batch, n = tokens.shape
        scores = torch.rand(batch, n, generator=generator).masked_fill(~allowed[None, :], 2.0)
        picked = scores.argsort(-1)[:, : self.n_masked]  # (B, k), k distinct allowed positions
        rows = torch.arange(batch)[:, None]
        target = torch.full_like(tokens, -100)
        target[rows, picked] = tokens[rows, picked]
        x = tokens.clone()
        if bert_rule:
            u = torch.rand(batch, self.n_masked, generator=generator)  # 80 % [MASK], 10 % random, 10 % kept
            random_tok = torch.randint(2, self.vocab + 2, (batch, self.n_masked), generator=generator)
            new = torch.where(u < 0.8, torch.full_like(random_tok, self.MASK),
                              torch.where(u < 0.9, random_tok, tokens[rows, picked]))
            x[rows, picked] = new
        else:
            x[rows, picked] = self.MASK
        return x, target

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training batch: ``tokens (B, n)`` clean, ``x (B, n)`` corrupted for the masked LM,
        ``target (B, n)`` the originals at the ``k`` picked positions (``-100`` elsewhere),
        ``key_mask (B, n)`` all True."""
        m = self.half
        first = torch.randint(2, self.vocab + 2, (batch_size, m), generator=generator)
        tokens = torch.cat([first, first], dim=1)  # (B, n): x_{m+i} = x_i
        x, target = self._corrupt(tokens, torch.ones(self.length, dtype=torch.bool), generator, bert_rule=True)
        key_mask = torch.ones(batch_size, self.length, dtype=torch.bool)
        return {"tokens": tokens, "x": x, "target": target, "key_mask": key_mask}

    def held_out(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Evaluation batch: the same question for both objectives, what are the second-half tokens.

        The masked LM gets ``k`` second-half positions replaced by ``[MASK]`` (the first half intact, so
        every answer is readable); the causal LM predicts every second-half token from its left context.
        Both can reach accuracy 1.
        """
        m = self.half
        first = torch.randint(2, self.vocab + 2, (batch_size, m), generator=generator)
        tokens = torch.cat([first, first], dim=1)
        second = torch.arange(self.length) >= m
        x, target = self._corrupt(tokens, second, generator, bert_rule=False)
        key_mask = torch.ones(batch_size, self.length, dtype=torch.bool)
        return {"tokens": tokens, "x": x, "target": target, "key_mask": key_mask}


def mlm_loss(model: MaskedTokenEncoder, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    r"""BERT's masked-LM loss :math:`-\sum_{p \in \mathcal M} \log p(x_p \mid \tilde x)` (mean over the
    ``k`` picked positions per sequence) and the accuracy there. ``model``: a bidirectional encoder."""
    logits, _ = model(batch["x"], batch["key_mask"])  # (B, n, n_tokens)
    target = batch["target"]
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    picked = target != -100
    return loss, {"acc": float((logits.argmax(-1)[picked] == target[picked]).float().mean())}


def lm_loss(model: MaskedTokenEncoder, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    r"""Next-token loss :math:`-\sum_{i} \log p(x_{i+1} \mid x_{\le i})` on the clean ``tokens``, all
    ``n - 1`` positions (mean), and the accuracy there. ``model``: a causal one."""
    tokens = batch["tokens"]
    logits, _ = model(tokens, batch["key_mask"])  # (B, n, n_tokens); position i predicts x_{i+1}
    pred, target = logits[:, :-1], tokens[:, 1:]
    loss = F.cross_entropy(pred.flatten(0, 1), target.flatten())
    return loss, {"acc": float((pred.argmax(-1) == target).float().mean())}


@torch.no_grad()
def second_half_accuracy(model: MaskedTokenEncoder, objective: Objective, batch: dict[str, Tensor]) -> float:
    """Held-out accuracy on the second-half tokens of a :meth:`RepeatTask.held_out` batch.

    ``"masked LM"``: at the ``[MASK]`` positions (all in the second half); ``"causal LM"``: next-token
    prediction of every second-half token, ``x_{m..n-1}`` from positions ``m-1..n-2``.
    """
    was_training = model.training
    model.eval()
    try:
        if objective == "masked LM":
            logits, _ = model(batch["x"], batch["key_mask"])
            picked = batch["target"] != -100
            return float((logits.argmax(-1)[picked] == batch["target"][picked]).float().mean())
        if objective == "causal LM":
            tokens = batch["tokens"]
            m = tokens.shape[1] // 2
            logits, _ = model(tokens, batch["key_mask"])
            return float((logits[:, m - 1 : -1].argmax(-1) == tokens[:, m:]).float().mean())
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    finally:
        model.train(was_training)


@dataclass
class MlmVsLm:
    """Result of :func:`run_mlm_vs_lm`.

    ``curves[objective][s]``: held-out second-half accuracy after each step of ``steps`` (seed ``s``);
    ``tokens_per_step``: training tokens per step (``batch * n``, the same for both);
    ``predicted_per_step[objective]``: predicted tokens per step (``batch * k`` and ``batch * (n - 1)``).
    """

    steps: list[int]
    curves: dict[str, list[list[float]]]
    tokens_per_step: int
    predicted_per_step: dict[str, int]
    seeds: list[int]

    def final(self, objective: str) -> list[float]:
        """Held-out accuracy at the end of the budget, one value per seed."""
        return [c[-1] for c in self.curves[objective]]

    def at_step(self, objective: str, step: int) -> list[float]:
        """Held-out accuracy at logged ``step``, one value per seed."""
        i = self.steps.index(step)
        return [c[i] for c in self.curves[objective]]

    def steps_to(self, objective: str, target: float) -> list[int | None]:
        """First logged step where held-out accuracy >= ``target`` (``None``: not reached, censored)."""
        return [next((s for s, a in zip(self.steps, c, strict=True) if a >= target), None) for c in self.curves[objective]]

    def matched_predicted(self) -> tuple[int, int]:
        """``(masked-LM step, causal-LM step)``: logged steps at which both have predicted the same number of
        tokens, the latest such pair (else the masked LM's last step and the latest causal-LM step that has
        predicted no more than it)."""
        per_m, per_c = self.predicted_per_step["masked LM"], self.predicted_per_step["causal LM"]
        for sm in reversed(self.steps):
            for sc in self.steps:
                if sc * per_c == sm * per_m:
                    return sm, sc
        last = self.steps[-1]
        fewer = [sc for sc in self.steps if sc * per_c <= last * per_m]
        if not fewer:
            raise ValueError("the causal LM predicts more tokens in its first logged step than the masked LM in all")
        return last, fewer[-1]

    def tokens_to(self, objective: str, target: float, predicted: bool = False) -> list[float | None]:
        """Training tokens (or, with ``predicted``, predicted tokens) seen when ``target`` is first reached."""
        per = self.predicted_per_step[objective] if predicted else self.tokens_per_step
        return [None if s is None else float(s * per) for s in self.steps_to(objective, target)]


def run_mlm_vs_lm(
    task: RepeatTask,
    seeds: Sequence[int],
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    eval_every: int = 20,
    embed_dim: int = 32,
    num_heads: int = 4,
    num_layers: int = 2,
    n_held_out: int = 512,
    device: torch.device | str = "cpu",
) -> MlmVsLm:
    """Train a masked-LM encoder and a causal LM on the same batches and budget; log held-out accuracy.

    Both models are :class:`MaskedTokenEncoder` of the same size (the same parameters); the masked LM has
    the bidirectional pattern and :func:`mlm_loss`, the causal LM the causal pattern and :func:`lm_loss`.
    For each seed both arms start from ``set_seed(seed)`` and :func:`attn.train.train` draws the same
    batches (the corruption is part of the batch, which the causal LM ignores), so at every step both have
    seen the same ``batch * n`` training tokens; the masked LM has predicted ``batch * k`` of them, the
    causal LM ``batch * (n - 1)``. Every ``eval_every`` steps both answer one held-out batch
    (:meth:`RepeatTask.held_out`, :func:`second_half_accuracy`).
    """
    if steps % eval_every:
        raise ValueError(f"steps ({steps}) must be a multiple of eval_every ({eval_every})")
    held = {k: v.to(device) for k, v in task.held_out(n_held_out, torch.Generator().manual_seed(10_000)).items()}
    patterns: dict[str, Pattern] = {"masked LM": "bidirectional", "causal LM": "causal"}
    losses = {"masked LM": mlm_loss, "causal LM": lm_loss}
    curves: dict[str, list[list[float]]] = {o: [] for o in OBJECTIVES}
    for s in seeds:
        for objective in OBJECTIVES:
            torch.manual_seed(s)
            model = MaskedTokenEncoder(task, patterns[objective], embed_dim, num_heads, num_layers)
            curve: list[float] = []

            def log(step: int, m: MaskedTokenEncoder, objective: Objective = objective,
                    curve: list[float] = curve) -> None:
                curve.append(second_half_accuracy(m, objective, held))

            train(model, task.sample, losses[objective], steps=steps, batch_size=batch_size, lr=lr, seed=s,
                  log_every=eval_every, device=device, progress=False, callback=log)
            curves[objective].append(curve)
    return MlmVsLm(
        steps=list(range(eval_every, steps + 1, eval_every)),
        curves=curves,
        tokens_per_step=batch_size * task.length,
        predicted_per_step={"masked LM": batch_size * task.n_masked, "causal LM": batch_size * (task.length - 1)},
        seeds=list(seeds),
    )
