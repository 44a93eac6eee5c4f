"""Chapter 17: graph attention (GAT, GATv2) on edge lists, against PyTorch Geometric and a dense formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.experiments import own_tasks
from attn.experiments.graph import NodeClassifier, lookup_graphs, make_task, node_loss, sbm_graphs
from attn.graph import (
    LAYERS,
    GraphAttention,
    GraphAttentionV2,
    MeanAggregation,
    attention_rows,
    dense_graph_attention,
    prepare_edge_attr,
    prepare_edges,
    segment_softmax,
)
from attn.train import evaluate, train

pyg = pytest.importorskip("torch_geometric.nn")


def random_graph(n=30, e=150, f=7, dtype=torch.float64, seed=0, loops=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=dtype).requires_grad_()
    ei = torch.randint(0, n, (2, e), generator=g)
    if loops:  # some existing self-loops and a duplicate edge
        ei = torch.cat([ei, torch.tensor([[3, 5, 0], [3, 5, 1]]), ei[:, :1]], 1)
    return x, ei


def copy_to_pyg(ours, concat, heads, out, self_loops, dropout=0.0):
    """The PyG layer with our weights (and a random bias copied both ways)."""
    f = ours.in_channels
    if isinstance(ours, GraphAttention):
        ref = pyg.GATConv(f, out, heads=heads, concat=concat, add_self_loops=self_loops, dropout=dropout)
        ref = ref.to(ours.lin.weight.dtype)
        with torch.no_grad():
            ref.lin.weight.copy_(ours.lin.weight)
            ref.att_src.copy_(ours.att_src)
            ref.att_dst.copy_(ours.att_dst)
    else:
        ref = pyg.GATv2Conv(f, out, heads=heads, concat=concat, add_self_loops=self_loops, dropout=dropout)
        ref = ref.to(ours.att.dtype)
        with torch.no_grad():
            ours.lin_src.bias.normal_()
            ours.lin_dst.bias.normal_()
            ref.lin_l.weight.copy_(ours.lin_src.weight)
            ref.lin_l.bias.copy_(ours.lin_src.bias)
            ref.lin_r.weight.copy_(ours.lin_dst.weight)
            ref.lin_r.bias.copy_(ours.lin_dst.bias)
            ref.att.copy_(ours.att)
    with torch.no_grad():
        ours.bias.normal_()
        ref.bias.copy_(ours.bias)
    return ref


def pyg_params(ref, ours):
    """Matching parameter lists (ours, PyG), for gradient comparison."""
    if isinstance(ours, GraphAttention):
        return ([ours.lin.weight, ours.att_src, ours.att_dst, ours.bias],
                [ref.lin.weight, ref.att_src, ref.att_dst, ref.bias])
    return ([ours.lin_src.weight, ours.lin_src.bias, ours.lin_dst.weight, ours.lin_dst.bias, ours.att, ours.bias],
            [ref.lin_l.weight, ref.lin_l.bias, ref.lin_r.weight, ref.lin_r.bias, ref.att, ref.bias])


# ----------------------------------------------------------------------------- against torch_geometric


@pytest.mark.parametrize("cls", [GraphAttention, GraphAttentionV2])
@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("self_loops", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_torch_geometric_forward_weights_and_gradients(cls, concat, self_loops, dtype, tol):
    torch.manual_seed(1)
    heads, out = 3, 5
    x, ei = random_graph(dtype=dtype)
    ours = cls(7, out, heads=heads, concat=concat, add_self_loops=self_loops).to(dtype)
    ref = copy_to_pyg(ours, concat, heads, out, self_loops)
    o = ours(x, ei, need_weights=True)
    r, (r_ei, r_alpha) = ref(x, ei, return_attention_weights=True)
    assert o.output.shape == r.shape == (30, heads * out if concat else out)
    assert (o.output - r).abs().max() <= tol
    assert torch.equal(o.edge_index, r_ei)
    assert (o.weights - r_alpha).abs().max() <= tol
    up = torch.randn_like(r)
    p_ours, p_ref = pyg_params(ref, ours)
    g_ours = torch.autograd.grad(o.output, [x, *p_ours], up)
    g_ref = torch.autograd.grad(r, [x, *p_ref], up)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert (a - b).abs().max() <= tol * 10


@pytest.mark.parametrize("cls", [GraphAttention, GraphAttentionV2])
def test_chunked_edges_give_the_same_result(cls, monkeypatch):
    """Messages (and GATv2's pair vectors) are formed in chunks of edges: many small chunks change nothing."""
    import attn.graph as graph

    x, ei = random_graph()
    layer = cls(7, 4, heads=3).double()
    whole = layer(x, ei, need_weights=True)
    up = torch.randn_like(whole.output)
    g_whole = torch.autograd.grad(whole.output, [x, *layer.parameters()], up)
    monkeypatch.setattr(graph, "CHUNK_ELEMENTS", 50)  # 4 edges per chunk: 50 chunks
    assert len(graph.edge_chunks(ei.shape[1], 12)) > 10
    parts = layer(x, ei, need_weights=True)
    torch.testing.assert_close(parts.output, whole.output, rtol=0, atol=1e-12)
    torch.testing.assert_close(parts.weights, whole.weights, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(parts.output, [x, *layer.parameters()], up), g_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [GraphAttention, GraphAttentionV2])
def test_attention_dropout_matches_torch_geometric(cls):
    x, ei = random_graph(dtype=torch.float32)
    ours = cls(7, 4, heads=2, dropout=0.5).train()
    ref = copy_to_pyg(ours, True, 2, 4, True, dropout=0.5).train()
    torch.manual_seed(5)
    a = ours(x, ei).output
    torch.manual_seed(5)
    b = ref(x, ei)
    torch.testing.assert_close(a, b)
    torch.manual_seed(6)
    assert (ours(x, ei).output - a).abs().max() > 1e-3  # dropout really drops
    ours.eval()
    torch.testing.assert_close(ours(x, ei).output, ours(x, ei).output)


# ----------------------------------------------------------------------------- against the dense formula


@pytest.mark.parametrize("kind", ["gat", "gatv2", "mean"])
@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("self_loops", [True, False])
def test_matches_dense_masked_attention(kind, concat, self_loops):
    x, ei = random_graph(loops=False)
    ei = torch.unique(ei, dim=1)  # an adjacency matrix holds no duplicate edges
    layer = LAYERS[kind](7, 4, heads=2, concat=concat, add_self_loops=self_loops).double()
    o = layer(x, ei, need_weights=True)
    d_out, d_w = dense_graph_attention(layer, x, ei)
    assert (o.output - d_out).abs().max() <= 1e-12
    src, dst = o.edge_index
    torch.testing.assert_close(d_w[:, dst, src].T, o.weights)  # the dense weights on the edges are ours
    assert d_w.sum().item() == pytest.approx(o.weights.sum().item())  # and there are no others
    up = torch.randn_like(d_out)
    params = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad(o.output, params, up), torch.autograd.grad(d_out, params, up), strict=True):
        assert (a - b).abs().max() <= 1e-12


