"""Chapter 13: adaptive attention (adaptive span, visual sentinel) against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from attn import registry
from attn.adaptive import (
    AdaptiveSpanAttention,
    SentinelAttention,
    SentinelGate,
    adaptive_span_attention,
    adaptive_span_reference,
    span_mask,
    span_window,
)
from attn.benchmark import count_flops
from attn.experiments import own_task, own_tasks
from attn.experiments.adaptive import SentinelPointer, make_sentinel_task
from attn.masks import padding_mask
from attn.multihead import MultiHeadAttention
from attn.train import train


def qkv(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def explicit_formula(q, k, v, span, ramp, max_span, rel_bias=None, key_mask=None):
    """a_ij = m(i-j) exp(s_ij) / sum_r m(i-r) exp(s_ir) with loops over heads, as written in the paper (float64)."""
    B, H, n, d = q.shape
    out = torch.zeros(B, H, n, v.shape[-1], dtype=q.dtype)
    for h in range(H):
        z = float(span[h].detach().clamp(0, max_span))
        for i in range(n):
            js = [j for j in range(n) if 0 <= i - j < max_span]  # padding is masked below
            s = (q[:, h, i : i + 1] @ k[:, h, js].transpose(-1, -2))[:, 0] / math.sqrt(d)  # (B, |js|)
            if rel_bias is not None:
                s = s + rel_bias[h, [i - j for j in js]]
            m = torch.tensor([min(1.0, max(0.0, (ramp + z - (i - j)) / ramp)) for j in js], dtype=q.dtype)
            e = m * torch.exp(s - s.max(-1, keepdim=True).values)
            if key_mask is not None:
                e = e * key_mask[:, js]
            den = e.sum(-1, keepdim=True)
            a = torch.where(den > 0, e / den.clamp_min(1e-300), torch.zeros_like(e))
            out[:, h, i] = (a[:, :, None] * v[:, h, js]).sum(1)
    return out


# ----------------------------------------------------------------------------- the mask and the window


def test_span_mask_is_the_ramp():
    x = torch.arange(12.0)
    m = span_mask(x, torch.tensor([3.0, 0.0]), ramp=4)
    torch.testing.assert_close(m[0], torch.tensor([1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0, 0, 0, 0.0]))
    torch.testing.assert_close(m[1], torch.tensor([1, 0.75, 0.5, 0.25, 0, 0, 0, 0, 0, 0, 0, 0.0]))
    assert span_window(torch.tensor([3.0, 0.0]), 4, 100) == 7 and span_window(torch.tensor([3.2]), 4, 100) == 8
    assert span_window(torch.tensor([90.0]), 32, 100) == 100  # never beyond S


# ----------------------------------------------------------------------------- against the formula


@pytest.mark.parametrize("n, spans, ramp, max_span", [(23, (2.5, 9.3), 4, 16), (17, (0.4, 30.0), 3, 40), (30, (5.7, 1.2), 8, 12)])
@pytest.mark.parametrize("with_bias, padded", [(False, False), (True, True)])
def test_matches_paper_formula_and_dense_reference(n, spans, ramp, max_span, with_bias, padded):
    q, k, v = qkv(2, 2, n, 4, dtype=torch.float64)
    span = torch.tensor(spans, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, max_span, dtype=torch.float64, requires_grad=True) if with_bias else None
    km = padding_mask([n, n - 6], n) if padded else None
    out, w = adaptive_span_attention(q, k, v, span, ramp, max_span, rel_bias=bias, key_mask=km, need_weights=True)
    ref, w_ref = adaptive_span_reference(q, k, v, span, ramp, max_span, rel_bias=bias, key_mask=km)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w, w_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, explicit_formula(q, k, v, span, ramp, max_span, bias, km), atol=1e-10, rtol=1e-10)
    fast = adaptive_span_attention(q, k, v, span, ramp, max_span, rel_bias=bias, key_mask=km).output  # the fused path
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    up = torch.randn_like(out)
    params = [q, k, v, span] + ([bias] if with_bias else [])
    g_ref = torch.autograd.grad(ref, params, up, retain_graph=True)
    for result in (out, fast):
        for a, b in zip(torch.autograd.grad(result, params, up, retain_graph=True), g_ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_truncation_changes_nothing_but_the_cost():
    q, k, v = (t.detach() for t in qkv(1, 2, 64, 8))
    span = torch.tensor([3.0, 5.0])
    full = adaptive_span_attention(q, k, v, span, 4, 64, truncate=False).output
    cut = adaptive_span_attention(q, k, v, span, 4, 64, truncate=True).output
    torch.testing.assert_close(cut, full, atol=1e-6, rtol=1e-6)

    def flops(z, truncate=True):
        with torch.no_grad():
            return count_flops(lambda: adaptive_span_attention(q, k, v, torch.tensor([z, 0.0]), 4, 64, truncate=truncate))

    # scores and weighted sum over (n/K) blocks of (K, 2K): 2 * 2 * B * H * n * 2K * d with K = ceil(z) + R
    assert flops(4.0) == 2 * 2 * 1 * 2 * 64 * (2 * 8) * 8
    assert flops(12.0) == 2 * 2 * 1 * 2 * 64 * (2 * 16) * 8
    assert flops(4.0, truncate=False) == 2 * 2 * 1 * 2 * 64 * (2 * 64) * 8


def test_gradcheck_float64_including_the_span():
    q, k, v = qkv(1, 2, 9, 3, dtype=torch.float64)
    span = torch.tensor([1.3, 3.6], dtype=torch.float64, requires_grad=True)  # distances sit inside the ramps, off the kinks
    bias = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    km = padding_mask([7], 9)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s, b: adaptive_span_attention(q, k, v, s, 3, 8, rel_bias=b, key_mask=km).output,
        (q, k, v, span, bias), fast_mode=True,
    )


def test_span_gets_gradient_only_through_the_ramp():
    q, k, v = qkv(1, 1, 10, 4, dtype=torch.float64)
    span = torch.tensor([40.0], dtype=torch.float64, requires_grad=True)  # every distance < z: mask is all ones
    adaptive_span_attention(q, k, v, span, 4, 64).output.sum().backward()
    assert span.grad.abs().item() == 0.0
    span2 = torch.tensor([3.5], dtype=torch.float64, requires_grad=True)
    adaptive_span_attention(q, k, v, span2, 4, 64).output.pow(2).sum().backward()
    assert span2.grad.abs().item() > 0


@pytest.mark.parametrize("n, spans, ramp, max_span, truncate", [(23, (2.5, 9.3), 4, 16, True), (17, (0.4, 30.0), 3, 40, True),
                                                           (30, (5.7, 1.2), 8, 12, False)])
def test_two_sided_span_matches_the_dense_reference(n, spans, ramp, max_span, truncate):
    """``causal=False`` (issue 23: the kernel honours ``is_causal``): the mask on ``|i - j|``, each block reading the
    blocks before and after it, equals the dense formula in value and gradient; the weights are symmetric in reach."""
    q, k, v = qkv(2, 2, n, 4, dtype=torch.float64)
    span = torch.tensor(spans, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, max_span, dtype=torch.float64, requires_grad=True)
    km = padding_mask([n, n - 6], n)
    for mask in (None, km):
        out, w = adaptive_span_attention(q, k, v, span, ramp, max_span, rel_bias=bias, key_mask=mask, need_weights=True,
                                         causal=False, truncate=truncate)
        ref, w_ref = adaptive_span_reference(q, k, v, span, ramp, max_span, rel_bias=bias, key_mask=mask, causal=False)
        fast = adaptive_span_attention(q, k, v, span, ramp, max_span, rel_bias=bias, key_mask=mask, causal=False,
                                       truncate=truncate).output
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(w, w_ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
        up = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(fast, (q, k, v, span, bias), up), torch.autograd.grad(ref, (q, k, v, span, bias), up),
                        strict=True):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    reach = (w[0, 0] > 0).sum(-1)  # keys each query reads: the same count on both sides away from the ends
    assert bool((w[0, 0].triu(1) > 0).any()) and int(reach.max()) <= 2 * min(max_span, math.ceil(max(spans)) + ramp) - 1


def test_layer_is_causal_by_default_and_two_sided_when_asked():
    torch.manual_seed(0)
    layer = AdaptiveSpanAttention(8, 2, max_span=6, ramp=2, init_span=0.5).double().eval()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    _, w = layer(x, need_weights=True)
    assert (w.triu(1) == 0).all()
    out, w2 = layer(x, is_causal=False, need_weights=True)
    assert (w2.triu(1) > 0).any() and ((w2 > 0) == (w2 > 0).transpose(-1, -2)).all()
    torch.testing.assert_close(layer(x, is_causal=False).output, out, atol=1e-12, rtol=1e-12)  # the fused path


# ----------------------------------------------------------------------------- properties


def test_causal_and_keys_beyond_the_span_are_not_read():
    q, k, v = (t.detach() for t in qkv(2, 2, 40, 4))
    span = torch.tensor([2.0, 6.0])
    out = adaptive_span_attention(q, k, v, span, 3, 64).output
    # the future has no influence
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25:] += 50
    v2[:, :, 25:] -= 50
    torch.testing.assert_close(adaptive_span_attention(q, k2, v2, span, 3, 64).output[:, :, :25], out[:, :, :25])
    # K = ceil(max z) + R = 9: keys at distance >= 9 from query 39 (j <= 30) have no influence on it
    k3, v3 = k.clone(), v.clone()
    k3[:, :, :31] += 1e3
    v3[:, :, :31] -= 1e3
    torch.testing.assert_close(adaptive_span_attention(q, k3, v3, span, 3, 64).output[:, :, 39], out[:, :, 39])
    # and they are not even read: query 39 sits in block [36, 45), which reads keys [27, 45) only
    k4, v4 = k.clone(), v.clone()
    k4[:, :, :27] = float("nan")
    v4[:, :, :27] = float("nan")
    torch.testing.assert_close(adaptive_span_attention(q, k4, v4, span, 3, 64).output[:, :, 36:], out[:, :, 36:])


def test_batched_equals_per_example_and_fully_masked_rows():
    q, k, v = (t.detach() for t in qkv(3, 2, 21, 4))
    span = torch.tensor([4.0, 11.0])
    km = padding_mask([21, 12, 3], 21)
    km[2, 0] = False  # example 2: query 0 sees no real key
    out, w = adaptive_span_attention(q, k, v, span, 4, 32, key_mask=km, need_weights=True)
    per = torch.cat([adaptive_span_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], span, 4, 32, key_mask=km[i : i + 1]).output
                     for i in range(3)])
    torch.testing.assert_close(out, per)
    assert torch.isfinite(out).all() and out[2, :, 0].abs().max() == 0 and w[2, :, 0].abs().max() == 0


def test_module_with_full_span_is_causal_multihead_attention():
    torch.manual_seed(0)
    E, H, n = 16, 4, 19
    ada = AdaptiveSpanAttention(E, H, max_span=32, ramp=4, init_span=1.0, rel_bias=False)
    mha = MultiHeadAttention(E, H)
    # the same projection names as MultiHeadAttention's: only the learned span is extra
    assert mha.load_state_dict(ada.state_dict(), strict=False).unexpected_keys == ["span_param"]
    x = torch.randn(2, n, E)
    km = padding_mask([n, 11], n)
    out, w = ada(x, key_mask=km, need_weights=True)
    ref, w_ref = mha(x, key_mask=km, is_causal=True, need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)


def test_module_spans_penalty_window_and_fixed_baseline():
    mod = AdaptiveSpanAttention(8, 2, max_span=100, ramp=10, init_span=0.5)
    torch.testing.assert_close(mod.spans, torch.tensor([50.0, 50.0]))
    assert mod.window() == 60 and mod.span_loss().item() == 50.0
    mod.span_loss().backward()
    torch.testing.assert_close(mod.span_param.grad, torch.tensor([50.0, 50.0]))  # d mean(S p) / dp = S / H
    with torch.no_grad():
        mod.span_param.fill_(-0.3)
    mod.train()(torch.randn(1, 5, 8))
    assert (mod.span_param == 0).all()  # clamped into [0, 1] before a training forward
    fixed = AdaptiveSpanAttention(8, 2, max_span=50, adaptive=False, truncate=False)
    assert not fixed.span_param.requires_grad and fixed.window() == 50


def test_module_gradcheck():
    mod = AdaptiveSpanAttention(4, 2, max_span=6, ramp=2, init_span=0.4).double()
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mod(x, key_mask=padding_mask([7, 5], 7)).output, (x,), fast_mode=True)


def test_registry_build():
    mech = registry.get("adaptive-span")
    assert mech.chapter == 13 and mech.cls is AdaptiveSpanAttention and mech.complexity.startswith("O(n K d")
    layer = mech.build(32, 4)
    x = torch.randn(2, 19, 32)
    out, w = layer(x, need_weights=True)
    assert out.shape == (2, 19, 32) and w.shape == (2, 4, 19, 19)
    assert (w.triu(1) == 0).all() and layer(x).weights is None


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([[0.0] * 8], TypeError, r"x must be a torch.Tensor of shape \(batch, seq, embed_dim=8\)"),
        (torch.ones(2, 5, 8, dtype=torch.int64), TypeError, "floating-point"),
        (torch.ones(5, 8), ValueError, r"x must have shape \(batch, seq, embed_dim=8\), got 2-D"),
        (torch.ones(2, 5, 6), ValueError, r"last dimension 6 != 8"),
        (torch.ones(2, 0, 8), ValueError, "seq >= 1"),
    ],
)
def test_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        AdaptiveSpanAttention(8, 2, max_span=16, ramp=4)(bad)


def test_bad_arguments_and_empty_batch():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"span must be a tensor of shape \(heads=2,\)"):
        adaptive_span_attention(q, q, q, torch.ones(3), 2, 8)
    with pytest.raises(ValueError, match="ramp must be an int >= 1"):
        adaptive_span_attention(q, q, q, torch.ones(2), 0, 8)
    with pytest.raises(ValueError, match=r"rel_bias must have shape \(heads=2, max_span=8\)"):
        adaptive_span_attention(q, q, q, torch.ones(2), 2, 8, rel_bias=torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"\(batch, heads, n, d\)"):
        adaptive_span_attention(q[0], q[0], q[0], torch.ones(2), 2, 8)
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool"):
        AdaptiveSpanAttention(8, 2, max_span=16, ramp=4)(torch.randn(1, 5, 8), key_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"init_span is z / max_span and must be in \[0, 1\]"):
        AdaptiveSpanAttention(8, 2, init_span=2.0)
    with pytest.raises(ValueError, match="divisible"):
        AdaptiveSpanAttention(10, 3)
    out, w = AdaptiveSpanAttention(8, 2, max_span=16, ramp=4)(torch.randn(0, 5, 8), need_weights=True)
    assert out.shape == (0, 5, 8) and w.shape == (0, 2, 5, 5)


# ----------------------------------------------------------------------------- the visual sentinel


def test_sentinel_matches_the_papers_equations():
    torch.manual_seed(0)
    mod = SentinelAttention(6, 5).double()
    V = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    ctx, alpha_hat = mod(V, h, s)
    # eq. (6): z = w_h^T tanh(W_v V + (W_g h) 1^T), alpha = softmax(z), c = sum alpha_i v_i
    wv, wg, ws, wh = (m.weight for m in (mod.w_v, mod.w_g, mod.w_s, mod.w_h))
    z = torch.tanh(V @ wv.T + (h @ wg.T)[:, None]) @ wh[0]
    alpha = z.softmax(-1)
    c = (alpha[..., None] * V).sum(1)
    # eq. (11)-(12): alpha_hat = softmax([z; w_h^T tanh(W_s s + W_g h)]), beta = last, c_hat = beta s + (1 - beta) c
    z_s = torch.tanh(s @ ws.T + h @ wg.T) @ wh[0]
    ref_alpha = torch.cat([z, z_s[:, None]], 1).softmax(-1)
    beta = ref_alpha[:, -1:]
    ref = beta * s + (1 - beta) * c
    torch.testing.assert_close(alpha_hat, ref_alpha)
    torch.testing.assert_close(ctx, ref)
    up = torch.randn_like(ctx)
    for a, b in zip(torch.autograd.grad(ctx, (V, h, s, *mod.parameters()), up), torch.autograd.grad(ref, (V, h, s, *mod.parameters()), up), strict=True):
        torch.testing.assert_close(a, b)


def test_sentinel_can_attend_to_nothing_and_gradcheck():
    mod = SentinelAttention(4).double()
    V, h, s = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((2, 5, 4), (2, 4), (2, 4)))
    km = torch.tensor([[True] * 5, [False] * 5])
    ctx, alpha = mod(V, h, s, key_mask=km)
    assert torch.isfinite(ctx).all() and alpha[1, -1] == 1 and (alpha[1, :-1] == 0).all()
    torch.testing.assert_close(ctx[1], s[1])  # nothing to look at: the context is the sentinel
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda V, h, s: mod(V, h, s, key_mask=km).output, (V, h, s), fast_mode=True)
    with pytest.raises(ValueError, match=r"features must have shape \(batch, k, 4\)"):
        mod(torch.randn(2, 5, 3, dtype=torch.float64), h, s)
    with pytest.raises(ValueError, match=r"sentinel must have shape \(batch=2, 4\)"):
        mod(V, h, s[:1])
    with pytest.raises(TypeError, match=r"features must be a torch\.Tensor"):
        mod([[0.0]], h, s)  # type: ignore[arg-type]


def test_sentinel_gate():
    gate = SentinelGate(3, 4)
    x, hp, m = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(gate(x, hp, m), torch.sigmoid(x @ gate.w_x.weight.T + gate.w_x.bias + hp @ gate.w_h.weight.T) * torch.tanh(m))
    with pytest.raises(ValueError, match=r"m_t must have shape \(batch=2, 4\)"):
        gate(x, hp, torch.randn(2, 5))


def test_sentinel_task_and_registry():
    mech = registry.get("sentinel")
    assert mech.chapter == 13 and mech.data == "set" and mech.build is None and mech.cls is SentinelAttention
    assert own_tasks()["sentinel"] is make_sentinel_task
    task = own_task("sentinel", "quick")
    batch = task.sample(64, torch.Generator().manual_seed(0))
    none = batch["y"] == 8
    assert 0 < none.sum() < 64
    # absent queries are really absent; present ones sit at the labelled slot
    assert not (batch["items"][none] == batch["query"][none, None]).any()
    rows = (~none).nonzero()[:, 0]
    assert (batch["items"][rows, batch["y"][rows]] == batch["query"][rows]).all()
    hist = train(task.model, task.sample, task.loss, steps=20, batch_size=32, lr=task.lr, progress=False)
    assert len(hist.loss) == 2 and all(math.isfinite(v) for v in hist.loss)
    w = task.weights(task.model, batch)
    torch.testing.assert_close(w.sum(-1), torch.ones(64))
    out = task.layer(*task.inputs(task.sizes[0], torch.Generator().manual_seed(0)))
    assert out.output.shape == (1, 16) and out.weights.shape == (1, task.sizes[0] + 1)
    no_sentinel = SentinelPointer(32, 16, sentinel=False)
    assert (no_sentinel(batch["items"], batch["query"])[:, -1] == 0).all()  # the baseline cannot say "none"
    with pytest.raises(ValueError, match="unknown task size 'huge'"):
        make_sentinel_task("huge")


@pytest.mark.parametrize("which", ["features", "h", "sentinel"])
def test_sentinel_refuses_mixed_dtypes(which):
    """A float64 tensor among float32 ones used to fail deep in a matmul; now the error names each argument's dtype."""
    mod = SentinelAttention(4)
    args = {"features": torch.randn(2, 3, 4), "h": torch.randn(2, 4), "sentinel": torch.randn(2, 4)}
    args[which] = args[which].double()
    with pytest.raises(TypeError, match=rf"dtypes must match \(.*{which}: torch.float64"):
        mod(**args)


