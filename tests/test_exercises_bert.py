"""Chapter 6's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.bert import to_bert_mask
from attn.exercises import bert as ex


def _additive_loop(key_mask, dtype=torch.float32, value=None, where_real=False):  # type: ignore[no-untyped-def]
    b, n = key_mask.shape
    fill = torch.finfo(dtype).min if value is None else value
    out = torch.empty(b, 1, 1, n, dtype=dtype)
    for i in range(b):
        for j in range(n):
            blocked = bool(key_mask[i, j]) if where_real else not bool(key_mask[i, j])
            out[i, 0, 0, j] = fill if blocked else 0.0
    return out


def test_additive_mask_agrees_with_the_library() -> None:
    km = torch.tensor([[True, True, False], [True, False, False]])
    # to_bert_mask takes a (B, n, n) pattern; a key mask broadcast over the queries gives the same rows
    ref = to_bert_mask(km[:, None, :].expand(2, 3, 3))  # (B, 1, n, n)
    assert torch.equal(ex.additive_key_mask(km).expand(2, 1, 3, 3), ref)


def test_additive_mask_right_and_wrong_answers() -> None:
    assert ex.check_additive_key_mask(_additive_loop).passed
    table = {
        "inverted": lambda km, dtype=torch.float32: _additive_loop(km, dtype, where_real=True),
        "multiplicative": lambda km, dtype=torch.float32: torch.where(km, 1.0, 0.0).to(dtype)
        .reshape(km.shape[0], 1, 1, -1),
        "masks_queries": lambda km, dtype=torch.float32: _additive_loop(km, dtype).transpose(-1, -2),
        "no_broadcast_axes": lambda km, dtype=torch.float32: _additive_loop(km, dtype).flatten(1),
        "not_finfo_min": lambda km, dtype=torch.float32: _additive_loop(km, dtype, value=-1e9),
    }
    for name, fn in table.items():
        report = ex.check_additive_key_mask(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_padded_row_values() -> None:
    assert ex.check_padded_row_weight(1 / 6).passed
    assert ex.check_padded_row_weight(0).mistake == "zero_weights"
    assert ex.check_padded_row_weight(1).mistake == "one_hot"
    assert ex.check_padded_row_weight(0.3).mistake == "generic"


def _mlm_loop(tokens, special, pick, rule, random_tokens, mask_id=1, rate=0.15,  # type: ignore[no-untyped-def]
              bug=""):
    x, target = tokens.clone(), torch.full_like(tokens, -100)
    b, n = tokens.shape
    for i in range(b):
        for j in range(n):
            chosen = pick[i, j] >= rate if bug == "invert" else pick[i, j] < rate
            if bug != "special" and special[i, j]:
                chosen = False
            if bug == "target":
                target[i, j] = tokens[i, j]
            if not chosen:
                continue
            target[i, j] = tokens[i, j]
            u = float(rule[i, j])
            if u < 0.8 or bug == "all":
                x[i, j] = mask_id
            elif (u < 0.9) != (bug == "swap"):
                x[i, j] = random_tokens[i, j]
    return x, target


def test_mlm_corrupt_right_and_wrong_answers() -> None:
    assert ex.check_mlm_corrupt(_mlm_loop).passed
    table = {"special": "masks_special", "all": "all_mask", "swap": "random_keep_swapped",
             "invert": "pick_inverted", "target": "target_everywhere"}
    for bug, name in table.items():
        def wrong(*args, bug=bug, **kwargs):  # type: ignore[no-untyped-def]
            return _mlm_loop(*args, bug=bug, **kwargs)

        report = ex.check_mlm_corrupt(wrong)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_mlm_corrupt_rates_on_a_large_batch() -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 30, (64, 512), generator=g)
    special = torch.zeros_like(tokens, dtype=torch.bool)
    pick, rule = torch.rand(64, 512, generator=g), torch.rand(64, 512, generator=g)
    x, target = ex.mlm_corrupt(tokens, special, pick, rule, torch.randint(30, 60, (64, 512), generator=g))
    selected = target != -100
    assert abs(selected.float().mean().item() - 0.15) < 0.01
    as_mask = (x[selected] == 1).float().mean().item()
    kept = (x[selected] == tokens[selected]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02
    assert torch.equal(x[~selected], tokens[~selected])