def test_segment_softmax_is_a_softmax_per_target():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 3, generator=g, dtype=torch.float64) * 30  # large: needs the max subtraction
    index = torch.randint(0, 9, (40,), generator=g)
    alpha = segment_softmax(scores, index, 12)
    for node in range(12):
        rows = index == node
        if rows.any():
            torch.testing.assert_close(alpha[rows], scores[rows].softmax(0))
    assert torch.isfinite(alpha).all()
    assert torch.autograd.gradcheck(lambda s: segment_softmax(s, index, 12), (scores.detach().div(30).requires_grad_(),))


@pytest.mark.parametrize("kind", ["gat", "gatv2"])
def test_gradcheck_float64(kind):
    torch.manual_seed(0)
    x, ei = random_graph(n=6, e=14, f=3)
    layer = LAYERS[kind](3, 2, heads=2).double()
    assert torch.autograd.gradcheck(lambda x, *p: layer(x, ei).output, (x, *layer.parameters()), fast_mode=True)
    layer_mean = LAYERS[kind](3, 2, heads=2, concat=False, add_self_loops=False).double()
    assert torch.autograd.gradcheck(lambda x: layer_mean(x, ei, need_weights=True).weights, (x,))


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", ["gat", "gatv2"])
def test_permutation_equivariance_and_edge_order(kind):
    x, ei = random_graph()
    layer = LAYERS[kind](7, 4, heads=2).double()
    out = layer(x, ei).output
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    inv = perm.argsort()  # node perm[k] becomes node k
    out_p = layer(x[perm], inv[ei]).output
    torch.testing.assert_close(out_p, out[perm])
    shuffle = torch.randperm(ei.shape[1], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(layer(x, ei[:, shuffle]).output, out)


@pytest.mark.parametrize("kind", ["gat", "gatv2"])
def test_only_in_neighbours_matter(kind):
    """Node 0's output depends on its in-neighbours and itself, not on other nodes or on its out-edges."""
    x, _ = random_graph(n=6, loops=False)
    ei = torch.tensor([[1, 2, 0, 0, 4], [0, 0, 3, 5, 5]])  # 0 <- 1, 2; 0 -> 3, 5; 4 -> 5
    layer = LAYERS[kind](7, 4, heads=2).double()
    out = layer(x, ei).output
    x2 = x.detach().clone()
    x2[3:] += 10 * torch.randn(3, 7, dtype=torch.float64)
    out2 = layer(x2, ei).output
    torch.testing.assert_close(out2[:3], out[:3])
    assert (out2[5] - out[5]).abs().max() > 1e-3
    x3 = x.detach().clone()
    x3[2] += 1.0
    assert (layer(x3, ei).output[0] - out[0]).abs().max() > 1e-6


def test_isolated_nodes_without_self_loops_give_the_bias_and_no_nan():
    x, _ = random_graph(n=5, loops=False)
    layer = GraphAttentionV2(7, 3, heads=2, add_self_loops=False).double()
    with torch.no_grad():
        layer.bias.normal_()
    out = layer(x, torch.tensor([[0, 1], [1, 2]]), need_weights=True)
    assert torch.isfinite(out.output).all()
    for node in (0, 3, 4):
        torch.testing.assert_close(out.output[node], layer.bias)
    torch.testing.assert_close(out.weights, torch.ones(2, 2, dtype=torch.float64))  # one in-edge each: weight 1
    none = layer(x, torch.zeros(2, 0, dtype=torch.long))
    torch.testing.assert_close(none.output, layer.bias.expand(5, 6))


def test_disjoint_union_equals_each_graph_alone():
    layer = GraphAttention(7, 4, heads=2).double()
    xa, ea = random_graph(n=10, e=30, seed=1)
    xb, eb = random_graph(n=12, e=40, seed=2)
    both = layer(torch.cat([xa, xb]), torch.cat([ea, eb + 10], 1)).output
    torch.testing.assert_close(both[:10], layer(xa, ea).output)
    torch.testing.assert_close(both[10:], layer(xb, eb).output)


def test_mean_heads_is_the_mean_of_concatenated_heads_and_self_loops_are_replaced():
    x, ei = random_graph()
    cat = GraphAttention(7, 4, heads=3, concat=True, bias=False).double()
    avg = GraphAttention(7, 4, heads=3, concat=False, bias=False).double()
    avg.load_state_dict(cat.state_dict())
    torch.testing.assert_close(avg(x, ei).output, cat(x, ei).output.view(30, 3, 4).mean(1))
    edges = prepare_edges(ei, 30, True)
    assert int((edges[0] == edges[1]).sum()) == 30  # exactly one self-loop per node
    assert edges.shape[1] == int((ei[0] != ei[1]).sum()) + 30


def test_mean_aggregation_is_uniform():
    x, ei = random_graph(loops=False)
    layer = MeanAggregation(7, 4, bias=False).double()
    o = layer(x, ei, need_weights=True)
    deg = torch.bincount(o.edge_index[1], minlength=30).double()
    torch.testing.assert_close(o.weights[:, 0], 1 / deg[o.edge_index[1]])


def test_gat_ranking_is_static_gatv2_is_not():
    """GAT: every target ranks the sources the same way (the score is monotone in a_src.Wh_j); GATv2 need not."""
    torch.manual_seed(0)
    n_src, n_dst = 6, 6
    x = torch.randn(n_src + n_dst, 5)
    ei = torch.stack([torch.arange(n_src).repeat(n_dst), torch.arange(n_src, n_src + n_dst).repeat_interleave(n_src)])
    for cls, static in ((GraphAttention, True), (GraphAttentionV2, False)):
        found_static = True
        for seed in range(5):
            torch.manual_seed(seed)
            w = cls(5, 8, heads=1, add_self_loops=False)(x, ei, need_weights=True).weights.view(n_dst, n_src)
            rankings = {tuple(row.argsort().tolist()) for row in w}
            found_static &= len(rankings) == 1
        assert found_static == static


def test_gatv2_solves_dictionary_lookup_and_gat_does_not():
    """Brody et al.'s DictionaryLookup, k = 4: GATv2 learns it, GAT stays near chance."""
    k = 4

    class Lookup(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.conv = LAYERS[kind](2 * k + 1, 16, add_self_loops=False)
            self.out = torch.nn.Linear(16, k)

        def forward(self, x, ei):
            return self.out(F.elu(self.conv(x, ei).output))

    acc = {}
    for kind in ("gat", "gatv2"):
        torch.manual_seed(0)
        model = Lookup(kind)
        sample = lambda b, g: lookup_graphs(b, k, g)  # noqa: E731
        train(model, sample, node_loss, steps=80, batch_size=16, lr=3e-2, progress=False)
        acc[kind] = evaluate(model, sample, node_loss, batch_size=64)["acc"]
    assert acc["gatv2"] > 0.95
    assert acc["gat"] < 0.5


def test_lookup_graphs_targets():
    b = lookup_graphs(3, 5, torch.Generator().manual_seed(0))
    assert b["x"].shape == (30, 11) and b["edge_index"].shape == (2, 75)
    for q in torch.nonzero(b["y"] >= 0)[:, 0]:
        keys = b["edge_index"][0, b["edge_index"][1] == q]
        match = keys[b["x"][keys, :5].argmax(1) == b["x"][q, :5].argmax()]
        assert match.numel() == 1 and b["x"][match[0], 5:10].argmax() == b["y"][q]


def test_sbm_graphs_degree_homophily_and_seed():
    g = torch.Generator().manual_seed(0)
    b = sbm_graphs(20, 48, g, degree=8, homophily=0.5)
    src, dst = b["edge_index"]
    assert torch.equal(torch.bincount(dst, minlength=960), torch.full((960,), 8))
    assert torch.equal(b["graph"][src], b["graph"][dst])  # no edge between graphs
    same = (b["y"][src] == b["y"][dst]).float().mean().item()
    assert 0.45 < same < 0.55
    clean = b["x"][:, -1] == 1
    assert 0.4 < clean.float().mean() < 0.6
    assert b["x"][clean, :4].argmax(1).eq(b["y"][clean]).float().mean() > 0.85
    again = sbm_graphs(20, 48, torch.Generator().manual_seed(0), degree=8, homophily=0.5)
    assert all(torch.equal(b[k], again[k]) for k in b)
    with pytest.raises(ValueError, match="multiple of classes"):
        sbm_graphs(1, 10, g, classes=4)


def test_attention_rows_pad_per_node_distributions():
    x, ei = random_graph()
    o = GraphAttentionV2(7, 4, heads=2)(x.float(), ei, need_weights=True)
    rows = attention_rows(o.weights, o.edge_index, 30)
    deg = torch.bincount(o.edge_index[1], minlength=30)
    assert rows.shape == (30, 2, int(deg.max()))
    torch.testing.assert_close(rows.sum(-1), torch.ones(30, 2))
    assert ((rows > 0).sum(-1) <= deg[:, None]).all()


# ----------------------------------------------------------------------------- bad input, empty input


@pytest.mark.parametrize(
    "x, ei, error, match",
    [
        ([[0.0] * 7], torch.zeros(2, 0, dtype=torch.long), TypeError, r"x must be a torch.Tensor of shape \(num_nodes, in_channels=7\)"),
        (torch.zeros(4, 7, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), TypeError, "floating-point"),
        (torch.zeros(1, 4, 7), torch.zeros(2, 0, dtype=torch.long), ValueError, r"x must have shape \(num_nodes, in_channels=7\), got 3-D"),
        (torch.zeros(4, 6), torch.zeros(2, 0, dtype=torch.long), ValueError, r"last dimension 6 != 7"),
        (torch.zeros(4, 7), [[0, 1], [1, 2]], TypeError, r"edge_index must be a torch.Tensor of shape \(2, num_edges\)"),
        (torch.zeros(4, 7), torch.zeros(2, 3), TypeError, "edge_index must be an integer tensor"),
        (torch.zeros(4, 7), torch.zeros(3, 5, dtype=torch.long), ValueError, r"edge_index must have shape \(2, num_edges\)"),
        (torch.zeros(4, 7), torch.ones(4, 4, dtype=torch.long), ValueError, r"adjacency matrix"),
        (torch.zeros(4, 7), torch.tensor([[0, 4], [1, 2]]), ValueError, r"node id 4, but x has 4 nodes \(valid ids are 0..3\)"),
        (torch.zeros(4, 7), torch.tensor([[0, -1], [1, 2]]), ValueError, r"node id -1"),
    ],
)
@pytest.mark.parametrize("kind", ["gat", "gatv2"])
def test_bad_input_is_named(kind, x, ei, error, match):
    layer = LAYERS[kind](7, 3, heads=2)
    with pytest.raises(error, match=match):
        layer(x, ei)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="heads must be a positive int"):
        GraphAttention(4, 4, heads=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        GraphAttentionV2(4, 4, dropout=1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        NodeClassifier("gcn", 4, 2)


@pytest.mark.parametrize("kind", ["gat", "gatv2", "mean"])
def test_empty_graph(kind):
    layer = LAYERS[kind](7, 3, heads=2)
    out = layer(torch.zeros(0, 7), torch.zeros(2, 0, dtype=torch.long), need_weights=True)
    assert out.output.shape == (0, 6) and out.weights.shape == (0, 2)
    with pytest.raises(ValueError, match="x has 0 nodes"):
        layer(torch.zeros(0, 7), torch.tensor([[0], [0]]))


# ----------------------------------------------------------------------------- registry and the comparison's task


@pytest.mark.parametrize("name, cls", [("gat", GraphAttention), ("gatv2", GraphAttentionV2)])
def test_registry_and_own_task(name, cls):
    mech = registry.get(name)
    assert mech.cls is cls and mech.chapter == 17 and mech.data == "graph" and mech.build is None
    assert registry.chapter(17).slug == "graph_attention"
    assert mech.own_task is not None  # the own task lives in attn.experiments.graph, by size
    task = own_tasks()[name]("quick")
    assert isinstance(task, registry.OwnTask) and task.size_unit == "nodes" and isinstance(task.layer, cls)
    hist = train(task.model, task.sample, task.loss, steps=5, batch_size=task.batch_size, lr=task.lr, log_every=1, progress=False)
    assert len(hist.loss) == 5 and all(0 <= a <= 1 for a in hist.metrics["acc"])
    gen = torch.Generator().manual_seed(0)
    out = task.layer(*task.inputs(task.sizes[0], gen))
    assert out.output.shape == (task.sizes[0], 32)
    batch = task.sample(2, gen)
    rows = task.weights(task.model, batch)
    assert rows.ndim == 2 and torch.allclose(rows.sum(-1), torch.ones(rows.shape[0]))
    with pytest.raises(ValueError, match="unknown task size 'huge'; one of quick, book, full, large"):
        make_task("huge")


def test_options_are_keyword_only():
    """``layer(x, edge_index, *, need_weights=False)`` and ``(in_channels, out_channels, *, heads=..., ...)``:
    ``layer(x, ei, True)`` no longer reads a bare flag, nor ``GraphAttention(4, 4, 2)`` a bare head count."""
    import inspect

    for cls in (GraphAttention, GraphAttentionV2, MeanAggregation):
        fwd = inspect.signature(cls.forward).parameters
        assert fwd["need_weights"].kind is inspect.Parameter.KEYWORD_ONLY
        init = inspect.signature(cls.__init__).parameters
        assert [n for n, p in init.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD] == [
            "self", "in_channels", "out_channels"]
        layer = cls(4, 3, heads=2)
        with pytest.raises(TypeError):
            layer(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]]), True)
        with pytest.raises(TypeError):
            cls(4, 3, 2)


