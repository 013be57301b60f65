"""The case catalogue: inputs that break naive loss kernels, each with its float64 reference.

Every case is a declarative entry, in the spirit of PyTorch's OpInfo: a name, the
kind of kernel it is for, a description, and a builder that draws float64 inputs
from a seeded generator. References are our own stable float64 formulas, not
torch's fused kernels, so torch's functions can be checked by them too.

Policy where the reference is undefined: the softmax or log_softmax of a row that
is all -inf, and a mean over targets that are all ignored, have no value (0/0).
The reference holds NaN there, and any output, NaN or finite, is accepted at those
positions only. Every kernel gets the same policy.

This module holds cases and references only. Comparing a kernel with them, and
running a kernel over them, is the checker's job (the check module), which depends
on this module, never the other way round: check a single case with ``check(fn, case)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from nanlab import options

NEG_INF = float("-inf")
IGNORE = -100


@dataclass(frozen=True)
class Case:
    """One input for one kind. ``build(gen)`` returns (tensors, keywords): the
    positional tensors in float64 (integer targets stay long) and the keyword
    arguments the kernel is called with."""

    name: str
    kind: str
    description: str
    build: Callable = field(repr=False)
    undefined: str = ""  # where the reference is undefined and any value is accepted

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

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


def mp_logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row with mpmath at 50 digits: the reference for inputs whose
    float64 answer would itself lose digits (huge values differing in the last bits)."""
    import mpmath

    mpmath.mp.dps = 50
    rows = []
    for row in x.tolist():
        finite = [v for v in row if v != NEG_INF]
        rows.append(float(mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in finite))) if finite else NEG_INF)
    return torch.tensor(rows, dtype=torch.float64)


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


def _near_fp16_max(g, n, c):
    return _uniform(g, 6.0e4, 6.5e4, n, c) * torch.where(torch.rand(n, c, generator=g) < 0.5, -1.0, 1.0).double()


def _noncontiguous(g, n, c):
    return _randn(g, c, n).T  # a transposed view: stride (1, n)


def _row_cases(kind: str) -> list[Case]:
    """Shared by softmax, log_softmax and logsumexp (x, dim=-1)."""
    undefined = "" if kind == "logsumexp" else "an all -inf row has no softmax (0/0): any value accepted there"

    def case(name, description, make, undef=""):
        return Case(name, kind, description, lambda g: ([make(g)], {"dim": -1}), undef)

    return [
        case("random", "x [8, 5] ~ N(0, 1)", lambda g: _randn(g, 8, 5)),
        case("large_positive", "x [6, 7] ~ U(1e3, 1e4)", lambda g: _uniform(g, 1e3, 1e4, 6, 7)),
        case("large_negative", "x [6, 7] ~ -U(1e3, 1e4)", lambda g: -_uniform(g, 1e3, 1e4, 6, 7)),
        case("large_gap", "rows [1e4, 0, -1e4, ...]", lambda g: _gap(g, 4, 6)),
        case("all_equal", "every entry 1e4", lambda g: torch.full((4, 5), 1e4, dtype=torch.float64)),
        case("some_neg_inf", "every other entry -inf", lambda g: _with_neg_inf(g, 5, 6)),
        case("fully_neg_inf_row", "row 2 entirely -inf", lambda g: _fully_masked_row(g, 5, 6), undefined),
        case("near_fp16_max", "|x| ~ U(6e4, 6.5e4), both signs", lambda g: _near_fp16_max(g, 4, 6)),
        case("noncontiguous", "x [9, 6] as a transposed view", lambda g: _noncontiguous(g, 9, 6)),
        case("odd_sizes", "x [7, 13]", lambda g: _randn(g, 7, 13)),
        case("many_classes", "x [3, 32768] ~ N(0, 4)", lambda g: 2 * _randn(g, 3, 32768)),
    ]


def _loss_case(kind, name, description, make, reduction="mean", undef="", **keywords) -> Case:
    """A case for a loss kernel: ``make(gen)`` gives (input, target); a reduction
    other than mean is part of the case's name."""

    def build(g):
        return list(make(g)), {"reduction": reduction, **keywords}

    return Case(name if reduction == "mean" else f"{name}[{reduction}]", kind, description, build, undef)


