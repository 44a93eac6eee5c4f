"""Chapter 7's experiments (co-attention): the matching-pairs task, its pointer model and loss, the own tasks.

The layers are in :mod:`attn.co_attention`; here, what the chapter does with
them: :class:`MatchingPairs` (a passage and a question that share one key),
:class:`CoAttentionPointer` (both sequences embedded, then pointers into both
from a co-attention layer: parallel, alternating, one-way, DCN, BiDAF, or the
baseline :class:`TwoWayCrossAttention`), :func:`pointer_loss`, the chapter's
multi-seed runner :func:`train_pointers` with :func:`steps_to_target` and
:func:`first_step_entropy`, and the comparison's own
tasks for ``parallel_coattention``, ``alternating_coattention`` and
``dcn_coattention`` (:data:`OWN_TASKS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..co_attention import (
    AlternatingCoAttention,
    BiDAFAttention,
    BiDAFOutput,
    CoAttentionOutput,
    DCNCoAttention,
    DCNOutput,
    ParallelCoAttention,
)
from ..core import masked_softmax
from ..cross import CrossAttention
from ..registry import OwnTask
from ..train import History, train
from . import sized

__all__ = [
    "MatchingPairs",
    "TwoWayCrossAttention",
    "CoAttentionPointer",
    "pointer_loss",
    "first_step_entropy",
    "steps_to_target",
    "PointerRun",
    "train_pointers",
    "make_co_attention_task",
    "OWN_TASKS",
]


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


class TwoWayCrossAttention(nn.Module):
    r"""Cross-attention both ways without a shared affinity: ViLBERT's co-attentional layer (Lu et al. 2019, fig. 2b).

    Each stream's queries attend to the other stream's keys and values with
    their *own* projections (two independent score matrices, one per
    direction, instead of one affinity read both ways), then a residual,
    LayerNorm and a feed-forward layer, as in a Transformer block:

    .. math::

        \tilde v_n = \operatorname{LN}\big(v_n + \operatorname{CrossAttn}_v(v_n; Q)\big),\quad
        h^v_n = \operatorname{LN}\big(\tilde v_n + \operatorname{FFN}_v(\tilde v_n)\big),

    and the same for the question with :math:`\operatorname{CrossAttn}_q(q_t; V)`.
    One head (:class:`attn.cross.CrossAttention`, chapter 4) per direction.

    ``forward(question (B, T, d_q), passage (B, N, d_v), *, question_mask, passage_mask)``
    -> ``(h^q (B, T, d_q), h^v (B, N, d_v))``.
    """

    def __init__(self, question_dim: int, passage_dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.question_dim, self.passage_dim = question_dim, passage_dim
        self.to_question = CrossAttention(passage_dim, 1, kdim=question_dim)  # passage queries, question keys/values
        self.to_passage = CrossAttention(question_dim, 1, kdim=passage_dim)  # question queries, passage keys/values
        self.norm_v1, self.norm_v2 = nn.LayerNorm(passage_dim), nn.LayerNorm(passage_dim)
        self.norm_q1, self.norm_q2 = nn.LayerNorm(question_dim), nn.LayerNorm(question_dim)
        self.ffn_v = nn.Sequential(nn.Linear(passage_dim, hidden), nn.GELU(), nn.Linear(hidden, passage_dim))
        self.ffn_q = nn.Sequential(nn.Linear(question_dim, hidden), nn.GELU(), nn.Linear(hidden, question_dim))

    def forward(
        self, question: Tensor, passage: Tensor, *, question_mask: Tensor | None = None, passage_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        v = self.norm_v1(passage + self.to_question(passage, question, key_mask=question_mask)[0])
        q = self.norm_q1(question + self.to_passage(question, passage, key_mask=passage_mask)[0])
        return self.norm_q2(q + self.ffn_q(q)), self.norm_v2(v + self.ffn_v(v))


class CoAttentionPointer(nn.Module):
    """Embeds both token sequences (different widths) and points into both with a co-attention layer.

    ``kind``:

    * ``"parallel"``, ``"alternating"``: Lu et al.'s layers; the pointers *are*
      the attention weights ``a^v`` and ``a^q``.
    * ``"one-way"``: alternating without its third step. Its question pointer
      is the first step's ``a^s``, computed before the passage is seen: at
      chance by construction, a **floor**, not a baseline.
    * ``"dcn"``: DCN has no pooling attention, so two linear scores over
      ``[D; C^D]`` and ``[Q; C^Q]`` make its pointers.
    * ``"bidaf"``: BiDAF's attention flow; the passage pointer is BiDAF's
      start-pointer score ``w^T G_n`` (without its modelling LSTM); the question
      pointer reads the same similarity ``S`` column-wise,
      ``p~_t = sum_n softmax_n(S_{:t}) v_n`` and a linear score over
      ``[q_t; p~_t; q_t * p~_t]`` (BiDAF itself points only into the context).
      The question is embedded at the passage's width (the product needs one width).
    * ``"cross"``: :class:`TwoWayCrossAttention` (ViLBERT-style), a linear
      score per position of each stream: the fair alternative without a shared affinity.

    ``forward(batch)`` -> log-probabilities ``(B, N)``, ``(B, T)``.
    """

    kinds = ("parallel", "alternating", "one-way", "dcn", "bidaf", "cross")

    def __init__(self, kind: str, n_keys: int, question_dim: int = 16, passage_dim: int = 24, hidden: int = 32) -> None:
        super().__init__()
        if kind not in self.kinds:
            raise ValueError(f"kind must be one of {self.kinds}, got {kind!r}")
        self.kind = kind
        if kind == "bidaf":
            question_dim = passage_dim
        self.question_embed = nn.Embedding(n_keys + 1, question_dim, padding_idx=0)
        self.passage_embed = nn.Embedding(n_keys + 1, passage_dim, padding_idx=0)
        if kind == "parallel":
            self.layer: nn.Module = ParallelCoAttention(question_dim, passage_dim, hidden=hidden)
        elif kind in ("alternating", "one-way"):
            self.layer = AlternatingCoAttention(question_dim, passage_dim, hidden=hidden, third_step=kind == "alternating")
        elif kind == "dcn":
            self.layer = DCNCoAttention(question_dim, passage_dim, fusion=False)
            self.passage_score = nn.Linear(3 * passage_dim, 1)
            self.question_score = nn.Linear(2 * passage_dim, 1)
        elif kind == "bidaf":
            self.layer = BiDAFAttention(passage_dim)
            self.passage_score = nn.Linear(4 * passage_dim, 1)
            self.question_score = nn.Linear(3 * passage_dim, 1)
        else:
            self.layer = TwoWayCrossAttention(question_dim, passage_dim, hidden=hidden)
            self.passage_score = nn.Linear(passage_dim, 1)
            self.question_score = nn.Linear(question_dim, 1)

    def attend(self, batch: dict[str, Tensor]) -> CoAttentionOutput | DCNOutput | BiDAFOutput | tuple[Tensor, Tensor]:
        """The co-attention layer's output for a batch from :class:`MatchingPairs`."""
        q, v = self.question_embed(batch["question"]), self.passage_embed(batch["passage"])
        out: CoAttentionOutput | DCNOutput | BiDAFOutput | tuple[Tensor, Tensor] = self.layer(
            q, v, question_mask=batch["question_mask"], passage_mask=batch["passage_mask"])
        return out

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = self.attend(batch)
        pm, qm = batch["passage_mask"], batch["question_mask"]
        if isinstance(out, CoAttentionOutput):
            return out.passage_weights.clamp_min(1e-9).log(), out.question_weights.clamp_min(1e-9).log()
        n, t = pm.shape[1], qm.shape[1]
        if isinstance(out, DCNOutput):
            d = self.passage_embed(batch["passage"])
            assert isinstance(self.layer, DCNCoAttention)  # only the DCN layer returns a DCNOutput
            q_in = self.question_embed(batch["question"])
            q = torch.tanh(self.layer.q_proj(q_in))
            p_scores = self.passage_score(torch.cat([d, out.context[:, :n]], -1))[..., 0]
            q_scores = self.question_score(torch.cat([q, out.question_context[:, :t]], -1))[..., 0]
        elif isinstance(out, BiDAFOutput):
            v, q = self.passage_embed(batch["passage"]), self.question_embed(batch["question"])
            p_scores = self.passage_score(out.merged)[..., 0]  # BiDAF's start pointer w^T G_n
            col = masked_softmax(out.similarity.transpose(1, 2), pm[:, None, :])  # each question word over the passage: (B, T, N)
            p_tilde = col @ v  # (B, T, d)
            q_scores = self.question_score(torch.cat([q, p_tilde, q * p_tilde], -1))[..., 0]
        else:
            h_q, h_v = out
            p_scores, q_scores = self.passage_score(h_v)[..., 0], self.question_score(h_q)[..., 0]
        neg = torch.finfo(p_scores.dtype).min
        return (p_scores.masked_fill(~pm, neg).log_softmax(-1), q_scores.masked_fill(~qm, neg).log_softmax(-1))


