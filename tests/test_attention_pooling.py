"""Chapter 19: attention pooling (Nadaraya-Watson, Set Transformer PMA, CLIP's attention pool) against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attn
from attn import registry
from attn.attention import Attention
from attn.attention_pooling import MAB, PMA, AttentionPool, NadarayaWatson, gaussian_kernel_weights, nadaraya_watson
from attn.experiments import own_tasks
from attn.experiments.attention_pooling import (
    ContentMeanSets,
    KernelRegressionTask,
    SetClassifier,
    make_regression_task,
    make_set_task,
)
from attn.masks import padding_mask
from attn.train import cpu_threads, train


@pytest.fixture(autouse=True)
def _one_thread():
    with cpu_threads(1):
        yield


def rand(*shape, dtype=torch.float64, seed=0, grad=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_() if grad else t


# ----------------------------------------------------------------------------- Nadaraya-Watson


@pytest.mark.parametrize("d, k", [(1, 1), (3, 2)])
def test_nadaraya_watson_is_the_explicit_estimator(d, k):
    q, x, y = rand(2, 7, d, seed=1), rand(2, 11, d, seed=2), rand(2, 11, k, seed=3)
    h = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    out, w = nadaraya_watson(q, x, y, h, need_weights=True)
    # explicit: K(x - x_i) = exp(-|x - x_i|^2 / 2h^2) normalised, by a loop over queries
    ref = torch.stack([torch.stack([
        (torch.exp(-((q[b, i] - x[b]) ** 2).sum(-1) / (2 * h**2))[:, None] * y[b]).sum(0)
        / torch.exp(-((q[b, i] - x[b]) ** 2).sum(-1) / (2 * h**2)).sum()
        for i in range(7)]) for b in range(2)])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w, gaussian_kernel_weights(q, x, h), atol=1e-12, rtol=1e-10)
    up = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, x, y, h), up), torch.autograd.grad(ref, (q, x, y, h), up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("h", [0.1, 0.4, 2.0])
def test_nadaraya_watson_matches_statsmodels_kernelreg(h):
    from statsmodels.nonparametric.kernel_regression import KernelReg

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 5, 40)
    y = np.sin(2 * x) + 0.3 * rng.standard_normal(40)
    grid = np.linspace(0, 5, 25)
    ref, _ = KernelReg(endog=y, exog=x, var_type="c", reg_type="lc", bw=[h]).fit(grid)
    ours = nadaraya_watson(torch.tensor(grid)[None, :, None], torch.tensor(x)[None, :, None], torch.tensor(y)[None, :, None], h).output
    np.testing.assert_allclose(ours[0, :, 0].numpy(), ref, atol=1e-10)


def test_nadaraya_watson_gradcheck_mask_and_module():
    q, x, y = rand(1, 3, 2, seed=4), rand(1, 5, 2, seed=5), rand(1, 5, 1, seed=6)
    h = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    km = padding_mask([3], 5)
    assert torch.autograd.gradcheck(lambda q, x, y, h: nadaraya_watson(q, x, y, h, key_mask=km).output, (q, x, y, h))
    # masked observations have no effect
    x2, y2 = x.detach().clone(), y.detach().clone()
    x2[:, 3:] += 10
    y2[:, 3:] -= 100
    torch.testing.assert_close(nadaraya_watson(q, x2, y2, 0.9, key_mask=km).output,
                               nadaraya_watson(q, x[:, :3], y[:, :3], 0.9).output)
    # the module: h = exp(log h) is learned
    nw = NadarayaWatson(0.5).double()
    nw(q, x, y).output.sum().backward()
    assert nw.log_bandwidth.grad is not None and nw.log_bandwidth.grad.abs() > 0
    assert torch.isclose(nw.bandwidth, torch.tensor(0.5, dtype=torch.float64))
    assert "log_bandwidth" in dict(NadarayaWatson(0.5, learnable=False).named_buffers())


def test_bandwidth_limits():
    """h -> 0: the nearest observation's value; h -> infinity: the plain mean."""
    x = torch.tensor([[[0.0], [1.0], [3.0]]])
    y = torch.tensor([[[1.0], [2.0], [6.0]]])
    q = torch.tensor([[[0.9], [2.6]]])
    torch.testing.assert_close(nadaraya_watson(q, x, y, 0.01).output, torch.tensor([[[2.0], [6.0]]]))
    torch.testing.assert_close(nadaraya_watson(q, x, y, 1e4).output, torch.full((1, 2, 1), 3.0), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- MAB / PMA against torch modules


def mab_reference(mab: MAB, x, y, key_mask=None):
    """The paper's MAB with torch.nn.MultiheadAttention (copied weights) and torch.nn.LayerNorm."""
    att = mab.attention
    ref = torch.nn.MultiheadAttention(att.embed_dim, att.num_heads, batch_first=True).to(x.dtype)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
        ref.out_proj.weight.copy_(att.out_proj.weight)
        ref.out_proj.bias.copy_(att.out_proj.bias)
    a, _ = ref(x, y, y, key_padding_mask=None if key_mask is None else ~key_mask)
    ln1 = lambda t: F.layer_norm(t, (t.shape[-1],), mab.norm1.weight, mab.norm1.bias)  # noqa: E731
    ln2 = lambda t: F.layer_norm(t, (t.shape[-1],), mab.norm2.weight, mab.norm2.bias)  # noqa: E731
    l1, l2 = mab.ff.net[0], mab.ff.net[2]
    h = ln1(x + a)
    return ln2(h + (torch.relu(h @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias)), ref


@pytest.mark.parametrize("masked", [False, True])
def test_pma_matches_paper_formula_with_torch_modules(masked):
    torch.manual_seed(0)
    pma = PMA(8, num_heads=2, num_seeds=3).double()
    z = rand(2, 6, 8, seed=7)
    km = padding_mask([6, 4], 6) if masked else None
    out, w = pma(z, key_mask=km, need_weights=True)
    zf = pma.ff(z)  # rFF(Z)
    ref, ref_mha = mab_reference(pma.mab, pma.seeds.expand(2, -1, -1), zf, km)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert out.shape == (2, 3, 8) and w.shape == (2, 2, 3, 6)
    if masked:
        assert (w[1, ..., 4:] == 0).all()
    up = torch.randn_like(out)
    params = [z, pma.seeds, *pma.ff.parameters(), *pma.mab.ff.parameters(), *pma.mab.norm1.parameters(), *pma.mab.norm2.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up, retain_graph=True), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    # the attention weights' gradients: ours are on q/k/v_proj, the reference's on in_proj_weight (stacked)
    g_ours = torch.autograd.grad(pma(z, key_mask=km).output, [pma.mab.attention.q_proj.weight, pma.mab.attention.k_proj.weight,
                                                              pma.mab.attention.v_proj.weight], up)
    g_ref = torch.autograd.grad(ref, ref_mha.in_proj_weight, up)[0]
    torch.testing.assert_close(torch.cat(g_ours), g_ref, atol=1e-10, rtol=1e-8)


def test_mab_without_layer_norm_and_gradcheck():
    torch.manual_seed(0)
    mab = MAB(4, 2, layer_norm=False).double()
    x, y = rand(1, 2, 4, seed=8), rand(1, 3, 4, seed=9)
    out = mab(x, y).output
    a = mab.attention(x, y, y).output
    torch.testing.assert_close(out, (x + a) + mab.ff(x + a))
    pma = PMA(4, 2, num_seeds=2).double()
    km = padding_mask([3], 3)
    assert torch.autograd.gradcheck(lambda y: pma(y, key_mask=km).output, (y,), fast_mode=True)


# ----------------------------------------------------------------------------- CLIP's attention pool against torch


def clip_reference(pool: AttentionPool, z, key_mask=None):
    """CLIP's AttentionPool2d.forward, as it calls F.multi_head_attention_forward (sequence first)."""
    x = z.transpose(0, 1)  # (n, B, d)
    if key_mask is None:
        mean = x.mean(0, keepdim=True)
        kpm = None
    else:
        w = key_mask.T[..., None].to(z.dtype)
        mean = (x * w).sum(0, keepdim=True) / w.sum(0, keepdim=True)
        kpm = ~torch.cat([key_mask.new_ones(z.shape[0], 1), key_mask], 1)
    x = torch.cat([mean, x], 0)
    if pool.position is not None:
        x = x + pool.position[:, None, :]
    out, w = F.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, key_padding_mask=kpm,
        need_weights=True, average_attn_weights=False,
    )
    return out[0], w[:, :, 0]


@pytest.mark.parametrize("masked, positions", [(False, False), (True, False), (False, True)])
def test_clip_attention_pool_matches_torch_multi_head_attention_forward(masked, positions):
    torch.manual_seed(0)
    pool = AttentionPool(8, num_heads=2, out_dim=5, num_positions=6 if positions else None).double()
    z = rand(3, 6, 8, seed=10)
    km = padding_mask([6, 2, 5], 6) if masked else None
    out, w = pool(z, key_mask=km, need_weights=True)
    ref, ref_w = clip_reference(pool, z, km)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=1e-10)
    assert out.shape == (3, 5) and w.shape == (3, 2, 7)
    up = torch.randn_like(out)
    params = [z, *pool.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_clip_pool_gradcheck():
    pool = AttentionPool(4, num_heads=2).double()
    z = rand(2, 3, 4, seed=11)
    km = padding_mask([3, 2], 3)
    assert torch.autograd.gradcheck(lambda z: pool(z, key_mask=km).output, (z,), fast_mode=True)


# ----------------------------------------------------------------------------- set properties


def pools():
    torch.manual_seed(0)
    return {"pma": PMA(8, 2, num_seeds=2), "clip": AttentionPool(8, 2),
            **{p: SetClassifier(8, 3, dim=8, pool=p, num_heads=2) for p in ("pma", "clip", "mean", "max")}}


@pytest.mark.parametrize("name", ["pma", "clip"])
def test_permutation_invariance(name):
    z = rand(2, 9, 8, dtype=torch.float32, grad=False)
    km = padding_mask([9, 6], 9)
    for kind, mod in (("pool", pools()[name]), ("classifier", SetClassifier(8, 3, dim=8, pool=name, num_heads=2))):
        out = mod(z, key_mask=km).output
        perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
        # permute every set's real elements among themselves (padding stays at the end)
        p1 = torch.cat([perm[perm < 6], torch.arange(6, 9)])
        z2 = torch.stack([z[0, perm], z[1, p1]])
        torch.testing.assert_close(mod(z2, key_mask=km).output, out, atol=1e-6, rtol=1e-5, msg=kind)
    # CLIP with a position embedding is not invariant: the grid positions matter
    pos = AttentionPool(8, 2, num_positions=9)
    assert (pos(z[:, torch.arange(8, -1, -1)]).output - pos(z).output).abs().max() > 1e-4


@pytest.mark.parametrize("pool", ["pma", "clip", "mean", "max"])
def test_set_size_masking_and_batched_equals_per_set(pool):
    torch.manual_seed(0)
    model = SetClassifier(5, 2, dim=8, pool=pool, num_heads=2)
    x = rand(3, 10, 5, dtype=torch.float32, grad=False)
    sizes = [10, 4, 7]
    km = padding_mask(sizes, 10)
    out = model(x, key_mask=km).output
    x2 = x.clone()
    x2[~km] = 50.0  # garbage in the padding
    torch.testing.assert_close(model(x2, key_mask=km).output, out)
    for b, n in enumerate(sizes):
        torch.testing.assert_close(model(x[b : b + 1, :n]).output, out[b : b + 1], atol=1e-6, rtol=1e-5)


def test_pool_weights_are_distributions():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 8)
    km = padding_mask([5, 3], 5)
    w = PMA(8, 2, num_seeds=3)(z, key_mask=km, need_weights=True).weights
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 3))
    w = AttentionPool(8, 2)(z, key_mask=km, need_weights=True).weights
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2))
    assert (w[1, :, 4:] == 0).all()  # padded elements (positions 3, 4 -> columns 4, 5) get nothing


