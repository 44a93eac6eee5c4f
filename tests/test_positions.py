"""Chapter 28: sinusoidal, rotary (RoPE) and ALiBi positions, against transformers and explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch

from attn import registry
from attn.attention import Attention, get_kernel
from attn.benchmark import largest_tensor
from attn.experiments.positions import LastValueTask, PositionModel, position_loss
from attn.multihead import MultiHeadAttention
from attn.positions import (
    PositionalAttention,
    RotaryEmbedding,
    alibi_bias,
    alibi_kernel,
    alibi_slopes,
    rotate_half,
    sinusoidal_embedding,
)
from attn.train import train


def explicit_rotation(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as 2x2 rotation matrices on the pairs (i, i + d/2), in float64."""
    d = x.shape[-1]
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(d // 2):
        theta = positions.double() * base ** (-2 * i / d)
        a, b = x[..., i].double(), x[..., i + d // 2].double()
        out[..., i] = a * theta.cos() - b * theta.sin()
        out[..., i + d // 2] = a * theta.sin() + b * theta.cos()
    return out


@pytest.mark.parametrize("head_dim, base", [(8, 10000.0), (16, 500.0), (4, 1e6)])
def test_rope_matches_transformers_rotary_embedding(head_dim, base):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    heads = 2
    cfg = LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=heads,
                      rope_parameters={"rope_type": "default", "rope_theta": base}, max_position_embeddings=256)
    hf = LlamaRotaryEmbedding(cfg)
    q = torch.randn(2, heads, 40, head_dim, requires_grad=True)
    k = torch.randn(2, heads, 40, head_dim, requires_grad=True)
    pos = torch.arange(7, 47)
    cos, sin = hf(q, pos[None].expand(2, -1))
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    rope = RotaryEmbedding(head_dim, base)
    q_ours, k_ours = rope(q, pos), rope(k, pos)
    assert (q_ours - q_ref).abs().max() <= 1e-5 and (k_ours - k_ref).abs().max() <= 1e-5
    up = torch.randn_like(q_ref)
    g1 = torch.autograd.grad((q_ours * up).sum() + (k_ours * up).sum(), (q, k))
    g2 = torch.autograd.grad((q_ref * up).sum() + (k_ref * up).sum(), (q, k))
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_rope_is_a_rotation_by_position_times_frequency():
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    pos = torch.arange(10) * 3
    torch.testing.assert_close(RotaryEmbedding(8, 100.0)(x, pos), explicit_rotation(x, pos, 100.0), atol=1e-5, rtol=1e-5)
    # norms are preserved, position 0 is the identity
    torch.testing.assert_close(RotaryEmbedding(8)(x, pos).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(RotaryEmbedding(8)(x[:, :1], torch.zeros(1, dtype=torch.long)), x[:, :1])
    torch.testing.assert_close(rotate_half(rotate_half(x)), -x)


def test_rope_scores_depend_only_on_i_minus_j():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    pos = torch.arange(0, 300)
    qr, kr = rope(q.expand(300, 16), pos), rope(k.expand(300, 16), pos)
    scores = qr @ kr.T  # (300, 300): score(i, j)
    for dist in (0, 1, 5, 77, -3):
        diag = torch.diagonal(scores, offset=-dist)  # entries with i - j = dist
        assert diag.std() <= 1e-4 * max(1.0, diag.abs().mean())
    assert scores[10, 3] != pytest.approx(scores[10, 4].item())  # it does depend on the distance


def test_alibi_scores_depend_only_on_i_minus_j_and_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2.0 ** (-2 * (i + 1)) for i in range(4)]))
    s6 = alibi_slopes(6)  # not a power of 2: 4 slopes of H=4, then every other slope of H=8
    torch.testing.assert_close(s6, torch.tensor([0.25, 0.0625, 2**-6, 2**-8, 0.5, 2**-3]))
    b = alibi_bias(20, 20, alibi_slopes(4))
    for dist in (0, 3, 11):
        diag = torch.diagonal(b, offset=-dist, dim1=-2, dim2=-1)
        assert (diag == diag[:, :1]).all()
        torch.testing.assert_close(diag[:, 0], -alibi_slopes(4) * dist)
    assert torch.isinf(b[:, 2, 5]).all()
    two_sided = alibi_bias(5, 5, alibi_slopes(2), causal=False)
    torch.testing.assert_close(two_sided, two_sided.transpose(-1, -2))
    # a cache of 7 keys and 3 new queries: the last rows of the full bias
    torch.testing.assert_close(alibi_bias(3, 10, alibi_slopes(2), offset=7), alibi_bias(10, 10, alibi_slopes(2))[:, 7:])


