"""Chapter 9: factorised sparse patterns, top-k attention, sparsemax / entmax."""

from __future__ import annotations

from functools import partial

import entmax as entmax_pkg
import pytest
import torch
import torch.nn.functional as F

from attn import benchmark, registry
from attn.core import scaled_dot_product_attention
from attn.masks import padding_mask
from attn.multihead import MultiHeadAttention
from attn.sparse import (
    SparseAttention,
    TopKAttention,
    default_stride,
    fixed_attention,
    fixed_mask,
    strided_attention,
    strided_mask,
    topk_attention,
    topk_mask,
)
from attn.sparsemax import (
    EntmaxAttention,
    SparsemaxAttention,
    entmax,
    entmax15,
    entmax_attention,
    entmax_bisect,
    sparsemax,
)

F64 = torch.float64


def qkv(*shape, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def run_pattern(pattern, q, k, v, ell, c=2, **kw):
    kw.setdefault("blockwise", True)  # the blockwise parts, even where dense attention would be cheaper
    if pattern == "strided":
        return strided_attention(q, k, v, stride=ell, **kw)
    return fixed_attention(q, k, v, block=ell, c=c, **kw)


def pattern_mask(pattern, n, ell, c=2, causal=True):
    return strided_mask(n, ell, causal) if pattern == "strided" else fixed_mask(n, ell, c, causal)


# ----------------------------------------------------------------------------- the dense reference masks


def test_masks_are_the_papers_sets():
    """Child et al. 2019, section 4.2: A1 and A2 written out as Python sets."""
    for n, ell in [(13, 3), (16, 4), (9, 1)]:
        sm = strided_mask(n, ell)
        for i in range(n):
            a1 = set(range(max(0, i - ell), i + 1))
            a2 = {j for j in range(i + 1) if (i - j) % ell == 0}
            assert set(sm[i].nonzero().flatten().tolist()) == a1 | a2
    for n, ell, c in [(13, 4, 1), (16, 4, 2), (10, 5, 5)]:
        fm = fixed_mask(n, ell, c)
        for i in range(n):
            a1 = {j for j in range(i + 1) if j // ell == i // ell}
            a2 = {j for j in range(i + 1) if j % ell >= ell - c}
            assert set(fm[i].nonzero().flatten().tolist()) == a1 | a2
    two = strided_mask(10, 3, causal=False)
    assert torch.equal(two, two.T) and two[9, 0] and not two[8, 0]
    assert torch.equal(fixed_mask(12, 4, 1, causal=False).tril(), fixed_mask(12, 4, 1))


def test_default_stride_is_ceil_sqrt():
    assert [default_stride(n) for n in (1, 2, 4, 5, 16, 17, 1024)] == [1, 2, 2, 3, 4, 5, 32]


# ----------------------------------------------------------------------------- factorised patterns == dense masked


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,ell", [(1, 1), (7, 2), (16, 4), (30, 4), (33, 6)])
def test_pattern_equals_dense_attention_with_its_mask(pattern, causal, n, ell):
    q, k, v = qkv(2, 3, n, 8, grad=True)
    km = padding_mask([n, max(1, n - 5)], n)
    c = min(2, ell)
    out = run_pattern(pattern, q, k, v, ell, c, causal=causal, key_mask=km).output
    mask = pattern_mask(pattern, n, ell, c, causal) & km[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    up = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_weights_equal_dense_weights(pattern):
    q, k, v = qkv(2, 2, 23, 5, dtype=F64)
    km = padding_mask([23, 17], 23)
    out, w = run_pattern(pattern, q, k, v, 5, 2, key_mask=km, need_weights=True)
    ref = scaled_dot_product_attention(q, k, v, attn_mask=pattern_mask(pattern, 23, 5, 2), key_mask=km, need_weights=True)
    torch.testing.assert_close(w, ref.weights, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, ref.output, atol=1e-12, rtol=0)
    assert torch.equal(w[0] > 0, pattern_mask(pattern, 23, 5, 2).expand(2, 23, 23))


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_pattern_gradcheck(pattern):
    q, k, v = qkv(1, 1, 7, 2, dtype=F64, grad=True)
    km = padding_mask([6], 7)
    assert torch.autograd.gradcheck(lambda q, k, v: run_pattern(pattern, q, k, v, 3, 1, key_mask=km).output, (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: run_pattern(pattern, q, k, v, 2, 2, causal=False).output, (q, k, v),
                                    fast_mode=True)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_pattern_properties(pattern):
    q, k, v = qkv(3, 2, 20, 4)
    base = run_pattern(pattern, q, k, v, 4).output
    # causal: changing tokens 12.. leaves outputs 0..11 unchanged
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 12:] += 5
    v2[:, :, 12:] -= 3
    torch.testing.assert_close(run_pattern(pattern, q, k2, v2, 4).output[:, :, :12], base[:, :, :12])
    # masked keys have no influence
    km = torch.ones(3, 20, dtype=torch.bool)
    km[:, 5] = False
    k3, v3 = k.clone(), v.clone()
    k3[:, :, 5] = 100.0
    v3[:, :, 5] = -100.0
    torch.testing.assert_close(run_pattern(pattern, q, k3, v3, 4, key_mask=km).output,
                               run_pattern(pattern, q, k, v, 4, key_mask=km).output)
    # batched equals per example; 3-D input equals one head
    for b in range(3):
        torch.testing.assert_close(run_pattern(pattern, q[b : b + 1], k[b : b + 1], v[b : b + 1], 4).output, base[b : b + 1])
    torch.testing.assert_close(run_pattern(pattern, q[:, 0], k[:, 0], v[:, 0], 4).output, base[:, 0])


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_fully_masked_query_gives_zeros_not_nan(pattern):
    q, k, v = qkv(2, 1, 9, 4, grad=True)
    km = torch.ones(2, 9, dtype=torch.bool)
    km[0, :3] = False  # causal: queries 0..2 of example 0 see no key at all
    out, w = run_pattern(pattern, q, k, v, 3, 1, key_mask=km, need_weights=True)
    assert torch.isfinite(out).all() and out[0, 0, :3].abs().max() == 0 and w[0, 0, :3].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert q.grad[0, 0, :3].abs().max() == 0


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_sparse_module_equals_multihead_with_the_pattern_mask(pattern):
    layer = SparseAttention(32, 4, pattern=pattern, stride=4, summary=2)
    ref = MultiHeadAttention(32, 4)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 18, 32, requires_grad=True)
    km = padding_mask([18, 11], 18)
    out, w = layer(x, key_mask=km, need_weights=True)
    ref_out, ref_w = ref(x, key_mask=km, attn_mask=layer.mask(18), need_weights=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=0)
    up = torch.randn_like(out)
    ga = torch.autograd.grad(out, [x, *layer.parameters()], up)
    gb = torch.autograd.grad(ref_out, [x, *ref.parameters()], up)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pattern_memory_and_flops_grow_subquadratically():
    """Deterministic efficiency: no n x n tensor at n = 4096; FLOPs grow as n^1.5, not n^2."""
    n = 4096
    q, k, v = qkv(1, 1, n, 16)
    for pattern in ("strided", "fixed"):
        with torch.no_grad():
            peak = benchmark.peak_memory(partial(run_pattern, pattern, q, k, v, 64, 2), "cpu")
        assert peak < n * n * 4 / 6, f"{pattern}: peak {peak} bytes vs n*n*4 = {n * n * 4}"
    flops = {}
    for n in (1024, 4096):
        q, k, v = qkv(1, 1, n, 16)
        with torch.no_grad():
            flops[n] = benchmark.count_flops(partial(strided_attention, q, k, v))  # stride sqrt(n)
    p = benchmark.fit_exponent(list(flops), list(flops.values()))
    assert 1.45 < p < 1.55, p
    # the same FLOP count as the formula: band 2 * (n * 2l * d) * 2 and columns 2 * (ell * m^2 * d) * 2
    n, ell, d = 4096, 64, 16
    assert flops[n] == 2 * 2 * n * 2 * ell * d + 2 * 2 * ell * (n // ell) ** 2 * d


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_sparse_module_dropout_only_in_training(pattern):
    layer = SparseAttention(16, 2, pattern=pattern, stride=3, summary=1, dropout=0.5)
    x = torch.randn(2, 10, 16)
    layer.eval()
    torch.testing.assert_close(layer(x).output, layer(x).output)
    layer.train()
    torch.manual_seed(1)
    a = layer(x).output
    torch.manual_seed(2)
    assert not torch.allclose(a, layer(x).output)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        run_pattern(pattern, *qkv(1, 5, 4), 2, 1, dropout_p=1.0)


def test_pattern_bad_input():
    q, k, v = qkv(2, 8, 4)
    with pytest.raises(ValueError, match="must have shape"):
        strided_attention(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match="lengths must match"):
        strided_attention(q, k[:, :5], v[:, :5])
    with pytest.raises(ValueError, match="empty sequence"):
        fixed_attention(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(TypeError, match="stride must be an int"):
        strided_attention(q, k, v, stride=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stride must be >= 1"):
        strided_attention(q, k, v, stride=0)
    with pytest.raises(ValueError, match="must be <= block"):
        fixed_attention(q, k, v, block=2, c=3)
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool"):
        strided_attention(q, k, v, key_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=2, n_keys=8\)"):
        strided_attention(q, k, v, key_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="pattern must be"):
        SparseAttention(8, 2, pattern="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x must have shape|query must have shape"):
        SparseAttention(8, 2)(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="must be <= block"):
        fixed_mask(8, 2, 3)


# ----------------------------------------------------------------------------- top-k


def explicit_topk(scores, k, allowed):
    """Per row: allowed keys sorted by (-score, index), first k; softmax over them."""
    keep = torch.zeros_like(allowed)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in scores.shape[:-1]]).reshape(-1, scores.ndim - 1):
        row = tuple(idx.tolist())
        cand = [j for j in range(scores.shape[-1]) if allowed[row][j]]
        cand.sort(key=lambda j: (-scores[row][j].item(), j))
        keep[row][cand[:k]] = True
    return keep


def test_topk_matches_explicit_formula_with_ties():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (2, 2, 9, 4), generator=g).double()  # integer scores: many ties
    k = torch.randint(-2, 3, (2, 2, 9, 4), generator=g).double()
    v = torch.randn(2, 2, 9, 5, generator=g, dtype=F64)
    km = padding_mask([9, 6], 9)
    for topk, causal in [(1, False), (3, True), (4, False), (20, True)]:
        out, w = topk_attention(q, k, v, topk, key_mask=km, is_causal=causal, scale=1.0, need_weights=True)
        allowed = km[:, None, None, :] & (torch.ones(9, 9, dtype=torch.bool).tril() if causal else True)
        allowed = allowed.expand(2, 2, 9, 9)
        scores = q @ k.transpose(-1, -2)
        keep = explicit_topk(scores, topk, allowed)
        expected = torch.where(keep, scores, float("-inf")).softmax(-1)
        torch.testing.assert_close(w, expected)
        torch.testing.assert_close(out, expected @ v)
        assert ((w > 0).sum(-1) <= topk).all()


def test_topk_ties_are_deterministic_and_gradients_match():
    s = torch.zeros(1, 6)
    assert topk_mask(s, 2).tolist() == [[True, True, False, False, False, False]]
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert topk_mask(s, 2).tolist() == [[False, True, True, False, False]]
    q, k, v = qkv(2, 3, 10, 4, grad=True, dtype=F64)
    out = topk_attention(q, k, v, 3).output
    keep = topk_mask((q @ k.transpose(-1, -2)).detach() / 2, 3)
    ref = scaled_dot_product_attention(q, k, v, attn_mask=keep).output
    up = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        torch.testing.assert_close(a, b)
    q, k, v = (t.detach()[:1, :1, :6].requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: topk_attention(q, k, v, 3, is_causal=True).output, (q, k, v))


def test_topk_with_k_at_least_n_is_softmax_attention():
    q, k, v = qkv(2, 2, 7, 4)
    km = padding_mask([7, 4], 7)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=km[:, None, None, :])
    torch.testing.assert_close(topk_attention(q, k, v, 7, key_mask=km).output, ref)
    torch.testing.assert_close(topk_attention(q, k, v, 100, key_mask=km).output, ref)


def test_topk_module_and_bad_input():
    layer = TopKAttention(16, 2, topk=3)
    x = torch.randn(2, 9, 16)
    out, w = layer(x, key_mask=padding_mask([9, 5], 9), need_weights=True)
    assert out.shape == (2, 9, 16) and ((w > 0).sum(-1) == 3).all() and w[1, :, :, 5:].abs().max() == 0
    torch.testing.assert_close(layer(x[1:]).output, layer(x).output[1:])
    q, k, v = qkv(2, 5, 4)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        topk_attention(q, k, v, 0)
    with pytest.raises(TypeError, match=r"attn_mask must be a torch\.bool"):
        topk_attention(q, k, v, 2, attn_mask=torch.zeros(5, 5))
    with pytest.raises(ValueError, match="does not broadcast"):
        topk_attention(q, k, v, 2, attn_mask=torch.ones(4, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------- sparsemax / entmax


REFS = {
    "sparsemax": (lambda z, d: sparsemax(z, d), lambda z, d: entmax_pkg.sparsemax(z, d)),
    "entmax15": (lambda z, d: entmax15(z, d), lambda z, d: entmax_pkg.entmax15(z, d)),
    "bisect 1.25": (lambda z, d: entmax_bisect(z, 1.25, d), lambda z, d: entmax_pkg.entmax_bisect(z, 1.25, d)),
    "bisect 1.5": (lambda z, d: entmax_bisect(z, 1.5, d), lambda z, d: entmax_pkg.entmax15(z, d)),
    "bisect 2": (lambda z, d: entmax_bisect(z, 2.0, d), lambda z, d: entmax_pkg.sparsemax(z, d)),
    "bisect 3": (lambda z, d: entmax_bisect(z, 3.0, d), lambda z, d: entmax_pkg.entmax_bisect(z, 3.0, d)),
}


@pytest.mark.parametrize("name", list(REFS))
@pytest.mark.parametrize("dim", [-1, 1])
def test_entmax_family_matches_the_entmax_package(name, dim):
    ours, ref = REFS[name]
    z = (torch.randn(6, 17, 5) * 3).requires_grad_()
    a, b = ours(z, dim), ref(z, dim)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    up = torch.randn_like(a)
    torch.testing.assert_close(torch.autograd.grad(a, z, up)[0], torch.autograd.grad(b, z, up)[0], atol=1e-5, rtol=0)


def test_sparsemax_closed_form_sums_to_one_with_exact_zeros():
    z = torch.randn(200, 12, dtype=F64) * 2
    p = sparsemax(z)
    torch.testing.assert_close(p.sum(-1), torch.ones(200, dtype=F64))
    assert (p == 0).any(-1).float().mean() > 0.9 and (p >= 0).all()
    # the threshold: tau = (sum of the support - 1) / |support|, and p = max(z - tau, 0)
    support = p > 0
    tau = ((z * support).sum(-1) - 1) / support.sum(-1)
    torch.testing.assert_close(p, (z - tau[:, None]).clamp(min=0))
    # scores far apart: one-hot; equal scores: uniform (sparsemax = projection onto the simplex)
    assert sparsemax(torch.tensor([[0.0, 5.0, 1.0]])).tolist() == [[0.0, 1.0, 0.0]]
    torch.testing.assert_close(sparsemax(torch.zeros(1, 4)), torch.full((1, 4), 0.25))


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 1.3])
def test_entmax_gradcheck_and_masks(alpha):
    z = torch.randn(3, 7, dtype=F64, requires_grad=True)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[0] = False
    assert torch.autograd.gradcheck(lambda z: entmax(z, alpha, mask=mask), (z,))
    p = entmax(z, alpha, mask=mask)
    assert (p[~mask] == 0).all() and torch.isfinite(p).all() and p[0].abs().max() == 0
    torch.testing.assert_close(p[1:].sum(-1), torch.ones(2, dtype=F64))
    p.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad[0].abs().max() == 0


def test_entmax_attention_properties():
    q, k, v = qkv(2, 2, 8, 4, grad=True)
    km = padding_mask([8, 5], 8)
    # alpha = 1 is softmax attention
    torch.testing.assert_close(entmax_attention(q, k, v, 1.0, key_mask=km).output,
                               F.scaled_dot_product_attention(q, k, v, attn_mask=km[:, None, None, :]))
    for alpha in (1.5, 2.0, 2.5):
        out, w = entmax_attention(q, k, v, alpha, key_mask=km, is_causal=True, need_weights=True)
        assert w[1, :, :, 5:].abs().max() == 0 and w.triu(1).abs().max() == 0
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 8))
        torch.testing.assert_close(out, w @ v)
        torch.testing.assert_close(entmax_attention(q[:1], k[:1], v[:1], alpha, key_mask=km[:1], is_causal=True).output, out[:1])
    z = q[:1, :1, :6].double().detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: entmax_attention(z, z, z, 1.5, is_causal=True).output, (z,))


