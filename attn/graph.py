r"""Chapter 17 -- Graph attention: each node attends over its incoming edges (GAT, GATv2).

A graph of ``N`` nodes with features ``x`` ``(N, F)`` and an **edge list**
``edge_index`` ``(2, E)``, rows ``[source; target]`` (an edge ``j -> i`` carries
``j``'s message to ``i``, as in PyTorch Geometric). Node ``i`` attends over its
in-neighbours ``N(i)`` (plus itself when self-loops are added). With ``H``
heads of width ``C`` and projections ``W`` ``(H C, F)``:

**GAT** (Velickovic et al. 2018), the *static* score

.. math::

    e_{ij} = \operatorname{LeakyReLU}\big(a_{dst}^\top W h_i + a_{src}^\top W h_j\big),

**GATv2** (Brody et al. 2022), the *dynamic* score

.. math::

    e_{ij} = a^\top \operatorname{LeakyReLU}\big(W_{dst} h_i + W_{src} h_j\big)
           = a^\top \operatorname{LeakyReLU}\big(W [h_i \,\|\, h_j]\big),

then, for both, a softmax over each node's incoming edges (a *segment*
softmax: a scatter-max, ``exp``, a scatter-sum) and a weighted sum of messages:

.. math::

    \alpha_{ij} = \frac{\exp e_{ij}}{\sum_{k \in N(i)} \exp e_{ik}}, \qquad
    h'_i = \big\Vert_{h=1}^{H} \sum_{j \in N(i)} \alpha^{h}_{ij} W^{h}_{src} h_j
    \quad(\text{or the mean over heads}) \;+\; b .

Everything is computed per edge: ``O(E H C)`` time and memory, never an
``N x N`` matrix (:func:`dense_graph_attention` is the dense masked baseline,
for checking and benchmarking only). Graphs of a batch are one disjoint union
(node ids offset per graph), the PyTorch Geometric convention.

Shapes: ``x`` ``(N, in_channels)``; ``edge_index`` ``(2, E)`` integer ids in
``[0, N)``; output ``(N, heads * out_channels)`` (``concat=True``) or
``(N, out_channels)``; attention weights ``(E', heads)`` over the edges actually
used (``E'`` includes the self-loops), returned with those edges.

Velickovic, Cucurull, Casanova, Romero, Lio, Bengio, "Graph Attention
Networks", ICLR 2018. Brody, Alon, Yahav, "How Attentive are Graph Attention
Networks?", ICLR 2022.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_tensor
from .core import masked_softmax
from .registry import OwnTask, register

__all__ = [
    "GraphAttentionOutput",
    "GraphAttention",
    "GraphAttentionV2",
    "MeanAggregation",
    "NodeClassifier",
    "check_graph",
    "prepare_edges",
    "segment_softmax",
    "aggregate",
    "edge_chunks",
    "dense_graph_attention",
    "sbm_graphs",
    "lookup_graphs",
    "node_loss",
    "attention_rows",
    "make_task",
]


class GraphAttentionOutput(NamedTuple):
    """``output`` ``(N, out)``; ``weights`` ``(E', heads)`` or ``None``; ``edge_index`` ``(2, E')``: the edges attended over."""

    output: Tensor
    weights: Tensor | None
    edge_index: Tensor


# --------------------------------------------------------------------------- input checks


def check_graph(x: object, edge_index: object, in_channels: int | None = None) -> tuple[Tensor, Tensor]:
    """``x`` must be ``(num_nodes, in_channels)`` floating point; ``edge_index`` ``(2, num_edges)`` integer ids in range.

    Returns ``(x, edge_index)`` with ``edge_index`` as int64.

    Raises:
        TypeError: not tensors, a non-float ``x`` or a non-integer ``edge_index``.
        ValueError: wrong ranks or widths, or a node id outside ``[0, num_nodes)``.
    """
    width = "in_channels" if in_channels is None else f"in_channels={in_channels}"
    shape = f"(num_nodes, {width})"
    x = check_tensor(x, "x", shape, 2)
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(f"x must have shape {shape}, got {tuple(x.shape)} (last dimension {x.shape[1]} != {in_channels})")
    eshape = "(2, num_edges) with rows [source; target]"
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor of shape {eshape}, got {type(edge_index).__name__}")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise TypeError(f"edge_index must be an integer tensor (node ids) of shape {eshape}, got dtype {edge_index.dtype}")
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape {eshape}, got {tuple(edge_index.shape)} "
                         "(an N x N adjacency matrix? convert it with adj.nonzero().T)")
    if edge_index.device != x.device:
        raise ValueError(f"edge_index is on {edge_index.device} but x is on {x.device}")
    n = x.shape[0]
    if edge_index.numel():
        lo, hi = int(edge_index.min()), int(edge_index.max())
        if lo < 0 or hi >= n:
            bad = hi if hi >= n else lo
            raise ValueError(f"edge_index holds node id {bad}, but x has {n} nodes (valid ids are 0..{n - 1})")
    return x, edge_index.long()


def prepare_edges(edge_index: Tensor, num_nodes: int, add_self_loops: bool) -> Tensor:
    """The edges attended over: with ``add_self_loops``, existing self-loops are dropped and one per node appended.

    (The order of PyTorch Geometric's ``remove_self_loops`` + ``add_self_loops``,
    so returned weights line up with its ``return_attention_weights``.)
    """
    if not add_self_loops:
        return edge_index
    keep = edge_index[0] != edge_index[1]
    loops = torch.arange(num_nodes, device=edge_index.device).expand(2, num_nodes)
    return torch.cat([edge_index[:, keep], loops], dim=1)


# --------------------------------------------------------------------------- the two edge-list operations


def segment_softmax(scores: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    """Softmax of ``scores`` ``(E, H)`` over the edges that share a target ``index`` ``(E,)``.

    Per target node: subtract its maximum (a scatter-max, for stability; it
    cancels in the ratio, so it is taken without gradient), exponentiate, and
    divide by the scatter-sum. Nodes with no incoming edge simply have no rows.
    """
    heads = scores.shape[1]
    peak = scores.new_full((num_nodes, heads), float("-inf")).scatter_reduce(
        0, index[:, None].expand(-1, heads), scores.detach(), reduce="amax")      # (N, H)
    ex = (scores - peak.index_select(0, index)).exp()                             # (E, H)
    denom = scores.new_zeros(num_nodes, heads).index_add(0, index, ex)            # (N, H), >= 1 where used
    return ex / denom.index_select(0, index)


#: edges per chunk times heads times channels: bounds the per-edge temporaries (8 MiB of fp32)
CHUNK_ELEMENTS = 1 << 21


def edge_chunks(num_edges: int, per_edge: int) -> list[slice]:
    """Slices of the edge list, each holding at most :data:`CHUNK_ELEMENTS` ``/ per_edge`` edges."""
    size = max(1, CHUNK_ELEMENTS // max(per_edge, 1))
    return [slice(s, s + size) for s in range(0, num_edges, size)] or [slice(0, 0)]


def aggregate(alpha: Tensor, values: Tensor, edge_index: Tensor, num_nodes: int) -> Tensor:
    """``out_i = sum over edges j -> i of alpha_ij * values_j``: ``alpha`` ``(E, H)``, ``values`` ``(N, H, C)`` -> ``(N, H, C)``.

    The messages are formed and summed chunk by chunk of edges, so the
    ``(E, H, C)`` message tensor never exists at once: on a CPU, allocating and
    filling it (tens of MiB for a million edges) costs more than the sums.
    """
    src, dst = edge_index
    out = values.new_zeros(num_nodes, *values.shape[1:])
    for part in edge_chunks(src.numel(), values[0].numel() if len(values) else 1):
        messages = values.index_select(0, src[part]) * alpha[part].unsqueeze(-1)   # (chunk, H, C)
        out = out.index_add_(0, dst[part], messages)
    return out


# --------------------------------------------------------------------------- the layers


class _EdgeAttention(nn.Module):
    """Shared forward of the graph attention layers: checks, edges, scores, segment softmax, dropout, sum, heads, bias."""

    def __init__(self, in_channels: int, out_channels: int, heads: int = 1, concat: bool = True,
                 negative_slope: float = 0.2, dropout: float = 0.0, add_self_loops: bool = True, bias: bool = True) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.concat, self.negative_slope, self.dropout = concat, negative_slope, dropout
        self.add_self_loops = add_self_loops
        self.out_dim = heads * out_channels if concat else out_channels
        self.bias = nn.Parameter(torch.zeros(self.out_dim)) if bias else None

    def edge_scores(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """``(values (N, H, C), scores (E, H))``: what is summed, and the unnormalised score of each edge."""
        raise NotImplementedError

    def forward(self, x: Tensor, edge_index: Tensor, need_weights: bool = False) -> GraphAttentionOutput:
        """``x`` ``(N, in_channels)``, ``edge_index`` ``(2, E)`` rows ``[source; target]`` -> :class:`GraphAttentionOutput`."""
        x, edge_index = check_graph(x, edge_index, self.in_channels)
        n = x.shape[0]
        edges = prepare_edges(edge_index, n, self.add_self_loops)
        values, scores = self.edge_scores(x, edges)                               # (N, H, C), (E', H)
        alpha = segment_softmax(scores, edges[1], n)                              # (E', H)
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        out = aggregate(alpha, values, edges, n)                                  # (N, H, C)
        out = out.reshape(n, self.heads * self.out_channels) if self.concat else out.mean(1)
        if self.bias is not None:
            out = out + self.bias
        return GraphAttentionOutput(out, alpha if need_weights else None, edges)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, heads={self.heads}, concat={self.concat}, "
                f"negative_slope={self.negative_slope}, dropout={self.dropout}, add_self_loops={self.add_self_loops}")


def _make_task_gat(preset: str) -> OwnTask[NodeClassifier]:
    return make_task(preset, "gat")


def _make_task_gatv2(preset: str) -> OwnTask[NodeClassifier]:
    return make_task(preset, "gatv2")


@register("gat", paper="Velickovic et al. 2018", complexity="O(E H C)", chapter=17, data="graph",
          summary="static edge attention: LeakyReLU(a_dst.Wh_i + a_src.Wh_j), softmax over in-edges",
          task=_make_task_gat)
class GraphAttention(_EdgeAttention):
    r"""GAT layer: :math:`e_{ij} = \mathrm{LeakyReLU}(a_{dst}^\top W h_i + a_{src}^\top W h_j)`.

    The score splits into a target part and a source part, each computed once
    per node ``(N, H)`` and added per edge. Parameters are laid out as in
    ``torch_geometric.nn.GATConv``: ``lin.weight`` ``(H C, F)``, ``att_src`` and
    ``att_dst`` ``(1, H, C)``, ``bias`` ``(H C,)`` or ``(C,)``.

    Args:
        in_channels: node feature width ``F``.
        out_channels: width per head ``C``.
        heads: number of heads ``H``.
        concat: concatenate heads (``True``) or average them.
        negative_slope: LeakyReLU slope (0.2 in the paper).
        dropout: dropout on the attention weights during training.
        add_self_loops: each node also attends to itself (existing self-loops are replaced).
        bias: add a learned bias to the output.
    """

    def __init__(self, in_channels: int, out_channels: int, heads: int = 1, concat: bool = True,
                 negative_slope: float = 0.2, dropout: float = 0.0, add_self_loops: bool = True, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, heads, concat, negative_slope, dropout, add_self_loops, bias)
        self.lin = nn.Linear(in_channels, heads * out_channels, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        nn.init.xavier_uniform_(self.lin.weight)
        for a in (self.att_src, self.att_dst):
            nn.init.xavier_uniform_(a.view(heads, out_channels))

    def edge_scores(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        h = self.lin(x).view(-1, self.heads, self.out_channels)                   # (N, H, C)
        s_src = (h * self.att_src).sum(-1)                                        # (N, H): a_src . W h_j
        s_dst = (h * self.att_dst).sum(-1)                                        # (N, H): a_dst . W h_i
        scores = s_src.index_select(0, edge_index[0]) + s_dst.index_select(0, edge_index[1])  # (E, H)
        return h, F.leaky_relu(scores, self.negative_slope)


@register("gatv2", paper="Brody et al. 2022", complexity="O(E H C)", chapter=17, data="graph",
          summary="dynamic edge attention: a.LeakyReLU(W_dst h_i + W_src h_j), softmax over in-edges",
          task=_make_task_gatv2)
class GraphAttentionV2(_EdgeAttention):
    r"""GATv2 layer: :math:`e_{ij} = a^\top \mathrm{LeakyReLU}(W_{dst} h_i + W_{src} h_j)`.

    The nonlinearity sits *between* the projections and ``a``, so the ranking of
    the neighbours ``j`` can depend on the query node ``i``. Per edge it forms
    an ``(H, C)`` vector: ``O(E H C)`` for the scores too. Parameters as in
    ``torch_geometric.nn.GATv2Conv``: ``lin_src`` (its ``lin_l``) and ``lin_dst``
    (``lin_r``), each ``(H C, F)`` with a bias when ``bias``; ``att`` ``(1, H, C)``;
    the output ``bias``. ``share_weights`` uses one projection for both.
    """

    def __init__(self, in_channels: int, out_channels: int, heads: int = 1, concat: bool = True,
                 negative_slope: float = 0.2, dropout: float = 0.0, add_self_loops: bool = True, bias: bool = True,
                 share_weights: bool = False) -> None:
        super().__init__(in_channels, out_channels, heads, concat, negative_slope, dropout, add_self_loops, bias)
        self.lin_src = nn.Linear(in_channels, heads * out_channels, bias=bias)
        self.lin_dst = self.lin_src if share_weights else nn.Linear(in_channels, heads * out_channels, bias=bias)
        self.att = nn.Parameter(torch.empty(1, heads, out_channels))
        for lin in dict.fromkeys([self.lin_src, self.lin_dst]):  # one or two projections, in a fixed order
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.xavier_uniform_(self.att.view(heads, out_channels))

    def edge_scores(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        h_src = self.lin_src(x).view(-1, self.heads, self.out_channels)           # (N, H, C)
        h_dst = self.lin_dst(x).view(-1, self.heads, self.out_channels)
        src, dst = edge_index
        scores = []
        for part in edge_chunks(src.numel(), self.heads * self.out_channels):     # as in aggregate: bounded temporaries
            pair = h_src.index_select(0, src[part]) + h_dst.index_select(0, dst[part])  # (chunk, H, C)
            scores.append((F.leaky_relu(pair, self.negative_slope) * self.att).sum(-1))  # (chunk, H)
        return h_src, torch.cat(scores)


class MeanAggregation(_EdgeAttention):
    """The no-attention baseline: every incoming edge weighs ``1 / in-degree`` (all scores equal).

    ``h'_i = mean_{j in N(i)} W h_j + b`` (GraphSAGE-mean / GCN-like, without
    degree normalisation of the source). Same interface as the attention
    layers; ``weights`` are the uniform ``1 / deg``.
    """

    def __init__(self, in_channels: int, out_channels: int, heads: int = 1, concat: bool = True,
                 negative_slope: float = 0.2, dropout: float = 0.0, add_self_loops: bool = True, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, heads, concat, negative_slope, dropout, add_self_loops, bias)
        self.lin = nn.Linear(in_channels, heads * out_channels, bias=False)
        nn.init.xavier_uniform_(self.lin.weight)

    def edge_scores(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        h = self.lin(x).view(-1, self.heads, self.out_channels)
        return h, h.new_zeros(edge_index.shape[1], self.heads)


LAYERS: dict[str, type[_EdgeAttention]] = {"gat": GraphAttention, "gatv2": GraphAttentionV2, "mean": MeanAggregation}


# --------------------------------------------------------------------------- the dense baseline


def dense_graph_attention(layer: _EdgeAttention, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
    """Baseline: the same layer computed with an ``N x N`` boolean adjacency mask (``O(N^2 H)`` memory; GATv2 ``O(N^2 H C)``).

    ``adj[i, j]`` is True when the edge ``j -> i`` exists (True = may attend);
    the scores of *all* pairs are formed, masked and soft-maxed along ``j``.
    An adjacency matrix cannot hold duplicate edges: pass a graph without
    them. Attention dropout is not applied (use ``layer.eval()``).

    Returns ``(output (N, out), weights (H, N, N))``.
    """
    x, edge_index = check_graph(x, edge_index, layer.in_channels)
    n, heads, c = x.shape[0], layer.heads, layer.out_channels
    edges = prepare_edges(edge_index, n, layer.add_self_loops)
    adj = torch.zeros(n, n, dtype=torch.bool, device=x.device)
    adj[edges[1], edges[0]] = True                                               # (N_target, N_source)
    if isinstance(layer, GraphAttention):
        h = layer.lin(x).view(n, heads, c)
        s_src, s_dst = (h * layer.att_src).sum(-1), (h * layer.att_dst).sum(-1)  # (N, H)
        scores = F.leaky_relu(s_dst.T[:, :, None] + s_src.T[:, None, :], layer.negative_slope)  # (H, N, N)
        values = h
    elif isinstance(layer, GraphAttentionV2):
        h_src, h_dst = layer.lin_src(x).view(n, heads, c), layer.lin_dst(x).view(n, heads, c)
        pair = h_dst.permute(1, 0, 2)[:, :, None, :] + h_src.permute(1, 0, 2)[:, None, :, :]  # (H, N, N, C)
        scores = (F.leaky_relu(pair, layer.negative_slope) * layer.att.view(heads, 1, 1, c)).sum(-1)
        values = h_src
    elif isinstance(layer, MeanAggregation):
        values = layer.lin(x).view(n, heads, c)
        scores = x.new_zeros(heads, n, n)
    else:
        raise TypeError(f"layer must be one of {[c.__name__ for c in LAYERS.values()]}, got {type(layer).__name__}")
    weights = masked_softmax(scores, adj)                                        # (H, N, N), empty rows -> 0
    out = (weights @ values.permute(1, 0, 2)).permute(1, 0, 2)                  # (N, H, C)
    out = out.reshape(n, heads * c) if layer.concat else out.mean(1)
    if layer.bias is not None:
        out = out + layer.bias
    return out, weights


# --------------------------------------------------------------------------- models and tasks


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


def attention_rows(weights: Tensor, edge_index: Tensor, num_nodes: int) -> Tensor:
    """Per-edge weights ``(E, H)`` -> padded rows ``(N, H, max in-degree)``: node ``i``'s distribution, zeros after it.

    A row of a node with no incoming edge is all zero.
    """
    dst = edge_index[1]
    heads = weights.shape[1]
    order = torch.argsort(dst, stable=True)
    dst_sorted = dst[order]
    deg = torch.bincount(dst, minlength=num_nodes)
    start = torch.cumsum(deg, 0) - deg
    slot = torch.arange(dst.numel(), device=dst.device) - start[dst_sorted]
    width = int(deg.max()) if deg.numel() and dst.numel() else 0
    rows = weights.new_zeros(num_nodes, heads, max(width, 1))
    rows[dst_sorted, :, slot] = weights[order]
    return rows


#: sizes per comparison preset: (nodes per graph, steps, cost-sweep sizes in nodes)
_PRESETS = {
    "quick": (24, 30, (256, 512, 1024)),
    "book": (48, 150, (1024, 4096, 16384)),
    "default": (64, 300, (1024, 4096, 16384, 65536)),
    "gpu": (64, 600, (4096, 16384, 65536, 262144)),
}
TASK_CLASSES, TASK_DEGREE = 4, 8
TASK_FEATURES = TASK_CLASSES + 1


def make_task(preset: str, kind: str = "gat") -> OwnTask[NodeClassifier]:
    """The comparison's graph task: node classification on fresh SBM graphs (:func:`sbm_graphs`).

    A batch of ``batch_size`` graphs (4 classes, in-degree 8, homophily 0.5,
    half the nodes with noisy features) is one disjoint union; the model is
    :class:`NodeClassifier`. The cost sweep times one layer (4 heads of 8, the
    task's 5 input features) on a random graph of in-degree 16 at each size in
    nodes. ``weights`` gives the first layer's attention as padded rows
    (:func:`attention_rows`).
    """
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(_PRESETS)}")
    if kind not in ("gat", "gatv2"):
        raise ValueError(f"kind must be 'gat' or 'gatv2', got {kind!r}")
    nodes, steps, sizes = _PRESETS[preset]

    def sample(batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        b = sbm_graphs(batch_size, nodes, generator, classes=TASK_CLASSES, degree=TASK_DEGREE)
        return {"x": b["x"], "edge_index": b["edge_index"], "y": b["y"]}

    def inputs(size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(size, TASK_FEATURES, generator=generator)
        src = torch.randint(0, size, (size * 16,), generator=generator)
        dst = torch.arange(size).repeat_interleave(16)
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
