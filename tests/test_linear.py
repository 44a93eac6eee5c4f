"""Chapter 26: linear attention (elu + 1, chunked causal prefix sums, recurrent form) and FAVOR+ (Performer)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.attention import Attention
from attn.benchmark import count_flops
from attn.linear import (
    LinearAttention,
    PerformerAttention,
    elu_feature,
    favor_feature_pair,
    favor_features,
    linear_attention,
    linear_attention_quadratic,
    linear_attention_recurrent,
    orthogonal_gaussian,
    softmax_kernel_estimate,
)
from attn.masks import padding_mask


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def qkv(*shape, d_v=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(*shape[:-1], d_v or shape[-1], generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def explicit(q, k, v, causal):
    """The paper's equation 2 term by term, one query at a time (float64): sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)."""
    fq, fk = elu_feature(q), elu_feature(k)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for i in range(q.shape[-2]):
        last = i + 1 if causal else k.shape[-2]
        sim = (fq[..., i : i + 1, :] * fk[..., :last, :]).sum(-1)  # (..., j)
        out[..., i, :] = (sim[..., None] * v[..., :last, :]).sum(-2) / sim.sum(-1, keepdim=True)
    return out


# ----------------------------------------------------------------------------- equality with independent references


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, chunk", [(32, 8), (37, 8), (5, 64), (20, 1)])
def test_matches_explicit_formula_forward_and_gradients(causal, n, chunk):
    q, k, v = qkv(2, 3, n, 6, d_v=5, dtype=torch.float64)
    out = linear_attention(q, k, v, causal=causal, chunk=chunk, eps=0.0)
    ref = explicit(q, k, v, causal)
    assert (out - ref).abs().max() <= 1e-12
    up = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        assert (a - b).abs().max() <= 1e-11


@pytest.mark.parametrize("causal", [False, True])
def test_float32_matches_quadratic_form(causal):
    q, k, v = qkv(2, 2, 70, 16)
    out = linear_attention(q, k, v, causal=causal, chunk=16)
    ref = linear_attention_quadratic(q, k, v, causal=causal)[0]
    assert (out - ref).abs().max() <= 1e-5


def test_recurrent_form_equals_parallel_form():
    q, k, v = qkv(2, 3, 29, 4, d_v=7, dtype=torch.float64)
    rec = linear_attention_recurrent(q, k, v)
    for chunk in (1, 4, 29, 64):
        torch.testing.assert_close(linear_attention(q, k, v, causal=True, chunk=chunk), rec, atol=1e-12, rtol=1e-12)
    up = torch.randn_like(rec)
    g1 = torch.autograd.grad(rec, (q, k, v), up)
    g2 = torch.autograd.grad(linear_attention(q, k, v, causal=True, chunk=8), (q, k, v), up)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_gradcheck_float64():
    q, k, v = qkv(1, 2, 7, 3, dtype=torch.float64)
    km = padding_mask([5], 7)
    for causal in (False, True):
        assert torch.autograd.gradcheck(partial(linear_attention, causal=causal, chunk=3), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: linear_attention(q, k, v, key_mask=km), (q, k, v))
    proj = orthogonal_gaussian(5, 3, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: linear_attention(favor_features(q, proj, True), favor_features(k, proj, False), v, None, causal=True, chunk=2),
        (q, k, v))


def test_constant_feature_map_is_a_running_mean():
    """phi = 1: every key has the same weight; causal output i is the mean of v_0..v_i."""
    _, _, v = qkv(1, 1, 9, 3)
    ones = torch.ones(1, 1, 9, 2)
    out = linear_attention(ones, ones, v, None, causal=True, chunk=4, eps=0.0)
    expected = v.cumsum(-2) / torch.arange(1, 10)[:, None]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(linear_attention(ones, ones, v, None, eps=0.0), v.mean(-2, keepdim=True).expand_as(v))


# ----------------------------------------------------------------------------- FAVOR+


