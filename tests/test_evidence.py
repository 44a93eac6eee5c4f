"""The evidence ledger (attn.evidence) and its collection by the build.

Verdicts are computed from the per-seed values: disjoint ranges, a paired test,
or interleaved timing ratios; censored runs count and sort last; the build
writes ``claims.json`` and the appendix and fails on a contradicted claim.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

from attn.evidence import METADATA_KEY, Claim, Ledger, describe, format_value, interleaved_times

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book"))
import build  # noqa: E402


def claim(arms, expect, **kw):
    return Claim(chapter=7, claim="a claim", metric="accuracy", arms=arms, expect=expect, **kw)


def test_disjoint_ranges_separate_and_support_the_declared_direction():
    c = claim({"A": [0.9, 0.92, 0.95], "B": [0.5, 0.6, 0.7]}, "A > B")
    assert c.verdict == "A > B" and c.status == "supported"
    assert claim({"A": [0.9, 0.92, 0.95], "B": [0.5, 0.6, 0.7]}, "B > A").status == "contradicted"
    assert claim({"A": [0.9, 0.92, 0.95], "B": [0.5, 0.6, 0.7]}, "B < A").status == "supported"


def test_overlapping_ranges_do_not_separate_and_a_declared_null_is_supported():
    arms = {"A": [0.90, 0.70, 0.95], "B": [0.80, 0.85, 0.75]}
    assert claim(arms, "A > B").verdict == "no separation at this budget"
    assert claim(arms, "A > B").status == "not shown"
    assert claim(arms, "A ~ B").status == "supported"
    assert claim({"A": [1, 1, 1], "B": [0, 0, 0]}, "A ~ B").status == "contradicted"


def test_a_claim_without_a_declared_direction_is_measured_and_never_contradicted():
    c = claim({"A": [0.9, 0.92, 0.95], "B": [0.5, 0.6, 0.7]}, "A ? B")
    assert c.verdict == "A > B" and c.status == "measured" and "No direction declared" in c.sentence()
    assert claim({"A": [0.9, 0.7, 0.95], "B": [0.8, 0.85, 0.75]}, "B ? A").status == "measured"


def test_paired_test_separates_overlapping_ranges_when_every_seed_agrees():
    # ranges overlap, but A beats B by ~0.05 on every seed: the paired t-test decides
    arms = {"A": [0.60, 0.80, 0.71, 0.90], "B": [0.55, 0.74, 0.67, 0.85]}
    assert claim(arms, "A > B").status == "not shown"
    paired = claim(arms, "A > B", rule="paired")
    assert paired.p_value() is not None and paired.p_value() < 0.05
    assert paired.verdict == "A > B" and paired.status == "supported"
    noisy = claim({"A": [0.6, 0.8, 0.7], "B": [0.65, 0.75, 0.72]}, "A > B", rule="paired")
    assert noisy.p_value() > 0.05 and noisy.status == "not shown"


def test_censored_runs_are_counted_and_sort_after_every_reached_value():
    # steps to reach 0.9: B never reached it in two of three seeds (budget 400)
    c = claim({"A": [120, 150, 140], "B": [300, None, None]}, "A < B", censor_at=400)
    assert c.verdict == "A < B" and c.status == "supported"
    assert c.mean("B") is None and c.median("B") is None and c.censored("B") == 2
    assert c.range("B") == (300, None)
    # dropping the censored seeds would give B a mean of 300: the table never shows one
    assert "> 400" in c.to_text() and "300.000" not in c.to_text()
    both = claim({"A": [None, 150, 140], "B": [300, 320, 310]}, "A < B", censor_at=400)
    assert both.status == "not shown"  # A's censored seed overlaps B's range
    assert describe([300, None, None], censor_at=400) == "median > 400 (300–> 400, 3 seeds, 2 not reached by 400)"


def test_an_absolute_margin_keeps_arms_at_chance_from_separating_by_rounding():
    at_chance = {"L=2": [0.131, 0.133, 0.134], "L=1": [0.121, 0.124, 0.129]}  # disjoint by 0.002
    assert claim(at_chance, "L=2 ~ L=1").status == "contradicted"
    margin = claim(at_chance, "L=2 ~ L=1", tolerance=0.02)
    assert margin.status == "supported" and "within 0.02 count as none" in margin.sentence()
    # a real gap still separates, in both directions and under the paired rule
    assert claim({"A": [0.9, 0.92, 0.95], "B": [0.5, 0.6, 0.7]}, "A > B", tolerance=0.02).status == "supported"
    assert claim({"A": [0.9, 0.92, 0.95], "B": [0.5, 0.6, 0.7]}, "B ~ A", tolerance=0.02).status == "contradicted"
    paired = {"A": [0.50, 0.61, 0.72], "B": [0.49, 0.60, 0.71]}  # consistent 0.01: significant, but inside 0.02
    assert claim(paired, "A ~ B", rule="paired").status == "contradicted"
    assert claim(paired, "A ~ B", rule="paired", tolerance=0.02).status == "supported"
    assert Claim.from_json(margin.to_json()).status == "supported"
    with pytest.raises(ValueError, match="margin"):
        claim(at_chance, "L=2 ~ L=1", tolerance=-0.1)
    assert claim({"s": [100, 200, 150], "t": [400, 500, 450]}, "s < t", tolerance=50).status == "supported"


def test_timing_claims_compare_interleaved_ratios():
    fast_then_slow = {"fast": [1.0, 1.1, 0.9, 1.0, 1.05], "slow": [2.0, 2.1, 2.2, 1.9, 2.0]}
    assert claim(fast_then_slow, "fast < slow", rule="ratio").status == "supported"
    noisy = {"a": [1.0, 1.2, 0.9, 1.0, 1.1], "b": [1.1, 1.0, 1.0, 0.95, 1.2]}
    c = claim(noisy, "a < b", rule="ratio")
    assert c.verdict == "no separation at this budget" and "ratio a / b" in c.sentence()
    with pytest.raises(ValueError, match="positive"):
        claim({"a": [1.0, 0.0, 1.0], "b": [1.0, 1.0, 1.0]}, "a < b", rule="ratio")
    # a consistent 2 % is no difference within a 5 % tolerance, and a difference without one
    steady = {"a": [1.02, 1.03, 1.02], "b": [1.0, 1.0, 1.0]}
    assert claim(steady, "a ~ b", rule="ratio", tolerance=0.05).status == "supported"
    assert claim(steady, "a ~ b", rule="ratio").status == "contradicted"
    with pytest.raises(ValueError, match="tolerance"):
        claim(steady, "a ~ b", rule="ratio", tolerance=1.5)


def test_interleaved_times_measures_each_callable_per_repeat():
    import time

    times = interleaved_times({"short": lambda: None, "long": lambda: time.sleep(0.002)}, repeats=3, min_run_time=0.01)
    assert [len(v) for v in times.values()] == [3, 3]
    assert min(times["long"]) > max(times["short"])


@pytest.mark.parametrize(
    "arms, expect, kw, match",
    [
        ({"A": [1, 2], "B": [1, 2, 3]}, "A > B", {}, "needs >= 3"),
        ({"A": [1, 2, 3]}, "A > B", {}, "at least two arms"),
        ({"A": [1, 2, 3], "B": [1, 2, 3]}, "A > C", {}, "must name two arms"),
        ({"A": [1, 2, 3], "B": [1, 2, 3]}, "A>B", {}, "with spaces"),
        ({"A": [1, 2, float("nan")], "B": [1, 2, 3]}, "A > B", {}, "non-finite"),
        ({"A": [1, 2, None], "B": [1, 2, 3]}, "A > B", {}, "censor_at"),
        ({"A": [1, 2, 3, 4], "B": [1, 2, 3]}, "A > B", {"rule": "paired"}, "as many"),
        ({"A": [1, 2, 3], "B": [1, 2, 3]}, "A > B", {"rule": "bootstrap"}, "rule must be"),
    ],
)
def test_bad_claims_are_refused_with_the_reason(arms, expect, kw, match):
    with pytest.raises(ValueError, match=match):
        claim(arms, expect, **kw)


def test_json_round_trip_recomputes_the_verdict():
    c = claim({"A": [0.9, 0.92, 0.95], "B": [0.5, None, 0.7]}, "A > B", censor_at=1.0, note="400 steps")
    record = c.to_json()
    assert set(record) >= {"chapter", "claim", "metric", "expected", "verdict", "arms"}
    assert json.loads(json.dumps(record)) == record
    record["verdict"], record["status"] = "B > A", "supported"  # a stale or forged verdict is ignored
    again = Claim.from_json(record)
    assert again.verdict == "no separation at this budget" and again.status == "not shown"


def test_ledger_displays_a_table_and_a_verdict_with_the_claim_in_the_metadata(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **kw: shown.append((a, kw)))
    ledger = Ledger(chapter=12)
    c = ledger.claim("FNet recalls less than attention", metric="recall accuracy",
                     arms={"attention": [1.0, 0.98, 0.99], "FNet": [0.2, 0.25, 0.3]}, expect="attention > FNet")
    (bundle,), kw = shown[0]
    assert kw["raw"] and kw["metadata"][METADATA_KEY] == c.to_json()
    assert "<table>" in bundle["text/html"] and "Verdict." in bundle["text/html"]
    assert "seed 2" in bundle["text/plain"] and "supported" in bundle["text/plain"]
    assert list(ledger.table()["status"]) == ["supported"]
    assert c.describe("FNet") == "0.250 (0.200–0.300, 3 seeds)"


def test_format_value():
    assert format_value(None, 400) == "> 400" and format_value(1234.5) == "1,234" and format_value(0.12345) == "0.123"


def _executed(path: Path, records: list[dict]) -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("ledger.claim(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "claim"}, metadata={METADATA_KEY: r})
                    for r in records]
    nb.cells = [cell]
    nbformat.write(nb, path)
    return path


def test_build_collects_claims_writes_the_ledger_and_fails_on_a_contradiction(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "REPORTS", tmp_path / "reports")
    good = claim({"A": [0.9, 0.92, 0.95], "B": [0.5, 0.6, 0.7]}, "A > B").to_json()
    null = claim({"A": [0.9, 0.7, 0.95], "B": [0.8, 0.85, 0.75]}, "A > B").to_json()
    nb = _executed(tmp_path / "07_co_attention.ipynb", [good, null])
    page = tmp_path / "evidence.md"
    assert build.write_evidence([nb], page) == []
    ledger = json.loads((tmp_path / "reports" / "claims.json").read_text())
    assert [c["status"] for c in ledger] == ["supported", "not shown"]
    assert all(set(c) >= {"chapter", "claim", "metric", "expected", "verdict", "arms"} for c in ledger)
    text = page.read_text()
    assert "# The evidence" in text and "2 claims" in text and "0.923 (0.900–0.950, 3 seeds)" in text
    assert "(../notebooks/07_co_attention.ipynb)" in text
    # the notebook's stored verdict says "supported"; the values say otherwise: the build recomputes and fails
    bad = dict(good, expected="B > A")
    nb2 = _executed(tmp_path / "10_hybrid_attention.ipynb", [bad])
    problems = build.write_evidence([nb, nb2], page)
    assert len(problems) == 1 and "expected B > A, measured B < A" in problems[0]


def test_the_evidence_page_is_in_the_table_of_contents():
    assert "book/evidence" in build.toc_text() and "evidence" in build.GENERATED_PAGES
