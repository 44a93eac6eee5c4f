"""Chapter 12: frequency-domain attention (FNet mixing, FEDformer FEB-f and FEA-f) against independent references."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from attn import registry
from attn.benchmark import peak_memory
from attn.frequency import (
    FourierMixing,
    FrequencyEnhancedAttention,
    FrequencyEnhancedBlock,
    dft_matrix,
    fourier_mix,
    fourier_mix_dense,
    mode_filter_matrix,
    select_modes,
)
from attn.masks import padding_mask


def rand(*shape, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


# ----------------------------------------------------------------------------- explicit DFT references (no FFT)


def _dft_rows(k: torch.Tensor, n: int, sign: float) -> torch.Tensor:
    """``exp(sign * 2 pi i k t / n)`` for kept modes ``k`` and positions ``t``: ``(M, n)`` complex128."""
    t = torch.arange(n, dtype=torch.float64)
    ang = sign * 2 * math.pi * torch.outer(k.to(torch.float64), t) / n
    return torch.polar(torch.ones_like(ang), ang)


def _inverse_kept(ym: torch.Tensor, k: torch.Tensor, n: int, mode_dim: int) -> torch.Tensor:
    """Real signal from kept modes: ``(1/n) sum_k c_k Re(Y_k e^{+2 pi i k t/n})`` (c_k = 1 at k = 0, else 2)."""
    c = torch.where(k == 0, 1.0, 2.0).to(torch.float64)
    basis = _dft_rows(k, n, +1.0) * c[:, None]  # (M, n)
    ym = ym.movedim(mode_dim, -1)  # (..., M)
    return (ym @ basis.to(ym.dtype)).real.movedim(-1, mode_dim) / n


def feb_reference(mod: FrequencyEnhancedBlock, x, key_mask=None):
    """FEB-f with explicit DFT sums over the kept modes, float64."""
    B, n, E = x.shape
    q = x @ mod.in_proj.weight.T + mod.in_proj.bias
    if key_mask is not None:
        q = q * key_mask[..., None]
    q = q.reshape(B, n, mod.num_heads, mod.head_dim).to(torch.complex128)
    k = mod.mode_index(n)
    qm = torch.einsum("mt,bthi->bmhi", _dft_rows(k, n, -1.0), q)  # forward DFT at the kept modes
    r = torch.complex(mod.weight_real, mod.weight_imag)[:, : k.numel()].to(torch.complex128)
    ym = torch.einsum("bmhi,hmio->bmho", qm, r)
    y = _inverse_kept(ym, k, n, mode_dim=1)  # (B, n, h, d)
    return y.reshape(B, n, E) @ mod.out_proj.weight.T + mod.out_proj.bias


def fea_reference(mod: FrequencyEnhancedAttention, x, key_mask=None):
    """FEA-f with explicit orthonormal DFT sums, float64."""
    B, n, E = x.shape
    h, d = mod.num_heads, mod.head_dim
    qkv = x @ mod.qkv.weight.T + mod.qkv.bias
    if key_mask is not None:  # padding: zero projected vectors (as FEB-f), no bias in the spectrum
        qkv = qkv * key_mask[..., None]
    qkv = qkv.reshape(B, n, 3, h, d).permute(2, 0, 3, 1, 4)  # (3, B, h, n, d)
    k = mod.mode_index(n)
    fwd = _dft_rows(k, n, -1.0) / math.sqrt(n)
    qm, km, vm = (torch.einsum("mt,bhtd->bhmd", fwd, t.to(torch.complex128)) for t in qkv)
    w = (torch.einsum("bhmd,bhld->bhml", qm, km).abs() / math.sqrt(d)).softmax(-1)
    ym = w.to(torch.complex128) @ vm  # (B, h, M, d)
    y = _inverse_kept(ym, k, n, mode_dim=2) * math.sqrt(n)  # ortho inverse: 1/sqrt(n) instead of 1/n
    return y.permute(0, 2, 1, 3).reshape(B, n, E) @ mod.out_proj.weight.T + mod.out_proj.bias, w


# ----------------------------------------------------------------------------- FNet mixing


@pytest.mark.parametrize("tpu_dft_matrices", [False, True])
def test_fnet_matches_transformers_fourier_layer(tpu_dft_matrices):
    """transformers' FNetBasicFourierTransform (random config, no downloads): its FFT path and its DFT-matrix path."""
    from transformers import FNetConfig
    from transformers.models.fnet.modeling_fnet import FNetBasicFourierTransform

    n, e = 12, 16
    cfg = FNetConfig(hidden_size=e, use_tpu_fourier_optimizations=tpu_dft_matrices, tpu_short_seq_length=n, max_position_embeddings=64)
    ref_layer = FNetBasicFourierTransform(cfg)
    x = rand(3, n, e, grad=True)
    ours = FourierMixing(e)(x).output
    ref = ref_layer(x)[0]
    assert ours.shape == ref.shape == (3, n, e)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    up = rand(3, n, e, seed=1)
    (g1,) = torch.autograd.grad(ours, x, up)
    (g2,) = torch.autograd.grad(ref, x, up)
    assert (g1 - g2).abs().max() <= 1e-4 * g2.abs().max()


