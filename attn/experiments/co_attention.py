"""Chapter 7's experiments (co-attention): the matching-pairs task, its pointer model and loss, the own tasks.

The layers are in :mod:`attn.co_attention`; here, what the chapter does with
them: :class:`MatchingPairs` (a passage and a question that share one key),
:class:`CoAttentionPointer` (both sequences embedded, then pointers into both
from a co-attention layer), :func:`pointer_loss`, and the comparison's own
tasks for ``parallel_coattention``, ``alternating_coattention`` and
``dcn_coattention`` (:data:`OWN_TASKS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..co_attention import AlternatingCoAttention, CoAttentionOutput, DCNCoAttention, DCNOutput, ParallelCoAttention
from ..registry import OwnTask
from . import sized

__all__ = ["MatchingPairs", "CoAttentionPointer", "pointer_loss", "make_co_attention_task", "OWN_TASKS"]


class MatchingPairs:
    """A passage of distinct key tokens and a question of distinct key tokens that share exactly one key.

    The answer is a pair of pointers: *where* the shared key sits in the
    passage and *where* it sits in the question. Lengths vary per example
    (padded, with masks). Finding the passage position needs the question;
    finding the question position needs the passage: a model that attends
    the question without looking at the passage can only guess it.

    ``sample`` returns ``passage (B, N)``, ``question (B, T)`` token ids (0 at
    padding), masks ``passage_mask (B, N)``, ``question_mask (B, T)`` and the
    targets ``passage_target (B,)``, ``question_target (B,)``.

    Args:
        n_keys: key alphabet (``>= max_passage + max_question - 1``).
        passage_len, question_len: ``(min, max)`` lengths.
    """

    def __init__(self, n_keys: int = 24, passage_len: tuple[int, int] = (6, 10), question_len: tuple[int, int] = (3, 6)) -> None:
        if n_keys < passage_len[1] + question_len[1] - 1:
            raise ValueError(f"n_keys ({n_keys}) must be >= max passage + max question - 1 = {passage_len[1] + question_len[1] - 1}")
        if min(passage_len[0], question_len[0]) < 1 or passage_len[0] > passage_len[1] or question_len[0] > question_len[1]:
            raise ValueError(f"lengths must be (min >= 1, max >= min), got {passage_len} and {question_len}")
        self.n_keys, self.passage_len, self.question_len = n_keys, passage_len, question_len

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n_max, t_max = self.passage_len[1], self.question_len[1]
        perm = torch.rand(batch_size, self.n_keys, generator=generator).argsort(-1)  # distinct keys per example
        n_len = torch.randint(self.passage_len[0], n_max + 1, (batch_size,), generator=generator)
        t_len = torch.randint(self.question_len[0], t_max + 1, (batch_size,), generator=generator)
        passage = perm[:, :n_max].clone()
        question = perm[:, n_max : n_max + t_max].clone()  # keys not in the passage ...
        p_pos = (torch.rand(batch_size, generator=generator) * n_len).long()
        q_pos = (torch.rand(batch_size, generator=generator) * t_len).long()
        rows = torch.arange(batch_size)
        question[rows, q_pos] = passage[rows, p_pos]  # ... but one, shared
        passage_mask = torch.arange(n_max)[None] < n_len[:, None]
        question_mask = torch.arange(t_max)[None] < t_len[:, None]
        return {"passage": (passage + 1) * passage_mask, "question": (question + 1) * question_mask,  # ids 1..n_keys, 0 = pad
                "passage_mask": passage_mask, "question_mask": question_mask,
                "passage_target": p_pos, "question_target": q_pos}


class CoAttentionPointer(nn.Module):
    """Embeds both token sequences (different widths) and points into both with a co-attention layer.

    ``kind``: ``"parallel"``, ``"alternating"``, ``"one-way"`` (alternating
    without its third step) or ``"dcn"``. For Lu et al.'s layers the pointers
    *are* the attention weights ``a^v`` and ``a^q``; DCN has no pooling
    attention, so two linear scores over ``[D; C^D]`` and ``[Q; C^Q]`` make
    its pointers. ``forward(batch)`` -> log-probabilities ``(B, N)``, ``(B, T)``.
    """

    kinds = ("parallel", "alternating", "one-way", "dcn")

    def __init__(self, kind: str, n_keys: int, question_dim: int = 16, passage_dim: int = 24, hidden: int = 32) -> None:
        super().__init__()
        if kind not in self.kinds:
            raise ValueError(f"kind must be one of {self.kinds}, got {kind!r}")
        self.kind = kind
        self.question_embed = nn.Embedding(n_keys + 1, question_dim, padding_idx=0)
        self.passage_embed = nn.Embedding(n_keys + 1, passage_dim, padding_idx=0)
        if kind == "parallel":
            self.layer: nn.Module = ParallelCoAttention(question_dim, passage_dim, hidden=hidden)
        elif kind in ("alternating", "one-way"):
            self.layer = AlternatingCoAttention(question_dim, passage_dim, hidden=hidden, third_step=kind == "alternating")
        else:
            self.layer = DCNCoAttention(question_dim, passage_dim, fusion=False)
            self.passage_score = nn.Linear(3 * passage_dim, 1)
            self.question_score = nn.Linear(2 * passage_dim, 1)

    def attend(self, batch: dict[str, Tensor]) -> CoAttentionOutput | DCNOutput:
        """The co-attention layer's output for a batch from :class:`MatchingPairs`."""
        q, v = self.question_embed(batch["question"]), self.passage_embed(batch["passage"])
        out: CoAttentionOutput | DCNOutput = self.layer(
            q, v, question_mask=batch["question_mask"], passage_mask=batch["passage_mask"])
        return out

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = self.attend(batch)
        pm, qm = batch["passage_mask"], batch["question_mask"]
        if isinstance(out, DCNOutput):
            n, t = pm.shape[1], qm.shape[1]
            d = self.passage_embed(batch["passage"])
            assert isinstance(self.layer, DCNCoAttention)  # only the DCN layer returns a DCNOutput
            q = torch.tanh(self.layer.q_proj(self.question_embed(batch["question"])))
            p_scores = self.passage_score(torch.cat([d, out.context[:, :n]], -1))[..., 0]
            q_scores = self.question_score(torch.cat([q, out.question_context[:, :t]], -1))[..., 0]
            neg = torch.finfo(p_scores.dtype).min
            return (p_scores.masked_fill(~pm, neg).log_softmax(-1), q_scores.masked_fill(~qm, neg).log_softmax(-1))
        return out.passage_weights.clamp_min(1e-9).log(), out.question_weights.clamp_min(1e-9).log()


