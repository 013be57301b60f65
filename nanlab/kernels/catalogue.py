"""The case catalogue: inputs that break naive loss kernels, each with its float64 reference.

Every case is a declarative entry, in the spirit of PyTorch's OpInfo: a name, the
kind of kernel it is for, a description, and a builder that draws float64 inputs
from a seeded generator. References are our own stable float64 formulas, not
torch's fused kernels, so torch's functions can be checked by them too. Every
reference is differentiable: each case checks the gradient as well as the value.

Policy where the reference is undefined: the softmax or log_softmax of a row that
is all -inf, and a mean over targets that are all ignored, have no value (0/0).
The reference holds NaN there, and any output, NaN or finite, is accepted at those
positions only. Every kernel gets the same policy.

Core cases: a case is core when it passes no keyword beyond the ones every kernel
of its kind must take (REQUIRED_KEYWORDS). A kernel must run every core case; a
case that passes an optional keyword (ignore_index, label_smoothing) is
"unsupported" for a kernel whose signature lacks it. A case whose inputs need a
keyword (targets holding ignore_index) passes it explicitly, so that rule is the
same for every keyword.

Known failures of the framework's own op (``Case.framework_failures``) are
measurements, recorded where they were found: they keep that op from being the
benchmark that calls another kernel "imprecise" on that case (see the check module), and a test checks that torch
fails exactly these.

This module holds cases and references only. Comparing a kernel with them, and
running a kernel over them, is the checker's job (the check module), which depends
on this module, never the other way round: check a single case with ``check(fn, case)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from nanlab.config import options

NEG_INF = float("-inf")
IGNORE = -100

# The keywords every kernel of a kind must accept; the signatures mirror torch.nn.functional.
REQUIRED_KEYWORDS = {
    "cross_entropy": ("reduction",),
    "binary_cross_entropy": ("reduction",),
    "binary_cross_entropy_with_logits": ("reduction",),
    "softmax": ("dim",),
    "log_softmax": ("dim",),
    "logsumexp": ("dim",),
}
assert set(REQUIRED_KEYWORDS) == set(options.KERNEL_KINDS), "REQUIRED_KEYWORDS must have one entry per options.KERNEL_KINDS"

PARTS = ("forward", "gradient")


@dataclass(frozen=True)
class KnownFailure:
    """The framework's own op for the case's kind (torch.nn.functional.cross_entropy,
    torch.logsumexp, ...) fails this case at ``dtype``: ``part`` is forward or
    gradient, ``error`` the largest error measured there at seed 0 (inf when a
    value came out non-finite, or finite where the reference is not), ``note``
    what happens."""

    dtype: str
    part: str
    error: float
    note: str

    def __post_init__(self):
        assert self.dtype in options.DTYPES and self.part in PARTS, self


@dataclass(frozen=True)
class Case:
    """One input for one kind. ``build(gen)`` returns (tensors, keywords): the
    positional tensors in float64 (integer targets stay long) and the keyword
    arguments the kernel is called with.

    ``core``: every kernel of the kind must run this case (it passes only
    REQUIRED_KEYWORDS). ``reference_fn`` replaces the kind's reference formula for
    this case. ``framework_failures`` are the framework op's measured failures here."""

    name: str
    kind: str
    description: str
    build: Callable = field(repr=False)
    undefined: str = ""  # where the reference is undefined and any value is accepted
    core: bool = True
    reference_fn: Optional[Callable] = field(default=None, repr=False)
    framework_failures: tuple = ()

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    def known_failure(self, dtype: str, part: str) -> Optional[KnownFailure]:
        """The framework op's recorded failure on this case at dtype and part, if any."""
        return next((f for f in self.framework_failures if f.dtype == dtype and f.part == part), None)

    @property
    def check(self):
        # Removed: it made the catalogue depend on the checker, which depends on the catalogue.
        raise AttributeError("Case.check was removed; use nanlab.kernels.check(fn, case) "
                             "(or check(fn, cases=[case]))")


# ---------------------------------------------------------------- references (float64)

def ref_log_softmax(x, dim=-1):
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shifted = x - m
    return shifted - torch.log(torch.exp(shifted).sum(dim, keepdim=True))


def ref_softmax(x, dim=-1):
    return torch.exp(ref_log_softmax(x, dim))