# ----------------------------------------------------------------------------- edge attributes (GATv2, edge_dim)


def _edge_graph(dtype=torch.float64):
    x, ei = random_graph(dtype=dtype)
    g = torch.Generator().manual_seed(5)
    attr = torch.randn(ei.shape[1], 3, generator=g, dtype=dtype)
    return x, ei, attr


@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("self_loops", [True, False])
def test_edge_attributes_match_torch_geometric(concat, self_loops):
    """GATv2 with ``edge_dim``: weights copied into ``GATv2Conv(edge_dim=3)``; outputs, weights, gradients agree.

    The graph holds self-loops and a duplicated edge, so the self-loops' mean attribute is checked too."""
    from torch_geometric.nn import GATv2Conv

    torch.manual_seed(2)
    x, ei, attr = _edge_graph()
    attr.requires_grad_(True)
    ours = GraphAttentionV2(7, 5, heads=3, concat=concat, add_self_loops=self_loops, edge_dim=3).double()
    ref = GATv2Conv(7, 5, heads=3, concat=concat, add_self_loops=self_loops, edge_dim=3).double()
    with torch.no_grad():
        ours.lin_src.bias.normal_()
        ours.lin_dst.bias.normal_()
        ours.bias.normal_()
        pairs = [(ref.lin_l.weight, ours.lin_src.weight), (ref.lin_l.bias, ours.lin_src.bias),
                 (ref.lin_r.weight, ours.lin_dst.weight), (ref.lin_r.bias, ours.lin_dst.bias),
                 (ref.att, ours.att), (ref.lin_edge.weight, ours.lin_edge.weight), (ref.bias, ours.bias)]
        for theirs, mine in pairs:
            theirs.copy_(mine)
    o = ours(x, ei, edge_attr=attr, need_weights=True)
    r, (r_ei, r_alpha) = ref(x, ei, attr, return_attention_weights=True)
    assert torch.equal(o.edge_index, r_ei)
    assert (o.output - r).abs().max() <= 1e-12
    assert (o.weights - r_alpha).abs().max() <= 1e-12
    up = torch.randn_like(r)
    g_ours = torch.autograd.grad(o.output, [x, attr, *(m for _, m in pairs)], up)
    g_ref = torch.autograd.grad(r, [x, attr, *(t for t, _ in pairs)], up)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert (a - b).abs().max() <= 1e-10