# ----------------------------------------------------------------------------- bad input and empty batch


def test_bad_input():
    pma, clip = PMA(8, 2), AttentionPool(8, 2)
    z = torch.randn(2, 5, 8)
    for mod in (pma, clip):
        cases = [
            ((z.tolist(),), TypeError, r"torch.Tensor of shape \(batch, seq, embed_dim=8\)"),
            ((z.long(),), TypeError, r"floating-point"),
            ((z[0],), ValueError, r"shape \(batch, seq, embed_dim=8\), got 2-D"),
            ((z[..., :4],), ValueError, r"last dimension 4 != 8"),
            ((z[:, :0],), ValueError, r"empty set.*n >= 1"),
            ((z, padding_mask([5, 0], 5)), ValueError, r"set 1 is empty"),
            ((z, torch.ones(2, 4, dtype=torch.bool)), ValueError, r"key_mask must have shape \(batch=2, n=5\)"),
            ((z, torch.ones(2, 5)), TypeError, r"torch.bool"),
        ]
        for args, err, match in cases:
            with pytest.raises(err, match=match):
                mod(args[0], key_mask=args[1] if len(args) > 1 else None)
    with pytest.raises(ValueError, match=r"n=3, dim=8\) to match the position embedding"):
        AttentionPool(8, 2, num_positions=3)(z)
    q, x, y = torch.randn(1, 3, 2), torch.randn(1, 5, 2), torch.randn(1, 5, 1)
    for args, err, match in [
        ((q, x, y, 0.0), ValueError, r"bandwidth must be a positive number"),
        ((q, x, y, -1.0), ValueError, r"bandwidth must be a positive number"),
        ((q, x, y, torch.tensor(-0.5)), ValueError, r"bandwidth must be > 0"),
        ((q[..., :1], x, y, 1.0), ValueError, r"must share d"),
        ((q, x, y[:, :4], 1.0), ValueError, r"must share \(batch, n\)"),
        ((q[0], x, y, 1.0), ValueError, r"queries must have shape \(batch, m, d\)"),
        ((q, x.long(), y, 1.0), TypeError, r"keys must be a floating-point tensor"),
        ((q, x[:, :0], y[:, :0], 1.0), ValueError, r"at least one query and one"),
    ]:
        with pytest.raises(err, match=match):
            nadaraya_watson(*args)
    with pytest.raises(ValueError, match="pool must be"):
        SetClassifier(4, 2, pool="sum")
    with pytest.raises(ValueError, match="num_seeds"):
        PMA(8, 2, num_seeds=0)
    with pytest.raises(ValueError, match="divisible"):
        AttentionPool(6, 4)


