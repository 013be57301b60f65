"""Search a kind's input domain for an input that breaks a kernel, with Hypothesis.

Each example is an input drawn from the kind's declaration (``nanlab.kernels.kinds``):
small sizes, and elements that are either one of the domain's extremal values or any
float in the domain. It is judged as a case by the checker itself (``run_case``, at
each dtype: forward and gradient against the reference), and scored by how far past
its floor it is (``CaseResult.excess``). Hypothesis's ``target()`` steers the drawing
towards larger scores; the worst input that fails is then shrunk by Hypothesis to a
minimal one that fails at least as badly, and reported as a Case to paste into a test.
A time budget (``seconds``) ends the search early with what it found by then.

Hypothesis is the optional extra ``search``: without it, ``search()`` raises a
ConfigError naming the extra.
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from nanlab import jsonio
from nanlab.config.schema import KernelConf
from nanlab.errors import ConfigError, install_hint
from nanlab.kernels.check import CaseResult, _dtypes, kernel_name, run_case
from nanlab.kernels.kinds import Kind, resolve

DEFAULT_EXAMPLES = 200
# The search's time budget (wall-clock seconds; kernel.search_seconds), checked between inputs:
# a slow kernel ends its search there with what was found so far, rather than running for minutes.
DEFAULT_SECONDS = KernelConf.search_seconds
# Named sizes are drawn within these bounds: enough for a row to hold a large and a small
# value, small enough that every example costs about a millisecond per dtype. A row of one
# class is left out: its softmax is 1 and its gradient exactly 0, where the gradient's floor
# (taken at its largest magnitude) leaves no room for a correct kernel's rounding.
SIZE_BOUNDS = {"N": (1, 3), "C": (2, 5)}
OTHER_SIZE_BOUNDS = (1, 3)
FOUND_NAME = "found_by_search"


def available() -> bool:
    return importlib.util.find_spec("hypothesis") is not None


def require(key: str = "search", value: object = None) -> None:
    """A one-line ConfigError, naming the extra, when Hypothesis is not installed."""
    if not available():
        raise ConfigError(key, value, f"needs the optional extra search (hypothesis not installed): "
                                      f"{install_hint('search')}")


@dataclass
class SearchResult:
    kernel: str
    kind: str
    examples: int  # how many inputs were drawn and judged, at every dtype (shrinking not counted)
    seconds: float  # CPU seconds of the whole search, shrinking included
    found: Optional[CaseResult] = None  # the worst input's failing result, None when nothing failed
    tensors: list = field(default_factory=list, repr=False)  # that input (float64, long targets)
    keywords: dict = field(default_factory=dict)
    shrink_steps: int = 0  # inputs judged while shrinking the worst one
    shrunk: bool = False  # whether the input was shrunk (the time budget can run out first)
    stopped: str = ""  # why the search ended before its examples were all judged ("" when they were)

    @property
    def passed(self) -> bool:
        return self.found is None and self.examples > 0  # a search that judged nothing proved nothing

    def case_source(self) -> str:
        """The input as Python that builds the Case, for pasting into a test."""
        tensors = ", ".join(_tensor_source(t) for t in self.tensors)
        return (f'Case("{FOUND_NAME}", "{self.kind}", "shrunk by nanlab\'s search",\n'
                f"     lambda g: ([{tensors}], {_value_source(self.keywords)}))")

    def text(self) -> str:
        head = (f"search: {self.kernel} ({self.kind}): {self.examples} example{'s' if self.examples != 1 else ''} "
                f"in {self.seconds:.1f} s")
        cut = [f"  stopped: {self.stopped}"] if self.stopped else []
        if self.found is None:
            verdict = "nothing failed" if self.examples else "FAILED: no input was judged, so nothing was searched"
            return "\n".join([f"{head}: {verdict}", *cut])
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        how = (f"the worst input, shrunk in {self.shrink_steps} steps to {shapes}" if self.shrunk
               else f"the worst input, not shrunk, {shapes}")
        return "\n".join([
            f"{head}: FAILED on {how}",
            *cut,
            f"  {self.found.label}: {self.found.reason}",
            "  paste into a test (import math, torch; from nanlab.kernels import Case, check):",
            *(f"    {line}" for line in f"case = {self.case_source()}".splitlines()),
            f'    assert check({self.kernel}, case, dtypes=["{self.found.dtype}"]).passed',
        ])

    def to_dict(self) -> dict:
        return jsonio.jsonable({"kernel": self.kernel, "kind": self.kind, "examples": self.examples, "seconds": self.seconds,
                "shrink_steps": self.shrink_steps, "stopped": self.stopped, "passed": self.passed,
                "found": None if self.found is None else {
                    "dtype": self.found.dtype, "reason": self.found.reason, "part": self.found.part,
                    "excess": self.found.excess, "shrunk": self.shrunk, "case": self.case_source()}})


def _value_source(value) -> str:
    if isinstance(value, float):
        return ("-math.inf" if value < 0 else "math.inf") if math.isinf(value) else repr(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_value_source(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_value_source(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _tensor_source(t: torch.Tensor) -> str:
    dtype = "torch.float64" if t.is_floating_point() else "torch.long"
    return f"torch.tensor({_value_source(t.tolist())}, dtype={dtype})"


def _strategy(kind: Kind):
    """Hypothesis's strategy for one input of ``kind``: (tensors, keywords)."""
    from hypothesis import strategies as st

    symbols = sorted({d for a in kind.args for d in a.shape if isinstance(d, str)}
                     | {a.high for a in kind.args if a.integer and isinstance(a.high, str)})

    def element(arg):
        # The extremal values come first: Hypothesis shrinks one_of towards its first branch,
        # so a failure shrinks to a value of the list where one will do.
        finite = st.floats(min_value=arg.low if math.isfinite(arg.low) else None,
                           max_value=arg.high if math.isfinite(arg.high) else None,
                           allow_nan=False, allow_infinity=False)
        return st.one_of(st.sampled_from(arg.extremal_values()), finite)

    @st.composite
    def one_input(draw):
        sizes = {s: draw(st.integers(*SIZE_BOUNDS.get(s, OTHER_SIZE_BOUNDS))) for s in symbols}
        tensors = []
        for arg in kind.args:
            shape = arg.size(sizes)
            n = math.prod(shape)
            if arg.integer:
                high = sizes[arg.high] if isinstance(arg.high, str) else int(arg.high)
                values = draw(st.lists(st.integers(int(arg.low), high - 1), min_size=n, max_size=n))
                tensors.append(torch.tensor(values, dtype=torch.long).reshape(shape))
            else:
                values = draw(st.lists(element(arg), min_size=n, max_size=n))
                tensors.append(torch.tensor(values, dtype=torch.float64).reshape(shape))
        chosen = {k: draw(st.sampled_from(v)) for k, v in kind.keyword_choices.items()}
        return tensors, kind.keywords_for(sizes, chosen)

    return one_input()


