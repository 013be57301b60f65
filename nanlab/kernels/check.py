"""Check a loss kernel against the case catalogue.

Each case runs at each dtype. Inputs are drawn in float64, cast to the dtype, and
the reference is computed in float64 on the cast values (so rounding the inputs is
never counted against the kernel). The forward value must match, and so must the
gradient: through autograd for torch kernels, through ``grad_fn`` for NumPy ones.
The upstream gradient is random (never all ones, which hides per-row bugs in
reduction='none' backwards) and rounded to the output's dtype before the reference
gradient is computed from it, so rounding it is not counted against the kernel either.

How a value is judged (``judge``), always in the dtype the kernel returned it in:
- a shape other than the reference's fails;
- a non-finite value where the reference is finite, or one of another kind (NaN
  where the reference is -inf) fails; where the reference is undefined (NaN) any
  value is accepted, for every kernel alike;
- within torch.testing's default tolerance for the output's dtype passes;
- beyond it, within the floor (FLOOR_FACTOR times that tolerance, at each forward
  element's own magnitude or 1, at a gradient's largest magnitude, plus, per gradient
  element, FLOOR_FACTOR times what rounding the reference's saved intermediates to the
  dtype changes there: _Reference.saved_rounding) passes, as
  "imprecise" where the framework's op, itself rounding noise here and with no
  recorded failure, is over FRAMEWORK_MARGIN times closer; beyond the floor fails,
  whatever the framework's op does. So the op never vouches for a wrong answer.

The comparison lives here; the cases and their references live in
nanlab.kernels.catalogue, which never imports this module.
"""
from __future__ import annotations

import inspect
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch

from nanlab import jsonio
from nanlab.config import options
from nanlab.lab.build import DTYPES
from nanlab.errors import ConfigError
from nanlab.config.schema import KernelConf
from nanlab.kernels.catalogue import USER_KINDS, Case, reference, required_keywords, unknown_kind
from nanlab.kernels.kinds import Kind, resolve
from nanlab.kernels.catalogue import cases as catalogue_cases

# The framework's own op for each kind: the benchmark a kernel beyond tolerance is held to.
FRAMEWORK_OPS = {
    "cross_entropy": torch.nn.functional.cross_entropy,
    "binary_cross_entropy": torch.nn.functional.binary_cross_entropy,
    "binary_cross_entropy_with_logits": torch.nn.functional.binary_cross_entropy_with_logits,
    "softmax": torch.softmax,
    "log_softmax": torch.log_softmax,
    "logsumexp": torch.logsumexp,
    "kl_div": torch.nn.functional.kl_div,
    "nll_loss": torch.nn.functional.nll_loss,
    "softplus": torch.nn.functional.softplus,
    "log_sigmoid": torch.nn.functional.logsigmoid,
    "rms_norm": torch.nn.functional.rms_norm,
    "layer_norm": torch.nn.functional.layer_norm,
}
assert set(FRAMEWORK_OPS) == set(options.KERNEL_KINDS), "FRAMEWORK_OPS must have one entry per options.KERNEL_KINDS"


def framework_op(kind: str) -> Optional[Callable]:
    """The benchmark op of a kind: torch's for a built-in one, the declared one (or None) for a user kind."""
    return FRAMEWORK_OPS[kind] if kind in FRAMEWORK_OPS else USER_KINDS[kind].framework_op


# torch.testing.assert_close's defaults: (rtol, atol)
TOLERANCES = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
              torch.float64: (1e-7, 1e-7)}
NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
TORCH_DTYPES_OF_NUMPY = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}

# The floor: an error up to FLOOR_FACTOR times torch.testing's default tolerance for the
# output's dtype (atol + rtol * scale) never fails a case whose values are finite where
# the reference's are; beyond it a case fails, whatever the framework's op does. For a
# forward value, scale is each element's own |reference|, or 1 if smaller (a loss
# element is a sum of terms of about the input's size: torch's float16
# binary_cross_entropy_with_logits is 4.8 ulp off at an element of 0.107, 0.3 ulp at 1),
# so a wrong small value beside a large one (-16 for 0 in a row reaching -2e4) fails. For a gradient it is the
# gradient's largest |reference|: a gradient element y_i (g_i - <g, y>) is a difference,
# and its rounding error follows the terms, not the (small) result; the textbook
# softmax's float16 gradient on 32768 classes is 3.3 ulp off at that scale while 87 ulp
# off at its own element. See docs/kernels.md for the measurements.
FLOOR_FACTOR = 2.0
# Within the floor, a kernel over this many times as far off as the framework's op (in
# ulps of each one's output dtype) is "imprecise": reported, never failed.
FRAMEWORK_MARGIN = 2.0
# The op is compared with only where its own error is at most this many ulps at the
# reference's largest magnitude (rounding noise) and the case records no failure of it.
NOISE_ULPS = 16.0
# With a baseline, a case that still fails has regressed when an error grew by more than this factor.
BASELINE_MARGIN = 2.0
# The CLI's default (kernel.timeout). check() itself has no deadline unless asked for
# one: the deadline is a SIGALRM, which only the main thread can install, and a library
# call may come from any thread (a worker, a notebook's executor).
DEFAULT_TIMEOUT_S = KernelConf.timeout
# The longest deadline accepted: setitimer overflows near 1e11 s on 64-bit Linux
# (1e308 gave a traceback); a day is far beyond any check, and a clear line beats a crash.
MAX_TIMEOUT_S = 86400.0

STATUSES = ("pass", "imprecise", "fail", "unsupported", "xfail", "xpass")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class CaseResult:
    name: str
    dtype: str
    description: str
    status: str  # one of STATUSES
    forward_error: Optional[float] = None  # max |out - ref|; inf where finiteness disagrees
    grad_error: Optional[float] = None
    reason: str = ""
    part: str = ""  # what failed: forward or gradient ("" when neither, or the kernel raised)
    change: str = ""  # against a baseline: regressed, improved, unchanged or new ("" without one)
    # The error over the floor it is held to (over 1 fails; inf where finiteness disagrees): of the part
    # that failed, else the larger of the two. None where nothing was measured (the kernel raised).
    excess: Optional[float] = None

    @property
    def label(self) -> str:
        return f"{self.name} [{self.dtype}]"


