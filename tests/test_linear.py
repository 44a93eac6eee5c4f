"""Chapter 26: linear attention (elu + 1, chunked causal prefix sums, recurrent form) and FAVOR+ (Performer)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.benchmark import count_flops
from attn.linear import (
    LinearAttention, PerformerAttention, elu_feature, favor_features, linear_attention, linear_attention_quadratic,
    linear_attention_recurrent, orthogonal_gaussian, softmax_kernel_estimate,
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
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up)):
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
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_gradcheck_float64():
    q, k, v = qkv(1, 2, 7, 3, dtype=torch.float64)
    km = padding_mask([5], 7)
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda q, k, v: linear_attention(q, k, v, causal=causal, chunk=3), (q, k, v))
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
        q, k, v = mod.qkv(x).chunk(3, -1)
        split = lambda t: t.reshape(2, 13, mod.num_heads, -1).transpose(1, 2)
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
