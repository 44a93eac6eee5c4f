"""Chapter 17's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn.exercises import graph as ex
from attn.graph import GraphAttention, GraphAttentionV2


def _loop_weights(x, edge_index, w, a_src, a_dst, by=1, act=None, swap=False):  # type: ignore[no-untyped-def]
    """Node by node: the scores of its edges (grouped by row ``by`` of the edge list), a softmax."""
    act = act or (lambda s: F.leaky_relu(s, 0.2))
    h = torch.einsum("nf,cf->nc", x, w)
    alpha = torch.zeros(edge_index.shape[1])
    for node in range(x.shape[0]):
        ids = (edge_index[by] == node).nonzero().flatten()
        if len(ids) == 0:
            continue
        j, i = edge_index[0, ids], edge_index[1, ids]
        if swap:
            i, j = j, i
        e = act(torch.einsum("ec,c->e", h[i], a_dst) + torch.einsum("ec,c->e", h[j], a_src))
        alpha = alpha.index_put((ids,), torch.softmax(e, 0))
    return alpha


def test_gat_weights_written_another_way_pass_and_match_the_library() -> None:
    assert ex.check_gat_weights(_loop_weights).passed
    x, edge_index, w, a_src, a_dst = ex.GAT_WEIGHTS.inputs()[0].args
    layer = GraphAttention(x.shape[1], w.shape[0], add_self_loops=False, bias=False)
    with torch.no_grad():
        layer.lin.weight.copy_(w)
        layer.att_src.copy_(a_src.view(1, 1, -1))
        layer.att_dst.copy_(a_dst.view(1, 1, -1))
    alpha = layer(x, edge_index, need_weights=True).weights
    assert alpha is not None
    torch.testing.assert_close(ex.gat_weights(x, edge_index, w, a_src, a_dst), alpha[:, 0])


def test_gat_weights_wrong_answers_get_their_diagnosis() -> None:
    table = {
        (lambda *a: _loop_weights(*a, by=0)): "softmax_over_sources",
        (lambda *a: _loop_weights(*a, swap=True)): "roles_swapped",
        (lambda *a: _loop_weights(*a, act=torch.relu)): "relu",
        (lambda *a: _loop_weights(*a, act=F.leaky_relu)): "default_slope",
    }
    for fn, name in table.items():
        report = ex.check_gat_weights(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def _concat_v2(x, edge_index, w_src, w_dst, a, gat_order=False, act=None):  # type: ignore[no-untyped-def]
    """``W [h_i || h_j]`` with one concatenated matrix."""
    act = act or (lambda s: F.leaky_relu(s, 0.2))
    src, dst = edge_index
    pair = torch.cat([x[dst], x[src]], dim=1) @ torch.cat([w_dst, w_src], dim=1).T  # (E, C)
    return act(pair @ a) if gat_order else act(pair) @ a


def test_gatv2_written_another_way_passes_and_matches_the_library() -> None:
    assert ex.check_gatv2_scores(_concat_v2).passed
    x, edge_index, w_src, w_dst, a = ex.GATV2_SCORES.inputs()[2].args
    layer = GraphAttentionV2(x.shape[1], w_src.shape[0], add_self_loops=False, bias=False)
    with torch.no_grad():
        layer.lin_src.weight.copy_(w_src)
        layer.lin_dst.weight.copy_(w_dst)
        layer.att.copy_(a.view(1, 1, -1))
    scores = layer.edge_scores(x, edge_index)[1]
    torch.testing.assert_close(ex.gatv2_scores(x, edge_index, w_src, w_dst, a), scores[:, 0])


def test_gatv2_wrong_answers_get_their_diagnosis() -> None:
    table = {
        (lambda *a: _concat_v2(*a, gat_order=True)): "gat_order",
        (lambda *a: _concat_v2(*a, act=lambda s: s)): "no_nonlinearity",
        (lambda x, ei, ws, wd, a: _concat_v2(x, ei, wd, ws, a)): "roles_swapped",
    }
    for fn, name in table.items():
        report = ex.check_gatv2_scores(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_static_favourites_values() -> None:
    assert ex.check_static_favourites((3, 3)).passed
    assert ex.check_static_favourites([3, 3]).passed
    assert ex.check_static_favourites((2, 3)).mistake == "matching_neighbour"
    assert ex.check_static_favourites((3, 2)).mistake == "generic"
    assert ex.check_static_favourites(3).mistake == "generic"
