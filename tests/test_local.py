"""Chapter 8: local attention (blockwise sliding window, Luong local-p) against its references."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.benchmark import count_flops, peak_memory
from attn.local import LocalAttention, LocalPAttention, local_attention, local_pattern
from attn.masks import band_mask, padding_mask
from attn.multihead import MultiHeadAttention


def dense_reference(q, k, v, pattern, key_mask=None):
    """F.scaled_dot_product_attention with the dense (n, n) pattern; rows with no visible key -> 0."""
    mask = pattern if key_mask is None else pattern & key_mask[:, None, None, :]
    mask = mask.expand(q.shape[0], 1, *pattern.shape[-2:]) if mask.ndim == 2 else mask
    row_ok = mask.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~row_ok) * row_ok


def qkv(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


# ----------------------------------------------------------------------------- equality with the dense band


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("exact_band", [True, False])
@pytest.mark.parametrize("n, window", [(40, 8), (37, 5), (6, 16), (23, 1)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_dense_sdpa_with_band_mask(causal, exact_band, n, window, padded, need_weights):
    q, k, v = qkv(2, 3, n, 8)
    km = padding_mask([n, max(1, n - 7)], n) if padded else None
    pattern = local_pattern(n, window, causal, exact_band)
    if exact_band:
        assert torch.equal(pattern, band_mask(n, window, causal))
    out, w = local_attention(q, k, v, window, causal=causal, key_mask=km, exact_band=exact_band, need_weights=need_weights)
    ref = dense_reference(q, k, v, pattern, km)
    assert (out - ref).abs().max() <= 1e-5
    up = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), up)
    g2 = torch.autograd.grad(ref, (q, k, v), up)
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max() <= 1e-5
    if need_weights:
        full = pattern if km is None else pattern & km[:, None, None, :]
        scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~full, float("-inf"))
        expected = scores.softmax(-1).nan_to_num(0.0)
        assert w.shape == (2, 3, n, n)
        torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-5)
        assert (w[..., ~pattern] == 0).all()


def test_window_zero_is_the_diagonal_and_window_large_is_dense():
    q, k, v = qkv(1, 2, 9, 4)
    torch.testing.assert_close(local_attention(q, k, v, 0).output, v)  # each query sees only itself
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(local_attention(q, k, v, 8).output, dense)
    torch.testing.assert_close(local_attention(q, k, v, 8, causal=True).output, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_three_dim_input_and_scale():
    q, k, v = qkv(2, 11, 6)
    out = local_attention(q, k, v, 3, scale=0.3).output
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(11, 3), scale=0.3)
    assert out.shape == (2, 11, 6)
    torch.testing.assert_close(out, ref)


def test_gradcheck_float64():
    q, k, v = qkv(1, 2, 7, 3, dtype=torch.float64)
    km = padding_mask([5], 7)
    for causal in (False, True):
        for exact in (True, False):
            assert torch.autograd.gradcheck(
                lambda q, k, v, causal=causal, exact=exact: local_attention(q, k, v, 2, causal=causal, key_mask=km, exact_band=exact).output,
                (q, k, v), fast_mode=True,
            )
    small = [t[:, :1, :5, :2].detach().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: local_attention(q, k, v, 1, key_mask=km[:, :5]).output, small)
    assert torch.autograd.gradcheck(lambda q, k, v: local_attention(q, k, v, 2, need_weights=True).weights, small)


# ----------------------------------------------------------------------------- against lucidrains' local-attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("exact_band", [True, False])
@pytest.mark.parametrize("n", [48, 45])
def test_matches_local_attention_package(causal, exact_band, n):
    """Package LocalAttention(window_size=w, look_backward=1, look_forward=0|1, exact_windowsize=exact_band).

    Its autopad pads keys with zeros that only a key mask hides, so we always pass one;
    rows with no visible key differ (it gives a uniform average, we give zeros) and are
    left out: here every real query sees at least itself.
    """
    from local_attention import LocalAttention as PackageLocalAttention

    w = 8
    q, k, v = qkv(2, 3, n, 16)
    km = padding_mask([n, n - 11], n)
    ref_mod = PackageLocalAttention(window_size=w, causal=causal, look_backward=1, look_forward=0 if causal else 1,
                                    exact_windowsize=exact_band, autopad=True)
    ref = ref_mod(q, k, v, mask=km)
    out = local_attention(q, k, v, w, causal=causal, key_mask=km, exact_band=exact_band).output
    real = km[:, None, :, None]
    assert ((out - ref) * real).abs().max() <= 1e-5
    up = torch.randn_like(out) * real
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_package_autopad_without_mask_attends_to_zero_padding():
    """The difference the chapter explains: without a mask the package's padded keys take part."""
    from local_attention import LocalAttention as PackageLocalAttention

    q, k, v = qkv(1, 1, 13, 4)
    pkg = PackageLocalAttention(window_size=4, causal=False, look_forward=1, exact_windowsize=True, autopad=True)
    ours = local_attention(q, k, v, 4).output
    with torch.no_grad():
        assert (pkg(q, k, v)[..., -1, :] - ours[..., -1, :]).abs().max() > 1e-3
        torch.testing.assert_close(pkg(q, k, v, mask=torch.ones(1, 13, dtype=torch.bool)), ours)