def test_sinusoidal_matches_formula_and_dot_products_are_relative():
    pe = sinusoidal_embedding(torch.arange(50), 16)
    p, i = 13, 3
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-6)
    gram = pe @ pe.T
    torch.testing.assert_close(torch.diagonal(gram, -4), torch.full((46,), gram[4, 0].item()), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(torch.arange(3), 5)


@pytest.mark.parametrize("position", ["none", "sinusoidal", "rope", "alibi"])
@pytest.mark.parametrize("causal", [True, False])
def test_module_matches_explicit_attention(position, causal):
    torch.manual_seed(0)
    m = PositionalAttention(16, 4, position, causal=causal, base=100.0)
    x = torch.randn(2, 9, 16, requires_grad=True)
    out, w = m(x, need_weights=True)
    q, k, v = (m.split_heads(p(x)) for p in (m.q_proj, m.k_proj, m.v_proj))  # (2, 4, 9, 4) each
    pos = torch.arange(9)
    if position == "rope":
        q, k = explicit_rotation(q, pos, 100.0).float(), explicit_rotation(k, pos, 100.0).float()
    scores = q @ k.transpose(-1, -2) / 2.0
    if position == "alibi":
        dist = (pos[:, None] - pos[None, :]).float()
        scores = scores - alibi_slopes(4)[:, None, None] * (dist if causal else dist.abs())
    if causal:
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    ref_w = scores.softmax(-1)
    ref = m.out_proj((ref_w @ v).transpose(1, 2).reshape(2, 9, 16))
    assert (w - ref_w).abs().max() <= 1e-5
    assert (out - ref).abs().max() <= 1e-5
    assert (m(x).output - ref).abs().max() <= 1e-5  # fused path
    up = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, [x, *m.parameters()], up), torch.autograd.grad(ref, [x, *m.parameters()], up), strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_rope_module_is_invariant_to_a_position_offset():
    m = PositionalAttention(16, 2, "rope", causal=True)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(m(x, offset=0).output, m(x, offset=1000).output, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64():
    for position in ("rope", "alibi"):
        m = PositionalAttention(8, 2, position).double()
        x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t, m=m: m(t, need_weights=True).output, (x,))


def test_causal_ignores_future_and_batched_equals_single():
    m = PositionalAttention(16, 4, "alibi")
    x = torch.randn(3, 8, 16)
    y = m(x).output
    x2 = x.clone()
    x2[:, 6:] = 0
    torch.testing.assert_close(m(x2).output[:, :6], y[:, :6])
    torch.testing.assert_close(m(x[1:2]).output, y[1:2], atol=1e-6, rtol=1e-5)


def test_last_value_task():
    task = LastValueTask(n_values=5, read_prob=0.5)
    b = task.sample(64, 30, torch.Generator().manual_seed(0))
    x, y = b["x"], b["y"]
    for row in range(64):
        last = None
        for t in range(30):
            if x[row, t] == task.read:
                assert y[row, t] == last
            else:
                last = x[row, t].item()
                assert y[row, t] == -100


def test_model_trains_and_alibi_runs_at_longer_lengths():
    task = LastValueTask(4)
    model = PositionModel(task.vocab, "alibi", 16, 2)
    hist = train(model, lambda bs, g: task.sample(bs, 16, g), position_loss, 30, batch_size=16, progress=False)
    assert hist.loss[-1] < hist.loss[0]
    logits, _ = model(task.sample(2, 64)["x"])
    assert logits.shape == (2, 64, task.vocab)


def test_empty_batch():
    out, w = PositionalAttention(16, 4, "rope")(torch.randn(0, 5, 16), need_weights=True)
    assert out.shape == (0, 5, 16) and w.shape == (0, 4, 5, 5)