@dataclass(repr=False)
class Report:
    kernel: str
    kind: str
    framework: str
    cases: list = field(default_factory=list)
    stopped: str = ""  # why the check ended before every case ran (a timeout); "" when it ran them all
    not_run: int = 0  # case-dtype pairs left when it stopped
    baseline: str = ""  # where the baseline the changes refer to came from

    @property
    def ran(self) -> list:
        return [c for c in self.cases if c.status != "unsupported"]

    @property
    def failures(self) -> list:
        """The cases that fail the check: a failure no baseline accepts, a listed
        xfail that passed (strict), or a case that regressed against the baseline."""
        return [c for c in self.cases if _fails_the_check(c)]

    @property
    def passed(self) -> bool:
        # An empty verdict is not a pass: a check in which nothing ran has checked nothing.
        return not self.failures and not self.stopped and bool(self.ran)

    def counts(self) -> dict:
        return {s: sum(c.status == s for c in self.cases) for s in STATUSES}

    def summary(self) -> str:
        counted = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n or s in ("pass", "fail", "unsupported"))
        return f"{self.kernel} ({self.kind}, {self.framework}): {counted} -> {'PASSED' if self.passed else 'FAILED'}"

    def failure_lines(self) -> list:
        """Why the check failed, one line per reason: each failing case, then a stop or an empty run."""
        lines = [f"{c.label}: {c.reason}" + (f" [{c.change} against the baseline]" if c.change else "")
                 for c in self.failures]
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        if not self.ran:
            lines.append("no case ran: every case was unsupported, so nothing was checked")
        return lines

    def table(self, failures_only: bool = False) -> str:
        """The cases, one line each with the case's description; a case that did not
        pass gets its reason on the next line. failures_only keeps just the cases
        that failed (those xfail or the baseline accepts included) and the summary."""
        head = f"{'case':<34} {'dtype':<9} {'status':<23} {'fwd err':>9} {'grad err':>9}  description"
        lines = [head, "-" * 110]
        for c in self.cases:
            if failures_only and c.status not in ("fail", "xfail", "xpass") and c.change != "regressed":
                continue
            status = c.status + (f" ({c.change})" if c.change and c.change != "unchanged" else "")
            lines.append(f"{c.name:<34} {c.dtype:<9} {status:<23} {_fmt(c.forward_error):>9} {_fmt(c.grad_error):>9}"
                         f"  {c.description}")
            if c.status != "pass" and c.reason:
                lines.append(f"    {c.reason}")
        if failures_only and len(lines) == 2 and self.ran:
            # Nothing to list: say so, rather than print a header over no rows.
            imprecise = self.counts()["imprecise"]
            lines = [("nothing failed: every case that ran passed" if self.passed else "no failing case to list")
                     + (f" ({imprecise} imprecise: within the floor, less precise than the framework's op)"
                        if imprecise else "")]
        lines.append("")
        lines.append(self.summary())
        if self.baseline:
            regressed = [c.label for c in self.cases if c.change == "regressed"]
            improved = [c.label for c in self.cases if c.change == "improved"]
            lines.append(f"against the baseline {self.baseline}: {len(regressed)} regressed"
                         + (f" ({', '.join(regressed)})" if regressed else "")
                         + f", {len(improved)} improved" + (f" ({', '.join(improved)})" if improved else ""))
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        if not self.ran:
            lines.append("no case ran: every case was unsupported, so nothing was checked")
        return "\n".join(lines)

    def __repr__(self) -> str:
        # What pytest prints under a failed ``assert report.passed``: the verdict and its reasons.
        return "\n".join([f"<Report {self.summary()}>", *(f"  {line}" for line in self.failure_lines())])

    def to_dict(self) -> dict:
        return jsonio.jsonable({"kernel": self.kernel, "kind": self.kind, "framework": self.framework,
                                "passed": self.passed, "stopped": self.stopped, "not_run": self.not_run,
                                "baseline": self.baseline, "cases": [asdict(c) for c in self.cases]})

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        known = {f.name for f in fields(CaseResult)}
        results = []
        for entry in data["cases"]:
            values = {k: jsonio.number(v) for k, v in entry.items() if k in known}
            results.append(CaseResult(**values))
        return cls(data["kernel"], data["kind"], data["framework"], results, data.get("stopped", ""),
                   data.get("not_run", 0), data.get("baseline", ""))


def _fmt(error: Optional[float]) -> str:
    return "-" if error is None else f"{error:.3g}"


def _fails_the_check(c: CaseResult) -> bool:
    if c.status == "xpass" or c.change == "regressed":
        return True
    return c.status == "fail" and c.change not in ("unchanged", "improved")


# ---------------------------------------------------------------- comparing one tensor

def in_dtype_range(ref: torch.Tensor, dtype) -> torch.Tensor:
    """The reference as the dtype can hold it: a value beyond the dtype's largest
    finite number is +-inf there, and inf is then the correctly rounded answer."""
    limit = torch.finfo(dtype).max
    return torch.where(ref.abs() > limit, ref.sign() * math.inf, ref)


def ulp(magnitude: float, dtype) -> float:
    """The spacing of the dtype's numbers at ``magnitude`` (subnormal spacing below the normal range)."""
    info = torch.finfo(dtype)
    if not magnitude >= info.tiny:
        return info.tiny * info.eps
    return 2.0 ** math.floor(math.log2(magnitude)) * info.eps


@dataclass
class Comparison:
    """One output against its reference, in the output's dtype."""

    close: bool  # every element within the dtype's tolerance (or at an undefined reference)
    agree: bool  # finite where the reference is finite, the same infinity where it is infinite
    error: float  # max |out - ref| over defined elements; inf where finiteness disagrees
    ulps: float  # error in ulps of the dtype at the reference's largest finite magnitude
    mismatch: str  # the first element where finiteness disagrees, as "nan where the reference is 0.2 at [1, 3] (input -inf)"
    worst: str = ""  # the element furthest off, in the same words
    scale: float = 0.0  # the reference's largest finite magnitude
    # The element furthest past the floor taken at each element's own magnitude, or 1 if
    # smaller (FLOOR_FACTOR * (atol + rtol * max(|ref_i|, 1))): "" when every element is within it.
    past_own_floor: str = ""
    own_excess: float = 0.0  # the largest |out_i - ref_i| over that per-element floor (inf where finiteness disagrees)
    diff: Optional[torch.Tensor] = field(default=None, repr=False)  # |out - ref| per element, 0 where not both finite


