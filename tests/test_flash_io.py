"""Chapter 25's IO count: the traffic formulas describe the code, and grow as the paper's theorem says."""

from __future__ import annotations

import pytest
import torch

from attn.flash import flash_traffic, measured_traffic, naive_traffic, sram_block_q


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_q", "n_k", "block_q", "block_k"), [(128, 128, 32, 32), (300, 300, 50, 30),
                                                                 (100, 250, 64, 16), (250, 100, 16, 64)])
def test_formula_counts_what_flash_forward_loads(causal, n_q, n_k, block_q, block_k):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, n_q, 16, generator=g)
    k = torch.randn(2, 3, n_k, 16, generator=g)
    v = torch.randn(2, 3, n_k, 24, generator=g)
    counted = measured_traffic(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    assert counted == flash_traffic(n_q, n_k, 16, block_q, block_k, d_v=24, causal=causal)


def test_closed_form_without_mask():
    n, d, b = 1024, 64, 128
    t = flash_traffic(n, n, d, b, 64)
    assert t == {"read Q": n * d, "read K, V": (n // b) * n * 2 * d, "write O": n * d, "write L": n}
    naive = naive_traffic(n, n, d)
    assert naive["write S"] == naive["read S"] == naive["write P"] == naive["read P"] == n * n
    assert sum(naive.values()) == 4 * n * n + 4 * n * d


def test_causal_streams_about_half_the_keys():
    full = flash_traffic(4096, 4096, 64, 64, 64)["read K, V"]
    causal = flash_traffic(4096, 4096, 64, 64, 64, causal=True)["read K, V"]
    assert causal / full == pytest.approx((4096 / 64 + 1) / (2 * 4096 / 64))


def test_traffic_falls_as_one_over_memory_theorem_2():
    """Theta(n^2 d^2 / M): the streamed K, V traffic is n^2 2d / b_q with b_q ~ M / (3d); doubling M halves it."""
    n, d = 8192, 64
    for m in (2**15, 2**16, 2**17, 2**18):
        bq = sram_block_q(m, d)
        kv = flash_traffic(n, n, d, bq, 64)["read K, V"]
        assert kv == pytest.approx(n * n * 2 * d / bq, rel=bq / n + 1e-9)
    kv = [flash_traffic(n, n, d, sram_block_q(m, d), 64)["read K, V"] for m in (2**17, 2**18)]
    assert kv[0] / kv[1] == pytest.approx(2, rel=0.1)
    assert sum(naive_traffic(n, n, d).values()) > sum(flash_traffic(n, n, d, sram_block_q(2**15, d), 64).values())


def test_sram_block_fits_and_is_the_largest():
    for m, d in ((2**14, 64), (49152, 64), (49152, 128), (2**20, 32)):
        bq, bk = sram_block_q(m, d), 64

        def used(b: int, d: int = d, bk: int = bk) -> int:
            return b * (2 * d + 2) + bk * 2 * d + b * bk

        assert used(bq) <= m < used(bq + 1)


@pytest.mark.parametrize(("fn", "args", "exc", "match"), [
    (sram_block_q, (100, 64), ValueError, "cannot hold a key block"),
    (sram_block_q, (0, 64), ValueError, "memory must be >= 1"),
    (flash_traffic, (128, 128, 64, 0, 64), ValueError, "block_q must be >= 1"),
    (naive_traffic, (128, 128.0, 64), TypeError, "n_k must be an int"),
])
def test_bad_input(fn, args, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args)


def test_measured_traffic_wants_four_dims():
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"\(B, H, n, d\)"):
        measured_traffic(x, x, x)