def test_orthogonal_features_are_orthogonal_with_gaussian_norms():
    w = orthogonal_gaussian(24, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert w.shape == (24, 8)
    for b in range(3):
        block = w[b * 8 : (b + 1) * 8]
        gram = block @ block.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-10
    # rows are N(0, I): squared norms average d
    norms = torch.stack([orthogonal_gaussian(16, 8, torch.Generator().manual_seed(s)).norm(dim=-1) ** 2 for s in range(300)])
    assert abs(norms.mean().item() - 8) < 0.3


@pytest.mark.parametrize("orthogonal", [False, True])
def test_favor_estimate_is_unbiased_averaged_over_seeds(orthogonal):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.7, torch.randn(5, 8, generator=g, dtype=torch.float64) * 0.7
    exact = torch.exp(q @ k.T / math.sqrt(8))
    draws = torch.stack([softmax_kernel_estimate(q, k, orthogonal_gaussian(16, 8, torch.Generator().manual_seed(s), orthogonal, torch.float64))
                         for s in range(3000)])
    mean, sem = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    z = ((mean - exact) / sem).abs()
    assert z.max() < 4.5, f"bias of {z.max():.1f} standard errors"
    single_rel = (draws[0] - exact).abs() / exact
    assert single_rel.max() > 0.01  # one draw is noisy: the test can tell an estimate from the exact kernel


def test_error_falls_with_more_features_and_orthogonal_helps():
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(64, 16, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    exact = torch.exp(q @ k.T / 4)

    def err(m, orth):  # mean relative error over 10 draws
        e = [((softmax_kernel_estimate(q, k, orthogonal_gaussian(m, 16, torch.Generator().manual_seed(s), orth, torch.float64)) - exact).abs() / exact).mean()
             for s in range(10)]
        return torch.stack(e).mean().item()

    assert err(256, True) < err(16, True) / 2.5  # the error falls as 1/sqrt(m): a factor 4 from 16 to 256
    assert err(16, True) < err(16, False) and err(64, True) < err(64, False)


def test_favor_stabilisation_cancels_in_attention():
    q, k, v = (t.detach() for t in qkv(2, 10, 8, dtype=torch.float64))
    proj = orthogonal_gaussian(32, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    a = linear_attention(favor_features(q, proj, True), favor_features(k, proj, False), v, None, eps=0.0)
    b = linear_attention(favor_features(q, proj, True, False), favor_features(k, proj, False, False), v, None, eps=0.0)
    torch.testing.assert_close(a, b)
    # and it is the attention of the estimated kernel
    kern = softmax_kernel_estimate(q, k, proj)
    torch.testing.assert_close(a, (kern / kern.sum(-1, keepdim=True)) @ v)


# ----------------------------------------------------------------------------- properties


def test_masked_keys_have_no_influence():
    q, k, v = (t.detach() for t in qkv(2, 2, 15, 4))
    km = padding_mask([15, 9], 15)
    out = linear_attention(q, k, v, key_mask=km)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 9:] += 50
    v2[1, :, 9:] -= 50
    torch.testing.assert_close(linear_attention(q, k2, v2, key_mask=km), out)
    torch.testing.assert_close(out[1:], linear_attention(q[1:, :, :], k[1:, :, :9], v[1:, :, :9]))
    torch.testing.assert_close(out, linear_attention_quadratic(q, k, v, key_mask=km)[0])


def test_causal_outputs_ignore_the_future():
    q, k, v = (t.detach() for t in qkv(1, 2, 30, 4))
    out = linear_attention(q, k, v, causal=True, chunk=8)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, 13:] = torch.randn_like(t[:, :, 13:])
    torch.testing.assert_close(linear_attention(q2, k2, v2, causal=True, chunk=8)[:, :, :13], out[:, :, :13])


def test_batched_equals_per_example_and_three_dim_input():
    q, k, v = (t.detach() for t in qkv(3, 2, 11, 4))
    out = linear_attention(q, k, v, causal=True, chunk=4)
    per = torch.cat([linear_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], causal=True, chunk=4) for i in range(3)])
    torch.testing.assert_close(out, per)
    torch.testing.assert_close(linear_attention(q[:, 0], k[:, 0], v[:, 0], causal=True, chunk=4), out[:, 0])