def test_edge_attributes_change_the_ranking_and_match_the_dense_form():
    """The attribute enters the score: the same graph with other attributes gives other weights; dense agrees."""
    torch.manual_seed(3)
    x, ei, attr = _edge_graph()
    ei = torch.unique(ei, dim=1)
    attr = attr[: ei.shape[1]]
    layer = GraphAttentionV2(7, 4, heads=2, edge_dim=3).double()
    o = layer(x, ei, edge_attr=attr, need_weights=True)
    d_out, d_w = dense_graph_attention(layer, x, ei, edge_attr=attr)
    src, dst = o.edge_index
    assert (o.output - d_out).abs().max() <= 1e-12
    assert (d_w[:, dst, src].T - o.weights).abs().max() <= 1e-12
    other = layer(x, ei, edge_attr=attr.flip(0), need_weights=True)
    assert (other.weights - o.weights).abs().max() > 1e-3


def test_self_loop_attribute_is_the_mean_of_incoming():
    ei = torch.tensor([[1, 2, 0, 2], [0, 0, 1, 2]])  # 2 -> 2 is a self-loop (dropped); node 2 has no other in-edge
    attr = torch.tensor([[1.0], [3.0], [5.0], [100.0]])
    full = prepare_edge_attr(ei, attr, 3, add_self_loops=True)
    assert full.squeeze(1).tolist() == [1.0, 3.0, 5.0, 2.0, 5.0, 0.0]
    assert torch.equal(prepare_edge_attr(ei, attr, 3, add_self_loops=False), attr)


