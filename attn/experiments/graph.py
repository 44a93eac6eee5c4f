"""Chapter 17's experiments (graph attention): the node classifier, the SBM and lookup graphs, the loss, the own tasks.

The layers are in :mod:`attn.graph`; here, what the chapter does with them:
:class:`NodeClassifier` (two graph layers, as in the GAT paper),
:func:`sbm_graphs` (noisy-feature stochastic block models), :func:`lookup_graphs`
(Brody et al.'s DictionaryLookup), :func:`node_loss`, and the comparison's own
tasks for ``gat`` and ``gatv2`` (:data:`OWN_TASKS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..graph import LAYERS, GraphAttentionOutput, attention_rows
from ..registry import OwnTask
from . import sized

__all__ = ["NodeClassifier", "sbm_graphs", "lookup_graphs", "node_loss", "make_task", "OWN_TASKS",
           "TASK_CLASSES", "TASK_DEGREE", "TASK_FEATURES"]


class NodeClassifier(nn.Module):
    """Two graph layers, as in the GAT paper: ``heads`` concatenated heads + ELU, then one averaged output layer.

    ``kind`` is ``"gat"``, ``"gatv2"`` or ``"mean"`` (the no-attention baseline).
    ``forward(x (N, F), edge_index (2, E)) -> logits (N, num_classes)``. A
    linear skip from the input keeps a node's own features available even
    where its neighbours outvote it (the same for every kind).
    """

    def __init__(self, kind: str, in_channels: int, num_classes: int, hidden: int = 8, heads: int = 4,
                 dropout: float = 0.0, add_self_loops: bool = True) -> None:
        super().__init__()
        if kind not in LAYERS:
            raise ValueError(f"kind must be one of {sorted(LAYERS)}, got {kind!r}")
        layer = LAYERS[kind]
        self.kind = kind
        self.conv1 = layer(in_channels, hidden, heads=heads, dropout=dropout, add_self_loops=add_self_loops)
        self.conv2 = layer(heads * hidden, num_classes, heads=1, concat=False, dropout=dropout, add_self_loops=add_self_loops)
        self.skip = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = F.elu(self.conv1(x, edge_index).output)
        return self.conv2(h, edge_index).output + self.skip(x)

    def attention(self, x: Tensor, edge_index: Tensor) -> GraphAttentionOutput:
        """The first layer's output with its weights ``(E', heads)``."""
        return self.conv1(x, edge_index, need_weights=True)


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
    """Cross-entropy over the labelled nodes (``y >= 0``) and their accuracy."""
    logits = model(batch["x"], batch["edge_index"])
    y = batch["y"]
    loss = F.cross_entropy(logits, y, ignore_index=-100)
    keep = y >= 0
    acc = (logits.argmax(-1)[keep] == y[keep]).float().mean()
    return loss, {"acc": float(acc)}


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