def test_entmax_modules_and_bad_input():
    layer = SparsemaxAttention(16, 4)
    ref = MultiHeadAttention(16, 4)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 10, 16)
    out, w = layer(x, need_weights=True)
    assert (w == 0).float().mean() > 0.3
    q, k, v = (p(x).view(2, 10, 4, 4).transpose(1, 2) for p in (ref.q_proj, ref.k_proj, ref.v_proj))
    expected = entmax_pkg.sparsemax(q @ k.transpose(-1, -2) / 2, -1) @ v
    torch.testing.assert_close(out, ref.out_proj(expected.transpose(1, 2).reshape(2, 10, 16)), atol=1e-5, rtol=0)
    assert EntmaxAttention(16, 4, alpha=1.0)(x).output.shape == (2, 10, 16)
    with pytest.raises(ValueError, match="alpha must be a number >= 1"):
        EntmaxAttention(16, 4, alpha=0.5)
    with pytest.raises(ValueError, match="alpha > 1"):
        entmax_bisect(torch.randn(3), 1.0)
    with pytest.raises(TypeError, match=r"mask must be a torch\.bool"):
        sparsemax(torch.randn(3), mask=torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        entmax15(torch.arange(3))
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq, embed_dim=16\)"):
        layer(torch.randn(2, 10, 8))