def _element(out, ref, i: int, inputs) -> str:
    """Element ``i`` (flat) of ``out``: its value, the reference's, its index, and the
    input there (when the input has the output's shape; a row's first input when the
    output has one value per row), so a failure on a finite row of a case built around
    a -inf row says which row it was."""
    said = f"{out.flatten()[i].item():.6g} where the reference is {ref.flatten()[i].item():.6g}"
    if out.dim() == 0:
        return said
    index = [int(k) for k in np.unravel_index(i, tuple(out.shape))]
    said += f" at [{', '.join(map(str, index))}]"
    x = inputs[0] if inputs else None
    if x is not None and tuple(x.shape) == tuple(out.shape):
        said += f" (input {x.detach().double().flatten()[i].item():.6g})"
    elif x is not None and x.dim() >= 1 and out.dim() == 1 and x.shape[0] == out.shape[0]:
        row = x.detach().double()[index[0]]
        finite = "finite" if bool(torch.isfinite(row).all()) else "non-finite"
        said += f" (row {index[0]} of the input, {finite}" + (
            f", target {inputs[1][index[0]].item():.6g})" if len(inputs) > 1 and inputs[1].dim() >= 1 else ")")
    return said


def compare(out: torch.Tensor, ref: torch.Tensor, dtype, inputs=None) -> Comparison:
    """``out`` and ``ref`` are float64 and of one shape; ``dtype`` is the output's own;
    ``inputs`` (the case's inputs, optional) name the input at the element a reason cites."""
    rtol, atol = TOLERANCES[dtype]
    out, ref = out.detach(), in_dtype_range(ref.detach(), dtype)
    defined = ~torch.isnan(ref)
    both_finite = torch.isfinite(out) & torch.isfinite(ref)
    same_inf = torch.isinf(ref) & (out == ref)
    diff = torch.where(both_finite, (out - ref).abs(), torch.zeros_like(ref))
    agree_mask = ~defined | both_finite | same_inf
    close = bool((agree_mask & (~both_finite | (diff <= atol + rtol * ref.abs()))).all())
    agree = bool(agree_mask.all())
    mismatch = ""
    if not agree:
        i = int(torch.nonzero(~agree_mask.flatten())[0])
        mismatch = _element(out, ref, i, inputs)
    error, worst = 0.0, ""
    if diff.numel():
        i = int(diff.flatten().argmax())
        error = float(diff.flatten()[i])
        worst = _element(out, ref, i, inputs)
    past_own_floor, own_excess = "", (0.0 if agree else math.inf)
    if agree and diff.numel():
        own = torch.where(both_finite, ref.abs(), torch.zeros_like(ref)).clamp(min=1.0)
        limits = FLOOR_FACTOR * (atol + rtol * own)
        over = diff / limits
        i = int(over.flatten().argmax())
        own_excess = float(over.flatten()[i])
        if own_excess > 1:
            past_own_floor = (f"{_element(out, ref, i, inputs)}, off by {float(diff.flatten()[i]):.3g}, beyond "
                              f"the floor of {float(limits.flatten()[i]):.3g} there")
    if not agree:
        error = math.inf
    finite_ref = ref[both_finite]
    scale = float(finite_ref.abs().max()) if finite_ref.numel() else 0.0
    return Comparison(close, agree, error, error / ulp(scale, dtype), mismatch, worst, scale, past_own_floor, own_excess,
                      diff)


def floor(scale: float, dtype) -> float:
    """The error no correct kernel is failed for: FLOOR_FACTOR times torch.testing's
    default tolerance for the dtype, taken at the reference's largest finite magnitude."""
    rtol, atol = TOLERANCES[dtype]
    return FLOOR_FACTOR * (atol + rtol * scale)


class Judgement(NamedTuple):
    ok: bool
    error: Optional[float]
    reason: str
    excess: float  # the error over the floor it is held to: over 1 fails; inf where finiteness or shape disagrees


def judge(out: torch.Tensor, ref: torch.Tensor, dtype, framework: Callable[[], Optional[Comparison]],
          known_failure=None, inputs=None, part: str = "forward") -> tuple[bool, Optional[float], str]:
    """(ok, error, reason) of ``judge_part``."""
    return tuple(judge_part(out, ref, dtype, framework, known_failure, inputs, part))[:3]


