"""sqrt_at_zero: a vector length written as sqrt(sum(x^2)), evaluated at a zero vector."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant

SUMMARY = "sqrt(sum(x^2)) at x = 0: the forward is 0, the gradient is inf * 0 = NaN."
EXPLANATION = """
The length of a vector, sqrt(sum(x^2)), is 0 at x = 0, a perfectly finite value. Its
gradient is x / sqrt(sum(x^2)): autograd computes it as (1 / (2*sqrt(0))) * 2x =
inf * 0 = NaN, and padding rows or zero embeddings hit exactly this point. Masking
the result with torch.where(s > 0, sqrt(s), 0) does not help: where's backward sends
a zero gradient into the unselected branch, but sqrt's own backward still computes
0 * inf = NaN there. The double-where pattern feeds sqrt a safe input where s = 0
(where(s > 0, s, 1)), so neither branch holds a NaN. torch.linalg.vector_norm
defines the gradient at 0 as 0, and an epsilon inside the sqrt moves the singular
point away at the cost of a bias of sqrt(eps) at zero. The same holds for
where(x > 0, log(x), 0), measured by the probe.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.05, steps=100)
DATA = dict(n=128, features=6, zero_rows=8)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    n, d = int(knobs.n), int(knobs.features)
    x = rng.randn(n, d)
    x[: int(knobs.zero_rows)] = 0.0  # padding rows
    w = rng.randn(d, 4)
    return Data(x, (x @ w).norm(dim=-1, keepdim=True))


def sqrt_sum_squares(z):
    return torch.sqrt((z * z).sum(-1, keepdim=True))


def where_then_sqrt(z):
    s = (z * z).sum(-1, keepdim=True)
    return torch.where(s > 0, torch.sqrt(s), torch.zeros_like(s))


def double_where(z):
    s = (z * z).sum(-1, keepdim=True)
    positive = s > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, s, torch.ones_like(s))), torch.zeros_like(s))


def vector_norm(z):
    return torch.linalg.vector_norm(z, dim=-1, keepdim=True)


def eps_in_sqrt(z):
    return torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-12)


class LengthModel(nn.Module):
    """Predicts the length of a learned projection of the input."""

    def __init__(self, d, length):
        super().__init__()
        self.project = nn.Linear(d, 4, bias=False)
        self.length = length

    def forward(self, x):
        return self.length(self.project(x))


def make_model(ctx, data, length=sqrt_sum_squares) -> nn.Module:
    return LengthModel(data.x.shape[1], length)


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


VARIANTS = [
    Variant("sqrt_of_sum_of_squares", "broken", "torch.sqrt((z * z).sum())", F.mse_loss),
    Variant("where_then_sqrt", "myth", "torch.where(s > 0, sqrt(s), 0)", F.mse_loss, swap={"length": where_then_sqrt}),
    Variant("vector_norm", "fix", "torch.linalg.vector_norm(z)", F.mse_loss, swap={"length": vector_norm}),
    Variant("double_where", "fix", "where(s > 0, sqrt(where(s > 0, s, 1)), 0)", F.mse_loss, swap={"length": double_where}),
    Variant("eps_in_sqrt", "fix", "sqrt(sum(z^2) + 1e-12)", F.mse_loss, swap={"length": eps_in_sqrt}, lossy=True),
]


MASKED_LOGS = {
    "where_log": lambda x: torch.where(x > 0, torch.log(x), torch.zeros_like(x)),
    "double_where_log": lambda x: torch.where(x > 0, torch.log(torch.where(x > 0, x, torch.ones_like(x))),
                                              torch.zeros_like(x)),
}


def grad_key(name: str) -> str:
    return f"grad_at_0_{name}"


def probes(ctx, train):
    out = {}
    for name, f in MASKED_LOGS.items():
        x = torch.tensor([0.0, 2.0], requires_grad=True)
        f(x).sum().backward()
        out[grad_key(name)] = float(x.grad[0])
    return out


def _where_fixes(r):
    myth = r.variant("where_then_sqrt")
    evidence = (f"where(s > 0, sqrt(s), 0) in training: finite={myth.finite}; gradient at 0 of where(x > 0, log(x), 0): "
                f"{r.probes[grad_key('where_log')]}, of the double-where form: {r.probes[grad_key('double_where_log')]}")
    return (Verdict.confirmed if myth.finite else Verdict.refuted), evidence


CLAIMS = [
    Claim("Masking an unsafe sqrt or log with torch.where keeps its gradient finite.", _where_fixes, "common advice"),
]