@pytest.mark.parametrize("norm", ["backward", "ortho"])
def test_fnet_equals_dft_matrix_products(norm):
    x = rand(2, 9, 6, dtype=torch.float64, grad=True)
    fast = fourier_mix(x, norm)
    dense = fourier_mix_dense(x, norm)
    f9, f6 = dft_matrix(9), dft_matrix(6)
    explicit = (f9 @ x.to(torch.complex128) @ f6).real / (math.sqrt(54) if norm == "ortho" else 1.0)
    torch.testing.assert_close(fast, dense, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fast, explicit, atol=1e-12, rtol=1e-12)
    up = torch.randn_like(fast)
    torch.testing.assert_close(torch.autograd.grad(fast, x, up)[0], torch.autograd.grad(dense, x, up)[0], atol=1e-12, rtol=1e-12)


def test_dft_matrix_is_fft_and_unitary_up_to_n():
    n = 11
    f = dft_matrix(n)
    x = torch.randn(n, dtype=torch.complex128)
    torch.testing.assert_close(f @ x, torch.fft.fft(x))
    torch.testing.assert_close(f @ f.conj().T, n * torch.eye(n, dtype=torch.complex128))


def test_fnet_gradcheck_and_no_parameters():
    x = rand(2, 5, 3, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda x: fourier_mix(x, "ortho"), (x,))
    assert sum(p.numel() for p in FourierMixing(3).parameters()) == 0


def test_fnet_ortho_preserves_the_norm_of_the_full_transform():
    # the real part of a unitary transform of a real input: ||Re(Fx)||^2 = (||x||^2 + <x, flip(x)>) / 2 -- here just a bound
    x = rand(1, 32, 8, dtype=torch.float64)
    y = fourier_mix(x, "ortho")
    assert y.norm() <= x.norm() + 1e-9
    assert y.norm() > 0.3 * x.norm()


# ----------------------------------------------------------------------------- mode selection and the filter matrix


def test_select_modes():
    torch.testing.assert_close(select_modes(64, 5, "lowest"), torch.arange(5))
    assert select_modes(10, 99, "lowest").tolist() == [0, 1, 2, 3, 4]  # min(modes, n // 2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = select_modes(100, 7, "random", g1), select_modes(100, 7, "random", g2)
    assert torch.equal(a, b) and a.numel() == 7 and len(set(a.tolist())) == 7
    assert (a >= 0).all() and (a < 50).all() and torch.equal(a, a.sort().values)
    assert select_modes(1, 4).tolist() == [0]  # at least the mean survives