# ----------------------------------------------------------------------------- registry


def test_chapter_9_mechanisms_are_registered_and_build():
    names = {m.name for m in registry.mechanisms(9)}
    assert names == {"sparse-strided", "sparse-fixed", "topk", "entmax", "sparsemax"}
    for name in names:
        layer = registry.get(name).build(16, 4)
        for n in (6, 37):
            x = torch.randn(2, n, 16)
            out, w = layer(x, need_weights=True)
            assert out.shape == (2, n, 16) and w.shape[-2:] == (n, n), name
            torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, n), msg=name)
            torch.testing.assert_close(layer(x).output, out, msg=name)


# ----------------------------------------------------------------------------- sizes clamped to n (issue 15, section 3)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_stride_larger_than_n_costs_no_more_than_dense_and_gives_the_same_output(pattern):
    """A stride (or block) of 512 on n = 8 once cost 600-2,000x dense attention's FLOPs; now at most dense's."""
    q, k, v = qkv(2, 3, 8, 16)
    km = padding_mask([8, 5], 8)
    with torch.no_grad():
        dense = benchmark.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
        for causal in (True, False):
            at_n = run_pattern(pattern, q, k, v, 8, key_mask=km, causal=causal).output  # blockwise at ell = n
            for ell in (512, 4096):
                flops = benchmark.count_flops(partial(run_pattern, pattern, q, k, v, ell, key_mask=km, causal=causal, blockwise=None))
                assert flops <= dense, (ell, flops, dense)
                torch.testing.assert_close(run_pattern(pattern, q, k, v, ell, key_mask=km, causal=causal, blockwise=None).output, at_n)
                forced = benchmark.count_flops(partial(run_pattern, pattern, q, k, v, ell, key_mask=km, causal=causal))
                assert forced <= 4 * dense  # the blocks are clamped to n too
                torch.testing.assert_close(run_pattern(pattern, q, k, v, ell, key_mask=km, causal=causal).output, at_n)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("n,ell", [(1, 1), (7, 2), (16, 4), (64, 8), (33, 6)])