# ----------------------------------------------------------------------------- issue 16: dynamic span, lags, sentinels


@pytest.mark.parametrize("n, padded, causal", [(50, False, True), (37, True, True), (29, False, False)])
def test_dynamic_span_per_query_matches_the_dense_formula(n, padded, causal):
    """A span per query (B, H, n): blockwise (fused-free and weights paths) = the dense formula, outputs and gradients."""
    from attn.adaptive import adaptive_span_attention, adaptive_span_reference
    from attn.masks import padding_mask

    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    z = (torch.rand(2, 3, n, generator=g, dtype=torch.float64) * 20).requires_grad_()
    bias = torch.randn(3, 32, generator=g, dtype=torch.float64, requires_grad=True)
    km = padding_mask([n, n - 7], n) if padded else None
    ours = adaptive_span_attention(q, k, v, z, 4, 32, rel_bias=bias, key_mask=km, causal=causal)
    weights = adaptive_span_attention(q, k, v, z, 4, 32, rel_bias=bias, key_mask=km, causal=causal, need_weights=True)
    ref = adaptive_span_reference(q, k, v, z, 4, 32, rel_bias=bias, key_mask=km, causal=causal)
    torch.testing.assert_close(ours.output, ref.output, atol=1e-10, rtol=0)
    torch.testing.assert_close(weights.weights, ref.weights, atol=1e-10, rtol=0)
    up = torch.randn(ref.output.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ours.output, (q, k, v, z, bias), up),
                    torch.autograd.grad(ref.output, (q, k, v, z, bias), up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # a query with span 0 and ramp 4 reads at most the last 3 tokens
    z0 = torch.zeros(2, 3, n, dtype=torch.float64)
    w0 = adaptive_span_attention(q, k, v, z0, 4, 32, causal=True, need_weights=True).weights
    i = torch.arange(n)
    assert (w0[..., (i[:, None] - i[None, :]) >= 4] == 0).all()


def test_dynamic_span_layer_z_t_from_the_token_and_its_cost():
    """dynamic=True: z_t = S sigmoid(v^T x_t + b), per token and head; the L1 cost and K follow it; v, b learn."""
    torch.manual_seed(0)
    layer = AdaptiveSpanAttention(16, 4, max_span=32, ramp=4, init_span=0.25, dynamic=True)
    with pytest.raises(RuntimeError, match="call the layer first"):
        layer.span_loss()
    x = torch.randn(2, 40, 16)
    out = layer(x).output
    assert out.shape == x.shape
    torch.testing.assert_close(layer.token_spans(x), torch.full((2, 4, 40), 8.0))  # S * 0.25 at init (v = 0)
    assert layer.window() == 8 + 4
    with torch.no_grad():
        layer.span_proj.weight.normal_()
    z = layer.token_spans(x)
    assert z.std() > 0.5 and (z >= 0).all() and (z <= 32).all()  # the span now depends on the token
    loss = layer(x).output.square().mean() + layer.span_loss()
    torch.testing.assert_close(layer.span_loss(), z.mean())
    assert layer.window() == min(32, math.ceil(z.max().item()) + 4)
    loss.backward()
    assert layer.span_proj.weight.grad.abs().sum() > 0 and layer.span_proj.bias.grad.abs().sum() > 0
    static = AdaptiveSpanAttention(16, 4, max_span=32, ramp=4)
    with pytest.raises(RuntimeError, match="dynamic=True"):
        static.token_spans(x)


def test_lag_task_targets_and_head_weight_at():
    from attn.experiments.adaptive import LagTask, head_weight_at

    task = LagTask(n=30, vocab=8, lags=(10, 20))
    b = task.sample(4, torch.Generator().manual_seed(0))
    assert b["y"].shape == (4, 30, 2) and (b["y"][:, :20] == -1).all()
    assert torch.equal(b["y"][:, 20:, 0], b["x"][:, 10:20]) and torch.equal(b["y"][:, 20:, 1], b["x"][:, 0:10])
    with pytest.raises(ValueError, match="lags must be distinct"):
        LagTask(n=30, lags=(10, 30))
    w = torch.zeros(1, 2, 30, 30)
    i = torch.arange(10, 30)
    w[0, 0, i, i - 10] = 1.0
    w[0, 1, i, i - 1] = 1.0
    hw = head_weight_at(w, (1, 10), start=10)
    torch.testing.assert_close(hw, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_sentinel_pointer_kinds():
    """gated: the slot's vector depends on the query; null: one learned vector; none: no slot (floor)."""
    task = make_sentinel_task("quick")
    batch = task.sample(32, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    gated = SentinelPointer(32, 16, sentinel="gated")
    assert gated.gate is not None and gated.sentinel is None
    w = gated(batch["items"], batch["query"])
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    assert w[:, -1].std() > 0
    assert SentinelPointer(32, 16, sentinel=True).kind == "null" and SentinelPointer(32, 16, sentinel=False).kind == "none"
    with pytest.raises(ValueError, match="sentinel must be"):
        SentinelPointer(32, 16, sentinel="zero")


def test_caption_task_and_captioner_beta():
    from attn.experiments.adaptive import CaptionTask, SentinelCaptioner, caption_loss

    task = CaptionTask(k=6)
    b = task.sample(64, torch.Generator().manual_seed(0))
    assert b["words"].shape == (64, 7) and b["regions"].shape == (64, 6, 2)
    # function words are fixed by position; exactly two regions hold objects, named in region order
    assert (b["words"][:, ~task.visual] == torch.tensor([0, 1, 0])).all()
    objects = (b["regions"][..., 0] < task.n_colours).sum(-1)
    assert (objects == 2).all()
    first = (b["regions"][..., 0] < task.n_colours).float().argmax(-1)
    assert torch.equal(b["words"][:, 1], 3 + b["regions"][torch.arange(64), first, 0])
    torch.manual_seed(0)
    model = SentinelCaptioner(task, 16)
    logits, beta = model(b["regions"], b["words"])
    assert logits.shape == (64, 7, task.vocab) and beta.shape == (64, 7) and ((beta > 0) & (beta < 1)).all()
    hist = train(model, task.sample, caption_loss, steps=10, batch_size=16, lr=1e-2, progress=False)
    assert math.isfinite(hist.loss[-1])
