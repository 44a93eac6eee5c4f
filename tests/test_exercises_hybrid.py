"""Chapter 10's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.exercises import hybrid as ex
from attn.hybrid import bigbird_layout


def _loop_mask(nb, window, global_blocks, random_blocks, *, wrap=False, global_rows=True, transpose_random=False):  # type: ignore[no-untyped-def]
    """The block pattern with explicit loops (a different way to write it), with optional bugs."""
    mask = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        for off in range(-window, window + 1):
            j = i + off
            if wrap:
                j %= nb
            if 0 <= j < nb:
                mask[i, j] = True
        for gb in global_blocks:
            mask[i, gb] = True
            if global_rows:
                mask[gb, i] = True
        for j in random_blocks[i].tolist():
            if transpose_random:
                mask[j, i] = True
            else:
                mask[i, j] = True
    return mask


def test_a_correct_answer_written_another_way_passes() -> None:
    assert ex.check_bigbird_block_mask(_loop_mask).passed


def test_wrong_answers_get_their_diagnosis() -> None:
    table = {
        "window_wraps": lambda *a: _loop_mask(*a, wrap=True),
        "no_global_rows": lambda *a: _loop_mask(*a, global_rows=False),
        "random_transposed": lambda *a: _loop_mask(*a, transpose_random=True),
    }
    for name, fn in table.items():
        report = ex.check_bigbird_block_mask(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_an_integer_mask_is_told_its_dtype() -> None:
    report = ex.check_bigbird_block_mask(lambda *a: _loop_mask(*a).long())
    assert not report.passed and "dtype" in report.diagnosis


def test_the_solution_agrees_with_the_library_layout() -> None:
    for nb, w, globals_, r in [(12, 1, (0, 11), 2), (9, 2, (4,), 1), (6, 1, (), 0)]:
        layout = bigbird_layout(nb, w, globals_, r, heads=2, seed=3)
        for h in range(2):
            rnd = layout.index[h, :, layout.index.shape[-1] - r:] if r else torch.zeros(nb, 0, dtype=torch.long)
            assert torch.equal(ex.bigbird_block_mask(nb, w, list(globals_), rnd), layout.block_mask()[h])


def test_values() -> None:
    assert ex.check_blocks_read((8, 6, 7)).passed
    assert ex.check_blocks_read((8, 7, 7)).mistake == "double_counted"
    assert ex.check_blocks_read((8, 6, 6)).mistake == "generic"
    assert ex.check_flop_ratio(4096 / 640).passed
    assert ex.check_flop_ratio(8).mistake == "no_global_rows"
    assert ex.check_flop_ratio(5.0).mistake == "generic"