def _ce_cases() -> list[Case]:
    def case(name, description, make, reduction="mean", undef="", **kw):
        return _loss_case("cross_entropy", name, description, make, reduction, undef, **kw)

    def random(g):
        return _randn(g, 8, 5), _targets(g, 8, 5)

    def ignored_some(g):
        t = _targets(g, 8, 5)
        t[::3] = IGNORE
        return _randn(g, 8, 5), t

    def large(g):
        return _uniform(g, 1e3, 1e4, 6, 7) * torch.where(torch.rand(6, 7, generator=g) < 0.5, -1.0, 1.0).double(), _targets(g, 6, 7)

    cases = []
    for reduction in ("none", "sum", "mean"):
        cases += [case("random", "logits [8, 5] ~ N(0, 1)", random, reduction),
                  case("ignore_index_rows", "every third target = ignore_index", ignored_some, reduction),
                  case("large_logits_both_signs", "|logits| ~ U(1e3, 1e4)", large, reduction)]
    cases += [
        case("large_gap", "rows [1e4, 0, -1e4, ...], target 0 or 1", lambda g: (_gap(g, 4, 6), torch.tensor([0, 1, 1, 2]))),
        case("all_equal", "every logit 1e4", lambda g: (torch.full((4, 5), 1e4, dtype=torch.float64), _targets(g, 4, 5))),
        case("some_neg_inf", "every other logit -inf; targets on finite entries",
             lambda g: (_with_neg_inf(g, 5, 6), 2 * torch.randint(0, 3, (5,), generator=g))),
        case("fully_neg_inf_row_ignored", "row 2 all -inf with target ignore_index (loss and gradient are 0 there)",
             lambda g: (_fully_masked_row(g, 5, 6), torch.tensor([0, 1, IGNORE, 3, 4]))),
        case("label_smoothing_neg_inf", "label_smoothing=0.1 with -inf logits (the exact loss is +inf)",
             lambda g: (_with_neg_inf(g, 5, 6), 2 * torch.randint(0, 3, (5,), generator=g)), label_smoothing=0.1),
        case("label_smoothing", "label_smoothing=0.2, logits ~ N(0, 1)", random, label_smoothing=0.2),
        case("all_rows_ignored", "every target ignore_index: the mean is 0/0",
             lambda g: (_randn(g, 4, 5), torch.full((4,), IGNORE)), undef="the mean over no targets is undefined"),
        case("all_rows_ignored", "every target ignore_index: the sum is 0",
             lambda g: (_randn(g, 4, 5), torch.full((4,), IGNORE)), reduction="sum"),
        case("near_fp16_max", "|logits| ~ U(6e4, 6.5e4)", lambda g: (_near_fp16_max(g, 4, 6), _targets(g, 4, 6))),
        case("noncontiguous", "logits [9, 6] as a transposed view", lambda g: (_noncontiguous(g, 9, 6), _targets(g, 9, 6)),
             "none"),
        case("odd_sizes", "logits [7, 13]", lambda g: (_randn(g, 7, 13), _targets(g, 7, 13))),
        case("many_classes", "logits [4, 32768] ~ N(0, 4)", lambda g: (2 * _randn(g, 4, 32768), _targets(g, 4, 32768))),
    ]
    return cases


def _bce_cases() -> list[Case]:
    def case(name, description, make, reduction="mean"):
        return _loss_case("binary_cross_entropy", name, description, make, reduction)

    def random(g):
        return torch.rand(8, generator=g, dtype=torch.float64) * 0.98 + 0.01, torch.randint(0, 2, (8,), generator=g).double()

    cases = [case("random", "p ~ U(0.01, 0.99), y in {0, 1}", random, r) for r in ("none", "sum", "mean")]
    cases += [
        case("probs_0_and_1_agreeing", "p exactly 0 or 1, y equal to p (exact loss 0)",
             lambda g: (torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)), "none"),
        case("probs_0_and_1_disagreeing", "p exactly 0 or 1, y the opposite (exact loss +inf)",
             lambda g: (torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)), "none"),
        case("probs_near_0_and_1", "p = 1e-6 and 1 - 1e-6, y in {0, 1}",
             lambda g: (torch.tensor([1e-6, 1 - 1e-6, 1e-6, 1 - 1e-6], dtype=torch.float64), torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)), "none"),
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
    """Huge logits that differ in their low bits: mpmath gives the reference."""

    def build(g):
        base = 1e15 + torch.arange(6, dtype=torch.float64)
        return [torch.stack([base, base.flip(0)])], {"dim": -1}

    return Case("huge_close_values", "logsumexp", "x = 1e15 + [0..5]: float64 keeps only a few digits of exp's argument",
                build)


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
    """The float64 reference output for a case (tensors already float64)."""
    if case.name == "huge_close_values":
        return mp_logsumexp_rows(tensors[0])
    return REFERENCES[case.kind](*tensors, **keywords)