def judge_part(out: torch.Tensor, ref: torch.Tensor, dtype, framework: Callable[[], Optional[Comparison]],
               known_failure=None, inputs=None, part: str = "forward",
               saved_rounding: Optional[Callable[[], torch.Tensor]] = None) -> Judgement:
    """(ok, error, reason, excess) for one part (forward or gradient) of one case: ``out``
    and ``ref`` as float64, ``dtype`` the one the kernel returned ``out`` in,
    ``framework()`` the framework op's Comparison on the same part (None where the
    op raised), called only when needed, ``known_failure`` the case's record of
    that op failing here, if any, ``inputs`` the case's inputs (to name the
    element a reason cites), and, for a gradient, ``saved_rounding()`` the change
    per element that rounding the reference's saved intermediates to ``dtype`` makes
    to its gradient (``_Reference.saved_rounding``), called only when needed.

    Within torch.testing's tolerance passes. Beyond it but within the floor passes
    too (a gradient's floor grows, element by element, by FLOOR_FACTOR times that
    change); the reason then starts with "imprecise" where the framework's op, itself
    correct here, is over FRAMEWORK_MARGIN times closer (the case's status becomes
    "imprecise", which does not fail the check). Beyond the floor fails, whatever
    the framework's op does."""
    if tuple(out.shape) != tuple(ref.shape):
        return Judgement(False, None, f"shape {tuple(out.shape)} where the reference has shape {tuple(ref.shape)}",
                         math.inf)
    mine = compare(out, ref, dtype, inputs)
    if not mine.agree:
        return Judgement(False, mine.error, mine.mismatch, math.inf)
    limit = floor(mine.scale, dtype)
    excess = mine.own_excess if part == "forward" else mine.error / limit
    if mine.close:
        return Judgement(True, mine.error, "", excess)
    said = f"max error {mine.error:.3g} ({mine.ulps:.3g} ulp of {dtype_name(dtype)}, {mine.worst})"
    if part == "forward":
        # Each element has its own floor (at max(|ref_i|, 1)), so a wrong small value beside
        # a large one (-16 for 0 in a row reaching -2e4) fails.
        if mine.past_own_floor:
            return Judgement(False, mine.error, (f"{said}; {mine.past_own_floor} ({FLOOR_FACTOR:g}x torch.testing's "
                                                 f"tolerance at that element)"), excess)
        limit = None
    else:
        # A gradient element is a difference (y_i (g_i - <g, y>)): its error follows the terms, so
        # the floor is taken at the gradient's largest magnitude.
        if mine.error > limit:
            # A correct kernel of this dtype saves its output (softmax) or its statistics (a norm's
            # 1/std) in the dtype for its backward; where the gradient cancels (a saturated softmax's
            # y (g - <g, y>)) that rounding alone moves it past the floor. Each element may be off by
            # as much again as that rounding moves the exact backward, FLOOR_FACTOR times over.
            rounding = saved_rounding() if saved_rounding is not None else None
            allowed = limit + (0.0 if rounding is None else FLOOR_FACTOR * rounding)
            excess = float((mine.diff / allowed).max())
            beyond = mine.diff > allowed
            if bool(beyond.any()):
                i = int(torch.nonzero(beyond.flatten())[0])
                grown = "" if rounding is None or not float(rounding.flatten()[i]) else (
                    f", plus {FLOOR_FACTOR:g}x the {float(rounding.flatten()[i]):.3g} that rounding the reference's "
                    f"saved intermediates to {dtype_name(dtype)} moves element {i} (flat)")
                return Judgement(False, mine.error, (f"{said} beyond the floor of {limit:.3g} ({FLOOR_FACTOR:g}x "
                                                     f"torch.testing's tolerance at the gradient's largest magnitude"
                                                     f"{grown})"), excess)
            limit += FLOOR_FACTOR * float(rounding.max())
    theirs = framework() if known_failure is None else None
    if theirs is not None and theirs.agree and theirs.ulps <= NOISE_ULPS and mine.ulps > FRAMEWORK_MARGIN * theirs.ulps:
        return Judgement(True, mine.error, (f"imprecise: {said}, within the floor but over {FRAMEWORK_MARGIN:g}x the "
                                            f"framework's op ({theirs.ulps:.3g} ulp)"), excess)
    return Judgement(True, mine.error, f"{said}, beyond tolerance, within the floor" + (f" of {limit:.3g}" if limit else ""),
                     excess)


# ---------------------------------------------------------------- running one case

class KernelRaised(Exception):
    """The kernel (or its backward, or its grad_fn) raised, or gave something that is
    no output; the case fails with this reason."""


class CheckTimedOut(BaseException):
    """Raised by the deadline's alarm. A BaseException, so that a kernel's
    ``except Exception`` cannot swallow it."""


# What a kernel may raise that stops the whole check instead of failing its case: the
# deadline, and Ctrl-C, which is the user's. Anything else the kernel raises (SystemExit
# from sys.exit, GeneratorExit, any other BaseException) fails the case, and the check
# goes on. The isolated child (nanlab.kernels.isolate) ignores SIGINT, so there a
# KeyboardInterrupt can only be the kernel's own, and it drops it from this tuple.
STOPS_THE_CHECK: tuple = (CheckTimedOut, KeyboardInterrupt)


def _first_line(err: BaseException) -> str:
    try:  # a hostile exception's __str__ may raise in turn
        text = str(err)
    except Exception:
        return ""
    return text.splitlines()[0][:80] if text.strip() else ""


def _call_kernel(function, *args, **kwargs):
    grad_mode = torch.is_grad_enabled()
    try:
        with np.errstate(all="ignore"):
            out = function(*args, **kwargs)
    except STOPS_THE_CHECK:
        torch.set_grad_enabled(grad_mode)
        raise
    except BaseException as err:
        torch.set_grad_enabled(grad_mode)
        message = _first_line(err)
        raise KernelRaised(f"raised {type(err).__name__}" + (f": {message}" if message else "")) from None
    if torch.is_grad_enabled() != grad_mode:
        # Left switched (torch.set_grad_enabled(False) with no restore): put it back, so the
        # next case and its reference run with autograd as before, and blame this case.
        torch.set_grad_enabled(grad_mode)
        raise KernelRaised(f"left grad mode {'off' if grad_mode else 'on'}: it called torch.set_grad_enabled("
                           f"{not grad_mode}) and did not restore it, which breaks its caller's autograd")
    return out


def _tensor_values(out, who: str) -> torch.Tensor:
    """A torch kernel's output (or gradient) as a dense float tensor on the CPU, or
    KernelRaised saying what it was instead: one that holds no values (meta), a sparse
    layout, a dtype that is not floating point."""
    if not isinstance(out, torch.Tensor):
        raise KernelRaised(f"{who} {type(out).__name__}, not a torch.Tensor")
    if out.layout != torch.strided:
        raise KernelRaised(f"{who} a {str(out.layout).removeprefix('torch.')} tensor, not a dense (strided) one")
    if out.device.type == "meta":
        raise KernelRaised(f"{who} a meta tensor, which holds no values")
    if out.dtype not in TOLERANCES:
        raise KernelRaised(f"{who} {out.dtype} values, not float16, bfloat16, float32 or float64")
    return _call_kernel(lambda: out.detach().cpu())  # a tensor subclass runs its own code here


def _array_values(out, who: str) -> np.ndarray:
    """A NumPy kernel's output (or grad_fn's gradient) as a float16/32/64 array, or
    KernelRaised saying what it was instead (None, a string, a ragged list)."""
    try:
        with np.errstate(all="ignore"):
            array = np.asarray(out)
    except STOPS_THE_CHECK:
        raise
    except BaseException as err:  # NumPy refuses ragged nestings; a hostile __array__ may raise anything
        raise KernelRaised(f"{who} a {type(out).__name__} that is no array, ragged or holding other than numbers "
                           f"({_first_line(err)})") from None
    if array.dtype not in TORCH_DTYPES_OF_NUMPY:
        what = (f"{array.dtype} values" if array.dtype.kind in "biufc"
                else "None" if out is None else f"a {type(out).__name__} ({array.dtype} array)")
        raise KernelRaised(f"{who} {what}, not a float16, float32 or float64 array")
    return array


