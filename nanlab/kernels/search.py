"""Search a kind's input domain for an input that breaks a kernel, with Hypothesis.

Each example is an input drawn from the kind's declaration (``nanlab.kernels.kinds``):
small sizes, and elements that are either one of the domain's extremal values or any
float in the domain. It is judged as a case by the checker itself (``run_case``, at
each dtype: forward and gradient against the reference). The first failure is shrunk
by Hypothesis to a minimal input, which is reported as a Case to paste into a test.

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

from nanlab.errors import ConfigError, install_hint
from nanlab.kernels.check import CaseResult, _dtypes, kernel_name, run_case
from nanlab.kernels.kinds import Kind, resolve

DEFAULT_EXAMPLES = 200
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
    examples: int  # how many inputs were drawn and judged (at every dtype until one failed)
    seconds: float
    found: Optional[CaseResult] = None  # the shrunk input's failing result, None when nothing failed
    tensors: list = field(default_factory=list, repr=False)  # the shrunk input (float64, long targets)
    keywords: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.found is None

    def case_source(self) -> str:
        """The shrunk input as Python that builds the Case, for pasting into a test."""
        tensors = ", ".join(_tensor_source(t) for t in self.tensors)
        return (f'Case("{FOUND_NAME}", "{self.kind}", "shrunk by nanlab\'s search",\n'
                f"     lambda g: ([{tensors}], {_value_source(self.keywords)}))")

    def text(self) -> str:
        head = f"search: {self.kernel} ({self.kind}): {self.examples} examples in {self.seconds:.1f} s"
        if self.found is None:
            return f"{head}: nothing failed"
        return "\n".join([
            f"{head}: FAILED on an input shrunk to {', '.join(str(tuple(t.shape)) for t in self.tensors)}",
            f"  {self.found.label}: {self.found.reason}",
            "  paste into a test (import math, torch; from nanlab.kernels import Case, check):",
            *(f"    {line}" for line in f"case = {self.case_source()}".splitlines()),
            f'    assert check({self.kernel}, case, dtypes=["{self.found.dtype}"]).passed',
        ])

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "kind": self.kind, "examples": self.examples, "seconds": self.seconds,
                "passed": self.passed, "found": None if self.found is None else {
                    "dtype": self.found.dtype, "reason": self.found.reason, "part": self.found.part,
                    "case": self.case_source()}}


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


def search(fn: Callable, kind: Union[str, Kind], examples: int = DEFAULT_EXAMPLES, dtypes=None,
           framework: str = "torch", grad_fn: Optional[Callable] = None) -> SearchResult:
    """Judge ``fn`` on ``examples`` inputs drawn from the kind's domain, at each dtype;
    the first that fails is shrunk to a minimal one. Deterministic (derandomized)."""
    require("search", examples)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ConfigError("search", examples, "must be a number of examples >= 1")
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings

    declared = resolve(kind)
    chosen = _dtypes(dtypes)
    seen = {"examples": 0, "failure": None}

    def judge(drawn):
        tensors, keywords = drawn
        case = declared.case(FOUND_NAME, "shrunk by nanlab's search", tensors, keywords)
        for dtype in chosen:
            result = run_case(fn, case, dtype, framework, grad_fn)
            if result.status == "fail":
                seen["failure"] = (result, tensors, keywords)
                raise _Failed(result.reason)

    def counted(drawn):
        seen["examples"] += 1
        judge(drawn)

    run = settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=False,
                   verbosity=Verbosity.quiet, suppress_health_check=list(HealthCheck),
                   phases=(Phase.generate, Phase.shrink))(given(_strategy(declared))(counted))
    started = time.process_time()
    try:
        run()
    except _Failed:
        pass
    seconds = time.process_time() - started
    result = SearchResult(kernel_name(fn), declared.name, seen["examples"], seconds)
    if seen["failure"] is not None:
        # Hypothesis runs the shrunk example last, so the last failure recorded is the minimal one.
        result.found, result.tensors, result.keywords = seen["failure"]
    return result


__all__ = ["DEFAULT_EXAMPLES", "SearchResult", "available", "require", "search"]
