"""Chapter 30: differential attention against its formula and SDPA; the streaming LM with attention sinks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attn import registry
from attn.benchmark import largest_tensor
from attn.differential import DifferentialAttention, SinkCache, lambda_init
from attn.experiments.differential import MotifStream, RotaryLM, window_recompute_logits
from attn.masks import padding_mask

E = 16


def make(causal=False, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    m = DifferentialAttention(E, 2, causal=causal, **kw).to(dtype)
    with torch.no_grad():
        m.head_norm.weight.uniform_(0.5, 1.5)
    return m


def tokens(B=2, n=6, dtype=torch.float32, seed=1):
    return torch.randn(B, n, E, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def explicit(m: DifferentialAttention, x: torch.Tensor, key_mask=None) -> torch.Tensor:
    """The paper's equations with explicit softmaxes, head by head."""
    B, n, _ = x.shape
    d = m.head_dim
    dot = lambda a, b: float((a.detach().double() * b.detach().double()).sum())  # noqa: E731
    lam = math.exp(dot(m.lambda_q1, m.lambda_k1)) - math.exp(dot(m.lambda_q2, m.lambda_k2)) + m.lambda_init
    lam_t = torch.exp(m.lambda_q1 @ m.lambda_k1) - torch.exp(m.lambda_q2 @ m.lambda_k2) + m.lambda_init
    assert abs(float(lam_t.detach()) - lam) < 1e-6
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    allowed = torch.ones(n, n, dtype=torch.bool)
    if m.causal:
        allowed = allowed.tril()
    allowed = allowed.expand(B, n, n)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    heads = []
    for i in range(m.num_heads):
        q1, q2 = q[..., 2 * i * d : (2 * i + 1) * d], q[..., (2 * i + 1) * d : (2 * i + 2) * d]
        k1, k2 = k[..., 2 * i * d : (2 * i + 1) * d], k[..., (2 * i + 1) * d : (2 * i + 2) * d]
        vi = v[..., 2 * i * d : (2 * i + 2) * d]
        a1 = (q1 @ k1.transpose(1, 2) / math.sqrt(d)).masked_fill(~allowed, float("-inf")).softmax(-1)
        a2 = (q2 @ k2.transpose(1, 2) / math.sqrt(d)).masked_fill(~allowed, float("-inf")).softmax(-1)
        o = (a1 - lam_t * a2) @ vi
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * m.head_norm.weight
        heads.append(o * (1 - m.lambda_init))
    return torch.cat(heads, -1) @ m.out_proj.weight.T


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_explicit_formula_forward_and_gradients(causal, need_weights):
    m = make(causal, dtype=torch.float64)
    x = tokens(dtype=torch.float64).requires_grad_()
    y, w = m(x, need_weights=need_weights)
    ref = explicit(m, x)
    assert (y - ref).abs().max() <= 1e-12
    up = torch.randn_like(y)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(y, params, up), torch.autograd.grad(ref, params, up), strict=True):
        assert (a - b).abs().max() <= 1e-11
    if need_weights:
        a1, a2, lam = m.maps(x)
        assert torch.allclose(w, a1 - lam * a2)
        assert torch.allclose(w.sum(-1), (1 - lam).expand(2, 2, 6))  # rows sum to 1 - lambda


def test_first_map_against_sdpa_when_lambda_is_zero():
    """lambda = 0 (lambda_init 0, equal exp terms): one softmax map, i.e. F.scaled_dot_product_attention + RMSNorm."""
    m = make(lambda_init_value=0.0)
    with torch.no_grad():
        m.lambda_q2.copy_(m.lambda_q1)
        m.lambda_k2.copy_(m.lambda_k1)
    assert abs(float(m.lam().detach())) < 1e-7
    x = tokens()
    B, n, _ = x.shape
    d = m.head_dim
    q = m.q_proj(x).view(B, n, 2, 2, d)[:, :, :, 0].transpose(1, 2)  # Q_1 of each head
    k = m.k_proj(x).view(B, n, 2, 2, d)[:, :, :, 0].transpose(1, 2)
    v = m.v_proj(x).view(B, n, 2, 2 * d).transpose(1, 2)
    o = m.head_norm(F.scaled_dot_product_attention(q, k, v))
    ref = m.out_proj(o.transpose(1, 2).reshape(B, n, E))
    assert (m(x).output - ref).abs().max() <= 1e-6