# ----------------------------------------------------------------------------- properties


def test_masked_keys_have_no_influence_and_causal_ignores_future():
    q, k, v = (t.detach() for t in qkv(2, 2, 20, 4))
    km = padding_mask([20, 13], 20)
    out = local_attention(q, k, v, 3, key_mask=km).output
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 13:] += 100
    v2[1, :, 13:] -= 100
    torch.testing.assert_close(local_attention(q, k2, v2, 3, key_mask=km).output, out)
    # causal: changing tokens 12.. leaves outputs 0..11 unchanged
    out_c = local_attention(q, k, v, 3, causal=True).output
    k3, v3, q3 = k.clone(), v.clone(), q.clone()
    for t in (k3, v3, q3):
        t[:, :, 12:] = torch.randn_like(t[:, :, 12:])
    torch.testing.assert_close(local_attention(q3, k3, v3, 3, causal=True).output[:, :, :12], out_c[:, :, :12])
    # keys outside the window have no influence either
    k4 = k.clone()
    k4[:, :, 15:] += 100
    torch.testing.assert_close(local_attention(q, k4, v, 3).output[:, :, :12], local_attention(q, k, v, 3).output[:, :, :12])


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = qkv(1, 2, 12, 4)
    km = padding_mask([3], 12)
    out, w = local_attention(q, k, v, 2, key_mask=km, need_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert out[:, :, 6:].abs().max() == 0 and w[:, :, 6:].abs().max() == 0  # queries 6.. see no real key
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[:, :, 6:].abs().max() == 0


def test_batched_equals_per_example():
    q, k, v = (t.detach() for t in qkv(3, 2, 17, 4))
    km = padding_mask([17, 9, 4], 17)
    out = local_attention(q, k, v, 4, causal=True, key_mask=km).output
    per = [local_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], 4, causal=True, key_mask=km[i : i + 1]).output for i in range(3)]
    torch.testing.assert_close(out, torch.cat(per))


def test_weights_rows_sum_to_one_inside_the_band():
    q, k, v = qkv(1, 1, 10, 4)
    w = local_attention(q, k, v, 2, need_weights=True).weights[0, 0]
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    assert (w[~band_mask(10, 2)] == 0).all() and (w[band_mask(10, 2)] > 0).all()


# ----------------------------------------------------------------------------- efficiency (deterministic)


def test_peak_memory_is_far_below_an_n_by_n_matrix():
    n, window = 4096, 64
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    with torch.no_grad():
        used = peak_memory(lambda: local_attention(q, k, v, window), "cpu")
    assert 0 < used < n * n * 4 / 8, f"peak {used} bytes vs n^2 fp32 = {n * n * 4}"


def test_flops_grow_linearly_in_n():
    def flops(n):
        q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
        with torch.no_grad():
            return count_flops(lambda: local_attention(q, k, v, 32))

    f1, f2, f4 = flops(1024), flops(2048), flops(4096)
    assert f1 > 0
    assert 1.9 < f2 / f1 < 2.1 and 1.9 < f4 / f2 < 2.1
    # QK^T and AV over 3w keys for each of the n/w blocks, plus the two edge blocks redone with their key mask
    assert f4 == 2 * 2 * (4096 // 32 + 2) * 32 * (3 * 32) * 16


# ----------------------------------------------------------------------------- the module and the registry


def test_module_equals_multihead_with_band_mask():
    torch.manual_seed(1)
    E, h, n, w = 16, 4, 21, 3
    local = LocalAttention(E, h, window=w, causal=True)
    mha = MultiHeadAttention(E, h)
    mha.load_state_dict(local.state_dict())  # the same parameter names: q_proj, k_proj, v_proj, out_proj
    x = torch.randn(2, n, E)
    km = padding_mask([n, 15], n)
    out, wl = local(x, key_mask=km, need_weights=True)
    ref, wr = mha(x, key_mask=km, attn_mask=band_mask(n, w, causal=True), need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wl, wr, atol=1e-5, rtol=1e-5)


def test_module_gradcheck():
    mod = LocalAttention(4, 2, window=2).double()
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mod(x, key_mask=padding_mask([7, 4], 7)).output, (x,), fast_mode=True)