class _Failed(AssertionError):
    pass


class _OutOfTime(BaseException):
    """Raised from inside Hypothesis's run when the search's time budget is spent. A
    BaseException that is no Exception, so Hypothesis does not take it for a failure
    to shrink: it ends the run, and the search reports what it had found by then."""


def _badness(result: CaseResult) -> float:
    """How far a result is off, as the floor's multiple it is held to: over 1 fails. A
    failure with no measure (the kernel raised, or lacks a required keyword) is infinite."""
    if result.status == "fail" and result.excess is None:
        return math.inf
    return result.excess or 0.0


def _observation(badness: float) -> float:
    # Hypothesis's target() takes finite observations and climbs them: log-scaled, so the
    # climb from 1e-3 to 1 counts as much as from 1 to 1e3, and inf (a NaN, a crash) on top.
    return 1e3 if not math.isfinite(badness) else math.log2(1.0 + badness)


def _key(drawn) -> tuple:
    """An input, exactly: its bytes tell -0.0 from 0.0, which a kernel may treat apart."""
    tensors, keywords = drawn
    return tuple((t.dtype, tuple(t.shape), t.numpy().tobytes()) for t in tensors), repr(keywords)


def search(fn: Callable, kind: Union[str, Kind], examples: int = DEFAULT_EXAMPLES, dtypes=None,
           framework: str = "torch", grad_fn: Optional[Callable] = None,
           seconds: Optional[float] = DEFAULT_SECONDS) -> SearchResult:
    """Judge ``fn`` on ``examples`` inputs drawn from the kind's domain, at each dtype,
    steered by Hypothesis's target() towards larger errors; the worst input that fails is
    then shrunk to a minimal one that fails at least as badly. ``seconds`` bounds the
    whole search (None: no limit); it is checked between inputs, so one slow call of the
    kernel is not cut. Deterministic (derandomized) while the budget does not cut it."""
    require("search", examples)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ConfigError("search", examples, "must be a number of examples >= 1")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not (math.isfinite(seconds) and seconds > 0)):
        raise ConfigError("search_seconds", seconds, "must be a finite number of seconds > 0, or None for no limit")
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings, target

    declared = resolve(kind)
    chosen = _dtypes(dtypes)
    judged: dict = {}  # each input's (badness, worst failing result or None), so the shrink's replay is free
    seen = {"shrinking": False, "examples": 0, "shrink_steps": 0, "worst": None, "shrunk": None}
    started, clock = time.process_time(), time.monotonic()

    def judge(drawn) -> tuple:
        key = _key(drawn)
        if key not in judged:
            if seconds is not None and time.monotonic() - clock > seconds:
                raise _OutOfTime()
            tensors, keywords = drawn
            case = declared.case(FOUND_NAME, "shrunk by nanlab's search", tensors, keywords)
            results = [run_case(fn, case, dtype, framework, grad_fn) for dtype in chosen]
            failing = [r for r in results if r.status == "fail"]
            worst = max(failing, key=_badness) if failing else None
            judged[key] = (max(map(_badness, results)), worst)
            seen["shrink_steps" if seen["shrinking"] else "examples"] += 1
        return judged[key]

    def one(drawn):
        # One function for both runs: Hypothesis derandomizes from the function, so the second
        # run draws the first run's inputs again, up to the worst, and then shrinks it.
        badness, worst = judge(drawn)
        target(_observation(badness))
        if worst is None:
            return
        if not seen["shrinking"]:
            if seen["worst"] is None or badness > seen["worst"][0]:
                seen["worst"] = (badness, worst, *drawn)
        elif badness >= seen["worst"][0]:
            seen["shrunk"] = (badness, worst, *drawn)  # Hypothesis only keeps a smaller input: the last is the least
            raise _Failed(worst.reason)

    common = dict(deadline=None, database=None, derandomize=True, print_blob=False, verbosity=Verbosity.quiet,
                  suppress_health_check=list(HealthCheck))
    explore = settings(max_examples=examples, phases=(Phase.generate, Phase.target), **common)(
        given(_strategy(declared))(one))
    stopped = ""
    try:
        explore()
        if seen["worst"] is not None:
            seen["shrinking"] = True
            shrink = settings(max_examples=examples, phases=(Phase.generate, Phase.target, Phase.shrink), **common)(
                given(_strategy(declared))(one))
            try:
                shrink()
            except _Failed:
                pass
    except _OutOfTime:
        stopped = (f"the {seconds:g} s budget ran out after {seen['examples']} of {examples} examples"
                   + f" ({time.monotonic() - clock:.1f} s)"
                   + (f" and {seen['shrink_steps']} shrinking steps" if seen["shrinking"] else ""))
    result = SearchResult(kernel_name(fn), declared.name, seen["examples"], time.process_time() - started,
                          shrink_steps=seen["shrink_steps"], stopped=stopped)
    best = seen["shrunk"] or seen["worst"]
    if best is not None:
        _, result.found, result.tensors, result.keywords = best
        result.shrunk = seen["shrunk"] is not None
    return result


__all__ = ["DEFAULT_EXAMPLES", "DEFAULT_SECONDS", "SearchResult", "available", "require", "search"]