def _missing_keywords(fn: Callable, keywords: dict) -> list[str]:
    """The keywords fn's signature lacks (a **kwargs parameter accepts them all)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in keywords if k not in params]


def _upstream(shape, gen) -> torch.Tensor:
    """A random upstream gradient: per-element for reduction='none', a random scalar otherwise."""
    return torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5


def _undefined_if_forward_is(ref, ref_grad):
    """A scalar loss that is undefined (0/0) has no gradient either."""
    if ref.numel() == 1 and bool(torch.isnan(ref.detach()).all()):
        return torch.full_like(ref_grad, math.nan)
    return ref_grad


class _Kernel:
    """A kernel under test at one case and dtype: its forward output and, on request,
    its gradient for a given upstream, whatever framework it is written in."""

    def __init__(self, fn, grad_fn, framework, inputs, keywords):
        self.fn, self.grad_fn, self.framework, self.keywords = fn, grad_fn, framework, keywords
        self.x = None
        # The kernel gets copies (strides kept), so one that writes into its inputs
        # cannot change the reference's or the framework op's.
        inputs = [t.detach().clone() for t in inputs]
        if framework == "torch":
            self.x = inputs[0].requires_grad_(True)
            self.args = [self.x, *inputs[1:]]
            self.graph = _call_kernel(fn, *self.args, **keywords)  # what autograd differentiates
            self.out = _tensor_values(self.graph, "returned")
            self.dtype = self.out.dtype
        else:
            self.args = [t.numpy() for t in inputs]
            out = _array_values(_call_kernel(fn, *self.args, **keywords), "returned")
            self.out, self.dtype = torch.from_numpy(out.astype(np.float64)), TORCH_DTYPES_OF_NUMPY[out.dtype]

    @property
    def checks_gradient(self) -> bool:
        return self.framework == "torch" or self.grad_fn is not None

    def gradient(self, upstream: torch.Tensor) -> Optional[torch.Tensor]:
        """The gradient with respect to the first input for ``upstream`` (already in the
        output's dtype), or None when none reaches the input."""
        if self.framework == "torch":
            if not self.graph.requires_grad:
                return None
            (grad,) = _call_kernel(torch.autograd.grad, self.graph, self.x, upstream, allow_unused=True)
            return None if grad is None else _tensor_values(grad, "its gradient is")
        grad = _call_kernel(self.grad_fn, *self.args, upstream=upstream.numpy(), **self.keywords)
        return torch.from_numpy(_array_values(grad, "grad_fn returned"))


class _Reference:
    """The float64 reference for a case, and its gradient for any upstream gradient."""

    def __init__(self, case, inputs, keywords):
        self.case, self.keywords = case, keywords
        self.x = inputs[0].double().detach().requires_grad_(True)
        self.rest = [t.double() if t.is_floating_point() else t for t in inputs[1:]]
        self.out = reference(case, [self.x, *self.rest], keywords)
        if not self.out.requires_grad:  # the catalogue's promise: every case checks the gradient
            raise AssertionError(f"catalogue bug: case {case} has no gradient reference")

    def gradient(self, upstream: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(self.out, self.x, upstream.double(), retain_graph=True, allow_unused=True)
        if grad is None:
            raise AssertionError("catalogue bug: the reference does not depend on the input")
        return _undefined_if_forward_is(self.out, grad)

    def saved_rounding(self, upstream: torch.Tensor, dtype) -> torch.Tensor:
        """|g_d - g| per element: g is the reference gradient, g_d the same backward run on
        every intermediate the reference saved for it (its output, a sum, a 1/std) rounded
        to ``dtype``, as a kernel of that dtype saves them. 0 where either is not finite:
        a rounding that overflows excuses nothing."""
        def rounded(t):
            return t.to(dtype).to(t.dtype) if t.is_floating_point() else t

        with torch.autograd.graph.saved_tensors_hooks(rounded, lambda t: t):
            out = reference(self.case, [self.x, *self.rest], self.keywords)
        (grad,) = torch.autograd.grad(out, self.x, upstream.double(), allow_unused=True)
        exact = self.gradient(upstream)
        change = (grad - exact).abs()
        return torch.where(torch.isfinite(change), change, torch.zeros_like(change))


class _FrameworkOp:
    """The framework's own op on the same inputs, run only when a kernel is beyond
    tolerance (most never are), and then once for both parts."""

    def __init__(self, kind, inputs, keywords, ref: _Reference, upstream64):
        self.op, self.inputs, self.keywords, self.ref, self.upstream64 = framework_op(kind), inputs, keywords, ref, upstream64
        self._run = None

    def _output(self):
        """(input, output) of the op, or None where it raised."""
        if self.op is None:  # a declared kind without a framework op: nothing to compare with
            return None
        if self._run is None:
            x = self.inputs[0].detach().requires_grad_(True)
            try:
                self._run = (x, self.op(x, *self.inputs[1:], **self.keywords))
            except (RuntimeError, TypeError, ValueError):
                self._run = False
        return self._run or None

    def forward(self) -> Optional[Comparison]:
        run = self._output()
        if run is None:
            return None
        out = run[1].detach()
        return compare(out.double(), self.ref.out, out.dtype)

    def gradient(self) -> Optional[Comparison]:
        run = self._output()
        if run is None or not run[1].requires_grad:
            return None
        x, out = run
        upstream = self.upstream64.to(out.dtype)
        try:
            (grad,) = torch.autograd.grad(out, x, upstream)
        except RuntimeError:
            return None
        return compare(grad.double(), self.ref.gradient(upstream), grad.dtype)


@torch.enable_grad()  # the reference and a torch kernel's gradient need autograd, even under a caller's no_grad
def run_case(fn: Callable, case: Case, dtype, framework: str = "torch", grad_fn: Optional[Callable] = None,
             seed: int = 0) -> CaseResult:
    """Check fn on one case at one dtype."""
    gen = torch.Generator().manual_seed(seed)
    tensors, keywords = case.build(gen)
    dname = dtype_name(dtype)

    def result(status, forward_error=None, grad_error=None, reason="", part="", excess=None):
        return CaseResult(case.name, dname, case.description, status, forward_error, grad_error, reason, part,
                          excess=excess)

    missing = _missing_keywords(fn, keywords)
    if missing:
        if case.core:
            required = ", ".join(required_keywords(case.kind))
            return result("fail", reason=f"the kernel takes no {', '.join(missing)}; every {case.kind} kernel must "
                                         f"take {required} (a core case)")
        return result("unsupported", reason=f"the kernel takes no {', '.join(missing)}")
    if framework == "numpy" and dtype not in NUMPY_DTYPES:
        return result("unsupported", reason="NumPy has no bfloat16")
    # .to() keeps a non-contiguous case's strides, so the kernel sees the layout the case built.
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    # A keyword tensor (a class weight, a norm's weight and bias) comes in the case's dtype as well.
    keywords = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in keywords.items()}
    ref = _Reference(case, inputs, keywords)
    upstream64 = _upstream(ref.out.shape, gen)
    bench = _FrameworkOp(case.kind, inputs, keywords, ref, upstream64)
    try:
        kernel = _Kernel(fn, grad_fn, framework, inputs, keywords)
        ok, forward_error, why, excess = judge_part(kernel.out.detach().double(), ref.out,
                                                    judged_in(kernel.dtype, dtype), bench.forward,
                                                    case.known_failure(dname, "forward"), inputs)
        if not ok:
            return result("fail", forward_error, None, f"forward: {why}", "forward", excess)
        if not kernel.checks_gradient:
            return result(_passing(why), forward_error, None, why, excess=excess)
        # The upstream as the kernel's output dtype holds it; the reference gradient uses the same values.
        upstream = upstream64.to(kernel.dtype)
        grad = kernel.gradient(upstream)
    except KernelRaised as err:
        return result("fail", reason=str(err))
    if grad is None:
        return result("fail", forward_error, None, "gradient: no gradient reached the input", "gradient")
    grad_dtype = judged_in(grad.dtype, dtype)
    ok, grad_error, why_grad, grad_excess = judge_part(grad.double(), ref.gradient(upstream), grad_dtype, bench.gradient,
                                                       case.known_failure(dname, "gradient"), inputs, "gradient",
                                                       lambda: ref.saved_rounding(upstream, grad_dtype))
    if not ok:
        return result("fail", forward_error, grad_error, f"gradient: {why_grad}", "gradient", grad_excess)
    reasons = [f"{part}: {w}" for part, w in (("forward", why), ("gradient", why_grad)) if w]
    status = "imprecise" if "imprecise" in (_passing(why), _passing(why_grad)) else "pass"
    return result(status, forward_error, grad_error, "; ".join(reasons), excess=max(excess, grad_excess))


def judged_in(returned, asked):
    """The dtype a value is judged in: the one it was returned in, or the case's input
    dtype where that is more precise. A kernel that upcasts is held to its output's
    tolerance; one that downcasts (bfloat16 from float64 inputs) to the precision the
    user asked for, so rounding to a coarser dtype is not excused by that dtype's tolerance."""
    if asked not in TOLERANCES:
        return returned
    return asked if torch.finfo(asked).eps < torch.finfo(returned).eps else returned


def _passing(why: str) -> str:
    """The status of a part judge() passed: "imprecise" when its reason says so."""
    return "imprecise" if why.startswith("imprecise") else "pass"


# ---------------------------------------------------------------- the deadline

class _Deadline:
    """SIGALRM after ``seconds``, then again every RETRY_S while armed, raising CheckTimedOut.

    The deadline of a check run in this process (the library's default). An isolated
    check (isolate=True, and the CLI) is instead killed from outside at its deadline
    (nanlab.kernels.isolate); running in this process keeps CUDA, debuggers and the
    caller's threads usable, which a forked child cannot. The alarm interrupts pure-Python loops, and
    torch code between ops (each op returns to the interpreter, where the handler
    runs; sleeps and lock waits are interrupted too). What it cannot stop is one native
    call that never returns; the docs say so. Repeating the alarm gets past a kernel
    that swallows the first exception and hangs again (one that swallows every
    exception in a loop cannot be stopped from inside the process). Signals need
    the main thread, so check() refuses a timeout elsewhere rather than silently
    running without one. The previous SIGALRM handler and timer (pytest-timeout's,
    say) are put back afterwards.
    """

    RETRY_S = 0.25

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = False

    def _alarm(self, signum, frame):
        if self.armed:
            raise CheckTimedOut()

    def __enter__(self):
        self.started = time.monotonic()
        self.old_timer = signal.getitimer(signal.ITIMER_REAL)
        self.old_handler = signal.signal(signal.SIGALRM, self._alarm)
        # A tiny timeout can fire before __enter__ returns, and then the with-block never
        # calls __exit__: put everything back here, or the timer stays armed and kills the
        # process later ('Alarm clock', exit 142) or raises CheckTimedOut in user code.
        try:
            self.armed = True
            signal.setitimer(signal.ITIMER_REAL, self.seconds, self.RETRY_S)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        # An alarm can land before the first line below runs and raise here; then disarm again
        # (armed is False by then, so no further alarm raises), never leaving the timer set.
        while True:
            try:
                self._disarm()
                return False
            except CheckTimedOut:
                continue

    def _disarm(self):
        self.armed = False  # first: an alarm that lands from here on is ignored
        signal.setitimer(signal.ITIMER_REAL, 0)
        # None: the old handler was not installed from Python and cannot be put back as it was.
        signal.signal(signal.SIGALRM, signal.SIG_DFL if self.old_handler is None else self.old_handler)
        delay, interval = self.old_timer
        if delay > 0:  # someone else's timer was running: resume it, less the time we took
            signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - self.started), 1e-3), interval)