def test_mode_filter_matrix_is_irfft_of_kept_modes_and_a_projection():
    n = 16
    idx = torch.tensor([0, 3, 7])
    p = mode_filter_matrix(n, idx)
    x = torch.randn(n, 5, dtype=torch.float64)
    xf = torch.fft.rfft(x, dim=0)
    kept = torch.zeros_like(xf)
    kept[idx] = xf[idx]
    torch.testing.assert_close(p @ x, torch.fft.irfft(kept, n=n, dim=0))
    torch.testing.assert_close(p @ p, p)  # keeping the same modes twice changes nothing
    torch.testing.assert_close(p, p.T)
    torch.testing.assert_close(mode_filter_matrix(n, torch.arange(n // 2 + 1)), torch.eye(n, dtype=torch.float64))


# ----------------------------------------------------------------------------- FEB-f


@pytest.mark.parametrize("mode_select", ["random", "lowest"])
@pytest.mark.parametrize("n", [20, 7])
def test_feb_matches_explicit_dft(mode_select, n):
    torch.manual_seed(0)
    mod = FrequencyEnhancedBlock(8, 2, modes=3, mode_select=mode_select, seed=4).double()
    with torch.no_grad():  # larger weights than the paper's tiny init, so that errors would show
        mod.weight_real.normal_()
        mod.weight_imag.normal_()
    x = rand(2, n, 8, dtype=torch.float64, grad=True)
    km = padding_mask([n, n - 3], n)
    out = mod(x, key_mask=km).output
    ref = feb_reference(mod, x, km)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    up = torch.randn_like(out)
    params = [x, *mod.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_feb_gradcheck():
    mod = FrequencyEnhancedBlock(4, 2, modes=2).double()
    x = rand(2, 6, 4, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda x: mod(x).output, (x,))


def test_feb_is_shift_equivariant_and_ignores_unkept_modes():
    torch.manual_seed(0)
    mod = FrequencyEnhancedBlock(6, 3, modes=3, mode_select="random", seed=1).double()
    x = rand(1, 24, 6, dtype=torch.float64)
    out = mod(x).output
    # a per-mode linear map is a circular convolution in time: rolling the input rolls the output
    torch.testing.assert_close(mod(x.roll(5, dims=1)).output, out.roll(5, dims=1))
    # a sinusoid at a frequency that is not kept produces nothing (with the biases off)
    lin = FrequencyEnhancedBlock(6, 3, modes=3, seed=1, bias=False).double()
    kept = set(lin.mode_index(24).tolist())
    other = next(k for k in range(1, 12) if k not in kept)
    t = torch.arange(24, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * other * t / 24)[None, :, None] * torch.randn(1, 1, 6, dtype=torch.float64)
    assert lin(wave).output.abs().max() < 1e-12
    k0 = min(kept - {0}) if kept - {0} else 0
    wave_kept = torch.cos(2 * math.pi * k0 * t / 24)[None, :, None] * torch.randn(1, 1, 6, dtype=torch.float64)
    assert lin(wave_kept).output.abs().max() > 1e-6


def test_feb_mode_choice_is_fixed_per_length():
    mod = FrequencyEnhancedBlock(8, 2, modes=4, seed=0)
    assert torch.equal(mod.mode_index(64), mod.mode_index(64))
    assert mod.mode_index(64).numel() == 4 and mod.mode_index(6).numel() == 3
    other = FrequencyEnhancedBlock(8, 2, modes=4, seed=1)
    assert not all(torch.equal(mod.mode_index(n), other.mode_index(n)) for n in (64, 128, 256))


# ----------------------------------------------------------------------------- FEA-f


@pytest.mark.parametrize("mode_select", ["random", "lowest"])
def test_fea_matches_explicit_dft(mode_select):
    torch.manual_seed(0)
    mod = FrequencyEnhancedAttention(8, 2, modes=4, mode_select=mode_select, seed=2).double()
    n = 19
    x = rand(2, n, 8, dtype=torch.float64, grad=True)
    km = padding_mask([n, 12], n)
    out = mod(x, key_mask=km).output
    ref, w_ref = fea_reference(mod, x, km)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    w = mod.mode_weights(x, key_mask=km)
    torch.testing.assert_close(w, w_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 4, dtype=torch.float64))
    up = torch.randn_like(out)
    params = [x, *mod.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_fea_gradcheck():
    mod = FrequencyEnhancedAttention(4, 2, modes=3).double()
    x = rand(1, 8, 4, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda x: mod(x).output, (x,))


# ----------------------------------------------------------------------------- properties shared by the three


def _layers():
    torch.manual_seed(0)
    return [FourierMixing(8), FrequencyEnhancedBlock(8, 2, modes=4), FrequencyEnhancedAttention(8, 2, modes=4)]


@pytest.mark.parametrize("layer", _layers(), ids=["fnet", "feb", "fea"])
def test_padding_content_has_no_effect(layer):
    x = rand(2, 15, 8)
    km = padding_mask([15, 9], 15)
    out = layer(x, key_mask=km).output
    x2 = x.clone()
    x2[1, 9:] = 100 * torch.randn(6, 8)
    torch.testing.assert_close(layer(x2, key_mask=km).output, out)


@pytest.mark.parametrize("layer", _layers(), ids=["fnet", "feb", "fea"])
def test_batched_equals_per_example_and_empty_batch(layer):
    x = rand(3, 13, 8)
    km = padding_mask([13, 7, 2], 13)
    out = layer(x, key_mask=km).output
    per = torch.cat([layer(x[i : i + 1], key_mask=km[i : i + 1]).output for i in range(3)])
    torch.testing.assert_close(out, per, atol=1e-5, rtol=1e-5)
    empty = layer(torch.randn(0, 13, 8))
    assert empty.output.shape == (0, 13, 8) and empty.weights is None
    assert torch.isfinite(layer(rand(1, 1, 8)).output).all()  # a single token works


@pytest.mark.parametrize("layer", _layers(), ids=["fnet", "feb", "fea"])
@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([[0.0] * 8], TypeError, r"x must be a torch.Tensor of shape \(batch, seq, embed_dim=8\), got list"),
        (torch.ones(2, 5, 8, dtype=torch.long), TypeError, "floating-point"),
        (torch.ones(5, 8), ValueError, r"x must have shape \(batch, seq, embed_dim=8\), got 2-D"),
        (torch.ones(2, 5, 7), ValueError, r"last dimension 7 != 8"),
        (torch.ones(2, 0, 8), ValueError, "seq >= 1"),
    ],
)
def test_bad_input(layer, bad, error, match):
    with pytest.raises(error, match=match):
        layer(bad)


def test_bad_arguments():
    x = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool"):
        FourierMixing(8)(x, key_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(batch=2, n=5\)"):
        FrequencyEnhancedBlock(8, 2)(x, key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="norm must be"):
        FourierMixing(8, norm="forward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="modes must be an int >= 1"):
        FrequencyEnhancedBlock(8, 2, modes=0)
    with pytest.raises(ValueError, match="mode_select must be 'random' or 'lowest'"):
        FrequencyEnhancedAttention(8, 2, mode_select="highest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        FrequencyEnhancedBlock(10, 3)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        dft_matrix(0)


# ----------------------------------------------------------------------------- cost and registry


def test_no_quadratic_memory():
    n, e = 4096, 32
    x = torch.randn(1, n, e)
    feb = FrequencyEnhancedBlock(e, 2, modes=16)
    with torch.no_grad():
        for fn in (lambda: fourier_mix(x), lambda: feb(x)):
            used = peak_memory(fn, "cpu")
            assert 0 < used < n * n * 4 / 16, f"peak {used} bytes vs n^2 fp32 = {n * n * 4}"


@pytest.mark.parametrize("name, cls", [("fnet", FourierMixing), ("fedformer", FrequencyEnhancedBlock),
                                       ("fedformer-attention", FrequencyEnhancedAttention)])
def test_registry(name, cls):
    mech = registry.get(name)
    assert mech.chapter == 12 and mech.cls is cls and "log" in mech.complexity and mech.data == "sequence"
    layer = mech.build(32, 4)
    x = torch.randn(2, 19, 32)
    out, w = layer(x, need_weights=True)
    assert out.shape == (2, 19, 32) and w.shape[0] == 2 and w.shape[-2:] == (19, 19)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert (w >= 0).all() and layer(x).weights is None


# ----------------------------------------------------------------------------- influence weights (need_weights=True)


def _jacobian_block_norms(fn, n, width):
    """``||d y_t / d x_s||_F`` from the autograd Jacobian of ``fn: (n, width) -> (n, width')``, rows normalised."""
    x = torch.randn(n, width, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(fn, x)  # (n, w', n, w)
    a = jac.permute(0, 2, 1, 3).flatten(-2).norm(dim=-1)  # (n, n)
    return a / a.sum(-1, keepdim=True)


def test_fnet_influence_is_the_jacobian_block_norm():
    n, e = 10, 6
    ref = _jacobian_block_norms(lambda x: fourier_mix(x[None])[0], n, e)
    _out, w = FourierMixing(e)(torch.randn(2, n, e, dtype=torch.float64), need_weights=True)
    assert w.shape == (2, 1, n, n)
    torch.testing.assert_close(w[0, 0], ref)
    assert (w - 1 / n).abs().max() < 0.5 / n  # nearly uniform: every token reads every token


def test_feb_influence_is_the_jacobian_block_norm():
    torch.manual_seed(0)
    mod = FrequencyEnhancedBlock(6, 2, modes=3, seed=3).double()
    with torch.no_grad():
        mod.weight_real.normal_()
        mod.weight_imag.normal_()
    n = 11
    for h in range(2):
        def core(q, h=h):  # one head's frequency-domain core, (n, d) -> (n, d)
            full = torch.zeros(1, n, 2, 3, dtype=torch.float64)
            full[0, :, h] = q
            return mod.mix_modes(full)[0, :, h]

        ref = _jacobian_block_norms(core, n, 3)
        torch.testing.assert_close(mod.influence(n)[h], ref)
    _, w = mod(torch.randn(2, n, 6, dtype=torch.float64), key_mask=padding_mask([n, 7], n), need_weights=True)
    assert w.shape == (2, 2, n, n) and (w[1, :, :, 7:] == 0).all() and (w[1, :, 7:] == 0).all()
    torch.testing.assert_close(w[1, :, :7].sum(-1), torch.ones(2, 7, dtype=torch.float64))


def test_fea_token_mixing_reproduces_the_core():
    torch.manual_seed(0)
    mod = FrequencyEnhancedAttention(8, 2, modes=4, seed=5).double()
    n = 14
    x = torch.randn(2, n, 8, dtype=torch.float64)
    w, vs, vf, idx, _ = mod._modes(x, None)
    v = torch.fft.irfft(vf, n=n, dim=-2, norm="ortho")  # the values back in time: (B, h, n, d)
    yf = vf.new_zeros(vf.shape).index_copy(-2, idx, w.to(vs.dtype) @ vs)
    y = torch.fft.irfft(yf, n=n, dim=-2, norm="ortho")
    t = mod.token_mixing(w, idx, n)  # (B, h, n, n)
    torch.testing.assert_close(t @ v, y)
    _, weights = mod(x, need_weights=True)
    torch.testing.assert_close(weights, t.abs() / t.abs().sum(-1, keepdim=True))


# ----------------------------------------------------------------------------- one padding rule; half precision (issue 15)


def _zero_projection_input(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The token ``x_0`` with ``W x_0 + b = 0`` (``W`` square, invertible)."""
    return torch.linalg.solve(weight, -bias)


@pytest.mark.parametrize("kind", ["feb", "fea"])
def test_a_padding_position_is_a_zero_projected_vector(kind):
    """FEB-f and FEA-f treat padding alike: as a position whose projected vectors (bias included) are zero.

    On the original code FEA-f zeroed ``x`` before its projections, so the padding still put the
    biases into the spectrum and the real outputs differed from this reference by O(0.1).
    """
    torch.manual_seed(0)
    e, n = 8, 13
    if kind == "feb":
        layer = FrequencyEnhancedBlock(e, 2, modes=4).double()
        w, b = layer.in_proj.weight, layer.in_proj.bias
    else:
        layer = FrequencyEnhancedAttention(e, 2, modes=4).double()
        with torch.no_grad():  # tie W_Q = W_K = W_V and the biases, so that one token zeroes all three projections
            w3, b3 = layer.qkv.weight.view(3, e, e), layer.qkv.bias.view(3, e)
            b3[0] *= 10  # large biases: a leak of them is obvious
            w3[1:], b3[1:] = w3[0].clone(), b3[0].clone()
            w, b = w3[0].clone(), b3[0].clone()
    km = padding_mask([n, 8], n)
    km[1, 2] = False  # second row: padding at the end and a hole
    x = rand(2, n, e, dtype=torch.float64)
    with torch.no_grad():
        x0 = _zero_projection_input(w, b)
        assert float((w @ x0 + b).abs().max()) < 1e-10
        masked = layer(x, key_mask=km).output
        zeros = layer(torch.where(km[..., None], x, x0), key_mask=None).output  # padding = a zero projected vector
    torch.testing.assert_close(masked[km], zeros[km], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer", _layers(), ids=["fnet", "feb", "fea"])
def test_bfloat16_in_bfloat16_out_close_to_float32(layer):
    """torch.fft has no bfloat16 on the CPU (the original raised 'Unsupported dtype BFloat16'): transform in float32, cast back."""
    x = rand(2, 12, 8).to(torch.bfloat16)
    km = padding_mask([12, 9], 12)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    with torch.no_grad():
        out = low(x, key_mask=km, need_weights=True)
        ref = copy.deepcopy(low).float()(x.float(), key_mask=km).output  # the same (bf16-rounded) weights and input, in float32
    assert out.output.dtype == torch.bfloat16 and out.weights.dtype == torch.bfloat16
    err = (out.output.float() - ref).abs().max() / ref.abs().max()
    assert float(err) < 2e-2, float(err)
    if isinstance(low, FrequencyEnhancedAttention):
        assert low.mode_weights(x).dtype == torch.bfloat16


@pytest.mark.parametrize("layer", _layers(), ids=["fnet", "feb", "fea"])
def test_sequence_mixer_keywords_and_causality_refused(layer):
    """The one sequence-mixer interface (issue 23): ``key_mask``/``is_causal``/``need_weights`` keyword-only;
    the Fourier mixers read every position, so ``is_causal=True`` is refused with a ValueError that says why."""
    x = rand(2, 12, 8)
    km = padding_mask([12, 9], 12)
    with pytest.raises(TypeError):
        layer(x, km)  # key_mask is keyword-only
    with pytest.raises(ValueError, match="cannot be causal"):
        layer(x, is_causal=True)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        layer(x, is_causal=1)
    torch.testing.assert_close(layer(x, key_mask=km, is_causal=False).output, layer(x, key_mask=km).output)
    assert registry.get({FourierMixing: "fnet", FrequencyEnhancedBlock: "fedformer",
                         FrequencyEnhancedAttention: "fedformer-attention"}[type(layer)]).causal is False


# ----------------------------------------------------------------------------- series decomposition and the experiments


def test_series_decomposition_sums_back_keeps_a_line_and_removes_a_divisor_period():
    from attn.frequency import series_decomposition

    t = torch.arange(40, dtype=torch.float64)
    line = 0.3 * t - 2.0
    wave = torch.sin(2 * math.pi * t / 9)  # period 9 = the kernel: its moving average is 0
    x = torch.stack([line, line + wave])  # (2, 40)
    seasonal, trend = series_decomposition(x, 9)
    torch.testing.assert_close(seasonal + trend, x)
    inner = slice(4, -4)  # away from the repeated end values
    torch.testing.assert_close(trend[0, inner], line[inner])
    torch.testing.assert_close(trend[1, inner], line[inner], atol=1e-12, rtol=0)
    torch.testing.assert_close(seasonal[1, inner], wave[inner], atol=1e-12, rtol=0)
    _, t3 = series_decomposition(x[..., None].expand(2, 40, 3), 9)  # channels last: the same per channel
    torch.testing.assert_close(t3[..., 2], trend)
    with pytest.raises(ValueError, match="kernel_size"):
        series_decomposition(x, 0)


def test_slot_write_back_is_the_authors_placement():
    """write_back="slot" (the authors' FourierBlock) puts the m-th kept mode at mode m: with the lowest modes it is the
    paper's layer; with random modes the core's output holds modes 0..M-1 only, and it has no offset operator."""
    x = rand(2, 32, 8, dtype=torch.float64)
    paper = FrequencyEnhancedBlock(8, 2, modes=4, mode_select="lowest").double()
    slot = FrequencyEnhancedBlock(8, 2, modes=4, mode_select="lowest", write_back="slot").double()
    slot.load_state_dict(paper.state_dict())
    torch.testing.assert_close(slot(x).output, paper(x).output)
    rnd = FrequencyEnhancedBlock(8, 2, modes=4, mode_select="random", seed=3, write_back="slot").double()
    assert rnd.mode_index(32).tolist() != [0, 1, 2, 3]
    q = rand(2, 32, 2, 4, dtype=torch.float64, seed=5)
    spec = torch.fft.rfft(rnd.mix_modes(q), dim=1).abs()  # (B, n//2 + 1, h, d)
    assert spec[:, 4:].max() < 1e-12 < spec[:, :4].max()
    with pytest.raises(ValueError, match="not a circular"):
        rnd(x, need_weights=True)
    with pytest.raises(ValueError, match="write_back"):
        FrequencyEnhancedBlock(8, 2, write_back="elsewhere")


def test_forecast_task_puts_the_seasonal_energy_above_the_lowest_modes():
    """The design the chapter needs: the lowest 8 modes of the seasonal part hold little of its energy."""
    from attn.experiments.frequency import SeasonalTrendForecast

    task = SeasonalTrendForecast()
    assert task.seasonal_frequencies() == [8.0, 20.0]
    b = task.sample(64, torch.Generator().manual_seed(0))
    assert b["x"].shape == (64, 40) and b["y"].shape == (64, 24)
    energy = torch.fft.rfft(b["seasonal"], dim=-1).abs().pow(2).sum(0)
    assert energy[:8].sum() < 0.02 * energy.sum()
    assert energy[[8, 20]].sum() > 0.9 * energy.sum()
    again = task.sample(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["x"], b["x"])  # the generator decides the batch
    # the series continues: x then y is trend + seasonal + noise of the noise level
    resid = torch.cat([b["x"], b["y"]], 1) - b["trend"] - b["seasonal"]
    assert 0.07 < float(resid.std()) < 0.13


def test_forecast_model_reads_only_the_context_and_feb_random_modes_follow_the_seed():
    from attn.experiments.frequency import SeasonalTrendForecast, forecast_arms

    task = SeasonalTrendForecast()
    arms = forecast_arms(task, embed_dim=16, num_heads=2)
    assert set(arms) == {"FEB-f, random modes", "FEB-f, lowest modes", "FEB-f, random modes, slot write-back",
                         "dense attention", "FNet", "DLinear (no mixer)"}
    x = task.sample(3, torch.Generator().manual_seed(1))["x"]
    for make in arms.values():
        assert make(0)(x).shape == (3, 24)
    a, b = arms["FEB-f, random modes"](0), arms["FEB-f, random modes"](1)
    assert a.block.mixer.mode_index(64).tolist() != b.block.mixer.mode_index(64).tolist()
    assert arms["FEB-f, lowest modes"](3).block.mixer.mode_index(64).tolist() == list(range(8))


def test_run_arms_returns_one_value_per_seed_and_dlinear_learns_the_forecast():
    """Runner shape, and the task is solvable: the linear forecaster gets near the noise floor (0.01) quickly."""
    from attn.experiments.frequency import LinearForecaster, SeasonalTrendForecast, forecast_loss, run_arms

    task = SeasonalTrendForecast()
    runs = run_arms({"DLinear": lambda s: LinearForecaster(task), "DLinear again": lambda s: LinearForecaster(task)},
                    task.sample, forecast_loss, "mse", [0, 1, 2], 100, lr=1e-2, eval_size=256)
    assert {k: len(v) for k, v in runs.values.items()} == {"DLinear": 3, "DLinear again": 3}
    assert runs.values["DLinear"] == runs.values["DLinear again"]  # same seeds, same batches, same result
    assert max(runs.values["DLinear"]) < 0.05
    assert set(runs.still_falling()) == {"DLinear", "DLinear again"}


def test_fnet_recall_stack_cannot_depend_on_the_query_key_through_its_mixing():
    """FNet's mixing is content-independent: swapping which key is queried changes the query token's mixed input
    only through the query token itself (the fixed weights do not move); attention's weights do move."""
    from attn.experiments.frequency import recall_arms
    from attn.tasks import AssociativeRecall

    task = AssociativeRecall(4, 8, 8)
    arms = recall_arms(task, embed_dim=16)
    assert set(arms) == {"attention", "FNet", "FNet, attention last"}
    fnet = arms["FNet"](0).blocks[0].mixer
    h1, h2 = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    w1 = fnet(h1, need_weights=True).weights
    w2 = fnet(h2, need_weights=True).weights
    torch.testing.assert_close(w1, w2)  # the same mixing for every input
    mha = arms["attention"](0).blocks[0].mixer
    assert not torch.allclose(mha(h1, need_weights=True).weights, mha(h2, need_weights=True).weights)
    x = task.sample(2, torch.Generator().manual_seed(0))["x"]
    for make in arms.values():
        assert make(0)(x).shape == (2, 8)


@pytest.mark.slow
def test_attention_learns_recall_that_fnet_cannot():
    from attn.experiments.frequency import recall_arms, recall_loss, run_arms
    from attn.tasks import AssociativeRecall

    task = AssociativeRecall(8, 16, 16)
    arms = recall_arms(task)
    runs = run_arms({k: arms[k] for k in ("attention", "FNet")}, task.sample, recall_loss, "acc", [0], 160,
                    eval_size=512)
    assert runs.values["attention"][0] > 0.9
    assert runs.values["FNet"][0] < 0.2
