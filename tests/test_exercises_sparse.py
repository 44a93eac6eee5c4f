"""Chapter 9's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn import sparse as library
from attn.exercises import sparse as ex
from attn.sparsemax import sparsemax as library_sparsemax


def test_solutions_agree_with_the_library() -> None:
    for n, stride in ((12, 3), (16, 4), (5, 8), (9, 1)):
        assert torch.equal(ex.strided_mask(n, stride), library.strided_mask(n, stride))
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (4, 3, 9), generator=g).float()
    for k in (1, 2, 5, 9):
        assert torch.equal(ex.topk_mask(scores, k), library.topk_mask(scores, k))
    z = torch.randn(5, 11, generator=g, dtype=torch.float64) * 2
    assert torch.allclose(ex.sparsemax(z), library_sparsemax(z))


def _strided_loop(n, stride, bug=""):  # type: ignore[no-untyped-def]
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if j > i and bug != "future":
                continue
            d = abs(i - j)
            near = d <= stride and bug != "no_band"
            col = (j % stride == 0) if bug == "anchored" else ((i - j) % stride == 0)
            out[i, j] = near or (col and bug != "no_col")
    return out


def test_strided_right_and_wrong_answers() -> None:
    assert ex.check_strided_mask(_strided_loop).passed
    table = {"future": "not_causal", "no_band": "columns_only", "no_col": "band_only",
             "anchored": "columns_from_zero"}
    for bug, name in table.items():
        report = ex.check_strided_mask(lambda n, s, bug=bug: _strided_loop(n, s, bug))
        assert not report.passed and report.mistake == name, (name, report.text())


def _topk_loop(scores, k, bug=""):  # type: ignore[no-untyped-def]
    flat = scores.reshape(-1, scores.shape[-1])
    out = torch.zeros(flat.shape, dtype=torch.bool)
    for r, row in enumerate(flat.tolist()):
        keys = list(range(len(row)))
        if bug == "high":
            keys = keys[::-1]
        ranked = sorted(keys, key=lambda j: -row[j])  # Python's sort is stable
        if bug == "low":
            ranked = sorted(keys, key=lambda j: row[j])
        chosen = ranked[:k]
        if bug == "ties":
            chosen = [j for j in keys if row[j] >= row[ranked[k - 1]]]
        for j in chosen:
            out[r, j] = True
    return out.reshape(scores.shape)


def test_topk_right_and_wrong_answers() -> None:
    assert ex.check_topk_mask(_topk_loop).passed
    table = {"high": "ties_to_higher_index", "low": "smallest", "ties": "ties_kept"}
    for bug, name in table.items():
        report = ex.check_topk_mask(lambda s, k, bug=bug: _topk_loop(s, k, bug))
        assert not report.passed and report.mistake == name, (name, report.text())


def _sparsemax_other(z, bug=""):  # type: ignore[no-untyped-def]
    """Sparsemax by scanning the sorted scores for the support, a different route to τ."""
    zs, _ = z.sort(-1, descending=True)
    n = z.shape[-1]
    taus = []
    for row in zs.reshape(-1, n):
        running, k = 0.0, 0
        for idx in range(n):
            if bug != "all" and not 1 + (idx + 1) * row[idx] > running + row[idx]:
                break  # the support is a prefix of the sorted scores
            running, k = running + row[idx], idx + 1
        if bug == "few":
            running = running - row[k - 1]
        taus.append((running - 1) / k)
    tau = torch.stack(taus).reshape(*z.shape[:-1], 1)
    return z - tau if bug == "neg" else (z - tau).relu()


def test_sparsemax_right_and_wrong_answers() -> None:
    assert ex.check_sparsemax(_sparsemax_other).passed
    table = {"all": "no_support", "few": "one_too_few", "neg": "no_clamp"}
    for bug, name in table.items():
        report = ex.check_sparsemax(lambda z, bug=bug: _sparsemax_other(z, bug))
        assert not report.passed and report.mistake == name, (name, report.text())
    assert ex.check_sparsemax(lambda z: z.softmax(-1)).mistake == "softmax"
    detached = ex.check_sparsemax(lambda z: ex.sparsemax(z.detach()))
    assert not detached.passed and "gradient" in detached.diagnosis
