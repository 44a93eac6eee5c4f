"""Chapter 25's Triton kernel, run in Triton's interpreter on the CPU against PyTorch's fused attention.

Triton picks its interpreter when it is first imported, so the checks run in a fresh process with
``TRITON_INTERPRET=1``. Triton is a test dependency on Linux x86-64 (pyproject.toml): there a missing
Triton fails these tests instead of skipping them.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attn import flash_triton

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
SUPPORTED = sys.platform == "linux" and platform.machine() == "x86_64"

needs_triton = pytest.mark.skipif(not HAS_TRITON and not SUPPORTED,
                                  reason="Triton has no wheel for this platform")


def _run(code: str) -> str:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_triton_is_installed_where_it_has_wheels():
    if SUPPORTED:
        assert HAS_TRITON, "triton is a test dependency on Linux x86-64: `make test` installs it"


@needs_triton
def test_kernel_matches_sdpa_forward_lse_and_gradients():
    out = _run("""
        import torch, torch.nn.functional as F
        from attn.flash_triton import interpreted, triton_flash_attention, triton_flash_forward
        assert interpreted()
        g = torch.Generator().manual_seed(0)
        worst = 0.0
        for causal in (False, True):
            for n_q, n_k, d, d_v, bq, bk in ((48, 48, 32, 32, 32, 16), (40, 70, 24, 40, 16, 32),
                                              (70, 40, 16, 16, 32, 32)):
                q = torch.randn(1, 2, n_q, d, generator=g, requires_grad=True)
                k = torch.randn(1, 2, n_k, d, generator=g, requires_grad=True)
                v = torch.randn(1, 2, n_k, d_v, generator=g, requires_grad=True)
                o, lse = triton_flash_forward(q, k, v, causal, block_q=bq, block_k=bk)
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                s = q @ k.transpose(-1, -2) / d ** 0.5
                if causal:
                    s = s.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool).triu(1), float("-inf"))
                up = torch.randn_like(ref)
                ours = triton_flash_attention(q, k, v, causal, block_q=bq, block_k=bk)
                g1 = torch.autograd.grad(ours, (q, k, v), up)
                g2 = torch.autograd.grad(ref, (q, k, v), up)
                errs = [(o - ref).abs().max(), (lse - torch.logsumexp(s, -1)).abs().max(),
                        *((a - b).abs().max() for a, b in zip(g1, g2))]
                worst = max(worst, *(float(e) for e in errs))
        print(worst)
    """)
    assert float(out.strip()) < 1e-5


@needs_triton
def test_kernel_bad_input_and_cpu_without_interpreter():
    out = _run("""
        import torch
        from attn.flash_triton import triton_flash_forward
        x = torch.randn(1, 1, 32, 16)
        for kwargs, expect in (({"block_q": 24}, "power of two"), ({"block_k": 8}, "block_k must be >= 16")):
            try:
                triton_flash_forward(x, x, x, **kwargs)
            except ValueError as e:
                assert expect in str(e), e
            else:
                raise AssertionError(kwargs)
        try:
            triton_flash_forward(x.double(), x.double(), x.double())
        except TypeError as e:
            assert "float32, float16 and bfloat16" in str(e)
        else:
            raise AssertionError("float64 accepted")
        print("ok")
    """)
    assert out.strip() == "ok"
    if HAS_TRITON and not flash_triton.interpreted() and not torch.cuda.is_available():
        x = torch.randn(1, 1, 32, 16)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            flash_triton.triton_flash_forward(x, x, x)
