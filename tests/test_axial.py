"""Chapter 11: axial attention against per-row / per-column attention computed explicitly (always H != W)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.axial import AxialAttention, AxialOutput, AxialWeights, axis_attention
from attn.benchmark import count_flops, peak_memory
from attn.experiments import own_tasks
from attn.experiments.axial import GridRecall, GridRecallModel, make_task
from attn.train import evaluate, train


def grid_qkv(B=2, h=3, H=5, W=7, d=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, H, W, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def explicit_axis(q, k, v, axis):
    """One F.scaled_dot_product_attention call per row (or per column), stacked back."""
    H, W = q.shape[2], q.shape[3]
    if axis == "row":
        return torch.stack([F.scaled_dot_product_attention(q[:, :, i], k[:, :, i], v[:, :, i]) for i in range(H)], 2)
    return torch.stack([F.scaled_dot_product_attention(q[:, :, :, j], k[:, :, :, j], v[:, :, :, j]) for j in range(W)], 3)


def torch_mha(proj, heads: int) -> torch.nn.MultiheadAttention:
    """nn.MultiheadAttention with one pass's weights copied (its in_proj rows are [W_q; W_k; W_v])."""
    E = proj.out_proj.in_features
    mha = torch.nn.MultiheadAttention(E, heads, batch_first=True, dtype=proj.q_proj.weight.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([proj.q_proj.weight, proj.k_proj.weight, proj.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([proj.q_proj.bias, proj.k_proj.bias, proj.v_proj.bias]))
        mha.out_proj.weight.copy_(proj.out_proj.weight)
        mha.out_proj.bias.copy_(proj.out_proj.bias)
    return mha


def explicit_module(mod: AxialAttention, x):
    """Row by row with a torch MultiheadAttention, then column by column with another."""
    row, col = torch_mha(mod.row, mod.num_heads), torch_mha(mod.col, mod.num_heads)
    H, W = x.shape[1], x.shape[2]
    y = torch.stack([row(x[:, i], x[:, i], x[:, i], need_weights=False)[0] for i in range(H)], 1)  # (B, H, W, C)
    return torch.stack([col(y[:, :, j], y[:, :, j], y[:, :, j], need_weights=False)[0] for j in range(W)], 2)


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("axis", ["row", "col"])
@pytest.mark.parametrize("H, W", [(5, 7), (7, 5), (1, 6), (4, 1)])
def test_axis_attention_matches_per_row_and_per_column_sdpa(axis, H, W):
    q, k, v = grid_qkv(H=H, W=W)
    out, w = axis_attention(q, k, v, axis, need_weights=True)
    ref = explicit_axis(q, k, v, axis)
    assert out.shape == (2, 3, H, W, 4)
    assert (out - ref).abs().max() <= 1e-5
    up = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        assert (a - b).abs().max() <= 1e-5
    # the weights: softmax over the row (keys (i, l)) or the column (keys (m, j))
    if axis == "row":
        scores = torch.einsum("bhijd,bhild->bhijl", q, k) / 2.0
        assert w.shape == (2, 3, H, W, W)
    else:
        scores = torch.einsum("bhijd,bhmjd->bhjim", q, k) / 2.0
        assert w.shape == (2, 3, W, H, H)
    torch.testing.assert_close(w, scores.softmax(-1))


def test_fused_and_weights_paths_agree():
    q, k, v = grid_qkv(H=3, W=8)
    for axis in ("row", "col"):
        torch.testing.assert_close(axis_attention(q, k, v, axis).output, axis_attention(q, k, v, axis, need_weights=True).output)


@pytest.mark.parametrize("H, W", [(3, 5), (6, 4)])
def test_module_matches_torch_multihead_row_by_row_then_column_by_column(H, W):
    torch.manual_seed(0)
    mod = AxialAttention(12, 3)
    x = torch.randn(2, H, W, 12, requires_grad=True)
    out = mod(x).output
    ref = explicit_module(mod, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    up = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (x, *mod.parameters()), up)
    g2 = torch.autograd.grad(ref, (x,), up)
    torch.testing.assert_close(g1[0], g2[0], atol=1e-5, rtol=1e-5)
    # parameter gradients: same module run through the explicit path with its own parameters
    ref_p = torch.autograd.grad((explicit_module_params(mod, x) * up).sum(), list(mod.parameters()))
    for a, b in zip(g1[1:], ref_p, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def explicit_module_params(mod: AxialAttention, x):
    """The explicit per-row / per-column formula written with the module's own parameters (differentiable)."""
    h = mod.num_heads

    def mha(seq, proj):  # seq (N, L, C)
        q, k, v, out = proj.q_proj(seq), proj.k_proj(seq), proj.v_proj(seq), proj.out_proj
        split = lambda t: t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(mod.head_dim), -1) @ split(v)
        return out(a.transpose(1, 2).reshape(seq.shape))

    H, W = x.shape[1], x.shape[2]
    y = torch.stack([mha(x[:, i], mod.row) for i in range(H)], 1)
    return torch.stack([mha(y[:, :, j], mod.col) for j in range(W)], 2)


def test_gradcheck_float64():
    mod = AxialAttention(4, 2).double()
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mod(x).output, (x,), fast_mode=True)
    q, k, v = grid_qkv(1, 1, 2, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: axis_attention(q, k, v, "col").output, (q, k, v))


# ----------------------------------------------------------------------------- properties


def _influence(fn, x, i, j):
    """Which input pixels output pixel (i, j) depends on: (H, W) boolean from the gradient."""
    x = x.detach().clone().requires_grad_()
    fn(x)[0, i, j].sum().backward()
    return x.grad[0].abs().sum(-1) > 0


def test_receptive_field_is_the_row_then_the_whole_grid():
    torch.manual_seed(0)
    mod = AxialAttention(8, 2)
    x = torch.randn(1, 4, 6, 8)
    after_row = _influence(lambda t: mod._pass(t, mod.row, "row", False)[0], x, 2, 3)
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[2] = True
    assert torch.equal(after_row, expected)
    assert _influence(lambda t: mod(t).output, x, 2, 3).all()


def test_receptive_weights_compose_the_two_passes():
    torch.manual_seed(0)
    mod = AxialAttention(8, 2)
    _, w = mod(torch.randn(2, 3, 5, 8), need_weights=True)
    assert isinstance(w, AxialWeights) and w.row.shape == (2, 2, 3, 5, 5) and w.col.shape == (2, 2, 5, 3, 3)
    r = AxialAttention.receptive_weights(w)  # (B, h, H, W, H, W)
    assert r.shape == (2, 2, 3, 5, 3, 5)
    torch.testing.assert_close(r.sum((-1, -2)), torch.ones(2, 2, 3, 5))
    i, j, m, col = 1, 4, 2, 0
    torch.testing.assert_close(r[:, :, i, j, m, col], w.col[:, :, j, i, m] * w.row[:, :, m, j, col])
    assert (r > 0).all()  # every pixel reaches every pixel after two passes


def test_flat_input_with_grid_equals_the_grid():
    torch.manual_seed(0)
    mod = AxialAttention(8, 2)
    x = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(mod(x.reshape(2, 15, 8), grid=(3, 5)).output, mod(x).output.reshape(2, 15, 8))
    wrong = mod(x.reshape(2, 15, 8), grid=(5, 3)).output.reshape(2, 3, 5, 8)  # the transposed grid reads other rows
    assert (wrong - mod(x).output).abs().max() > 1e-3


def test_batched_equals_per_example_and_empty_batch():
    torch.manual_seed(0)
    mod = AxialAttention(8, 2)
    x = torch.randn(3, 4, 6, 8)
    both = mod(x).output
    for b in range(3):
        torch.testing.assert_close(both[b : b + 1], mod(x[b : b + 1]).output)
    empty = mod(torch.randn(0, 4, 6, 8), need_weights=True)
    assert empty.output.shape == (0, 4, 6, 8)
    assert empty.weights.row.shape == (0, 2, 4, 6, 6) and empty.weights.col.shape == (0, 2, 6, 4, 4)
    assert mod(torch.randn(0, 24, 8), grid=(4, 6)).output.shape == (0, 24, 8)


def test_flops_match_the_formula():
    B, H, W, C, h = 1, 16, 24, 16, 2
    mod = AxialAttention(C, h)
    x = torch.randn(B, H, W, C)
    with torch.no_grad():
        flops = count_flops(lambda: mod(x))
    n = H * W
    attention = 4 * n * (H + W) * C  # QK^T and AV: 2 FLOPs per multiply-add, along rows (W keys) and columns (H keys)
    projections = 2 * (2 * n * C * 3 * C + 2 * n * C * C)  # two passes, each qkv (3C) and out (C)
    assert flops == attention + projections


def test_peak_memory_is_far_below_the_dense_scores():
    mod = AxialAttention(16, 1)
    x = torch.randn(1, 48, 64, 16)
    n = 48 * 64
    with torch.no_grad():
        used = peak_memory(lambda: mod(x), "cpu")
    assert 0 < used < n * n * 4 / 8, f"peak {used} bytes vs (HW)^2 fp32 = {n * n * 4}"


# ----------------------------------------------------------------------------- bad input


BAD = [
    ([[[[0.0] * 8]]], TypeError, "torch.Tensor"),
    (torch.ones(1, 3, 5, 8, dtype=torch.long), TypeError, "floating-point"),
    (torch.randn(15, 8), ValueError, r"\(batch, H, W, 8\)"),
    (torch.randn(1, 1, 3, 5, 8), ValueError, r"\(batch, H, W, 8\)"),
    (torch.randn(1, 3, 5, 7), ValueError, "8 channels"),
    (torch.randn(1, 15, 8), ValueError, r"pass grid=\(H, W\)"),
    (torch.randn(1, 0, 5, 8), ValueError, "non-empty grid"),
]


@pytest.mark.parametrize("x, err, match", BAD)
def test_bad_input(x, err, match):
    with pytest.raises(err, match=match):
        AxialAttention(8, 2)(x)


def test_bad_grid_and_arguments():
    mod = AxialAttention(8, 2)
    with pytest.raises(ValueError, match=r"grid=\(4, 4\) holds H\*W = 16 tokens, but x has 15"):
        mod(torch.randn(1, 15, 8), grid=(4, 4))
    with pytest.raises(ValueError, match=r"grid=\(5, 3\) does not match x of shape \(1, 3, 5, 8\)"):
        mod(torch.randn(1, 3, 5, 8), grid=(5, 3))
    with pytest.raises(ValueError, match="two positive ints"):
        mod(torch.randn(1, 15, 8), grid=(15,))
    with pytest.raises(ValueError, match="divisible"):
        AxialAttention(10, 3)
    with pytest.raises(ValueError, match="positive int"):
        AxialAttention(0, 1)
    q, k, v = grid_qkv()
    with pytest.raises(ValueError, match="axis must be 'row' or 'col'"):
        axis_attention(q, k, v, "depth")
    with pytest.raises(ValueError, match=r"\(batch, heads, H, W, d\)"):
        axis_attention(q[0], k[0], v[0], "row")
    with pytest.raises(ValueError, match="must share"):
        axis_attention(q, k[:, :, :4], v, "row")


# ----------------------------------------------------------------------------- registry and own task


def test_registry_entry_and_own_task():
    mech = registry.get("axial")
    assert mech.chapter == 11 and mech.cls is AxialAttention and mech.data == "grid" and mech.build is None
    assert registry.chapter(11).slug == "axial_attention"
    assert own_tasks()["axial"] is make_task
    task = make_task("quick")
    gen = torch.Generator().manual_seed(0)
    for size in task.sizes:
        (x,) = task.inputs(size, gen)
        assert x.shape[1] * x.shape[2] == size and x.shape[1] != x.shape[2]
        assert task.layer(x).output.shape == x.shape
    hist = train(task.model, task.sample, task.loss, steps=5, batch_size=8, progress=False)
    assert len(hist.loss) >= 1 and math.isfinite(hist.loss[-1])
    ev = evaluate(task.model, task.sample, task.loss, batch_size=16)
    assert 0.0 <= ev["acc"] <= 1.0
    rows = task.weights(task.model, task.sample(4, gen))
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]))
    with pytest.raises(ValueError, match="unknown task size 'huge'"):
        make_task("huge")
    with pytest.raises(ValueError, match="s x 2s grid"):
        task.inputs(100, gen)


