"""Chapter 20: gated attention (Qiu et al. output gate, Hua et al. GAU, Ilse et al. gated MIL) against explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch

from attn import registry
from attn.attention import AttentionBase
from attn.experiments import own_task
from attn.experiments.gated import (
    BagTask,
    CopyLMTask,
    MILModel,
    ProductBagTask,
    SinkLM,
    copy_read_weight,
    first_token_mass,
    gate_sink_correlation,
    gate_values,
    lm_loss,
    mil_loss,
    mil_runs,
    mil_task,
    sink_runs,
)
from attn.gated import GatedAttention, GatedAttentionUnit, GatedMILPooling, GatedOutput
from attn.masks import padding_mask
from attn.multihead import MultiHeadAttention
from attn.train import train


def rand(*shape, dtype=torch.float32, seed=0, grad=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(grad)


def gated_reference(mod: GatedAttention, x, key_mask=None, causal=False):
    """Explicit formula, one head at a time: softmax(q k^T / sqrt(d) + mask) v * sigmoid(x W_g + b_g), concat, W_o."""
    h, d = mod.num_heads, mod.head_dim
    n = x.shape[1]
    heads, weights = [], []
    for i in range(h):
        rows = slice(i * d, (i + 1) * d)
        q = x @ mod.q_proj.weight[rows].T + mod.q_proj.bias[rows]
        k = x @ mod.k_proj.weight[rows].T + mod.k_proj.bias[rows]
        v = x @ mod.v_proj.weight[rows].T + mod.v_proj.bias[rows]
        s = torch.einsum("bid,bjd->bij", q, k) / math.sqrt(d)
        allowed = torch.ones(x.shape[0], n, n, dtype=torch.bool)
        if causal:
            allowed &= torch.ones(n, n, dtype=torch.bool).tril()
        if key_mask is not None:
            allowed &= key_mask[:, None, :]
        a = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = torch.einsum("bij,bjd->bid", a, v)
        if mod.gate_kind == "elementwise":
            o = o * torch.sigmoid(x @ mod.gate_proj.weight[rows].T + mod.gate_proj.bias[rows])
        elif mod.gate_kind == "headwise":
            o = o * torch.sigmoid(x @ mod.gate_proj.weight[i] + mod.gate_proj.bias[i])[..., None]
        heads.append(o)
        weights.append(a)
    y = torch.cat(heads, -1) @ mod.out_proj.weight.T + mod.out_proj.bias
    return y, torch.stack(weights, 1)


# ----------------------------------------------------------------------------- Qiu et al.: the output gate


@pytest.mark.parametrize("gate", ["elementwise", "headwise", None])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_gated_attention_matches_explicit_formula(gate, causal, padded):
    torch.manual_seed(0)
    mod = GatedAttention(12, 3, gate=gate, causal=causal).double()
    x = rand(2, 7, 12, dtype=torch.float64)
    km = padding_mask([7, 4], 7) if padded else None
    for need in (False, True):
        y, w = mod(x, key_mask=km, need_weights=need)
        y_ref, w_ref = gated_reference(mod, x, km, causal)
        assert (y - y_ref).abs().max() < 1e-12
        if need:
            assert (w - w_ref).abs().max() < 1e-12
        else:
            assert w is None
    up = torch.randn_like(y)
    params = [x, *mod.parameters()]
    g1 = torch.autograd.grad(y, params, up)
    g2 = torch.autograd.grad(y_ref, params, up)
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max() < 1e-11


def test_gate_of_one_recovers_ungated_layer_exactly():
    """gate = 1 (offset +inf, or a bias so large that sigmoid rounds to 1): bit-identical to MultiHeadAttention."""
    torch.manual_seed(1)
    gated = GatedAttention(16, 4)
    plain = MultiHeadAttention(16, 4)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate_proj")})
    x = rand(3, 9, 16, grad=False)
    ref = plain(x).output
    assert not torch.equal(gated(x).output, ref)  # the gate does something ...
    gated.gate_offset = math.inf
    assert torch.equal(gated.gate(x), torch.ones(3, 4, 9, 4))
    assert torch.equal(gated(x).output, ref)  # ... and gate = 1 gives the ungated layer back, bit for bit
    gated.gate_offset = 0.0
    with torch.no_grad():
        gated.gate_proj.weight.zero_()
        gated.gate_proj.bias.fill_(40.0)  # sigmoid(40) == 1.0 in float32
    assert torch.equal(gated(x).output, ref)
    # and the ungated layer is torch.nn.MultiheadAttention
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([plain.q_proj.weight, plain.k_proj.weight, plain.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([plain.q_proj.bias, plain.k_proj.bias, plain.v_proj.bias]))
        mha.out_proj.weight.copy_(plain.out_proj.weight)
        mha.out_proj.bias.copy_(plain.out_proj.bias)
    torch.testing.assert_close(gated(x).output, mha(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)


def test_closed_gate_outputs_only_the_bias_and_gate_shapes():
    torch.manual_seed(0)
    mod = GatedAttention(8, 2, gate="headwise")
    x = rand(2, 5, 8, grad=False)
    res = mod(x, return_gate=True)
    assert isinstance(res, GatedOutput) and isinstance(res.weights, torch.Tensor)
    _y, w, g = res
    assert g.shape == (2, 2, 5, 1) and w.shape == (2, 2, 5, 5)
    assert ((g > 0) & (g < 1)).all()
    mod.gate_offset = -math.inf
    torch.testing.assert_close(mod(x).output, mod.out_proj.bias.expand(2, 5, 8))
    assert GatedAttention(8, 2).gate(x).shape == (2, 2, 5, 4)
    assert torch.equal(GatedAttention(8, 2, gate=None).gate(x), torch.ones(2, 2, 5, 1))


def test_gated_attention_properties():
    torch.manual_seed(0)
    mod = GatedAttention(8, 2, causal=True)
    x = rand(3, 10, 8, grad=False)
    y = mod(x).output
    x2 = x.clone()
    x2[:, 6:] = torch.randn(3, 4, 8)
    torch.testing.assert_close(mod(x2).output[:, :6], y[:, :6])  # causal: the future has no effect
    assert not torch.allclose(mod(x2).output[:, 6:], y[:, 6:])
    torch.testing.assert_close(torch.cat([mod(x[i : i + 1]).output for i in range(3)]), y)  # batched == per example
    bi = GatedAttention(8, 2)
    km = padding_mask([10, 6, 10], 10)
    out = bi(x, key_mask=km).output
    x3 = x.clone()
    x3[1, 6:] += 50.0
    torch.testing.assert_close(bi(x3, key_mask=km).output[1, :6], out[1, :6])  # padded keys have no effect


def test_gated_attention_gradcheck():
    torch.manual_seed(0)
    mod = GatedAttention(4, 2, causal=True).double()
    x = rand(1, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: mod(x).output, (x,))
    assert torch.autograd.gradcheck(lambda w: torch.nn.functional.linear(x, w, mod.gate_proj.bias).sum() + mod(x).output.sum(),
                                    (mod.gate_proj.weight,))


# ----------------------------------------------------------------------------- Hua et al.: GAU


def gau_reference(mod: GatedAttentionUnit, x, key_mask=None, causal=False):
    """Per-example loop, Q and K from Z by scale and offset, relu(.)^2 written as max(0, .) * max(0, .)."""
    outs, kernels = [], []
    for b in range(x.shape[0]):
        xb = x[b]
        n_real = x.shape[1] if key_mask is None else int(key_mask[b].sum())
        proj = xb @ mod.uvz.weight.T + mod.uvz.bias
        proj = proj * torch.sigmoid(proj)
        u, v, z = proj[:, : mod.e], proj[:, mod.e : 2 * mod.e], proj[:, 2 * mod.e :]
        q = z * mod.gamma[0] + mod.beta[0]
        k = z * mod.gamma[1] + mod.beta[1]
        s = torch.einsum("is,js->ij", q, k) / n_real
        a = torch.clamp(s, min=0) * torch.clamp(s, min=0)
        if causal:
            a = torch.tril(a)
        if key_mask is not None:
            a = a * key_mask[b][None, :].to(a.dtype)
        outs.append((u * (a @ v)) @ mod.out_proj.weight.T + mod.out_proj.bias)
        kernels.append(a)
    return torch.stack(outs), torch.stack(kernels)[:, None]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_gau_matches_explicit_formula(causal, padded):
    torch.manual_seed(0)
    mod = GatedAttentionUnit(8, expansion=2, qk_dim=6, causal=causal).double()
    with torch.no_grad():
        mod.gamma.normal_()  # spread the scales so that some scores are negative (relu active and inactive)
        mod.beta.normal_(std=0.5)
    x = rand(2, 6, 8, dtype=torch.float64)
    km = padding_mask([6, 4], 6) if padded else None
    y, a = mod(x, key_mask=km, need_weights=True)
    y_ref, a_ref = gau_reference(mod, x, km, causal)
    assert (y - y_ref).abs().max() < 1e-12 and (a - a_ref).abs().max() < 1e-12
    assert (a == 0).any() and (a > 0).any()
    up = torch.randn_like(y)
    params = [x, *mod.parameters()]
    for g1, g2 in zip(torch.autograd.grad(y, params, up), torch.autograd.grad(y_ref, params, up), strict=True):
        assert (g1 - g2).abs().max() < 1e-11


def test_gau_properties_and_gradcheck():
    torch.manual_seed(0)
    mod = GatedAttentionUnit(6, qk_dim=4, causal=True).double()
    x = rand(2, 8, 6, dtype=torch.float64, grad=False)
    y = mod(x).output
    x2 = x.clone()
    x2[:, 5:] += 3.0
    torch.testing.assert_close(mod(x2).output[:, :5], y[:, :5])
    bi = GatedAttentionUnit(6, qk_dim=4).double()
    km = padding_mask([8, 5], 8)
    out = bi(x, key_mask=km).output
    x3 = x.clone()
    x3[1, 5:] = 7.0
    torch.testing.assert_close(bi(x3, key_mask=km).output[1, :5], out[1, :5])
    # with the mask, the padded example equals the same example cut to its real length
    torch.testing.assert_close(bi(x[1:, :5]).output[0], out[1, :5])
    xs = rand(1, 4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: bi(x).output, (xs,))
    assert mod.uvz.weight.shape == (2 * 12 + 4, 6)
    assert GatedAttentionUnit(300).s == 128  # the paper's s = 128


# ----------------------------------------------------------------------------- Ilse et al.: gated MIL pooling


@pytest.mark.parametrize("gated", [True, False])
def test_mil_pooling_matches_explicit_formula(gated):
    torch.manual_seed(0)
    pool = GatedMILPooling(5, 7, gated=gated).double()
    h = rand(3, 6, 5, dtype=torch.float64)
    mask = padding_mask([6, 2, 4], 6)
    z, a = pool(h, key_mask=mask)
    for b in range(3):
        k = int(mask[b].sum())
        scores = []
        for i in range(k):
            hid = torch.tanh(pool.V.weight @ h[b, i] + pool.V.bias)
            if gated:
                hid = hid * torch.sigmoid(pool.U.weight @ h[b, i] + pool.U.bias)
            scores.append(pool.w.weight[0] @ hid)
        e = torch.exp(torch.stack(scores))
        a_ref = e / e.sum()
        torch.testing.assert_close(a[b, :k], a_ref, atol=1e-12, rtol=1e-12)
        assert (a[b, k:] == 0).all()
        torch.testing.assert_close(z[b], (a_ref[:, None] * h[b, :k]).sum(0), atol=1e-12, rtol=1e-12)
    small = rand(2, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h: pool(h)[0], (small,))


def test_mil_pooling_is_permutation_invariant_and_ignores_padding():
    torch.manual_seed(0)
    pool = GatedMILPooling(4, 8)
    h = rand(2, 7, 4, grad=False)
    mask = padding_mask([7, 5], 7)
    z, a = pool(h, key_mask=mask)
    perm = torch.randperm(7)
    z2, a2 = pool(h[:, perm], key_mask=mask[:, perm])
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(a2, a[:, perm])
    h2 = h.clone()
    h2[1, 5:] = 100.0
    torch.testing.assert_close(pool(h2, key_mask=mask)[0], z)
    empty = pool(h, key_mask=torch.zeros(2, 7, dtype=torch.bool))
    assert torch.equal(empty.output, torch.zeros(2, 4)) and not empty.weights.isnan().any()


def test_bag_task_and_mil_model_learn():
    task = BagTask()
    g = torch.Generator().manual_seed(0)
    batch = task.sample(200, g)
    assert batch["x"].shape == (200, 15, 16) and batch["key_mask"].shape == (200, 15)
    assert torch.equal(batch["y"].bool(), batch["key"].any(-1))  # label = "a key instance is in the bag"
    assert not (batch["key"] & ~batch["key_mask"]).any()
    assert 0.35 < batch["y"].mean() < 0.65
    sizes = batch["key_mask"].sum(-1)
    assert sizes.min() >= 5 and sizes.max() <= 15
    assert (batch["x"][~batch["key_mask"]] == 0).all()
    torch.manual_seed(0)
    model = MILModel(task.dim)
    hist = train(model, task.sample, mil_loss, steps=80, batch_size=32, lr=3e-3, progress=False)
    assert hist.metrics["acc"][-1] > 0.8
    test = task.sample(256, torch.Generator().manual_seed(9))
    with torch.no_grad():
        _, a = model(test["x"], test["key_mask"])
    pos = test["y"].bool()
    key_weight = (a * test["key"]).sum(-1)[pos]
    chance = (test["key"].sum(-1) / test["key_mask"].sum(-1))[pos]
    assert key_weight.mean() > chance.mean()  # the pooling looks at the key instances


# ----------------------------------------------------------------------------- the sink experiment pieces


def test_first_token_mass():
    w = torch.zeros(1, 1, 4, 4)
    w[..., 0, 0] = 1
    w[..., 1:, 0] = torch.tensor([0.5, 0.2, 0.8])
    torch.testing.assert_close(first_token_mass(w), torch.tensor([[0.5]]))
    torch.testing.assert_close(first_token_mass(w, first_query=0), torch.tensor([[0.625]]))
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        first_token_mass(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="first_query"):
        first_token_mass(w, first_query=4)
    with pytest.raises(TypeError, match="weights"):
        first_token_mass([[1.0]])


def test_sink_lm_is_causal_and_learns():
    task = CopyLMTask(vocab=8, segment=4)
    x = task.sample(5, torch.Generator().manual_seed(0))["x"]
    assert x.shape == (5, 9) and (x[:, 0] == 0).all() and torch.equal(x[:, 1:5], x[:, 5:])
    torch.manual_seed(0)
    lm = SinkLM(task.vocab, task.length, embed_dim=16, num_heads=2, layers=2)
    logits, ws = lm(x, need_weights=True)
    assert logits.shape == (5, 9, 8) and len(ws) == 2 and ws[0].shape == (5, 2, 9, 9)
    assert torch.allclose(ws[1].sum(-1), torch.ones(5, 2, 9)) and (ws[1].triu(1) == 0).all()
    x2 = x.clone()
    x2[:, 6:] = (x2[:, 6:] + 1) % 8
    torch.testing.assert_close(lm(x2)[0][:, :6], logits[:, :6])
    lm.set_gate_offset(math.inf)
    assert all(layer.gate_offset == math.inf for layer in lm.attn)
    with pytest.raises(TypeError, match="integer tensor"):
        lm(x.float())
    with pytest.raises(ValueError, match="1 <= seq <= 9"):
        lm(torch.zeros(2, 12, dtype=torch.long))
    hist = train(lm, task.sample, lm_loss, steps=40, batch_size=32, lr=1e-2, progress=False)
    assert hist.loss[-1] < hist.loss[0]


# ----------------------------------------------------------------------------- bad input, empty batch, registry


@pytest.mark.parametrize("make", [lambda: GatedAttention(8, 2), lambda: GatedAttentionUnit(8)])
@pytest.mark.parametrize("bad, err, match", [
    ([[1.0] * 8], TypeError, r"x must be a torch.Tensor of shape \(batch, seq, embed_dim=8\), got list"),
    (torch.ones(2, 5, 8, dtype=torch.long), TypeError, "floating-point"),
    (torch.ones(5, 8), ValueError, r"\(batch, seq, embed_dim=8\), got 2-D"),
    (torch.ones(2, 5, 6), ValueError, r"got \(2, 5, 6\)"),
    (torch.ones(2, 0, 8), ValueError, "empty sequence"),
])
def test_sequence_layers_bad_input(make, bad, err, match):
    with pytest.raises(err, match=match):
        make()(bad)


def test_bad_masks_and_arguments():
    with pytest.raises(ValueError, match="key_mask"):
        GatedAttention(8, 2)(torch.ones(2, 5, 8), key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_mask"):
        GatedAttentionUnit(8)(torch.ones(2, 5, 8), key_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="gate must be"):
        GatedAttention(8, 2, gate="sigmoid")
    with pytest.raises(ValueError, match="divisible"):
        GatedAttention(9, 2)
    with pytest.raises(ValueError, match="qk_dim"):
        GatedAttentionUnit(8, qk_dim=0)
    pool = GatedMILPooling(4)
    with pytest.raises(TypeError, match=r"h must be a torch.Tensor of shape \(batch, instances, in_dim=4\)"):
        pool([[0.0] * 4])
    with pytest.raises(ValueError, match=r"in_dim=4\), got \(2, 3, 5\)"):
        pool(torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match=r"got 2-D"):
        pool(torch.ones(3, 4))
    with pytest.raises(ValueError, match="key_mask"):
        pool(torch.ones(2, 3, 4), key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError):  # the mask is keyword-only, and called key_mask
        pool(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_size"):
        BagTask(min_size=6, max_size=5)


def test_empty_batch():
    x = torch.zeros(0, 5, 8)
    out = GatedAttention(8, 2)(x, need_weights=True)
    assert out.output.shape == (0, 5, 8) and out.weights.shape == (0, 2, 5, 5)
    out = GatedAttentionUnit(8)(x, need_weights=True)
    assert out.output.shape == (0, 5, 8) and out.weights.shape == (0, 1, 5, 5)
    z, a = GatedMILPooling(8)(x)
    assert z.shape == (0, 8) and a.shape == (0, 5)


def test_registry_entries_build_and_own_task():
    for name in ("gated", "gau"):
        m = registry.get(name)
        assert m.chapter == 20 and m.data == "sequence"
        layer = m.build(16, 4)
        out = layer(torch.randn(2, 6, 16), need_weights=True)
        assert out.output.shape == (2, 6, 16) and out.weights.shape[-2:] == (6, 6)
    m = registry.get("gated_mil")
    assert m.chapter == 20 and m.data == "set" and m.build is None and m.cls is GatedMILPooling
    own = own_task("gated_mil", "quick")
    hist = train(own.model, own.sample, own.loss, steps=own.steps, batch_size=own.batch_size, lr=own.lr, progress=False)
    assert len(hist.loss) > 0
    g = torch.Generator().manual_seed(0)
    for size in own.sizes:
        z, a = own.layer(*own.inputs(size, g))
        assert z.shape == (8, 64) and a.shape == (8, size)
    w = own.weights(own.model, own.sample(4, g))
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    with pytest.raises(ValueError, match="task size"):
        mil_task("huge")


# ----------------------------------------------------------------------------- one attention interface (issue 23)


def test_gated_attention_is_attention_base_with_tensor_weights_and_is_causal():
    """The weights slot is always a (B, h, n, n) tensor (the gate comes in GatedOutput); is_causal overrides causal."""
    torch.manual_seed(0)
    mod = GatedAttention(8, 2).double()
    assert isinstance(mod, AttentionBase) and mod.kernel == "sdpa"
    x = rand(2, 6, 8, dtype=torch.float64, grad=False)
    y, w = mod(x, need_weights=True)
    assert isinstance(w, torch.Tensor) and w.shape == (2, 2, 6, 6)
    res = mod(x, return_gate=True)
    assert torch.equal(res.output, y) and torch.equal(res.weights, w) and res.gate.shape == (2, 2, 6, 4)
    y_c, w_c = mod(x, is_causal=True, need_weights=True)
    y_ref, w_ref = gated_reference(mod, x, causal=True)
    torch.testing.assert_close(y_c, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w_c, w_ref, atol=1e-12, rtol=1e-12)
    # the projections are MultiHeadAttention's: its state dict loads (the gate aside)
    plain = MultiHeadAttention(8, 2).double()
    plain.load_state_dict({k: v for k, v in mod.state_dict().items() if not k.startswith("gate_proj")})


def test_gau_is_causal_keyword_and_mil_key_mask():
    torch.manual_seed(0)
    gau = GatedAttentionUnit(6, qk_dim=4).double()
    x = rand(2, 7, 6, dtype=torch.float64, grad=False)
    causal = GatedAttentionUnit(6, qk_dim=4, causal=True).double()
    causal.load_state_dict(gau.state_dict())
    torch.testing.assert_close(gau(x, is_causal=True).output, causal(x).output, atol=0, rtol=0)
    torch.testing.assert_close(causal(x, is_causal=False).output, gau(x).output, atol=0, rtol=0)
    with pytest.raises(TypeError):
        gau(x, torch.ones(2, 7, dtype=torch.bool))  # key_mask is keyword-only


# ----------------------------------------------------------------------------- issue 17: product bags, sink measures


def test_product_bags_keys_need_a_product():
    task = ProductBagTask()
    b = task.sample(4000, torch.Generator().manual_seed(0))
    x, key, mask = b["x"], b["key"], b["key_mask"]
    prod = x[..., 0] * x[..., 1]
    assert (prod[key] >= 1).all()  # keys: x1 x2 >= 1
    assert (prod[mask & ~key] <= task.threshold).all()  # no real non-key is a key by chance
    assert torch.equal(b["y"].bool(), key.any(-1)) and not (key & ~mask).any()
    assert 0.45 < b["y"].mean() < 0.55 and (x[~mask] == 0).all()
    # keys are symmetric under x -> -x: a linear score has no mean shift on them, but the product does
    keys, others = x[key], x[mask & ~key]
    assert keys[:, :2].mean(0).abs().max() < 0.1
    assert (keys[:, :2].abs() >= 1).all() and (others[:, :2].abs() > 1).all(-1).float().mean() > 0.05
    with pytest.raises(ValueError, match="threshold"):
        ProductBagTask(threshold=2.0)


def test_mil_model_linear_encoder_and_runner():
    with pytest.raises(ValueError, match="encoder"):
        MILModel(8, encoder="conv")  # type: ignore[arg-type]
    m = MILModel(8, hidden=16, encoder="linear")
    assert isinstance(m.encoder, torch.nn.Linear)  # no non-linearity before the pooling
    task = ProductBagTask()
    runs = mil_runs(task, [0, 1], steps=3, hidden=8, attn_dim=4)
    assert [(r.arm, r.seed) for r in runs] == [("gated", 0), ("plain", 0), ("gated", 1), ("plain", 1)]
    assert runs[0].model.pool.gated and not runs[1].model.pool.gated and len(runs[0].history.loss) >= 1


def test_sink_measures():
    w = torch.zeros(1, 1, 4, 4)
    w[..., 0, 0] = 1
    w[..., 1:, 0] = torch.tensor([0.5, 0.2, 0.8])
    torch.testing.assert_close(first_token_mass(w, 1, 3), torch.tensor([[0.35]]))
    with pytest.raises(ValueError, match="end_query"):
        first_token_mass(w, 2, 2)
    # copy: m = 2, n = 4; queries 2, 3 read keys 1, 2
    c = torch.zeros(2, 4, 4)
    c[:, 2, 1], c[:, 3, 2] = 1.0, 0.5
    torch.testing.assert_close(copy_read_weight(c, 2), torch.tensor([0.75, 0.75]))
    with pytest.raises(ValueError, match="segment"):
        copy_read_weight(c, 3)
    # a gate that closes exactly where the head sinks: correlation -1
    g = torch.rand(3, 2, 5, 1, generator=torch.Generator().manual_seed(0))
    ws = torch.zeros(3, 2, 5, 5)
    ws[..., 0] = 1 - g[..., 0]
    assert gate_sink_correlation(g.expand(3, 2, 5, 4), ws) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="share"):
        gate_sink_correlation(g, ws[:, :1])


def test_sink_runs_and_gate_values():
    task = CopyLMTask(vocab=8, segment=4)
    runs = sink_runs(task, [3], steps=2, embed_dim=16, num_heads=2)
    assert [(r.arm, r.seed) for r in runs] == [("gated", 3), ("ungated", 3)]
    x = task.sample(4, torch.Generator().manual_seed(0))["x"][:, :-1]
    gated, plain = (gate_values(r.model, x) for r in runs)
    assert len(gated) == 2 and gated[0].shape == (4, 2, 8, 8)
    assert ((gated[0] > 0) & (gated[0] < 1)).all() and all(bool((g == 1).all()) for g in plain)
    runs[0].model.set_gate_offset(math.inf)
    assert all(bool((g == 1).all()) for g in gate_values(runs[0].model, x))
    # same initialisation seed: the shared parameters start equal (a 2-step run leaves them close)
    assert torch.allclose(runs[0].model.embed.weight, runs[1].model.embed.weight, atol=0.1)
    assert runs[0].model.pos.std() > 0.5  # positions start at N(0, 1)
