"""Chapter 29's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import math

import torch

from attn.exercises import latent as ex
from attn.latent import MultiHeadLatentAttention, latent_cache_bytes_per_token


def _unabsorbed(q_c, q_r, c, k_r, w_uk, w_uv, *, scale=None, rope=True):  # type: ignore[no-untyped-def]
    """The unabsorbed form: up-project every latent to per-head keys and values, a loop over heads."""
    d, d_r = q_c.shape[-1], q_r.shape[-1]
    t, m = q_c.shape[2], c.shape[1]
    scale = scale if scale is not None else 1 / math.sqrt(d + d_r)
    bad = torch.arange(m)[None, :] > torch.arange(m - t, m)[:, None]
    heads = []
    for i in range(q_c.shape[1]):
        k = c @ w_uk[i].T  # (B, m, d)
        v = c @ w_uv[i].T  # (B, m, d_v)
        s = q_c[:, i] @ k.transpose(1, 2)
        if rope:
            s = s + q_r[:, i] @ k_r.transpose(1, 2)
        s = torch.where(bad, torch.tensor(-math.inf), s * scale)
        heads.append(torch.softmax(s, -1) @ v)
    return torch.stack(heads, 1)


def test_absorbed_right_and_wrong() -> None:
    assert ex.check_absorbed_attention(_unabsorbed).passed

    def latent_width(q_c, q_r, c, k_r, w_uk, w_uv):  # type: ignore[no-untyped-def]
        return _unabsorbed(q_c, q_r, c, k_r, w_uk, w_uv, scale=1 / math.sqrt(c.shape[-1] + q_r.shape[-1]))

    table = {
        "latent_scale": latent_width,
        "no_rope_part": lambda *a: _unabsorbed(*a, rope=False),
    }
    for name, fn in table.items():
        report = ex.check_absorbed_attention(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_a_transposed_w_uk_is_reported() -> None:
    def transposed(q_c, q_r, c, k_r, w_uk, w_uv):  # type: ignore[no-untyped-def]
        return ex.absorbed_attention(q_c, q_r, c, k_r, w_uk.transpose(1, 2), w_uv)

    report = ex.check_absorbed_attention(transposed)
    assert not report.passed and "raised" in report.diagnosis


def test_absorbed_matches_the_library_layer() -> None:
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(32, 4, kv_rank=16, rope_dim=4)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        q_c, q_r = layer.queries(x)
        c, k_r = layer.latents(x)
        w_uk, w_uv = layer.up_weights()
        o = ex.absorbed_attention(q_c, q_r, c, k_r, w_uk, w_uv)  # (B, h, t, d_v)
        y = layer.out_proj(o.transpose(1, 2).reshape(2, 6, -1))
        for absorb in (False, True):
            torch.testing.assert_close(y, layer(x, absorb=absorb).output, atol=1e-5, rtol=1e-4)


def test_cache_bytes() -> None:
    assert ex.deepseek_cache_bytes() == latent_cache_bytes_per_token(60, 512, 64, 2)
    assert ex.check_deepseek_cache_bytes(69120).passed
    assert ex.check_deepseek_cache_bytes(60 * (2 * 512 + 64) * 2).mistake == "latent_twice"
    assert ex.check_deepseek_cache_bytes(1).mistake == "generic"


def test_rope_choice() -> None:
    assert ex.check_rope_blocks_absorption("c").passed
    assert ex.check_rope_blocks_absorption("a").mistake == "absorbs_anyway"
    assert ex.check_rope_blocks_absorption("z").mistake == "generic"
    # independently: without RoPE one latent query W^UKᵀ q reproduces every score; with RoPE on the compressed
    # keys no single latent query does (least squares over 8 keys, 6 latent dimensions)
    from attn.positions import RotaryEmbedding

    torch.manual_seed(1)
    rope = RotaryEmbedding(4)
    q, w = torch.randn(1, 4, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    c = torch.randn(8, 6, dtype=torch.float64)
    plain = (q @ (c @ w.T).T)[0]
    rotated = (rope(q, torch.tensor([7])) @ rope(c @ w.T, torch.arange(8)).T)[0]
    for scores, fits in ((plain, True), (rotated, False)):
        best = torch.linalg.lstsq(c, scores[:, None]).solution  # the best single latent query (6,)
        assert torch.allclose(c @ best, scores[:, None], atol=1e-8) == fits
