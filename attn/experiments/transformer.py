"""Chapter 3's Transformer block section: a two-layer decoder that reverses (or copies) a random sequence.

The model is :class:`attn.models.TokenLM` (pre-LN :class:`attn.models.TransformerBlock` s around causal
multi-head :class:`attn.attention.Attention`, fixed sinusoidal positions, Vaswani et al. 2017, section 3.5),
trained with next-token cross-entropy on the answer half of ``x_1 .. x_n SEP y_1 .. y_n`` and read out
with :func:`attn.models.greedy_decode` (KV cache, one token at a time). The ablations remove one piece
of the block each: the positions (a causal model then has only what the mask lets it count, Haviv et al.
2022), the residual connections (:class:`NoResidualBlock`), or the feed-forward sublayer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import Attention
from ..checks import check_int
from ..core import AttentionOutput
from ..models import TokenLM, TransformerBlock, greedy_decode
from ..train import History, evaluate, set_seed, train

__all__ = ["ReversalTask", "ARMS", "NoResidualBlock", "reversal_model", "reversal_loss", "decode_accuracy",
           "ReversalRun", "run_reversal"]

#: The arms of the ablation: the block as taught, and the block without one of its pieces.
ARMS = ("sinusoidal", "no positions", "no residual", "no FFN")


@dataclass(frozen=True)
class ReversalTask:
    """Reverse (or copy) ``length`` random symbols: ``x_1 .. x_n SEP y_1 .. y_n`` with ``y_t = x_{n+1-t}``.

    Tokens: ``0`` = SEP, symbols ``1 .. n_symbols``. ``sample(B, generator)`` returns ``seq`` ``(B, 2n + 1)``,
    the model input ``x = seq[:, :-1]`` ``(B, 2n)`` and the next-token targets ``y = seq[:, 1:]`` with
    ``-100`` (ignored) on the first ``n`` positions, whose next token (another random symbol, or SEP) cannot
    be predicted. ``prompt`` is ``seq[:, :n + 1]`` (the symbols and SEP), what greedy decoding continues.
    Reversal pairs output ``t`` with input ``n + 1 - t``: query position plus key position is constant (an
    anti-diagonal), so the model must know where each token sits. Copy (``reverse=False``) is the fixed
    offset ``n + 1``.
    """

    length: int = 8
    n_symbols: int = 10
    reverse: bool = True

    SEP = 0

    def __post_init__(self) -> None:
        check_int("length", self.length)
        check_int("n_symbols", self.n_symbols)

    @property
    def vocab(self) -> int:
        return self.n_symbols + 1

    @property
    def seq_len(self) -> int:
        """``2n + 1`` tokens: symbols, SEP, answer."""
        return 2 * self.length + 1

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``seq`` ``(B, 2n + 1)``, ``x`` ``(B, 2n)``, ``y`` ``(B, 2n)`` (``-100`` on the prompt), ``prompt`` ``(B, n + 1)``."""
        n = self.length
        x = torch.randint(1, self.n_symbols + 1, (batch_size, n), generator=generator)
        answer = x.flip(1) if self.reverse else x
        seq = torch.cat([x, torch.full((batch_size, 1), self.SEP), answer], 1)
        y = seq[:, 1:].clone()
        y[:, :n] = -100
        return {"seq": seq, "x": seq[:, :-1], "y": y, "prompt": seq[:, : n + 1]}


class NoResidualBlock(TransformerBlock):
    """The ablation: :class:`~attn.models.TransformerBlock` (pre-LN) with both residual additions removed.

    ``y = FFN(LN_2(Mix(LN_1(x))))``: each sublayer's output *replaces* the stream instead of being added to
    it, so what a token carried (its symbol, its position) survives a layer only if attention reads it back.
    """

    def forward(self, x: Tensor, *, key_mask: Tensor | None = None, is_causal: bool | None = None,
                need_weights: bool = False, **mixer_kwargs: object) -> AttentionOutput:
        h, weights = self.mixer(self.norm1(x), key_mask=key_mask, is_causal=is_causal, need_weights=need_weights,
                                **mixer_kwargs)
        if self.ffn is not None and self.norm2 is not None:
            h = self.ffn(self.norm2(h))
        return AttentionOutput(h, weights)