def test_fully_masked_keys_give_zeros_not_nan():
    q, k, v = qkv(1, 1, 6, 4)
    out = linear_attention(q, k, v, key_mask=torch.zeros(1, 6, dtype=torch.bool))
    assert torch.isfinite(out).all() and out.abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_flops_grow_linearly():
    def flops(n):
        q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
        with torch.no_grad():
            return count_flops(lambda: linear_attention(q, k, v, causal=True, chunk=32))

    f1, f2, f4 = flops(1024), flops(2048), flops(4096)
    assert f1 > 0 and 1.95 < f2 / f1 < 2.05 and 1.95 < f4 / f2 < 2.05


# ----------------------------------------------------------------------------- modules and registry


def test_modules_equal_the_quadratic_form_with_their_weights():
    x = torch.randn(2, 13, 16)
    km = padding_mask([13, 8], 13)
    for mod in (LinearAttention(16, 4, causal=True, chunk=4), PerformerAttention(16, 2, num_features=12, causal=False)):
        out, w = mod(x, key_mask=km, need_weights=True)
        q, k, v = mod.q_proj(x), mod.k_proj(x), mod.v_proj(x)  # Attention's projections

        def split(t: torch.Tensor, heads: int = mod.num_heads) -> torch.Tensor:
            return t.reshape(2, 13, heads, -1).transpose(1, 2)

        fq, fk = mod.features(split(q), split(k))
        ref = linear_attention_quadratic(fq, fk, split(v), None, causal=mod.causal, key_mask=km)[0]
        torch.testing.assert_close(out, mod.out_proj(ref.transpose(1, 2).reshape(2, 13, 16)), atol=1e-5, rtol=1e-5)
        assert w.shape == (2, mod.num_heads, 13, 13)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, mod.num_heads, 13), atol=1e-5, rtol=1e-5)
        assert (w[1, :, :, 8:] == 0).all()


def test_performer_approaches_softmax_attention_with_many_features():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 32, 8, dtype=torch.float64) * 0.6 for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)

    def error(m):
        errs = []
        for s in range(4):
            proj = orthogonal_gaussian(m, 8, torch.Generator().manual_seed(s), dtype=torch.float64)
            approx = linear_attention(favor_features(q, proj, True), favor_features(k, proj, False), v, None)
            errs.append((approx - exact).abs().mean().item())
        return sum(errs) / len(errs)

    e8, e512 = error(8), error(512)
    assert e512 < e8 / 3 and e512 < 0.05


def test_performer_redraw_changes_the_projection():
    mod = PerformerAttention(8, 2, num_features=6)
    before = mod.projection.clone()
    mod.redraw(torch.Generator().manual_seed(5))
    assert not torch.equal(before, mod.projection)


def test_registry_builds():
    for name, cls in (("linear", LinearAttention), ("performer", PerformerAttention)):
        mech = registry.get(name)
        assert mech.chapter == 26 and mech.cls is cls
        layer = mech.build(32, 4)
        x = torch.randn(2, 19, 32)
        out, w = layer(x, need_weights=True)
        assert out.shape == (2, 19, 32) and w.shape == (2, 4, 19, 19)
        assert layer(x).weights is None
        assert layer(torch.randn(0, 5, 32)).output.shape == (0, 5, 32)


BAD = [
    ("list", lambda q: (q.tolist(), q, q), {}, TypeError, "query must be a torch.Tensor"),
    ("int", lambda q: (q, q.long(), q), {}, TypeError, "key must be a floating-point"),
    ("2-D", lambda q: (q[0, 0], q[0, 0], q[0, 0]), {}, ValueError, r"\(batch, seq, dim\) or \(batch, heads, seq, dim\)"),
    ("d mismatch", lambda q: (q, q[..., :2], q), {}, ValueError, "share d_k"),
    ("causal lengths", lambda q: (q[:, :, :5], q, q), {"causal": True}, ValueError, "as many queries as keys"),
    ("chunk 0", lambda q: (q, q, q), {"chunk": 0}, ValueError, "chunk must be >= 1"),
    ("chunk float", lambda q: (q, q, q), {"chunk": 4.0}, TypeError, "chunk must be an int"),
    ("mask shape", lambda q: (q, q, q), {"key_mask": torch.ones(2, 3, dtype=torch.bool)}, ValueError, r"\(batch=2, n_keys=8\)"),
    ("eps negative", lambda q: (q, q, q), {"eps": -1e-3}, ValueError, "eps must be >= 0"),
    ("eps nan", lambda q: (q, q, q), {"eps": float("nan")}, ValueError, "eps must be finite"),
]


