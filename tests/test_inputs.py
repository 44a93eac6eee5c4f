"""Bad input meets a clear error in every registered token mixer.

The table below is tried on ``build(32, 4)`` of every mechanism registered
with a ``build`` factory, so the test grows with the registry: a new
mechanism is checked the day it is registered. Each bad input must raise a
``TypeError`` or ``ValueError`` whose message names what was expected (never
a crash deep inside torch); an empty batch must give an empty output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attn import registry
from attn.checks import check_tensor, check_tokens

E, H, N = 32, 4, 12
SEQUENCE = [m for m in registry.mechanisms() if m.build is not None]

#: (case, input, exception, the message must match)
BAD = [
    ("python list", lambda: torch.randn(2, N, E).tolist(), TypeError, r"torch\.Tensor of shape \(batch, seq, embed_dim=32\), got list"),
    ("numpy array", lambda: np.zeros((2, N, E), dtype=np.float32), TypeError, r"torch\.Tensor.*got ndarray"),
    ("integer tensor", lambda: torch.randint(0, 5, (2, N, E)), TypeError, r"floating-point.*got dtype torch\.int64"),
    ("bool tensor", lambda: torch.ones(2, N, E, dtype=torch.bool), TypeError, r"floating-point.*got dtype torch\.bool"),
    ("2-D (no batch)", lambda: torch.randn(N, E), ValueError, r"shape \(batch, seq, embed_dim=32\), got 2-D shape \(12, 32\)"),
    ("4-D", lambda: torch.randn(2, 1, N, E), ValueError, r"shape \(batch, seq, embed_dim=32\), got 4-D"),
    ("scalar", lambda: torch.tensor(1.0), ValueError, r"got 0-D"),
    ("wrong width", lambda: torch.randn(2, N, E + 1), ValueError, r"embed_dim=32\), got \(2, 12, 33\)"),
    ("too narrow", lambda: torch.randn(2, N, 8), ValueError, r"embed_dim=32\), got \(2, 12, 8\)"),
    ("empty sequence", lambda: torch.randn(2, 0, E), ValueError, r"empty sequence.*seq >= 1"),
]


def _layer(mech: registry.Mechanism) -> torch.nn.Module:
    torch.manual_seed(0)
    return mech.build(E, H).eval()


@pytest.mark.parametrize("mech", SEQUENCE, ids=[m.name for m in SEQUENCE])
@pytest.mark.parametrize("case,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error(mech, case, make, exc, match):
    layer = _layer(mech)
    with pytest.raises(exc, match=match):
        layer(make())


@pytest.mark.parametrize("mech", SEQUENCE, ids=[m.name for m in SEQUENCE])
def test_empty_batch_gives_an_empty_output(mech):
    layer = _layer(mech)
    out = layer(torch.randn(0, N, E))
    assert tuple(out[0].shape) == (0, N, E)
    out = layer(torch.randn(0, N, E), need_weights=True)
    assert out[0].shape[0] == 0
    assert out[1] is None or out[1].shape[0] == 0


@pytest.mark.parametrize("mech", SEQUENCE, ids=[m.name for m in SEQUENCE])
def test_good_input_still_works(mech):
    """The checks refuse nothing valid: float32 and float64 (with a float64 layer), batch 1 and 3, odd lengths."""
    layer = _layer(mech)
    for b, n in ((1, 1), (3, 17)):
        out = layer(torch.randn(b, n, E))
        assert tuple(out[0].shape) == (b, n, E) and torch.isfinite(out[0]).all()
    out = layer.double()(torch.randn(2, 5, E, dtype=torch.float64))
    assert out[0].dtype == torch.float64


def test_the_shared_checks_name_the_argument_and_the_shape():
    with pytest.raises(TypeError, match=r"^memory must be a torch\.Tensor of shape \(batch, seq, embed_dim\), got tuple$"):
        check_tokens((1, 2), name="memory")
    with pytest.raises(ValueError, match=r"^grid must have shape \(B, H, W, C\), got 3-D shape \(1, 2, 3\)$"):
        check_tensor(torch.zeros(1, 2, 3), "grid", "(B, H, W, C)", 4)
    x = torch.zeros(0, 0, 4)
    assert check_tokens(x, 4) is x  # an empty batch is fine, whatever its length