def ref_logsumexp(x, dim=-1):
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (m + torch.log(torch.exp(x - m).sum(dim, keepdim=True))).squeeze(dim)


def reduce_loss(per_item, reduction, count=None):
    """Apply reduction none/sum/mean; mean divides by ``count`` when given (valid targets)."""
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.sum()
    return per_item.sum() / (per_item.numel() if count is None else count)


def ref_cross_entropy(logits, target, reduction="mean", ignore_index=IGNORE, label_smoothing=0.0):
    valid = target != ignore_index
    # Ignored rows take no part: their logits are replaced before any arithmetic, so
    # their loss and gradient are exactly 0 even when the row is all -inf.
    z = torch.where(valid[:, None], logits, torch.zeros_like(logits))
    logp = ref_log_softmax(z, 1)
    nll = -logp.gather(1, torch.where(valid, target, 0)[:, None]).squeeze(1)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(1)
    per_row = torch.where(valid, nll, torch.zeros_like(nll))
    return reduce_loss(per_row, reduction, valid.sum())


class _ExactBCE(torch.autograd.Function):
    """-(y log p + (1-y) log(1-p)) with 0*log(0) = 0 and its exact gradient,
    including -inf/+inf where a target disagrees with a probability of 0 or 1."""

    @staticmethod
    def forward(ctx, p, y):
        ctx.save_for_backward(p, y)
        return -(torch.xlogy(y, p) + torch.xlogy(1 - y, 1 - p))

    @staticmethod
    def backward(ctx, grad):
        p, y = ctx.saved_tensors
        zero = torch.zeros_like(p)
        dp = torch.where(y == 0, zero, -y / p) + torch.where(y == 1, zero, (1 - y) / (1 - p))
        return grad * dp, None


def ref_binary_cross_entropy(p, y, reduction="mean"):
    return reduce_loss(_ExactBCE.apply(p, y), reduction)


class _ExactBCEWithLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, y):
        ctx.save_for_backward(z, y)
        return z.clamp_min(0) - z * y + torch.log1p(torch.exp(-z.abs()))

    @staticmethod
    def backward(ctx, grad):
        z, y = ctx.saved_tensors
        return grad * (torch.sigmoid(z) - y), None


def ref_binary_cross_entropy_with_logits(z, y, reduction="mean"):
    return reduce_loss(_ExactBCEWithLogits.apply(z, y), reduction)


