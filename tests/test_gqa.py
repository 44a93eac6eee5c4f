"""Chapter 27: grouped-query attention (MHA/GQA/MQA in one module) and the KV cache, against their references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.attention import Attention, get_kernel
from attn.benchmark import largest_tensor
from attn.experiments.gqa import DecoderLM, generate
from attn.gqa import (
    GroupedQueryAttention,
    KVCache,
    grouped_attention,
    grouped_kernel,
    kv_cache_bytes_per_token,
    mha_to_gqa,
)
from attn.multihead import MultiHeadAttention
from attn.train import cpu_threads


def llama_state(llama: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Llama's attention state dict under our names (its ``o_proj`` is every Attention's ``out_proj``)."""
    return {k.replace("o_proj", "out_proj"): v for k, v in llama.state_dict().items()}


def sdpa_reference(m: GroupedQueryAttention, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The module's projections, then F.scaled_dot_product_attention(enable_gqa=True), then W^O."""
    B, n, _ = x.shape
    q = m.q_proj(x).view(B, n, m.num_heads, m.head_dim).transpose(1, 2)
    k = m.k_proj(x).view(B, n, m.num_kv_heads, m.head_dim).transpose(1, 2)
    v = m.v_proj(x).view(B, n, m.num_kv_heads, m.head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return m.out_proj(out.transpose(1, 2).reshape(B, n, -1))


def explicit_weights(m: GroupedQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """Weights written with an explicit loop over query heads, key head = i // r, causal."""
    B, n, _ = x.shape
    r = m.num_heads // m.num_kv_heads
    d = m.head_dim
    q = m.q_proj(x).view(B, n, m.num_heads, d)
    k = m.k_proj(x).view(B, n, m.num_kv_heads, d)
    rows = []
    for i in range(m.num_heads):
        s = torch.einsum("bqd,bkd->bqk", q[:, :, i], k[:, :, i // r]) / d**0.5
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        rows.append(s.softmax(-1))
    return torch.stack(rows, 1)


@pytest.mark.parametrize("h, g", [(8, 8), (8, 4), (8, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_sdpa_enable_gqa_forward_and_gradients(h, g, causal):
    torch.manual_seed(h * 10 + g)
    m = GroupedQueryAttention(24, h, g, causal=causal, bias=True)
    x = torch.randn(3, 11, 24, requires_grad=True)
    out = m(x).output
    ref = sdpa_reference(m, x, causal)
    assert (out - ref).abs().max() <= 1e-5
    up = torch.randn_like(out)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up), strict=True):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("g", [4, 2, 1])
def test_weights_match_explicit_per_head_formula(g):
    m = GroupedQueryAttention(16, 4, g)
    x = torch.randn(2, 9, 16)
    out, w = m(x, need_weights=True)
    torch.testing.assert_close(w, explicit_weights(m, x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, m(x).output, atol=1e-6, rtol=1e-5)  # fused path == explicit path


@pytest.mark.parametrize("h, g", [(4, 4), (4, 2), (4, 1)])
def test_matches_transformers_llama_attention(h, g):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    E, n = 32, 10
    cfg = LlamaConfig(hidden_size=E, num_attention_heads=h, num_key_value_heads=g, attention_bias=False)
    cfg._attn_implementation = "eager"
    llama = LlamaAttention(cfg, layer_idx=0).eval()  # random weights, no download
    ours = GroupedQueryAttention(E, h, g)
    ours.load_state_dict(llama_state(llama))  # q_proj, k_proj, v_proj; Llama's o_proj is our out_proj
    x = torch.randn(2, n, E, requires_grad=True)
    d = E // h
    identity = (torch.ones(2, n, d), torch.zeros(2, n, d))  # cos = 1, sin = 0: no rotation (positions: chapter 28)
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    ref, ref_w = llama(x, position_embeddings=identity, attention_mask=causal)
    out, w = ours(x, need_weights=True)
    assert (out - ref).abs().max() <= 1e-5
    assert (w - ref_w).abs().max() <= 1e-6
    up = torch.randn_like(out)
    g1 = torch.autograd.grad(out, [x, *ours.parameters()], up)
    g2 = torch.autograd.grad(ref, [x, *llama.parameters()], up)
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_gradcheck_float64():
    m = GroupedQueryAttention(8, 4, 2).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t, need_weights=True).output, (x,))
    assert torch.autograd.gradcheck(lambda t: m(t).output, (x,))


def test_grouped_attention_never_repeats_keys():
    """g = 1 with r query heads equals r separate single-head attentions over the one key head."""
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8)
    out = grouped_attention(q, k, v).output
    for i in range(4):
        ref = F.scaled_dot_product_attention(q[:, i], k[:, 0], v[:, 0], is_causal=True)
        assert (out[:, i] - ref).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        grouped_attention(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("g", [4, 2, 1])
def test_cached_decoding_equals_full_recomputation_at_every_step(g):
    m = GroupedQueryAttention(16, 4, g)
    x = torch.randn(2, 12, 16)
    full, full_w = m(x, need_weights=True)
    cache = m.new_cache(2, 12)
    prefill = m(x[:, :5], cache=cache).output  # 5 tokens at once, then one at a time
    steps = [prefill]
    for t in range(5, 12):
        out, w = m(x[:, t : t + 1], need_weights=True, cache=cache)
        steps.append(out)
        assert w.shape == (2, 4, 1, t + 1)
        torch.testing.assert_close(w[:, :, 0], full_w[:, :, t, : t + 1], atol=1e-6, rtol=1e-5)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
    assert cache.length == 12
    assert cache.nbytes == 2 * 2 * g * 12 * 4 * 4  # K and V, batch 2, g heads, 12 tokens, d = 4, fp32


def test_cache_chunked_prefill_uses_bottom_right_causal_mask():
    m = GroupedQueryAttention(16, 4, 2)
    x = torch.randn(1, 9, 16)
    cache = m.new_cache(1, 9)
    parts = [m(x[:, a:b], cache=cache).output for a, b in ((0, 4), (4, 7), (7, 9))]
    torch.testing.assert_close(torch.cat(parts, 1), m(x).output, atol=1e-5, rtol=1e-5)


def test_cache_errors():
    m = GroupedQueryAttention(16, 4, 2)
    cache = m.new_cache(1, 3)
    m(torch.randn(1, 3, 16), cache=cache)
    with pytest.raises(ValueError, match="full"):
        m(torch.randn(1, 1, 16), cache=cache)
    with pytest.raises(ValueError, match="batch 2"):
        m(torch.randn(2, 1, 16), cache=m.new_cache(1, 4))
    with pytest.raises(TypeError, match="KVCache"):
        m(torch.randn(1, 1, 16), cache=(torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="num_kv_heads"):
        KVCache(1, 0, 4, 8)


def test_generation_with_cache_equals_recomputation():
    torch.manual_seed(1)
    lm = DecoderLM(vocab=20, embed_dim=32, num_heads=4, num_kv_heads=2, num_layers=2, max_len=64).eval()
    prompt = torch.randint(0, 20, (2, 5))
    with cpu_threads(1):
        a, b = generate(lm, prompt, 12, use_cache=True), generate(lm, prompt, 12, use_cache=False)
        assert a.shape == (2, 17) and torch.equal(a, b)
        caches = lm.new_caches(2, 17)
        with torch.no_grad():
            step_logits = [lm(a[:, :5], caches=caches).logits]
            step_logits += [lm(a[:, t : t + 1], caches=caches).logits for t in range(5, 17)]
            torch.testing.assert_close(torch.cat(step_logits, 1), lm(a).logits, atol=1e-5, rtol=1e-5)
    assert caches[0].nbytes == kv_cache_bytes_per_token(1, 2, 8, 4) * 17 * 2


def test_cache_bytes_per_token_formula():
    assert kv_cache_bytes_per_token(80, 8, 128, 2) == 327_680  # a 70B-class GQA config in fp16: 320 KiB per token
    assert kv_cache_bytes_per_token(80, 64, 128, 2) == 8 * kv_cache_bytes_per_token(80, 8, 128, 2)


# ----------------------------------------------------------------------------- MHA -> GQA conversion


def test_mean_pool_conversion():
    mha = GroupedQueryAttention(16, 4, 4, bias=True)
    gqa = mha_to_gqa(mha, 2, "mean")
    assert gqa.num_kv_heads == 2 and gqa.k_proj.weight.shape == (8, 16)
    wk = mha.k_proj.weight.view(4, 4, 16)
    torch.testing.assert_close(gqa.k_proj.weight.view(2, 4, 16), (wk[0::2] + wk[1::2]) / 2)  # heads (0,1), (2,3)
    torch.testing.assert_close(gqa.v_proj.bias.view(2, 4), mha.v_proj.bias.view(4, 4).view(2, 2, 4).mean(1))
    torch.testing.assert_close(gqa.q_proj.weight, mha.q_proj.weight)
    first = mha_to_gqa(mha, 1, "first")
    torch.testing.assert_close(first.v_proj.weight, mha.v_proj.weight[:4])
    # when the heads of a group are already equal, conversion changes nothing
    same = copy.deepcopy(mha)
    with torch.no_grad():
        same.k_proj.weight.view(4, 4, 16)[1::2] = same.k_proj.weight.view(4, 4, 16)[0::2]
        same.v_proj.weight.view(4, 4, 16)[1::2] = same.v_proj.weight.view(4, 4, 16)[0::2]
        same.k_proj.bias.view(4, 4)[1::2] = same.k_proj.bias.view(4, 4)[0::2]
        same.v_proj.bias.view(4, 4)[1::2] = same.v_proj.bias.view(4, 4)[0::2]
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(mha_to_gqa(same, 2)(x).output, same(x).output, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="divide"):
        mha_to_gqa(mha, 3)
    with pytest.raises(ValueError, match="method"):
        mha_to_gqa(mha, 2, "max")


# ----------------------------------------------------------------------------- properties, bad input, registry


def test_causal_outputs_ignore_the_future_and_batched_equals_single():
    m = GroupedQueryAttention(16, 4, 2)
    x = torch.randn(3, 8, 16)
    y = m(x).output
    x2 = x.clone()
    x2[:, 5:] = torch.randn(3, 3, 16)
    torch.testing.assert_close(m(x2).output[:, :5], y[:, :5])
    for b in range(3):
        torch.testing.assert_close(m(x[b : b + 1]).output, y[b : b + 1], atol=1e-6, rtol=1e-5)


def test_empty_batch():
    m = GroupedQueryAttention(16, 4, 2)
    out, w = m(torch.randn(0, 5, 16), need_weights=True)
    assert out.shape == (0, 5, 16) and w.shape == (0, 4, 5, 5)
    assert m(torch.randn(0, 5, 16)).weights is None


@pytest.mark.parametrize(
    "bad, err, match",
    [
        ([[1.0] * 16], TypeError, r"\(batch, seq, embed_dim=16\)"),
        (torch.ones(2, 5, 16, dtype=torch.long), TypeError, "floating-point"),
        (torch.randn(5, 16), ValueError, r"\(batch, seq, embed_dim=16\)"),
        (torch.randn(2, 5, 12), ValueError, "last dimension 12 != 16"),
        (torch.randn(2, 0, 16), ValueError, "empty sequence"),
    ],
)
def test_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        GroupedQueryAttention(16, 4, 2)(bad)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"num_heads": 4, "num_kv_heads": 3}, ValueError, "must divide"),
        ({"num_heads": 4, "num_kv_heads": 0}, ValueError, "positive"),
        ({"num_heads": 4, "num_kv_heads": 2.0}, TypeError, "int"),
        ({"num_heads": 3, "num_kv_heads": 1}, ValueError, "divisible"),
    ],
)
def test_bad_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        GroupedQueryAttention(16, **kwargs)


def test_registry_build():
    mech = registry.get("gqa")
    assert mech.chapter == 27 and registry.chapter(27).slug == "gqa_kv_cache"
    layer = mech.build(32, 4)
    assert isinstance(layer, GroupedQueryAttention) and layer.num_kv_heads == 2
    out = layer(torch.randn(2, 7, 32), need_weights=True)
    assert out.output.shape == (2, 7, 32) and out.weights.shape == (2, 4, 7, 7)
    assert mech.build(32, 1).num_kv_heads == 1


# ----------------------------------------------------------------------------- issue 15: linear memory, key mask,
# backprop through the cache, wide values, dtypes and bad input


def dense_reference(q, k, v, past=0, causal=True, key_mask=None):
    """Keys repeated to h heads, every score formed, masked softmax; a row with no visible key -> zeros."""
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    t, m = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    allowed = torch.ones(q.shape[0], 1, t, m, dtype=torch.bool)
    if causal:
        allowed = allowed & (torch.arange(m)[None, :] <= torch.arange(past, past + t)[:, None])
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    a = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return a @ v, a



@pytest.mark.parametrize("masked", [False, True])
def test_no_weights_path_never_forms_an_n_by_n_tensor(masked, monkeypatch):
    import attn.gqa as gqa_module

    n = 96
    monkeypatch.setattr(gqa_module, "_BLOCK_ELEMENTS", 8 * n)  # blocks of 8 queries at this small n
    m = GroupedQueryAttention(16, 4, 2)
    x = torch.randn(1, n, 16)
    km = torch.rand(1, n) > 0.3 if masked else None
    assert largest_tensor(lambda: m(x, key_mask=km)) < n * n  # the largest is a (n, 16) projection
    assert largest_tensor(lambda: m(x, key_mask=km, need_weights=True)) >= n * n  # the weights path forms them


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("g", [4, 2, 1])
def test_key_mask_equals_masked_dense_reference(causal, g, monkeypatch):
    import attn.gqa as gqa_module

    torch.manual_seed(g)
    B, h, t, d = 3, 4, 10, 5
    q, k, v = torch.randn(B, h, t, d), torch.randn(B, g, t, d), torch.randn(B, g, t, 7)
    km = torch.ones(B, t, dtype=torch.bool)
    km[0, :4] = False  # left padding: with causality the first 4 queries see no real key -> zeros
    km[1, 6:] = False  # right padding
    km[2, ::3] = False  # holes
    ref, ref_w = dense_reference(q, k, v, 0, causal, km)
    for block in (2**20, 3 * t):  # one block, and blocks of 3 queries
        monkeypatch.setattr(gqa_module, "_BLOCK_ELEMENTS", block)
        out = grouped_attention(q, k, v, causal=causal, key_mask=km).output
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out_w, w = grouped_attention(q, k, v, causal=causal, key_mask=km, need_weights=True)
    torch.testing.assert_close(out_w, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)
    if causal:
        assert out[0, :, :4].abs().max() == 0 and not out.isnan().any()


@pytest.mark.parametrize("need_weights", [False, True])
def test_key_mask_content_at_masked_positions_changes_nothing_real(need_weights):
    m = GroupedQueryAttention(16, 4, 2, bias=True)
    x = torch.randn(2, 9, 16)
    km = torch.tensor([[False, False, True, True, True, True, True, True, True],
                       [True, True, False, True, True, True, False, False, True]])
    x2 = torch.where(km[..., None], x, 100 * torch.randn_like(x))
    a, b = m(x, need_weights=need_weights, key_mask=km).output, m(x2, need_weights=need_weights, key_mask=km).output
    assert (a - b)[km].abs().max() <= 1e-5
    assert (a - b)[~km].abs().max() > 1e-3  # the padded positions' own outputs do change (their queries did)


def test_key_mask_with_cache_equals_full_forward():
    """Left-padded prompts, then cached decoding: each step passes the mask of everything so far."""
    m = GroupedQueryAttention(16, 4, 2)
    x = torch.randn(2, 10, 16)
    km = torch.ones(2, 10, dtype=torch.bool)
    km[0, :3] = False
    km[1, 7] = False
    with torch.no_grad():
        full = m(x, key_mask=km).output
        cache = m.new_cache(2, 10)
        steps = [m(x[:, :2], cache=cache, key_mask=km[:, :2]).output, m(x[:, 2:5], cache=cache, key_mask=km[:, :5]).output]
        steps += [m(x[:, i : i + 1], cache=cache, key_mask=km[:, : i + 1]).output for i in range(5, 10)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
    cache = m.new_cache(2, 12)
    m(x, cache=cache)
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=2, cached \+ new tokens=11\)"):
        m(x[:, :1], cache=cache, key_mask=km[:, :1])  # the mask of the new token only: it must cover the cache too


def test_key_mask_matches_transformers_llama_with_padding():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    E, h, g, n = 32, 4, 2, 8
    cfg = LlamaConfig(hidden_size=E, num_attention_heads=h, num_key_value_heads=g, attention_bias=False)
    cfg._attn_implementation = "eager"
    llama = LlamaAttention(cfg, layer_idx=0).eval()
    ours = GroupedQueryAttention(E, h, g)
    ours.load_state_dict(llama_state(llama))
    x = torch.randn(2, n, E)
    km = torch.ones(2, n, dtype=torch.bool)
    km[0, :2] = False
    km[1, 5] = False
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & km[:, None, None, :]
    d = E // h
    with torch.no_grad():
        ref = llama(x, position_embeddings=(torch.ones(2, n, d), torch.zeros(2, n, d)),
                    attention_mask=torch.zeros(2, 1, n, n).masked_fill(~allowed, float("-inf")))[0]
        for need_weights in (False, True):
            out = ours(x, need_weights=need_weights, key_mask=km).output
            assert (out - ref)[km].abs().max() <= 1e-5  # real rows (Llama gives NaN on rows with no visible key)


def test_backprop_through_cached_decoding_equals_full_forward():
    """Training through the KV cache: the original wrote in place and autograd failed."""
    torch.manual_seed(0)
    m = GroupedQueryAttention(16, 4, 2)
    x = torch.randn(2, 7, 16, requires_grad=True)
    cache = m.new_cache(2, 7)
    y = torch.cat([m(x[:, :3], cache=cache).output] + [m(x[:, i : i + 1], cache=cache).output for i in range(3, 7)], 1)
    up = torch.randn_like(y)
    params = [x, *m.parameters()]
    got = torch.autograd.grad(y, params, up)
    want = torch.autograd.grad(m(x).output, params, up)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 1e-5
    with torch.no_grad():  # inference still writes in place: the stored tensor is the same object
        c = m.new_cache(2, 7)
        before = c.k
        m(x[:, :2], cache=c)
        assert c.k is before


@pytest.mark.parametrize("g", [4, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_values_wider_than_queries_and_keys(g, causal):
    torch.manual_seed(g)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, g, 6, 8), torch.randn(2, g, 6, 13)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    for need_weights in (False, True):
        out = grouped_attention(q, k, v, causal=causal, need_weights=need_weights).output
        assert out.shape == (2, 4, 6, 13) and (out - ref).abs().max() <= 1e-5
    narrow = torch.randn(2, g, 6, 3)  # and narrower
    ref = F.scaled_dot_product_attention(q, k, narrow, is_causal=causal, enable_gqa=True)
    assert (grouped_attention(q, k, narrow, causal=causal).output - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("layer_dtype", [torch.bfloat16, torch.float64])
def test_cache_of_another_dtype_is_a_clear_type_error(layer_dtype):
    m = GroupedQueryAttention(16, 4, 2).to(layer_dtype)
    x = torch.randn(1, 3, 16, dtype=layer_dtype)
    with pytest.raises(TypeError, match=rf"cache dtype torch.float32 != layer dtype {layer_dtype}"):
        m(x, cache=KVCache(1, 2, 4, 8))
    assert m(x, cache=m.new_cache(1, 8)).output.dtype == layer_dtype  # new_cache takes the layer's dtype
    with pytest.raises(TypeError, match=r"dtypes must match \(the layer.s parameters: torch\.(bfloat16|float64), query: torch\.float32"):
        m(x.float())
    with pytest.raises(TypeError, match=r"KVCache dtype torch\.float32"):
        KVCache(1, 2, 4, 8).append(torch.zeros(1, 2, 1, 4, dtype=layer_dtype), torch.zeros(1, 2, 1, 4, dtype=layer_dtype))


def test_bad_input_of_cache_attention_and_lm():
    m = GroupedQueryAttention(16, 4, 2)
    for args, err, match in [
        ((1.5, 2, 4, 8), TypeError, "batch must be an int"),
        ((-1, 2, 4, 8), ValueError, "batch must be >= 0"),
        ((1, 2, 4, 0), ValueError, "max_len must be >= 1"),
    ]:
        with pytest.raises(err, match=match):
            KVCache(*args)
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
        KVCache(1, 2, 4, 8, dtype=torch.long)
    cache = KVCache(1, 2, 4, 8)
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor of shape \(batch, num_kv_heads, t, head_dim\)"):
        cache.append([[0.0]], torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match=r"k must have shape \(batch, num_kv_heads, t, head_dim\), got 3-D"):
        cache.append(torch.zeros(2, 1, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="cache expects keys and values of shape"):
        cache.append(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 2, 4))
    q, k = torch.randn(1, 4, 3, 4), torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor of shape \(batch, heads, seq, head_dim\)"):
        grouped_attention(q.tolist(), k, k)
    with pytest.raises(TypeError, match="dtypes must match"):
        grouped_attention(q, k, k.double())
    with pytest.raises(ValueError, match=r"k \(B, g, m, d\)"):
        grouped_attention(q, torch.randn(1, 2, 3, 5), k)
    with pytest.raises(ValueError, match="past \\+ t == m"):
        grouped_attention(q, k, k, past=2)
    with pytest.raises(ValueError, match="past must be >= 0"):
        grouped_attention(q, k, k, past=-1, causal=False)
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool"):
        m(torch.randn(1, 3, 16), key_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=1, seq=3\)"):
        m(torch.randn(1, 3, 16), key_mask=torch.ones(1, 4, dtype=torch.bool))
    lm = DecoderLM(vocab=10, embed_dim=16, num_heads=4, num_kv_heads=2, num_layers=2, max_len=8)
    with pytest.raises(ValueError, match="one KVCache per layer: 2 layers, got 1"):
        lm(torch.zeros(1, 2, dtype=torch.long), caches=lm.new_caches(1)[:1])
    with pytest.raises(TypeError, match="caches must be a list of KVCache"):
        lm(torch.zeros(1, 2, dtype=torch.long), caches=[object(), object()])
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, 10\)"):
        lm(torch.full((1, 2), 10))
    with pytest.raises(TypeError, match="tokens must hold integer token ids"):
        lm(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="steps must be >= 0"):
        generate(lm, torch.zeros(1, 2, dtype=torch.long), -1)


def test_bytes_per_token_rejects_non_integers():
    with pytest.raises(TypeError, match="num_kv_heads must be an int"):
        kv_cache_bytes_per_token(2, 1.5, 64)
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        kv_cache_bytes_per_token(2, 2, 0)


# ----------------------------------------------------------------------------- issue 23: one attention interface


def test_gqa_is_attention_with_the_grouped_kernel_and_mha_state_dicts():
    """GroupedQueryAttention is Attention(kernel="grouped"): its parameters are MultiHeadAttention's
    (q_proj, k_proj, v_proj, out_proj), so a MultiHeadAttention's state dict loads into it (num_kv_heads = h)
    and both give the same output."""
    spec = get_kernel("grouped")
    assert spec.fn is grouped_kernel and spec.grouped
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, bias=False).double().eval()
    gqa = GroupedQueryAttention(16, 4, 4, causal=False).double().eval()
    assert isinstance(gqa, Attention) and gqa.kernel == "grouped"
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    km = torch.ones(2, 7, dtype=torch.bool)
    km[1, -2:] = False
    for need_weights in (False, True):
        a, wa = gqa(x, key_mask=km, need_weights=need_weights)
        b, wb = mha(x, key_mask=km, need_weights=need_weights)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        if need_weights:
            torch.testing.assert_close(wa, wb, atol=1e-12, rtol=1e-12)
    # mha_to_gqa converts any Attention (here a MultiHeadAttention) on the new names
    half = mha_to_gqa(mha, 2)
    assert isinstance(half, GroupedQueryAttention) and half.num_kv_heads == 2 and not half.causal
    torch.testing.assert_close(half.out_proj.weight, mha.out_proj.weight)


@pytest.mark.parametrize("g", [4, 2, 1])
def test_grouped_kernel_with_a_general_mask_equals_repeated_keys(g):
    """An attn_mask (here the causal mask of 3 new tokens after 5 cached ones, and top-left causal with L != S)
    folds the query heads of a group into rows; the result equals the sdpa kernel on repeated keys."""
    torch.manual_seed(g)
    q, k, v = torch.randn(2, 4, 3, 6, dtype=torch.float64), torch.randn(2, g, 8, 6, dtype=torch.float64), \
        torch.randn(2, g, 8, 5, dtype=torch.float64)
    km = torch.ones(2, 8, dtype=torch.bool)
    km[0, 1] = False
    mask = torch.arange(8)[None, :] <= torch.arange(5, 8)[:, None]  # (3, 8) bottom-right causal
    kr, vr = k.repeat_interleave(4 // g, 1), v.repeat_interleave(4 // g, 1)
    sdpa = get_kernel("sdpa").fn
    for kw in ({"attn_mask": mask, "is_causal": False}, {"attn_mask": None, "is_causal": True}):
        for need_weights in (False, True):
            got = grouped_kernel(q, k, v, key_mask=km, scale=0.3, need_weights=need_weights, **kw)
            want = sdpa(q, kr, vr, key_mask=km, scale=0.3, need_weights=need_weights, **kw)
            torch.testing.assert_close(got.output, want.output, atol=1e-12, rtol=1e-12)
            if need_weights:
                torch.testing.assert_close(got.weights, want.weights, atol=1e-12, rtol=1e-12)


def test_forward_options_are_keyword_only():
    m = GroupedQueryAttention(16, 4, 2)
    with pytest.raises(TypeError):
        m(torch.randn(1, 3, 16), torch.randn(1, 3, 16), torch.randn(1, 3, 16), True)  # need_weights is keyword-only
    assert m(torch.randn(1, 3, 16), is_causal=False, need_weights=True).weights.shape == (1, 4, 3, 3)


# ------------------------------------------------------------------ issue 17: decoding fold, experiments


@pytest.mark.parametrize("g", [4, 2, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_one_token_decode_folds_query_heads_and_equals_repeated_keys(g, masked):
    """t = 1 with g < h folds the query heads into rows: same output as SDPA on keys repeated per query head,
    a row that sees no real key gives zeros, and enable_gqa is not used (the keys are never expanded)."""
    from attn.gqa import fused_attention

    torch.manual_seed(0)
    B, h, m, d = 3, 8, 11, 5
    q, k, v = torch.randn(B, h, 1, d), torch.randn(B, g, m, d), torch.randn(B, g, m, d)
    km = torch.rand(B, m) > 0.3 if masked else None
    if km is not None:
        km[2] = False  # no real key: zeros
    r = h // g
    kr, vr = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    mask = None if km is None else km[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    if km is not None:
        ref[2] = 0
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(kw.get("enable_gqa", False))
        return real(*a, **kw)

    import attn.gqa as gqa_mod

    orig = gqa_mod.F.scaled_dot_product_attention
    gqa_mod.F.scaled_dot_product_attention = spy
    try:
        out = fused_attention(q, k, v, past=m - 1, causal=True, key_mask=km)
    finally:
        gqa_mod.F.scaled_dot_product_attention = orig
    assert out.shape == (B, h, 1, d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert calls and not any(calls)


def test_head_similarity_sees_through_a_change_of_key_basis():
    """Head 1 = head 0 in another basis (W^Q -> A W^Q, W^K -> A^-T W^K): identical scores and bilinear form,
    different W^K. A measure of W^K alone cannot tell that the two heads are one."""
    from attn.experiments.gqa import head_similarity, off_diagonal_mean
    from attn.models import RecallModel
    from attn.tasks import AssociativeRecall

    torch.manual_seed(0)
    task = AssociativeRecall(n_pairs=4, n_keys=8, n_values=8)
    model = RecallModel(task, 16, attention=GroupedQueryAttention(16, 4, 4))
    a = torch.randn(4, 4) + 3 * torch.eye(4)
    with torch.no_grad():
        wq, wk = model.attention.q_proj.weight.view(4, 4, 16), model.attention.k_proj.weight.view(4, 4, 16)
        wq[1] = a @ wq[0]
        wk[1] = torch.linalg.inv(a).T @ wk[0]
    x = task.sample(64, torch.Generator().manual_seed(1))["x"]
    sim = head_similarity(model, x)
    for key in ("scores", "W^Q W^K", "W^K"):
        assert sim[key].shape == (4, 4)
        torch.testing.assert_close(sim[key].diagonal(), torch.ones(4))
    assert sim["scores"][0, 1] > 0.9999 and sim["W^Q W^K"][0, 1] > 0.9999
    assert sim["W^K"][0, 1] < 0.95
    assert -1 <= off_diagonal_mean(sim["W^K"]) <= 1
    with pytest.raises(ValueError, match="g = h"):
        head_similarity(RecallModel(task, 16, attention=GroupedQueryAttention(16, 4, 2)), x)


def test_recall_experiment_returns_one_value_per_seed_per_arm():
    from attn.experiments.gqa import recall_experiment
    from attn.tasks import AssociativeRecall

    task = AssociativeRecall(n_pairs=4, n_keys=8, n_values=8)
    runs = recall_experiment(task, [0, 1, 2], width=16, heads=4, scratch_kv_heads=(4, 1), convert_kv_heads=(2,),
                             steps=3, uptrain_checkpoints=(2, 4))
    assert set(runs.scratch) == {4, 1} and set(runs.converted) == {(2, "first"), (2, "mean")}
    assert set(runs.uptrained) == {(2, 2), (2, 4)} and len(runs.mha) == 3
    for vals in [*runs.scratch.values(), *runs.converted.values(), *runs.uptrained.values()]:
        assert len(vals) == 3 and all(0 <= v <= 1 for v in vals)
    with pytest.raises(ValueError, match="must include"):
        recall_experiment(task, [0], width=16, heads=4, scratch_kv_heads=(2, 1))


def test_decode_step_and_bytes_read():
    from attn.experiments.gqa import decode_bytes_read, decode_step

    assert decode_bytes_read(1000, 2, 64) == 2 * 1000 * 2 * 64 * 4
    assert decode_bytes_read(10, 1, 8, bytes_per_number=2, num_layers=3, batch=2) == 2 * 3 * 2 * 10 * 8 * 2
    layer = GroupedQueryAttention(32, 8, 2).eval()
    step = decode_step(layer, 20)
    a, b = step(), step()
    assert a.shape == (1, 1, 32)
    torch.testing.assert_close(a, b)  # the cache is reset to the same length at every call
