"""zero_variance_features: standardizing a column that never changes."""
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant

SUMMARY = "Standardizing a constant feature computes (x - mean) / std = 0 / 0 = NaN."
EXPLANATION = """
A feature that is constant in the data (a sensor stuck at one value, a one-hot
column absent from this split) has mean equal to every value and std exactly 0,
so (x - mean) / std is 0/0 = NaN for every row, and one NaN input column makes
every prediction NaN. Adding a small epsilon to the std turns the column into
0/eps = 0; dropping constant columns removes it. On the related advice that
standardizing beats min-max scaling when there are outliers, the probe trains the
same regression both ways on data with a single 1000x outlier: one outlier sets
both the range and the std, and the probe reports how each scaling squeezes the
other rows and what loss each reaches.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.1, steps=100)
DATA = dict(n=128, features=4, constant_column=2)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    n, d = int(knobs.n), int(knobs.features)
    x = rng.randn(n, d) * 3 + 10
    x[:, int(knobs.constant_column)] = 7.0
    w = rng.randn(d)
    w[int(knobs.constant_column)] = 0.0
    return Data(x, ((x - 10) @ w / 3)[:, None])


class Standardized(nn.Module):
    """Standardizes its input with the batch statistics, then a linear layer."""

    def __init__(self, d, eps=0.0, keep=None):
        super().__init__()
        self.eps, self.keep = eps, keep
        self.linear = nn.Linear(d if keep is None else int(keep.sum()), 1)

    def forward(self, x):
        if self.keep is not None:
            x = x[:, self.keep]
        return self.linear((x - x.mean(0)) / (x.std(0) + self.eps))


def make_model(ctx, data, eps=0.0, drop_constant=False) -> nn.Module:
    return Standardized(data.x.shape[1], eps=eps, keep=data.x.std(0) > 0 if drop_constant else None)


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


VARIANTS = [
    Variant("divide_by_std", "broken", "(x - mean) / std on every column", F.mse_loss),
    Variant("std_plus_eps", "fix", "(x - mean) / (std + 1e-8)", F.mse_loss,
            swap={"eps": 1e-8}),
    Variant("drop_constant_columns", "fix", "drop columns whose std is 0, then standardize", F.mse_loss,
            swap={"drop_constant": True}),
]


def spread_key(scaling: str) -> str:
    return f"{scaling}_spread_of_other_rows_col0"


def loss_key(scaling: str) -> str:
    return f"{scaling}_exact_loss_end"


def probes(ctx, train):
    """Min-max against standardization, with one outlier 1000x the typical value."""
    raw = make_data(ctx)
    x = raw.x.clone()
    x[0, 0] = 1000 * x[:, 0].abs().mean()
    keep = x.std(0) > 0
    xs = x[:, keep]
    scalings = {"minmax": (xs - xs.min(0).values) / (xs.max(0).values - xs.min(0).values),
                "standardize": (xs - xs.mean(0)) / xs.std(0)}
    out = {}
    for name, scaled in scalings.items():
        out[spread_key(name)] = float(scaled[1:, 0].std())
        run = train(Variant(f"linear_{name}", "fix", "", F.mse_loss, prepare=lambda d, s=scaled: Data(s, d.y),
                            model=lambda ctx, data: nn.Linear(data.x.shape[1], 1)))
        out[loss_key(name)] = run.exact_loss_end
    return out


def _std_beats_minmax(r):
    p = r.probes
    minmax, std = p[loss_key("minmax")], p[loss_key("standardize")]
    evidence = (f"after scaling, the non-outlier rows of the outlier column spread {p[spread_key('minmax')]:.3g} "
                f"(min-max) vs {p[spread_key('standardize')]:.3g} (standardize); final loss "
                f"{minmax:.3g} (min-max) vs {std:.3g} (standardize)")
    better = std < 0.9 * minmax
    same = abs(std - minmax) <= 0.1 * minmax
    return (Verdict.confirmed if better else Verdict.partly if same else Verdict.refuted), evidence


def _eps_fixes(r):
    b, eps = r.broken, r.variant("std_plus_eps")
    event = b.first_nonfinite.event if b.first_nonfinite else None
    evidence = (f"without eps: first {event.kind if event else None} at {event.op if event else None} in the forward pass; "
                f"with eps: finite={eps.finite}, exact loss {eps.exact_loss_start:.3g} -> {eps.exact_loss_end:.3g}")
    return (Verdict.confirmed if not b.finite and eps.finite and eps.learned else Verdict.refuted), evidence


CLAIMS = [
    Claim("Standardizing a zero-variance feature divides by zero, and an epsilon in the denominator prevents it.",
          _eps_fixes, "seed 004"),
    Claim("Standardization is more robust than min-max scaling when the data has outliers.", _std_beats_minmax,
          "seed 001"),
]