def _mp_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp and softmax of each row with mpmath at 50 digits: the reference for
    inputs whose float64 answer would itself lose digits (huge values differing in
    the last bits). Rows are (lse, softmax); an all -inf row has lse -inf and no
    softmax (0/0, NaN), and a row with +inf has lse +inf and no softmax (inf/inf)."""
    import mpmath

    lse_rows, softmax_rows = [], []
    with mpmath.workdps(50):  # a context, so the caller's mpmath precision is left alone
        for row in x.tolist():
            values = [mpmath.mpf(v) for v in row]
            total = mpmath.fsum(mpmath.exp(v) for v in values)
            lse = mpmath.log(total) if total > 0 else mpmath.mpf("-inf")
            lse_rows.append(float(lse))
            softmax_rows.append([float(mpmath.exp(v - lse)) if mpmath.isfinite(lse) else math.nan for v in values])
    return torch.tensor(lse_rows, dtype=torch.float64), torch.tensor(softmax_rows, dtype=torch.float64)


class _PreciseLogSumExp(torch.autograd.Function):
    """logsumexp over the last dim of a 2-D tensor at 50 digits, and its gradient:
    d lse / dx = softmax(x), also at 50 digits, times the upstream gradient."""

    @staticmethod
    def forward(ctx, x):
        lse, softmax = _mp_rows(x)
        ctx.save_for_backward(softmax)
        return lse

    @staticmethod
    def backward(ctx, grad):
        (softmax,) = ctx.saved_tensors
        return grad[:, None] * softmax


def mp_logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if dim not in (-1, x.dim() - 1) or x.dim() != 2:
        raise ValueError("mp_logsumexp takes a 2-D tensor and the last dim")
    return _PreciseLogSumExp.apply(x)


REFERENCES = {
    "cross_entropy": ref_cross_entropy,
    "binary_cross_entropy": ref_binary_cross_entropy,
    "binary_cross_entropy_with_logits": ref_binary_cross_entropy_with_logits,
    "softmax": ref_softmax,
    "log_softmax": ref_log_softmax,
    "logsumexp": ref_logsumexp,
}
assert set(REFERENCES) == set(options.KERNEL_KINDS), "REFERENCES must have one entry per options.KERNEL_KINDS"


# ---------------------------------------------------------------- the cases

def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _uniform(g, lo, hi, *shape):
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)


def _targets(g, n, c):
    return torch.randint(0, c, (n,), generator=g)


def _with_neg_inf(g, n, c):
    x = _randn(g, n, c)
    x[:, 1::2] = NEG_INF  # every other class masked; class 0 stays finite
    return x


def _fully_masked_row(g, n, c):
    x = _randn(g, n, c)
    x[2] = NEG_INF
    return x


def _gap(g, n, c):
    x = torch.full((n, c), -1e4, dtype=torch.float64)
    x[:, 0] = 1e4
    x[:, 1] = 0.0
    return x


def _signs(g, *shape):
    return torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0).double()


def _near_fp16_max(g, n, c):
    return _uniform(g, 6.0e4, 6.5e4, n, c) * _signs(g, n, c)


def _noncontiguous(g, n, c):
    return _randn(g, c, n).T  # a transposed view: stride (1, n)


def _failures(dtypes_errors: dict, part: str, note: str) -> tuple:
    """KnownFailure records for one part of one case: {dtype: measured error}."""
    return tuple(KnownFailure(dtype, part, error, note) for dtype, error in dtypes_errors.items())


# torch.logsumexp's backward is exp(x - lse) with its own output lse, rounded to the dtype:
# where lse is large, that rounding is the whole gradient's error.
_LSE_ROUNDED_FORWARD = ("the gradient is exp(x - lse) with lse = 1e4 + log 5 rounded to the dtype (float16: to 1e4, "
                        "so each entry is 1.0 times the upstream where the exact one is 0.2)")
_LSE_HUGE_ROUNDED_FORWARD = ("the gradient is exp(x - lse) with lse rounded to the dtype; at 1e15 float64's spacing is "
                             "0.125, so each entry is off by about 4% (float32 and bfloat16 round the inputs to "
                             "equal values: 1.0 per entry where the exact one is 1/6)")


def _row_cases(kind: str) -> list[Case]:
    """Shared by softmax, log_softmax and logsumexp (x, dim=-1): dim is required, so all are core."""
    undefined = "" if kind == "logsumexp" else "an all -inf row has no softmax (0/0): any value accepted there"

    def case(name, description, make, undef="", failures=(), dim=-1):
        return Case(name, kind, description, lambda g: ([make(g)], {"dim": dim}), undef, framework_failures=failures)

    all_equal_failures = ()
    if kind == "logsumexp":
        all_equal_failures = _failures({"float32": 2.57e-05, "float16": 1.63, "bfloat16": 1.64}, "gradient",
                                       _LSE_ROUNDED_FORWARD)
    return [
        case("random", "x [8, 5] ~ N(0, 1)", lambda g: _randn(g, 8, 5)),
        case("large_positive", "x [6, 7] ~ U(1e3, 1e4)", lambda g: _uniform(g, 1e3, 1e4, 6, 7)),
        case("large_negative", "x [6, 7] ~ -U(1e3, 1e4)", lambda g: -_uniform(g, 1e3, 1e4, 6, 7)),
        case("large_gap", "rows [1e4, 0, -1e4, ...]", lambda g: _gap(g, 4, 6)),
        case("all_equal", "every entry 1e4", lambda g: torch.full((4, 5), 1e4, dtype=torch.float64),
             failures=all_equal_failures),
        case("some_neg_inf", "every other entry -inf", lambda g: _with_neg_inf(g, 5, 6)),
        case("fully_neg_inf_row", "row 2 entirely -inf", lambda g: _fully_masked_row(g, 5, 6), undefined),
        case("near_fp16_max", "|x| ~ U(6e4, 6.5e4), both signs", lambda g: _near_fp16_max(g, 4, 6)),
        case("noncontiguous", "x [9, 6] as a transposed view", lambda g: _noncontiguous(g, 9, 6)),
        case("odd_sizes", "x [7, 13]", lambda g: _randn(g, 7, 13)),
        case("many_classes", "x [3, 32768] ~ N(0, 4)", lambda g: 2 * _randn(g, 3, 32768)),
        # dim varies: a kernel that always reduces over the last axis fails these.
        case("dim_0_rank2", "x [5, 3] ~ N(0, 1), dim=0", lambda g: _randn(g, 5, 3), dim=0),
        case("dim_1_rank3", "x [2, 5, 3] ~ N(0, 1), dim=1", lambda g: _randn(g, 2, 5, 3), dim=1),
        case("dim_neg3_rank3", "x [4, 2, 3] ~ N(0, 1), dim=-3", lambda g: _randn(g, 4, 2, 3), dim=-3),
        case("dim_last_rank1", "x [6] ~ N(0, 1), dim=0", lambda g: _randn(g, 6), dim=0),
        # The hard inputs along an axis other than the last: a kernel that is stable only
        # when dim=-1 (and naive otherwise) passes the N(0, 1) dim cases above, not these.
        case("large_dim_0", "|x| [6, 4] ~ U(1e3, 1e4), both signs, dim=0",
             lambda g: _uniform(g, 1e3, 1e4, 6, 4) * _signs(g, 6, 4), dim=0),
        case("fully_neg_inf_dim_0", "x [5, 6] with column 2 entirely -inf, dim=0",
             lambda g: _fully_masked_row(g, 6, 5).T.contiguous(), undefined, dim=0),
    ]


def _loss_case(kind, name, description, make, reduction="mean", undef="", failures=(), **keywords) -> Case:
    """A case for a loss kernel: ``make(gen)`` gives (input, target); a reduction
    other than mean is part of the case's name. It is core unless it passes a
    keyword beyond ``reduction``."""

    def build(g):
        return list(make(g)), {"reduction": reduction, **keywords}

    return Case(name if reduction == "mean" else f"{name}[{reduction}]", kind, description, build, undef,
                core=not keywords, framework_failures=failures)


def _ce_cases() -> list[Case]:
    def case(name, description, make, reduction="mean", undef="", failures=(), **kw):
        return _loss_case("cross_entropy", name, description, make, reduction, undef, failures, **kw)

    def random(g):
        return _randn(g, 8, 5), _targets(g, 8, 5)

    def ignored_some(g):
        t = _targets(g, 8, 5)
        t[::3] = IGNORE
        return _randn(g, 8, 5), t

    def large(g):
        return _uniform(g, 1e3, 1e4, 6, 7) * _signs(g, 6, 7), _targets(g, 6, 7)

    def ignored_as(value):
        def make(g):
            t = _targets(g, 8, 5)
            t[::3] = value
            return _randn(g, 8, 5), t

        return make

    def masked_target(g):
        x = _with_neg_inf(g, 5, 6)
        t = 2 * torch.randint(0, 3, (5,), generator=g)
        t[1] = 3  # an odd class: masked
        return x, t

    ignored_row_nan = _failures({d: math.inf for d in options.DTYPES}, "gradient",
                                "NaN gradient for the ignored all -inf row, where the exact gradient is 0: the "
                                "row's log_softmax backward runs even though the row is ignored")
    cases = []
    for reduction in ("none", "sum", "mean"):
        cases += [case("random", "logits [8, 5] ~ N(0, 1)", random, reduction),
                  case("ignore_index_rows", "every third target = ignore_index", ignored_some, reduction,
                       ignore_index=IGNORE),
                  case("large_logits_both_signs", "|logits| ~ U(1e3, 1e4)", large, reduction)]
    cases += [
        case("large_gap", "rows [1e4, 0, -1e4, ...], target 0 or 1", lambda g: (_gap(g, 4, 6), torch.tensor([0, 1, 1, 2]))),
        case("all_equal", "every logit 1e4", lambda g: (torch.full((4, 5), 1e4, dtype=torch.float64), _targets(g, 4, 5))),
        case("some_neg_inf", "every other logit -inf; targets on finite entries",
             lambda g: (_with_neg_inf(g, 5, 6), 2 * torch.randint(0, 3, (5,), generator=g))),
        case("fully_neg_inf_row_ignored", "row 2 all -inf with target ignore_index (loss and gradient are 0 there)",
             lambda g: (_fully_masked_row(g, 5, 6), torch.tensor([0, 1, IGNORE, 3, 4])), failures=ignored_row_nan,
             ignore_index=IGNORE),
        case("label_smoothing_neg_inf", "label_smoothing=0.1 with -inf logits (the exact loss is +inf)",
             lambda g: (_with_neg_inf(g, 5, 6), 2 * torch.randint(0, 3, (5,), generator=g)), label_smoothing=0.1),
        case("label_smoothing", "label_smoothing=0.2, logits ~ N(0, 1)", random, label_smoothing=0.2),
        case("all_rows_ignored", "every target ignore_index: the mean is 0/0",
             lambda g: (_randn(g, 4, 5), torch.full((4,), IGNORE)), undef="the mean over no targets is undefined",
             ignore_index=IGNORE),
        case("all_rows_ignored", "every target ignore_index: the sum is 0",
             lambda g: (_randn(g, 4, 5), torch.full((4,), IGNORE)), reduction="sum", ignore_index=IGNORE),
        case("near_fp16_max", "|logits| ~ U(6e4, 6.5e4)", lambda g: (_near_fp16_max(g, 4, 6), _targets(g, 4, 6))),
        case("noncontiguous", "logits [9, 6] as a transposed view", lambda g: (_noncontiguous(g, 9, 6), _targets(g, 9, 6)),
             "none"),
        case("odd_sizes", "logits [7, 13]", lambda g: (_randn(g, 7, 13), _targets(g, 7, 13))),
        case("many_classes", "logits [4, 32768] ~ N(0, 4)", lambda g: (2 * _randn(g, 4, 32768), _targets(g, 4, 32768))),
        # A target on a -inf logit: that class has probability 0, so the exact loss is +inf.
        # A kernel that swaps -inf for the dtype's lowest finite value returns about 3.4e38.
        case("target_on_neg_inf_logit", "every other logit -inf; row 1's target on a -inf logit (its loss is +inf)",
             masked_target, "none"),
        case("target_on_neg_inf_logit", "every other logit -inf; row 1's target on a -inf logit (the mean is +inf)",
             masked_target),
    ]
    # ignore_index over several values, so a kernel that hard-codes -100 fails: a real
    # class index (its targets are ignored, its logits still count in other rows'
    # softmax), the common -1, and the number of classes (one past the last class).
    for value, name in ((2, "ignore_index_real_class"), (-1, "ignore_index_minus_1"), (5, "ignore_index_num_classes")):
        for reduction in (("none", "mean") if value == 2 else ("mean",)):
            cases.append(case(name, f"ignore_index={value}; every third target is {value}", ignored_as(value),
                              reduction, ignore_index=value))
    return cases


def _bce_cases() -> list[Case]:
    def case(name, description, make, reduction="mean", failures=()):
        return _loss_case("binary_cross_entropy", name, description, make, reduction, failures=failures)

    def random(g):
        return torch.rand(8, generator=g, dtype=torch.float64) * 0.98 + 0.01, torch.randint(0, 2, (8,), generator=g).double()

    def exact(*values):
        return torch.tensor(values, dtype=torch.float64)

    agreeing_zero_gradient = (
        _failures({"float32": 2.04, "float64": 2.04, "bfloat16": 2.05}, "gradient",
                  "gradient 0 where the exact one is -/+ the upstream gradient (p = y = 1: -1, p = y = 0: +1): "
                  "torch divides by max(p (1 - p), 1e-12)")
        + _failures({"float16": math.inf}, "gradient",
                    "NaN gradient where the exact one is -/+ the upstream gradient: 1e-12 underflows to 0 in "
                    "float16, so torch's p (1 - p) / max(p (1 - p), eps) is 0/0"))
    clamped_log = ("loss 100 where the exact loss is +inf: torch clamps log(p) and log(1 - p) at -100 (and its "
                   "gradient is finite, about 1e12, where the exact one is infinite)")
    cases = [case("random", "p ~ U(0.01, 0.99), y in {0, 1}", random, r) for r in ("none", "sum", "mean")]
    cases += [
        case("probs_0_and_1_agreeing", "p exactly 0 or 1, y equal to p (exact loss 0)",
             lambda g: (exact(0.0, 1.0, 0.0, 1.0), exact(0.0, 1.0, 0.0, 1.0)), "none", agreeing_zero_gradient),
        case("probs_0_and_1_disagreeing", "p exactly 0 or 1, y the opposite (exact loss +inf)",
             lambda g: (exact(0.0, 1.0), exact(1.0, 0.0)), "none",
             _failures({d: math.inf for d in options.DTYPES}, "forward", clamped_log)),
        case("probs_near_0_and_1", "p = 1e-6 and 1 - 1e-6, y in {0, 1}",
             lambda g: (exact(1e-6, 1 - 1e-6, 1e-6, 1 - 1e-6), exact(0.0, 1.0, 1.0, 0.0)), "none",
             _failures({"float16": math.inf, "bfloat16": math.inf}, "forward",
                       clamped_log + " (1 - 1e-6 rounds to 1 in float16 and bfloat16, so y = 0 there is "
                                     "a disagreeing target)")),
        case("soft_targets", "p ~ U(0.01, 0.99), y ~ U(0, 1)",
             lambda g: (torch.rand(8, generator=g, dtype=torch.float64) * 0.98 + 0.01, torch.rand(8, generator=g, dtype=torch.float64)), "none"),
        case("noncontiguous", "p [4, 3] as a transposed view",
             lambda g: ((torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.98 + 0.01).T, torch.randint(0, 2, (4, 3), generator=g).double()), "none"),
    ]
    return cases


def _bce_logits_cases() -> list[Case]:
    def case(name, description, make, reduction="mean"):
        return _loss_case("binary_cross_entropy_with_logits", name, description, make, reduction)

    def saturating(bound):
        def make(g):
            z = torch.tensor([bound, -bound, bound, -bound, bound, -bound], dtype=torch.float64)
            return z, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.7], dtype=torch.float64)

        return make

    def random(g):
        return _randn(g, 8), torch.randint(0, 2, (8,), generator=g).double()

    cases = [case("random", "z ~ N(0, 1), y in {0, 1}", random, r) for r in ("none", "sum", "mean")]
    for bound in (20.0, 50.0, 120.0):
        cases.append(case(f"saturating_{bound:g}", f"z = +-{bound:g}, targets agreeing, opposite and soft",
                          saturating(bound), "none"))
    cases += [
        case("near_fp16_max", "|z| ~ U(6e4, 6.5e4)", lambda g: (_near_fp16_max(g, 2, 4).flatten(), torch.randint(0, 2, (8,), generator=g).double()), "none"),
        case("odd_sizes", "z [7, 13]", lambda g: (_randn(g, 7, 13), torch.rand(7, 13, generator=g, dtype=torch.float64))),
    ]
    return cases


def _precise_lse_case() -> Case:
    """Huge logits that differ in their low bits: mpmath gives the reference and its gradient."""

    def build(g):
        base = 1e15 + torch.arange(6, dtype=torch.float64)
        return [torch.stack([base, base.flip(0)])], {"dim": -1}

    return Case("huge_close_values", "logsumexp", "x = 1e15 + [0..5]: float64 keeps only a few digits of exp's argument",
                build, undefined="in float16 the inputs round to +inf, whose softmax (the gradient) is inf/inf",
                reference_fn=mp_logsumexp,
                framework_failures=_failures({"float32": 1.7, "float64": 0.0554, "bfloat16": 1.71}, "gradient",
                                             _LSE_HUGE_ROUNDED_FORWARD))


def cases(kind: str) -> list[Case]:
    """Every case for one kind; works with pytest.mark.parametrize (ids=str)."""
    if kind not in options.KERNEL_KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; choose one of {', '.join(options.KERNEL_KINDS)}")
    if kind == "cross_entropy":
        return _ce_cases()
    if kind == "binary_cross_entropy":
        return _bce_cases()
    if kind == "binary_cross_entropy_with_logits":
        return _bce_logits_cases()
    extra = [_precise_lse_case()] if kind == "logsumexp" else []
    return _row_cases(kind) + extra


def reference(case: Case, tensors, keywords):
    """The float64 reference output for a case (tensors already float64, the first
    one requiring grad): differentiable, so autograd gives the reference gradient."""
    formula = case.reference_fn or REFERENCES[case.kind]
    return formula(*tensors, **keywords)