def _check_timeout(timeout, isolate: bool = False) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError("timeout", timeout, "must be a finite number of seconds > 0, or None for no limit")
    if timeout > MAX_TIMEOUT_S:
        raise ConfigError("timeout", timeout, f"must be at most {MAX_TIMEOUT_S:g} seconds (a day), or None for no limit")
    if isolate:  # the parent kills the child at the deadline: no signal, so any thread will do
        return float(timeout)
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        raise ValueError("check() enforces timeout= with SIGALRM, which works in the main thread of a "
                         "POSIX process only; leave timeout=None (the default) to check without a time limit")
    return float(timeout)


def _run_all(fn, grad_fn, framework, pairs, seed, timeout) -> tuple[list, str]:
    """Run every (case, dtype) pair; returns (results, why it stopped early or "")."""
    results = []
    if timeout is None:
        for case, dtype in pairs:
            results.append(run_case(fn, case, dtype, framework, grad_fn, seed))
        return results, ""
    try:
        with _Deadline(timeout):
            for case, dtype in pairs:
                results.append(run_case(fn, case, dtype, framework, grad_fn, seed))
    except CheckTimedOut:
        if len(results) == len(pairs):  # the alarm landed after the last case: nothing was cut short
            return results, ""
        return results, _cut_short(pairs, results, *_timed_out(timeout))
    return results, ""