def test_lambda_reparameterisation_and_init():
    assert lambda_init(1) == pytest.approx(0.2)
    assert lambda_init(5) == pytest.approx(0.8 - 0.6 * math.exp(-1.2))
    assert lambda_init(100) == pytest.approx(0.8, abs=1e-6)
    with pytest.raises(ValueError, match="1-based"):
        lambda_init(0)
    m = DifferentialAttention(32, 2, layer_index=3)
    assert m.lambda_init == pytest.approx(lambda_init(3))
    with torch.no_grad():
        for p in (m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2):
            p.zero_()
    assert float(m.lam().detach()) == pytest.approx(m.lambda_init)  # exp(0) - exp(0) + lambda_init
    with torch.no_grad():
        m.lambda_q1.fill_(0.5)
        m.lambda_k1.fill_(0.5)
    assert float(m.lam().detach()) == pytest.approx(math.exp(0.25 * 8) - 1 + m.lambda_init)  # d = 8
    m.lam().backward()
    assert m.lambda_q1.grad is not None and m.lambda_q1.grad.abs().sum() > 0


def test_gradcheck_float64():
    torch.manual_seed(0)
    m = DifferentialAttention(8, 2, causal=True).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x).output, (x,), eps=1e-6, atol=1e-6)


def test_padding_causality_batching_and_masked_rows():
    m = make()
    x = tokens(n=7)
    km = padding_mask([7, 4], 7)
    x2 = x.clone()
    x2[1, 4:] = torch.randn(3, E)
    with torch.no_grad():
        a, b = m(x, key_mask=km).output, m(x2, key_mask=km).output
        assert (a[1, :4] - b[1, :4]).abs().max() <= 1e-6  # padded keys have no effect
        assert (a - explicit(m, x, km)).abs().max() <= 1e-5
        single = torch.cat([m(x[i : i + 1], key_mask=km[i : i + 1]).output for i in range(2)])
        assert (single - a).abs().max() <= 1e-6
        c = make(causal=True)
        y1, y2 = c(x).output, c(x2).output
        assert (y1[1, :4] - y2[1, :4]).abs().max() <= 1e-6 and (y1[1, 4:] - y2[1, 4:]).abs().max() > 1e-3
        none = torch.zeros(2, 7, dtype=torch.bool)
        none[0] = True
        out = m(x, key_mask=none, need_weights=True)
        assert torch.isfinite(out.output).all() and (out.weights[1] == 0).all()


def test_empty_batch():
    out = make()(torch.zeros(0, 5, E), need_weights=True)
    assert out.output.shape == (0, 5, E) and out.weights.shape == (0, 2, 5, 5)


