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
    "kl_div": ("reduction",),
    "nll_loss": ("reduction",),
    "softplus": (),
    "log_sigmoid": (),
    # eps is required: the reference is float64, so it cannot guess the default eps a
    # kernel would take for its own dtype (F.rms_norm's eps=None is finfo(dtype).eps).
    "rms_norm": ("normalized_shape", "eps"),
    "layer_norm": ("normalized_shape", "eps"),
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


def _float64(t):
    """A keyword tensor (weight, bias) as the float64 reference uses it: the kernel got it in its dtype."""
    return None if t is None else t.double()


class _ExactSoftplus(torch.autograd.Function):
    """softplus(x) = log(1 + exp(beta x)) / beta, linear above ``threshold`` as torch documents it,
    with the exact gradient sigmoid(beta x) (1 above the threshold)."""

    @staticmethod
    def forward(ctx, x, beta, threshold):
        z = beta * x
        ctx.save_for_backward(z)
        ctx.threshold = threshold
        smooth = (z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))) / beta
        return torch.where(z > threshold, x, smooth)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * torch.where(z > ctx.threshold, torch.ones_like(z), torch.sigmoid(z)), None, None


def ref_softplus(x, beta=1.0, threshold=20.0):
    return _ExactSoftplus.apply(x, beta, threshold)