def test_empty_batch():
    z = torch.zeros(0, 5, 8)
    assert PMA(8, 2, num_seeds=3)(z).output.shape == (0, 3, 8)
    assert AttentionPool(8, 2, out_dim=4)(z).output.shape == (0, 4)
    for pool in ("pma", "clip", "mean", "max"):
        assert SetClassifier(8, 3, dim=8, pool=pool, num_heads=2)(z).output.shape == (0, 3)
    out, w = nadaraya_watson(torch.zeros(0, 3, 1), torch.zeros(0, 4, 1), torch.zeros(0, 4, 2), 1.0, need_weights=True)
    assert out.shape == (0, 3, 2) and w.shape == (0, 3, 4)


# ----------------------------------------------------------------------------- tasks and registry


def test_content_mean_sets_labels():
    sets = ContentMeanSets()
    b = sets.sample(256, torch.Generator().manual_seed(0))
    assert b["x"].shape == (256, 48, 5) and b["mask"].shape == (256, 48)
    for n in range(256):
        real = b["x"][n][b["mask"][n]]
        a = real[real[:, 1] == 1, 0]
        assert len(a) >= 1
        assert int(b["y"][n]) == int(a.mean() > real[:, 0].mean())
    assert 0.35 < b["y"].float().mean() < 0.65
    assert torch.equal(sets.sample(4, torch.Generator().manual_seed(3))["x"], sets.sample(4, torch.Generator().manual_seed(3))["x"])


