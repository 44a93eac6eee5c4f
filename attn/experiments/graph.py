"""Chapter 17's experiments (graph attention): node classifiers, the tasks, the multi-seed runner, the karate club.

The layers are in :mod:`attn.graph`; here, what the chapter does with them:
:class:`NodeClassifier` (two graph layers, as in the GAT paper) and
:class:`NodeMLP` (no graph: the floor), :func:`sbm_graphs` (noisy-feature
stochastic block models), :func:`block_match_graphs` (a block model where only
matching a neighbour's block with one's own pays), :func:`lookup_graphs`
(Brody et al.'s DictionaryLookup), :func:`karate_club` (Zachary 1977, written
out below, no download), :func:`train_arms` (every arm on the same seeds,
batches and budget), :func:`attention_entropy`, :func:`node_loss`, and the
comparison's own tasks for ``gat`` and ``gatv2`` (:data:`OWN_TASKS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..graph import LAYERS, GraphAttentionOutput, attention_rows
from ..registry import OwnTask
from . import sized

__all__ = ["NodeClassifier", "NodeMLP", "LookupModel", "sbm_graphs", "block_match_graphs", "lookup_graphs", "node_loss",
           "KARATE_EDGES", "KARATE_FACTION", "karate_club", "karate_split", "train_arms", "ArmRuns",
           "attention_entropy", "attention_share", "make_task", "OWN_TASKS", "TASK_CLASSES", "TASK_DEGREE", "TASK_FEATURES"]


class NodeClassifier(nn.Module):
    """Two graph layers, as in the GAT paper: ``heads`` concatenated heads + ELU, then one averaged output layer.

    ``kind`` is ``"gat"``, ``"gatv2"`` or ``"mean"`` (the no-attention baseline).
    ``forward(x (N, F), edge_index (2, E), edge_attr=None) -> logits (N, num_classes)``. A
    linear skip from the input keeps a node's own features available even
    where its neighbours outvote it (the same for every kind). ``edge_dim``
    (GATv2 only) makes both layers read edge attributes ``(E, edge_dim)`` in their scores.
    """

    def __init__(self, kind: str, in_channels: int, num_classes: int, hidden: int = 8, heads: int = 4,
                 dropout: float = 0.0, add_self_loops: bool = True, edge_dim: int | None = None) -> None:
        super().__init__()
        if kind not in LAYERS:
            raise ValueError(f"kind must be one of {sorted(LAYERS)}, got {kind!r}")
        if edge_dim is not None and kind != "gatv2":
            raise ValueError(f"edge_dim needs kind='gatv2' (the layer that reads edge attributes), got {kind!r}")
        layer = LAYERS[kind]
        extra: dict[str, Any] = {} if edge_dim is None else {"edge_dim": edge_dim}
        self.kind = kind
        self.conv1 = layer(in_channels, hidden, heads=heads, dropout=dropout, add_self_loops=add_self_loops, **extra)
        self.conv2 = layer(heads * hidden, num_classes, heads=1, concat=False, dropout=dropout,
                           add_self_loops=add_self_loops, **extra)
        self.skip = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        h = F.elu(self.conv1(x, edge_index, edge_attr=edge_attr).output)
        return self.conv2(h, edge_index, edge_attr=edge_attr).output + self.skip(x)

    def attention(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> GraphAttentionOutput:
        """The first layer's output with its weights ``(E', heads)``."""
        return self.conv1(x, edge_index, edge_attr=edge_attr, need_weights=True)


class NodeMLP(nn.Module):
    """The floor: each node classified from its own features only, ``x (N, F) -> logits (N, classes)``.

    ``Linear -> ELU -> Linear``; ``edge_index`` is accepted and ignored (the
    same call as :class:`NodeClassifier`).
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, hidden), nn.ELU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.net(x)


class LookupModel(nn.Module):
    """DictionaryLookup's model (Brody et al. 2022): one graph layer (one head, no self-loops), ELU, a linear read-out.

    ``forward(x (N, 2k + 1), edge_index) -> logits (N, k)``; ``conv`` is the
    attention layer, so ``model.conv(x, ei, need_weights=True)`` gives its weights.
    """

    def __init__(self, kind: str, k: int, width: int = 16) -> None:
        super().__init__()
        if kind not in LAYERS:
            raise ValueError(f"kind must be one of {sorted(LAYERS)}, got {kind!r}")
        self.conv = LAYERS[kind](2 * k + 1, width, heads=1, add_self_loops=False)
        self.out = nn.Linear(width, k)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.out(F.elu(self.conv(x, edge_index).output))