class _ExactLogSigmoid(torch.autograd.Function):
    """log(sigmoid(x)) = -softplus(-x), exact at both ends (x itself far below 0, -exp(-x)
    far above), with the exact gradient sigmoid(-x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return -((-x).clamp_min(0) + torch.log1p(torch.exp(-x.abs())))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(-x)


def ref_log_sigmoid(x):
    return _ExactLogSigmoid.apply(x)


def ref_kl_div(x, target, reduction="mean", log_target=False):
    """Pointwise p (log p - x) with p the target (exp(target) when log_target). A term with
    p = 0 is 0 whatever x is, -inf included (0 log(0/q) = 0 by the usual convention), and
    so is its gradient. mean divides by every element, batchmean by the first dimension."""
    if log_target:
        p = torch.exp(target)
        present = target > NEG_INF
        log_p = torch.where(present, target, torch.zeros_like(target))
    else:
        p = target
        present = target > 0
        log_p = torch.log(torch.where(present, target, torch.ones_like(target)))
    safe_x = torch.where(present, x, torch.zeros_like(x))  # no -inf reaches a term that is 0
    pointwise = torch.where(present, p * (log_p - safe_x), torch.zeros_like(x))
    if reduction == "batchmean":
        return pointwise.sum() / x.shape[0]
    return reduce_loss(pointwise, reduction)


def ref_nll_loss(x, target, weight=None, ignore_index=IGNORE, reduction="mean"):
    """-weight[t] x[n, t] per row; ignored rows are 0 and take no part in the mean, which
    divides by the summed weight of the rows that count."""
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    w = torch.ones(x.shape[1], dtype=x.dtype) if weight is None else _float64(weight)
    w_row = torch.where(valid, w[safe_target], torch.zeros_like(w[safe_target]))
    picked = torch.where(valid, x.gather(1, safe_target[:, None]).squeeze(1), torch.zeros(len(target), dtype=x.dtype))
    per_row = -w_row * picked
    if reduction == "mean":
        return per_row.sum() / w_row.sum()
    return reduce_loss(per_row, reduction)


def _norm_dims(x, normalized_shape):
    shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else (int(normalized_shape),)
    if tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} is not the end of the input's shape {tuple(x.shape)}")
    return tuple(range(x.dim() - len(shape), x.dim()))


def ref_rms_norm(x, normalized_shape, weight=None, eps=None):
    if eps is None:
        raise ValueError("ref_rms_norm needs eps: the reference cannot know the kernel's dtype default")
    dims = _norm_dims(x, normalized_shape)
    y = x * torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * _float64(weight)


def ref_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    # Two passes (mean, then the mean square of x - mean): float64 keeps every digit that a
    # float32 input has, so E[x^2] - E[x]^2's cancellation never reaches the reference.
    dims = _norm_dims(x, normalized_shape)
    centred = x - x.mean(dims, keepdim=True)
    y = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * _float64(weight)
    return y if bias is None else y + _float64(bias)


REFERENCES = {
    "cross_entropy": ref_cross_entropy,
    "binary_cross_entropy": ref_binary_cross_entropy,
    "binary_cross_entropy_with_logits": ref_binary_cross_entropy_with_logits,
    "softmax": ref_softmax,
    "log_softmax": ref_log_softmax,
    "logsumexp": ref_logsumexp,
    "kl_div": ref_kl_div,
    "nll_loss": ref_nll_loss,
    "softplus": ref_softplus,
    "log_sigmoid": ref_log_sigmoid,
    "rms_norm": ref_rms_norm,
    "layer_norm": ref_layer_norm,
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


def _log_probs(g, n, c):
    """Rows of log-probabilities (a log_softmax of N(0, 1) logits)."""
    return ref_log_softmax(_randn(g, n, c), 1)


def _probs(g, n, c):
    return torch.exp(_log_probs(g, n, c))


# Past exp's overflow: float32's exp overflows above 88.7, float16's above 11.1; and past
# sigmoid's underflow: float32's sigmoid(x) is 0 below -103.9, float16's below -17.3.
_PAST_EXP_OVERFLOW = (12.0, 20.0, 50.0, 89.0, 100.0, 710.0, 1e3, 1e4)


def _kl_cases() -> list[Case]:
    def case(name, description, make, reduction="mean", failures=(), **kw):
        return _loss_case("kl_div", name, description, make, reduction, failures=failures, **kw)

    def random(g):
        return _log_probs(g, 6, 5), _probs(g, 6, 5)

    def zero_targets_next_to_neg_inf(g):
        x, t = _log_probs(g, 4, 6), _probs(g, 4, 6)
        x[:, ::2], t[:, ::2] = NEG_INF, 0.0  # the model rules out exactly the classes the target never has
        return x, t

    def tiny_targets(g):
        x, t = _log_probs(g, 4, 5), _probs(g, 4, 5)
        t[:, 0] = torch.tensor([1e-30, 1e-10, 1e-6, 1e-40])  # 0 in float16, and 1e-40 a float32 subnormal
        return x, t / t.sum(1, keepdim=True)

    def confident_wrong(g):
        x = torch.full((3, 4), -1e4, dtype=torch.float64)
        x[:, 0] = 0.0
        t = torch.zeros(3, 4, dtype=torch.float64)
        t[:, 1:] = 1 / 3
        return x, t

    def log_random(g):
        return _log_probs(g, 6, 5), _log_probs(g, 6, 5)

    def log_neg_inf(g):
        x, t = _log_probs(g, 4, 6), _log_probs(g, 4, 6)
        x[:, ::2], t[:, ::2] = NEG_INF, NEG_INF
        return x, t

    nan_at_zero_target = ("NaN where a target of 0 meets an input of -inf: torch computes xlogy(t, t) - t * x, "
                          "and 0 * -inf is NaN where the exact term is 0")
    nan_everywhere = {d: math.inf for d in options.DTYPES}
    cases = [case("random", "input log-probs [6, 5], target probs", random, r)
             for r in ("none", "sum", "mean", "batchmean")]
    for reduction in ("none", "batchmean"):
        cases.append(case("zero_targets_next_to_neg_inf", "target 0 exactly where the input is -inf (each such "
                          "term is 0): catches t * (log t - x), which is 0 * (-inf) = NaN there",
                          zero_targets_next_to_neg_inf, reduction,
                          failures=_failures(nan_everywhere, "forward", nan_at_zero_target)))
    cases += [
        case("tiny_targets", "targets 1e-40 to 1e-6 (0 in float16): catches log(t) of a target that rounds to 0",
             tiny_targets, "none"),
        case("confident_wrong", "input log-probs -1e4 where the target has its mass: a large finite loss",
             confident_wrong, "sum"),
        case("log_target", "log_target=True, input and target log-probs", log_random, "none", log_target=True),
        case("log_target_neg_inf", "log_target=True, target -inf where the input is -inf (each such term is 0): "
             "catches exp(t) * (t - x) = 0 * NaN", log_neg_inf, "batchmean", log_target=True,
             failures=_failures(nan_everywhere, "forward", "NaN where both are -inf: torch computes exp(t) * (t - x), "
                                                          "and -inf - -inf is NaN")),
    ]
    return cases


def _nll_cases() -> list[Case]:
    def case(name, description, make, reduction="mean", undef="", **kw):
        return _loss_case("nll_loss", name, description, make, reduction, undef, **kw)

    def random(g):
        return _log_probs(g, 8, 5), _targets(g, 8, 5)

    def very_negative_target(g):
        x = _log_probs(g, 6, 4)
        t = torch.zeros(6, dtype=torch.long)
        x[:, 0] = torch.tensor([-20.0, -120.0, -800.0, -1e4, -6e4, -3.0])  # past exp's underflow at every dtype
        return x, t

    def neg_inf_elsewhere(g):
        x = _log_probs(g, 5, 6)
        x[:, 1::2] = NEG_INF
        return x, 2 * torch.randint(0, 3, (5,), generator=g)

    def neg_inf_at_target(g):
        x = _log_probs(g, 4, 5)
        x[1, 2] = NEG_INF
        return x, torch.tensor([0, 2, 1, 3])

    def ignored_some(g):
        t = _targets(g, 8, 5)
        t[::3] = IGNORE
        return _log_probs(g, 8, 5), t

    def weighted(g):
        return _log_probs(g, 8, 5), _targets(g, 8, 5)

    cases = [case("random", "input log-probs [8, 5]", random, r) for r in ("none", "sum", "mean")]
    cases += [
        case("very_negative_target_log_prob", "log-probs at the target from -20 to -6e4: catches -log(exp(x)), "
             "whose exp underflows to 0 and whose log is then -inf", very_negative_target, "none"),
        case("neg_inf_off_target", "every other log-prob -inf, targets on finite ones", neg_inf_elsewhere),
        case("neg_inf_at_target", "one target's log-prob is -inf: the loss is +inf and its gradient still -1 (not "
             "the NaN of exp then log)", neg_inf_at_target, "none"),
        case("ignore_index_rows", "every third target = ignore_index", ignored_some, ignore_index=IGNORE),
        case("all_rows_ignored", "every target ignore_index: the mean is 0/0",
             lambda g: (_log_probs(g, 4, 5), torch.full((4,), IGNORE)), undef="the mean over no targets is undefined",
             ignore_index=IGNORE),
        case("all_rows_ignored", "every target ignore_index: the sum is 0",
             lambda g: (_log_probs(g, 4, 5), torch.full((4,), IGNORE)), "sum", ignore_index=IGNORE),
        case("class_weights", "weight = [0, 0.5, 1, 2, 4]: the mean divides by the targets' summed weight", weighted,
             weight=torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)),
        case("large_log_probs_fp16", "log-probs from -1e3 to -6e4, at float16's range",
             lambda g: (-_uniform(g, 1e3, 6e4, 4, 6), _targets(g, 4, 6)), "sum"),
    ]
    return cases


def _elementwise_case(kind, name, description, make, failures=(), **keywords) -> Case:
    """A case for softplus or log_sigmoid: core unless it passes a keyword (beta, threshold)."""
    return Case(name, kind, description, lambda g: ([make(g)], dict(keywords)), core=not keywords,
                framework_failures=failures)


def _both_signs(values):
    v = torch.tensor(values, dtype=torch.float64)
    return torch.cat([v, -v])


def _softplus_cases() -> list[Case]:
    def case(name, description, make, **kw):
        return _elementwise_case("softplus", name, description, make, **kw)

    return [
        case("random", "x [8, 5] ~ N(0, 3)", lambda g: 3 * _randn(g, 8, 5)),
        case("past_exp_overflow", "x = 12 to 1e4: catches log(1 + exp(x)), whose exp overflows (float16 above 11.1, "
             "float32 above 88.7)", lambda g: torch.tensor(_PAST_EXP_OVERFLOW, dtype=torch.float64)),
        case("very_negative", "x = -12 to -1e4: softplus is exp(x), down to subnormal and 0",
             lambda g: -torch.tensor(_PAST_EXP_OVERFLOW, dtype=torch.float64)),
        case("infinities", "x = +inf and -inf: softplus is inf and 0, its gradient 1 and 0 (exp(x) / (1 + exp(x)) "
             "is inf/inf there)", lambda g: torch.tensor([math.inf, NEG_INF, 0.0, 1.0], dtype=torch.float64)),
        case("near_fp16_max", "|x| ~ U(6e4, 6.5e4), both signs", lambda g: _near_fp16_max(g, 2, 4)),
        case("near_zero", "|x| from 1e-30 to 1e-3: softplus is log 2 + x / 2",
             lambda g: _both_signs([1e-30, 1e-8, 1e-5, 1e-3])),
        case("beta_threshold", "beta=2, threshold=5: linear above x = 2.5, smooth below; catches a kernel that "
             "ignores either", lambda g: _both_signs([0.5, 2.0, 2.4, 2.6, 30.0, 200.0]), beta=2.0, threshold=5.0),
        case("small_beta", "beta=0.05 with x up to 3e3: exp(beta x) overflows float16 past x = 222 and float32 past 1775",
             lambda g: _both_signs([1.0, 100.0, 500.0, 1e3, 3e3]), beta=0.05),
    ]


def _log_sigmoid_cases() -> list[Case]:
    def case(name, description, make):
        return _elementwise_case("log_sigmoid", name, description, make)

    return [
        case("random", "x [8, 5] ~ N(0, 3)", lambda g: 3 * _randn(g, 8, 5)),
        case("past_sigmoid_underflow", "x = -12 to -1e4: catches log(sigmoid(x)), whose sigmoid underflows to 0 "
             "(float16 below -17.3, float32 below -103.9) where the exact value is about x",
             lambda g: -torch.tensor(_PAST_EXP_OVERFLOW, dtype=torch.float64)),
        case("large_positive", "x = 12 to 1e4: log_sigmoid is -exp(-x), down to subnormal and 0",
             lambda g: torch.tensor(_PAST_EXP_OVERFLOW, dtype=torch.float64)),
        case("infinities", "x = -inf and +inf: log_sigmoid is -inf and 0, its gradient 1 and 0",
             lambda g: torch.tensor([NEG_INF, math.inf, 0.0, -1.0], dtype=torch.float64)),
        case("near_fp16_max", "|x| ~ U(6e4, 6.5e4), both signs", lambda g: _near_fp16_max(g, 2, 4)),
    ]


_LAYER_NORM_CONSTANT_ROW = ("the gradient of the constant row of -1e3 is 462.562 times the upstream where the exact one "
                            "is 462.52 (348 ulp): torch's float32 variance of that row is not 0, and against eps = "
                            "1e-5 that shows")
_LAYER_NORM_HALF_OFFSET = ("the gradient is up to 14% off (float16: 0.0146 where the exact one is 0.0169): torch's "
                           "half-precision backward loses the mean's digits at 1e4, where the row's spread is 100")


def _norm_cases(kind: str) -> list[Case]:
    """rms_norm and layer_norm: eps is all that stands between a constant (layer_norm) or
    all-zero (both) row and 0/0."""

    def case(name, description, make, eps=1e-5, shape=None, failures=(), **kw):
        def build(g):
            x = make(g)
            return [x], {"normalized_shape": shape or (x.shape[-1],), "eps": eps, **kw}

        return Case(name, kind, description, build, core=not kw, framework_failures=failures)

    def with_rows(g, rows):
        x = _randn(g, 4, 8)
        x[1], x[2] = rows
        return x

    zero = torch.zeros(8, dtype=torch.float64)
    what = "x / sqrt(mean(x^2))" if kind == "rms_norm" else "(x - mean) / sqrt(var)"
    weight = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0, -1.0, 0.25], dtype=torch.float64)
    cases = [
        case("random", "x [6, 8] ~ N(0, 1)", lambda g: _randn(g, 6, 8)),
        case("all_zero_row", f"rows 1 and 2 all 0: catches {what} without eps (0/0)",
             lambda g: with_rows(g, (zero, zero))),
        case("constant_rows", "rows of 3.0 and of -1e3" + (": catches (x - mean) / sqrt(var) without eps (0/0)"
                                                           if kind == "layer_norm" else ""),
             lambda g: with_rows(g, (torch.full((8,), 3.0, dtype=torch.float64),
                                     torch.full((8,), -1e3, dtype=torch.float64))),
             failures=_failures({"float32": 0.0425}, "gradient", _LAYER_NORM_CONSTANT_ROW) if kind == "layer_norm" else ()),
        case("tiny_eps", "eps=1e-9 (0 in float16) with an all-0 row: catches eps added in float16, and the "
             "exact gradient there is 31623 times the upstream", lambda g: with_rows(g, (zero, 1e-3 * _randn(g, 8))),
             eps=1e-9),
        case("huge_eps", "eps=1e4, larger than every mean square: catches a kernel that ignores eps or takes "
             "max(ms, eps)", lambda g: _randn(g, 4, 8), eps=1e4),
        case("fp16_range", "|x| ~ U(300, 6e4), both signs: x^2 overflows float16 (above 256)",
             lambda g: _uniform(g, 300, 6e4, 4, 8) * torch.where(torch.rand(4, 8, generator=g) < 0.5, -1.0, 1.0).double()),
        case("tiny_values", "|x| ~ 1e-20 to 1e-6: x^2 underflows in float32 and float16",
             lambda g: torch.logspace(-20, -6, 8, dtype=torch.float64).repeat(3, 1) * _randn(g, 3, 8).sign()),
        case("normalized_shape_2d", "x [2, 3, 4] normalized over (3, 4): catches a kernel that normalizes the last "
             "dim only", lambda g: 2 * _randn(g, 2, 3, 4) + 1, shape=(3, 4)),
        case("weight", "an elementwise weight with a 0 and negative entries", lambda g: _randn(g, 5, 8),
             weight=weight),
    ]
    if kind == "layer_norm":
        cases += [
            # A mean 100 standard deviations from 0: E[x^2] - E[x]^2 loses about 1e-3 of the variance in
            # float32 (and x^2 overflows float16), while x - mean loses nothing a careful float32 kernel keeps.
            case("large_offset", "x = 1e4 + 100 N(0, 1): catches E[x^2] - E[x]^2, which cancels in float32 and "
                 "overflows float16", lambda g: 1e4 + 100 * _randn(g, 4, 8),
                 failures=_failures({"float16": 0.00231, "bfloat16": 0.00812}, "gradient", _LAYER_NORM_HALF_OFFSET)),
            case("weight_and_bias", "a weight and a bias", lambda g: _randn(g, 5, 8), weight=weight,
                 bias=torch.linspace(-2, 2, 8, dtype=torch.float64)),
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


_NEW_KIND_CASES = {"kl_div": _kl_cases, "nll_loss": _nll_cases, "softplus": _softplus_cases,
                   "log_sigmoid": _log_sigmoid_cases, "rms_norm": lambda: _norm_cases("rms_norm"),
                   "layer_norm": lambda: _norm_cases("layer_norm")}


# Kinds a user declared (nanlab.kernels.kinds.Kind), by name: register() and check() add them.
USER_KINDS: dict = {}


def unknown_kind(kind) -> str:
    declared = f"; or declare it as a nanlab.kernels.Kind (declared: {', '.join(USER_KINDS)})" if USER_KINDS else (
        "; or declare your own with nanlab.kernels.Kind")
    return f"unknown kernel kind {kind!r}; choose one of {', '.join(options.KERNEL_KINDS)}{declared}"


def required_keywords(kind: str) -> tuple:
    """The keywords every kernel of the kind must take (a user kind's are its declared keywords)."""
    return REQUIRED_KEYWORDS[kind] if kind in REQUIRED_KEYWORDS else USER_KINDS[kind].required


def cases(kind: str) -> list[Case]:
    """Every case for one kind (built-in or declared); works with pytest.mark.parametrize (ids=str)."""
    if kind in USER_KINDS:
        return USER_KINDS[kind].all_cases()
    if kind not in options.KERNEL_KINDS:
        raise ValueError(unknown_kind(kind))
    if kind == "cross_entropy":
        return _ce_cases()
    if kind == "binary_cross_entropy":
        return _bce_cases()
    if kind == "binary_cross_entropy_with_logits":
        return _bce_logits_cases()
    if kind in _NEW_KIND_CASES:
        return _NEW_KIND_CASES[kind]()
    extra = [_precise_lse_case()] if kind == "logsumexp" else []
    return _row_cases(kind) + extra


def reference(case: Case, tensors, keywords):
    """The float64 reference output for a case (tensors already float64, the first
    one requiring grad): differentiable, so autograd gives the reference gradient."""
    formula = case.reference_fn or (REFERENCES[case.kind] if case.kind in REFERENCES
                                    else USER_KINDS[case.kind].reference_fn)
    return formula(*tensors, **keywords)