def _run_isolated(fn, grad_fn, framework, pairs, seed, timeout) -> tuple[list, str]:
    """_run_all in a forked child (nanlab.kernels.isolate): the kernel's exit, crash or
    signal ends the child, and fails the case it was on; the deadline kills the child."""
    from nanlab.kernels.isolate import run_forked

    def prepare():
        global STOPS_THE_CHECK
        STOPS_THE_CHECK = (CheckTimedOut,)  # SIGINT is ignored there: a KeyboardInterrupt is the kernel's own
        torch.set_num_threads(1)  # a forked child's OpenMP pool hangs if the parent's had started

    # autograd's first call imports sympy (about 0.6 s of CPU in torch 2.13): pay it here once, on a
    # scalar (no OpenMP pool started), rather than in every child, where it is lost when the child ends.
    x = torch.zeros((), dtype=torch.float64, requires_grad=True)
    torch.autograd.grad(x * 2.0, x, torch.ones((), dtype=torch.float64))
    forked = run_forked(len(pairs), lambda i: asdict(run_case(fn, *pairs[i], framework, grad_fn, seed)), timeout,
                        prepare)
    results = [CaseResult(**r) for r in forked.results]
    if forked.timed_out:
        return results, _cut_short(pairs, results, *_timed_out(timeout))
    if forked.ended:
        how = f"the process running the kernel {forked.ended}"
        return results, _cut_short(pairs, results, f"{how} during this case", how)
    return results, ""


def _timed_out(timeout: float) -> tuple[str, str]:
    """(the reason of the case a deadline cut short, why the check stopped)."""
    return f"timed out: the check passed its {timeout:g} s limit during this case", f"timed out after {timeout:g} s"


def _cut_short(pairs: list, results: list, reason: str, stop: str) -> str:
    """The check stopped during the pair after ``results``: that case fails with
    ``reason`` (appended to results), and the returned line says ``stop``, on which
    case, and how many pairs did not run."""
    case, dtype = pairs[len(results)]
    dname = dtype_name(dtype)
    results.append(CaseResult(case.name, dname, case.description, "fail", reason=reason))
    left = len(pairs) - len(results)
    return f"{stop} on {case.name} [{dname}]; {left} case-dtype pair{'s' if left != 1 else ''} not run"


# ---------------------------------------------------------------- xfail and baselines

def _xfail_matcher(xfail, kind: str, cases: list, key: str = "xfail") -> Callable[[CaseResult], bool]:
    """``xfail`` names cases: ``name`` for every dtype, ``name@dtype`` for one. A name
    that is no case of the kind is an error, so a typo cannot silently accept nothing."""
    known = {c.name for c in catalogue_cases(kind)} | {c.name for c in cases}
    wanted = set()
    for entry in xfail or ():
        name, _, dname = str(entry).partition("@")
        if name not in known:
            raise ConfigError(key, entry, f"not a {kind} case; the cases are {', '.join(sorted(known))}")
        if dname and dname not in options.DTYPES:
            raise ConfigError(key, entry, f"{dname} is not a dtype; choose one of {', '.join(options.DTYPES)}")
        wanted.add((name, dname))
    return lambda c: (c.name, "") in wanted or (c.name, c.dtype) in wanted


def _apply_xfail(results: list, listed: Callable[[CaseResult], bool]) -> None:
    # Strict, as pytest's xfail_strict: a listed case that passes is reported as xpass
    # and fails the check, so the list cannot go stale and hide the next regression.
    for c in results:
        if listed(c) and c.status in ("fail", "pass", "imprecise"):
            if c.status in ("pass", "imprecise"):
                c.status, c.reason = "xpass", "listed in xfail but passed: take it off the list"
            else:
                c.status = "xfail"