def test_edge_attributes_are_checked():
    x, ei = torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="built without edge_dim"):
        GraphAttention(4, 2)(x, ei, edge_attr=torch.randn(2, 1))
    layer = GraphAttentionV2(4, 2, edge_dim=3)
    with pytest.raises(ValueError, match="pass edge_attr of shape"):
        layer(x, ei)
    with pytest.raises(ValueError, match=r"edge_attr must have shape \(num_edges=2, edge_dim=3\)"):
        layer(x, ei, edge_attr=torch.randn(3, 3))
    with pytest.raises(ValueError, match="edge_dim must be a positive int"):
        GraphAttentionV2(4, 2, edge_dim=0)


# ----------------------------------------------------------------------------- the chapter's experiments

from attn.experiments.graph import (  # noqa: E402
    KARATE_EDGES,
    KARATE_FACTION,
    LookupModel,
    NodeMLP,
    attention_entropy,
    attention_share,
    block_match_graphs,
    karate_club,
    karate_split,
    train_arms,
)


def test_block_match_graphs_only_the_match_pays():
    """Blocks are shown exactly; labels follow the block within a graph, but the block -> label map changes per graph."""
    b = block_match_graphs(40, 16, torch.Generator().manual_seed(0), noise=0.0)
    x, y, block = b["x"], b["y"], b["block"]
    assert torch.equal(x[:, :4].argmax(1), block) and torch.equal(x[:, 4:].argmax(1), y)
    maps = set()
    for gi in range(40):
        nodes = b["graph"] == gi
        mapping = {int(k): {int(v) for v in y[nodes][block[nodes] == k]} for k in range(4)}
        assert all(len(v) == 1 for v in mapping.values())                       # one label per block per graph
        maps.add(tuple(next(iter(mapping[k])) for k in range(4)))
    assert len(maps) > 10                                                       # no fixed block -> label map
    for k in range(4):                                                          # every block takes every label
        assert set(y[block == k].tolist()) == {0, 1, 2, 3}
    src, dst = b["edge_index"]
    same = (block[src] == block[dst]).float().mean()
    assert 0.45 < same < 0.55                                                   # homophily 0.5
    again = block_match_graphs(40, 16, torch.Generator().manual_seed(0), noise=0.0)
    assert torch.equal(again["x"], x) and torch.equal(again["edge_index"], b["edge_index"])
    with pytest.raises(ValueError, match="noise must be >= 0"):
        block_match_graphs(1, 16, torch.Generator(), noise=-1.0)