@pytest.mark.parametrize("name, cls", [("pma", PMA), ("clip_pool", AttentionPool), ("nadaraya_watson", NadarayaWatson)])
def test_registry_and_own_tasks(name, cls):
    m = registry.get(name)
    assert m.chapter == 19 and m.data == "set" and m.cls is cls and m.build is None
    assert registry.chapter(19).slug == "attention_pooling"
    assert m.own_task is not None  # the own task lives in attn.experiments.attention_pooling, by size
    task = own_tasks()[name]("quick")
    hist = train(task.model, task.sample, task.loss, steps=3, batch_size=8, log_every=1, progress=False)
    assert len(hist.loss) == 3 and "acc" in hist.metrics
    g = torch.Generator().manual_seed(0)
    for size in task.sizes:
        assert task.layer(*task.inputs(size, g)).output.shape[0] == 8
    w = task.weights(task.model, task.sample(4, g))
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))
    with pytest.raises(ValueError, match="unknown task size 'huge'"):
        (make_regression_task if name == "nadaraya_watson" else make_set_task)("huge")


def test_learned_bandwidth_moves_towards_the_better_one():
    task = KernelRegressionTask()
    nw = NadarayaWatson(2.0)  # far too wide: the fit is a flat line
    train(nw, task.sample, make_regression_task("quick").loss, steps=40, batch_size=16, lr=5e-2, progress=False)
    assert float(nw.bandwidth.detach()) < 0.8


# ----------------------------------------------------------------------------- Nadaraya-Watson numerics (issue 15)


