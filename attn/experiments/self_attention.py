r"""Chapter 2's experiments (self-attention): a set task that only learned projections solve.

**The partner task** (:class:`PartnerTask`). A set of ``n = 2 * pairs`` tokens; token ``i`` carries a class
:math:`c_i` and a value :math:`v_i`, embedded as :math:`x_i = E_{\text{class}}[c_i] + E_{\text{value}}[v_i]`
(fixed random embeddings, drawn from the task's seed). Classes come in partner pairs, :math:`\pi(c) = c \oplus 1`
(``0 <-> 1``, ``2 <-> 3``, ...), and every set holds both members of each of its pairs. Each token must output the
value of its partner: :math:`y_i = v_j` with :math:`c_j = \pi(c_i)`. Order carries nothing (there are no
positions), so the layer must find the partner by content: the score :math:`x_i^\top W_Q W_K^\top x_j` must be
largest at the partner, which the identity projections (:math:`W_Q = W_K = I`, score = similarity) cannot do --
a token is most similar to itself.

**The models.** :class:`SetAttentionModel` is one :class:`attn.self_attention.SelfAttention` layer and a linear
readout to the values, with the projections ``"learned"`` (trained), ``"identity"`` or ``"random"`` (both frozen;
the readout is trained in every arm). :class:`DeepSetModel` is the attention-free set model of Zaheer et al.
("Deep Sets", NeurIPS 2017), :math:`\rho([x_i, \tfrac1n \sum_j \phi(x_j)])`: it sees the whole set, but only
through a pooled summary.

:func:`run_partner` trains every arm on the same seeds, batches and budget (Adam) and returns the held-out token
accuracy per seed. Vaswani et al., "Attention Is All You Need", NeurIPS 2017, section 3.2.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int
from ..self_attention import SelfAttention
from ..train import History, evaluate, set_seed, train

__all__ = [
    "PROJECTIONS",
    "PartnerTask",
    "SetAttentionModel",
    "DeepSetModel",
    "partner_loss",
    "PartnerRun",
    "run_partner",
]

#: The projection settings of :class:`SetAttentionModel`.
PROJECTIONS = ("learned", "identity", "random")


@dataclass
class PartnerTask:
    """Sets of ``2 * pairs`` tokens; each token must output the value of the token whose class is its partner.

    Args:
        classes: number of classes (even); the partner of class ``c`` is ``c ^ 1``.
        values: number of values (the output vocabulary).
        pairs: partner pairs per set, drawn without replacement from the ``classes // 2`` pairs.
        dim: embedding width ``d_model``.
        seed: draws the class and value embeddings (``N(0, 1)`` entries).

    :meth:`sample` returns ``x (B, n, dim)``, ``cls``, ``val``, ``y`` (the partner's value) and ``partner``
    (the partner's index in the set), all ``(B, n)``; the set's order is shuffled (it carries nothing).
    """

    classes: int = 16
    values: int = 16
    pairs: int = 4
    dim: int = 32
    seed: int = 0
    class_emb: Tensor = field(init=False, repr=False)
    value_emb: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("classes", "values", "pairs", "dim"):
            check_int(name, getattr(self, name))
        if self.classes % 2:
            raise ValueError(f"classes must be even (partner pairs), got {self.classes}")
        if self.pairs > self.classes // 2:
            raise ValueError(f"pairs ({self.pairs}) must be <= classes // 2 ({self.classes // 2})")
        g = torch.Generator().manual_seed(self.seed)
        self.class_emb = torch.randn(self.classes, self.dim, generator=g)
        self.value_emb = torch.randn(self.values, self.dim, generator=g)

    @property
    def n(self) -> int:
        """Tokens per set."""
        return 2 * self.pairs

    def embed(self, cls: Tensor, val: Tensor) -> Tensor:
        """``x = E_class[cls] + E_value[val]``, ``(..., dim)``."""
        return self.class_emb[cls] + self.value_emb[val]

    def sample(self, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A batch of ``batch`` sets (see the class docstring for the keys)."""
        check_int("batch", batch)
        chosen = torch.rand(batch, self.classes // 2, generator=generator).argsort(-1)[:, : self.pairs]  # (B, p)
        cls = torch.cat([2 * chosen, 2 * chosen + 1], -1)  # (B, n): member 0 of each pair, then member 1
        order = torch.rand(batch, self.n, generator=generator).argsort(-1)
        cls = cls.gather(1, order)
        val = torch.randint(0, self.values, (batch, self.n), generator=generator)
        # the partner's index: the position whose class is cls ^ 1 (exactly one per row)
        partner = (cls[:, None, :] == (cls ^ 1)[:, :, None]).float().argmax(-1)  # (B, n)
        return {"x": self.embed(cls, val), "cls": cls, "val": val, "y": val.gather(1, partner), "partner": partner}


class SetAttentionModel(nn.Module):
    """One self-attention layer and a linear readout: ``logits = W_out SelfAttention(x)``.

    Args:
        dim: ``d_model`` (= ``d_k`` = ``d_v``).
        values: output classes.
        projections: ``"learned"`` (W_Q, W_K, W_V trained), ``"identity"`` (all three ``I``, frozen) or
            ``"random"`` (frozen ``N(0, 1/dim)`` entries, the identity's scale; drawn from ``seed``).
        seed: the random projections' seed.

    ``forward(x (B, n, dim), need_weights=False) -> (logits (B, n, values), weights (B, n, n) or None)``.
    """

    def __init__(self, dim: int, values: int, projections: str = "learned", seed: int = 0) -> None:
        super().__init__()
        if projections not in PROJECTIONS:
            raise ValueError(f"projections must be one of {PROJECTIONS}, got {projections!r}")
        self.projections = projections
        self.attn = SelfAttention(dim, bias=False)
        self.readout = nn.Linear(dim, values)
        if projections != "learned":
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for lin in (self.attn.w_q, self.attn.w_k, self.attn.w_v):
                    w = torch.eye(dim) if projections == "identity" else torch.randn(dim, dim, generator=g) / math.sqrt(dim)
                    lin.weight.copy_(w)
                    lin.weight.requires_grad_(False)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        out = self.attn(x, need_weights=need_weights)
        w = out.weights[:, 0] if out.weights is not None else None  # (B, n, n): one head
        return self.readout(out.output), w


class DeepSetModel(nn.Module):
    r"""An attention-free set model (Zaheer et al. 2017): :math:`\rho([x_i,\ \tfrac1n\sum_j \phi(x_j)])`.

    ``phi``: ``dim -> hidden -> hidden`` (ReLU); ``rho``: ``dim + hidden -> hidden -> values`` (ReLU).
    Every token sees the whole set, through the mean of ``phi``. ``forward(x, need_weights=False)``
    returns ``(logits (B, n, values), None)``.
    """

    def __init__(self, dim: int, values: int, hidden: int = 64) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.rho = nn.Sequential(nn.Linear(dim + hidden, hidden), nn.ReLU(), nn.Linear(hidden, values))

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        pooled = self.phi(x).mean(1, keepdim=True).expand(-1, x.shape[1], -1)  # (B, n, hidden)
        return self.rho(torch.cat([x, pooled], -1)), None


SetModel = SetAttentionModel | DeepSetModel


def partner_loss(model: SetModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of every token's prediction of its partner's value.

    Metrics: ``acc`` (token accuracy) and, for attention models, ``partner_weight`` (mean weight a token puts
    on its partner) and ``self_weight`` (on itself).
    """
    logits, w = model(batch["x"], need_weights=isinstance(model, SetAttentionModel))
    loss = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())
    metrics = {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}
    if w is not None:
        w = w.detach()
        metrics["partner_weight"] = float(w.gather(-1, batch["partner"][..., None]).mean())
        metrics["self_weight"] = float(w.diagonal(dim1=-2, dim2=-1).mean())
    return loss, metrics


#: The arms of :func:`run_partner`: the three projection settings and the attention-free set model.
ARMS = (*PROJECTIONS, "deep sets")


def _build(arm: str, task: PartnerTask, seed: int) -> SetModel:
    if arm == "deep sets":
        return DeepSetModel(task.dim, task.values)
    return SetAttentionModel(task.dim, task.values, arm, seed=seed)


@dataclass
class PartnerRun:
    """What :func:`run_partner` returns: per arm, one value per seed (in ``seeds`` order)."""

    seeds: list[int]
    acc: dict[str, list[float]]
    partner_weight: dict[str, list[float]]
    histories: dict[str, list[History]]
    models: dict[str, list[SetModel]]
    tasks: list[PartnerTask]


def run_partner(seeds: Sequence[int], steps: int = 300, arms: Sequence[str] = ARMS, *, batch_size: int = 32,
                lr: float = 1e-2, eval_batch: int = 1024, device: torch.device | str = "cpu",
                **task_kwargs: int) -> PartnerRun:
    """Train every arm on :class:`PartnerTask` for each seed: same task, batches and budget per seed.

    The seed draws the task's embeddings, the model's initialisation and the batches; the held-out batch
    is drawn from ``10_000 + seed``. Returns a :class:`PartnerRun` (token accuracy, mean weight on the
    partner for the attention arms, histories and trained models).
    """
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; arms are {ARMS}")
    check_int("steps", steps)
    run = PartnerRun(list(seeds), {a: [] for a in arms}, {a: [] for a in arms if a != "deep sets"},
                     {a: [] for a in arms}, {a: [] for a in arms}, [])
    for seed in seeds:
        task = PartnerTask(seed=seed, **task_kwargs)
        run.tasks.append(task)
        for arm in arms:
            set_seed(seed)
            model = _build(arm, task, seed)
            hist = train(model, task.sample, partner_loss, steps, batch_size=batch_size, lr=lr, seed=seed,
                         device=device, progress=False)
            metrics = evaluate(model, task.sample, partner_loss, batch_size=eval_batch, seed=10_000 + seed,
                               device=device)
            run.acc[arm].append(metrics["acc"])
            if arm in run.partner_weight:
                run.partner_weight[arm].append(metrics["partner_weight"])
            run.histories[arm].append(hist)
            run.models[arm].append(model.cpu())
    return run