@pytest.mark.parametrize(
    "bad, err, match",
    [
        ([[0.0] * E], TypeError, "torch.Tensor"),
        (torch.zeros(2, 5, E, dtype=torch.int64), TypeError, "floating-point"),
        (torch.zeros(5, E), ValueError, r"\(batch, seq, embed_dim=16\)"),
        (torch.zeros(2, 5, E + 2), ValueError, "embed_dim=16"),
        (torch.zeros(2, 0, E), ValueError, "empty sequence"),
    ],
)
def test_bad_inputs(bad, err, match):
    with pytest.raises(err, match=match):
        make()(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 \\* num_heads"):
        DifferentialAttention(12, 4)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        DifferentialAttention(16, 2.0)
    with pytest.raises(ValueError, match="key_mask"):
        make()(tokens(), key_mask=torch.ones(3, 6, dtype=torch.bool))


def test_registry_entry():
    mech = registry.get("differential")
    assert mech.chapter == 30 and registry.chapter(30).slug == "differential_attention"
    layer = mech.build(32, 4)
    assert layer.num_heads == 2 and layer.head_dim == 8
    assert sum(p.numel() for p in layer.parameters() if p.ndim == 2) == 4 * 32 * 32  # as a 4-head standard layer
    out = layer(torch.randn(2, 6, 32), need_weights=True)
    assert out.output.shape == (2, 6, 32) and out.weights.shape == (2, 2, 6, 6)


# ----------------------------------------------------------------------------- attention sinks


def lm(seed=0):
    torch.manual_seed(seed)
    return RotaryLM(12, embed_dim=16, num_heads=2, num_layers=2).eval()


def test_stream_without_eviction_equals_full_forward():
    model = lm()
    x = MotifStream(vocab=12).stream(3, 20, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x).logits
        assert (model.stream(x, window=None) - full).abs().max() <= 1e-5
        assert (model.stream(x, window=20, sinks=4) - full).abs().max() <= 1e-5  # nothing evicted yet
        evicted = model.stream(x, window=8, sinks=0)
        assert (evicted[:, :8] - full[:, :8]).abs().max() <= 1e-5
        assert (evicted[:, 8:] - full[:, 8:]).abs().max() > 1e-3


def test_sink_cache_keeps_first_and_recent_tokens():
    cache = SinkCache(1, window=5, sinks=2)
    for t in range(9):
        ks, _ = cache.append(0, torch.full((1, 1, 1, 1), float(t)), torch.zeros(1, 1, 1, 1))
    assert ks.flatten().tolist() == [0.0, 1.0, 6.0, 7.0, 8.0]
    plain = SinkCache(1, window=5, sinks=0)
    for t in range(9):
        ks, _ = plain.append(0, torch.full((1, 1, 1, 1), float(t)), torch.zeros(1, 1, 1, 1))
    assert ks.flatten().tolist() == [4.0, 5.0, 6.0, 7.0, 8.0]
    with pytest.raises(ValueError, match="sinks < window"):
        SinkCache(1, window=4, sinks=4)


def test_per_row_sinks_equal_separate_runs():
    model = lm()
    x = MotifStream(vocab=12).stream(2, 18, torch.Generator().manual_seed(3))
    with torch.no_grad():
        both = model.stream(torch.cat([x, x]), window=7, sinks=torch.tensor([0, 0, 3, 3]))
        assert (both[:2] - model.stream(x, window=7, sinks=0)).abs().max() <= 1e-6
        assert (both[2:] - model.stream(x, window=7, sinks=3)).abs().max() <= 1e-6
        assert (both[:2, 10:] - both[2:, 10:]).abs().max() > 1e-3


def test_stream_with_sinks_equals_dense_attention_over_the_kept_tokens():
    """At the last step, the sink cache's logits equal a full forward over the kept tokens for layer 1 (1-layer model)."""
    torch.manual_seed(0)
    model = RotaryLM(12, embed_dim=16, num_heads=2, num_layers=1).eval()
    x = MotifStream(vocab=12).stream(2, 15, torch.Generator().manual_seed(1))
    with torch.no_grad():
        streamed = model.stream(x, window=6, sinks=2)[:, -1]
        kept = torch.cat([x[:, :2], x[:, -4:]], 1)  # one layer: a token's k, v depend only on the token itself
        assert (streamed - model(kept).logits[:, -1]).abs().max() <= 1e-5


def test_window_recompute_matches_explicit_windows():
    model = lm()
    x = MotifStream(vocab=12).stream(2, 14, torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = window_recompute_logits(model, x, window=5, start=6)
        for j, t in enumerate(range(6, 14)):
            seq = torch.cat([x[:, :1], x[:, t - 3 : t + 1]], 1)
            assert (got[:, j] - model(seq).logits[:, -1]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="start"):
        window_recompute_logits(model, x, window=5, start=2)


def test_motif_stream_and_bad_tokens():
    x = MotifStream(vocab=10, min_period=3, max_period=3, noise=0.0).stream(4, 13, torch.Generator().manual_seed(0))
    assert (x[:, 0] == 0).all() and (x[:, 1:] > 0).all()
    assert torch.equal(x[:, 4:], x[:, 1:-3])  # period 3, no noise
    with pytest.raises(TypeError, match="tokens must hold integer token ids"):
        lm()(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="long tensor"):
        lm().stream(torch.zeros(2, 5), window=4)
    with pytest.raises(ValueError):
        MotifStream(vocab=2)


# ----------------------------------------------------------------------------- linear memory, bad input



@pytest.mark.parametrize("causal", [False, True])
def test_no_dense_map_without_weights(causal):
    """Two fused calls with V in halves: nothing of size n^2 (the dense path forms (B, h, n, n) maps, twice)."""
    n = 512
    m = make(causal=causal)
    x = torch.randn(1, n, E)
    assert largest_tensor(lambda: m(x)) < n * n // 8
    assert largest_tensor(lambda: m(x, need_weights=True)) >= m.num_heads * n * n


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_path_equals_dense_path_and_formula_float64(causal, padded):
    """need_weights=False (two fused calls) against the dense path and the paper's formula: outputs and gradients."""
    m = make(causal=causal, dtype=torch.float64)
    x = tokens(B=3, n=9, dtype=torch.float64).requires_grad_()
    km = None
    if padded:  # left padding (causal rows with no visible key), right padding, an all-padding row
        km = torch.ones(3, 9, dtype=torch.bool)
        km[0, :3] = False
        km[1, 6:] = False
        km[2] = False
    fast, dense = m(x, key_mask=km), m(x, key_mask=km, need_weights=True)
    assert fast.weights is None
    assert (fast.output - dense.output).abs().max() <= 1e-12
    if not padded:
        assert (fast.output - explicit(m, x)).abs().max() <= 1e-12
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(fast.output.square().sum(), params),
                    torch.autograd.grad(dense.output.square().sum(), params), strict=True):
        assert (a - b).abs().max() <= 1e-11


def test_attend_wide_values_is_softmax_times_wide_values():
    from attn.differential import attend_wide_values

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64)
    for causal in (False, True):
        s = q @ k.transpose(-1, -2) / 2.0
        if causal:
            s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        assert (attend_wide_values(q, k, v, causal=causal) - s.softmax(-1) @ v).abs().max() <= 1e-13


