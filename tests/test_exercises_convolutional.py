"""Chapter 18's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attn import convolutional as lib
from attn.exercises import convolutional as ex


def test_channel_attention_agrees_with_the_library() -> None:
    torch.manual_seed(0)
    mod = lib.ChannelAttention(12, reduction=4)
    x = torch.randn(2, 12, 5, 6)
    w0, w1 = mod.mlp[0].weight, mod.mlp[2].weight
    torch.testing.assert_close(ex.channel_attention(x, w0, w1), mod(x))


def test_channel_attention_written_another_way_passes() -> None:
    def mine(x, w0, w1):  # type: ignore[no-untyped-def]
        pooled = torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], -1)  # (B, C, 1, 2)
        z = pooled[:, :, 0].transpose(1, 2)  # (B, 2, C)
        return torch.sigmoid(F.linear(F.relu(F.linear(z, w0)), w1).sum(1))

    assert ex.check_channel_attention(mine).passed


def test_channel_attention_wrong_answers_get_their_diagnosis() -> None:
    def squeeze_excite(x, w0, w1):  # type: ignore[no-untyped-def]
        z = x.flatten(2).sum(-1) / (x.shape[2] * x.shape[3])
        return 1 / (1 + torch.exp(-torch.einsum("ch,bh->bc", w1, torch.einsum("hc,bc->bh", w0, z).clamp_min(0))))

    def added_first(x, w0, w1):  # type: ignore[no-untyped-def]
        z = x.flatten(2).mean(-1) + x.flatten(2).max(-1).values
        return torch.sigmoid(F.linear(F.linear(z, w0).clamp_min(0), w1))

    def competing(x, w0, w1):  # type: ignore[no-untyped-def]
        logits = sum(F.linear(F.relu(F.linear(z, w0)), w1) for z in (x.mean((2, 3)), x.amax((2, 3))))
        e = torch.exp(logits - logits.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)

    table = {squeeze_excite: "average_only", added_first: "pool_sum_before_mlp", competing: "softmax_over_channels"}
    for fn, name in table.items():
        report = ex.check_channel_attention(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_causal_conv_agrees_with_the_library() -> None:
    x, w = torch.randn(2, 10, 5), torch.randn(5, 3)
    torch.testing.assert_close(ex.causal_depthwise_conv(x, w), lib.causal_depthwise_conv(x, w))


def test_causal_conv_written_with_conv1d_passes() -> None:
    def mine(x, weight):  # type: ignore[no-untyped-def]
        c, k = weight.shape
        xt = F.pad(x.transpose(1, 2), (k - 1, 0))  # (B, C, n + k - 1)
        return F.conv1d(xt, weight[:, None, :], groups=c).transpose(1, 2)

    assert ex.check_causal_depthwise_conv(mine).passed


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_causal_conv_wrong_answers_get_their_diagnosis() -> None:
    def same_padding(x, weight):  # type: ignore[no-untyped-def]
        c = weight.shape[0]
        return F.conv1d(x.transpose(1, 2), weight[:, None, :], groups=c, padding="same").transpose(1, 2)

    def reversed_taps(x, weight):  # type: ignore[no-untyped-def]
        out = torch.zeros_like(x)
        for s in range(weight.shape[1]):  # tap s on the input s positions back
            if s < x.shape[1]:
                out[:, s:] = out[:, s:] + weight[:, s] * x[:, : x.shape[1] - s]
        return out

    def modular(x, weight):  # type: ignore[no-untyped-def]
        n, k = x.shape[1], weight.shape[1]
        idx = (torch.arange(n)[:, None] - k + 1 + torch.arange(k)) % n  # (n, k), wraps to the end
        return torch.einsum("bntc,ct->bnc", x[:, idx], weight)

    def one_too_far(x, weight):  # type: ignore[no-untyped-def]
        c, k = weight.shape
        xt = F.pad(x.transpose(1, 2), (k, 0))[..., :-1]
        return F.conv1d(xt, weight[:, None, :], groups=c).transpose(1, 2)

    table = {same_padding: "centred_padding", reversed_taps: "flipped_kernel", modular: "wraps_around",
             one_too_far: "excludes_current"}
    for fn, name in table.items():
        report = ex.check_causal_depthwise_conv(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_centred_leak_values() -> None:
    assert ex.centred_leak_start() == 16 - 3 * (3 // 2)
    assert ex.check_centred_leak_start(13).passed
    assert ex.check_centred_leak_start(15).mistake == "one_layer"
    assert ex.check_centred_leak_start(14).mistake == "generic"
