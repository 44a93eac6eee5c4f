r"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology") for every registered token mixer.

Every mechanism gets the same model around it (:class:`MQARModel`) and is trained on the same batches of
:class:`attn.tasks.MQARTask` for the same budget, for each seed and each cell of a grid over the number of
key-value pairs ``P`` and the model width ``E``. :func:`run_mqar` returns one row per (mechanism, cell,
seed); :func:`aggregate` gives the mean and range over seeds.

The model, for tokens :math:`x_1 .. x_n`:

.. math::

    h^{(0)}_t = E[x_t] + E'[x_{t-1}], \qquad
    h^{(\ell)} = h^{(\ell-1)} + A_\ell\big(\mathrm{LN}(h^{(\ell-1)})\big), \qquad
    \hat y_t = W\,\mathrm{LN}(h^{(L)}_t),

with ``A = build(E, num_heads)`` the mechanism's layer from the registry, ``L = 2`` layers and no position
embedding. ``E'[x_{t-1}]`` is the token shift that the Zoology models (H3, Based) put before their mixers as a
short convolution: it hands each value token its key, so the mixers' job is the lookup itself. Every
mechanism gets it, so the comparison is between the mixers, not between ways of finding the previous token.
The loss is the cross-entropy at the query positions only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import MQARTask

__all__ = ["MQARCell", "MQARModel", "mqar_loss", "train_mqar", "attention_stats", "run_mqar", "aggregate"]


@dataclass(frozen=True)
class MQARCell:
    """One point of the MQAR grid: ``pairs`` key-value pairs in sequences of ``seq_len`` tokens, model width ``width``.

    ``seq_len`` ``None`` means ``3 * pairs`` (the pairs, then every key asked once, no filler). The vocabulary
    holds ``vocab`` tokens (``None``: ``2 * pairs + 1``, every key of the alphabet used in every sequence).
    """

    pairs: int
    width: int
    seq_len: int | None = None
    vocab: int | None = None

    def task(self) -> MQARTask:
        """The task of this cell: every key asked once, at random positions after the pairs."""
        return MQARTask(vocab=self.vocab or 2 * self.pairs + 1, num_pairs=self.pairs, seq_len=self.seq_len)

    @property
    def length(self) -> int:
        """Tokens per sequence."""
        return self.task().length


class MQARModel(nn.Module):
    """The comparison's MQAR model: token and shifted-token embeddings, ``layers`` residual mixers, a readout.

    Shapes: ``x`` ``(B, n)`` token ids -> logits ``(B, n, vocab)``; with ``need_weights``, one weight tensor
    (or ``None``) per layer.

    Args:
        vocab: vocabulary size of the task.
        build: ``build(embed_dim, num_heads) -> nn.Module``, the registry's factory of the mechanism's layer.
        embed_dim, num_heads, layers: model sizes.
    """

    def __init__(self, vocab: int, build: Callable[[int, int], nn.Module], embed_dim: int, num_heads: int,
                 layers: int = 2) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.embed = nn.Embedding(vocab, embed_dim)
        self.prev_embed = nn.Embedding(vocab, embed_dim)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(layers))
        self.mixers = nn.ModuleList(build(embed_dim, num_heads) for _ in range(layers))
        self.out_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor | None]]:
        """Logits ``(B, n, vocab)`` and, if asked, each layer's attention weights."""
        if x.ndim != 2:
            raise ValueError(f"x must be (batch, n) token ids, got shape {tuple(x.shape)}")
        h = self.embed(x) + F.pad(self.prev_embed(x[:, :-1]), (0, 0, 1, 0))
        weights: list[Tensor | None] = []
        for norm, mixer in zip(self.norms, self.mixers, strict=True):
            out = mixer(norm(h), need_weights=need_weights)
            h = h + out[0]
            weights.append(out[1] if need_weights else None)
        return self.head(self.out_norm(h)), weights