def test_karate_club_is_zacharys_graph():
    assert len(KARATE_EDGES) == 78 == len(set(KARATE_EDGES))
    assert all(a < b for a, b in KARATE_EDGES)
    k = karate_club()
    assert k["x"].shape == (34, 34) and k["edge_index"].shape == (2, 156)
    deg = torch.bincount(k["edge_index"][1], minlength=34)
    assert deg[0] == 16 and deg[33] == 17 and deg.sum() == 156               # Mr. Hi and the officer
    assert k["y"][0] == 0 and k["y"][33] == 1 and int(k["y"].sum()) == 17
    nx = pytest.importorskip("networkx")
    g = nx.karate_club_graph()
    assert sorted(tuple(sorted(e)) for e in g.edges()) == sorted(KARATE_EDGES)
    assert [int(g.nodes[i]["club"] != "Mr. Hi") for i in range(34)] == list(KARATE_FACTION)


def test_karate_split_labels_few_members_per_faction_by_seed():
    train_y, test_y = karate_split(3, per_class=2)
    labelled = train_y >= 0
    assert int(labelled.sum()) == 4 and sorted(train_y[labelled].tolist()) == [0, 0, 1, 1]
    assert torch.equal(labelled, test_y < 0)                                    # disjoint, together all members
    assert torch.equal(karate_split(3)[0], train_y)
    assert any(not torch.equal(karate_split(s)[0], train_y) for s in range(4, 8))


