"""Chapter 10: hybrid attention (BigBird block-sparse attention) against dense attention with the same mask."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.benchmark import count_flops, peak_memory
from attn.core import AttentionOutput
from attn.hybrid import BigBirdAttention, BlockLayout, bigbird_attention, bigbird_layout, bigbird_mask
from attn.masks import block_mask, padding_mask
from attn.multihead import MultiHeadAttention


def dense_reference(q, k, v, pattern, key_mask=None):
    """F.scaled_dot_product_attention under the dense (h, n, n) pattern; rows with no visible key -> 0."""
    mask = pattern[None] if key_mask is None else pattern[None] & key_mask[:, None, None, :]
    row_ok = mask.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~row_ok) * row_ok


def qkv(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


# ----------------------------------------------------------------------------- equality with dense attention + mask

CASES = [  # n, block, window, global blocks, random, heads
    (40, 4, 1, (0,), 2, 3),
    (37, 5, 1, (0, -1), 1, 2),  # n not a multiple of the block
    (64, 8, 2, (), 3, 1),
    (16, 2, 1, (0,), 1, 4),  # the registry's build at the comparison's length
    (9, 4, 0, (1,), 5, 2),  # more random slots than candidates
    (30, 3, 3, (2, 5), 0, 2),  # window reaching over global blocks
]


@pytest.mark.parametrize("n, b, w, g, r, heads", CASES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_dense_sdpa_with_bigbird_mask(n, b, w, g, r, heads, padded, need_weights):
    q, k, v = qkv(2, heads, n, 8)
    km = padding_mask([n, max(1, n - 6)], n) if padded else None
    layout = bigbird_layout(-(-n // b), w, g, r, heads, seed=3)
    pattern = bigbird_mask(n, b, layout)  # (heads, n, n)
    out, wts = bigbird_attention(q, k, v, b, layout, key_mask=km, need_weights=need_weights, blockwise=True)
    ref = dense_reference(q, k, v, pattern, km)
    assert (out - ref).abs().max() <= 1e-5
    up = torch.randn_like(out)
    for a, c in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        assert (a - c).abs().max() <= 1e-5
    if need_weights:
        full = pattern[None] if km is None else pattern[None] & km[:, None, None, :]
        scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~full, float("-inf"))
        expected = scores.softmax(-1).nan_to_num(0.0)
        assert wts.shape == (2, heads, n, n)
        torch.testing.assert_close(wts, expected, atol=1e-6, rtol=1e-5)


def test_gradcheck_float64():
    q, k, v = qkv(1, 2, 11, 3, dtype=torch.float64)
    layout = bigbird_layout(6, 1, (0,), 1, 2, seed=1)
    km = padding_mask([9], 11)
    fn = lambda q, k, v: bigbird_attention(q, k, v, 2, layout, key_mask=km).output  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_special_cases_dense_and_block_diagonal():
    q, k, v = qkv(2, 1, 24, 4)
    wide = bigbird_layout(6, 6, (), 0)  # the window covers every block: dense attention
    torch.testing.assert_close(bigbird_attention(q, k, v, 4, wide).output, F.scaled_dot_product_attention(q, k, v))
    diag = bigbird_layout(6, 0, (), 0)  # window 0, nothing else: block-diagonal attention
    torch.testing.assert_close(bigbird_mask(24, 4, diag)[0], block_mask(24, 4))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask(24, 4))
    torch.testing.assert_close(bigbird_attention(q, k, v, 4, diag).output, ref)


def test_three_dim_input_and_scale():
    q, k, v = qkv(2, 13, 6)
    layout = bigbird_layout(5, 1, (0,), 1)
    out = bigbird_attention(q, k, v, 3, layout, scale=0.4).output
    ref = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=bigbird_mask(13, 3, layout), scale=0.4)[:, 0]
    assert out.shape == (2, 13, 6)
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------- the layout


def test_layout_slots_and_random_blocks():
    nb, w, r, heads = 20, 1, 3, 4
    layout = bigbird_layout(nb, w, (0, -1), r, heads, seed=5)
    assert layout.index.shape == (heads, nb, 2 * w + 1 + 2 + r)
    assert layout.global_blocks.tolist() == [0, nb - 1]
    rnd, rnd_ok = layout.index[..., -r:], layout.valid[..., -r:]
    assert rnd_ok.all()  # 20 blocks leave plenty of candidates
    for h in range(heads):
        for i in range(nb):
            chosen = rnd[h, i].tolist()
            assert len(set(chosen)) == r, "random blocks must be distinct"
            assert all(abs(c - i) > w and c not in (0, nb - 1) for c in chosen), "random blocks avoid window and globals"
    assert not torch.equal(rnd[0], rnd[1]), "each head draws its own random blocks"
    # no key block is counted twice in a row
    on = layout.index.masked_fill(~layout.valid, -1)
    for h in range(heads):
        for i in range(nb):
            ids = [c for c in on[h, i].tolist() if c >= 0]
            assert len(ids) == len(set(ids))


def test_layout_is_seeded():
    a, b = bigbird_layout(30, 1, (0,), 2, 2, seed=7), bigbird_layout(30, 1, (0,), 2, 2, seed=7)
    c = bigbird_layout(30, 1, (0,), 2, 2, seed=8)
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)


def test_random_blocks_are_uniform():
    # block 0 with window 0 and no globals: its one random block is uniform over blocks 1..9
    layout = bigbird_layout(10, 0, (), 1, heads=9000, seed=0)
    counts = torch.bincount(layout.index[:, 0, -1], minlength=10).float()
    assert counts[0] == 0
    expected = 9000 / 9
    chi2 = ((counts[1:] - expected) ** 2 / expected).sum()
    assert chi2 < 30, f"chi-square {chi2:.1f} on 8 degrees of freedom"  # p ~ 2e-4


def test_block_mask_globals_and_symmetric_window():
    layout = bigbird_layout(8, 1, (0, -1), 0)
    m = layout.block_mask()[0]
    assert m[:, 0].all() and m[:, 7].all() and m[0].all() and m[7].all()
    band = (torch.arange(8)[:, None] - torch.arange(8)[None, :]).abs() <= 1
    assert torch.equal(m, band | _globals(8, (0, 7)))


def _globals(nb, g):
    m = torch.zeros(nb, nb, dtype=torch.bool)
    for i in g:
        m[i, :] = True
        m[:, i] = True
    return m


def test_layout_for_many_blocks_needs_no_square_table():
    # 4096 blocks, 4 heads: an (h, nb, nb) table of random numbers would take 256 MiB; the sampler stays linear
    with torch.no_grad():
        used = peak_memory(lambda: bigbird_layout(4096, 1, (0, -1), 3, 4), "cpu")
    assert used < 16 * 2**20


# ----------------------------------------------------------------------------- properties


def test_masked_keys_have_no_influence():
    q, k, v = qkv(1, 2, 20, 4)
    layout = bigbird_layout(5, 1, (0,), 1, 2)
    km = padding_mask([14], 20)
    out = bigbird_attention(q, k, v, 4, layout, key_mask=km).output
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[..., 14:, :] = 100.0
    v2[..., 14:, :] = -50.0
    out2 = bigbird_attention(q, k2, v2, 4, layout, key_mask=km).output
    torch.testing.assert_close(out[..., :14, :], out2[..., :14, :])


def test_keys_outside_the_pattern_have_no_influence():
    q, k, v = qkv(1, 1, 32, 4)
    layout = bigbird_layout(8, 1, (), 1, 1, seed=2)
    pattern = bigbird_mask(32, 4, layout)[0]
    out = bigbird_attention(q, k, v, 4, layout).output
    unseen = ~pattern[5]  # keys query 5 may not read
    v2 = v.detach().clone()
    v2[0, 0, unseen] += 10.0
    out2 = bigbird_attention(q, k, v2, 4, layout).output
    torch.testing.assert_close(out[0, 0, 5], out2[0, 0, 5])
    assert (out[0, 0, 0] - out2[0, 0, 0]).abs().max() > 1e-3  # block 0 is global: it reads those keys


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = qkv(2, 1, 12, 4)
    layout = bigbird_layout(3, 0, (), 0)  # block-diagonal
    km = torch.ones(2, 12, dtype=torch.bool)
    km[1, 4:8] = False  # block 1 of example 1 has no real key
    out = bigbird_attention(q, k, v, 4, layout, key_mask=km).output
    assert torch.isfinite(out).all()
    assert (out[1, 0, 4:8] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_batched_equals_per_example():
    q, k, v = qkv(3, 2, 17, 4)
    layout = bigbird_layout(5, 1, (0,), 2, 2)
    km = padding_mask([17, 12, 5], 17)
    both = bigbird_attention(q, k, v, 4, layout, key_mask=km).output
    for i in range(3):
        one = bigbird_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], 4, layout, key_mask=km[i : i + 1]).output
        torch.testing.assert_close(both[i : i + 1], one)


def test_flops_grow_linearly_in_n():
    def flops(n):
        q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
        layout = bigbird_layout(n // 32, 1, (0, -1), 2, 1)
        with torch.no_grad():
            return count_flops(lambda: bigbird_attention(q, k, v, 32, layout))

    f1, f2, f4 = flops(1024), flops(2048), flops(4096)
    assert 1.9 < f2 / f1 < 2.1 and 1.9 < f4 / f2 < 2.1
    # every query block scores K = 3 + 2 + 2 blocks of 32 keys; the 2 global blocks also score all n keys
    n, b, d = 4096, 32, 16
    assert f4 == 4 * (n // b) * b * (7 * b) * d + 4 * (2 * b) * n * d


def test_peak_memory_is_far_below_an_n_by_n_matrix():
    n = 4096
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    layout = bigbird_layout(n // 64, 1, (0, -1), 3, 1)
    with torch.no_grad():
        used = peak_memory(lambda: bigbird_attention(q, k, v, 64, layout), "cpu")
    assert 0 < used < n * n * 4 / 8, f"peak {used} bytes vs n^2 fp32 = {n * n * 4}"


# ----------------------------------------------------------------------------- the module and the registry


def test_module_equals_its_dense_reference():
    torch.manual_seed(1)
    mod = BigBirdAttention(16, 4, block_size=3, window=1, global_blocks=(0, -1), num_random=2)
    x = torch.randn(2, 29, 16, requires_grad=True)
    km = padding_mask([29, 20], 29)
    out, w = mod(x, key_mask=km, need_weights=True)
    ref, wr = mod.reference(x, key_mask=km, need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, wr, atol=1e-6, rtol=1e-5)
    up = torch.randn_like(out)
    params = [x, *mod.parameters()]
    for a, c in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up), strict=True):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_module_gradcheck():
    mod = BigBirdAttention(4, 2, block_size=2, window=1, num_random=1).double()
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mod(x, key_mask=padding_mask([9, 5], 9)).output, (x,), fast_mode=True)


def test_module_short_inputs_and_empty_batch():
    mod = BigBirdAttention(8, 2, block_size=4, global_blocks=(0, 5), num_random=2)
    out = mod(torch.randn(1, 3, 8)).output  # one block: the global block 5 does not exist yet
    assert out.shape == (1, 3, 8)
    empty = mod(torch.randn(0, 10, 8), need_weights=True)
    assert empty.output.shape == (0, 10, 8) and empty.weights.shape == (0, 2, 10, 10)


def test_registry_build():
    mech = registry.get("bigbird")
    assert mech.chapter == 10 and mech.cls is BigBirdAttention and mech.data == "sequence"
    assert registry.chapter(10).slug == "hybrid_attention"
    layer = mech.build(32, 4)
    x = torch.randn(2, 16, 32)
    res = layer(x, need_weights=True)
    assert isinstance(res, AttentionOutput)
    assert res.output.shape == (2, 16, 32) and res.weights.shape == (2, 4, 16, 16)
    assert layer(x).weights is None
    pattern = bigbird_mask(16, layer.block_size, layer.layout(16))
    assert (res.weights[:, ~pattern] == 0).all()
    assert pattern.float().mean() < 0.8  # sparse even at the comparison's 16 tokens


BAD_MODULE_INPUTS = [
    ([[1.0] * 8], TypeError, "torch.Tensor"),
    (torch.ones(1, 5, 8, dtype=torch.long), TypeError, "floating-point"),
    (torch.randn(5, 8), ValueError, r"\(batch, seq, embed_dim=8\)"),
    (torch.randn(1, 5, 7), ValueError, r"last dimension 7 != 8"),
    (torch.randn(1, 0, 8), ValueError, r"seq >= 1"),
]


@pytest.mark.parametrize("x, err, match", BAD_MODULE_INPUTS)
def test_module_bad_input(x, err, match):
    with pytest.raises(err, match=match):
        BigBirdAttention(8, 2, block_size=2)(x)


def test_bad_arguments():
    q = torch.randn(1, 2, 8, 4)
    layout = bigbird_layout(4, 1, (0,), 1, 2)
    with pytest.raises(ValueError, match="as many queries as keys"):
        bigbird_attention(q, torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), 2, layout)
    with pytest.raises(ValueError, match=r"needs? 2 blocks"):
        bigbird_attention(q, q, q, 4, layout)
    with pytest.raises(ValueError, match="1 or 2 heads"):
        bigbird_attention(q, q, q, 2, bigbird_layout(4, 1, (0,), 1, 3))
    with pytest.raises(TypeError, match="BlockLayout"):
        bigbird_attention(q, q, q, 2, torch.ones(4, 4))
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool"):
        bigbird_attention(q, q, q, 2, layout, key_mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=1, n=8\)"):
        bigbird_attention(q, q, q, 2, layout, key_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        bigbird_attention(q, q, q, 0, layout)
    with pytest.raises(ValueError, match=r"global_blocks must lie in \[-4, 4\)"):
        bigbird_layout(4, 1, (4,), 1)
    with pytest.raises(ValueError, match="window must be >= 0"):
        bigbird_layout(4, -1)
    with pytest.raises(TypeError, match="num_random must be an int"):
        bigbird_layout(4, 1, (0,), 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layout has 4 blocks"):
        bigbird_mask(20, 2, layout)
    with pytest.raises(ValueError, match="divisible"):
        BigBirdAttention(10, 3)
    with pytest.raises(TypeError, match="global_blocks must be a sequence of ints"):
        BigBirdAttention(8, 2, global_blocks=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BigBirdAttention(8, 2, block_size=0)
    with pytest.raises(ValueError, match=r"key_mask must have shape"):
        BigBirdAttention(8, 2)(torch.randn(2, 5, 8), key_mask=torch.ones(2, 4, dtype=torch.bool))
    assert isinstance(layout, BlockLayout)


# ----------------------------------------------------------------------------- sizes clamped to n (issue 15, section 3)


def test_block_larger_than_n_costs_no_more_than_dense_and_gives_the_same_output():
    """A BigBird block of 512 on n = 8 once cost about 2,000x dense attention's FLOPs; now at most dense's."""
    q, k, v = qkv(2, 2, 8, 16)
    km = padding_mask([8, 5], 8)
    layout = bigbird_layout(1, 1, (0,), 1, 2)  # one block, whatever its size >= n
    with torch.no_grad():
        dense = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
        at_n = bigbird_attention(q, k, v, 8, layout, key_mask=km, blockwise=True).output
        for b in (512, 4096):
            assert count_flops(partial(bigbird_attention, q, k, v, b, layout, key_mask=km)) <= dense
            torch.testing.assert_close(bigbird_attention(q, k, v, b, layout, key_mask=km).output, at_n)
            torch.testing.assert_close(bigbird_attention(q, k, v, b, layout, key_mask=km, blockwise=True).output, at_n)
            assert count_flops(partial(bigbird_attention, q, k, v, b, layout, key_mask=km, blockwise=True)) <= 8 * dense
    torch.manual_seed(0)
    layer = BigBirdAttention(32, 2, block_size=512).eval()
    mha = MultiHeadAttention(32, 2).eval()
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        assert count_flops(lambda: layer(x)) <= count_flops(lambda: mha(x))
        wide = layer(x).output
        layer.block_size = 8
        torch.testing.assert_close(wide, layer(x).output)


@pytest.mark.parametrize("n, b, w, g, r, heads", CASES)
def test_the_cheaper_path_is_taken_and_both_agree(n, b, w, g, r, heads):
    q, k, v = qkv(2, heads, n, 8)
    km = padding_mask([n, max(1, n - 6)], n)
    layout = bigbird_layout(-(-n // b), w, g, r, heads, seed=3)
    with torch.no_grad():
        flops = {bw: count_flops(partial(bigbird_attention, q, k, v, b, layout, key_mask=km, blockwise=bw)) for bw in (None, True, False)}
        assert flops[None] == min(flops[True], flops[False]), flops
        torch.testing.assert_close(bigbird_attention(q, k, v, b, layout, key_mask=km, blockwise=True).output,
                                   bigbird_attention(q, k, v, b, layout, key_mask=km, blockwise=False).output, atol=1e-6, rtol=1e-5)


def test_empty_batch_mixed_dtypes_and_bad_arguments():
    layout = bigbird_layout(5)
    q = torch.randn(0, 2, 10, 4)
    out = bigbird_attention(q, q, q, 2, layout, need_weights=True)
    assert out.output.shape == (0, 2, 10, 4) and out.weights.shape == (0, 2, 10, 10)
    assert bigbird_attention(q[:, 0], q[:, 0], q[:, 0], 2, layout).output.shape == (0, 10, 4)
    x = torch.randn(1, 10, 4)
    with pytest.raises(TypeError, match=r"dtypes must match \((q|query): torch\.float32, (k|key): torch\.float64, (v|value): torch\.float32\)"):
        bigbird_attention(x, x.double(), x, 2, layout)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        BigBirdAttention(8, 2, seed=1.5)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        bigbird_layout(4, seed=0.5)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 2\.0"):
        BigBirdAttention(8, 2, dropout=2.0)


# ----------------------------------------------------------------------------- one interface (issue 23)


def test_module_is_multihead_attention_under_the_bigbird_mask():
    """BigBirdAttention is AttentionBase with the "bigbird" kernel and its layout as state: MultiHeadAttention's
    state dict loads into it (same parameter names), and the two agree under the dense bigbird_mask."""
    from attn.attention import AttentionBase, get_kernel
    from attn.hybrid import bigbird_kernel

    torch.manual_seed(2)
    mod = BigBirdAttention(16, 4, block_size=3, window=1, global_blocks=(0, -1), num_random=2).double()
    mha = MultiHeadAttention(16, 4).double()
    mod.load_state_dict(mha.state_dict())
    assert isinstance(mod, AttentionBase) and get_kernel("bigbird").fn is bigbird_kernel
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    km = padding_mask([29, 20], 29)
    out, w = mod(x, key_mask=km, need_weights=True, blockwise=True)
    ref, wr = mha(x, key_mask=km, attn_mask=bigbird_mask(29, 3, mod.layout(29))[None], need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w, wr, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="cannot be causal"):
        mod(x, is_causal=True)


# ----------------------------------------------------------------------------- chapter 10's experiment (issue 16)

from attn.experiments.hybrid import (  # noqa: E402
    ARMS,
    MarkedRecall,
    MarkedRecallModel,
    PatternAttention,
    RecallConfig,
    arm_mask,
    reach,
    reach_per_hop,
    run_marked_recall,
)


def test_marked_recall_data():
    task = MarkedRecall(n_pairs=64, n_values=8)
    b = task.sample(256, torch.Generator().manual_seed(0))
    assert task.length == 66 and b["keys"].shape == b["values"].shape == (256, 64)
    assert torch.equal(b["y"], b["values"][torch.arange(256), b["where"]])
    # the mark is uniform over the pairs: far pairs are as common as near ones
    assert (b["where"] < 32).float().mean().item() == pytest.approx(0.5, abs=0.1)
    # the answer is not readable from the value counts: its value is usually not the most common one
    mode = torch.mode(b["values"], -1).values
    assert (mode == b["y"]).float().mean() < 0.5


def test_layout_seed_follows_the_training_seed():
    cfg = RecallConfig()
    a, a2, c = (arm_mask("BigBird r=1", 66, 2, s, cfg) for s in (0, 0, 1))
    assert torch.equal(a, a2) and not torch.equal(a, c)
    assert torch.equal(arm_mask("BigBird r=0", 66, 2, 0, cfg), arm_mask("BigBird r=0", 66, 2, 1, cfg))
    local = arm_mask("local", 66, 2, 0, cfg)
    assert not local[:, -1, : 66 - 1 - cfg.window].any()  # the query sees no far key in one layer
    lf = arm_mask("global tokens (Longformer)", 66, 2, 0, cfg)
    assert lf[:, :, : cfg.block].all() and lf[:, : cfg.block].all()
    assert arm_mask("dense", 66, 2, 0, cfg).all()
    with pytest.raises(ValueError, match="unknown arm"):
        arm_mask("sparse", 66, 2, 0, cfg)


def test_reach_is_the_diameter_argument():
    n, w = 40, 3
    band = torch.ones(n, n, dtype=torch.bool).tril(w).triu(-w)
    for L in (1, 2, 3):
        row = reach(band, L)[-1]
        assert row.sum().item() == L * w + 1  # the last token reaches L w keys back, and itself
    hub = band.clone()
    hub[0, :] = hub[:, 0] = True
    assert not reach(hub, 1).all() and reach(hub, 2).all()  # two hops through the hub
    assert reach_per_hop(hub, 3)[1:] == [1.0, 1.0]


def test_pattern_attention_equals_bigbird_attention_with_its_state():
    cfg = RecallConfig()
    pattern = arm_mask("BigBird r=1", 66, 2, 7, cfg)
    torch.manual_seed(0)
    pa = PatternAttention(32, 2, pattern)
    bb = BigBirdAttention(32, 2, block_size=cfg.block, window=1, global_blocks=(0,), num_random=1, seed=7)
    bb.load_state_dict(pa.attention.state_dict())
    x = torch.randn(3, 66, 32)
    torch.testing.assert_close(pa(x).output, bb(x).output, atol=1e-5, rtol=1e-5)


def test_runner_one_value_per_seed_per_arm_and_dense_learns():
    cfg = RecallConfig(n_pairs=16, steps=60, eval_batch=256, window=2)
    runs = run_marked_recall(("local", "dense"), seeds=(0, 1, 2), config=cfg)
    for field_ in (runs.accuracy, runs.reachable, runs.ceiling, runs.steps_to_target, runs.curves):
        assert set(field_) == {"local", "dense"} and all(len(v) == 3 for v in field_.values())
    assert runs.reachable["dense"] == [1.0, 1.0, 1.0]
    assert all(r == pytest.approx(4 / 16) for r in runs.reachable["local"])  # 2 layers x window 2
    assert min(runs.accuracy["dense"]) > 0.6  # trained: far above chance (1/8)
    model = MarkedRecallModel(MarkedRecall(16), cfg, [arm_mask("dense", 18, 2, 0, cfg)] * 2)
    assert model(*(MarkedRecall(16).sample(4)[k] for k in ("keys", "values", "where")))[0].shape == (4, 8)
    assert ARMS[-1] == "dense"
