"""Chapter 29: multi-head latent attention against transformers' DeepseekV3Attention, absorbed == unabsorbed, the cache."""

from __future__ import annotations

import pytest
import torch

from attn import registry
from attn.benchmark import largest_tensor
from attn.latent import LatentCache, MultiHeadLatentAttention, latent_cache_bytes_per_token
from attn.positions import RotaryEmbedding, apply_rotary


def rotary_cos_sin(positions, dim, base=10000.0, dtype=torch.float32):
    """The package's one RoPE (attn.positions.RotaryEmbedding): cos, sin (n, dim) in ``dtype``."""
    return RotaryEmbedding(dim, base).cos_sin(positions, dtype)

E, H = 32, 4


def make(q_rank=None, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    m = MultiHeadLatentAttention(E, H, kv_rank=kw.pop("kv_rank", 12), q_rank=q_rank, head_dim=kw.pop("head_dim", 6),
                                 rope_dim=kw.pop("rope_dim", 4), v_head_dim=kw.pop("v_head_dim", 5), **kw).to(dtype)
    with torch.no_grad():  # non-trivial norm weights, so that copying them is tested
        for p in m.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return m


def tokens(B=2, n=7, seed=1, dtype=torch.float32):
    return torch.randn(B, n, E, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- transformers reference


def hf_copy(m: MultiHeadLatentAttention):
    tr = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    cfg = tr.DeepseekV3Config(
        hidden_size=E, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=m.q_rank, kv_lora_rank=m.kv_rank,
        qk_rope_head_dim=m.rope_dim, qk_nope_head_dim=m.head_dim, v_head_dim=m.v_head_dim, rope_interleave=False,
        vocab_size=8, num_hidden_layers=1, intermediate_size=8, moe_intermediate_size=8, n_routed_experts=2,
        attention_bias=False, rms_norm_eps=1e-6,
    )
    cfg._attn_implementation = "eager"
    ref = DeepseekV3Attention(cfg, 0).to(m.kv_down.weight.dtype)
    pairs = [("kv_a_proj_with_mqa", m.kv_down), ("kv_a_layernorm", m.kv_norm), ("kv_b_proj", m.kv_up), ("o_proj", m.out_proj)]
    if m.q_rank is None:
        pairs.append(("q_proj", m.q_proj))
    else:
        pairs += [("q_a_proj", m.q_down), ("q_a_layernorm", m.q_norm), ("q_b_proj", m.q_up)]
    with torch.no_grad():
        for name, mine in pairs:
            getattr(ref, name).weight.copy_(mine.weight)
    return ref, DeepseekV3RotaryEmbedding(cfg)


@pytest.mark.parametrize("q_rank", [None, 10])
@pytest.mark.parametrize("absorb", [False, True])
def test_matches_transformers_deepseek_v3_attention(q_rank, absorb):
    m = make(q_rank, dtype=torch.float64)
    ref, rot = hf_copy(m)
    x = tokens(dtype=torch.float64).requires_grad_()
    B, n = x.shape[:2]
    cos, sin = rot(x, torch.arange(n)[None].expand(B, n))
    mask = torch.full((n, n), float("-inf"), dtype=x.dtype).triu(1)[None, None].expand(B, 1, n, n)
    y_ref, w_ref = ref(x, (cos, sin), mask)
    y, w = m(x, need_weights=True, absorb=absorb)
    # float64 here, but transformers computes its RMSNorm and rotary frequencies in float32: ~1e-7 apart
    assert (y - y_ref).abs().max() <= 1e-6
    assert (w - w_ref).abs().max() <= 1e-6
    up = torch.randn_like(y)
    mine = torch.autograd.grad(y, [x, *m.parameters()], up)
    theirs = torch.autograd.grad(y_ref, [x, *ref.parameters()], up)
    assert (mine[0] - theirs[0]).abs().max() <= 1e-6
    # the same parameters, by shape-matched pairs (the order of registration differs)
    got = sorted((tuple(g.shape), float(g.abs().sum())) for g in mine[1:])
    want = sorted((tuple(g.shape), float(g.abs().sum())) for g in theirs[1:])
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(abs(a - b) <= 1e-6 * max(1.0, b) for (_, a), (_, b) in zip(got, want, strict=True))


def test_rotary_matches_transformers_and_is_relative():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    pos = torch.arange(9)
    cos, sin = rotary_cos_sin(pos, 8, dtype=torch.float64)
    q, k = torch.randn(2, 3, 9, 8, dtype=torch.float64), torch.randn(2, 3, 9, 8, dtype=torch.float64)
    rq, rk = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    assert torch.allclose(apply_rotary(q, cos, sin), rq, atol=1e-14)
    assert torch.allclose(apply_rotary(k, cos, sin), rk, atol=1e-14)
    # the score of one query/key pair depends on the offset only: positions (2, 5) and (5, 8)
    a, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    rot = lambda v, p: apply_rotary(v, cos[p], sin[p])  # noqa: E731
    assert abs(rot(a, 2) @ rot(b, 5) - rot(a, 5) @ rot(b, 8)) < 1e-12
    assert abs(rot(a, 2) @ rot(b, 5) - rot(a, 2) @ rot(b, 6)) > 1e-3  # and it does depend on the offset
    with pytest.raises(ValueError, match="even"):
        rotary_cos_sin(pos, 7)


# ----------------------------------------------------------------------------- absorption, explicit formula


def explicit(m: MultiHeadLatentAttention, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's equations head by head, with explicit matrices and a loop over queries.

    ``key_mask`` (B, n): padded keys get weight 0; a query with no real key visible gets o = 0.
    """
    _, n, _ = x.shape
    d, dr, dv, r = m.head_dim, m.rope_dim, m.v_head_dim, m.kv_rank
    cos, sin = rotary_cos_sin(torch.arange(n), dr, dtype=x.dtype)
    rms = lambda v, w: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    c = rms(x @ m.kv_down.weight[:r].T, m.kv_norm.weight)  # c^KV (B, n, r)
    k_r = apply_rotary(x @ m.kv_down.weight[r:].T, cos, sin)  # (B, n, dr)
    cq = x if m.q_rank is None else rms(x @ m.q_down.weight.T, m.q_norm.weight)
    w_q = (m.q_proj if m.q_rank is None else m.q_up).weight.view(m.num_heads, d + dr, -1)
    heads = []
    for i in range(m.num_heads):
        w_uk = m.kv_up.weight.view(m.num_heads, d + dv, r)[i, :d]
        w_uv = m.kv_up.weight.view(m.num_heads, d + dv, r)[i, d:]
        q_c, q_r = cq @ w_q[i, :d].T, apply_rotary(cq @ w_q[i, d:].T, cos, sin)
        k_c, v_c = c @ w_uk.T, c @ w_uv.T
        rows = []
        for t in range(n):
            s = (q_c[:, t : t + 1] @ k_c[:, : t + 1].transpose(1, 2) + q_r[:, t : t + 1] @ k_r[:, : t + 1].transpose(1, 2))
            s = s / (d + dr) ** 0.5
            if key_mask is not None:
                s = s.masked_fill(~key_mask[:, None, : t + 1], float("-inf"))
            rows.append(s.softmax(-1).nan_to_num(0.0) @ v_c[:, : t + 1])
        heads.append(torch.cat(rows, 1))
    return torch.cat(heads, -1) @ m.out_proj.weight.T


@pytest.mark.parametrize("q_rank", [None, 10])
def test_absorbed_equals_unabsorbed_equals_explicit_formula(q_rank):
    m = make(q_rank)
    x = tokens().requires_grad_()
    y0 = m(x).output
    y1 = m(x, absorb=True).output
    ref = explicit(m, x)
    assert (y0 - ref).abs().max() <= 2e-6
    assert (y1 - ref).abs().max() <= 2e-6
    up = torch.randn_like(y0)
    params = [x, *m.parameters()]
    g0, g1, gr = (torch.autograd.grad(y, params, up) for y in (y0, y1, ref))
    for a, b, c in zip(g0, g1, gr, strict=True):
        assert (a - c).abs().max() <= 1e-5
        assert (b - c).abs().max() <= 1e-5


def test_absorbed_output_weight_folds_w_uv_into_w_o():
    m = make()
    x = tokens()
    with torch.no_grad():
        q_c, q_r = m.queries(x)
        c, k_r = m.latents(x)
        w_uk, _ = m.up_weights()
        q = torch.cat([torch.einsum("bhtd,hdr->bhtr", q_c, w_uk), q_r], -1)
        k = torch.cat([c, k_r], -1)[:, None]
        s = (q @ k.transpose(-1, -2)) * m.scale
        a = s.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        o_lat = a @ c[:, None]  # (B, h, n, d_c)
        y = o_lat.transpose(1, 2).reshape(2, 7, -1) @ m.absorbed_output_weight().T
        assert (y - m(x).output).abs().max() <= 1e-5


def test_gradcheck_float64_both_paths():
    torch.manual_seed(0)
    m = MultiHeadLatentAttention(8, 2, kv_rank=3, q_rank=3, head_dim=2, rope_dim=2, v_head_dim=2).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    for absorb in (False, True):
        assert torch.autograd.gradcheck(lambda x, absorb=absorb: m(x, absorb=absorb).output, (x,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- cache and properties


@pytest.mark.parametrize("absorb", [False, True])
def test_cached_decoding_equals_full_forward(absorb):
    m = make(q_rank=10)
    x = tokens(n=9)
    with torch.no_grad():
        full = m(x, need_weights=True)
        cache = m.new_cache(2, 12)
        outs = [m(x[:, :4], cache=cache, absorb=absorb)]
        outs += [m(x[:, i : i + 1], cache=cache, absorb=absorb, need_weights=True) for i in range(4, 9)]
    y = torch.cat([o.output for o in outs], 1)
    assert (y - full.output).abs().max() <= 1e-5
    assert (outs[-1].weights[:, :, 0] - full.weights[:, :, -1]).abs().max() <= 1e-6
    assert cache.length == 9
    assert cache.nbytes == 2 * 9 * (m.kv_rank + m.rope_dim) * 4
    assert latent_cache_bytes_per_token(1, m.kv_rank, m.rope_dim, 4) == cache.nbytes // 18


def test_causal_future_has_no_effect_and_batched_equals_single():
    m = make()
    x = tokens(n=8)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 3, E)
    with torch.no_grad():
        a, b = m(x).output, m(x2).output
        assert (a[:, :5] - b[:, :5]).abs().max() <= 1e-6
        assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3
        single = torch.cat([m(x[i : i + 1]).output for i in range(2)])
        assert (single - a).abs().max() <= 1e-6


def test_keys_are_low_rank():
    m = MultiHeadLatentAttention(64, 8, kv_rank=8)  # h d = 64 key numbers per token from an 8-dim latent
    with torch.no_grad():
        c, _ = m.latents(torch.randn(3, 40, 64))
        k_c = m.kv_up(c)[..., : 64].reshape(-1, 8, 16)[..., :8].reshape(120, -1)  # the W^UK parts, (tokens, h d)
    assert torch.linalg.matrix_rank(k_c).item() == 8


def test_defaults_follow_deepseek_ratios():
    m = MultiHeadLatentAttention(64, 4)
    assert (m.head_dim, m.kv_rank, m.rope_dim, m.v_head_dim) == (16, 64, 8, 16)


def test_empty_batch():
    m = make()
    out = m(torch.zeros(0, 5, E), need_weights=True)
    assert out.output.shape == (0, 5, E) and out.weights.shape == (0, H, 5, 5)
    assert m(torch.zeros(0, 5, E), absorb=True).output.shape == (0, 5, E)


@pytest.mark.parametrize(
    "bad, err, match",
    [
        ([[0.0] * E], TypeError, "torch.Tensor"),
        (torch.zeros(2, 5, E, dtype=torch.long), TypeError, "floating-point"),
        (torch.zeros(5, E), ValueError, r"\(batch, seq, embed_dim=32\)"),
        (torch.zeros(2, 5, E + 1), ValueError, "embed_dim=32"),
        (torch.zeros(2, 0, E), ValueError, "empty sequence"),
    ],
)
def test_bad_inputs(bad, err, match):
    with pytest.raises(err, match=match):
        make()(bad)


def test_bad_arguments_and_cache():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadLatentAttention(30, 4)
    with pytest.raises(ValueError, match="even"):
        MultiHeadLatentAttention(32, 4, rope_dim=3)
    with pytest.raises(TypeError, match="kv_rank must be an int"):
        MultiHeadLatentAttention(32, 4, kv_rank=2.5)
    with pytest.raises(ValueError, match="q_rank must be >= 1"):
        MultiHeadLatentAttention(32, 4, q_rank=0)
    m = make()
    with pytest.raises(TypeError, match="LatentCache"):
        m(tokens(), cache=object())
    with pytest.raises(ValueError, match="batch 2"):
        m(tokens(), cache=m.new_cache(3, 10))
    cache = m.new_cache(2, 8)
    with pytest.raises(ValueError, match="full"):
        m(tokens(n=9), cache=cache)
    with pytest.raises(ValueError, match="kv_rank"):
        LatentCache(1, 0, 2, 4)


def test_registry_entry():
    mech = registry.get("mla")
    assert mech.chapter == 29 and registry.chapter(29).slug == "latent_attention"
    layer = mech.build(32, 4)
    out = layer(torch.randn(2, 6, 32), need_weights=True)
    assert out.output.shape == (2, 6, 32) and out.weights.shape == (2, 4, 6, 6)
    assert torch.allclose(out.weights.sum(-1), torch.ones(2, 4, 6))


# ----------------------------------------------------------------------------- issue 15: linear memory, key mask,
# backprop through the cache, dtypes and bad input



@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_no_weights_path_never_forms_an_n_by_n_tensor(absorb, masked, monkeypatch):
    import attn.gqa as gqa_module

    n = 128
    monkeypatch.setattr(gqa_module, "_BLOCK_ELEMENTS", 8 * n)  # blocks of 8 queries at this small n
    m = MultiHeadLatentAttention(16, 2, kv_rank=8, head_dim=4, rope_dim=2, v_head_dim=4)
    x = torch.randn(1, n, 16)
    km = torch.rand(1, n) > 0.3 if masked else None
    assert largest_tensor(lambda: m(x, absorb=absorb, key_mask=km)) < n * n  # the largest: (n, h (d + d_v)) = 16 n
    assert largest_tensor(lambda: m(x, absorb=absorb, key_mask=km, need_weights=True)) >= n * n


def padding_masks(B=3, n=8):
    km = torch.ones(B, n, dtype=torch.bool)
    km[0, :3] = False  # left padding: the first 3 queries see no real key -> o = 0
    km[1, 5:] = False  # right padding
    km[2, 1::3] = False  # holes
    return km[:B]


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_key_mask_equals_explicit_masked_formula(absorb, need_weights, monkeypatch):
    import attn.gqa as gqa_module

    m = make(q_rank=10)
    x = tokens(B=3, n=8)
    km = padding_masks()
    ref = explicit(m, x, km)
    for block in (2**20, 3 * 8):  # one block, blocks of 3 queries
        monkeypatch.setattr(gqa_module, "_BLOCK_ELEMENTS", block)
        y, w = m(x, need_weights=need_weights, absorb=absorb, key_mask=km)
        assert (y - ref).abs().max() <= 2e-6
    assert y[0, :3].abs().max() == 0 and not y.isnan().any()  # no bias: a query with no real key outputs 0
    if need_weights:
        assert (w.sum(-1)[0, :, :3] == 0).all() and (w[~km[:, None, None, :].expand_as(w)] == 0).all()


def test_key_mask_gradients_equal_on_all_paths():
    m = make(q_rank=10, dtype=torch.float64)
    x = tokens(B=3, n=8, dtype=torch.float64).requires_grad_()
    km = padding_masks()
    params = [x, *m.parameters()]
    outs = [m(x, need_weights=nw, absorb=ab, key_mask=km).output for nw in (False, True) for ab in (False, True)]
    up = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(y, params, up) for y in outs]
    for y, g in zip(outs[1:], grads[1:], strict=True):
        assert (y - outs[0]).abs().max() <= 1e-12
        assert max((a - b).abs().max().item() for a, b in zip(g, grads[0], strict=True)) <= 1e-12


def test_key_mask_content_at_masked_positions_changes_nothing_real():
    m = make()
    x = tokens(B=3, n=8)
    km = padding_masks()
    x2 = torch.where(km[..., None], x, 50 * torch.randn_like(x))
    with torch.no_grad():
        for absorb in (False, True):
            a, b = m(x, absorb=absorb, key_mask=km).output, m(x2, absorb=absorb, key_mask=km).output
            assert (a - b)[km].abs().max() <= 1e-5


def test_key_mask_matches_transformers_deepseek_v3_with_padding():
    m = make(q_rank=10, dtype=torch.float64)
    ref, rot = hf_copy(m)
    x = tokens(B=3, n=8, dtype=torch.float64)
    km = padding_masks()
    B, n = x.shape[:2]
    cos, sin = rot(x, torch.arange(n)[None].expand(B, n))
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & km[:, None, None, :]
    with torch.no_grad():
        y_ref = ref(x, (cos, sin), torch.zeros(B, 1, n, n, dtype=x.dtype).masked_fill(~allowed, float("-inf")))[0]
        for absorb in (False, True):
            y = m(x, absorb=absorb, key_mask=km).output
            assert (y - y_ref)[km].abs().max() <= 1e-6  # real rows (transformers gives NaN where no key is visible)


@pytest.mark.parametrize("absorb", [False, True])
def test_key_mask_with_cache_equals_full_forward(absorb):
    m = make(q_rank=10)
    x = tokens(B=3, n=8)
    km = padding_masks()
    with torch.no_grad():
        full = m(x, key_mask=km).output
        cache = m.new_cache(3, 8)
        outs = [m(x[:, :2], cache=cache, absorb=absorb, key_mask=km[:, :2]).output,
                m(x[:, 2:5], cache=cache, absorb=absorb, key_mask=km[:, :5]).output]  # a chunk after cached tokens
        outs += [m(x[:, i : i + 1], cache=cache, absorb=absorb, key_mask=km[:, : i + 1]).output for i in range(5, 8)]
    assert (torch.cat(outs, 1) - full).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=3, cached \+ new tokens=9\)"):
        m(x[:, :1], cache=cache_of(m, x), key_mask=km[:, :1])  # the new token's mask alone: it must cover the cache


def cache_of(m, x):
    cache = m.new_cache(x.shape[0], x.shape[1] + 1)
    with torch.no_grad():
        m(x, cache=cache)
    return cache


@pytest.mark.parametrize("absorb", [False, True])
def test_backprop_through_cached_decoding_equals_full_forward(absorb):
    """The original cache wrote in place: autograd failed with 'modified by an inplace operation'."""
    m = make(q_rank=10)
    x = tokens(n=7).requires_grad_()
    cache = m.new_cache(2, 7)
    y = torch.cat([m(x[:, :3], cache=cache, absorb=absorb).output]
                  + [m(x[:, i : i + 1], cache=cache, absorb=absorb).output for i in range(3, 7)], 1)
    up = torch.randn_like(y)
    params = [x, *m.parameters()]
    got = torch.autograd.grad(y, params, up)
    want = torch.autograd.grad(m(x).output, params, up)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("layer_dtype", [torch.bfloat16, torch.float64])
def test_cache_of_another_dtype_is_a_clear_type_error(layer_dtype):
    m = make(dtype=layer_dtype)
    x = tokens(n=3, dtype=layer_dtype)
    with pytest.raises(TypeError, match=rf"cache dtype torch.float32 != layer dtype {layer_dtype}"):
        m(x, cache=LatentCache(2, m.kv_rank, m.rope_dim, 8))
    assert m(x, cache=m.new_cache(2, 8)).output.dtype == layer_dtype
    with pytest.raises(TypeError, match=r"dtypes must match \(the layer.s parameters: torch\.(bfloat16|float64), x: torch\.float32"):
        m(x.float())
    with pytest.raises(TypeError, match=r"LatentCache dtype torch\.float32"):
        LatentCache(1, 4, 2, 8).append(torch.zeros(1, 1, 4, dtype=layer_dtype), torch.zeros(1, 1, 2, dtype=layer_dtype))


def test_bad_input_of_latent_cache_and_key_mask():
    for args, err, match in [
        ((1.0, 4, 2, 8), TypeError, "batch must be an int"),
        ((-1, 4, 2, 8), ValueError, "batch must be >= 0"),
        ((1, 4, 0, 8), ValueError, "rope_dim must be >= 1"),
    ]:
        with pytest.raises(err, match=match):
            LatentCache(*args)
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
        LatentCache(1, 4, 2, 8, dtype="float32")
    cache = LatentCache(1, 4, 2, 8)
    with pytest.raises(TypeError, match=r"c must be a torch.Tensor of shape \(batch, t, d_c\)"):
        cache.append([[[0.0] * 4]], torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match=r"k_rope must have shape \(batch, t, d_R\)"):
        cache.append(torch.zeros(1, 1, 4), torch.zeros(1, 2))
    m = make()
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool"):
        m(tokens(), key_mask=[[True] * 7] * 2)
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=2, seq=7\)"):
        m(tokens(), key_mask=torch.ones(2, 6, dtype=torch.bool))


def test_bad_input_of_the_public_helpers():
    m = make()
    with pytest.raises(TypeError, match=r"positions must be a torch.Tensor of shape \(n,\)"):
        RotaryEmbedding(4).cos_sin([0, 1, 2])
    with pytest.raises(TypeError, match="head_dim must be an int"):
        RotaryEmbedding(4.0)
    cos, sin = rotary_cos_sin(torch.arange(3), 4)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor of shape \(\.\.\., n, dim\)"):
        apply_rotary([[0.0] * 4] * 3, cos, sin)
    with pytest.raises(ValueError, match="same dim"):
        apply_rotary(torch.zeros(3, 6), cos, sin)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor of shape \(batch, seq, embed_dim=32\)"):
        m.latents([[0.0] * E])
    with pytest.raises(ValueError, match="past must be >= 0"):
        m.queries(tokens(), past=-1)
    with pytest.raises(TypeError, match="kv_rank must be an int"):
        latent_cache_bytes_per_token(1, 2.0, 4)


# ----------------------------------------------------------------------------- issue 23: the sequence-mixer protocol


def test_mla_follows_the_sequence_mixer_protocol_and_is_always_causal():
    """Keyword-only options after x; is_causal None/True run, False is refused with a message saying so; the
    rotary key uses the package's one RoPE; the output projection is out_proj, as every attention layer's."""
    from attn.attention import SequenceMixer

    m = make()
    x = tokens()
    assert isinstance(m, SequenceMixer) and type(m.rotary) is RotaryEmbedding and not hasattr(m, "o_proj")
    with pytest.raises(TypeError):
        m(x, True)  # need_weights is keyword-only
    torch.testing.assert_close(m(x, is_causal=True).output, m(x).output)
    with pytest.raises(ValueError, match="always causal"):
        m(x, is_causal=False)
    assert registry.get("mla").causal is True and registry.get("mla").kernel is None


# ------------------------------------------------------------------ issue 17: matched-cache experiment


def test_matched_mixers_cache_the_same_as_gqa_and_half_of_mha():
    from attn.experiments.latent import cache_numbers_per_token, matched_mixers

    mixers = matched_mixers(32, 4, 2, 8)
    numbers = {name: cache_numbers_per_token(f(0), 32) for name, f in mixers.items()}
    mha, gqa, mla = numbers.values()
    assert mha == 2 * 4 * 8 and gqa == 2 * 2 * 8 and mla == gqa
    assert isinstance(list(mixers.values())[2](0), MultiHeadLatentAttention)
    with pytest.raises(ValueError):
        matched_mixers(32, 4, 1, 16)  # d_c = 2 * 1 * 8 - 16 = 0


def test_absorbed_prefill_ratio_at_deepseek_v2_sizes():
    from attn.experiments.latent import absorbed_prefill_ratio

    assert absorbed_prefill_ratio(512, 64, 128, 128) == pytest.approx(3.4)
    # the flops counted on a layer follow the same ratio for the attention part: absorbed is larger
    assert absorbed_prefill_ratio(256, 32, 64, 64) > 1


def test_train_copy_lms_one_value_per_seed_and_censoring():
    from attn.experiments.gated import CopyLMTask
    from attn.experiments.latent import matched_mixers, train_copy_lms

    task = CopyLMTask(vocab=8, segment=4)
    runs = train_copy_lms(task, matched_mixers(16, 2, 1, 4), [0, 1, 2], embed_dim=16, steps=2, log_every=1,
                          target=1.01, held_out=16)
    for name in runs.accuracy:
        assert len(runs.accuracy[name]) == 3 and all(0 <= a <= 1 for a in runs.accuracy[name])
        assert runs.steps_to_target[name] == [None, None, None]  # an unreachable target is censored, not dropped
        assert len(runs.models[name]) == 3 and runs.params[name] > 0