def sbm_graphs(num_graphs: int, nodes: int, generator: torch.Generator, classes: int = 4, degree: int = 8,
               homophily: float = 0.5, scale: float = 1.5, noise: tuple[float, float] = (0.5, 3.0),
               clean: float = 0.5) -> dict[str, Tensor]:
    """A batch of graphs from a directed stochastic block model whose nodes have clean or noisy features.

    Each graph has ``nodes`` nodes in ``classes`` equal classes. Every node
    draws ``degree`` in-neighbours: each from its own class with probability
    ``homophily``, else from a uniformly chosen other class (uniform within
    the class). A fraction ``clean`` of the nodes measure their class well,
    the others badly: ``x_i = [scale * onehot(y_i) + sigma_i * N(0, I), c_i]``
    with ``sigma_i = noise[0]`` where the flag ``c_i = 1`` (clean), ``noise[1]``
    where ``c_i = 0``. A good aggregator listens to the clean neighbours of
    the node's own class.

    Returns the disjoint union of the graphs: ``x`` ``(G nodes, classes + 1)``,
    ``edge_index`` ``(2, G nodes degree)``, ``y`` ``(G nodes,)`` class ids,
    ``graph`` ``(G nodes,)`` the graph of each node.
    """
    if nodes % classes:
        raise ValueError(f"nodes ({nodes}) must be a multiple of classes ({classes})")
    if not 0.0 <= homophily <= 1.0:
        raise ValueError(f"homophily must be in [0, 1], got {homophily}")
    per = nodes // classes
    g = generator
    y = torch.stack([torch.randperm(nodes, generator=g) for _ in range(num_graphs)]) % classes   # (G, n)
    members = y.argsort(dim=1, stable=True).view(num_graphs, classes * per)                     # node ids by class
    same = torch.rand(num_graphs, nodes, degree, generator=g) < homophily
    other = (y[..., None] + torch.randint(1, max(classes, 2), (num_graphs, nodes, degree), generator=g)) % classes
    src_class = torch.where(same, y[..., None], other)                                         # (G, n, d)
    pick = torch.randint(0, per, (num_graphs, nodes, degree), generator=g)
    src = torch.gather(members, 1, (src_class * per + pick).view(num_graphs, -1))             # (G, n d)
    offset = (torch.arange(num_graphs) * nodes)[:, None]
    dst = torch.arange(nodes).repeat_interleave(degree)[None, :]
    edge_index = torch.stack([(src + offset).reshape(-1), (dst + offset).reshape(-1)])
    y = y.reshape(-1)
    flag = torch.rand(y.shape[0], generator=g) < clean
    sigma = torch.where(flag, noise[0], noise[1])[:, None]
    x = scale * F.one_hot(y, classes).float() + sigma * torch.randn(y.shape[0], classes, generator=g)
    x = torch.cat([x, flag[:, None].float()], 1)
    graph = torch.arange(num_graphs).repeat_interleave(nodes)
    return {"x": x, "edge_index": edge_index, "y": y, "graph": graph}