def pointer_loss(model: CoAttentionPointer, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of both pointers; ``acc`` = both right, and each pointer's accuracy."""
    lp, lq = model(batch)
    loss = F.nll_loss(lp, batch["passage_target"]) + F.nll_loss(lq, batch["question_target"])
    p_ok = lp.argmax(-1) == batch["passage_target"]
    q_ok = lq.argmax(-1) == batch["question_target"]
    return loss, {"acc": float((p_ok & q_ok).float().mean()), "passage_acc": float(p_ok.float().mean()),
                  "question_acc": float(q_ok.float().mean())}


def make_co_attention_task(kind: str = "parallel", size: str = "book") -> OwnTask[CoAttentionPointer]:
    """A co-attention layer on :class:`MatchingPairs` (the comparison's own task), at ``size`` (``attn.experiments.SIZES``).

    The layer alone is swept over passage lengths ``N`` with a 16-position
    question; ``weights`` returns the passage attention ``(B, N)`` (Lu) or
    ``A^D`` over the question (DCN), rows summing to 1.
    """
    steps, batch, sizes = sized(  # steps, batch, cost sizes (passage lengths N, question length 16)
        size,
        quick=(20, 16, (16, 32)),
        book=(400, 32, (64, 128, 256)),
        full=(800, 64, (64, 128, 256, 512, 1024)),
        large=(3000, 128, (256, 512, 1024, 2048, 4096)),
    )
    data = MatchingPairs()
    model = CoAttentionPointer(kind, data.n_keys)
    layer = model.layer
    dq, dv = model.question_embed.embedding_dim, model.passage_embed.embedding_dim

    def inputs(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randn(1, 16, dq, generator=generator), torch.randn(1, n, dv, generator=generator)

    def weights(m: CoAttentionPointer, b: dict[str, Tensor]) -> Tensor:
        out = m.attend(b)
        if isinstance(out, DCNOutput):
            return out.passage_weights[:, : b["passage"].shape[1]][b["passage_mask"]]  # real document rows
        return out.passage_weights

    return OwnTask(
        description=f"pointer to the key shared by a passage and a question ({kind} co-attention)",
        model=model, sample=data.sample, loss=pointer_loss, layer=layer, inputs=inputs, sizes=sizes,
        size_unit="passage length N", steps=steps, batch_size=batch, lr=1e-2, target_acc=0.9, weights=weights,
    )


def _own(kind: str) -> Callable[[str], OwnTask[CoAttentionPointer]]:
    def make(size: str) -> OwnTask[CoAttentionPointer]:
        return make_co_attention_task(kind, size)

    return make


#: the comparison's own tasks of chapter 7, by mechanism name: ``factory(size) -> OwnTask``
OWN_TASKS: dict[str, Callable[[str], OwnTask[CoAttentionPointer]]] = {
    "parallel_coattention": _own("parallel"),
    "alternating_coattention": _own("alternating"),
    "dcn_coattention": _own("dcn"),
}
