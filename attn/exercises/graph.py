"""Chapter 17's exercises: GAT's static ranking, the GAT weights on an edge list, the GATv2 score.

Solutions: :func:`static_favourites`, :func:`gat_weights`, :func:`gatv2_scores`. Checkers:
:func:`check_static_favourites`, :func:`check_gat_weights`, :func:`check_gatv2_scores`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._core import Case, Exercise, Mistake

__all__ = [
    "static_favourites", "gat_weights", "gatv2_scores",
    "check_static_favourites", "check_gat_weights", "check_gatv2_scores",
    "FAVOURITE_FEATURES", "FAVOURITE_EDGES", "FAVOURITE_A_SRC", "FAVOURITE_A_DST",
    "STATIC_FAVOURITES", "GAT_WEIGHTS", "GATV2_SCORES", "EXERCISES",
]

# -- 1. static attention ------------------------------------------------------------------------------------
#: node features h_0 .. h_4 of exercise 1 (W is the identity)
FAVOURITE_FEATURES = ((1.0, 0.0), (0.0, 1.0), (1.0, 0.1), (0.1, 1.0), (-1.0, -1.0))
#: edges j -> i, rows [source; target]: nodes 2, 3, 4 each send to nodes 0 and 1
FAVOURITE_EDGES = ((2, 3, 4, 2, 3, 4), (0, 0, 0, 1, 1, 1))
#: the score vector of exercise 1, a = [a_dst; a_src]
FAVOURITE_A_DST, FAVOURITE_A_SRC = (1.0, 1.0), (1.0, 2.0)


def static_favourites() -> tuple[int, int]:
    """The neighbour with the largest GAT weight for node 0 and for node 1 in exercise 1's graph.

    ``e_ij = LeakyReLU(a_dst^T W h_i + a_src^T W h_j)``: the target part is the same for all of ``i``'s
    edges and LeakyReLU is increasing, so every node ranks its neighbours by ``a_src^T W h_j``: both pick 3.
    """
    h = torch.tensor(FAVOURITE_FEATURES)  # W = I: W h = h
    src, dst = torch.tensor(FAVOURITE_EDGES)
    e = F.leaky_relu(h[dst] @ torch.tensor(FAVOURITE_A_DST) + h[src] @ torch.tensor(FAVOURITE_A_SRC), 0.2)
    best = []
    for node in (0, 1):
        mine = dst == node  # node's incoming edges
        best.append(int(src[mine][e[mine].argmax()]))
    return best[0], best[1]


def _pair(got: object, expected: object) -> str | None:
    if not isinstance(got, tuple | list) or len(got) != 2:
        return f"answer with a pair of node ids (for node 0, for node 1), e.g. (2, 4); got {got!r}."
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in got):
        return f"both entries must be node ids (ints); got {got!r}."
    answer = tuple(expected) if isinstance(expected, tuple | list) else ()
    if tuple(got) == answer:
        return None
    wrong = [name for name, g, e in zip(("node 0", "node 1"), got, answer, strict=True) if g != e]
    return f"the favourite of {' and '.join(wrong)} is another neighbour."


STATIC_FAVOURITES = Exercise(
    name="static_favourites",
    chapter=17,
    title="GAT's favourite neighbour",
    solution=static_favourites,
    kind="value",
    compare=_pair,
    hint="Split each score into its target part and its source part; which part changes between the neighbours?",
    mistakes=(
        Mistake("matching_neighbour", "that is the neighbour whose features *match* each node's own (2 is like "
                "node 0, 3 like node 1): a dot product `q_i^T k_j` would pick it, but GAT's score is "
                "`LeakyReLU(a_dst^T W h_i + a_src^T W h_j)`. The target part is the same for all of a node's "
                "edges and LeakyReLU is increasing, so every node ranks its neighbours by `a_src^T W h_j` "
                "alone: static attention.", lambda: (2, 3)),
        Mistake("least_favourite", "that is the neighbour with the *smallest* score: node 4's source part "
                "`a_src^T h_4 = -3` is the lowest.", lambda: (4, 4)),
    ),
)


# -- 2. GAT weights on an edge list -------------------------------------------------------------------------
def gat_weights(x: Tensor, edge_index: Tensor, w: Tensor, a_src: Tensor, a_dst: Tensor) -> Tensor:
    r"""One GAT head's weights ``alpha_ij``, one per edge: a softmax over the edges that share a target.

    ``e_ij = LeakyReLU(a_dst^T W h_i + a_src^T W h_j)`` (slope 0.2) for the edge ``j -> i``, then
    ``alpha_ij = exp(e_ij) / sum_{k in N(i)} exp(e_ik)``. Shapes: ``x (N, F)``, ``edge_index (2, E)`` rows
    ``[source; target]``, ``w (C, F)``, ``a_src, a_dst (C,)`` -> ``(E,)``. No ``N x N`` matrix.
    """
    n = x.shape[0]
    h = x @ w.T  # (N, C): W h
    src, dst = edge_index
    e = F.leaky_relu(h[dst] @ a_dst + h[src] @ a_src, negative_slope=0.2)  # (E,)
    # segment softmax over each target's edges: scatter-max (no gradient needed), exp, scatter-sum
    peak = e.new_full((n,), float("-inf")).scatter_reduce(0, dst, e.detach(), reduce="amax")  # (N,)
    ex = (e - peak[dst]).exp()
    denom = e.new_zeros(n).index_add(0, dst, ex)  # (N,)
    return ex / denom[dst]


def _group_softmax(e: Tensor, index: Tensor, n: int) -> Tensor:
    """Softmax of ``e (E,)`` over the edges that share ``index``, by a dense mask."""
    member = index[None, :] == torch.arange(n)[:, None]  # (N, E)
    dense = torch.where(member, e[None, :], float("-inf"))
    w = torch.softmax(dense, dim=-1).nan_to_num(0.0)  # rows with no edge: zeros
    return (w * member).sum(0)


def _gat(x: Tensor, edge_index: Tensor, w: Tensor, a_src: Tensor, a_dst: Tensor, *, act: str = "leaky",
         slope: float = 0.2, swap: bool = False, group: str = "target") -> Tensor:
    h = x @ w.T
    src, dst = edge_index
    if swap:
        src, dst = dst, src
    s = h[dst] @ a_dst + h[src] @ a_src
    e = {"leaky": F.leaky_relu(s, slope), "relu": F.relu(s), "none": s}[act]
    if group == "all":
        return torch.softmax(e, dim=0)
    return _group_softmax(e, edge_index[1] if group == "target" else edge_index[0], x.shape[0])


def _graph(g: torch.Generator, n: int, edges: list[tuple[int, int]], f: int, c: int, label: str) -> Case:
    edge_index = torch.tensor(edges, dtype=torch.long).T.contiguous()  # (2, E): [source; target]
    return Case((torch.randn(n, f, generator=g), edge_index, torch.randn(c, f, generator=g),
                 torch.randn(c, generator=g), torch.randn(c, generator=g)), label=label)


def _gat_cases(g: torch.Generator) -> list[Case]:
    ring = [(j, (j + 1) % 5) for j in range(5)] + [(j, (j + 2) % 5) for j in range(5)] + [(i, i) for i in range(5)]
    star = [(j, 0) for j in range(1, 6)] + [(0, 1), (2, 1)]  # node 0 hears five nodes; 2..5 hear nobody
    return [
        _graph(g, 5, ring, 4, 3, "5 nodes, 15 edges (each node hears 2 others and itself), F=4, C=3"),
        _graph(g, 6, star, 3, 4, "6 nodes, 7 edges: a star into node 0, nodes 2-5 with no incoming edge"),
        _graph(g, 4, [(1, 0), (2, 0), (3, 0), (0, 1), (3, 2), (1, 2), (2, 3)], 5, 2,
               "4 nodes, 7 edges, F=5, C=2"),
        _graph(g, 3, [(0, 0), (1, 1), (2, 1), (0, 2)], 2, 2, "3 nodes, 4 edges with self-loops, F=C=2"),
    ]


GAT_WEIGHTS = Exercise(
    name="gat_weights",
    chapter=17,
    title="GAT weights on an edge list",
    solution=gat_weights,
    cases=_gat_cases,
    grad=True,
    hint="Per edge: the score from its target's and its source's projections; then normalise per target node.",
    mistakes=(
        Mistake("softmax_over_sources", "the weights are normalised over the edges that share a *source* "
                "(`edge_index[0]`): node `i` attends over its incoming edges `j -> i`, so group by the target, "
                "`edge_index[1]`.", lambda *a: _gat(*a, group="source")),
        Mistake("global_softmax", "one softmax runs over *all* edges of the graph: it must run over each "
                "node's own incoming edges (a segment softmax grouped by `edge_index[1]`), so that every "
                "node's weights sum to one.", lambda *a: _gat(*a, group="all")),
        Mistake("roles_swapped", "`a_dst` scores the source and `a_src` the target: for an edge `j -> i` "
                "(source `j = edge_index[0]`, target `i = edge_index[1]`) the score is "
                "`a_dst^T W h_i + a_src^T W h_j`.", lambda *a: _gat(*a, swap=True)),
        Mistake("default_slope", "LeakyReLU with PyTorch's default slope 0.01: GAT uses 0.2 "
                "(`F.leaky_relu(s, negative_slope=0.2)`).", lambda *a: _gat(*a, slope=0.01)),
        Mistake("relu", "a ReLU where GAT has a LeakyReLU: every negative score becomes 0, so those "
                "neighbours tie. Use `F.leaky_relu(s, 0.2)`.", lambda *a: _gat(*a, act="relu")),
        Mistake("no_leaky_relu", "the LeakyReLU is missing: `e_ij = LeakyReLU(a_dst^T W h_i + a_src^T W h_j)` "
                "with slope 0.2.", lambda *a: _gat(*a, act="none")),
    ),
)


# -- 3. the GATv2 score -------------------------------------------------------------------------------------
def gatv2_scores(x: Tensor, edge_index: Tensor, w_src: Tensor, w_dst: Tensor, a: Tensor) -> Tensor:
    r"""GATv2's score of every edge ``j -> i``: ``e_ij = a^T LeakyReLU(W_dst h_i + W_src h_j)`` (slope 0.2).

    Shapes: ``x (N, F)``, ``edge_index (2, E)`` rows ``[source; target]``, ``w_src, w_dst (C, F)``,
    ``a (C,)`` -> ``(E,)`` (before the softmax). The nonlinearity sits between ``W`` and ``a``.
    """
    src, dst = edge_index
    pair = x[dst] @ w_dst.T + x[src] @ w_src.T  # (E, C): W [h_i || h_j]
    return F.leaky_relu(pair, negative_slope=0.2) @ a  # (E,)


def _v2(x: Tensor, edge_index: Tensor, w_src: Tensor, w_dst: Tensor, a: Tensor, *, order: str = "v2",
        slope: float = 0.2, swap: bool = False) -> Tensor:
    src, dst = edge_index
    if swap:
        src, dst = dst, src
    pair = x[dst] @ w_dst.T + x[src] @ w_src.T
    if order == "gat":
        return F.leaky_relu(pair @ a, slope)
    if order == "linear":
        return pair @ a
    if order == "relu":
        return F.relu(pair) @ a
    return F.leaky_relu(pair, slope) @ a


def _v2_cases(g: torch.Generator) -> list[Case]:
    cases = _gat_cases(g)
    out = []
    for case in cases:
        x, edge_index, w, a_src, _ = case.args
        out.append(Case((x, edge_index, w, torch.randn(w.shape, generator=g), a_src), label=case.label))
    return out


GATV2_SCORES = Exercise(
    name="gatv2_scores",
    chapter=17,
    title="The GATv2 score",
    solution=gatv2_scores,
    cases=_v2_cases,
    grad=True,
    hint="Per edge: project the target with w_dst and the source with w_src, add, LeakyReLU, then a.",
    mistakes=(
        Mistake("gat_order", "the LeakyReLU is applied *after* `a`, as in GAT: that score splits into a target "
                "part plus a source part, so it is static again. GATv2 applies it to the `C`-vector "
                "`W_dst h_i + W_src h_j` and only then takes the dot product with `a`.",
                lambda *args: _v2(*args, order="gat")),
        Mistake("roles_swapped", "`w_dst` projects the source and `w_src` the target: for `j -> i` the source "
                "`j` is `edge_index[0]`, the target `i` is `edge_index[1]`.", lambda *args: _v2(*args, swap=True)),
        Mistake("no_nonlinearity", "there is no nonlinearity at all: `a^T (W_dst h_i + W_src h_j)` is linear, "
                "a sum of a target part and a source part, the most static score of all.",
                lambda *args: _v2(*args, order="linear")),
        Mistake("default_slope", "LeakyReLU with PyTorch's default slope 0.01: GATv2 uses 0.2.",
                lambda *args: _v2(*args, slope=0.01)),
        Mistake("relu", "a ReLU where GATv2 has a LeakyReLU (slope 0.2).", lambda *args: _v2(*args, order="relu")),
    ),
)

check_static_favourites = STATIC_FAVOURITES.checker()
check_gat_weights = GAT_WEIGHTS.checker()
check_gatv2_scores = GATV2_SCORES.checker()

EXERCISES = (STATIC_FAVOURITES, GAT_WEIGHTS, GATV2_SCORES)