@pytest.mark.parametrize(
    "bad, err, match",
    [
        ([[1.0] * 16], TypeError, r"\(batch, seq, embed_dim=16\)"),
        (torch.ones(2, 5, 16, dtype=torch.long), TypeError, "floating-point"),
        (torch.randn(5, 16), ValueError, r"\(batch, seq, embed_dim=16\)"),
        (torch.randn(2, 5, 12), ValueError, "last dimension 12 != 16"),
    ],
)
def test_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        PositionalAttention(16, 4, "rope")(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="position must be one of"):
        PositionalAttention(16, 4, "learned")
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(5)
    with pytest.raises(ValueError, match=r"head_dim=8"):
        RotaryEmbedding(8)(torch.randn(3, 6), torch.arange(3))
    with pytest.raises(ValueError, match=r"positions must have shape"):
        RotaryEmbedding(8)(torch.randn(3, 8), torch.arange(4))
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        alibi_slopes(0)


def test_registry_build():
    for name in ("rope", "alibi"):
        mech = registry.get(name)
        assert mech.chapter == 28 and registry.chapter(28).slug == "positions"
        layer = mech.build(32, 4)
        out = layer(torch.randn(2, 7, 32), need_weights=True)
        assert out.output.shape == (2, 7, 32) and out.weights.shape == (2, 4, 7, 7)


# ----------------------------------------------------------------------------- linear memory, bad input, precision



@pytest.mark.parametrize("position", ["alibi", "rope", "none"])
@pytest.mark.parametrize("causal", [True, False])
def test_no_dense_map_without_weights(position, causal):
    """Without weights no tensor bigger than one query block's (H, block_q, n) exists (the dense map has H n^2)."""
    n, H, block = 512, 4, 64
    m = PositionalAttention(16, H, position, causal=causal, block_q=block)
    x = torch.randn(1, n, 16)
    assert largest_tensor(lambda: m(x)) <= H * block * n  # = H n^2 / 8 here
    assert largest_tensor(lambda: m(x, need_weights=True)) >= H * n * n  # the weights path is the dense one


