r"""The evidence ledger: every claim the book makes about learning or cost, with a computed verdict.

A chapter that says "GATv2 beats GAT" or "the gate removes the sink" states a
**claim**: two named **arms** (the mechanism and its strongest fair
alternative), a **metric**, one value per seed per arm (at least 3), and the
**direction** the chapter expects. The verdict is computed, never typed:

* ``A > B`` (or ``A < B``) when the ranges over seeds are disjoint, or, with
  ``rule="paired"`` (both arms trained on the same seeds and batches), when a
  two-sided paired *t*-test over the seeds gives :math:`p < 0.05`;
  with ``rule="ratio"`` (interleaved timing repeats) when every paired ratio
  :math:`a_i / b_i` lies on the same side of 1, beyond ``tolerance`` (5 % for
  :meth:`Ledger.timing`: a consistent 1 % is within a timer's repeatability);
* otherwise ``no separation at this budget``.

For ``rule="disjoint"`` and ``"paired"``, ``tolerance`` is an absolute margin in the
metric's units (an *equivalence margin*): ranges must lie more than ``tolerance``
apart, and a significant paired test counts only when the mean difference exceeds
it. A declared null result (``A ~ B``) between two arms at chance, or two at
ceiling, then does not turn into a "separation" by a few thousandths that another
machine's rounding could reverse.

A run that never reached a target (steps-to-target) is **censored**: its value
is ``None``, read as "more than ``censor_at``", and it sorts after every value
that was reached. It is counted, never dropped (dropping it would favour the arm
that failed). A claim's **status** compares the verdict with the declared
direction: ``supported``, ``not shown`` (no separation where one was expected)
or ``contradicted`` (the opposite separation, or a separation where the chapter
declared none, ``expect="A ~ B"``); ``expect="A ? B"`` declares no direction
(a measurement whose answer depends on the machine, e.g. which of two fused
kernels is faster), status ``measured``. The book's build fails on a
contradicted claim, so that no claim goes stale when the code or a budget changes.

In a notebook::

    ledger = Ledger(chapter=17)
    ledger.claim("Only GATv2 can rank neighbours by their match with the query node",
                 metric="test accuracy", arms={"GATv2": [...], "GAT": [...]},
                 expect="GATv2 > GAT")

renders a table (one column per seed, mean and range) and a one-line verdict,
and stores the claim as JSON in the output's metadata (key
:data:`METADATA_KEY`). ``book/build.py`` collects them from the executed
notebooks into ``_build/reports/claims.json`` and the appendix page "The
evidence", re-computing each verdict with this module.

Standard: ``EVIDENCE.md`` (arms, seeds, censoring, computed verdicts).
"""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "METADATA_KEY",
    "MIN_SEEDS",
    "Claim",
    "Ledger",
    "describe",
    "interleaved_times",
    "format_value",
]

#: Key of the claim's JSON in a notebook output's metadata.
METADATA_KEY = "attn_claim"
#: Fewest values per arm a claim accepts.
MIN_SEEDS = 3
#: Significance level of the paired test.
ALPHA = 0.05

Rule = Literal["disjoint", "paired", "ratio"]
Relation = Literal[">", "<", "~", "?"]
NO_SEPARATION = "no separation at this budget"
STATUSES = ("supported", "not shown", "contradicted", "measured")

Value = float | None


def format_value(x: float | None, censor_at: float | None = None, digits: int = 3) -> str:
    """A value as the tables print it; a censored one as ``> censor_at``."""
    if x is None:
        return f"> {censor_at:g}" if censor_at is not None else "not reached"
    if x == 0:
        return "0"
    if abs(x) >= 1000 or float(x).is_integer():
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 else f"{x:.{digits}f}"


def _sort_key(x: Value) -> float:
    return math.inf if x is None else x