def reversal_model(task: ReversalTask, arm: str = "sinusoidal", embed_dim: int = 32, num_heads: int = 2,
                   num_layers: int = 2, ffn_mult: int = 4) -> TokenLM:
    """A causal pre-LN :class:`~attn.models.TokenLM` for ``task``; ``arm`` (one of :data:`ARMS`) removes one piece.

    ``"sinusoidal"``: the block as taught (sinusoidal positions, residuals, FFN of width ``ffn_mult * E``);
    ``"no positions"``: no position signal at all; ``"no residual"``: :class:`NoResidualBlock` s;
    ``"no FFN"``: attention-only blocks. Built after the caller seeds torch: same seed, same initial
    attention weights in every arm where the shapes agree.
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    model = TokenLM(
        task.vocab, embed_dim, num_layers, lambda i: Attention(embed_dim, num_heads, causal=True),
        max_len=task.seq_len, positions="none" if arm == "no positions" else "sinusoidal",
        ffn_mult=0 if arm == "no FFN" else ffn_mult,
    )
    if arm == "no residual":
        blocks = []
        for block in model.blocks:
            assert isinstance(block, TransformerBlock)
            plain = NoResidualBlock(block.mixer, embed_dim, ffn_mult)
            plain.load_state_dict(block.state_dict())  # the same initial weights as the full block
            blocks.append(plain)
        model.blocks = nn.ModuleList(blocks)
    return model


def reversal_loss(model: TokenLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the next token on the answer positions; ``acc`` = teacher-forced token accuracy."""
    logits = model(batch["x"]).logits  # (B, 2n, vocab)
    y = batch["y"]
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    keep = y >= 0
    return loss, {"acc": float((logits.argmax(-1)[keep] == y[keep]).float().mean())}


@torch.no_grad()
def decode_accuracy(model: TokenLM, task: ReversalTask, batch: dict[str, Tensor]) -> dict[str, float]:
    """Greedy-decode the answer from ``batch["prompt"]`` (KV cache): ``exact`` sequences and ``token`` accuracy.

    ``exact``: the fraction of sequences whose ``n`` decoded tokens are all right; ``token``: of tokens.
    The model reads its own earlier outputs (no teacher forcing), so one early mistake can spoil the rest.
    """
    out = greedy_decode(model, batch["prompt"], task.length)[:, task.length + 1:]  # (B, n)
    right = out == batch["seq"][:, task.length + 1:]
    return {"exact": float(right.all(1).float().mean()), "token": float(right.float().mean())}


@dataclass
class ReversalRun:
    """Per arm, one value per seed (seed order): greedy ``exact`` and ``token`` accuracy on held-out data,
    the teacher-forced held-out ``teacher`` accuracy, the training ``histories`` and the trained ``models``
    (keyed ``(arm, seed)``)."""

    seeds: list[int]
    exact: dict[str, list[float]] = field(default_factory=dict)
    token: dict[str, list[float]] = field(default_factory=dict)
    teacher: dict[str, list[float]] = field(default_factory=dict)
    histories: dict[tuple[str, int], History] = field(default_factory=dict)
    models: dict[tuple[str, int], TokenLM] = field(default_factory=dict)


def run_reversal(task: ReversalTask, arms: Sequence[str] = ARMS, seeds: Sequence[int] = (0, 1, 2),
                 steps: int = 150, batch_size: int = 64, lr: float = 3e-3, eval_size: int = 1000,
                 eval_seed: int = 10_000, embed_dim: int = 32, num_heads: int = 2, num_layers: int = 2,
                 device: torch.device | str = "cpu") -> ReversalRun:
    """Train every arm on every seed (same seed -> same batches and same initial weights where shapes
    agree; same steps), then greedy-decode one held-out batch of ``eval_size`` sequences (the same for all).
    """
    check_int("steps", steps)
    run = ReversalRun(list(seeds))
    held_out = {k: v.to(device) for k, v in task.sample(eval_size, torch.Generator().manual_seed(eval_seed)).items()}
    for arm in arms:
        for key in ("exact", "token", "teacher"):
            getattr(run, key)[arm] = []
        for seed in seeds:
            set_seed(seed)
            model = reversal_model(task, arm, embed_dim, num_heads, num_layers)
            run.histories[arm, seed] = train(model, task.sample, reversal_loss, steps=steps, batch_size=batch_size,
                                             lr=lr, seed=seed, log_every=max(1, steps // 10), device=device,
                                             progress=False)
            scores = decode_accuracy(model, task, held_out)
            run.exact[arm].append(scores["exact"])
            run.token[arm].append(scores["token"])
            run.teacher[arm].append(evaluate(model, task.sample, reversal_loss, batch_size=eval_size,
                                             seed=eval_seed, device=device)["acc"])
            run.models[arm, seed] = model.cpu()
    return run