@pytest.mark.parametrize("position", ["alibi", "rope", "none"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_linear_memory_path_equals_dense_reference_float64(position, causal, padded):
    """need_weights=False (blocked/fused) against need_weights=True (dense): outputs and every gradient, float64."""
    torch.manual_seed(0)
    m = PositionalAttention(16, 4, position, causal=causal, block_q=3).double()
    x = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    km = None
    if padded:  # left padding (causal rows with no visible key), right padding, an all-padding row
        km = torch.ones(3, 10, dtype=torch.bool)
        km[0, :4] = False
        km[1, 7:] = False
        km[2] = False
    fast, dense = m(x, key_mask=km), m(x, key_mask=km, need_weights=True)
    assert fast.weights is None and dense.weights.shape == (3, 4, 10, 10)
    assert (fast.output - dense.output).abs().max() <= 1e-12
    params = [x, *m.parameters()]
    g_fast = torch.autograd.grad(fast.output.square().sum(), params)
    g_dense = torch.autograd.grad(dense.output.square().sum(), params)
    for a, b in zip(g_fast, g_dense, strict=True):
        assert (a - b).abs().max() <= 1e-11
    if padded:  # padding content never reaches real outputs
        x2 = x.detach().clone()
        x2[~km] = 100.0
        real = km.any(-1)
        with torch.no_grad():
            y1, y2 = m(x.detach(), key_mask=km).output, m(x2, key_mask=km).output
        assert (y1[real][km[real]] - y2[real][km[real]]).abs().max() <= 1e-12


def test_fused_attention_with_bias_equals_core_sdpa():
    from attn.core import scaled_dot_product_attention
    from attn.positions import fused_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(3, 9, 9, generator=g, dtype=torch.float64)
    km = torch.tensor([[False] * 3 + [True] * 6, [True] * 5 + [False] * 4])
    for causal in (False, True):
        for key_mask in (None, km):
            for b in (None, bias):
                ref = scaled_dot_product_attention(q, k, v, attn_mask=b, key_mask=key_mask, is_causal=causal,
                                                   need_weights=True).output
                got = fused_attention(q, k, v, key_mask=key_mask, causal=causal, block_q=2,
                                      bias=None if b is None else (lambda lo, hi, kh: bias[:, lo:hi, :kh]))
                assert (got - ref).abs().max() <= 1e-12, (causal, key_mask is not None, b is not None)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: alibi_bias(3, 5, torch.ones(4, 1)), ValueError, r"slopes must have shape \(num_heads,\)"),
        (lambda: alibi_bias(3, 5, [0.5, 0.25]), TypeError, r"slopes must be a torch.Tensor of shape \(num_heads,\)"),
        (lambda: alibi_bias(3, 5, torch.tensor([1, 2])), TypeError, "slopes must be a floating-point"),
        (lambda: alibi_bias(-1, 5, alibi_slopes(2)), ValueError, "n_queries must be >= 1, got -1"),
        (lambda: alibi_bias(0, 5, alibi_slopes(2)), ValueError, "n_queries must be >= 1, got 0"),
        (lambda: alibi_bias(3, 0, alibi_slopes(2)), ValueError, "n_keys must be >= 1, got 0"),
        (lambda: alibi_bias(3, 5, alibi_slopes(2), offset=-2), ValueError, "offset must be >= 0"),
        (lambda: alibi_bias(2.5, 5, alibi_slopes(2)), TypeError, "n_queries must be an int"),
        (lambda: alibi_slopes(-3), ValueError, "num_heads must be >= 1"),
        (lambda: RotaryEmbedding(8)(torch.randn(3, 8), [0, 1, 2]), TypeError, r"positions must be a torch.Tensor"),
        (lambda: RotaryEmbedding(8)(torch.randn(3, 8), torch.ones(3, dtype=torch.bool)), TypeError, "positions"),
        (lambda: RotaryEmbedding(8)(torch.randn(3, 8), torch.arange(3)[None]), ValueError, r"positions must have shape"),
        (lambda: RotaryEmbedding(0), ValueError, "head_dim must be >= 1"),
        (lambda: RotaryEmbedding(8, base=-1.0), ValueError, "base must be > 0"),
        (lambda: PositionalAttention(16, 0), ValueError, "num_heads must be >= 1, got 0"),
        (lambda: PositionalAttention(16, -4), ValueError, "num_heads must be >= 1"),
        (lambda: PositionalAttention(16, 3), ValueError, "divisible"),
        (lambda: PositionalAttention(16, 4)(torch.randn(2, 5, 16), key_mask=torch.ones(2, 4, dtype=torch.bool)),
         ValueError, "key_mask"),
        (lambda: PositionalAttention(16, 4)(torch.randn(2, 5, 16), offset=-1), ValueError, "offset must be >= 0"),
        (lambda: sinusoidal_embedding([0, 1], 8), TypeError, "positions must be a torch.Tensor"),
    ],
)
def test_bad_arguments_name_what_was_expected(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_rope_tables_are_float64_for_float64_input():
    """One precision rule (as attn.latent): angles in float64, cast to the input dtype. float64 input is exact to 1e-12."""
    rope = RotaryEmbedding(16, base=10000.0)
    pos = torch.arange(3000, 3040)  # large angles: float32 tables are off by ~1e-4 here
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    ref = explicit_rotation(x, pos, 10000.0)
    assert (rope(x, pos) - ref).abs().max() <= 1e-12
    cos, _ = rope.cos_sin(pos)
    assert cos.dtype == torch.float64 and rope.cos_sin(pos, torch.float32)[0].dtype == torch.float32
    x32 = x.float()
    assert rope(x32, pos).dtype == torch.float32
    assert (rope(x32, pos).double() - explicit_rotation(x32, pos, 10000.0)).abs().max() <= 1e-5
    # the package's one RoPE: Attention(position="rope"), MLA's decoupled key and the differential chapter's LM
    # all rotate with this module
    from attn.latent import MultiHeadLatentAttention

    assert type(Attention(16, 2, position="rope").rotary) is RotaryEmbedding
    assert type(MultiHeadLatentAttention(16, 2).rotary) is RotaryEmbedding


def test_fused_attention_one_head_and_bad_input():
    from attn.positions import fused_attention

    q = torch.randn(2, 6, 4, dtype=torch.float64)
    ref = (q @ q.transpose(-1, -2) / 2.0).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    assert (fused_attention(q, q, q, causal=True, block_q=4) - ref.softmax(-1) @ q).abs().max() <= 1e-13
    assert (fused_attention(q, q, q, causal=True) - ref.softmax(-1) @ q).abs().max() <= 1e-13
    with pytest.raises(TypeError, match="dtypes must match"):
        fused_attention(q, q.float(), q)
    with pytest.raises(ValueError, match="key_mask"):
        fused_attention(q, q, q, key_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_q must be >= 1"):
        fused_attention(q, q, q, block_q=0)


# ----------------------------------------------------------------------------- issue 23: one attention interface


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("causal", [True, False])
def test_positional_attention_is_attention_with_position(position, causal):
    """PositionalAttention(E, H, p) = Attention(E, H, position=p) on the same weights (MultiHeadAttention's names);
    ALiBi runs as the registered blockwise "alibi" kernel, equal to the base's dense ALiBi bias."""
    torch.manual_seed(0)
    ours = PositionalAttention(16, 4, position, causal=causal, block_q=3).double().eval()
    ref = Attention(16, 4, position=position, causal=causal).double().eval()
    ref.load_state_dict(MultiHeadAttention(16, 4).double().state_dict())
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, Attention) and ours.kernel == ("alibi" if position == "alibi" else "sdpa")
    assert registry.get(position).kernel == ours.kernel and registry.get(position).causal is False
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    km = torch.ones(2, 11, dtype=torch.bool)
    km[1, -4:] = False
    for need_weights in (False, True):
        a, wa = ours(x, key_mask=km, need_weights=need_weights)
        b, wb = ref(x, key_mask=km, need_weights=need_weights)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        if need_weights:
            torch.testing.assert_close(wa, wb, atol=1e-12, rtol=1e-12)


def test_alibi_kernel_with_a_cache_equals_one_pass():
    """After a cache the new queries are the last ones: the kernel's distances are bottom-right aligned."""
    torch.manual_seed(0)
    m = PositionalAttention(16, 4, "alibi", causal=True).double().eval()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    cache = m.new_cache(2, 9)
    steps = [m(x[:, :4], cache=cache).output] + [m(x[:, t : t + 1], cache=cache).output for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), m(x).output, atol=1e-12, rtol=1e-12)
    assert get_kernel("alibi").fn is alibi_kernel and not get_kernel("alibi").dense


