"""Chapter 4: cross-attention against torch.nn.MultiheadAttention(kdim=, vdim=), properties, the toy task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attn import registry
from attn.cross import CrossAttention, LatentCrossAttention
from attn.experiments.cross import CrossAttentionDecoder, SortUniqueTask, sort_unique_loss
from attn.masks import mha_convention, padding_mask
from attn.train import evaluate, train

E, H, KD, VD = 24, 3, 10, 7


def pair(bias: bool = True):
    ref = nn.MultiheadAttention(E, H, batch_first=True, kdim=KD, vdim=VD, bias=bias)
    return ref, CrossAttention(E, H, kdim=KD, vdim=VD, bias=bias).load_torch_weights(ref)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_torch_forward_and_gradients(need_weights, masked):
    ref, ours = pair()
    q = torch.randn(3, 5, E, requires_grad=True)
    k = torch.randn(3, 9, KD, requires_grad=True)
    v = torch.randn(3, 9, VD, requires_grad=True)
    km = padding_mask([9, 4, 1], 9) if masked else None
    out, w = ours(q, k, v, key_mask=km, need_weights=need_weights)
    r_out, r_w = ref(q, k, v, key_padding_mask=mha_convention(km), need_weights=need_weights, average_attn_weights=False)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(w, r_w, atol=1e-5, rtol=1e-5)
        if masked:
            assert w[1, :, :, 4:].abs().max() == 0 and w[2, :, :, 1:].abs().max() == 0
    up = torch.randn_like(out)
    ours_params = [ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight, ours.out_proj.weight, ours.out_proj.bias]
    ref_params = [ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight, ref.out_proj.weight, ref.out_proj.bias]
    biases = [ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]
    g1 = torch.autograd.grad(out, [q, k, v, *ours_params, *biases], up)
    g2 = torch.autograd.grad(r_out, [q, k, v, *ref_params, ref.in_proj_bias], up)
    g1 = [*g1[:8], torch.cat(g1[8:])]  # torch packs the three input biases into in_proj_bias
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    ca = CrossAttention(4, 2, kdim=3, vdim=5).double()
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    km = padding_mask([4, 2], 4)
    assert torch.autograd.gradcheck(lambda q, k, v: ca(q, k, v, key_mask=km, need_weights=True).output, (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: ca(q, k, v, key_mask=km).output, (q, k, v))


def test_cache_equals_recomputing_and_step_by_step_decoding():
    ca = CrossAttention(E, H, kdim=KD, vdim=VD).double()
    q = torch.randn(2, 6, E, dtype=torch.float64)
    k, v = torch.randn(2, 8, KD, dtype=torch.float64), torch.randn(2, 8, VD, dtype=torch.float64)
    km = padding_mask([8, 5], 8)
    full = ca(q, k, v, key_mask=km, need_weights=True)
    cache = ca.encode_memory(k, v, km)
    cached = ca(q, cache=cache, need_weights=True)
    torch.testing.assert_close(cached.output, full.output)
    torch.testing.assert_close(cached.weights, full.weights)
    steps = torch.cat([ca(q[:, t : t + 1], cache=cache).output for t in range(6)], 1)  # one target position at a time
    torch.testing.assert_close(steps, full.output)


def test_properties_masked_keys_permutation_batched():
    ca = CrossAttention(E, H, kdim=KD, vdim=VD).double()
    q = torch.randn(3, 5, E, dtype=torch.float64)
    k, v = torch.randn(3, 7, KD, dtype=torch.float64), torch.randn(3, 7, VD, dtype=torch.float64)
    km = padding_mask([7, 3, 5], 7)
    out = ca(q, k, v, key_mask=km).output
    # padded source positions have no influence
    k2, v2 = k.clone(), v.clone()
    k2[~km] = 1e3
    v2[~km] = -1e3
    torch.testing.assert_close(ca(q, k2, v2, key_mask=km).output, out)
    # permuting the memory (keys, values and mask together) changes nothing; permuting queries permutes outputs
    p, r = torch.randperm(7), torch.randperm(5)
    torch.testing.assert_close(ca(q, k[:, p], v[:, p], key_mask=km[:, p]).output, out)
    torch.testing.assert_close(ca(q[:, r], k, v, key_mask=km).output, out[:, r])
    # batched equals per example
    per = torch.cat([ca(q[i : i + 1], k[i : i + 1], v[i : i + 1], key_mask=km[i : i + 1]).output for i in range(3)])
    torch.testing.assert_close(per, out)
    # a fully padded source gives zeros after the output projection's bias, never NaN
    none = torch.zeros(3, 7, dtype=torch.bool)
    res = ca(q, k, v, key_mask=none, need_weights=True)
    assert torch.isfinite(res.output).all() and res.weights.abs().max() == 0
    torch.testing.assert_close(res.output, ca.out_proj.bias.expand_as(res.output))


def test_bad_input():
    ca = CrossAttention(8, 2, kdim=6, vdim=5)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="needs a memory"):
        ca(q)
    with pytest.raises(ValueError, match=r"value \(batch, source_len, 5\) is required"):
        ca(q, k)
    with pytest.raises(ValueError, match=r"^key must have shape \(batch, source_len, kdim=6\)"):  # the caller passed memory
        ca(q, torch.randn(2, 4, 7), v)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, target_len, embed_dim=8\)"):
        ca(torch.randn(3, 8), k, v)
    with pytest.raises(ValueError, match="empty"):
        ca(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="batch sizes differ"):
        ca(q[:1], k, v)
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool"):
        ca(q, k, v, key_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=2, source_len=4\)"):
        ca(q, k, v, key_mask=torch.ones(2, 3, dtype=torch.bool))
    cache = ca.encode_memory(k, v)
    with pytest.raises(ValueError, match="either the memory"):
        ca(q, k, v, cache=cache)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, target_len, embed_dim=8\)"):
        ca(torch.randn(2, 3, 7), cache=cache)


def test_latent_build_is_a_token_mixer_with_composed_weights():
    layer = registry.get("latent-cross").build(16, 4)
    assert isinstance(layer, LatentCrossAttention) and registry.get("latent-cross").cls is LatentCrossAttention
    x = torch.randn(2, 6, 16)
    out = layer(x, need_weights=True)
    assert out.output.shape == (2, 6, 16) and out.weights.shape == (2, 1, 6, 6)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2, 1, 6))
    _, w_write, w_read = layer.maps(x)
    assert w_write.shape == (2, 4, 6, 8) and w_read.shape == (2, 4, 8, 6)
    torch.testing.assert_close(layer(x).output, out.output)
    # padded tokens are invisible to the latents, hence to every token
    km = padding_mask([6, 4], 6)
    x2 = x.clone()
    x2[1, 4:] = 100.0
    torch.testing.assert_close(layer(x2, key_mask=km).output[1, :4], layer(x, key_mask=km).output[1, :4])
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, embed_dim=16\)"):
        layer(torch.randn(2, 6, 15))


def test_sort_unique_task_and_alignment_is_learned():
    task = SortUniqueTask(n_values=8, min_len=3, max_len=6)
    b = task.sample(32, torch.Generator().manual_seed(0))
    for i in range(32):
        L = int(b["src_mask"][i].sum()) - 1
        content = b["src"][i, :L]
        want = [*torch.unique(content).tolist(), task.EOS]
        assert b["tgt"][i, : len(want)].tolist() == want and int(b["tgt_mask"][i].sum()) == len(want)
        assert b["src"][i, L] == task.EOS and (b["src"][i, L + 1 :] == task.PAD).all()
        # every real target step has at least one true source position
        assert b["align"][i, : len(want)].any(-1).all() and not b["align"][i, len(want) :].any()
    torch.manual_seed(0)
    model = CrossAttentionDecoder(task.vocab, task.length, embed_dim=32, kdim=24, num_heads=1)
    train(model, task.sample, sort_unique_loss, steps=200, lr=3e-3, progress=False)
    res = evaluate(model, task.sample, sort_unique_loss, batch_size=256)
    assert res["acc"] > 0.9 and res["align_acc"] > 0.8, res


# ----------------------------------------------------------------------------- bad input (issue 15, section 4)


def test_errors_name_what_the_caller_passed():
    ca = CrossAttention(8, 2, kdim=6, vdim=5)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    with pytest.raises(TypeError, match=r"^key must be a torch\.Tensor of shape \(batch, source_len, kdim=6\), got list$"):
        ca.encode_memory(k.tolist(), v)
    with pytest.raises(TypeError, match=r"^key must be a floating-point tensor"):
        ca.encode_memory(k.long(), v)  # once blamed "query", a tensor the caller never passed
    with pytest.raises(TypeError, match=r"^value must be a torch\.Tensor of shape \(batch, source_len, vdim=5\), got list$"):
        ca.encode_memory(k, v.tolist())
    with pytest.raises(TypeError, match=r"^key must be a torch\.Tensor"):
        ca(q, k.tolist(), v)
    with pytest.raises(ValueError, match=r"^value must have shape \(batch, source_len, vdim=5\), got \(2, 4, 4\)"):
        ca(q, k, torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"^value must share \(batch, source_len\) with key"):
        ca(q, k, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"^key is an empty sequence: shape \(batch, source_len, kdim=6\) needs source_len >= 1"):
        ca(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match=r"^batch sizes differ: query=1, key=2$"):
        ca(q[:1], k, v)
    with pytest.raises(TypeError, match=r"^query must be a torch\.Tensor of shape \(batch, target_len, embed_dim=8\), got list$"):
        ca(q.tolist(), cache=ca.encode_memory(k, v))
    with pytest.raises(TypeError, match=r"^cache must be a MemoryCache from encode_memory, got tuple$"):
        ca(q, cache=(k, v, None))


def test_mixed_dtypes_are_refused():
    ca = CrossAttention(8, 2, kdim=6, vdim=5)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    with pytest.raises(TypeError, match=r"^dtypes must match \(key: torch\.float64, value: torch\.float32\)"):
        ca(q, k.double(), v)
    with pytest.raises(TypeError, match=r"^dtypes must match \(query: torch\.float32, key: torch\.float64, value: torch\.float64\)"):
        ca(q, k.double(), v.double())
    with pytest.raises(TypeError, match=r"^dtypes must match \(query: torch\.float32, key: torch\.float64\)"):
        CrossAttention(8, 2, kdim=6)(q, k.double())
    with pytest.raises(TypeError, match=r"^dtypes must match \(key: torch\.float32, value: torch\.float64\)"):
        ca.encode_memory(k, v.double())
    cache = ca.encode_memory(k, v)
    with pytest.raises(TypeError, match=r"^dtypes must match \(query: torch\.float64, cache: torch\.float32\)"):
        ca(q.double(), cache=cache)


def test_temperature_and_sizes():
    ca = CrossAttention(8, 2, kdim=6)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 4, 6)
    cache = ca.encode_memory(k)
    for kw in ({"key": k}, {"cache": cache}):
        with pytest.raises(ValueError, match=r"^temperature must be >= 1e-30 \(smaller values overflow"):
            ca(q, temperature=1e-40, **kw)  # once NaN, silently
        with pytest.raises(ValueError, match=r"^temperature must be > 0, got 0\.0$"):
            ca(q, temperature=0, **kw)
        assert torch.isfinite(ca(q, temperature=1e-3, **kw).output).all()
    with pytest.raises(ValueError, match=r"^kdim must be >= 1, got 0$"):
        CrossAttention(8, 2, kdim=0)  # once taken as "no kdim"
    with pytest.raises(TypeError, match=r"^num_latents must be an int, got float$"):
        LatentCrossAttention(8, 2, num_latents=2.5)


def test_latent_cross_attention_names_key_mask():
    layer = LatentCrossAttention(8, 2, num_latents=4)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"^key_mask must have shape \(batch=2, n=3\), got \(2, 4\)$"):
        layer(x, key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^key_mask must be a torch\.bool tensor"):
        layer(x, key_mask=torch.ones(2, 3))


# ----------------------------------------------------------------------------- one interface (issue 23)


def test_cross_attention_is_multihead_attention_with_memory_widths():
    """CrossAttention is MultiHeadAttention (kdim, vdim = kdim by default): one state dict, one forward signature."""
    from attn.attention import Attention
    from attn.multihead import MultiHeadAttention

    torch.manual_seed(0)
    ca = CrossAttention(8, 2, kdim=6).double()
    assert isinstance(ca, Attention) and ca.vdim == 6 and ca.kernel == "sdpa"
    mha = MultiHeadAttention(8, 2, kdim=6, vdim=6).double()
    mha.load_state_dict(ca.state_dict())
    q, k = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    km = padding_mask([5, 2], 5)
    torch.testing.assert_close(ca(q, k, key_mask=km).output, mha(q, k, k, key_mask=km).output)
    assert registry.get("latent-cross").kernel is None and registry.get("latent-cross").causal is False
    with pytest.raises(ValueError, match="cannot be causal"):
        registry.get("latent-cross").build(8, 2)(torch.randn(1, 4, 8), is_causal=True)


def test_position_keys_control_cannot_see_source_content():
    """keys="position": the cross weights depend on positions and the target prefix only; content keys do not."""
    task = SortUniqueTask(n_values=8, min_len=5, max_len=5)
    torch.manual_seed(0)
    control = CrossAttentionDecoder(task.vocab, task.length, embed_dim=16, kdim=8, num_heads=1, keys="position")
    content = CrossAttentionDecoder(task.vocab, task.length, embed_dim=16, kdim=8, num_heads=1)
    batch = task.sample(2, torch.Generator().manual_seed(1))
    other = batch["src"].clone()
    other[:, :5] = torch.randint(3, 3 + 8, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        w1 = control(batch["src"], batch["tgt_in"], batch["src_mask"])[1]
        w2 = control(other, batch["tgt_in"], batch["src_mask"])[1]
        c1 = content(batch["src"], batch["tgt_in"], batch["src_mask"])[1]
        c2 = content(other, batch["tgt_in"], batch["src_mask"])[1]
    torch.testing.assert_close(w1, w2)
    assert (c1 - c2).abs().max() > 1e-3
    with pytest.raises(ValueError, match="keys must be one of"):
        CrossAttentionDecoder(task.vocab, task.length, keys="both")  # type: ignore[arg-type]


def test_key_control_runner_one_value_per_seed_and_arm():
    from attn.experiments.cross import KEY_SOURCES, run_key_control

    out = run_key_control([0, 1], steps=3, batch_size=8, task=SortUniqueTask(n_values=6, min_len=3, max_len=5))
    assert set(out) == {"acc", "seq_acc", "align_acc"}
    for metric in out.values():
        assert set(metric) == set(KEY_SOURCES) and all(len(v) == 2 for v in metric.values())
    with pytest.raises(ValueError, match="at least one seed"):
        run_key_control([])