@pytest.mark.parametrize("case, make, kwargs, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, make, kwargs, exc, match):
    q = torch.randn(2, 1, 8, 4)
    with pytest.raises(exc, match=match):
        linear_attention(*make(q), **kwargs)


def test_module_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(6, 4)
    with pytest.raises(ValueError, match="num_features"):
        PerformerAttention(8, 2, num_features=0)
    with pytest.raises(ValueError, match=r"\(batch, seq, embed_dim=8\)"):
        LinearAttention(8, 2)(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"key_mask must have shape"):
        LinearAttention(8, 2)(torch.randn(2, 3, 8), key_mask=torch.ones(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- FAVOR+ stabilisation (issue 15)


def _favor_reference(q, k, v, proj, key_mask=None):
    """FAVOR+ attention in float64 log space: weights softmax_j(log sum_l exp(b_il + a_jl)), no feature ever formed."""
    q, k, v, proj = (t.detach().double() for t in (q, k, v, proj))
    qs, ks = q * q.shape[-1] ** -0.25, k * k.shape[-1] ** -0.25
    b = qs @ proj.T - (qs * qs).sum(-1, keepdim=True) / 2  # (..., n_q, m)
    a = ks @ proj.T - (ks * ks).sum(-1, keepdim=True) / 2  # (..., n_k, m)
    logits = torch.logsumexp(b[..., :, None, :] + a[..., None, :, :], -1)  # (..., n_q, n_k): log phi(q_i).phi(k_j) + log m
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.reshape(key_mask.shape[0], *([1] * (logits.ndim - 3)), 1, -1), -math.inf)
    return logits.softmax(-1) @ v


def _outlier_case(c=4.0, n=20, d=16, m=32, seed=0):
    """Keys and queries of unit scale plus one key aligned with the longest projection row, ``c`` times over."""
    g = torch.Generator().manual_seed(seed)
    proj = orthogonal_gaussian(m, d, g)
    q, k, v = torch.randn(1, n, d, generator=g), torch.randn(1, n, d, generator=g), torch.randn(1, n, 4, generator=g)
    k[0, 3] = c * proj[proj.norm(dim=-1).argmax()] * d**0.25
    return q, k, v, proj


@pytest.mark.parametrize("causal", [False, True])
def test_one_outlier_key_cannot_zero_the_favor_output(causal):
    """eps = 0 and a global key maximum: one outlier key underflowed every other feature and the rows came out 0.

    On the original code (global maximum over keys, eps = 0) all 20 rows are exactly 0 in float32
    (error 0.84 against the float64 reference); the jointly stabilised pair keeps them to ~1e-6.
    """
    q, k, v, proj = _outlier_case()
    out = linear_attention(*favor_feature_pair(q, k, proj), v, None, causal=causal, chunk=4, eps=0.0)
    assert bool((out.abs().amax(-1) > 0).all())
    if not causal:
        assert float((out.double() - _favor_reference(q, k, v, proj)).abs().max()) < 1e-4
    # the layer uses the pair: a large key at one position leaves no row at zero
    layer = PerformerAttention(16, 1, num_features=32, causal=causal, chunk=4)
    with torch.no_grad():
        x = torch.randn(1, 20, 16, generator=torch.Generator().manual_seed(1))
        x[0, 3] *= 40
        y = layer(x).output
        pre = layer.out_proj.bias.detach().expand_as(y)  # a zero attention output leaves only the bias
    assert float((y - pre).abs().amax(-1).min()) > 0


def test_favor_pair_is_the_estimator_up_to_a_per_query_constant():
    q, k, v = (t.detach() for t in qkv(2, 3, 9, 8, dtype=torch.float64))
    proj = orthogonal_gaussian(24, 8, torch.Generator().manual_seed(2), dtype=torch.float64)
    fq, fk = favor_feature_pair(q, k, proj)
    ratio = (fq @ fk.transpose(-1, -2)) / softmax_kernel_estimate(q, k, proj)  # (..., n_q, n_k)
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-12, atol=0)
    assert float(fq.max()) <= 1 / math.sqrt(24) + 1e-15 and float(fk.max()) <= 1 / math.sqrt(24) + 1e-15  # exponents <= 0
    km = padding_mask([9, 6], 9)
    fq, fk = favor_feature_pair(q, k, proj, km)
    assert float(fk[1, :, 6:].abs().max()) == 0
    out = linear_attention(fq, fk, v, None, key_mask=km, eps=0.0)
    torch.testing.assert_close(out, _favor_reference(q, k, v, proj, km), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", ["right", "left", "holes"])
def test_performer_padded_content_never_reaches_real_outputs_float32(pad, causal):
    """The original took the key maximum over padded keys too: padded content of scale 1e3 moved real outputs by O(1)."""
    torch.manual_seed(0)
    layer = PerformerAttention(16, 4, num_features=64, causal=causal, chunk=4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 16, generator=g)
    km = {"right": padding_mask([12, 7], 12), "left": padding_mask([12, 7], 12).flip(-1),
          "holes": torch.tensor([[True] * 12, [True, False, False, True, True, False, True, False, True, True, False, True]])}[pad]
    x2 = torch.where(km[..., None], x, 1e3 * torch.randn(2, 12, 16, generator=g))
    with torch.no_grad():
        y1, y2 = layer(x, key_mask=km).output[km], layer(x2, key_mask=km).output[km]
        alone = layer(x[1:, km[1]]).output[0]  # the real tokens of the second row, unpadded
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1[12:], alone, rtol=1e-5, atol=1e-6)


def test_favor_features_masked_keys_are_zero_and_set_no_maximum():
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, 7, 8, generator=g)
    proj = orthogonal_gaussian(16, 8, g)
    km = padding_mask([7, 4], 7)
    base = favor_features(k, proj, False, key_mask=km)
    k2 = k.clone()
    k2[1, 4:] = 100 * proj[0] * 8**0.25  # would own the maximum if it counted
    torch.testing.assert_close(favor_features(k2, proj, False, key_mask=km), base, rtol=0, atol=0)
    assert float(base[1, 4:].abs().max()) == 0
    assert torch.isfinite(favor_features(k, proj, False, key_mask=torch.zeros(2, 7, dtype=torch.bool))).all()


