"""Masked content never leaks: changing the tokens at padded positions leaves the outputs at real positions unchanged.

A property of every registered sequence mechanism (``attn.registry.mechanisms()`` with a
``build(embed_dim, num_heads)`` factory) whose layer takes a key mask: the test list is read from
the registry, so a new mechanism is checked as soon as it is registered. Support for a key mask is
detected from the layer's ``forward`` signature (a parameter named ``key_mask``), so layers that
gain one later (GQA, MLA) are picked up without editing this file.

The check runs in float64, the content at padded positions is replaced by different, larger
content (scale 10: outliers that would dominate a maximum, a normaliser or a spectrum), and only
the rows of real query positions are compared (a padded query row may read anything). Right
padding, left padding and holes (a mask with gaps) are all tried.

Layers without a ``key_mask`` are listed in :data:`NO_KEY_MASK` with the reason; a new mechanism
that has neither a ``key_mask`` nor an entry there fails :func:`test_every_mechanism_is_checked_or_explained`,
as does a skipped layer whose ``forward`` takes a mask under another name (none does on the original
code: the skipped layers take ``need_weights`` plus ``memory``, ``cache``, ``absorb`` or ``offset``).

On the original code (eda29e8) only ``performer`` failed: its FAVOR+ key features were stabilised
by one maximum over all keys, padded ones included (relative change of the real outputs 0.72 to
1.0 in float64 at padded scale 1e3, all three mask kinds).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from attn.registry import Mechanism, mechanisms

#: Mechanisms whose built layer has no key mask argument, and why. Empty: every registered sequence
#: mixer takes ``key_mask`` (issue 23's protocol); an entry whose layer takes one fails the test as stale.
NO_KEY_MASK: dict[str, str] = {}

EMBED, HEADS, BATCH, N = 16, 4, 3, 16
SCALE = 1e3


def _sequence_mechanisms() -> list[Mechanism]:
    return [m for m in mechanisms() if m.build is not None]


def _takes_key_mask(m: Mechanism) -> bool:
    layer = m.build(EMBED, HEADS)
    return "key_mask" in inspect.signature(layer.forward).parameters


def _masks() -> dict[str, torch.Tensor]:
    """``(BATCH, N)`` boolean masks, True = real token; every row keeps at least one real token."""
    pos = torch.arange(N)
    lengths = torch.tensor([N, 11, 5])
    right = pos < lengths[:, None]
    left = pos >= (N - lengths)[:, None]
    holed = torch.ones(BATCH, N, dtype=torch.bool)
    holed[0, [1, 2, 7, 8, 9, 14]] = False  # gaps inside the sequence
    holed[1, ::2] = False  # every other token
    holed[2, :] = False
    holed[2, [0, 6, 15]] = True  # three isolated real tokens, first and last included
    return {"right": right, "left": left, "holed": holed}


MASKS = _masks()
CHECKED = [m.name for m in _sequence_mechanisms() if _takes_key_mask(m)]


def _forward(layer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1234)  # the same draw for stochastic layers (Gumbel noise...) in both calls
    return layer(x, key_mask=mask)[0]


@pytest.mark.parametrize("mask_kind", sorted(MASKS))
@pytest.mark.parametrize("name", CHECKED)
def test_padded_content_does_not_change_real_outputs(name: str, mask_kind: str) -> None:
    m = next(m for m in _sequence_mechanisms() if m.name == name)
    torch.manual_seed(0)
    layer = m.build(EMBED, HEADS).double().eval()
    mask = MASKS[mask_kind]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, N, EMBED, dtype=torch.float64, generator=g)
    other = SCALE * torch.randn(BATCH, N, EMBED, dtype=torch.float64, generator=g)  # different, larger padded content
    x2 = torch.where(mask[..., None], x, other)
    with torch.no_grad():
        y1, y2 = _forward(layer, x, mask), _forward(layer, x2, mask)
    real1, real2 = y1[mask], y2[mask]  # (real tokens, E): only rows of real queries
    change = float((real1 - real2).abs().max() / real1.abs().max().clamp_min(1e-300))
    assert change < 1e-10, f"{name} ({mask_kind} padding): padded content changes real outputs by {change:.2e} (relative)"


def test_every_mechanism_is_checked_or_explained() -> None:
    registered = {m.name for m in _sequence_mechanisms()}
    missing = [name for name in sorted(registered) if name not in CHECKED and name not in NO_KEY_MASK]
    assert not missing, f"mechanisms with no key_mask and no reason in NO_KEY_MASK: {missing}"
    assert set(NO_KEY_MASK) <= registered, f"NO_KEY_MASK names no registered mechanism: {set(NO_KEY_MASK) - registered}"
    stale = sorted(set(NO_KEY_MASK) & set(CHECKED))
    assert not stale, f"{stale} take a key_mask now: remove them from NO_KEY_MASK"
    assert len(CHECKED) >= 20, CHECKED  # the detection finds the masked layers (27 on the original code)
    # a skipped layer must not take a padding mask under another name (attention_mask, key_padding_mask, ...)
    for m in _sequence_mechanisms():
        if m.name not in CHECKED:
            params = inspect.signature(m.build(EMBED, HEADS).forward).parameters
            other = [p for p in params if "mask" in p or "pad" in p]
            assert not other, f"{m.name} takes {other}: test it here under that name, or explain in NO_KEY_MASK"


def test_masks_cover_left_right_and_holes() -> None:
    for mask in MASKS.values():
        assert bool(mask.any(-1).all())
    assert bool(MASKS["left"][:, -1].all()) and not bool(MASKS["left"][:, 0].all())
    holes = MASKS["holed"][:, 1:].int() - MASKS["holed"][:, :-1].int()
    assert bool(((holes == 1).sum(-1) >= 1).all())  # a real token after a padded one in every row
