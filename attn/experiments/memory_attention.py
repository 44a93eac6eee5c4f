"""Chapter 15's experiments: a fixed lookup (persistent memory), far recall and streaming recall (kNN memory).

* :class:`LookupTask`, :class:`LookupModel`, :func:`lookup_loss`, :func:`run_lookup`: a fixed
  token -> class table over frozen random token codes, learned by one block whose knowledge
  lives in a feed-forward layer, in persistent slots (Sukhbaatar et al. 2019), or nowhere (floor).
* :class:`FarRecallTask`, :class:`MemoryRecallModel`, :func:`far_recall_loss`,
  :func:`run_far_recall`: key-value recall whose answer may lie beyond the context window; the
  model's mixer is the kNN memory, local attention alone, dense attention over the whole stream
  or Transformer-XL recurrence.
* :class:`StreamRecallTask`, :func:`train_streaming`, :func:`evaluate_streaming`: the same recall
  read one segment per optimiser step, so the bank holds keys made by older parameters (stale
  keys, Wu et al. 2022), with or without L2-normalised queries and keys.

The layers are in :mod:`attn.memory_attention` and :mod:`attn.transformer_xl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_token_ids
from ..memory_attention import KNNMemory, MemorizingAttention, PersistentMemoryAttention
from ..models import TransformerBlock
from ..train import History, cpu_threads, evaluate, set_seed, train
from ..transformer_xl import TransformerXLAttention

__all__ = [
    "LookupTask",
    "LookupModel",
    "lookup_loss",
    "run_lookup",
    "FarRecallTask",
    "MemoryRecallModel",
    "far_recall_loss",
    "run_far_recall",
    "StreamRecallTask",
    "train_streaming",
    "evaluate_streaming",
]

# --------------------------------------------------------------------------- persistent memory: a fixed lookup


@dataclass
class LookupTask:
    """A fixed table ``f: token -> class`` read through frozen random token codes.

    Every position of a sequence of ``length`` random tokens asks for ``f(token)``; ``f`` (one of
    ``n_classes`` per token, uniform) and the codes (``N(0, 1)`` vectors of width ``embed_dim``)
    are drawn once from ``table_seed``, the same for every model and seed. The codes are frozen,
    so the table cannot be written into the embedding: it must be stored in the layer. A linear
    readout of ``embed_dim``-wide random codes separates about ``2 embed_dim`` random points
    (Cover 1965), far fewer than ``n_tokens``: a layer without a non-linear store is a floor.

    ``sample`` returns ``tokens (B, length)`` and ``y (B, length)``.
    """

    n_tokens: int = 128
    n_classes: int = 4
    length: int = 8
    embed_dim: int = 16
    table_seed: int = 0

    def __post_init__(self) -> None:
        if self.n_tokens < 2 or self.n_classes < 2 or self.length < 1 or self.embed_dim < 1:
            raise ValueError(f"need n_tokens, n_classes >= 2 and length, embed_dim >= 1, got {self}")
        g = torch.Generator().manual_seed(self.table_seed)
        self.table = torch.randint(0, self.n_classes, (self.n_tokens,), generator=g)  # f: (n_tokens,)
        self.codes = torch.randn(self.n_tokens, self.embed_dim, generator=g)  # frozen inputs

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        tokens = torch.randint(0, self.n_tokens, (batch_size, self.length), generator=generator)
        return {"tokens": tokens, "y": self.table[tokens]}


LookupKind = Literal["ffn", "slots", "none"]


class LookupModel(nn.Module):
    """Frozen codes -> one pre-norm block (causal attention; its store) -> LayerNorm -> linear readout.

    ``kind``: ``"ffn"``: a feed-forward sublayer of width ``4 E`` and no slots (the standard block);
    ``"slots"``: no feed-forward sublayer, ``N = slots`` persistent key/value slots per head in the
    attention (Sukhbaatar et al.'s all-attention layer; default ``N = 4 E``, which gives the same
    ``8 E^2`` parameters as the feed-forward layer up to its biases); ``"none"``: neither (the floor).
    """

    def __init__(self, task: LookupTask, num_heads: int = 2, kind: LookupKind = "ffn", slots: int | None = None) -> None:
        super().__init__()
        if kind not in ("ffn", "slots", "none"):
            raise ValueError(f"kind must be 'ffn', 'slots' or 'none', got {kind!r}")
        E = task.embed_dim
        self.task, self.kind = task, kind
        self.codes = nn.Embedding.from_pretrained(task.codes.clone(), freeze=True)
        n_slots = (4 * E if slots is None else slots) if kind == "slots" else 0
        attention = PersistentMemoryAttention(E, num_heads, slots=n_slots, causal=True)
        self.block = TransformerBlock(attention, E, ffn_mult=4 if kind == "ffn" else 0)
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, task.n_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens (B, n)`` -> logits ``(B, n, n_classes)``."""
        check_token_ids(tokens, self.task.n_tokens, "tokens")
        return self.head(self.norm(self.block(self.codes(tokens), is_causal=True).output))