def test_grid_recall_sample_and_model():
    task = GridRecall(3, 5, 4)
    batch = task.sample(64, torch.Generator().manual_seed(0))
    assert batch["values"].shape == (64, 3, 5) and (batch["flag"].sum((1, 2)) == 1).all()
    assert torch.equal(batch["values"][batch["flag"]], batch["y"])
    logits, w = GridRecallModel(task, 8, 2)(batch["values"], batch["flag"], need_weights=True)
    assert logits.shape == (64, 4) and w.row.shape == (64, 2, 3, 5, 5)
    with pytest.raises(ValueError, match="n_values >= 2"):
        GridRecall(3, 5, 1)


def test_one_interface_axial_projections_and_typed_output():
    """Issue 23: each pass's projections are an attn.Attention (q/k/v/out_proj: a MultiHeadAttention state
    dict loads into either pass); forward's options are keyword-only; the output is an AxialOutput whose
    weights are AxialWeights (never an AttentionOutput carrying a tuple); the task lives in attn.experiments."""
    from attn.attention import Attention
    from attn.multihead import MultiHeadAttention

    torch.manual_seed(0)
    mod = AxialAttention(8, 2).double()
    assert isinstance(mod.row, Attention) and isinstance(mod.col, Attention)
    mha = MultiHeadAttention(8, 2).double()
    mod.row.load_state_dict(mha.state_dict())
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    after_row = torch.stack([mha(x[:, i]).output for i in range(3)], 1)  # the row pass alone is MHA along each row
    torch.testing.assert_close(mod._pass(x, mod.row, "row", False)[0], after_row, atol=1e-12, rtol=1e-12)
    out = mod(x, need_weights=True)
    assert type(out) is AxialOutput and isinstance(out.weights, AxialWeights)
    with pytest.raises(TypeError):
        mod(x, True)  # need_weights is keyword-only
    with pytest.raises(TypeError):
        AxialAttention(8, 2, 0.1)  # dropout is keyword-only
    assert registry.get("axial").own_task is not None


