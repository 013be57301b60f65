"""nan_in_inputs: missing values in the features reach the loss."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant
from nanlab.debug.validate import DataError, finite_rows, impute_column_mean, validate_data

SUMMARY = "A few NaN and Inf cells in the features: one bad cell makes its row's prediction, and the mean loss, NaN."
EXPLANATION = """
NaN is contagious: any arithmetic with NaN gives NaN, and inf * 0 or inf - inf make
new NaNs. One missing value in a row makes that row's prediction NaN, and a mean
over the batch then makes the whole loss NaN; the gradient of every weight that
touched the row is NaN too, and the first update spreads it to all parameters.
No choice of learning rate, init or optimizer helps, because the NaN is in the
data, not the training. The tracer reports it with origin "input": the first op
that consumed the bad values. validate_data names the rows and columns before
training; imputing the column mean of the finite values, or dropping the rows,
removes the problem.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.05, steps=100)
DATA = dict(n=200, features=6, bad_cells=3)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    n, d = int(knobs.n), int(knobs.features)
    x = rng.randn(n, d)
    y = (x @ rng.randn(d))[:, None]
    rows = rng.randperm(n)[: int(knobs.bad_cells)]
    cols = rng.randint(0, d, (len(rows),))
    x[rows, cols] = torch.tensor([float("nan"), float("inf")], dtype=torch.float64).repeat(len(rows))[: len(rows)]
    return Data(x, y)


def make_model(ctx, data) -> nn.Module:
    return nn.Sequential(nn.Linear(data.x.shape[1], 16), nn.Tanh(), nn.Linear(16, 1))


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


def impute(data: Data) -> Data:
    return Data(impute_column_mean(data.x), data.y)


def drop_rows(data: Data) -> Data:
    keep = finite_rows(data.x)
    return Data(data.x[keep], data.y[keep])


VARIANTS = [
    Variant("raw_data", "broken", "train on the data as loaded", F.mse_loss),
    Variant("impute_column_mean", "fix", "replace NaN/Inf by the column's finite mean", F.mse_loss, prepare=impute),
    Variant("drop_bad_rows", "fix", "drop the rows validate_data names", F.mse_loss, prepare=drop_rows),
]


VALIDATE_MESSAGE, VALIDATE_FOUND = "validate_data", "validate_data_found_problems"


def probes(ctx, train):
    try:
        validate_data(make_data(ctx).x)
        message, found = "no problem found", False
    except DataError as err:
        message, found = str(err), True
    return {VALIDATE_MESSAGE: message, VALIDATE_FOUND: found}


def _validator(r):
    first = r.broken.first_nonfinite
    event = first.event if first else None
    fixes = [r.variant("impute_column_mean"), r.variant("drop_bad_rows")]
    evidence = (f"tracer origin of the first NaN: {event.origin if event else None} at {event.op if event else None}; "
                f"validate_data: {r.probes[VALIDATE_MESSAGE]}; after imputing/dropping: finite={[v.finite for v in fixes]}")
    ok = (event is not None and event.origin == "input" and all(v.finite and v.learned for v in fixes)
          and r.probes[VALIDATE_FOUND])
    return (Verdict.confirmed if ok else Verdict.refuted), evidence


CLAIMS = [
    Claim("NaN or Inf in the input data alone makes the loss NaN; checking the data before training finds it.",
          _validator, "seeds 000, 004"),
]
