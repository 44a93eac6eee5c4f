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
from .registry import register

__all__ = [
    "GraphAttentionOutput",
    "GraphAttention",
    "GraphAttentionV2",
    "MeanAggregation",
    "check_graph",
    "prepare_edges",
    "prepare_edge_attr",
    "segment_softmax",
    "aggregate",
    "edge_chunks",
    "dense_graph_attention",
    "attention_rows",
    "LAYERS",
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


def prepare_edge_attr(edge_index: Tensor, edge_attr: Tensor, num_nodes: int, add_self_loops: bool) -> Tensor:
    """The edge attributes ``(E', D)`` of :func:`prepare_edges`'s edges, in the same order.

    With ``add_self_loops``, the attributes of existing self-loops are dropped
    and each node's new self-loop gets the **mean** of the attributes of its
    incoming edges (zero for a node with none): PyTorch Geometric's
    ``fill_value="mean"``, the default of ``GATv2Conv``.
    """
    if edge_attr.shape[0] != edge_index.shape[1]:
        raise ValueError(f"edge_attr must have one row per edge, (num_edges={edge_index.shape[1]}, edge_dim), "
                         f"got {tuple(edge_attr.shape)}")
    if not add_self_loops:
        return edge_attr
    keep = edge_index[0] != edge_index[1]
    kept, dst = edge_attr[keep], edge_index[1, keep]
    total = edge_attr.new_zeros(num_nodes, edge_attr.shape[1]).index_add(0, dst, kept)
    count = torch.bincount(dst, minlength=num_nodes).clamp(min=1).to(edge_attr.dtype)
    return torch.cat([kept, total / count[:, None]])


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
    ``(E, H, C)`` message tensor never exists at once: the temporaries stay
    within :data:`CHUNK_ELEMENTS` numbers whatever the graph's size.
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

    def __init__(self, in_channels: int, out_channels: int, *, heads: int = 1, concat: bool = True,
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

    #: width of the edge attributes the score reads (``None``: the layer takes none)
    edge_dim: int | None = None

    def edge_scores(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(values (N, H, C), scores (E, H))``: what is summed, and the unnormalised score of each edge.

        ``edge_attr`` ``(E, edge_dim)`` (already aligned with ``edge_index``,
        self-loops included) is given only to a layer built with ``edge_dim``.
        """
        raise NotImplementedError

    def forward(self, x: Tensor, edge_index: Tensor, *, edge_attr: Tensor | None = None,
                need_weights: bool = False) -> GraphAttentionOutput:
        """``x`` ``(N, in_channels)``, ``edge_index`` ``(2, E)`` rows ``[source; target]`` -> :class:`GraphAttentionOutput`.

        ``edge_attr`` ``(E, edge_dim)`` (keyword): one attribute vector per edge,
        read by the score of a layer built with ``edge_dim`` (GATv2); required
        there, refused elsewhere.
        """
        x, edge_index = check_graph(x, edge_index, self.in_channels)
        n = x.shape[0]
        edges = prepare_edges(edge_index, n, self.add_self_loops)
        attr = self._check_edge_attr(edge_attr, edge_index, x)
        if attr is not None:
            attr = prepare_edge_attr(edge_index, attr, n, self.add_self_loops)    # (E', edge_dim)
        values, scores = self.edge_scores(x, edges, attr)                         # (N, H, C), (E', H)
        alpha = segment_softmax(scores, edges[1], n)                              # (E', H)
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        out = aggregate(alpha, values, edges, n)                                  # (N, H, C)
        out = out.reshape(n, self.heads * self.out_channels) if self.concat else out.mean(1)
        if self.bias is not None:
            out = out + self.bias
        return GraphAttentionOutput(out, alpha if need_weights else None, edges)

    def _check_edge_attr(self, edge_attr: object, edge_index: Tensor, x: Tensor) -> Tensor | None:
        if self.edge_dim is None:
            if edge_attr is not None:
                raise ValueError(f"{type(self).__name__} was built without edge_dim: it takes no edge_attr "
                                 "(GraphAttentionV2(..., edge_dim=D) reads edge attributes in its score)")
            return None
        shape = f"(num_edges={edge_index.shape[1]}, edge_dim={self.edge_dim})"
        if edge_attr is None:
            raise ValueError(f"this layer was built with edge_dim={self.edge_dim}: pass edge_attr of shape {shape}")
        attr = check_tensor(edge_attr, "edge_attr", shape, 2)
        if attr.shape != (edge_index.shape[1], self.edge_dim):
            raise ValueError(f"edge_attr must have shape {shape}, got {tuple(attr.shape)}")
        if attr.device != x.device:
            raise ValueError(f"edge_attr is on {attr.device} but x is on {x.device}")
        return attr.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, heads={self.heads}, concat={self.concat}, "
                f"negative_slope={self.negative_slope}, dropout={self.dropout}, add_self_loops={self.add_self_loops}")


@register("gat", paper="Velickovic et al. 2018", complexity="O(E H C)", chapter=17, data="graph",
          summary="static edge attention: LeakyReLU(a_dst.Wh_i + a_src.Wh_j), softmax over in-edges")
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

    def __init__(self, in_channels: int, out_channels: int, *, heads: int = 1, concat: bool = True,
                 negative_slope: float = 0.2, dropout: float = 0.0, add_self_loops: bool = True, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, heads=heads, concat=concat, negative_slope=negative_slope,
                         dropout=dropout, add_self_loops=add_self_loops, bias=bias)
        self.lin = nn.Linear(in_channels, heads * out_channels, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        nn.init.xavier_uniform_(self.lin.weight)
        for a in (self.att_src, self.att_dst):
            nn.init.xavier_uniform_(a.view(heads, out_channels))

    def edge_scores(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.lin(x).view(-1, self.heads, self.out_channels)                   # (N, H, C)
        s_src = (h * self.att_src).sum(-1)                                        # (N, H): a_src . W h_j
        s_dst = (h * self.att_dst).sum(-1)                                        # (N, H): a_dst . W h_i
        scores = s_src.index_select(0, edge_index[0]) + s_dst.index_select(0, edge_index[1])  # (E, H)
        return h, F.leaky_relu(scores, self.negative_slope)


@register("gatv2", paper="Brody et al. 2022", complexity="O(E H C)", chapter=17, data="graph",
          summary="dynamic edge attention: a.LeakyReLU(W_dst h_i + W_src h_j), softmax over in-edges")
class GraphAttentionV2(_EdgeAttention):
    r"""GATv2 layer: :math:`e_{ij} = a^\top \mathrm{LeakyReLU}(W_{dst} h_i + W_{src} h_j)`.

    The nonlinearity sits *between* the projections and ``a``, so the ranking of
    the neighbours ``j`` can depend on the query node ``i``. Per edge it forms
    an ``(H, C)`` vector: ``O(E H C)`` for the scores too. Parameters as in
    ``torch_geometric.nn.GATv2Conv``: ``lin_src`` (its ``lin_l``) and ``lin_dst``
    (``lin_r``), each ``(H C, F)`` with a bias when ``bias``; ``att`` ``(1, H, C)``;
    the output ``bias``. ``share_weights`` uses one projection for both.

    **Edge attributes** (``edge_dim=D``): each edge ``j -> i`` carries a vector
    :math:`f_{ij} \in \mathbb{R}^D`, projected by ``lin_edge`` ``(H C, D)``
    (no bias) into the pair before the nonlinearity,

    .. math::

        e_{ij} = a^\top \mathrm{LeakyReLU}(W_{dst} h_i + W_{src} h_j + W_{edge} f_{ij}),

    as in PyTorch Geometric's ``GATv2Conv(edge_dim=D)``; a node's added
    self-loop carries the mean attribute of its incoming edges. The values
    stay :math:`W_{src} h_j`: the attribute changes *who* is heard, not what.
    """

    def __init__(self, in_channels: int, out_channels: int, *, heads: int = 1, concat: bool = True,
                 negative_slope: float = 0.2, dropout: float = 0.0, add_self_loops: bool = True, bias: bool = True,
                 share_weights: bool = False, edge_dim: int | None = None) -> None:
        super().__init__(in_channels, out_channels, heads=heads, concat=concat, negative_slope=negative_slope,
                         dropout=dropout, add_self_loops=add_self_loops, bias=bias)
        self.lin_src = nn.Linear(in_channels, heads * out_channels, bias=bias)
        self.lin_dst = self.lin_src if share_weights else nn.Linear(in_channels, heads * out_channels, bias=bias)
        self.att = nn.Parameter(torch.empty(1, heads, out_channels))
        if edge_dim is not None and (isinstance(edge_dim, bool) or not isinstance(edge_dim, int) or edge_dim < 1):
            raise ValueError(f"edge_dim must be a positive int or None, got {edge_dim!r}")
        self.edge_dim = edge_dim
        self.lin_edge = nn.Linear(edge_dim, heads * out_channels, bias=False) if edge_dim is not None else None
        for lin in dict.fromkeys([self.lin_src, self.lin_dst]):  # one or two projections, in a fixed order
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.xavier_uniform_(self.att.view(heads, out_channels))
        if self.lin_edge is not None:
            nn.init.xavier_uniform_(self.lin_edge.weight)

    def edge_scores(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h_src = self.lin_src(x).view(-1, self.heads, self.out_channels)           # (N, H, C)
        h_dst = self.lin_dst(x).view(-1, self.heads, self.out_channels)
        src, dst = edge_index
        scores = []
        for part in edge_chunks(src.numel(), self.heads * self.out_channels):     # as in aggregate: bounded temporaries
            pair = h_src.index_select(0, src[part]) + h_dst.index_select(0, dst[part])  # (chunk, H, C)
            if self.lin_edge is not None and edge_attr is not None:
                pair = pair + self.lin_edge(edge_attr[part]).view(-1, self.heads, self.out_channels)
            scores.append((F.leaky_relu(pair, self.negative_slope) * self.att).sum(-1))  # (chunk, H)
        return h_src, torch.cat(scores)


class MeanAggregation(_EdgeAttention):
    """The no-attention baseline: every incoming edge weighs ``1 / in-degree`` (all scores equal).

    ``h'_i = mean_{j in N(i)} W h_j + b`` (GraphSAGE-mean / GCN-like, without
    degree normalisation of the source). Same interface as the attention
    layers; ``weights`` are the uniform ``1 / deg``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, heads: int = 1, concat: bool = True,
                 negative_slope: float = 0.2, dropout: float = 0.0, add_self_loops: bool = True, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, heads=heads, concat=concat, negative_slope=negative_slope,
                         dropout=dropout, add_self_loops=add_self_loops, bias=bias)
        self.lin = nn.Linear(in_channels, heads * out_channels, bias=False)
        nn.init.xavier_uniform_(self.lin.weight)

    def edge_scores(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.lin(x).view(-1, self.heads, self.out_channels)
        return h, h.new_zeros(edge_index.shape[1], self.heads)


LAYERS: dict[str, type[_EdgeAttention]] = {"gat": GraphAttention, "gatv2": GraphAttentionV2, "mean": MeanAggregation}


# --------------------------------------------------------------------------- the dense baseline


def dense_graph_attention(layer: _EdgeAttention, x: Tensor, edge_index: Tensor,
                          edge_attr: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Baseline: the same layer computed with an ``N x N`` boolean adjacency mask (``O(N^2 H)`` memory; GATv2 ``O(N^2 H C)``).

    ``adj[i, j]`` is True when the edge ``j -> i`` exists (True = may attend);
    the scores of *all* pairs are formed, masked and soft-maxed along ``j``.
    An adjacency matrix cannot hold duplicate edges: pass a graph without
    them. Attention dropout is not applied (use ``layer.eval()``). With
    ``edge_attr`` (a GATv2 layer built with ``edge_dim``), the projected
    attributes are scattered into an ``(H, N, N, C)`` array.

    Returns ``(output (N, out), weights (H, N, N))``.
    """
    x, edge_index = check_graph(x, edge_index, layer.in_channels)
    n, heads, c = x.shape[0], layer.heads, layer.out_channels
    edges = prepare_edges(edge_index, n, layer.add_self_loops)
    attr = layer._check_edge_attr(edge_attr, edge_index, x)
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
        if attr is not None and layer.lin_edge is not None:
            proj = layer.lin_edge(prepare_edge_attr(edge_index, attr, n, layer.add_self_loops)).view(-1, heads, c)
            dense_attr = pair.new_zeros(heads, n, n, c)
            dense_attr[:, edges[1], edges[0], :] = proj.permute(1, 0, 2)         # (H, N_target, N_source, C)
            pair = pair + dense_attr
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


# --------------------------------------------------------------------------- reading the weights


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