def mqar_loss(model: MQARModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy at the query positions (``batch["loss_mask"]``), and the accuracy there."""
    logits, _ = model(batch["x"])
    mask = batch["loss_mask"]
    picked, target = logits[mask], batch["y"][mask]
    return F.cross_entropy(picked, target), {"acc": float((picked.argmax(-1) == target).float().mean())}


def _eval_seed(seed: int) -> int:
    return seed + 1_000_003  # held out: distinct from every training stream


def train_mqar(build: Callable[[int, int], nn.Module], cell: MQARCell, seed: int, *, num_heads: int = 4,
               layers: int = 2, steps: int = 200, batch_size: int = 32, lr: float = 3e-3, log_every: int = 10,
               target_acc: float = 0.9, eval_batch: int = 256, device: torch.device | str = "cpu",
               probe: int = 0, causal: bool = False) -> dict[str, Any]:
    """Train one mechanism on one cell for one seed; held-out accuracy, overall and by distance.

    Seeded: the initialisation and the training batches follow ``seed`` (:func:`attn.train.train`), the
    held-out batch ``seed + 1000003``; the same seed gives every mechanism the same batches.

    Returns:
        ``{"acc", "acc_near", "acc_far", "loss", "train_acc_end", "steps_to_target", "params", "cpu_s"}``:
        ``acc_near`` / ``acc_far`` the accuracy on queries whose key lies nearer / farther from the query
        than the median distance of the held-out batch; ``train_acc_end`` the mean training-batch accuracy
        over the last quarter of the logged steps; ``steps_to_target`` the first logged step whose
        training-batch accuracy reaches ``target_acc`` (``None``: not within ``steps``).
        With ``probe > 0``, also how it attends (:func:`attention_stats`): ``query_entropy``,
        ``answer_weight``, ``weights_note``, ``probe`` (``probe`` held-out examples with their weights) and
        ``history`` (the loss curve, a frame).
    """
    from ..train import set_seed, train

    t0 = time.process_time()
    task = cell.task()
    set_seed(seed)
    model = MQARModel(task.vocab, build, cell.width, num_heads, layers).to(device)
    hist = train(model, task.sample, mqar_loss, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                 log_every=log_every, device=device, progress=False, num_threads=None, foreach=True)
    # the held-out batch: one forward gives the loss, the accuracy and the accuracy by distance
    batch = task.sample(eval_batch, torch.Generator().manual_seed(_eval_seed(seed)))
    model.eval()
    with torch.no_grad():
        logits, _ = model(batch["x"].to(device))
    mask = batch["loss_mask"]
    picked, target = logits.cpu()[mask], batch["y"][mask]
    correct = (picked.argmax(-1) == target).float()
    ev = {"acc": float(correct.mean()), "loss": float(F.cross_entropy(picked, target))}
    where = torch.arange(task.length).expand_as(mask)[mask]
    distance = where - batch["source"][mask]  # query position - position of the value it asks for
    far = distance > distance.float().median()
    tail = hist.metrics["acc"][-max(1, len(hist.step) // 4):]
    stats = attention_stats(model, batch, probe, causal) if probe else {}
    if probe:
        stats["history"] = hist.to_frame()  # the loss curve of the probed seed
    return {**stats,
        "acc": ev["acc"], "loss": ev["loss"],
        "acc_near": float(correct[~far].mean()) if (~far).any() else float("nan"),
        "acc_far": float(correct[far].mean()) if far.any() else float("nan"),
        "train_acc_end": sum(tail) / len(tail),
        "steps_to_target": hist.first_step_reaching("acc", target_acc),
        "params": sum(p.numel() for p in model.parameters()),
        "cpu_s": time.process_time() - t0,
    }


def attention_stats(model: MQARModel, batch: dict[str, Tensor], probe: int, causal: bool = False) -> dict[str, Any]:
    """How a trained model attends at the query positions of a held-out ``batch``.

    ``answer_weight``: the weight a query row puts on the value token it asks for (the best layer and head,
    averaged over the queries); ``query_entropy``: the entropy (nats) of the query rows of that layer and head;
    ``uniform_entropy``: the mean entropy of a uniform row over the keys a query row may see (all ``n``, or the
    ``t + 1`` up to its position ``t`` for a ``causal`` layer), for scale.
    A mechanism without attention weights (FNet, GAU's ``relu^2`` rows, linear attention's implicit ones) or
    whose rows are not distributions gets ``NaN`` and a ``weights_note`` saying why: no entropy is reported for
    weights that are not a distribution. ``probe``: the first ``probe`` examples' tokens, targets and weights
    ``(layers, probe, heads, n, n)`` for the explorer (``None`` when there are no weights).
    """
    from ..core import entropy

    device = next(model.parameters()).device
    x = batch["x"]
    out: dict[str, Any] = {"query_entropy": float("nan"), "answer_weight": float("nan"),
                           "uniform_entropy": float("nan"), "weights_note": "", "probe": None}
    try:
        with torch.no_grad():
            logits, weights = model(x.to(device), need_weights=True)
    except Exception as err:
        out["weights_note"] = f"need_weights=True failed: {type(err).__name__}"
        return out
    if any(getattr(m, "weights_are_influence", False) for m in model.mixers):
        out["weights_note"] = "no attention weights: its rows are influence weights of a fixed mixing, not attention"
        return out
    n = x.shape[1]
    stacked = []
    for w in weights:
        if w is None:
            out["weights_note"] = "no attention weights (the layer returns none)"
            return out
        w = w.detach().float().cpu()
        w = w[:, None] if w.ndim == 3 else w
        if w.ndim != 4 or tuple(w.shape[-2:]) != (n, n) or w.shape[0] != x.shape[0]:
            out["weights_note"] = f"weights of shape {tuple(w.shape)}, not (batch, heads, {n}, {n})"
            return out
        sums = w.sum(-1)
        if (w < -1e-6).any() or not torch.allclose(sums, torch.ones(()), atol=1e-3):
            out["weights_note"] = "its weights are not distributions (rows do not sum to 1)"
            return out
        stacked.append(w)
    ws = torch.stack(stacked)  # (L, B, H, n, n)
    mask = batch["loss_mask"]
    b_idx, q_idx = mask.nonzero(as_tuple=True)
    src = batch["source"][mask]
    rows = ws[:, b_idx, :, q_idx]  # (Q, L, H, n): every query row of every layer and head
    answer = rows[torch.arange(len(src)), :, :, src].mean(0)  # (L, H)
    best = divmod(int(answer.argmax()), answer.shape[1])
    out["answer_weight"] = float(answer.max())
    per_query = entropy(rows[:, best[0], best[1]])
    out["query_entropy"] = float(per_query.mean())
    out["query_entropies"] = per_query.numpy()
    visible = (q_idx + 1).float() if causal else torch.full((len(q_idx),), float(n))
    out["uniform_entropy"] = float(visible.log().mean())
    k = min(probe, x.shape[0])
    out["probe"] = {"x": x[:k].clone(), "y": batch["y"][:k].clone(), "source": batch["source"][:k].clone(),
                    "pred": logits.argmax(-1).cpu()[:k], "weights": ws[:, :k].clone()}
    return out


def _job(name: str, cell: MQARCell, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    from ..registry import get

    torch.set_num_threads(1)
    mech = get(name)
    assert mech.build is not None
    try:
        out = train_mqar(mech.build, cell, seed, causal=bool(mech.causal), **options)
        status = "ok"
    except Exception as err:  # one mechanism failing must not hide the others
        out, status = {}, f"error: {type(err).__name__}: {err}"
    return {"name": name, "chapter": mech.chapter, "pairs": cell.pairs, "width": cell.width,
            "seq_len": cell.length, "seed": seed, "steps": options.get("steps"), "status": status, **out}


def run_mqar(names: Iterable[str] | Sequence[tuple[str, MQARCell]], cells: Sequence[MQARCell] | None = None,
             seeds: Sequence[int] = (0, 1, 2), *, workers: int = 1, pool: Any = None,
             steps_for: Callable[[MQARCell], int] | None = None, probe: int = 0, **options: Any) -> pd.DataFrame:
    """Train mechanisms on MQAR cells for every seed (:func:`train_mqar`); one row per run.

    Either ``names`` and ``cells`` (every name on every cell), or ``names`` a sequence of ``(name, cell)``
    pairs and ``cells`` ``None``. ``steps_for(cell)`` gives each cell's training steps (else
    ``options["steps"]``); ``probe`` examples' attention is kept for the first seed's runs only.
    ``workers > 1`` trains that many runs at once, each in its own spawned process on one thread (or on
    ``pool``, a ``concurrent.futures`` executor the caller owns); the rows are the same as with
    ``workers=1`` (every run is seeded and single-threaded). ``options`` go to :func:`train_mqar`.

    Returns:
        a frame with ``name, chapter, pairs, width, seq_len, seed, steps, status`` and :func:`train_mqar`'s
        columns, in the order of the (name, cell) pairs, then ``seeds``.
    """
    from ..registry import get

    pairs: list[tuple[str, MQARCell]] = []
    for item in names:
        if cells is None:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], MQARCell)):
                raise TypeError(f"with cells=None, names must hold (name, MQARCell) pairs, got {item!r}")
            pairs.append((str(item[0]), item[1]))
        else:
            pairs.extend((str(item), c) for c in cells)
    for name in dict.fromkeys(n for n, _ in pairs):
        if get(name).build is None:
            raise ValueError(f"{name!r} has no sequence layer (build is None): it cannot run MQAR")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    jobs = []
    for name, cell in pairs:
        for seed in seeds:
            opts = dict(options)
            if steps_for is not None:
                opts["steps"] = steps_for(cell)
            if probe and seed == seeds[0]:
                opts["probe"] = probe
            jobs.append((name, cell, seed, opts))
    if pool is None and (workers == 1 or len(jobs) < 2):
        rows = [_job(*job) for job in jobs]
    elif pool is not None:
        rows = list(pool.map(_job, *zip(*jobs, strict=True)))
    else:
        import concurrent.futures as cf

        import torch.multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as own_pool:
            rows = list(own_pool.map(_job, *zip(*jobs, strict=True)))
    return pd.DataFrame(rows)


def aggregate(runs: pd.DataFrame, by: Sequence[str] = ("name", "pairs", "width", "seq_len"),
              column: str = "acc") -> pd.DataFrame:
    """Mean, min, max and number of seeds of ``column`` per group (the spread every claim reports)."""
    ok = runs[runs["status"] == "ok"]
    g = ok.groupby(list(by), sort=False)[column]
    out = g.agg(["mean", "min", "max", "count"]).reset_index()
    return out.rename(columns={"count": "seeds"})