def test_the_cheaper_path_is_taken_and_both_agree(pattern, n, ell):
    q, k, v = qkv(2, 2, n, 8)
    km = padding_mask([n, max(1, n - 3)], n)
    with torch.no_grad():
        c = min(2, ell)
        flops = {bw: benchmark.count_flops(partial(run_pattern, pattern, q, k, v, ell, c, key_mask=km, blockwise=bw))
                 for bw in (None, True, False)}
        assert flops[None] == min(flops[True], flops[False]), flops
        torch.testing.assert_close(run_pattern(pattern, q, k, v, ell, c, key_mask=km, blockwise=True).output,
                                   run_pattern(pattern, q, k, v, ell, c, key_mask=km, blockwise=False).output, atol=1e-6, rtol=1e-5)


def test_sparse_module_stride_larger_than_n():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 32)
    mha = MultiHeadAttention(32, 2).eval()
    with torch.no_grad():
        for pattern in ("strided", "fixed"):
            layer = SparseAttention(32, 2, pattern=pattern, stride=512, summary=4).eval()
            assert benchmark.count_flops(partial(layer, x)) <= benchmark.count_flops(partial(mha, x))
            wide = layer(x).output
            layer.stride = 8
            torch.testing.assert_close(wide, layer(x).output)


def test_mixed_dtypes_and_bad_blockwise():
    q, k, v = qkv(1, 2, 8, 4)
    for fn in (lambda *a, **kw: strided_attention(*a, stride=2, **kw), lambda *a, **kw: fixed_attention(*a, block=4, c=2, **kw),
               lambda *a, **kw: topk_attention(*a, topk=2, **kw)):
        with pytest.raises(TypeError, match=r"dtypes must match \((q|query): torch\.float32, (k|key): torch\.float64, (v|value): torch\.float32\)"):
            fn(q, k.double(), v)
    with pytest.raises(TypeError, match="blockwise must be None, True or False"):
        strided_attention(q, k, v, 2, blockwise=1)


