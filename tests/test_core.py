"""The scaled-dot-product core and the masks: reference equivalence, gradients, properties, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attn.core import masked_softmax, scaled_dot_product_attention
from attn.masks import band_mask, block_mask, causal_mask, check_mask, combine_masks, mha_convention, padding_mask, to_additive


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
    for a, b in zip(g1, g2):
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
    with pytest.raises(TypeError, match="torch.bool"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="key_mask must have shape"):
        scaled_dot_product_attention(q, k, v, key_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_mask"):
        scaled_dot_product_attention(q, k, v, key_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError):
        check_mask("mask", (1, 2, 3))