@pytest.mark.parametrize(
    "value, err, match",
    [
        (float("inf"), ValueError, "lambda_init_value must be a finite number"),
        (float("nan"), ValueError, "lambda_init_value must be a finite number"),
        (1.0, ValueError, r"1 makes the layer's output exactly zero"),
        (1.5, ValueError, r"in \[0, 1\)"),
        (-0.2, ValueError, r"in \[0, 1\)"),
        ("0.5", TypeError, "lambda_init_value must be a real number"),
    ],
)
def test_lambda_init_value_must_be_finite_and_below_one(value, err, match):
    with pytest.raises(err, match=match):
        DifferentialAttention(E, 2, lambda_init_value=value)


def test_lambda_init_layer_index_checked():
    with pytest.raises(ValueError, match="layer_index"):
        lambda_init(0)
    with pytest.raises(TypeError, match="layer_index"):
        lambda_init(1.5)


def kv(B=2, h=2, d=4, dtype=torch.float32):
    return torch.randn(B, h, 1, d, dtype=dtype), torch.randn(B, h, 1, d, dtype=dtype)


def started(B=2, h=2, d=4, layers=2, sinks=1):
    cache = SinkCache(layers, window=4, sinks=sinks)
    cache.append(0, *kv(B, h, d))
    return cache


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: started().append(0, [[0.0]], kv()[1]), TypeError,
         r"k must be a torch.Tensor of shape \(batch, heads, tokens, head_dim\)"),
        (lambda: started().append(0, torch.randn(2, 1, 4), torch.randn(2, 1, 4)), ValueError,
         r"k must have shape \(batch, heads, tokens, head_dim\)"),
        (lambda: started().append(0, *kv(B=3)), ValueError,  # a new batch mid-decoding
         r"holds \(batch=2, heads=2, head_dim=4\).*new SinkCache"),
        (lambda: started().append(0, *kv(h=4)), ValueError, r"holds \(batch=2, heads=2, head_dim=4\)"),  # new head count
        (lambda: started().append(2, *kv()), ValueError, r"layer must be in \[0, 2\).*got 2"),  # past the cache
        (lambda: started().append(-1, *kv()), ValueError, r"layer must be in \[0, 2\)"),
        (lambda: started().append(0, *kv(dtype=torch.float64)), TypeError,  # mixed dtypes with the cache
         r"dtypes must match.*cached keys: torch.float32"),
        (lambda: SinkCache(1, window=4).append(0, kv()[0], kv()[1].double()), TypeError,
         r"dtypes must match \(k: torch.float32, v: torch.float64"),
        (lambda: SinkCache(1, window=4).append(0, kv()[0], torch.randn(2, 2, 2, 4)), ValueError, "k and v must share"),
        (lambda: SinkCache(1, window=3, sinks=torch.tensor([0, 1, 2])).append(0, *kv(B=2)), ValueError,  # per-row sinks
         r"sinks has one entry per row: shape \(2,\)"),
        (lambda: SinkCache(1, window=4, sinks=torch.tensor([0.5, 1.0])), TypeError, "sinks must be an int or a"),
        (lambda: SinkCache(2.0, window=4), TypeError, "num_layers must be an int"),
        (lambda: SinkCache(1, window=0), ValueError, "window must be >= 1"),
    ],
)
def test_sink_cache_bad_input_names_what_was_expected(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ----------------------------------------------------------------------------- issue 23: one interface


def test_differential_follows_the_sequence_mixer_protocol():
    """Keyword-only options after x; is_causal per call overrides the layer's causal (both ways)."""
    causal, bidir = make(causal=True), make(causal=False)
    bidir.load_state_dict(causal.state_dict())
    x = tokens(n=7)
    with pytest.raises(TypeError):
        causal(x, True)  # need_weights is keyword-only
    torch.testing.assert_close(bidir(x, is_causal=True).output, causal(x).output)
    torch.testing.assert_close(causal(x, is_causal=False, need_weights=True).output, bidir(x).output,
                               atol=1e-6, rtol=1e-5)
    assert registry.get("differential").causal is False and registry.get("differential").kernel is None


def test_rotary_lm_is_a_token_lm_with_rope_attention():
    """The streaming LM is attn.models.TokenLM with Attention(position="rope") mixers: the package's one RoPE."""
    from attn.attention import Attention
    from attn.models import TokenLM
    from attn.positions import RotaryEmbedding

    model = lm()
    assert isinstance(model, TokenLM)
    for block in model.blocks:
        assert isinstance(block.mixer, Attention) and block.mixer.causal and type(block.mixer.rotary) is RotaryEmbedding


# ----------------------------------------------------------------------------- issue 17: sink logit, bursts, shares


def test_sink_logit_attention_is_softmax_with_a_zero_value_key():
    """b = -inf gives plain softmax attention; otherwise equal to appending a key of score b and value 0."""
    from attn.differential import sink_logit_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out, w = sink_logit_attention(q, k, v, torch.full((3,), -math.inf, dtype=torch.float64), causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    b = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    out, w = sink_logit_attention(q, k, v, b, causal=True)
    s = (q @ k.transpose(-2, -1) / 2).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf)
    ref = torch.cat([s, b.view(1, 3, 1, 1).expand(2, 3, 5, 1)], -1).softmax(-1)
    torch.testing.assert_close(w, ref[..., :-1])
    torch.testing.assert_close(out, ref[..., :-1] @ v)
    assert (w.sum(-1) < 1).all()
    with pytest.raises(ValueError, match="one entry per head"):
        sink_logit_attention(q, k, v, torch.zeros(2, dtype=torch.float64))
    # an all-masked row writes nothing (the virtual key takes everything), no NaN
    km = torch.ones(2, 5, dtype=torch.bool)
    km[0] = False
    out, w = sink_logit_attention(q, k, v, b, key_mask=km)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0


def test_copy_burst_stream_layout():
    from attn.experiments.differential import CopyBurstStream

    task = CopyBurstStream(vocab=50, min_segment=3, max_segment=5)
    b = task.sample(16, 60, torch.Generator().manual_seed(0))
    x, copy = b["x"], b["copy"]
    assert x.shape == copy.shape == (16, 60) and (x[:, 0] == 0).all() and (x[:, 1:] > 0).all()
    assert not copy[:, :2].any() and copy.any()
    # every predictable token repeats the token one segment (3..5) back, and follows a copied token
    for r in range(16):
        for t in torch.nonzero(copy[r]).flatten().tolist():
            assert any(x[r, t] == x[r, t - m] and x[r, t - 1] == x[r, t - 1 - m] for m in range(3, 6))
    # same seed, same data; another seed, other data
    again = task.sample(16, 60, torch.Generator().manual_seed(0))
    assert torch.equal(again["x"], x)
    assert not torch.equal(task.sample(16, 60, torch.Generator().manual_seed(1))["x"], x)
    with pytest.raises(ValueError):
        CopyBurstStream(min_segment=4, max_segment=3)


def test_sink_logit_lm_streams_like_its_forward_and_learns_its_logit():
    from attn.experiments.differential import SinkLogitAttention, stream_lm_loss

    torch.manual_seed(0)
    model = RotaryLM(12, embed_dim=16, num_heads=2, num_layers=2, sink_logit=True).eval()
    assert all(isinstance(b.mixer, SinkLogitAttention) for b in model.blocks)
    x = MotifStream(vocab=12).stream(3, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, need_weights=True)
        assert (model.stream(x, window=16, sinks=4) - out.logits).abs().max() <= 1e-5
        assert all(w is not None and (w.sum(-1) < 1).all() for w in out.weights)
    loss, _ = stream_lm_loss(model.train(), {"x": x})
    loss.backward()
    assert all(b.mixer.sink_logit.grad is not None and b.mixer.sink_logit.grad.abs().sum() > 0 for b in model.blocks)


def test_first_tokens_mass_and_uniform():
    from attn.experiments.differential import first_tokens_mass, uniform_first_tokens_mass

    n = 9
    uniform = torch.ones(n, n).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    for tokens in (1, 4):
        assert abs(float(first_tokens_mass(uniform, tokens)) - uniform_first_tokens_mass(n, tokens)) < 1e-6
    sink = torch.zeros(n, n)
    sink[:, 0] = 1
    assert float(first_tokens_mass(sink, 1)) == 1.0


def test_query_row_shares_normalise_by_the_row_sum():
    from attn.experiments.differential import query_row_shares

    # a differential-like row summing to 0.4: answer 0.3, distractors 0.1 - 0.1, query 0.1
    row = torch.tensor([[0.3, 0.1, -0.1, 0.1]])
    sh = query_row_shares(row, torch.tensor([0]))
    assert abs(float(sh["row sum"]) - 0.4) < 1e-6
    assert abs(float(sh["answer share"]) - 0.75) < 1e-6
    assert abs(float(sh["distractor share"])) < 1e-6 and abs(float(sh["query share"]) - 0.25) < 1e-6
    assert abs(float(sh["abs distractor share"]) - 0.2 / 0.6) < 1e-6
    total = sh["answer share"] + sh["distractor share"] + sh["query share"]
    assert abs(float(total) - 1) < 1e-6
    with pytest.raises(ValueError):
        query_row_shares(row, torch.tensor([0, 1]))


@pytest.mark.slow
def test_sink_lm_run_returns_one_row_per_run():
    from attn.experiments.differential import CopyBurstStream, sink_lm_run

    task = CopyBurstStream(vocab=16)
    held = task.sample(4, 20, torch.Generator().manual_seed(0))
    model, row = sink_lm_run(0, sink_logit=True, task=task, held=held, window=10, steps=3, embed_dim=16)
    assert isinstance(model, RotaryLM) and model.sink_logit
    for key in ("copy accuracy", "first-token mass, layer 1", "tokens 0-3 mass, layer 0",
                "virtual-sink mass, layer 1", "beyond: window", "beyond: window + BOS", "beyond: window + 4 sinks"):
        assert 0 <= row[key] <= 1, key
    assert row["virtual-sink mass, layer 0"] > 0