# ----------------------------------------------------------------------------- one attention interface (issue 23)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_sparse_layer_is_its_kernel_around_attention_base(pattern):
    """The patterns are kernels of attn.attention; the layer's is_causal keyword switches the two-sided pattern."""
    from attn.attention import KERNELS, AttentionBase

    assert {"strided", "fixed", "topk", "entmax", "sparsemax"} <= set(KERNELS)
    torch.manual_seed(0)
    layer = SparseAttention(16, 2, pattern=pattern, stride=3, summary=1).double()
    assert isinstance(layer, AttentionBase) and layer.kernel == pattern and layer.causal
    ref = MultiHeadAttention(16, 2).double()
    ref.load_state_dict(layer.state_dict())  # the same parameter names: q_proj, k_proj, v_proj, out_proj
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    km = torch.ones(2, 10, dtype=torch.bool)
    km[1, -3:] = False
    for causal in (True, False):
        out, w = layer(x, key_mask=km, is_causal=causal, need_weights=True)
        want, want_w = ref(x, key_mask=km, attn_mask=layer.mask(10, causal=causal), need_weights=True)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(w, want_w, atol=1e-12, rtol=1e-12)
    with pytest.raises(TypeError):
        SparseAttention(16, 2, "fixed")  # options are keyword-only
    with pytest.raises(ValueError, match="attn_mask"):
        KERNELS[pattern].fn(*(torch.randn(1, 1, 4, 2) for _ in range(3)), attn_mask=torch.ones(4, 4, dtype=torch.bool))


