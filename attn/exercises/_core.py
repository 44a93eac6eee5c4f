"""The machinery behind every exercise: run the reader's answer against the solution, diagnose the difference.

An :class:`Exercise` holds the solution (a function in the package, shown on the page from its source), the
random inputs it is checked on, and a table of typical :class:`Mistake` s, each an implementation with exactly
that mistake and the diagnosis to give. :meth:`Exercise.check` runs the reader's answer on every input:

1. a stub that raises ``NotImplementedError`` (or the answer ``None``) is *not attempted*, not a failure,
   so a notebook runs top to bottom before the reader writes anything;
2. an answer that raises, returns the wrong type, shape or dtype, modifies its input in place, or returns
   NaN is told exactly that, with the input that triggered it;
3. an answer that agrees with the solution on every input (values, and gradients where the exercise asks)
   passes;
4. otherwise the answer is compared with every mistake in the table on the same inputs: an answer that
   behaves like one of them gets that mistake's diagnosis (derived from behaviour, not from the code);
5. an answer like none of them gets a diagnosis computed from the difference itself: a constant factor,
   a transpose, rows that do not sum to one, the largest error and where it is.

Two kinds of exercise: ``"function"`` (the reader writes a function, called on the exercise's inputs) and
``"value"`` (the reader predicts or measures a value, compared with the one the solution computes).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["Case", "Mistake", "Exercise", "Report", "NOT_ATTEMPTED", "describe_difference", "letter_set"]

#: the status of a stub that still raises ``NotImplementedError``
NOT_ATTEMPTED = "not attempted"


@dataclass(frozen=True)
class Case:
    """One input to a ``"function"`` exercise: positional and keyword arguments and a label for messages."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def describe(self) -> str:
        """A short description of the input, naming tensor shapes (``label`` when given)."""
        if self.label:
            return self.label
        parts = [_short(a) for a in self.args] + [f"{k}={_short(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: an implementation with exactly this mistake, and what to tell the reader.

    Attributes:
        name: a short identifier, e.g. ``"no_scale"`` (tests assert that a wrong answer gets *this* one).
        diagnosis: one or two sentences, Markdown: what is wrong and how to fix it.
        fn: for a ``"function"`` exercise, a function with the solution's signature and this mistake; for a
            ``"value"`` exercise, a function of no arguments returning the typical wrong value.
    """

    name: str
    diagnosis: str
    fn: Callable[..., Any]


@dataclass
class Report:
    """The outcome of a check; shown in a notebook as a short coloured paragraph.

    Attributes:
        exercise: the exercise's title.
        status: ``"passed"``, ``"failed"`` or :data:`NOT_ATTEMPTED`.
        diagnosis: what is wrong (empty when passed).
        mistake: the name of the matched :class:`Mistake`, ``"generic"`` for a computed diagnosis, or
            ``None`` when passed or not attempted.
        cases: the number of inputs checked.
    """

    exercise: str
    status: str
    diagnosis: str = ""
    mistake: str | None = None
    cases: int = 0

    @property
    def passed(self) -> bool:
        """``True`` when the answer agreed with the solution on every input."""
        return self.status == "passed"

    def __bool__(self) -> bool:
        return self.passed

    def require(self) -> Report:
        """Raise ``AssertionError`` with the diagnosis unless the answer passed (the book's solution cells)."""
        if not self.passed:
            raise AssertionError(f"{self.exercise}: {self.status}: {self.diagnosis}")
        return self

    def text(self) -> str:
        """One line of plain text."""
        if self.passed:
            return f"[passed] {self.exercise}: agrees with the solution on {self.cases} input(s)."
        if self.status == NOT_ATTEMPTED:
            return f"[not attempted] {self.exercise}: {self.diagnosis}"
        return f"[not yet] {self.exercise}: {self.diagnosis}"

    def __str__(self) -> str:
        return self.text()

    def _repr_markdown_(self) -> str:
        mark = {"passed": "**Passed.**", NOT_ATTEMPTED: "**Not attempted yet.**"}.get(self.status, "**Not yet.**")
        if self.passed:
            return f"{mark} *{self.exercise}* agrees with the solution on {self.cases} input(s)."
        return f"{mark} *{self.exercise}*: {self.diagnosis}"


@dataclass
class Exercise:
    """One exercise: its solution, its inputs, its table of typical mistakes.

    Args:
        name: identifier (``check_<name>`` is its checker).
        chapter: the chapter number it belongs to.
        title: a few words, shown in reports.
        solution: the reference answer. ``"function"``: called with each case's arguments. ``"value"``:
            called with no argument, returns the value the reader should find.
        cases: ``cases(generator) -> list[Case]`` (``"function"`` only): random inputs covering shapes,
            masks and dtypes; drawn from a fixed seed so that a report does not change between calls.
        mistakes: the table of typical wrong answers, most specific first.
        kind: ``"function"`` or ``"value"``.
        atol, rtol: tolerance of the comparison (values, and gradients when ``grad``).
        grad: also compare the gradients of a random linear function of the output with respect to every
            floating-point tensor argument (the reader's function must be differentiable like the solution).
        compare: ``compare(got, expected) -> message or None`` replaces the default comparison (tensors by
            shape, dtype and values; numbers with the tolerance; anything else with ``==``).
        hint: one sentence added to the generic diagnosis (what to re-read).
    """

    name: str
    chapter: int
    title: str
    solution: Callable[..., Any]
    cases: Callable[[torch.Generator], Sequence[Case]] | None = None
    mistakes: Sequence[Mistake] = ()
    kind: Literal["function", "value"] = "function"
    atol: float = 1e-5
    rtol: float = 1e-4
    grad: bool = False
    compare: Callable[[Any, Any], str | None] | None = None
    hint: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("function", "value"):
            raise ValueError(f"kind must be 'function' or 'value', got {self.kind!r}")
        if self.kind == "function" and self.cases is None:
            raise ValueError(f"exercise {self.name!r}: a 'function' exercise needs cases(generator)")
        names = [m.name for m in self.mistakes]
        if len(set(names)) != len(names) or "generic" in names:
            raise ValueError(f"exercise {self.name!r}: mistake names must be unique and not 'generic': {names}")

    # -- the checker ---------------------------------------------------------------------------------------
    def check(self, answer: Any) -> Report:
        """Check the reader's ``answer`` (a function, or a value for a ``"value"`` exercise)."""
        if self.kind == "value":
            return self._check_value(answer)
        return self._check_function(answer)

    def checker(self) -> Callable[[Any], Report]:
        """``check_<name>``: a function of the answer alone, with this exercise's title in its docstring."""

        def check(answer: Any) -> Report:
            return self.check(answer)

        check.__name__ = check.__qualname__ = f"check_{self.name}"
        what = "your function" if self.kind == "function" else "your value"
        check.__doc__ = f"Check {what} for the exercise *{self.title}* (chapter {self.chapter}) and diagnose it."
        return check

    def source(self) -> str:
        """The solution's source code, as the page shows it."""
        return inspect.getsource(self.solution)

    def inputs(self) -> list[Case]:
        """The inputs the checker uses (always the same: drawn from seed 0)."""
        assert self.cases is not None
        return list(self.cases(torch.Generator().manual_seed(0)))

    def _check_function(self, fn: Any) -> Report:
        if fn is None:
            return Report(self.title, NOT_ATTEMPTED, "write the function, then run this cell again.")
        if not callable(fn):
            return Report(self.title, "failed", f"expected a function, got {type(fn).__name__}.", "generic")
        cases = self.inputs()
        got_all: list[Any] = []
        for case in cases:
            outcome = _call(fn, case, self.grad)
            if isinstance(outcome, _Raised):
                if isinstance(outcome.error, NotImplementedError):
                    return Report(self.title, NOT_ATTEMPTED,
                                  "the function still raises `NotImplementedError`: replace the stub, then run "
                                  "this cell again.")
                return Report(self.title, "failed",
                              f"calling it on {case.describe()} raised `{type(outcome.error).__name__}: "
                              f"{outcome.error}`.", "generic", len(cases))
            if outcome.mutated:
                return Report(self.title, "failed",
                              f"it modified its input argument `{self._arg_name(outcome.mutated)}` in place: work on a copy "
                              "(or use out-of-place operations) so the caller's tensors are unchanged.",
                              "generic", len(cases))
            got_all.append(outcome)
        expected_all = [_call(self.solution, case, self.grad) for case in cases]
        first_bad = None
        for case, got, exp in zip(cases, got_all, expected_all, strict=True):
            assert not isinstance(exp, _Raised), f"the solution of {self.name!r} raised {exp}"
            msg = self._difference(got, exp)
            if msg is not None:
                first_bad = (case, msg)
                break
        if first_bad is None:
            return Report(self.title, "passed", cases=len(cases))
        for mistake in self.mistakes:
            if self._behaves_like(mistake.fn, cases, got_all):
                return Report(self.title, "failed", mistake.diagnosis, mistake.name, len(cases))
        case, msg = first_bad
        text = f"on {case.describe()}: {msg}"
        if self.hint:
            text += " " + self.hint
        return Report(self.title, "failed", text, "generic", len(cases))

    def _behaves_like(self, fn: Callable[..., Any], cases: list[Case], got_all: list[_Outcome]) -> bool:
        for case, got in zip(cases, got_all, strict=True):
            ref = _call(fn, case, self.grad)
            if isinstance(ref, _Raised):
                return False
            # where the mistake itself gives NaN or infinity (a fully masked column, say), any value matches
            ref.value = _fill_undefined(ref.value, got.value)
            if self._difference(got, ref) is not None:
                return False
        return True

    def _difference(self, got: _Outcome, expected: _Outcome) -> str | None:
        if self.compare is not None:
            msg = self.compare(got.value, expected.value)
        else:
            msg = describe_difference(got.value, expected.value, self.atol, self.rtol)
        if msg is not None:
            return msg
        for name, g, e in zip(got.grad_names, got.grads, expected.grads, strict=True):
            if e is None:
                continue
            name = self._arg_name(name)
            if g is None:
                return (f"no gradient reaches `{name}`: the output is detached from it (a `.detach()`, "
                        "`torch.no_grad()`, `.item()` or a NumPy round trip breaks the graph).")
            m = describe_difference(g, e, self.atol * 10, self.rtol * 10)
            if m is not None:
                return f"the values agree but the gradient with respect to `{name}` does not: {m}"
        return None

    def _arg_name(self, name: str) -> str:
        """``"#2"`` -> the solution's second parameter name (keyword names pass through)."""
        if not name.startswith("#"):
            return name
        params = list(inspect.signature(self.solution).parameters)
        i = int(name[1:]) - 1
        return params[i] if i < len(params) else name

    def _check_value(self, answer: Any) -> Report:
        if answer is None or answer is ...:
            return Report(self.title, NOT_ATTEMPTED, "fill in your answer, then run this cell again.")
        expected = self.solution()
        msg = (self.compare(answer, expected) if self.compare is not None
               else describe_difference(answer, expected, self.atol, self.rtol))
        if msg is None:
            return Report(self.title, "passed", cases=1)
        for mistake in self.mistakes:
            wrong = mistake.fn()
            same = (self.compare(answer, wrong) if self.compare is not None
                    else describe_difference(answer, wrong, self.atol, self.rtol)) is None
            if same:
                return Report(self.title, "failed", mistake.diagnosis, mistake.name, 1)
        text = msg + (" " + self.hint if self.hint else "")
        return Report(self.title, "failed", text, "generic", 1)


def letter_set(options: str = "abcd", what: str = "answers") -> Callable[[Any, Any], str | None]:
    """A ``compare`` for "which of (a)-(d)...?" exercises: the answer is a string of letters, in any order.

    ``"ad"``, ``"a, d"`` and ``"DA"`` are the same answer; a letter outside ``options`` or a non-string is
    named as such; a wrong set is "not the right set of <what>".
    """

    def compare(got: Any, expected: Any) -> str | None:
        if not isinstance(got, str):
            return f"expected a string of letters such as 'ab', got {type(got).__name__}."
        letters = "".join(sorted(set(got.lower()) - set(" ,")))
        if not set(letters) <= set(options):
            return f"use only the letters {', '.join(options)}; got {got!r}."
        return None if letters == expected else f"{letters!r} is not the right set of {what}."

    return compare


# -- calling the reader's function safely -----------------------------------------------------------------
@dataclass
class _Raised:
    error: BaseException


@dataclass
class _Outcome:
    value: Any
    grads: list[Tensor | None] = field(default_factory=list)
    grad_names: list[str] = field(default_factory=list)
    mutated: str = ""


def _clone(x: Any, grad: bool) -> Any:
    if isinstance(x, Tensor):
        y = x.detach().clone()
        if grad and y.is_floating_point():
            y.requires_grad_(True)
        return y
    if isinstance(x, tuple | list):
        return type(x)(_clone(v, grad) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v, grad) for k, v in x.items()}
    return x


def _call(fn: Callable[..., Any], case: Case, grad: bool) -> _Outcome | _Raised:
    args = tuple(_clone(a, grad) for a in case.args)
    kwargs = {k: _clone(v, grad) for k, v in case.kwargs.items()}
    snapshot = [(f"#{i + 1}", a.detach().clone()) for i, a in enumerate(args) if isinstance(a, Tensor)]
    snapshot += [(k, v.detach().clone()) for k, v in kwargs.items() if isinstance(v, Tensor)]
    try:
        out = fn(*args, **kwargs)
    except Exception as err:  # the reader's code: any error is reported, not raised
        return _Raised(err)
    live = [(f"#{i + 1}", a) for i, a in enumerate(args) if isinstance(a, Tensor)]
    live += [(k, v) for k, v in kwargs.items() if isinstance(v, Tensor)]
    for (name, before), (_, after) in zip(snapshot, live, strict=True):
        if before.shape != after.shape or not torch.equal(before, after.detach()):
            return _Outcome(out, mutated=name)
    outcome = _Outcome(out)
    if grad:
        leaves = [(n, t) for n, t in live if t.requires_grad]
        outs = [t for t in _tensors(out) if t.is_floating_point()]
        outcome.grad_names = [n for n, _ in leaves]
        if not leaves or not outs:
            outcome.grads = [None] * len(leaves)
            return outcome
        gen = torch.Generator().manual_seed(1)
        total = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
        if not isinstance(total, Tensor) or not total.requires_grad:
            outcome.grads = [None] * len(leaves)
            return outcome
        grads = torch.autograd.grad(total, [t for _, t in leaves], allow_unused=True)
        outcome.grads = [None if g is None else g.detach() for g in grads]
    return outcome


def _fill_undefined(ref: Any, got: Any) -> Any:
    """``ref`` with its non-finite entries replaced by ``got``'s (same structure and shape), else ``ref``."""
    if isinstance(ref, Tensor) and isinstance(got, Tensor):
        if ref.shape == got.shape and ref.is_floating_point() and got.is_floating_point():
            bad = ~torch.isfinite(ref)
            if bad.any():
                return torch.where(bad, got.detach().to(ref.dtype), ref)
        return ref
    if isinstance(ref, tuple | list) and isinstance(got, tuple | list) and len(ref) == len(got):
        return type(ref)(_fill_undefined(r, g) for r, g in zip(ref, got, strict=True))
    return ref


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, tuple | list):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _short(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype}".replace("torch.", "") + f" tensor of shape {tuple(x.shape)}"
    if isinstance(x, float):
        return f"{x:g}"
    return repr(x)