def block_match_graphs(num_graphs: int, nodes: int, generator: torch.Generator, blocks: int = 4, degree: int = 8,
                       homophily: float = 0.5, noise: float = 1.0) -> dict[str, Tensor]:
    r"""A block model in which only a neighbour's *match* with the node pays: a task for dynamic attention.

    The edges are :func:`sbm_graphs`'s (``blocks`` equal blocks, ``degree``
    in-neighbours, each from the node's own block with probability
    ``homophily``). Every node shows its block ``b_i`` (one-hot, exact) and a
    noisy view of its **label** ``y_i = \pi(b_i)``, where the permutation
    :math:`\pi` of the labels is drawn afresh for every graph:

    .. math::

        x_i = [\,\mathrm{onehot}(b_i),\; \mathrm{onehot}(y_i) + \sigma \varepsilon_i\,],
        \qquad \varepsilon_i \sim \mathcal{N}(0, I).

    The neighbours of the node's own block carry its label; the others carry
    other labels. Since :math:`\pi` is new in every graph, no block (and no
    feature value) is worth more than another on its own: a static score
    (GAT, one ranking of the neighbours for every node) gains nothing over a
    mean, while a score that compares ``b_j`` with ``b_i`` (GATv2) can average
    the own-block neighbours only. Mean aggregation still profits from the
    graph (with ``homophily`` above ``1 / blocks`` the neighbourhood mean leans
    towards the node's label), so it is a real baseline, not one at chance.

    Returns the disjoint union: ``x`` ``(G nodes, 2 blocks)``, ``edge_index``
    ``(2, G nodes degree)``, ``y`` ``(G nodes,)`` labels, ``block`` ``(G nodes,)``,
    ``graph`` ``(G nodes,)``.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    base = sbm_graphs(num_graphs, nodes, generator, classes=blocks, degree=degree, homophily=homophily)
    block = base["y"]
    perm = torch.stack([torch.randperm(blocks, generator=generator) for _ in range(num_graphs)])   # (G, blocks)
    y = torch.gather(perm, 1, block.view(num_graphs, nodes)).view(-1)
    view = F.one_hot(y, blocks).float() + noise * torch.randn(y.shape[0], blocks, generator=generator)
    x = torch.cat([F.one_hot(block, blocks).float(), view], 1)
    return {"x": x, "edge_index": base["edge_index"], "y": y, "block": block, "graph": base["graph"]}


def lookup_graphs(num_graphs: int, k: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Brody et al.'s DictionaryLookup: ``k`` key nodes, ``k`` query nodes, every key -> every query.

    Key node ``a`` carries ``[onehot(a), onehot(value_a), 0]``; query node
    ``a`` carries ``[onehot(a), 0, 1]``. A query must output the value of the
    key with its own id: its attention must peak on a different key for every
    query, which a static (GAT) score cannot do. No self-loops are meant to be
    added. ``y`` is the target value (``-100``, ignored, on key nodes).
    """
    eye = torch.eye(k)
    xs, ys, edges = [], [], []
    for gi in range(num_graphs):
        keys = torch.randperm(k, generator=generator)
        values = torch.randperm(k, generator=generator)
        key_x = torch.cat([eye[keys], eye[values], torch.zeros(k, 1)], 1)
        queries = torch.randperm(k, generator=generator)
        query_x = torch.cat([eye[queries], torch.zeros(k, k), torch.ones(k, 1)], 1)
        target = values[keys.argsort()][queries]                                 # value of the key with the query's id
        xs += [key_x, query_x]
        ys += [torch.full((k,), -100), target]
        base = gi * 2 * k
        src = torch.arange(k).repeat(k) + base
        dst = torch.arange(k).repeat_interleave(k) + k + base
        edges.append(torch.stack([src, dst]))
    return {"x": torch.cat(xs), "edge_index": torch.cat(edges, 1), "y": torch.cat(ys)}