def _parse_expect(expect: str, arms: Sequence[str]) -> tuple[str, Relation, str]:
    for rel in (" > ", " < ", " ~ ", " ? "):
        if rel in expect:
            a, b = (s.strip() for s in expect.split(rel, 1))
            if a not in arms or b not in arms:
                raise ValueError(f"expect={expect!r} must name two arms among {list(arms)}")
            if a == b:
                raise ValueError(f"expect={expect!r} compares an arm with itself")
            return a, rel.strip(), b  # type: ignore[return-value]
    raise ValueError(f"expect={expect!r} must read 'A > B', 'A < B', 'A ~ B' (no separation) or 'A ? B' "
                     "(no direction declared), with spaces")


@dataclass
class Claim:
    """One claim: arms, metric, one value per seed per arm, the expected direction, a computed verdict.

    ``arms`` maps each arm's name to its values, one per seed, in seed order
    (``None``: censored, "more than ``censor_at``"). Arms other than the two
    that ``expect`` names are context (a floor, an upper bound) shown in the
    table. ``expect`` reads ``"A > B"``, ``"A < B"`` or ``"A ~ B"`` (the chapter
    declares that the two do not separate). ``rule`` picks the test (module
    docstring). ``seeds`` labels the columns (default ``0 .. n-1``);
    ``note`` says what the budget was or what the claim leaves out;
    ``tolerance``: with ``rule="ratio"``, ratios within ``1 ± tolerance``
    count as no difference; otherwise an absolute margin in the metric's units
    (ranges closer than it, or a mean paired difference smaller than it, count
    as no separation). Default 0.
    """

    chapter: int
    claim: str
    metric: str
    arms: dict[str, list[Value]]
    expect: str
    rule: Rule = "disjoint"
    censor_at: float | None = None
    seeds: list[Any] | None = None
    note: str = ""
    tolerance: float = 0.0
    a: str = field(init=False)
    relation: Relation = field(init=False)
    b: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.chapter, int) or self.chapter < 0:
            raise ValueError(f"chapter must be a non-negative int, got {self.chapter!r}")
        if not self.claim.strip() or not self.metric.strip():
            raise ValueError("a claim needs its sentence and its metric")
        if self.rule not in ("disjoint", "paired", "ratio"):
            raise ValueError(f"rule must be 'disjoint', 'paired' or 'ratio', got {self.rule!r}")
        if len(self.arms) < 2:
            raise ValueError(f"a claim compares at least two arms, got {list(self.arms)}")
        arms: dict[str, list[Value]] = {}
        for name, values in self.arms.items():
            vals = [None if v is None else float(v) for v in values]
            if len(vals) < MIN_SEEDS:
                raise ValueError(f"arm {name!r} has {len(vals)} value(s); a claim needs >= {MIN_SEEDS} (one per seed)")
            if any(v is not None and not math.isfinite(v) for v in vals):
                raise ValueError(f"arm {name!r} has a non-finite value {vals}; a run that diverged is a result to report, "
                                 "not a number to average: record it as censored (None) or fix the run")
            if any(v is None for v in vals) and self.censor_at is None:
                raise ValueError(f"arm {name!r} has censored values (None): pass censor_at= (the budget they did not reach)")
            arms[str(name)] = vals
        self.arms = arms
        self.a, self.relation, self.b = _parse_expect(self.expect, list(arms))
        if self.rule in ("paired", "ratio") and len(arms[self.a]) != len(arms[self.b]):
            raise ValueError(f"rule={self.rule!r} pairs the values of {self.a!r} and {self.b!r}: they need as many "
                             f"(got {len(arms[self.a])} and {len(arms[self.b])})")
        if self.rule == "ratio" and not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1) for rule='ratio', got {self.tolerance}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be a finite margin >= 0, got {self.tolerance}")
        if self.rule == "ratio" and any(v is None or v <= 0 for v in arms[self.a] + arms[self.b]):
            raise ValueError("rule='ratio' needs positive, uncensored values (timings)")
        if self.seeds is not None and len(self.seeds) != max(len(v) for v in arms.values()):
            raise ValueError(f"seeds has {len(self.seeds)} labels for {max(len(v) for v in arms.values())} values")

    # ------------------------------------------------------------------ statistics
    def values(self, arm: str) -> list[Value]:
        return self.arms[arm]

    def censored(self, arm: str) -> int:
        return sum(v is None for v in self.arms[arm])

    def range(self, arm: str) -> tuple[Value, Value]:
        """``(min, max)`` over seeds; a censored value is the largest."""
        vals = sorted(self.arms[arm], key=_sort_key)
        return vals[0], vals[-1]

    def mean(self, arm: str) -> float | None:
        """Mean over seeds, ``None`` when a value is censored (the mean of the reached ones would flatter the arm)."""
        vals = self.arms[arm]
        return None if any(v is None for v in vals) else statistics.fmean(v for v in vals if v is not None)

    def median(self, arm: str) -> Value:
        """Median over seeds (censored values sort last, so it is defined while fewer than half are censored)."""
        vals = sorted(self.arms[arm], key=_sort_key)
        n = len(vals)
        lo, hi = vals[(n - 1) // 2], vals[n // 2]
        if lo is None or hi is None:
            return None
        return (lo + hi) / 2

    def p_value(self) -> float | None:
        """Two-sided paired *t*-test of ``a`` against ``b`` over the seeds (``rule="paired"``); ``None`` otherwise."""
        if self.rule != "paired":
            return None
        xs, ys = self.arms[self.a], self.arms[self.b]
        if any(v is None for v in xs + ys):
            return None  # censored pairs: the ranges decide
        diffs = [x - y for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
        if all(d == diffs[0] for d in diffs):
            return 0.0 if diffs[0] != 0 else 1.0
        from scipy import stats  # loaded on use: ``import attn`` stays light

        return float(stats.ttest_1samp(diffs, 0.0).pvalue)

    def ratios(self) -> list[float]:
        """Paired ratios ``a_i / b_i`` (``rule="ratio"``)."""
        return [x / y for x, y in zip(self.arms[self.a], self.arms[self.b], strict=True)
                if x is not None and y is not None]

    def separation(self) -> Relation:
        """``">"``, ``"<"`` (``a`` against ``b``) or ``"~"`` (no separation), by the claim's rule."""
        if self.rule == "ratio":
            r = self.ratios()
            return ">" if min(r) > 1 + self.tolerance else "<" if max(r) < 1 - self.tolerance else "~"
        (alo, ahi), (blo, bhi) = self.range(self.a), self.range(self.b)
        tol = self.tolerance
        if _sort_key(alo) > _sort_key(bhi) + tol:
            return ">"
        if _sort_key(ahi) + tol < _sort_key(blo):
            return "<"
        p = self.p_value()
        if p is not None and p < ALPHA:
            diffs = [x - y for x, y in zip(self.arms[self.a], self.arms[self.b], strict=True)
                     if x is not None and y is not None]
            mean_diff = statistics.fmean(diffs)
            if abs(mean_diff) > tol:
                return ">" if mean_diff > 0 else "<"
        return "~"

    @property
    def verdict(self) -> str:
        rel = self.separation()
        return NO_SEPARATION if rel == "~" else f"{self.a} {rel} {self.b}"

    @property
    def status(self) -> str:
        """``supported``, ``not shown`` or ``contradicted`` (the verdict against the declared direction)."""
        rel = self.separation()
        if self.relation == "?":
            return "measured"
        if rel == self.relation:
            return "supported"
        if self.relation == "~" or rel != "~":
            return "contradicted"
        return "not shown"

    def _evidence(self) -> str:
        if self.rule == "ratio":
            r = sorted(self.ratios())
            tol = f", differences within {self.tolerance:.0%} count as none" if self.tolerance else ""
            return (f"ratio {self.a} / {self.b}: min {r[0]:.3g}, median {statistics.median(r):.3g}, max {r[-1]:.3g} "
                    f"over {len(r)} interleaved repeats{tol}")
        (alo, ahi), (blo, bhi) = self.range(self.a), self.range(self.b)
        c = self.censor_at
        text = (f"{self.a} [{format_value(alo, c)}, {format_value(ahi, c)}] vs "
                f"{self.b} [{format_value(blo, c)}, {format_value(bhi, c)}]")
        text += ", ranges disjoint" if self.separation() != "~" and self.p_value() is None else ""
        p = self.p_value()
        if p is not None:
            text += f", paired t-test over {len(self.arms[self.a])} seeds p = {p:.2g}"
        if self.tolerance:
            text += f", differences within {self.tolerance:.3g} count as none"
        return text

    def sentence(self) -> str:
        """The one-line verdict: what was expected, what the run shows, and whether it supports it."""
        if self.relation == "?":
            return f"No direction declared; measured: {self.verdict} ({self._evidence()})."
        expected = (f"{self.a} {self.relation} {self.b}" if self.relation != "~"
                    else f"no separation of {self.a} and {self.b}")
        return f"Expected {expected}; measured: {self.verdict} ({self._evidence()}): {self.status}."

    # ------------------------------------------------------------------ rendering
    def describe(self, arm: str) -> str:
        """``"0.912 (0.884–0.940, 3 seeds)"``: the arm's mean (or median with censoring) and range, for prose."""
        return describe(self.arms[arm], censor_at=self.censor_at, unit="repeats" if self.rule == "ratio" else "seeds")

    def rows(self) -> list[dict[str, str]]:
        n = max(len(v) for v in self.arms.values())
        labels = [str(s) for s in (self.seeds if self.seeds is not None else range(n))]
        out = []
        for name, vals in self.arms.items():
            row = {"arm": name}
            for label, v in zip(labels, vals, strict=False):
                row[f"seed {label}" if self.rule != "ratio" else f"repeat {label}"] = format_value(v, self.censor_at)
            mean = self.mean(name)
            row["mean" if mean is not None else "median"] = format_value(
                mean if mean is not None else self.median(name), self.censor_at)
            lo, hi = self.range(name)
            row["range"] = f"{format_value(lo, self.censor_at)} – {format_value(hi, self.censor_at)}"
            out.append(row)
        return out

    def to_html(self) -> str:
        rows = self.rows()
        cols = list(dict.fromkeys(k for r in rows for k in r))
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows
        )
        note = f' <span class="attn-claim-note">{html.escape(self.note)}</span>' if self.note else ""
        return (
            f'<div class="attn-claim attn-claim-{self.status.replace(" ", "-")}">'
            f'<p class="attn-claim-title"><strong>Claim.</strong> {html.escape(self.claim)} '
            f"<em>({html.escape(self.metric)})</em></p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f'<p class="attn-claim-verdict"><strong>Verdict.</strong> {html.escape(self.sentence())}{note}</p></div>'
        )

    def to_text(self) -> str:
        rows = self.rows()
        cols = list(dict.fromkeys(k for r in rows for k in r))
        widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in cols}
        lines = [f"Claim: {self.claim} ({self.metric})",
                 "  ".join(c.ljust(widths[c]) for c in cols)]
        lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in cols) for r in rows]
        lines.append(f"Verdict: {self.sentence()}" + (f" {self.note}" if self.note else ""))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return self.to_html()

    def __str__(self) -> str:
        return self.to_text()

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """The ledger's record: ``{chapter, claim, metric, expected, verdict, status, arms: {name: [value per seed]}, ...}``."""
        return {
            "chapter": self.chapter,
            "claim": self.claim,
            "metric": self.metric,
            "expected": self.expect,
            "verdict": self.verdict,
            "status": self.status,
            "rule": self.rule,
            "p_value": self.p_value(),
            "censor_at": self.censor_at,
            "seeds": self.seeds,
            "note": self.note,
            "tolerance": self.tolerance,
            "arms": {k: list(v) for k, v in self.arms.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Claim:
        """Rebuild a claim from its record; the verdict is computed again, not read back."""
        return cls(
            chapter=int(d["chapter"]), claim=d["claim"], metric=d["metric"], arms=dict(d["arms"]),
            expect=d["expected"], rule=d.get("rule", "disjoint"), censor_at=d.get("censor_at"),
            seeds=d.get("seeds"), note=d.get("note", ""), tolerance=d.get("tolerance", 0.0),
        )


def describe(values: Sequence[Value], censor_at: float | None = None, digits: int = 3, unit: str = "seeds") -> str:
    """Mean (median when censored) and range of per-seed values, for a sentence: ``"0.912 (0.884–0.940, 3 seeds)"``.

    ``unit`` names what the values are one per (``"seeds"``, ``"repeats"`` for timings, ``"datasets"``).
    """
    vals = list(values)
    if not vals:
        raise ValueError("describe needs at least one value")
    c = Claim.__new__(Claim)  # reuse the statistics without validating a two-arm claim
    c.arms = {"x": [None if v is None else float(v) for v in vals]}
    c.censor_at = censor_at
    lo, hi = c.range("x")
    centre = c.mean("x")
    head = format_value(centre, censor_at, digits) if centre is not None else f"median {format_value(c.median('x'), censor_at, digits)}"
    extra = f", {c.censored('x')} not reached by {censor_at:g}" if c.censored("x") and censor_at is not None else ""
    return f"{head} ({format_value(lo, censor_at, digits)}–{format_value(hi, censor_at, digits)}, {len(vals)} {unit}{extra})"


class Ledger:
    """A chapter's claims: :meth:`claim` renders each one and records it in the output's metadata."""

    def __init__(self, chapter: int, display: bool = True) -> None:
        self.chapter = chapter
        self.display = display
        self.claims: list[Claim] = []

    def claim(self, claim: str, *, metric: str, arms: Mapping[str, Sequence[Value]], expect: str,
              rule: Rule = "disjoint", censor_at: float | None = None, seeds: Sequence[Any] | None = None,
              note: str = "", tolerance: float = 0.0) -> Claim:
        """State a claim: its sentence, metric, per-seed values per arm and expected direction; show its verdict."""
        c = Claim(self.chapter, claim, metric, {k: list(v) for k, v in arms.items()}, expect, rule=rule,
                  censor_at=censor_at, seeds=None if seeds is None else list(seeds), note=note, tolerance=tolerance)
        self.claims.append(c)
        if self.display:
            show(c)
        return c

    def timing(self, claim: str, fns: Mapping[str, Callable[[], object]], *, expect: str, repeats: int = 5,
               min_run_time: float = 0.2, note: str = "", tolerance: float = 0.05) -> Claim:
        """A timing claim from interleaved repeats (:func:`interleaved_times`); verdict on the paired ratios.

        Ratios within ``1 ± tolerance`` count as no difference measured.
        """
        times = interleaved_times(fns, repeats=repeats, min_run_time=min_run_time)
        return self.claim(claim, metric="median time per call (ms)", arms=times, expect=expect, rule="ratio", note=note,
                          tolerance=tolerance)

    def table(self) -> Any:
        """All claims of the chapter as a DataFrame (claim, expected, verdict, status)."""
        import pandas as pd

        return pd.DataFrame([{"claim": c.claim, "metric": c.metric, "expected": c.expect, "verdict": c.verdict,
                              "status": c.status} for c in self.claims])


def show(claim: Claim) -> None:
    """Display a claim (HTML table and verdict, a plain-text twin) with its JSON in the output metadata."""
    from IPython.display import display

    display({"text/html": claim.to_html(), "text/plain": claim.to_text()}, raw=True,
            metadata={METADATA_KEY: claim.to_json()})


def interleaved_times(fns: Mapping[str, Callable[[], object]], repeats: int = 5,
                      min_run_time: float = 0.2) -> dict[str, list[float]]:
    """Median ms per call of each callable, measured ``repeats`` times in interleaved order (a, b, a, b, ...).

    Each measurement is a :class:`torch.utils.benchmark.Timer` ``blocked_autorange``
    median (CUDA synchronised by the timer); interleaving spreads the machine's slow
    moments over all the arms, so the paired ratios compare like with like. Each
    callable is warmed up once, before the first round.
    """
    from torch.utils import benchmark as tbench

    if len(fns) < 2 or repeats < MIN_SEEDS:
        raise ValueError(f"interleaved_times needs >= 2 callables and repeats >= {MIN_SEEDS}")
    for fn in fns.values():
        fn()  # warm-up (lazy initialisation, allocator, autotuning)
    timers = {name: tbench.Timer(stmt="fn()", globals={"fn": fn}) for name, fn in fns.items()}
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, timer in timers.items():
            out[name].append(float(timer.blocked_autorange(min_run_time=min_run_time).median) * 1e3)
    return out