def load_report(source, key: str = "baseline") -> Report:
    """A Report from a check.json path (or a Report, returned as is); ConfigError naming ``key``."""
    if isinstance(source, Report):
        return source
    path = Path(source)
    try:
        data = _read_check_json(path)
        report = Report.from_dict(data)
    except OSError as err:
        raise ConfigError(key, source, f"cannot read it ({err.strerror or type(err).__name__})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(key, source, f"is not a check.json written by mode=check ({type(err).__name__}: "
                                       f"{str(err).splitlines()[0][:80] if str(err) else 'bad structure'})") from None
    return report


def _read_check_json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise ValueError("no list of cases")
    return data


def _grew(now: Optional[float], before: Optional[float]) -> bool:
    if now is None or before is None:
        return False  # not measured in one of the runs: nothing to compare
    return now > BASELINE_MARGIN * before if math.isfinite(before) else False


def _shrank(now: Optional[float], before: Optional[float]) -> bool:
    return _grew(before, now)


def _unmeasured_before(now: CaseResult, before: CaseResult) -> bool:
    """The part failing now has no error in the baseline (it was never reached there)."""
    if now.part == "gradient":
        return before.grad_error is None
    if now.part == "forward":
        return before.forward_error is None
    return False


def _apply_baseline(results: list, baseline: Report) -> None:
    """Mark each result regressed, improved, unchanged or new against the baseline.

    A failure is accepted (unchanged) when the baseline failed the same case and no
    error measured in both runs grew by more than BASELINE_MARGIN; a case that passed
    there and fails or is unsupported now has regressed."""
    before = {(c.name, c.dtype): c for c in baseline.cases}
    failed = ("fail", "xfail")
    for c in results:
        b = before.get((c.name, c.dtype))
        if b is None:
            c.change = "new"
            continue
        was_failing, is_failing = b.status in failed, c.status in failed
        if is_failing and not was_failing:
            c.change = "regressed"
            c.reason += f" (the baseline: {b.status})"
        elif c.status == "unsupported" and b.status in ("pass", "imprecise", "xpass"):
            c.change = "regressed"
            c.reason += " (the baseline: pass)"
        elif is_failing and _unmeasured_before(c, b):
            # The part failing now was not measured in the baseline (a gradient behind a failed
            # forward): nothing to compare it with, so it is judged on its own and fails.
            c.change = "regressed"
            c.reason += f" (the baseline did not measure the {c.part}: judged on its own)"
        elif is_failing:
            grown = [(part, now, then) for part, now, then in (("forward", c.forward_error, b.forward_error),
                                                               ("gradient", c.grad_error, b.grad_error))
                     if _grew(now, then)]
            if grown:
                c.change = "regressed"
                c.reason += "; " + ", ".join(f"{part} error grew from {then:.3g} to {now:.3g}, over "
                                             f"{BASELINE_MARGIN:g}x the baseline's" for part, now, then in grown)
            elif _shrank(c.forward_error, b.forward_error) or _shrank(c.grad_error, b.grad_error):
                c.change = "improved"
            else:
                c.change = "unchanged"
        elif was_failing or (b.status == "unsupported" and c.status != "unsupported"):
            c.change = "improved"
        else:
            c.change = "unchanged"


# ---------------------------------------------------------------- check()

def kernel_name(fn) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    # torch's builtins (torch.softmax, ...) are methods of a private class; name them as users call them.
    return "torch." + name.partition(".")[2] if name.startswith("_VariableFunctionsClass.") else name


def _kind_and_cases(kind, cases) -> tuple[str, Optional[list]]:
    """Resolve check()'s ``kind``/``cases``: a Case in place of the kind is
    ``cases=[case]``, and an omitted kind is the one kind of ``cases``."""
    if isinstance(kind, Case):
        if cases is not None:
            raise TypeError("check() takes one Case in place of kind, or cases=[...], not both")
        return kind.kind, [kind]
    if cases is None:
        if kind is None:
            raise TypeError("check() needs a kind, a Case, or cases=[...]")
        return kind, None
    cases = list(cases)
    kinds = sorted({case.kind for case in cases})
    if kind is None:
        if len(kinds) != 1:
            raise ValueError("check() takes the kind from cases= only when they are all of one kind; "
                             f"got {', '.join(kinds) or 'no cases'}: pass kind=")
        return kinds[0], cases
    if kinds and kinds != [kind]:
        raise ValueError(f"cases= of kind {', '.join(kinds)} given to check() with kind={kind!r}")
    return kind, cases


def _dtypes(dtypes) -> list:
    if dtypes is None:
        return list(DTYPES.values())
    chosen = []
    for d in dtypes:
        if isinstance(d, str):
            if d not in DTYPES:
                raise ConfigError("dtypes", d, f"not a dtype; choose from {', '.join(options.DTYPES)}")
            d = DTYPES[d]
        if d not in TOLERANCES:
            raise ConfigError("dtypes", d, f"not a floating-point dtype nanlab checks ({', '.join(options.DTYPES)})")
        if d not in chosen:
            chosen.append(d)
    if not chosen:
        raise ConfigError("dtypes", "[]", "must name at least one dtype")
    return chosen


def check(fn: Callable, kind: Union[str, Case, None] = None, framework: str = "torch", dtypes=None,
          grad_fn: Optional[Callable] = None, cases: Optional[list] = None, seed: int = 0,
          timeout: Optional[float] = None, xfail=(), baseline=None, isolate: bool = False) -> Report:
    """Check ``fn`` against every case of ``kind`` at each dtype; returns a Report.

    ``check(fn, case)`` checks one Case alone (for pytest.mark.parametrize), and
    ``check(fn, cases=[...])`` some cases; the kind is then taken from the cases.

    framework="torch": fn takes and returns torch tensors; gradients are checked
    through autograd. framework="numpy": fn takes and returns NumPy arrays;
    gradients are checked when ``grad_fn(*inputs, upstream=..., **keywords)``
    returns the gradient with respect to the first input.

    A keyword the kernel's signature lacks makes that case "unsupported", except in
    a core case, which every kernel of the kind must run: there it fails.
    ``timeout``: seconds for the whole check (None, the default: no limit); past
    it, the case running fails and the check stops. In this process a timeout uses
    SIGALRM, so it needs the main thread (ValueError elsewhere); an isolated check's
    child is killed at it instead, from any thread. The CLI sets one (kernel.timeout). ``xfail``: case names (``name`` or
    ``name@dtype``) expected to fail; one that passes fails the check (xpass).
    ``baseline``: a check.json path or a Report; a failure the baseline shares
    fails the check only if it got worse. ``isolate``: run the cases in a forked
    child process (nanlab.kernels.isolate), so a kernel that exits, crashes or is
    killed stops the check with a reason naming its case instead of ending the
    caller; the CLI always isolates. POSIX only, and not with CUDA already in use.
    """
    if isinstance(kind, Kind):  # a declared kind is registered, so that xfail and baselines find its cases by name
        kind = resolve(kind).name
    kind, cases = _kind_and_cases(kind, cases)
    if kind not in options.KERNEL_KINDS and kind not in USER_KINDS:
        raise ValueError(unknown_kind(kind))
    if framework not in options.KERNEL_FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; choose {' or '.join(options.KERNEL_FRAMEWORKS)}")
    if grad_fn is not None and framework != "numpy":
        raise ConfigError("grad_fn", kernel_name(grad_fn), f"applies to framework numpy only: a {framework} "
                                                           "kernel's gradient is checked through autograd")
    chosen = _dtypes(dtypes)
    timeout = _check_timeout(timeout, isolate)
    selected = cases if cases is not None else catalogue_cases(kind)
    listed = _xfail_matcher(xfail, kind, selected)
    before = load_report(baseline) if baseline is not None else None
    source = f"the report of {before.kernel}" if isinstance(baseline, Report) else str(baseline)
    if before is not None and before.kind != kind:
        raise ConfigError("baseline", source, f"is a check of kind {before.kind}, not {kind}")
    pairs = [(case, dtype) for case in selected for dtype in chosen]
    run = _run_isolated if isolate else _run_all
    results, stopped = run(fn, grad_fn, framework, pairs, seed, timeout)
    _apply_xfail(results, listed)
    report = Report(kernel_name(fn), kind, framework, results, stopped, len(pairs) - len(results))
    if before is not None:
        _apply_baseline(results, before)
        report.baseline = source
    return report