def test_registry_build():
    mech = registry.get("local")
    assert mech.chapter == 8 and mech.cls is LocalAttention and mech.complexity == "O(n w d)"
    layer = mech.build(32, 4)
    x = torch.randn(2, 19, 32)
    out, w = layer(x, need_weights=True)
    assert out.shape == (2, 19, 32) and w.shape == (2, 4, 19, 19)
    assert layer(x).weights is None
    assert (w[..., ~band_mask(19, layer.window)] == 0).all()


def test_bad_input():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="as many queries as keys"):
        local_attention(q, torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), 2)
    with pytest.raises(ValueError, match=r"\(batch, seq, dim\) or \(batch, heads, seq, dim\)"):
        local_attention(q[0, 0], q[0, 0], q[0, 0], 2)
    with pytest.raises(ValueError, match="window must be >= 0"):
        local_attention(q, q, q, -1)
    with pytest.raises(ValueError, match="window must be >= 1 with exact_band=False"):
        local_attention(q, q, q, 0, exact_band=False)
    with pytest.raises(TypeError, match="window must be an int"):
        local_attention(q, q, q, 2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool"):
        local_attention(q, q, q, 2, key_mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=1, n=8\)"):
        local_attention(q, q, q, 2, key_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        local_attention(q[:, :, :0], q[:, :, :0], q[:, :, :0], 2)
    mod = LocalAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, embed_dim=8\)"):
        mod(torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match="empty"):
        mod(torch.randn(1, 0, 8))
    with pytest.raises(ValueError, match="divisible"):
        LocalAttention(10, 3)


# ----------------------------------------------------------------------------- Luong local-p


def local_p_dense(mod: LocalPAttention, h, hs, key_mask=None):
    """Explicit formula over all S source positions (no gathering), for the test."""
    B, _T, _ = h.shape
    S = hs.shape[1]
    lengths = key_mask.sum(-1) if key_mask is not None else torch.full((B,), S)
    p = lengths[:, None].to(h.dtype) * torch.sigmoid(torch.tanh(h @ mod.w_p.weight.T) @ mod.v_p.weight.T).squeeze(-1)
    keys = hs @ mod.w_a.weight.T if mod.w_a is not None else hs
    scores = h @ keys.transpose(1, 2)  # (B, T, S)
    s = torch.arange(S, dtype=h.dtype)
    centre = torch.floor(p.detach() + 0.5)
    inside = ((s - centre[..., None]).abs() <= mod.half_window) & (s < lengths[:, None, None])
    if key_mask is not None:
        inside &= key_mask[:, None, :]
    align = scores.masked_fill(~inside, float("-inf")).softmax(-1).nan_to_num(0.0)
    sigma = mod.half_window / 2
    a = align * torch.exp(-((s - p[..., None]) ** 2) / (2 * sigma**2))
    return a @ hs, a, p


@pytest.mark.parametrize("score", ["general", "dot"])
def test_local_p_matches_dense_formula(score):
    torch.manual_seed(0)
    mod = LocalPAttention(6, 6, half_window=3, score=score).double()
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    hs = torch.randn(2, 30, 6, dtype=torch.float64, requires_grad=True)
    km = padding_mask([30, 22], 30)
    out, w = mod(h, hs, key_mask=km, need_weights=True)
    ref, a, p = local_p_dense(mod, h, hs, km)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w, a, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(mod.positions(h, km.sum(-1)), p)
    assert ((w > 0).sum(-1) <= 2 * 3 + 1).all()  # at most 2D+1 keys per query
    up = torch.randn_like(out)
    params = [h, hs, *mod.parameters()]
    for g1, g2 in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up), strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-10)


def test_local_p_gradcheck_and_position_gradient():
    torch.manual_seed(0)
    mod = LocalPAttention(4, 5, half_window=2).double()
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    hs = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, hs: mod(h, hs).output, (h, hs), fast_mode=True)
    mod(h, hs).output.sum().backward()
    assert mod.v_p.weight.grad.abs().sum() > 0  # the Gaussian carries a gradient to the predicted position


def test_local_p_single_query_and_bad_input():
    mod = LocalPAttention(4, 5, half_window=2)
    ctx, w = mod(torch.randn(3, 4), torch.randn(3, 8, 5), need_weights=True)
    assert ctx.shape == (3, 5) and w.shape == (3, 8)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, 4\) or \(batch, T, 4\)"):
        mod(torch.randn(3, 6), torch.randn(3, 8, 5))
    with pytest.raises(ValueError, match=r"keys must have shape \(batch=3, S, 5\)"):
        mod(torch.randn(3, 4), torch.randn(3, 8, 4))
    with pytest.raises(ValueError, match="empty"):
        mod(torch.randn(3, 4), torch.randn(3, 0, 5))
    with pytest.raises(ValueError, match="half_window"):
        LocalPAttention(4, 4, half_window=0)
    with pytest.raises(ValueError, match="dot scores need"):
        LocalPAttention(4, 5, score="dot")