def pointer_loss(model: CoAttentionPointer, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of both pointers; ``acc`` = both right, and each pointer's accuracy."""
    lp, lq = model(batch)
    loss = F.nll_loss(lp, batch["passage_target"]) + F.nll_loss(lq, batch["question_target"])
    p_ok = lp.argmax(-1) == batch["passage_target"]
    q_ok = lq.argmax(-1) == batch["question_target"]
    return loss, {"acc": float((p_ok & q_ok).float().mean()), "passage_acc": float(p_ok.float().mean()),
                  "question_acc": float(q_ok.float().mean())}


@torch.no_grad()
def first_step_entropy(model: CoAttentionPointer, batch: dict[str, Tensor]) -> float:
    r"""Mean normalised entropy :math:`H(a^s) / \log T` of the first alternating step's question weights.

    ``a^s`` of :math:`\hat s = \mathcal{A}(Q; 0)` (Lu et al. 2016): 1 = uniform
    over the real question positions (``s^`` is the question's mean), 0 = on
    one position. Examples with ``T = 1`` are skipped. Only for ``"alternating"``
    and ``"one-way"`` models.
    """
    layer = model.layer
    if not isinstance(layer, AlternatingCoAttention):
        raise ValueError(f"first_step_entropy needs an alternating or one-way model, got kind {model.kind!r}")
    qm = batch["question_mask"]
    _, a_s = layer.step1(model.question_embed(batch["question"]), None, qm)  # (B, T)
    h = -(a_s * a_s.clamp_min(1e-12).log()).sum(-1)
    t = qm.sum(-1)
    keep = t > 1
    return float((h[keep] / t[keep].float().log()).mean())


def steps_to_target(history: History, target: float, metric: str = "acc", window: int = 5) -> int | None:
    """First logged step at which the mean of the last ``window`` logged ``metric`` values is ``>= target``.

    The training batches are fresh samples, so their accuracy is a held-out
    estimate; the moving mean over ``window`` logs damps one lucky batch.
    ``None``: not reached within the run (censored, never dropped).
    """
    vals = history.metrics.get(metric, [])
    for i in range(window - 1, len(vals)):
        if sum(vals[i - window + 1 : i + 1]) / window >= target:
            return history.step[i]
    return None


class PointerRun(NamedTuple):
    """One trained arm on one seed: the model, its curves, held-out metrics, steps to target."""

    model: CoAttentionPointer
    history: History
    metrics: dict[str, float]
    steps_to_target: int | None


def train_pointers(
    kinds: Sequence[str],
    seeds: Sequence[int],
    *,
    data: MatchingPairs,
    held_out: dict[str, Tensor],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-2,
    target: float = 0.9,
    question_dim: int = 16,
    passage_dim: int = 24,
    hidden: int = 32,
    device: torch.device | str = "cpu",
) -> dict[tuple[int, str], PointerRun]:
    """Train every arm on every seed, same batches per seed (the data stream follows ``seed``), same budget.

    Returns ``{(seed, kind): PointerRun}`` with held-out ``acc`` (both pointers
    right), ``passage_acc``, ``question_acc`` after ``steps`` Adam steps, and the
    steps to a ``target`` moving training accuracy (:func:`steps_to_target`).
    """
    runs: dict[tuple[int, str], PointerRun] = {}
    for s in seeds:
        for kind in kinds:
            torch.manual_seed(s)
            model = CoAttentionPointer(kind, data.n_keys, question_dim, passage_dim, hidden)
            hist = train(model, data.sample, pointer_loss, steps=steps, batch_size=batch_size, lr=lr, seed=s,
                         progress=False, device=device)
            model.cpu().eval()
            with torch.no_grad():
                _, metrics = pointer_loss(model, held_out)
            runs[s, kind] = PointerRun(model, hist, metrics, steps_to_target(hist, target))
    return runs


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
        if isinstance(out, CoAttentionOutput | BiDAFOutput):
            return out.passage_weights
        raise ValueError(f"kind {m.kind!r} has no passage attention to report")

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