def node_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy over the labelled nodes (``y >= 0``) and their accuracy (``edge_attr`` passed on when in the batch)."""
    extra = {"edge_attr": batch["edge_attr"]} if "edge_attr" in batch else {}
    logits = model(batch["x"], batch["edge_index"], **extra)
    y = batch["y"]
    loss = F.cross_entropy(logits, y, ignore_index=-100)
    keep = y >= 0
    acc = (logits.argmax(-1)[keep] == y[keep]).float().mean()
    return loss, {"acc": float(acc)}


# --------------------------------------------------------------------------- Zachary's karate club

#: The 78 friendships of Zachary's karate club (Zachary 1977, "An information flow model for conflict and
#: fission in small groups", J. Anthropological Research 33(4), 452-473: the 34 x 34 matrix of ties
#: outside the club), as undirected pairs of 0-based member ids (member 1 of the paper is id 0, the
#: instructor "Mr. Hi"; member 34 is id 33, the club's officer/administrator "John A.").
KARATE_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), (0, 10), (0, 11), (0, 12), (0, 13),
    (0, 17), (0, 19), (0, 21), (0, 31), (1, 2), (1, 3), (1, 7), (1, 13), (1, 17), (1, 19), (1, 21), (1, 30),
    (2, 3), (2, 7), (2, 8), (2, 9), (2, 13), (2, 27), (2, 28), (2, 32), (3, 7), (3, 12), (3, 13), (4, 6),
    (4, 10), (5, 6), (5, 10), (5, 16), (6, 16), (8, 30), (8, 32), (8, 33), (9, 33), (13, 33), (14, 32),
    (14, 33), (15, 32), (15, 33), (18, 32), (18, 33), (19, 33), (20, 32), (20, 33), (22, 32), (22, 33),
    (23, 25), (23, 27), (23, 29), (23, 32), (23, 33), (24, 25), (24, 27), (24, 31), (25, 31), (26, 29),
    (26, 33), (27, 33), (28, 31), (28, 33), (29, 32), (29, 33), (30, 32), (30, 33), (31, 32), (31, 33),
    (32, 33),
)

#: The club each member joined after the split (Zachary 1977): 0 = Mr. Hi's new club (id 0), 1 = the officer's (id 33).
KARATE_FACTION: tuple[int, ...] = (
    0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
)


def karate_club() -> dict[str, Tensor]:
    """Zachary's karate club as a graph: 34 nodes, the 78 ties in both directions (156 edges), 2 factions.

    Features are one-hot member ids, ``x = I_34`` (the graph is all there is to
    learn from, as in Kipf and Welling's karate demonstration). Returns
    ``x`` ``(34, 34)``, ``edge_index`` ``(2, 156)``, ``y`` ``(34,)`` factions.
    """
    pairs = torch.tensor(KARATE_EDGES).T                                         # (2, 78)
    edge_index = torch.cat([pairs, pairs.flip(0)], 1)
    n = len(KARATE_FACTION)
    return {"x": torch.eye(n), "edge_index": edge_index, "y": torch.tensor(KARATE_FACTION)}


def karate_split(seed: int, per_class: int = 2) -> tuple[Tensor, Tensor]:
    """Few labels: ``per_class`` members of each faction labelled, drawn with ``seed``; the others are the test set.

    Returns ``(train_y, test_y)``, each ``(34,)`` with ``-100`` (ignored by
    :func:`node_loss`) where the node is not in that set.
    """
    y = karate_club()["y"]
    g = torch.Generator().manual_seed(seed)
    chosen = torch.cat([(y == c).nonzero()[:, 0][torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
                        for c in (0, 1)])
    train_y = torch.full_like(y, -100)
    train_y[chosen] = y[chosen]
    test_y = y.clone()
    test_y[chosen] = -100
    return train_y, test_y


# --------------------------------------------------------------------------- every arm, the same seeds and batches

Sample = Callable[[int, torch.Generator], dict[str, Tensor]]


@dataclass
class ArmRuns:
    """What :func:`train_arms` returns: per arm, one held-out value per seed, the training curves, the models.

    ``values[arm]`` holds the held-out accuracy per seed (seed order);
    ``curves[arm]`` one list of ``(step, training-batch accuracy)`` per seed;
    ``models[arm]`` the trained models, one per seed.
    """

    values: dict[str, list[float]] = field(default_factory=dict)
    curves: dict[str, list[list[tuple[int, float]]]] = field(default_factory=dict)
    models: dict[str, list[nn.Module]] = field(default_factory=dict)

    def plateaued(self, arm: str, last: int = 100, tol: float = 0.03) -> bool:
        """Whether every seed's logged accuracy moved less than ``tol`` (mean of the last ``last`` steps vs the ``last`` before)."""
        for curve in self.curves[arm]:
            end = curve[-1][0]
            recent = [a for s, a in curve if s > end - last]
            before = [a for s, a in curve if end - 2 * last < s <= end - last]
            if not recent or not before or abs(sum(recent) / len(recent) - sum(before) / len(before)) > tol:
                return False
        return True


def train_arms(arms: Mapping[str, Callable[[], nn.Module]], data: Callable[[int], tuple[Sample, Sample]],
               seeds: Sequence[int], steps: int, batch_size: int, lr: float, eval_batch: int = 32,
               log_every: int = 10, device: torch.device | str = "cpu") -> ArmRuns:
    """Train every arm on every seed with the same batches and budget; held-out accuracy per seed.

    ``arms`` maps a name to a model factory (called after seeding, so the
    seed fixes the initial weights). ``data(seed)`` returns ``(sample,
    eval_sample)``, each ``(batch_size, generator) -> batch``; training draws
    its batches from a generator seeded with ``seed``, so every arm sees the
    same graphs (drawn once per seed and replayed to the later arms, which
    saves the drawing, not a single batch); the accuracy is :func:`attn.train.evaluate`'s on one
    held-out batch of ``eval_batch`` drawn from ``eval_sample``.
    """
    from ..train import evaluate, set_seed, train

    runs = ArmRuns()
    drawn: dict[int, list[dict[str, Tensor]]] = {seed: [] for seed in seeds}  # each seed's batches, drawn once

    def replay(seed: int, sample: Sample) -> Sample:
        """The seed's i-th batch: drawn by the first arm, replayed to the others (the same graphs, drawn once)."""
        count = [0]

        def draw(batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
            i, count[0] = count[0], count[0] + 1
            if i == len(drawn[seed]):
                drawn[seed].append(sample(batch_size, generator))
            return drawn[seed][i]

        return draw

    for name, make in arms.items():
        runs.values[name], runs.curves[name], runs.models[name] = [], [], []
        for seed in seeds:
            sample, eval_sample = data(seed)
            sample = replay(seed, sample)
            set_seed(seed)
            model = make()
            hist = train(model, sample, node_loss, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         log_every=log_every, progress=False, device=device)
            acc = evaluate(model, eval_sample, node_loss, batch_size=eval_batch, device=device)["acc"]
            runs.values[name].append(acc)
            runs.curves[name].append(list(zip(hist.step, hist.metrics["acc"], strict=True)))
            runs.models[name].append(model.cpu())
    return runs


def attention_entropy(weights: Tensor, edge_index: Tensor, num_nodes: int) -> Tensor:
    r"""Entropy of every node's attention distribution, per head: ``(E, H)`` weights -> ``(N, H)`` nats.

    :math:`H_i = -\sum_{j \in N(i)} \alpha_{ij} \log \alpha_{ij}`, summed per
    target with a scatter-sum (``0 log 0 = 0``). A uniform distribution over
    ``d`` edges has :math:`\log d`; a one-hot one has 0.
    """
    terms = -torch.where(weights > 0, weights * weights.clamp_min(1e-30).log(), weights.new_zeros(()))
    return weights.new_zeros(num_nodes, weights.shape[1]).index_add(0, edge_index[1], terms)



def attention_share(weights: Tensor, edge_index: Tensor, num_nodes: int, selected: Tensor) -> Tensor:
    """Per node, the attention (mean over heads) on its ``selected`` incoming edges: ``(E, H)``, ``(E,)`` bool -> ``(N,)``.

    E.g. ``selected = block[src] == block[dst]`` gives the share of each
    node's weight that stays in its own block (self-loop included).
    """
    w = weights.mean(1) * selected.to(weights.dtype)
    return weights.new_zeros(num_nodes).index_add(0, edge_index[1], w)


TASK_CLASSES, TASK_DEGREE = 4, 8
TASK_FEATURES = TASK_CLASSES + 1


def make_task(size: str, kind: str = "gat") -> OwnTask[NodeClassifier]:
    """The comparison's graph task at ``size`` (``attn.experiments.SIZES``): node classification on fresh SBM graphs.

    A batch of ``batch_size`` graphs (4 classes, in-degree 8, homophily 0.5,
    half the nodes with noisy features) is one disjoint union; the model is
    :class:`NodeClassifier`. The cost sweep times one layer (4 heads of 8, the
    task's 5 input features) on a random graph of in-degree 16 at each sweep size
    in nodes. Graphs from :func:`sbm_graphs`. ``weights`` gives the first layer's attention as padded rows
    (:func:`attention_rows`).
    """
    nodes, steps, sizes = sized(  # nodes per graph, steps, cost-sweep sizes in nodes
        size,
        quick=(24, 30, (256, 512, 1024)),
        book=(48, 150, (1024, 4096, 16384)),
        full=(64, 300, (1024, 4096, 16384, 65536)),
        large=(64, 600, (4096, 16384, 65536, 262144)),
    )
    if kind not in ("gat", "gatv2"):
        raise ValueError(f"kind must be 'gat' or 'gatv2', got {kind!r}")

    def sample(batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        b = sbm_graphs(batch_size, nodes, generator, classes=TASK_CLASSES, degree=TASK_DEGREE)
        return {"x": b["x"], "edge_index": b["edge_index"], "y": b["y"]}

    def inputs(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, TASK_FEATURES, generator=generator)
        src = torch.randint(0, n, (n * 16,), generator=generator)
        dst = torch.arange(n).repeat_interleave(16)
        return x, torch.stack([src, dst])

    def weights(model: NodeClassifier, batch: dict[str, Tensor]) -> Tensor:
        att = model.attention(batch["x"], batch["edge_index"])
        assert att.weights is not None  # attention() asks for them
        rows = attention_rows(att.weights, att.edge_index, batch["x"].shape[0])
        return rows.reshape(-1, rows.shape[-1])

    model = NodeClassifier(kind, TASK_FEATURES, TASK_CLASSES, hidden=8, heads=4)
    layer = LAYERS[kind](TASK_FEATURES, 8, heads=4)
    return OwnTask(
        description=f"node classification, {TASK_CLASSES}-class SBM graphs of {nodes} nodes, half with noisy features",
        model=model, sample=sample, loss=node_loss, layer=layer, inputs=inputs, sizes=sizes, size_unit="nodes",
        steps=steps, batch_size=4, lr=2e-2, log_every=10, target_acc=0.6, eval_batch=64, weights=weights,
    )


def _own(kind: str) -> Callable[[str], OwnTask[NodeClassifier]]:
    def make(size: str) -> OwnTask[NodeClassifier]:
        return make_task(size, kind)

    return make


#: the comparison's own tasks of chapter 17, by mechanism name: ``factory(size) -> OwnTask``
OWN_TASKS: dict[str, Callable[[str], OwnTask[NodeClassifier]]] = {"gat": _own("gat"), "gatv2": _own("gatv2")}