def test_train_arms_gives_every_arm_the_same_batches_and_one_value_per_seed():
    seen: dict[str, list[torch.Tensor]] = {}

    class Recording(NodeMLP):
        def __init__(self, name):
            super().__init__(8, 4)
            self.name = name

        def forward(self, x, edge_index):
            seen.setdefault(self.name, []).append(x.clone())
            return super().forward(x, edge_index)

    def data(seed):
        def sample(batch_size, generator):
            b = block_match_graphs(batch_size, 8, generator)
            return {"x": b["x"], "edge_index": b["edge_index"], "y": b["y"]}
        return sample, sample

    arms = {"a": lambda: Recording("a"), "b": lambda: Recording("b"),
            "gatv2": lambda: NodeClassifier("gatv2", 8, 4, hidden=4, heads=2)}
    runs = train_arms(arms, data, [0, 1], steps=3, batch_size=2, lr=1e-2, eval_batch=2, log_every=1)
    assert {k: len(v) for k, v in runs.values.items()} == {"a": 2, "b": 2, "gatv2": 2}
    assert all(0.0 <= v <= 1.0 for vs in runs.values.values() for v in vs)
    assert [len(c) for c in runs.curves["gatv2"]] == [3, 3] and len(runs.models["a"]) == 2
    # per seed: 3 training batches + 1 evaluation batch, the same for both arms, different across seeds
    assert len(seen["a"]) == len(seen["b"]) == 8
    assert all(torch.equal(x, y) for x, y in zip(seen["a"], seen["b"], strict=True))
    assert not torch.equal(seen["a"][0], seen["a"][4])
    assert not torch.equal(seen["a"][0], seen["a"][1])
    assert runs.plateaued("a", last=1, tol=1.0)