# -- describing a difference ------------------------------------------------------------------------------
def describe_difference(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """``None`` when ``got`` matches ``expected``; else one sentence saying how it differs.

    Tensors: type, shape (naming a transpose or a missing/extra dimension), dtype, NaN or infinity, a constant
    factor, rows that should sum to one, then the largest error and its index. Numbers: the tolerance, and
    whether the value is too high or too low. Tuples, lists and dicts: element by element. Anything else:
    equality.
    """
    if isinstance(expected, Tensor):
        return _tensor_difference(got, expected, atol, rtol)
    if isinstance(expected, bool) or isinstance(got, bool):
        return None if got == expected else f"you gave {got!r}, the answer is {expected!r}."
    if isinstance(expected, int | float):
        if isinstance(got, Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, int | float):
            return f"expected a number, got {type(got).__name__}."
        if math.isnan(got):
            return "the value is NaN."
        if math.isclose(got, expected, rel_tol=rtol, abs_tol=atol):
            return None
        side = "too high" if got > expected else "too low"
        return f"{_fmt(got)} is {side}: the answer is {_fmt(expected)}."
    if isinstance(expected, tuple | list):
        if not isinstance(got, tuple | list):
            return f"expected a {type(expected).__name__} of {len(expected)} items, got {type(got).__name__}."
        if len(got) != len(expected):
            return f"expected {len(expected)} items, got {len(got)}."
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            msg = describe_difference(g, e, atol, rtol)
            if msg is not None:
                return f"item {i}: {msg}"
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            keys = sorted(map(str, expected))
            return f"expected a dict with keys {keys}, got {sorted(map(str, got)) if isinstance(got, dict) else type(got).__name__}."
        for k in expected:
            msg = describe_difference(got[k], expected[k], atol, rtol)
            if msg is not None:
                return f"[{k!r}]: {msg}"
        return None
    return None if got == expected else f"you gave {got!r}, the answer is {expected!r}."


def _tensor_difference(got: Any, expected: Tensor, atol: float, rtol: float) -> str | None:
    if not isinstance(got, Tensor):
        return f"expected a tensor of shape {tuple(expected.shape)}, got {type(got).__name__}."
    got = got.detach()
    if got.shape != expected.shape:
        msg = f"the output has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if got.ndim == expected.ndim and sorted(got.shape) == sorted(expected.shape):
            msg += " (the same sizes in another order: a transpose, or the wrong dimension reduced or kept)"
        elif got.ndim == expected.ndim - 1:
            msg += " (one dimension fewer: a sum or mean over a dimension that should stay)"
        elif got.ndim == expected.ndim + 1:
            msg += " (one dimension more: a missing reduction, or broadcasting that added a dimension)"
        return msg + "."
    if expected.dtype == torch.bool or got.dtype == torch.bool:
        if got.dtype != expected.dtype:
            return f"the output has dtype {got.dtype}, expected {expected.dtype}."
        wrong = got != expected
        if not wrong.any():
            return None
        if torch.equal(got, ~expected):
            return "every entry is the opposite of the answer: the mask convention is inverted (here True = may attend)."
        idx = tuple(int(i) for i in wrong.nonzero()[0])
        return (f"{int(wrong.sum())} of {wrong.numel()} entries differ; the first at index {idx}: "
                f"{bool(got[idx])}, expected {bool(expected[idx])}.")
    if expected.is_floating_point() != got.is_floating_point():
        return f"the output has dtype {got.dtype}, expected {expected.dtype}."
    if not expected.is_floating_point():
        if torch.equal(got, expected):
            return None
        wrong = got != expected
        idx = tuple(int(i) for i in wrong.nonzero()[0])
        return (f"{int(wrong.sum())} of {wrong.numel()} entries differ; the first at index {idx}: "
                f"{got[idx].item()}, expected {expected[idx].item()}.")
    g, e = got.double(), expected.double()
    bad_g, bad_e = ~torch.isfinite(g), ~torch.isfinite(e)
    if (bad_g & ~bad_e).any():
        idx = tuple(int(i) for i in (bad_g & ~bad_e).nonzero()[0])
        return (f"the output holds NaN or infinity (first at index {idx}) where the answer is finite: "
                "a fully masked row, a log or division of zero, or an overflow.")
    if torch.equal(bad_g, bad_e) and torch.allclose(g[~bad_e], e[~bad_e], atol=atol, rtol=rtol) \
            and torch.equal(g[bad_e].nan_to_num(), e[bad_e].nan_to_num()):
        return None
    if got.dtype != expected.dtype and torch.allclose(g, e, atol=1e-2, rtol=1e-2):
        return f"the output has dtype {got.dtype}, expected {expected.dtype} (values agree to about 1e-2)."
    finite = ~bad_e & ~bad_g
    ge, ee = g[finite], e[finite]
    if ge.numel() and ee.abs().max() > 0:
        ratio = (ge * ee).sum() / (ee * ee).sum()
        if ratio.abs() > 1e-6 and torch.allclose(ge, ratio * ee, atol=atol * 10, rtol=rtol * 10):
            return f"the output is the answer times a constant {ratio.item():.4g}: a missing or extra scale factor."
        if torch.allclose(ge, -ee, atol=atol, rtol=rtol):
            return "the output is the answer with the opposite sign."
    if e.ndim >= 2 and e.shape[-1] == e.shape[-2] and torch.allclose(g, e.transpose(-1, -2), atol=atol, rtol=rtol):
        return "the output is the answer transposed in its last two dimensions."
    err = (g - e).abs().nan_to_num(float("inf"))
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    msg = (f"the largest error is {err.max().item():.3g} at index {idx}: got {_fmt(g[idx].item())}, "
           f"expected {_fmt(e[idx].item())}")
    if e.ndim >= 1 and (e >= 0).all() and torch.allclose(e.sum(-1), torch.ones((), dtype=e.dtype), atol=1e-4):
        sums = g.sum(-1)
        if not torch.allclose(sums, torch.ones((), dtype=sums.dtype), atol=1e-3):
            lo, hi = sums.min().item(), sums.max().item()
            msg += (f"; the answer's rows sum to 1 but yours sum to {_fmt(lo)}..{_fmt(hi)} (a softmax over the "
                    "wrong dimension, or weights not normalised)")
    return msg + "."


def _fmt(x: float) -> str:
    return f"{x:.4g}"