# ----------------------------------------------------------------------------- sizes clamped to n (issue 15, section 3)


def test_window_larger_than_n_costs_no_more_than_dense_and_gives_the_same_output():
    """A window of 512 or 4,096 on n = 8 once cost 600-2,000x dense attention's FLOPs; now at most dense's."""
    q, k, v = qkv(2, 3, 8, 16)
    with torch.no_grad():
        dense = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
        for causal in (False, True):
            for exact_band in (True, False):
                at_n = local_attention(q, k, v, 8, causal=causal, exact_band=exact_band, blockwise=True).output
                for window in (512, 4096):
                    flops = count_flops(partial(local_attention, q, k, v, window, causal=causal, exact_band=exact_band))
                    assert flops <= dense, (window, causal, exact_band, flops, dense)
                    torch.testing.assert_close(local_attention(q, k, v, window, causal=causal, exact_band=exact_band).output, at_n)
                    # the blocks themselves are clamped too: n = 8 needs blocks of 8, not 4,096
                    forced = count_flops(partial(local_attention, q, k, v, window, causal=causal, exact_band=exact_band, blockwise=True))
                    assert forced <= 3 * dense
                    torch.testing.assert_close(
                        local_attention(q, k, v, window, causal=causal, exact_band=exact_band, blockwise=True).output, at_n)


@pytest.mark.parametrize("n", [1, 8, 13, 24])
@pytest.mark.parametrize("window", [0, 3, 8])
def test_the_cheaper_path_is_taken_and_both_agree(n, window):
    """Blockwise or dense (whichever scores fewer pairs): never more FLOPs than either, the same output."""
    q, k, v = qkv(2, 2, n, 8)
    km = padding_mask([n, max(1, n - 3)], n)
    with torch.no_grad():
        for causal in (False, True):
            flops = {bw: count_flops(partial(local_attention, q, k, v, window, causal=causal, key_mask=km, blockwise=bw))
                     for bw in (None, True, False)}
            assert flops[None] == min(flops[True], flops[False]), flops
            outs = [local_attention(q, k, v, window, causal=causal, key_mask=km, blockwise=bw).output for bw in (True, False)]
            torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)


def test_module_window_larger_than_n():
    torch.manual_seed(0)
    layer = LocalAttention(32, 2, window=512).eval()
    mha = MultiHeadAttention(32, 2).eval()
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        assert count_flops(lambda: layer(x)) <= count_flops(lambda: mha(x))
        wide = layer(x).output
        layer.window = 8
        torch.testing.assert_close(wide, layer(x).output)


# ----------------------------------------------------------------------------- bad input (issue 15, section 4)


def test_empty_batch_gives_an_empty_output():
    """Batch 0 once raised ZeroDivisionError."""
    for shape in ((0, 2, 8, 4), (0, 8, 4)):
        q = torch.randn(*shape)
        v = torch.randn(*shape[:-1], 3)
        out = local_attention(q, q, v, 2, need_weights=True)
        assert out.output.shape == (*shape[:-1], 3) and out.weights.shape == (*shape[:-1], 8)
        assert local_attention(q, q, v, 2, causal=True, exact_band=False).output.shape == (*shape[:-1], 3)


def test_mixed_dtypes_and_bad_arguments():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(TypeError, match=r"^dtypes must match \((q|query): torch\.float32, (k|key): torch\.float64, (v|value): torch\.float32\)"):
        local_attention(q, q.double(), q, 2)
    with pytest.raises(TypeError, match="blockwise must be None, True or False"):
        local_attention(q, q, q, 2, blockwise="no")
    with pytest.raises(TypeError, match=r"^embed_dim must be an int, got float$"):
        LocalAttention(8.0, 2)
    with pytest.raises(ValueError, match=r"^dropout must be in \[0, 1\), got 2\.0$"):  # AttentionBase's check
        LocalAttention(8, 2, dropout=2.0)
    mod = LocalPAttention(8, 6, half_window=2)
    h, hs = torch.randn(2, 8), torch.randn(2, 5, 6)
    with pytest.raises(TypeError, match=r"^query must be a floating-point tensor, got dtype torch\.int64$"):
        mod(h.long(), hs)
    with pytest.raises(TypeError, match=r"^dtypes must match \(query: torch\.float32, keys: torch\.float64\)"):
        mod(h, hs.double())
    with pytest.raises(ValueError, match=r"^query_dim must be >= 1, got 0$"):
        LocalPAttention(0, 6)