def test_topk_and_entmax_layers_run_their_kernels():
    from attn.attention import Attention

    for layer, kernel in ((TopKAttention(16, 2, topk=3), "topk"), (EntmaxAttention(16, 2), "entmax"),
                          (EntmaxAttention(16, 2, alpha=2), "sparsemax"), (SparsemaxAttention(16, 2), "sparsemax")):
        assert isinstance(layer, Attention) and layer.kernel == kernel
    with pytest.raises(TypeError):
        TopKAttention(16, 2, 3)  # topk is keyword-only


# ------------------------------------------------------------------ chapter 9's experiments (attn.experiments.sparse)

from attn.experiments import sparse as sx  # noqa: E402


def test_distractor_recall_has_the_designed_distractors() -> None:
    """Keys are distinct; with every grid key present, exactly (n_a - 1) + (n_b - 1) keys half-match the query."""
    task = sx.DistractorRecall(64, 8, 8, 8)
    b = task.sample(32, torch.Generator().manual_seed(0))
    keys = b["a"] * 8 + b["b"]
    assert all(len(set(row.tolist())) == 64 for row in keys)
    rows = torch.arange(32)
    assert torch.equal(b["a"][rows, b["where"]], b["qa"]) and torch.equal(b["b"][rows, b["where"]], b["qb"])
    assert torch.equal(b["v"][rows, b["where"]], b["y"])
    half = (b["a"] == b["qa"][:, None]) ^ (b["b"] == b["qb"][:, None])  # one half matches, not both
    assert (half.sum(1) == 14).all()
    with pytest.raises(ValueError):
        sx.DistractorRecall(65, 8, 8)