def test_nadaraya_watson_float32_far_from_the_origin():
    """Shift invariance: centred first, float32 at offset 1,000 keeps the accuracy it has at the origin.

    The reference is the explicit estimator in float64 on the same (float32-rounded) points, so only the
    arithmetic differs. The original (expanded squared distance, not centred) was off by 8.8e-2 here.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 64, 1, generator=g, dtype=torch.float64) * 5
    y = torch.sin(2 * x)
    q = torch.linspace(0, 5, 50, dtype=torch.float64)[None, :, None].expand(4, -1, -1)
    for offset in (0.0, 1e3):
        q32, x32, y32 = (q + offset).float(), (x + offset).float(), y.float()
        ref = gaussian_kernel_weights(q32.double(), x32.double(), 0.3) @ y32.double()
        out = nadaraya_watson(q32, x32, y32, 0.3).output
        assert out.dtype == torch.float32
        assert float((out.double() - ref).abs().max()) < 1e-5, offset
    # masked: the centre is the mean of the real observations, padded garbage does not move it
    km = padding_mask([64, 40, 64, 10], 64)
    x32 = (x + 1e3).float()
    garbage = torch.where(km[..., None], x32, torch.full_like(x32, 1e6))
    torch.testing.assert_close(nadaraya_watson((q + 1e3).float(), garbage, y.float(), 0.3, key_mask=km).output,
                               nadaraya_watson((q + 1e3).float(), x32, y.float(), 0.3, key_mask=km).output)


def test_degenerate_bandwidths_are_rejected_never_nan():
    """bandwidth 1e-20 gave NaN on the original; non-finite ones were accepted (inf: NaN, nan: NaN)."""
    x = torch.tensor([[[0.0], [1.0], [3.0]]])
    y = torch.tensor([[[1.0], [2.0], [6.0]]])
    q = torch.tensor([[[0.9], [2.6]]])
    for h, match in [(float("nan"), "positive number"), (float("inf"), "finite"), (torch.tensor(float("inf")), "finite"),
                     (1e-20, r"bandwidth must be >= 1.08e-19 in torch.float32 \(its square underflows\)"),
                     (torch.tensor(1e-20), r"its square underflows")]:
        with pytest.raises(ValueError, match=match):
            nadaraya_watson(q, x, y, h)
    with pytest.raises(ValueError, match=r"bandwidth must be >= 1.08e-19 \(its square underflows in torch.float32\)"):
        NadarayaWatson(1e-20)
    with pytest.raises(ValueError, match=r"too small for points .* the scores .* overflow \(need bandwidth >= "):
        nadaraya_watson(q * 1e3, x * 1e3, y, 1e-17)
    # small but representable: the limit h -> 0, the nearest observation's value, exactly and finite
    for h in (1e-18, torch.tensor(1e-18)):
        torch.testing.assert_close(nadaraya_watson(q, x, y, h).output, torch.tensor([[[2.0], [6.0]]]))
    # float64 takes far smaller bandwidths
    torch.testing.assert_close(nadaraya_watson(q.double(), x.double(), y.double(), 1e-100).output,
                               torch.tensor([[[2.0], [6.0]]], dtype=torch.float64))
    assert torch.isfinite(gaussian_kernel_weights(q, x, 1e-18)).all()


def test_pools_take_key_mask_by_keyword_and_mab_is_the_one_attention():
    """``pool(z, *, key_mask=None, need_weights=False)`` for every pool and the estimator (a positional mask is a
    ``TypeError``), and the MAB's attention is :class:`attn.attention.Attention` (state dicts as MultiHeadAttention's)."""
    import inspect

    for fn in (PMA.forward, AttentionPool.forward, NadarayaWatson.forward, MAB.forward, nadaraya_watson, SetClassifier.forward):
        params = inspect.signature(fn).parameters
        for name in ("key_mask", "need_weights"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn.__qualname__, name)
    z, km = torch.randn(2, 5, 8), padding_mask([5, 3], 5)
    for pool in (PMA(8, 2), AttentionPool(8, 2)):
        with pytest.raises(TypeError):
            pool(z, km)
    q, x, y = torch.randn(2, 3, 1), torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    with pytest.raises(TypeError):
        nadaraya_watson(q, x, y, 1.0, km)
    mab = PMA(8, 2).mab
    assert type(mab.attention) is Attention and mab.attention.kernel == "sdpa"
    assert set(mab.attention.state_dict()) == set(attn.MultiHeadAttention(8, 2).state_dict())


def test_the_comparison_finds_the_own_task_in_experiments():
    """``attn.compare`` measures ``nadaraya_watson`` on the factory of ``attn.experiments.attention_pooling`` (by size)."""
    from attn import compare

    r = compare.run_one("nadaraya_watson", preset="quick", seed=0, device="cpu", cost=False)
    assert r.status == "ok", r.notes
    assert r.task == make_regression_task("quick").description and 0.0 <= r.metrics["accuracy"] <= 1.0


# ----------------------------------------------------------------------------- issue 16: rare cues, leave-one-out


def test_rare_cue_sets_have_one_to_max_cues_among_the_real_elements_and_the_label_is_their_mean_sign():
    from attn.experiments.attention_pooling import RareCueSets

    task = RareCueSets(size=(20, 200), max_cues=4)
    b = task.sample(512, torch.Generator().manual_seed(0))
    cues = b["cue"].sum(1)
    assert int(cues.min()) == 1 and int(cues.max()) == 4  # max_cues=4 here (the chapter uses the default, 6)
    assert not (b["cue"] & ~b["mask"]).any()  # cues are real elements
    assert torch.equal(b["x"][..., 0].bool(), b["cue"])  # the flag marks exactly the cues
    share = (cues / b["mask"].sum(1)).float()
    assert share.median() < 0.03 and share[b["mask"].sum(1) > 150].max() < 0.03  # rare: a few percent at most
    mean_cue = (b["x"][..., 1] * b["cue"]).sum(1) / cues
    assert torch.equal(b["y"], (mean_cue > 0).long())
    assert 0.4 < b["y"].float().mean() < 0.6
    # max pooling's blind spot exists: sets where the largest |value| among the cues has the other sign than the mean
    v = b["x"][..., 1].masked_fill(~b["cue"], 0.0)
    extreme = v.gather(1, v.abs().argmax(1, keepdim=True))[:, 0]
    assert ((extreme > 0).long() != b["y"]).any()
    with pytest.raises(ValueError, match="max_cues"):
        RareCueSets(size=(2, 10), max_cues=3)


def test_set_classifier_decoder_width_is_a_parameter():
    from attn.experiments.attention_pooling import SetClassifier

    wide = SetClassifier(6, 2, dim=16, pool="mean", decoder_hidden=64)
    assert wide.decoder[0].out_features == 64
    assert SetClassifier(6, 2, dim=16, pool="mean").decoder[0].out_features == 16
    with pytest.raises(ValueError, match="decoder_hidden"):
        SetClassifier(6, 2, decoder_hidden=0)


def test_leave_one_out_error_matches_the_explicit_formula_and_its_gradient():
    from attn.attention_pooling import gaussian_kernel_weights, leave_one_out_mse

    g = torch.Generator().manual_seed(3)
    k = torch.rand(2, 12, 1, generator=g, dtype=torch.float64) * 5
    v = torch.randn(2, 12, 1, generator=g, dtype=torch.float64)
    h = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    ours = leave_one_out_mse(k, v, h)
    w = gaussian_kernel_weights(k, k, h) * (1 - torch.eye(12, dtype=torch.float64))  # drop x_i itself
    w = w / w.sum(-1, keepdim=True)
    ref = ((w @ v - v) ** 2).mean((1, 2))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (g1,) = torch.autograd.grad(ours.sum(), h)
    (g2,) = torch.autograd.grad(ref.sum(), h)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="n >= 2"):
        leave_one_out_mse(k[:, :1], v[:, :1], 0.4)


def test_fit_bandwidth_loo_moves_from_an_oversmoothed_start_to_a_smaller_loo_error():
    from attn.attention_pooling import fit_bandwidth_loo, leave_one_out_mse
    from attn.experiments.attention_pooling import KernelRegressionTask

    d = KernelRegressionTask(n_points=60, noise=0.5).sample(3, torch.Generator().manual_seed(0))
    h = fit_bandwidth_loo(d["keys"], d["values"], init=2.0, steps=60, lr=0.1)
    assert h.shape == (3,) and bool((h < 1.0).all())  # sin(2x) wiggles: a kernel of width 2 over-smooths
    before = leave_one_out_mse(d["keys"], d["values"], 2.0)
    after = torch.stack([leave_one_out_mse(d["keys"][i : i + 1], d["values"][i : i + 1], float(h[i]))[0] for i in range(3)])
    assert bool((after < before).all())
    with pytest.raises(ValueError, match="steps"):
        fit_bandwidth_loo(d["keys"], d["values"], steps=0)