# --- issue 17: layouts, rescaled RoPE, the first-value task, training to a target -------------------------------


@pytest.mark.parametrize("head_dim", [2, 8, 16])
def test_interleaved_layout_is_the_half_layout_up_to_a_permutation(head_dim):
    from attn.positions import half_to_interleaved, rotate_pairs

    perm = half_to_interleaved(head_dim)
    assert sorted(perm.tolist()) == list(range(head_dim))
    assert perm[:4].tolist() == [0, head_dim // 2, 1, head_dim // 2 + 1][: min(4, head_dim)]
    x = torch.randn(3, 11, head_dim, dtype=torch.float64)
    pos = torch.arange(11) * 5 + 2
    half, inter = RotaryEmbedding(head_dim, 100.0), RotaryEmbedding(head_dim, 100.0, interleaved=True)
    torch.testing.assert_close(inter(x[..., perm], pos), half(x, pos)[..., perm], atol=1e-12, rtol=0)
    torch.testing.assert_close(rotate_pairs(rotate_pairs(x)), -x)
    # scores are invariant to the permutation of both q and k: the same rotation
    k = torch.randn_like(x)
    s_half = half(x, pos) @ half(k, pos).transpose(-1, -2)
    s_inter = inter(x[..., perm], pos) @ inter(k[..., perm], pos).transpose(-1, -2)
    torch.testing.assert_close(s_inter, s_half)
    if head_dim > 2:  # without the permutation the two layouts differ
        assert (inter(x, pos) - half(x, pos)).abs().max() > 1e-3


def test_rope_frequencies_pi_ntk_yarn():
    from attn.positions import rope_frequencies, yarn_magnitude

    d, s, L = 16, 4.0, 64
    omega = rope_frequencies(d)
    torch.testing.assert_close(omega, RotaryEmbedding(d).inv_freq)
    torch.testing.assert_close(rope_frequencies(d, method="pi", factor=s), omega / s)
    ntk = rope_frequencies(d, method="ntk", factor=s)
    assert ntk[0] == omega[0] and ntk[-1].item() == pytest.approx(omega[-1].item() / s)  # fastest kept, slowest / s
    assert (ntk <= omega).all() and (ntk >= omega / s - 1e-15).all()
    yarn = rope_frequencies(d, method="yarn", factor=s, original_length=L)
    turns = L * omega / (2 * math.pi)
    torch.testing.assert_close(yarn[turns >= 32], omega[turns >= 32])  # many turns: kept
    torch.testing.assert_close(yarn[turns <= 1], omega[turns <= 1] / s)  # under one turn: interpolated
    assert yarn_magnitude(1.0) == 1.0 and yarn_magnitude(4.0) == pytest.approx(0.1 * math.log(4) + 1)
    with pytest.raises(ValueError, match="original_length"):
        rope_frequencies(d, method="yarn", factor=s)
    with pytest.raises(ValueError, match="method"):
        rope_frequencies(d, method="linear")
    rope = RotaryEmbedding(d).rescale("pi", s)
    x, pos = torch.randn(5, 7, d, dtype=torch.float64), torch.arange(7) * 4
    torch.testing.assert_close(rope(x, pos), RotaryEmbedding(d)(x, pos // 4))  # positions divided by s
    rope.rescale("yarn", s, L)
    assert rope.magnitude == pytest.approx(yarn_magnitude(s))
    torch.testing.assert_close(rope(x, pos).norm(dim=-1), rope.magnitude * x.norm(dim=-1))
    rope.rescale()  # back to the trained frequencies
    torch.testing.assert_close(rope(x, pos), RotaryEmbedding(d)(x, pos))


def test_first_value_task_answers_with_token_zero():
    from attn.experiments.positions import FirstValueTask

    task = FirstValueTask(n_values=5, read_prob=0.5)
    b = task.sample(64, 40, torch.Generator().manual_seed(0))
    x, y = b["x"], b["y"]
    is_read = x == task.read
    assert (x[:, 0] < task.n_values).all() and is_read.any()
    assert (y[is_read] == x[:, :1].expand_as(x)[is_read]).all() and (y[~is_read] == -100).all()
    last = LastValueTask(n_values=5, read_prob=0.5).sample(64, 40, torch.Generator().manual_seed(0))
    assert torch.equal(last["x"], x)  # the same sequences, another answer
    assert (last["y"][is_read] != y[is_read]).float().mean() > 0.5  # the first value is rarely the most recent


def test_length_runs_one_value_per_seed_and_length_and_censoring():
    from attn.experiments.positions import length_runs, train_to_target

    task = LastValueTask(4)
    runs = length_runs(task, ["rope", "none"], [0, 1, 2], 8, [8, 16], embed_dim=16, num_heads=2, max_steps=5,
                       check_every=5, eval_batch=16)
    for run in runs.values():
        assert len(run.steps) == 3 and len(run.models) == 3
        assert all(len(run.acc[L]) == 3 for L in (8, 16))
    assert runs["none"].steps == [None, None, None]  # not reached in 5 steps: censored, kept
    model = PositionModel(task.vocab, "rope", 16, 2)
    assert train_to_target(model, task, 8, target=0.0, max_steps=50, check_every=5) == 5  # stops at the target


def test_seeded_runs_repeat():
    from attn.experiments.positions import length_runs

    task = LastValueTask(4)
    a, b = (length_runs(task, ["alibi"], [3], 8, [16], embed_dim=16, num_heads=2, max_steps=10, check_every=5,
                        eval_batch=16)["alibi"] for _ in range(2))
    assert a.acc == b.acc and a.steps == b.steps


def test_convert_layout_needs_the_row_permutation():
    from attn.experiments.positions import convert_layout

    torch.manual_seed(0)
    task = LastValueTask(4)
    model = PositionModel(task.vocab, "rope", 32, 2).eval()
    x = task.sample(4, 20, torch.Generator().manual_seed(1))["x"]
    permuted, as_is = convert_layout(model, permute=True), convert_layout(model, permute=False)
    assert permuted.attention.rotary.interleaved and as_is.attention.rotary.interleaved
    with torch.no_grad():
        ref = model(x)[0]
        torch.testing.assert_close(permuted(x)[0], ref, atol=1e-5, rtol=1e-5)
        assert (as_is(x)[0] - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="half-layout RoPE"):
        convert_layout(PositionModel(task.vocab, "alibi", 32, 2))


def test_rescale_and_tune_work_on_copies():
    from attn.experiments.positions import rescale_rope, tune_at_length

    task = LastValueTask(4)
    model = PositionModel(task.vocab, "rope", 16, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = tune_at_length(model, task, 16, 3, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    rescale_rope(model, "pi", 4.0, 8)
    torch.testing.assert_close(model.attention.rotary.inv_freq, RotaryEmbedding(8).inv_freq / 4)
    with pytest.raises(ValueError, match="RoPE model"):
        rescale_rope(PositionModel(task.vocab, "alibi", 16, 2), "pi", 4.0, 8)