def test_periodic_sequence_follows_its_rule() -> None:
    """x_t = f(x_{t-p}) with one permutation f, the same for every data generator."""
    task = sx.PeriodicSequence(48, 17, 16)
    x = task.sample(8, torch.Generator().manual_seed(1))["x"]
    assert sorted(task.rule.tolist()) == list(range(16))
    assert torch.equal(x[:, 17:], task.rule[x[:, :-17]])
    assert torch.equal(sx.PeriodicSequence(48, 17, 16).rule, task.rule)
    assert not torch.equal(x[:, :17], task.sample(8, torch.Generator().manual_seed(2))["x"][:, :17])


def test_the_needed_key_is_in_the_strided_columns_and_mostly_outside_the_fixed_pattern() -> None:
    """The design of the periodic LM: position i needs key i + 1 - p = i - 2l (p = 2l + 1)."""
    cfg = sx.LMConfig()
    n, ell, lag = cfg.length, cfg.stride, cfg.period - 1
    assert lag == 2 * ell
    i = torch.arange(lag, n)
    strided, fixed = strided_mask(n, ell), fixed_mask(n, ell, cfg.summary)
    assert strided[i, i - lag].all()
    direct = fixed[i, i - lag].float().mean().item()
    assert direct == pytest.approx(cfg.summary / ell, abs=0.05)


def test_top1_attention_gives_no_gradient_to_the_scores() -> None:
    """Softmax over one kept key is 1 whatever its score: the query and key projections get zero gradient."""
    task = sx.DistractorRecall(16, 4, 4, 4)
    torch.manual_seed(0)
    model = sx.DistractorRecallModel(task, sx.recall_mixer("top-k, k=1", 16, 1), 16)
    loss, _ = sx.distractor_loss(model, task.sample(8, torch.Generator().manual_seed(0)))
    loss.backward()
    attn = model.attention
    assert attn.q_proj.weight.grad is None or attn.q_proj.weight.grad.abs().max() == 0
    assert attn.k_proj.weight.grad is None or attn.k_proj.weight.grad.abs().max() == 0
    assert attn.v_proj.weight.grad.abs().max() > 0


def test_recall_runner_returns_one_value_per_seed_and_arm() -> None:
    cfg = sx.RecallConfig(n_pairs=16, n_a=4, n_b=4, n_values=4, embed_dim=16, steps=3, batch_size=4, eval_batch=16)
    runs = sx.run_distractor_recall(seeds=(0, 1), config=cfg)
    for metric in (runs.accuracy, runs.support, runs.weight_on_answer, runs.train_acc):
        assert list(metric) == list(sx.RECALL_ARMS) and all(len(v) == 2 for v in metric.values())
    assert runs.support["softmax"] == [17.0, 17.0]  # every key and the query itself
    assert runs.support["top-k, k=4"] == [4.0, 4.0]
    assert all(1 <= s <= 17 for s in runs.support["sparsemax"])
    with pytest.raises(ValueError):
        sx.recall_mixer("relu", 16, 1)


def test_lm_runner_returns_one_value_per_seed_and_arm() -> None:
    cfg = sx.LMConfig(length=24, period=9, stride=4, summary=1, embed_dim=16, steps=2, batch_size=4, eval_batch=8)
    runs = sx.run_periodic_lm(seeds=(0, 1, 2), config=cfg)
    assert list(runs.accuracy) == list(sx.LM_ARMS)
    assert all(len(runs.accuracy[a]) == 3 and len(runs.steps_to_target[a]) == 3 for a in sx.LM_ARMS)
    with pytest.raises(ValueError):
        sx.lm_mixer("random", cfg)
