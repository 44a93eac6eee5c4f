"""The scaled-dot-product core and the masks: reference equivalence, gradients, properties, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attn.core import MIN_TEMPERATURE, masked_softmax, scaled_dot_product_attention
from attn.masks import (
    band_mask,
    block_mask,
    causal_mask,
    check_mask,
    combine_masks,
    key_mask_to_attn_mask,
    mha_convention,
    padding_mask,
    to_additive,
)
from attn.multihead import MultiHeadAttention
from attn.self_attention import SelfAttention


def qkv(*shape, dv=None, dtype=torch.float32, grad=False):
    *lead, n, d = shape
    q = torch.randn(*lead, n, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(*lead, n + 3, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(*lead, n + 3, dv or d, dtype=dtype, requires_grad=grad)
    return q, k, v


# ----------------------------------------------------------------------------- masks


def test_causal_mask_matches_tril_and_sdpa_convention():
    m = causal_mask(4, 6)
    assert m.dtype == torch.bool and m.shape == (4, 6)
    assert torch.equal(m, torch.ones(4, 6).tril().bool())


def test_padding_mask():
    m = padding_mask([3, 1], 4)
    assert m.tolist() == [[True, True, True, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="1-D"):
        padding_mask(torch.ones(2, 2, dtype=torch.long))


def test_band_and_block_masks():
    b = band_mask(6, 1)
    assert b.sum(-1).tolist() == [2, 3, 3, 3, 3, 2]
    assert torch.equal(band_mask(6, 2, causal=True), band_mask(6, 2) & causal_mask(6))
    assert block_mask(6, 3).sum().item() == 18
    with pytest.raises(ValueError):
        band_mask(4, -1)
    with pytest.raises(ValueError):
        block_mask(4, 0)


def test_mask_helpers():
    a, b = causal_mask(3), band_mask(3, 0)
    assert torch.equal(combine_masks(a, None, b), a & b)
    assert combine_masks(None) is None
    assert torch.equal(mha_convention(mha_convention(a)), a)
    add = to_additive(a)
    assert add[0, 1] == float("-inf") and add[1, 0] == 0
    with pytest.raises(TypeError):
        combine_masks(a.float())


# ----------------------------------------------------------------------------- reference equivalence


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "float", "key"])
def test_matches_torch_sdpa_forward_and_backward(need_weights, mask_kind):
    q, k, v = qkv(2, 3, 5, 8, dv=4, grad=True)
    mask, key_mask, ref_mask = None, None, None
    if mask_kind == "causal":
        mask = ref_mask = causal_mask(5, 8)
    elif mask_kind == "bool":
        mask = ref_mask = torch.rand(2, 1, 5, 8) > 0.3
        mask[..., 0] = True  # keep every row non-empty: SDPA itself gives NaN for empty rows
    elif mask_kind == "float":
        mask = ref_mask = torch.randn(2, 3, 5, 8)
    elif mask_kind == "key":
        key_mask = padding_mask([8, 5], 8)
        ref_mask = key_mask[:, None, None, :]
    ours = scaled_dot_product_attention(q, k, v, attn_mask=mask, key_mask=key_mask, need_weights=need_weights)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask)
    torch.testing.assert_close(ours.output, ref, atol=1e-5, rtol=1e-5)
    up = torch.randn_like(ref)
    g1 = torch.autograd.grad(ours.output, (q, k, v), up)
    g2 = torch.autograd.grad(ref, (q, k, v), up)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if need_weights:
        assert ours.weights.shape == (2, 3, 5, 8)
        torch.testing.assert_close(ours.weights.sum(-1), torch.ones(2, 3, 5))
    else:
        assert ours.weights is None


def test_three_dimensional_inputs_and_is_causal():
    q, k, v = qkv(2, 6, 4)
    k, v = k[:, :6], v[:, :6]
    for nw in (False, True):
        out = scaled_dot_product_attention(q, k, v, is_causal=True, need_weights=nw).output
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=1e-5)


def test_explicit_formula():
    q, k, v = qkv(1, 4, 3, dtype=torch.float64)
    w = torch.softmax(q @ k.transpose(-1, -2) / 3**0.5, -1)
    out = scaled_dot_product_attention(q, k, v, need_weights=True)
    torch.testing.assert_close(out.weights, w)
    torch.testing.assert_close(out.output, w @ v)


def test_scale_and_dropout():
    q, k, v = qkv(1, 4, 3)
    out = scaled_dot_product_attention(q, k, v, scale=0.1, need_weights=True)
    torch.testing.assert_close(out.weights, torch.softmax(0.1 * q @ k.transpose(-1, -2), -1))
    torch.manual_seed(1)
    dropped = scaled_dot_product_attention(q, k, v, dropout_p=0.5, need_weights=True)
    assert not torch.allclose(dropped.output, out.output)


@pytest.mark.parametrize("need_weights", [False, True])
def test_gradcheck_float64(need_weights):
    q, k, v = qkv(1, 2, 3, 4, dtype=torch.float64, grad=True)
    mask = torch.tensor([[True, True, False, True, True, False]]).expand(3, 6)

    def f(q, k, v):
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, need_weights=need_weights).output

    assert torch.autograd.gradcheck(f, (q, k, v))


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_give_zeros_not_nan(need_weights):
    q, k, v = qkv(2, 4, 8, grad=True)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[2] = False  # query 2 sees nothing
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, need_weights=need_weights)
    assert torch.isfinite(out.output).all()
    assert out.output[:, 2].abs().max() == 0
    if need_weights:
        assert out.weights[:, 2].abs().max() == 0
    out.output.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert q.grad[:, 2].abs().max() == 0


def test_fully_masked_row_with_additive_mask():
    q, k, v = qkv(1, 3, 4)
    add = torch.zeros(3, 6)
    add[1] = float("-inf")
    for nw in (False, True):
        out = scaled_dot_product_attention(q, k, v, attn_mask=add, need_weights=nw).output
        assert torch.isfinite(out).all() and out[:, 1].abs().max() == 0


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), extra=st.integers(1, 5), seed=st.integers(0, 10_000), need_weights=st.booleans())
def test_masked_keys_have_no_influence(n, extra, seed, need_weights):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, n, 4, generator=g)
    k = torch.randn(2, n + extra, 4, generator=g)
    v = torch.randn(2, n + extra, 3, generator=g)
    key_mask = torch.ones(2, n + extra, dtype=torch.bool)
    key_mask[:, n:] = False
    out = scaled_dot_product_attention(q, k, v, key_mask=key_mask, need_weights=need_weights).output
    k2, v2 = k.clone(), v.clone()
    k2[:, n:] = torch.randn(2, extra, 4, generator=g) * 100
    v2[:, n:] = torch.randn(2, extra, 3, generator=g) * 100
    out2 = scaled_dot_product_attention(q, k2, v2, key_mask=key_mask, need_weights=need_weights).output
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(out, scaled_dot_product_attention(q, k[:, :n], v[:, :n]).output, atol=1e-6, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 9), cut=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_causal_outputs_ignore_the_future(n, cut, seed):
    cut = min(cut, n - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 4, generator=g)
    y = x.clone()
    y[:, cut:] = torch.randn(1, n - cut, 4, generator=g)
    a = scaled_dot_product_attention(x, x, x, is_causal=True, need_weights=True).output
    b = scaled_dot_product_attention(y, y, y, is_causal=True, need_weights=True).output
    torch.testing.assert_close(a[:, :cut], b[:, :cut])


def test_permutation_equivariance():
    q, k, v = qkv(1, 6, 4)
    k, v = k[:, :6], v[:, :6]
    p = torch.randperm(6)
    out = scaled_dot_product_attention(q, k, v).output
    torch.testing.assert_close(scaled_dot_product_attention(q[:, p], k[:, p], v[:, p]).output, out[:, p], atol=1e-6, rtol=1e-5)


def test_batched_equals_per_example():
    q, k, v = qkv(3, 2, 5, 4)
    km = padding_mask([8, 6, 3], 8)
    batched = scaled_dot_product_attention(q, k, v, key_mask=km, need_weights=True).output
    for b in range(3):
        single = scaled_dot_product_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], key_mask=km[b : b + 1], need_weights=True).output
        torch.testing.assert_close(batched[b : b + 1], single)


def test_masked_softmax_zero_rows():
    s = torch.randn(2, 3)
    m = torch.tensor([[True, False, True], [False, False, False]])
    p = masked_softmax(s, m)
    assert p[1].abs().sum() == 0 and torch.isclose(p[0].sum(), torch.tensor(1.0)) and p[0, 1] == 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)), ValueError, r"\(batch, seq, dim\)"),
        (lambda: (torch.randn(1, 2, 3, 4, 5),) * 3, ValueError, "shape"),
        (lambda: (torch.randn(1, 4, 8), torch.randn(1, 4, 6), torch.randn(1, 4, 8)), ValueError, "d_k"),
        (lambda: (torch.randn(1, 4, 8), torch.randn(1, 5, 8), torch.randn(1, 4, 8)), ValueError, "same length"),
        (lambda: (torch.randn(1, 0, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)), ValueError, "empty"),
        (lambda: (torch.randn(2, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)), ValueError, "leading"),
        (lambda: (torch.ones(1, 4, 8, dtype=torch.long),) * 3, TypeError, "floating"),
        (lambda: ([1.0], [1.0], [1.0]), TypeError, "torch.Tensor"),
    ],
)
def test_bad_qkv(make, exc, match):
    with pytest.raises(exc, match=match):
        scaled_dot_product_attention(*make())


def test_bad_masks():
    q, k, v = qkv(2, 4, 8)
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"torch\.bool"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="key_mask must have shape"):
        scaled_dot_product_attention(q, k, v, key_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_mask"):
        scaled_dot_product_attention(q, k, v, key_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError):
        check_mask("mask", (1, 2, 3))


# ----------------------------------------------------------------------------- clear errors (issue 15, section 4)

_B = torch.ones(2, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    "call, error, match",
    [
        # mixed dtypes
        (lambda: scaled_dot_product_attention(torch.randn(1, 2, 4), torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(1, 3, 4)),
         TypeError, r"dtypes must match \(query: torch.float32, key: torch.float64, value: torch.float32\)"),
        (lambda: scaled_dot_product_attention(torch.randn(1, 2, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4, dtype=torch.bfloat16)),
         TypeError, r"value: torch.bfloat16"),
        (lambda: scaled_dot_product_attention(*qkv(1, 2, 4), attn_mask=torch.zeros(2, 5, dtype=torch.float64)),
         TypeError, r"dtypes must match \(query: torch.float32, attn_mask: torch.float64\)"),
        # integers and degenerate scales
        (lambda: scaled_dot_product_attention(torch.ones(1, 2, 4, dtype=torch.long), *qkv(1, 2, 4)[1:]), TypeError, "query must be a floating-point"),
        (lambda: scaled_dot_product_attention(*qkv(1, 2, 4), scale=float("nan")), ValueError, "scale must be a finite number"),
        (lambda: scaled_dot_product_attention(*qkv(1, 2, 4), scale=1e40), ValueError, r"scale must be a finite number in torch.float32, got 1e\+40"),
        (lambda: scaled_dot_product_attention(*qkv(1, 2, 4), scale="1"), TypeError, "scale must be a real number"),
        # masked_softmax
        (lambda: masked_softmax(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long)), TypeError, r"mask must be a torch.bool.*mask.bool\(\)"),
        (lambda: masked_softmax(torch.randn(2, 3), [[True] * 3] * 2), TypeError, "mask must be a torch.bool tensor.*got list"),
        (lambda: masked_softmax(torch.ones(2, 3, dtype=torch.long), _B), TypeError, "scores must be a floating-point tensor, got dtype torch.int64"),
        (lambda: masked_softmax(torch.ones(2, 3, dtype=torch.long), None), TypeError, "scores must be a floating-point"),
        (lambda: masked_softmax([[1.0, 2.0]], None), TypeError, "scores must be a torch.Tensor"),
        (lambda: masked_softmax(torch.randn(2, 3), torch.ones(4, dtype=torch.bool)), ValueError, r"mask of shape \(4,\) does not broadcast to the scores of shape \(2, 3\)"),
        (lambda: masked_softmax(torch.randn(3), torch.ones(2, 3, dtype=torch.bool)), ValueError, r"mask of shape \(2, 3\) does not broadcast to the scores of shape \(3,\)"),
        (lambda: masked_softmax(torch.randn(2, 3), None, dim=2), ValueError, r"dim must be in \[-2, 2\)"),
        # mask helpers given lists, integers, bad sizes
        (lambda: key_mask_to_attn_mask([[True]]), TypeError, r"key_mask must be a torch.bool tensor \(batch, n_keys\).*got list"),
        (lambda: combine_masks(causal_mask(2), [[True]]), TypeError, "combine_masks: mask 1 must be a torch.bool tensor.*got list"),
        (lambda: combine_masks(causal_mask(2), causal_mask(3)), ValueError, r"mask 1 of shape \(3, 3\) does not broadcast.*\(2, 2\)"),
        (lambda: mha_convention([[True]]), TypeError, "mask must be a torch.bool tensor.*got list"),
        (lambda: mha_convention(torch.ones(2, 2, dtype=torch.long)), TypeError, r"got dtype torch.int64; a 0/1 integer mask \(1 = attend\) converts with mask.bool\(\)"),
        (lambda: to_additive([[True]]), TypeError, "mask must be a torch.bool tensor.*got list"),
        (lambda: to_additive(causal_mask(2), torch.long), TypeError, r"dtype must be a floating-point torch.dtype.*got torch.int64"),
        (lambda: padding_mask([-1, 2]), ValueError, r"lengths must be >= 0, got \[-1, 2\]"),
        (lambda: padding_mask([1.5, 2]), TypeError, "lengths must hold integers"),
        (lambda: padding_mask([5, 2], 3), ValueError, r"lengths must be <= max_len=3, got a length of 5"),
        (lambda: padding_mask(3), TypeError, "lengths must be a 1-D integer tensor or list"),
        (lambda: causal_mask(-1), ValueError, "n_queries must be >= 0, got -1"),
        (lambda: causal_mask(2.5), TypeError, "n_queries must be an int"),
        (lambda: causal_mask(2, -3), ValueError, "n_keys must be >= 0"),
        (lambda: band_mask(3, 1.5), TypeError, "window must be an int"),
        (lambda: block_mask(-2, 2), ValueError, "n must be >= 0"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_edge_input_that_is_valid():
    assert padding_mask([]).shape == (0, 0) and padding_mask([], 4).shape == (0, 4)
    assert padding_mask([], 4).dtype == torch.bool
    assert padding_mask(torch.tensor([0, 2]), 3).tolist() == [[False] * 3, [True, True, False]]
    assert to_additive(causal_mask(2), torch.float64).dtype == torch.float64
    f = torch.zeros(2, 2)
    assert mha_convention(f) is f  # additive masks pass through
    assert key_mask_to_attn_mask(padding_mask([1, 2])).shape == (2, 1, 1, 2)
    q, k, v = qkv(1, 2, 4, dtype=torch.float64)
    out = scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(2, 5, dtype=torch.float64), need_weights=True)
    assert out.output.dtype == torch.float64
    assert torch.allclose(masked_softmax(torch.zeros(2, 3), torch.tensor([True, False, True])), torch.tensor([[0.5, 0, 0.5]] * 2))


@pytest.mark.parametrize("make", [lambda: SelfAttention(8), lambda: MultiHeadAttention(8, 2)], ids=["self", "multihead"])
def test_temperature_too_small_is_refused_not_nan(make):
    """At tau = 1e-40 the scale 1 / (tau sqrt(d)) is inf in float32 and every output NaN: refuse it."""
    layer, x = make(), torch.randn(2, 5, 8)
    for tau in (1e-40, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be"):
            layer(x, temperature=tau)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        layer(x, temperature="hot")
    for tau in (MIN_TEMPERATURE, 1e-3, 1.0, 10):
        for nw in (False, True):
            assert torch.isfinite(layer(x, temperature=tau, need_weights=nw).output).all()


def test_multihead_refuses_mixed_dtypes_and_bad_sizes():
    mha = MultiHeadAttention(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match=r"dtypes must match \(query: torch.float32, key: torch.float64"):
        mha(x, x.double(), x)
    with pytest.raises(TypeError, match="query must be a floating-point"):
        mha(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="embed_dim must be an int"):
        MultiHeadAttention(8.0, 2)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        MultiHeadAttention(8, 2, dropout=1.5)
    with pytest.raises(TypeError, match="d_model must be an int"):
        SelfAttention("8")
    with pytest.raises(ValueError, match="d_k must be >= 1"):
        SelfAttention(8, d_k=-1)


@pytest.mark.parametrize("lq,lk", [(7, 7), (5, 9), (9, 5)])
def test_causal_alone_takes_the_fused_kernel_and_equals_the_explicit_path(lq, lk):
    """``is_causal`` with no other mask goes to the fused kernel's own causal flag (top-left aligned)."""
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64) for n in (lq, lk, lk))
    fused = scaled_dot_product_attention(q, k, v, is_causal=True).output
    explicit = scaled_dot_product_attention(q, k, v, is_causal=True, need_weights=True).output
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-12)


def test_causal_multi_head_attention_forms_no_n_by_n_mask():
    """A causal MultiHeadAttention without weights is linear in memory: no op output reaches n^2 (it built a
    causal (n, n) mask before)."""
    from attn import MultiHeadAttention
    from attn.benchmark import largest_tensor

    n = 256
    layer = MultiHeadAttention(16, 2).eval()
    x = torch.randn(1, n, 16)
    assert largest_tensor(lambda: layer(x, x, x, is_causal=True)) < n * n // 4
    assert largest_tensor(lambda: layer(x, x, x, is_causal=True, need_weights=True)) >= 2 * n * n