def lookup_loss(model: LookupModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy over every position; accuracy per token."""
    logits = model(batch["tokens"])
    acc = float((logits.argmax(-1) == batch["y"]).float().mean())
    return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten()), {"acc": acc}


def run_lookup(
    task: LookupTask, kinds: dict[str, LookupKind], seeds: list[int], steps: int, batch_size: int = 16,
    lr: float = 1e-2, device: torch.device | str = "cpu", eval_batch: int = 256,
) -> tuple[dict[str, list[float]], dict[str, list[History]]]:
    """Train every arm (name -> kind) on every seed, same batches and budget; held-out token accuracy per seed.

    Returns ``({arm: [accuracy per seed]}, {arm: [History per seed]})``.
    """
    accs: dict[str, list[float]] = {name: [] for name in kinds}
    curves: dict[str, list[History]] = {name: [] for name in kinds}
    for name, kind in kinds.items():
        for s in seeds:
            set_seed(s)
            model = LookupModel(task, kind=kind)
            hist = train(model, task.sample, lookup_loss, steps=steps, batch_size=batch_size, lr=lr, seed=s,
                         log_every=max(1, steps // 10), progress=False, device=device)
            model = model.cpu()
            accs[name].append(evaluate(model, task.sample, lookup_loss, batch_size=eval_batch, seed=10_000 + s)["acc"])
            curves[name].append(hist)
    return accs, curves


# --------------------------------------------------------------------------- far recall


class RecallSpec(Protocol):
    """What :class:`MemoryRecallModel` reads from a task: vocabularies, the window, the stream."""

    n_keys: int
    n_values: int
    segment: int

    @property
    def length(self) -> int: ...


@dataclass
class FarRecallTask:
    """Key-value recall over a stream of ``segments`` windows of ``segment`` tokens; the query is the last token.

    Each token but the last is a pair ``(key, value)`` (keys distinct); the last
    token asks for one key's value. With probability ``p_near`` the asked pair
    lies in the query's own window (the last segment), else in an earlier
    segment: **beyond the context window**, reachable only through a memory.

    ``sample`` returns ``keys (B, n)`` (the last is the query), ``values (B, n)``
    (the last is 0, unused), ``y (B,)`` the answer, ``where (B,)`` the asked
    pair's position, ``far (B,)`` whether it lies outside the last window.
    """

    n_keys: int = 48
    n_values: int = 8
    segment: int = 8
    segments: int = 4
    p_near: float = 0.5

    def __post_init__(self) -> None:
        if self.segments < 2 or self.segment < 2:
            raise ValueError(f"need segments >= 2 and segment >= 2, got {self.segments} and {self.segment}")
        if self.n_keys < self.length - 1:
            raise ValueError(f"n_keys ({self.n_keys}) must be >= the number of pairs ({self.length - 1}) for distinct keys")
        if not 0.0 <= self.p_near <= 1.0:
            raise ValueError(f"p_near must be in [0, 1], got {self.p_near}")

    @property
    def length(self) -> int:
        return self.segment * self.segments

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n, last = self.length, self.length - self.segment  # the last window starts at `last`
        keys = torch.rand(batch_size, self.n_keys, generator=generator).argsort(-1)[:, : n - 1]  # (B, n-1) distinct
        values = torch.randint(0, self.n_values, (batch_size, n - 1), generator=generator)
        near = torch.rand(batch_size, generator=generator) < self.p_near
        where_near = last + torch.randint(0, self.segment - 1, (batch_size,), generator=generator)
        where_far = torch.randint(0, last, (batch_size,), generator=generator)
        where = torch.where(near, where_near, where_far)
        rows = torch.arange(batch_size)
        keys = torch.cat([keys, keys[rows, where][:, None]], 1)
        values = torch.cat([values, values.new_zeros(batch_size, 1)], 1)
        return {"keys": keys, "values": values, "y": values[rows, where], "where": where, "far": ~near}


Mixer = Literal["knn", "local", "dense", "xl"]


class MemoryRecallModel(nn.Module):
    """Embeddings + one attention layer (residual, LayerNorm) + a readout at the query.

    Pair ``i`` becomes ``E_k[k_i] + E_v[v_i]``, the query ``E_k[q] + e_query``. ``mixer``:

    * ``"knn"``: :class:`MemorizingAttention` reading the stream in windows of ``task.segment``,
      ``top_k`` retrieved entries from a bank of ``capacity`` (default: the whole stream);
      ``top_k = 0`` is the same layer without memory;
    * ``"local"``: the same layer with ``top_k = 0`` (its window only);
    * ``"dense"``: the same layer with one window over the whole stream (causal dense attention:
      the upper bound, at ``O(n^2)``);
    * ``"xl"``: :class:`~attn.transformer_xl.TransformerXLAttention` with ``M = L``: the previous
      window's states as memory, relative positions.

    ``normalize``: L2-normalised queries and keys in the memorizing layer (see
    :class:`MemorizingAttention`).
    """

    def __init__(
        self, task: RecallSpec, embed_dim: int = 32, num_heads: int = 2, top_k: int = 4, capacity: int | None = None,
        *, mixer: Mixer = "knn", normalize: bool = False,
    ) -> None:
        super().__init__()
        if mixer not in ("knn", "local", "dense", "xl"):
            raise ValueError(f"mixer must be 'knn', 'local', 'dense' or 'xl', got {mixer!r}")
        self.task, self.mixer = task, mixer
        self.key_embed = nn.Embedding(task.n_keys, embed_dim)
        self.value_embed = nn.Embedding(task.n_values, embed_dim)
        self.query_flag = nn.Parameter(torch.randn(embed_dim) * 0.02)
        capacity = task.length if capacity is None else capacity
        self.attention: MemorizingAttention | TransformerXLAttention
        if mixer == "xl":
            self.attention = TransformerXLAttention(embed_dim, num_heads, segment=task.segment, mem_len=task.segment)
        else:
            segment = task.length if mixer == "dense" else task.segment
            k = top_k if mixer == "knn" else 0
            self.attention = MemorizingAttention(embed_dim, num_heads, segment=segment, top_k=k, capacity=capacity,
                                                 normalize=normalize)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, task.n_values)

    def embed(self, keys: Tensor, values: Tensor) -> Tensor:
        """``keys, values (B, n)`` -> tokens ``(B, n, E)``: pairs, then the query (which carries no value)."""
        check_token_ids(keys, self.task.n_keys, "keys")
        check_token_ids(values, self.task.n_values, "values")
        if values.shape != keys.shape:
            raise ValueError(f"values must have the shape of keys (batch, n) = {tuple(keys.shape)}, got {tuple(values.shape)}")
        flag = self.query_flag.expand(keys.shape[0], 1, -1)
        return self.key_embed(keys) + torch.cat([self.value_embed(values[:, :-1]), flag], 1)

    def readout(self, h: Tensor, out: Tensor) -> Tensor:
        """Logits ``(B, n_values)`` at the last token from the residual stream ``h + out`` ``(B, n, E)``."""
        return self.head(self.norm(h + out)[:, -1])

    def forward(self, keys: Tensor, values: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits ``(B, n_values)`` and, with ``need_weights``, the layer's effective weights ``(B, h, n, n)``."""
        h = self.embed(keys, values)
        out, w = self.attention(h, need_weights=need_weights)
        return self.readout(h, out), w


def far_recall_loss(model: MemoryRecallModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the answer; accuracy overall and on the far and near examples."""
    logits, _ = model(batch["keys"], batch["values"])
    correct = (logits.argmax(-1) == batch["y"]).float()
    far = batch["far"]
    metrics = {"acc": float(correct.mean())}
    if far.any():
        metrics["acc_far"] = float(correct[far].mean())
    if (~far).any():
        metrics["acc_near"] = float(correct[~far].mean())
    return F.cross_entropy(logits, batch["y"]), metrics


def run_far_recall(
    task: FarRecallTask, arms: dict[str, Mixer], seeds: list[int], steps: int, batch_size: int = 32, lr: float = 1e-2,
    device: torch.device | str = "cpu", embed_dim: int = 32, num_heads: int = 2, top_k: int = 4, eval_batch: int = 512,
) -> tuple[dict[str, dict[str, list[float]]], dict[tuple[str, int], History], dict[tuple[str, int], MemoryRecallModel]]:
    """Train every arm (name -> mixer) on every seed on ``task``: same batches, same budget.

    Returns ``(scores, curves, models)``: ``scores[arm]["far" | "near"]`` the held-out accuracy per
    seed on answers beyond / inside the window (fresh batches with ``p_near = 0`` / ``1``);
    ``curves[arm, seed]`` the training history; ``models[arm, seed]`` the trained model (CPU).
    """
    far_task, near_task = (FarRecallTask(task.n_keys, task.n_values, task.segment, task.segments, p) for p in (0.0, 1.0))
    scores: dict[str, dict[str, list[float]]] = {name: {"far": [], "near": []} for name in arms}
    curves: dict[tuple[str, int], History] = {}
    models: dict[tuple[str, int], MemoryRecallModel] = {}
    for name, mixer in arms.items():
        for s in seeds:
            set_seed(s)
            model = MemoryRecallModel(task, embed_dim, num_heads, top_k=top_k, mixer=mixer)
            curves[name, s] = train(model, task.sample, far_recall_loss, steps=steps, batch_size=batch_size, lr=lr,
                                    seed=s, log_every=max(1, steps // 20), progress=False, device=device)
            model = model.cpu()
            for key, t, off in (("far", far_task, 1000), ("near", near_task, 2000)):
                scores[name][key].append(evaluate(model, t.sample, far_recall_loss, batch_size=eval_batch, seed=off + s)["acc"])
            models[name, s] = model
    return scores, curves, models


# --------------------------------------------------------------------------- streaming recall: stale keys


@dataclass
class StreamRecallTask:
    """Documents of ``segments`` windows of ``segment`` tokens, read one window at a time.

    Every window holds ``segment - 1`` pairs ``(key, value)`` (keys distinct within a document) and
    ends with a query for one key. The query of window 0 asks a pair of its own window; that of a
    later window asks its own window with probability ``p_near``, else a pair of an earlier window
    (uniform): **beyond the window**, reachable only through the memory. A window has the layout of a
    :class:`FarRecallTask` stream's last window, so :class:`MemoryRecallModel` reads it unchanged.

    ``sample`` returns ``keys, values (B, D, L)`` (the query's value is 0, unused), ``y (B, D)``
    and ``far (B, D)``.
    """

    n_keys: int = 64
    n_values: int = 8
    segment: int = 8
    segments: int = 8
    p_near: float = 0.25

    def __post_init__(self) -> None:
        if self.segments < 2 or self.segment < 2:
            raise ValueError(f"need segments >= 2 and segment >= 2, got {self.segments} and {self.segment}")
        if self.n_keys < self.segments * (self.segment - 1):
            raise ValueError(f"n_keys ({self.n_keys}) must be >= the pairs of a document ({self.segments * (self.segment - 1)})")
        if not 0.0 <= self.p_near <= 1.0:
            raise ValueError(f"p_near must be in [0, 1], got {self.p_near}")

    @property
    def length(self) -> int:
        """Tokens of a document: the bank that holds a whole document."""
        return self.segment * self.segments

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        B, D, P = batch_size, self.segments, self.segment - 1  # P pairs per window
        keys = torch.rand(B, self.n_keys, generator=generator).argsort(-1)[:, : D * P].view(B, D, P)
        values = torch.randint(0, self.n_values, (B, D, P), generator=generator)
        seg = torch.arange(D)
        near = (torch.rand(B, D, generator=generator) < self.p_near) | (seg == 0)
        own = seg * P + torch.randint(0, P, (B, D), generator=generator)  # a pair of the query's window (flat index)
        earlier = (torch.rand(B, D, generator=generator) * (seg * P)).long()  # a pair of windows 0 .. s-1
        where = torch.where(near, own, earlier)  # (B, D) index into the document's D * P pairs
        rows = torch.arange(B)[:, None]
        q_keys, y = keys.view(B, D * P)[rows, where], values.view(B, D * P)[rows, where]
        keys = torch.cat([keys, q_keys[..., None]], -1)  # (B, D, L)
        values = torch.cat([values, values.new_zeros(B, D, 1)], -1)
        return {"keys": keys, "values": values, "y": y, "far": ~near}


def _window(model: MemoryRecallModel, keys: Tensor, values: Tensor, bank: KNNMemory) -> tuple[Tensor, Tensor, Tensor]:
    """One window through the model with ``bank`` as its memory: logits ``(B, n_values)``, its keys and values."""
    assert isinstance(model.attention, MemorizingAttention)
    h = model.embed(keys, values)
    seg = model.attention.attend_segment(h, bank)
    return model.readout(h, seg.output), seg.keys, seg.values


def _fresh_bank(model: MemoryRecallModel, keys: Tensor, values: Tensor, upto: int, capacity: int) -> KNNMemory:
    """A bank of windows ``0 .. upto - 1`` of ``keys, values (B, D, L)`` recomputed with the current parameters."""
    assert isinstance(model.attention, MemorizingAttention)
    bank, L = KNNMemory(capacity), keys.shape[-1]
    if upto > 0:
        with torch.no_grad():
            flat_k, flat_v = keys[:, :upto].flatten(1), values[:, :upto].flatten(1)
            # every window embedded with its own query flag at its last slot, as when it was read
            h = model.embed(keys[:, :upto].flatten(0, 1), values[:, :upto].flatten(0, 1)).view(*flat_k.shape, -1)
            _, k, v = model.attention.project(h)
            bank.add(k, v, torch.arange(upto * L, device=flat_v.device))
    return bank


def train_streaming(
    model: MemoryRecallModel, task: StreamRecallTask, steps: int, batch_size: int = 32, lr: float = 1e-2,
    seed: int = 0, *, fresh: bool = False, log_every: int = 10, grad_clip: float | None = 1.0,
    device: torch.device | str = "cpu",
) -> History:
    """Train on documents read **one window per optimiser step**, the bank carried across steps.

    Step ``t`` reads window ``t mod D`` of the current batch of documents (a new batch every ``D``
    steps, the bank emptied): the window attends to itself and retrieves from the bank, the loss is
    the query's cross-entropy, Adam steps, and the window's keys and values (made by the parameters
    *before* that step) join the bank. So the bank holds keys from up to ``D - 1`` updates ago:
    **stale keys**, as in Wu et al.'s training. ``fresh=True`` is the control: before every step the
    bank is recomputed from the stored tokens with the current parameters (what the parallel form does).

    Returns the :class:`~attn.train.History` (loss, ``acc`` of the window's query, and ``acc_far`` on
    the far queries of the last ``log_every`` steps).
    """
    if not isinstance(model.attention, MemorizingAttention):
        raise TypeError("train_streaming needs a model whose mixer is the memorizing layer ('knn')")
    gen = set_seed(seed)
    D, L = task.segments, task.segment
    hist = History()
    with cpu_threads(1 if torch.device(device).type == "cpu" else None):
        model.to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        bank = KNNMemory(task.length)
        doc: dict[str, Tensor] = {}
        far_hits: list[float] = []
        for step in range(1, steps + 1):
            s = (step - 1) % D
            if s == 0:
                doc = {k: v.to(device) for k, v in task.sample(batch_size, gen).items()}
                bank = KNNMemory(task.length)
            if fresh:
                bank = _fresh_bank(model, doc["keys"], doc["values"], s, task.length)
            logits, k, v = _window(model, doc["keys"][:, s], doc["values"][:, s], bank)
            loss = F.cross_entropy(logits, doc["y"][:, s])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            if not fresh:
                bank.add(k, v, torch.arange(s * L, (s + 1) * L, device=k.device))  # made by the old parameters
            correct = logits.argmax(-1) == doc["y"][:, s]
            far = doc["far"][:, s]
            if far.any():
                far_hits.append(float(correct[far].float().mean()))
            if step % log_every == 0 or step == steps:
                metrics = {"acc": float(correct.float().mean())}
                if far_hits:
                    metrics["acc_far"] = sum(far_hits) / len(far_hits)
                hist.log(step, float(loss.detach()), metrics)
                far_hits = []
        model.eval()
    return hist


@torch.no_grad()
def evaluate_streaming(
    model: MemoryRecallModel, task: StreamRecallTask, batch_size: int = 256, seed: int = 12345
) -> dict[str, float]:
    """Held-out accuracy on fresh documents read window by window (the bank filled by the trained model).

    ``acc_far``: the queries whose pair lies in an earlier window; ``acc_near``: in their own window.
    """
    model.eval()
    dev = next(model.parameters()).device
    doc = {k: v.to(dev) for k, v in task.sample(batch_size, torch.Generator().manual_seed(seed)).items()}
    bank, L, hits = KNNMemory(task.length), task.segment, []
    for s in range(task.segments):
        logits, k, v = _window(model, doc["keys"][:, s], doc["values"][:, s], bank)
        bank.add(k, v, torch.arange(s * L, (s + 1) * L, device=dev))
        hits.append(logits.argmax(-1) == doc["y"][:, s])
    correct, far = torch.stack(hits, 1), doc["far"]
    return {"acc_far": float(correct[far].float().mean()), "acc_near": float(correct[~far].float().mean())}
