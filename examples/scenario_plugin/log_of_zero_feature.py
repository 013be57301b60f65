"""log_of_zero_feature: a log-transformed feature that is exactly 0 in some rows."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant

SUMMARY = "A log-transformed feature that is exactly 0 in some rows: log(0) = -inf, then inf - inf = NaN."
EXPLANATION = """
Count-like features (clicks, word counts) are often log-transformed to tame their
range. log(0) is -inf, and a linear layer then mixes -inf with finite weights:
-inf * w is +inf or -inf by the sign of w, and their sum is NaN. log1p(x) =
log(1 + x) maps 0 to 0 and stays close to log(x) for large x, so it keeps the
transform's purpose without the singularity.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.1, steps=60)
DATA = dict(n=128, features=3, zero_every=8)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    x = rng.rand(int(knobs.n), int(knobs.features)) * 10
    x[:: int(knobs.zero_every), 0] = 0.0  # rows where the count was zero
    return Data(x, torch.log1p(x).sum(1, keepdim=True))


class LogFeatures(nn.Module):
    def __init__(self, d, transform):
        super().__init__()
        self.transform, self.linear = transform, nn.Linear(d, 1)

    def forward(self, x):
        return self.linear(self.transform(x))


def make_model(ctx, data, transform=torch.log) -> nn.Module:
    return LogFeatures(data.x.shape[1], transform)


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


VARIANTS = [
    Variant("log", "broken", "log of the raw feature", F.mse_loss),
    Variant("log1p", "fix", "log1p instead: 0 maps to 0", F.mse_loss, swap={"transform": torch.log1p}),
]


def _log1p_fixes(r):
    broken, fix = r.broken, r.variant("log1p")
    evidence = (f"log: non-finite at step {broken.nonfinite_step}; log1p: finite={fix.finite}, exact loss "
                f"{fix.exact_loss_start:.3g} -> {fix.exact_loss_end:.3g}")
    return (Verdict.confirmed if not broken.finite and fix.finite and fix.learned else Verdict.refuted), evidence


CLAIMS = [Claim("log1p removes the NaN that log(0) causes, and the model still learns.", _log1p_fixes, "practice")]