def test_modules_are_attention_and_attend_across_sequences():
    """Issue 23: LinearAttention and PerformerAttention are ``Attention`` with the "linear" / "performer" kernels:
    cross-attention (L != S) equals the quadratic form on the layer's own projections, and a general attn_mask
    (an L x S tensor the linear form never needs) is refused."""
    torch.manual_seed(3)
    q_in, kv = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 9, 16, dtype=torch.float64)
    km = padding_mask([9, 4], 9)
    for mod in (LinearAttention(16, 4).double(), PerformerAttention(16, 2, num_features=12).double()):
        assert isinstance(mod, Attention) and mod.kernel in ("linear", "performer")
        out, w = mod(q_in, kv, key_mask=km, need_weights=True)
        h = mod.num_heads

        def split(t: torch.Tensor, heads: int = h) -> torch.Tensor:
            return t.reshape(2, t.shape[1], heads, -1).transpose(1, 2)

        fq, fk = mod.features(split(mod.q_proj(q_in)), split(mod.k_proj(kv)), km)
        ref, w_ref = linear_attention_quadratic(fq, fk, split(mod.v_proj(kv)), None, key_mask=km)
        torch.testing.assert_close(out, mod.out_proj(ref.transpose(1, 2).reshape(2, 5, 16)), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(w, w_ref, atol=1e-12, rtol=1e-12)
        with pytest.raises(ValueError, match="not an attn_mask"):
            mod(q_in, kv, attn_mask=torch.ones(5, 9, dtype=torch.bool))
