"""custom_backward_div0: a custom autograd Function whose backward divides by zero."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant

SUMMARY = "A custom autograd sqrt whose backward divides by 2*sqrt(x) = 0: inf gradients, then NaN."
EXPLANATION = """
A radial-basis network measures the distance from each input to learned centers,
and the centers start at data points, as k-means-style inits do. For those points
the squared distance is exactly 0. The custom Function computes sqrt in forward,
which is fine (sqrt(0) = 0), but its backward returns grad / (2*sqrt(x)) = grad / 0
= inf. The chain rule then multiplies that inf by d(sq)/d(center) = 2*(x - c) = 0,
and 0 * inf = NaN lands in the centers' gradient. The distance has no derivative at
0, so a "correct" backward must pick a convention: the one torch.linalg.vector_norm
uses is the subgradient 0, which we implement and check with gradcheck where the
derivative exists. A safe division (clamping the denominator) is the other fix.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.1, steps=150)
DATA = dict(n=128, centers=16)
LEARN = Learn(loss_drop=0.5)


class SqrtDivByZero(torch.autograd.Function):
    """sqrt with the textbook derivative, no guard at 0."""

    @staticmethod
    def forward(ctx, sq):
        root = sq.sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx, grad):
        (root,) = ctx.saved_tensors
        return grad / (2 * root)


class SqrtSafeDivision(torch.autograd.Function):
    """The same, with the denominator clamped away from 0."""

    @staticmethod
    def forward(ctx, sq):
        root = sq.sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx, grad):
        (root,) = ctx.saved_tensors
        return grad / (2 * root).clamp_min(1e-12)


class Distance(torch.autograd.Function):
    """||x - c|| over the last dim, with d/dc = (c - x)/d where d > 0 and 0 where d = 0."""

    @staticmethod
    def forward(ctx, x, centers):
        diff = x[:, None, :] - centers[None]
        dist = diff.pow(2).sum(-1).sqrt()
        ctx.save_for_backward(diff, dist)
        return dist

    @staticmethod
    def backward(ctx, grad):
        diff, dist = ctx.saved_tensors
        safe = torch.where(dist > 0, dist, torch.ones_like(dist))
        unit = torch.where((dist > 0)[..., None], diff / safe[..., None], torch.zeros_like(diff))
        g = grad[..., None] * unit
        return g.sum(1), -g.sum(0)


class RBFNet(nn.Module):
    def __init__(self, centers, distance):
        super().__init__()
        self.centers = nn.Parameter(centers.clone())
        self.distance = distance
        self.readout = nn.Linear(len(centers), 1)

    def forward(self, x):
        return self.readout(torch.exp(-self.distance(x, self.centers)))


def sqrt_of_squared(sqrt_fn):
    return lambda x, c: sqrt_fn.apply((x[:, None, :] - c[None]).pow(2).sum(-1))


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    x = rng.randn(int(knobs.n), 2)
    y = torch.sin(2 * x[:, 0]) + torch.cos(x[:, 1])
    return Data(x, y[:, None])


def make_model(ctx, data, distance=sqrt_of_squared(SqrtDivByZero)) -> nn.Module:
    return RBFNet(data.x[: int(ctx.knobs.centers)], distance)


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


VARIANTS = [
    Variant("backward_div_by_zero", "broken", "custom sqrt, backward grad / (2 sqrt(x))", F.mse_loss),
    Variant("correct_backward", "fix", "custom distance with the subgradient 0 at d = 0 (gradcheck-verified)",
            F.mse_loss, swap={"distance": Distance.apply}),
    Variant("safe_division", "fix", "custom sqrt, backward grad / max(2 sqrt(x), 1e-12)", F.mse_loss,
            swap={"distance": sqrt_of_squared(SqrtSafeDivision)}),
]


GRADCHECK = "gradcheck_correct_backward"


def probes(ctx, train):
    """gradcheck of the correct backward in float64 where the derivative exists, and
    the gradients each version gives at distance exactly 0."""
    rng = ctx.rng()
    x, c = rng.randn(5, 3).requires_grad_(), rng.randn(4, 3).requires_grad_()
    out = {GRADCHECK: bool(torch.autograd.gradcheck(Distance.apply, (x, c)))}
    for name, fn in (("div_by_zero", sqrt_of_squared(SqrtDivByZero)), ("correct", Distance.apply),
                     ("safe_division", sqrt_of_squared(SqrtSafeDivision))):
        point = torch.ones(1, 3, dtype=ctx.dtype, device=ctx.device)
        center = point.clone().requires_grad_(True)
        fn(point, center).sum().backward()
        out[f"center_grad_at_distance_0_{name}"] = float(center.grad.abs().max())
    return out


def _fixed_by_correct_backward(r):
    broken, fix = r.broken, r.variant("correct_backward")
    event = broken.first_nonfinite.event if broken.first_nonfinite else None
    evidence = (f"broken: first non-finite {event.describe() if event else 'not traced'}; "
                f"correct backward: gradcheck={r.probes[GRADCHECK]}, finite={fix.finite}, "
                f"exact loss {fix.exact_loss_start:.3g} -> {fix.exact_loss_end:.3g}")
    ok = not broken.finite and fix.finite and fix.learned and r.probes[GRADCHECK]
    return (Verdict.confirmed if ok else Verdict.refuted), evidence


CLAIMS = [
    Claim("A bug in a custom layer's backward can produce NaN even when the framework's own ops are stable.",
          _fixed_by_correct_backward, "seed 004"),
]