def test_attention_entropy_and_share():
    ei = torch.tensor([[0, 1, 2, 0], [1, 1, 1, 2]])                           # node 1: 3 in-edges, node 2: one
    uniform = torch.tensor([[1 / 3], [1 / 3], [1 / 3], [1.0]])
    ent = attention_entropy(uniform, ei, 3)
    assert torch.allclose(ent[:, 0], torch.tensor([0.0, float(torch.log(torch.tensor(3.0))), 0.0]))
    peaked = torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    assert torch.allclose(attention_entropy(peaked, ei, 3), torch.zeros(3, 1))
    share = attention_share(uniform.expand(-1, 2), ei, 3, torch.tensor([True, False, True, False]))
    assert torch.allclose(share, torch.tensor([0.0, 2 / 3, 0.0]))


def test_edge_attributes_in_the_node_classifier_and_the_loss():
    b = block_match_graphs(2, 8, torch.Generator().manual_seed(0))
    src, dst = b["edge_index"]
    attr = (b["block"][src] == b["block"][dst]).float()[:, None]
    model = NodeClassifier("gatv2", 8, 4, edge_dim=1)
    batch = {"x": b["x"], "edge_index": b["edge_index"], "y": b["y"], "edge_attr": attr}
    loss, metrics = node_loss(model, batch)
    assert loss.isfinite() and 0 <= metrics["acc"] <= 1
    with pytest.raises(ValueError, match="pass edge_attr"):
        node_loss(model, {k: v for k, v in batch.items() if k != "edge_attr"})
    with pytest.raises(ValueError, match="edge_dim needs kind='gatv2'"):
        NodeClassifier("gat", 8, 4, edge_dim=1)
    lookup = LookupModel("gatv2", 3)
    g = lookup_graphs(2, 3, torch.Generator().manual_seed(0))
    assert lookup(g["x"], g["edge_index"]).shape == (12, 3)