# ----------------------------------------------------------------------------- the trained experiment (issue 16)


def _grid_batch(task, n=16, seed=0):
    return task.sample(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mixer", ["axial", "axial+ff", "dense"])
def test_grid_models_reach_every_cell_from_the_corner(mixer):
    """Axial (with or without the FF between) and dense: the corner's output depends on a cell outside row 0."""
    from attn.experiments.axial import GridRecallModel

    task = GridRecall(3, 5, 4)
    torch.manual_seed(0)
    model = GridRecallModel(task, 8, 2, mixer=mixer).eval()
    b = _grid_batch(task)
    flag = torch.zeros_like(b["flag"])
    flag[:, 2, 3] = True
    values = b["values"].clone()
    out = model(values, flag)[0]
    values[:, 2, 3] = (values[:, 2, 3] + 1) % 4
    assert (model(values, flag)[0] - out).abs().max() > 1e-6


def test_row_only_model_cannot_see_outside_row_0():
    """The row-only arm's reach is row 0 by construction: cells below it never change its answer."""
    from attn.experiments.axial import GridRecallModel

    task = GridRecall(3, 5, 4)
    torch.manual_seed(0)
    model = GridRecallModel(task, 8, 2, mixer="row").eval()
    b = _grid_batch(task)
    out = model(b["values"], b["flag"])[0]
    values, flag = b["values"].clone(), torch.zeros_like(b["flag"])
    values[:, 1:] = torch.randint(4, values[:, 1:].shape)
    flag[:, 2, 1] = True  # move every flag to row 2
    torch.testing.assert_close(model(values, b["flag"])[0], out)
    alone = model(b["values"], flag)[0]
    flag[:, 1, 4], flag[:, 2, 1] = True, False
    torch.testing.assert_close(model(b["values"], flag)[0], alone)  # a flag in row 1 or in row 2: the same
    with pytest.raises(ValueError, match="mixer must be one of"):
        GridRecallModel(task, 8, 2, mixer="col")  # type: ignore[arg-type]


def test_corner_field_is_a_distribution_and_needs_an_axial_model():
    from attn.experiments.axial import GridRecallModel, corner_field

    task = GridRecall(3, 5, 4)
    torch.manual_seed(0)
    b = _grid_batch(task)
    for mixer in ("axial", "axial+ff"):
        field = corner_field(GridRecallModel(task, 8, 2, mixer=mixer), b["values"], b["flag"])
        assert field.shape == (16, 2, 3, 5)
        torch.testing.assert_close(field.sum((-1, -2)), torch.ones(16, 2))
    with pytest.raises(ValueError, match="needs an axial model"):
        corner_field(GridRecallModel(task, 8, 2, mixer="dense"), b["values"], b["flag"])


def test_run_grid_recall_one_value_per_seed_and_arm():
    """The runner returns one accuracy per seed per arm (and per split), and the models it trained."""
    from attn.experiments.axial import run_grid_recall

    task = GridRecall(3, 4, 4)
    run = run_grid_recall(task, ("row", "dense"), seeds=[0, 1, 2], steps=2, batch_size=8, embed_dim=8,
                          num_heads=2, eval_batch=64)
    for table in (run.acc, run.acc_row0, run.acc_elsewhere):
        assert set(table) == {"row", "dense"} and all(len(v) == 3 for v in table.values())
    assert set(run.models) == {(m, s) for m in ("row", "dense") for s in (0, 1, 2)}
    assert run.reach_bound == pytest.approx(1 / 3 + (2 / 3) / 4)


@pytest.mark.slow
def test_run_grid_recall_axial_learns_beyond_the_row_reach():
    """On a 3x4 grid, 120 steps: axial beats the row pass's reach bound; the row pass guesses outside row 0."""
    from attn.experiments.axial import run_grid_recall

    task = GridRecall(3, 4, 4)
    run = run_grid_recall(task, ("row", "axial"), seeds=[0, 1, 2], steps=120, batch_size=32, embed_dim=16,
                          num_heads=2, eval_batch=256)
    assert max(run.acc_elsewhere["row"]) < 0.5  # outside row 0 it can only guess (chance 0.25)
    assert min(run.acc["axial"]) > run.reach_bound + 0.2
