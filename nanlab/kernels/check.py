"""Check a loss kernel against the case catalogue.

Each case runs at each dtype. Inputs are drawn in float64, cast to the dtype, and
the reference is computed in float64 on the cast values (so rounding the inputs is
never counted against the kernel). The forward value must match, and for torch
kernels so must the gradient through autograd, with a random upstream gradient
(never all ones, which hides per-row bugs in reduction='none' backwards).

A value passes if it is within torch.testing's default tolerance for the dtype, or
no further from the reference than the framework's own op at the same dtype. A
non-finite value where the reference is finite always fails, and so does a
non-finite value of a different kind (NaN where the reference is -inf). Where the
reference is undefined (NaN), any value is accepted, for every kernel alike.

The comparison lives here; the cases and their references live in
nanlab.kernels.catalogue, which never imports this module.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch

from nanlab import jsonio, options
from nanlab.build import DTYPES
from nanlab.kernels.catalogue import Case, reference
from nanlab.kernels.catalogue import cases as catalogue_cases

# The framework's own op for each kind: a kernel no further from the reference than it passes.
FRAMEWORK_OPS = {
    "cross_entropy": torch.nn.functional.cross_entropy,
    "binary_cross_entropy": torch.nn.functional.binary_cross_entropy,
    "binary_cross_entropy_with_logits": torch.nn.functional.binary_cross_entropy_with_logits,
    "softmax": torch.softmax,
    "log_softmax": torch.log_softmax,
    "logsumexp": torch.logsumexp,
}
assert set(FRAMEWORK_OPS) == set(options.KERNEL_KINDS), "FRAMEWORK_OPS must have one entry per options.KERNEL_KINDS"
# torch.testing.assert_close's defaults: (rtol, atol)
TOLERANCES = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
              torch.float64: (1e-7, 1e-7)}
NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


@dataclass
class CaseResult:
    name: str
    dtype: str
    description: str
    status: str  # pass, fail, unsupported
    forward_error: Optional[float] = None
    grad_error: Optional[float] = None
    reason: str = ""


@dataclass
class Report:
    kernel: str
    kind: str
    framework: str
    cases: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list:
        return [c for c in self.cases if c.status == "fail"]

    def to_dict(self) -> dict:
        return jsonio.jsonable({"kernel": self.kernel, "kind": self.kind, "framework": self.framework,
                                "passed": self.passed, "cases": [asdict(c) for c in self.cases]})

    def table(self) -> str:
        lines = [f"{'case':<34} {'dtype':<9} {'status':<12} {'fwd err':>10} {'grad err':>10}  reason", "-" * 100]
        for c in self.cases:
            fe = "-" if c.forward_error is None else f"{c.forward_error:.3g}"
            ge = "-" if c.grad_error is None else f"{c.grad_error:.3g}"
            lines.append(f"{c.name:<34} {c.dtype:<9} {c.status:<12} {fe:>10} {ge:>10}  {c.reason}")
        counts = {s: sum(c.status == s for c in self.cases) for s in ("pass", "fail", "unsupported")}
        lines.append("")
        lines.append(f"{self.kernel} ({self.kind}, {self.framework}): {counts['pass']} pass, {counts['fail']} fail, "
                     f"{counts['unsupported']} unsupported -> {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def is_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float):
    """The elementwise ok mask. A NaN reference means undefined: accepted."""
    undefined = torch.isnan(ref)
    both_finite = torch.isfinite(out) & torch.isfinite(ref)
    close = both_finite & ((out - ref).abs() <= atol + rtol * ref.abs())
    same_inf = torch.isinf(ref) & (out == ref)
    return undefined | close | same_inf


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach(), ref.detach()
    both = torch.isfinite(out) & torch.isfinite(ref)
    return float((out - ref).abs()[both].max()) if both.any() else 0.0


def describe_mismatch(out: torch.Tensor, ref: torch.Tensor) -> str:
    """The first disagreement in finiteness (finite vs inf, NaN vs -inf, inf vs -inf)."""
    agree = torch.isnan(ref) | (torch.isfinite(out) & torch.isfinite(ref)) | (torch.isinf(ref) & (out == ref))
    bad = ~agree
    if bad.any():
        i = int(torch.nonzero(bad.flatten())[0])
        return f"{out.flatten()[i].item()} where the reference is {ref.flatten()[i].item()}"
    return ""


def _accepts(fn: Callable, keywords: dict) -> list[str]:
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


def in_dtype_range(ref: torch.Tensor, dtype) -> torch.Tensor:
    """The reference as the dtype can hold it: a value beyond the dtype's largest
    finite number is +-inf there, and inf is then the correctly rounded answer."""
    limit = torch.finfo(dtype).max
    return torch.where(ref.abs() > limit, ref.sign() * math.inf, ref)


def _judge(out, ref, ours_vs_framework, dtype) -> tuple[bool, float, str]:
    rtol, atol = TOLERANCES[dtype]
    ref = in_dtype_range(ref, dtype)
    ok = is_close(out, ref, rtol, atol)
    err = max_abs_error(out, ref)
    if bool(ok.all()):
        return True, err, ""
    mismatch = describe_mismatch(out, ref)
    if mismatch:
        return False, err, mismatch
    framework_err = ours_vs_framework()
    if framework_err is not None and err <= framework_err:
        return True, err, f"beyond tolerance but no worse than the framework's op ({framework_err:.3g})"
    return False, err, f"max error {err:.3g} beyond tolerance" + (
        f" and the framework's op ({framework_err:.3g})" if framework_err is not None else "")


def _undefined_if_forward_is(ref, ref_grad):
    """A scalar loss that is undefined (0/0) has no gradient either."""
    if ref_grad is not None and ref.numel() == 1 and bool(torch.isnan(ref.detach()).all()):
        return torch.full_like(ref_grad, math.nan)
    return ref_grad


def _run_torch(fn, case, tensors, keywords, dtype, gen):
    # .to() keeps a non-contiguous case's strides, so the kernel sees the layout the case built.
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    cast64 = [t.double() if t.is_floating_point() else t for t in inputs]
    x = inputs[0].detach().requires_grad_(True)
    x64 = cast64[0].detach().requires_grad_(True)
    ref = reference(case, [x64] + cast64[1:], keywords)
    upstream = _upstream(ref.shape, gen)
    out = fn(x, *inputs[1:], **keywords)
    (ref_grad,) = torch.autograd.grad(ref, x64, upstream, allow_unused=True) if ref.requires_grad else (None,)
    ref_grad = _undefined_if_forward_is(ref, ref_grad)
    out_grad = None
    if out.requires_grad:
        (out_grad,) = torch.autograd.grad(out, x, upstream.to(out.dtype), allow_unused=True)

    def framework_error(of_grad: bool):
        def measure():
            xf = inputs[0].detach().requires_grad_(True)
            try:
                fo = FRAMEWORK_OPS[case.kind](xf, *inputs[1:], **keywords)
                if not of_grad:
                    return max_abs_error(fo.double(), ref.detach())
                (fg,) = torch.autograd.grad(fo, xf, upstream.to(fo.dtype))
                return max_abs_error(fg.double(), ref_grad)
            except (RuntimeError, TypeError):
                return None

        return measure

    ok_f, err_f, why_f = _judge(out.detach().double(), ref.detach(), framework_error(False), dtype)
    if not ok_f:
        return "fail", err_f, None, f"forward: {why_f}"
    if ref_grad is None:
        return "pass", err_f, None, why_f
    if out_grad is None:
        return "fail", err_f, None, "no gradient reached the input"
    ok_g, err_g, why_g = _judge(out_grad.double(), ref_grad, framework_error(True), dtype)
    return ("pass" if ok_g else "fail"), err_f, err_g, (why_f or why_g) if ok_g else f"gradient: {why_g}"


def _run_numpy(fn, grad_fn, case, tensors, keywords, dtype, gen):
    if dtype not in NUMPY_DTYPES:
        return "unsupported", None, None, "NumPy has no bfloat16"
    np_dtype = NUMPY_DTYPES[dtype]
    arrays = [t.numpy().astype(np_dtype) if t.is_floating_point() else t.numpy() for t in tensors]
    x64 = torch.from_numpy(arrays[0].astype(np.float64)).requires_grad_(True)
    rest64 = [torch.from_numpy(a.astype(np.float64)) if a.dtype.kind == "f" else torch.from_numpy(a) for a in arrays[1:]]
    ref = reference(case, [x64] + rest64, keywords)
    with np.errstate(all="ignore"):
        out = torch.from_numpy(np.asarray(fn(*arrays, **keywords), dtype=np.float64))
    ok_f, err_f, why_f = _judge(out, ref.detach(), lambda: None, dtype)
    if not ok_f or grad_fn is None:
        return ("pass" if ok_f else "fail"), err_f, None, why_f if ok_f else f"forward: {why_f}"
    upstream = _upstream(ref.shape, gen)
    (ref_grad,) = torch.autograd.grad(ref, x64, upstream)
    ref_grad = _undefined_if_forward_is(ref, ref_grad)
    with np.errstate(all="ignore"):
        grad = torch.from_numpy(np.asarray(grad_fn(*arrays, upstream=upstream.numpy().astype(np_dtype), **keywords),
                                           dtype=np.float64))
    ok_g, err_g, why_g = _judge(grad, ref_grad, lambda: None, dtype)
    return ("pass" if ok_g else "fail"), err_f, err_g, "" if ok_g else f"gradient: {why_g}"


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


def check(fn: Callable, kind: Union[str, Case, None] = None, framework: str = "torch", dtypes=None,
          grad_fn: Optional[Callable] = None, cases: Optional[list] = None, seed: int = 0) -> Report:
    """Check ``fn`` against every case of ``kind`` at each dtype; returns a Report.

    ``check(fn, case)`` checks one Case alone (for pytest.mark.parametrize), and
    ``check(fn, cases=[...])`` some cases; the kind is then taken from the cases.

    framework="torch": fn takes and returns torch tensors; gradients are checked
    through autograd. framework="numpy": fn takes and returns NumPy arrays;
    gradients are checked when ``grad_fn(*inputs, upstream=..., **keywords)``
    returns the gradient with respect to the first input.
    A keyword the kernel's signature lacks makes that case "unsupported".
    """
    kind, cases = _kind_and_cases(kind, cases)
    if kind not in options.KERNEL_KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; choose one of {', '.join(options.KERNEL_KINDS)}")
    if framework not in options.KERNEL_FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; choose {' or '.join(options.KERNEL_FRAMEWORKS)}")
    chosen = [DTYPES[d] if isinstance(d, str) else d for d in (dtypes or DTYPES)]
    report = Report(getattr(fn, "__qualname__", repr(fn)), kind, framework)
    for case in cases if cases is not None else catalogue_cases(kind):
        for dtype in chosen:
            gen = torch.Generator().manual_seed(seed)
            tensors, keywords = case.build(gen)
            dname = str(dtype).removeprefix("torch.")
            missing = _accepts(fn, keywords)
            if missing:
                report.cases.append(CaseResult(case.name, dname, case.description, "unsupported",
                                               reason=f"the kernel takes no {', '.join(missing)}"))
                continue
            try:
                if framework == "torch":
                    status, fe, ge, why = _run_torch(fn, case, tensors, keywords, dtype, gen)
                else:
                    status, fe, ge, why = _run_numpy(fn, grad_fn, case, tensors, keywords, dtype, gen)
            except Exception as err:  # a kernel that crashes on a case fails that case
                status, fe, ge, why = "fail", None, None, f"raised {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            report.cases.append(CaseResult(case.name, dname, case.description, status, fe, ge, why))
    return report
