"""unscaled_sgd: linear regression under SGD with one feature 1e5 times larger."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.data import standardize
from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant
from nanlab.scenarios.frameworks.unscaled_sgd import CRITICAL_LR, PROBE_STEPS, critical_variant

SUMMARY = "SGD on features of scale 1 and 1e5: the step overshoots, the loss grows to inf, then NaN."
EXPLANATION = """
For mean squared error, gradient descent on a linear model multiplies the error
along each eigenvector of the loss Hessian H = (2/n) X^T X by (1 - lr * lambda)
every step. It shrinks only if lr < 2 / lambda_max, the critical learning rate.
A feature of scale 1e5 puts lambda_max near 2e10, so the critical rate is about
1e-10 and an ordinary lr of 0.01 multiplies the error by ~2e8 per step: the loss
passes float32's 3.4e38 within a few steps (inf), and inf - inf then gives NaN.
Standardizing the features brings lambda_max to about 2, so lr = 0.01 is safe.
Lowering the lr below 2/lambda_max (here 0.9 of it) also stays finite, but the
small feature's direction then has lr * lambda_min near 1e-10: its part of the fit
never moves, which is why standardizing beats a smaller lr.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.01, steps=100)
DATA = dict(n=128, big_scale=1e5)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    n, big = int(knobs.n), float(knobs.big_scale)
    small_feature = rng.randn(n)
    big_feature = big * rng.randn(n)
    x = torch.stack([small_feature, big_feature], 1)
    y = 0.3 * small_feature + (2.0 / big) * big_feature + 0.05 * rng.randn(n)
    return Data(x, y[:, None])


def make_model(ctx, data) -> nn.Module:
    return nn.Linear(2, 1)


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


def hessian_max_eigenvalue(x) -> float:
    """Largest eigenvalue of the MSE Hessian (2/n) [x 1]^T [x 1] (the bias is a column of ones)."""
    xa = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    return float(torch.linalg.eigvalsh(2.0 / len(x) * xa.T @ xa).max())


def critical_lr(x) -> float:
    return 2.0 / hessian_max_eigenvalue(x)


VARIANTS = [
    Variant("raw_features", "broken", "SGD on the raw features", F.mse_loss),
    Variant("standardized", "fix", "features standardized to mean 0, std 1", F.mse_loss, prepare=standardize),
    Variant("lr_below_critical", "fix", "raw features, lr = 0.9 x the critical 2/lambda_max", F.mse_loss,
            overrides=lambda data, cfg: {"optimizer.lr": 0.9 * critical_lr(data.x)}),
]


def loss_ratio_key(factor: float) -> str:
    return f"loss_ratio_end_over_start_at_{factor}x_critical"


def probes(ctx, train):
    """The critical lr from the Hessian, checked against runs just below and above it."""
    raw = make_data(ctx)
    crit = critical_lr(raw.x)
    out = {"lambda_max": hessian_max_eigenvalue(raw.x), CRITICAL_LR: crit}
    for factor in (0.9, 1.1):
        run = train(Variant(f"lr_{factor}x", "fix", "", F.mse_loss, overrides={"optimizer.lr": factor * crit, "steps": PROBE_STEPS}))
        out[loss_ratio_key(factor)] = run.exact_loss_end / run.exact_loss_start if run.finite else float("inf")
    return out


def _loss_ratio(r, factor: float) -> float:
    """End over start exact loss at ``factor`` x the critical lr, from the framework that
    made ``r``: torch's probe trains it with nanlab's loop; the other frameworks, whose
    workers cannot call that loop, train it as a variant of their own."""
    key = loss_ratio_key(factor)
    if key in r.probes:
        return r.probes[key]
    run = r.variant(critical_variant(factor))
    return run.exact_loss_end / run.exact_loss_start if run.finite else float("inf")


def _unscaled_diverges(r):
    broken, std = r.broken, r.variant("standardized")
    below, above = _loss_ratio(r, 0.9), _loss_ratio(r, 1.1)
    evidence = (f"raw features at lr {r.config['optimizer']['lr']:g}: non-finite at step "
                f"{broken.nonfinite_step}; standardized: finite={std.finite}, exact loss "
                f"{std.exact_loss_start:.3g} -> {std.exact_loss_end:.3g}; critical lr {r.probes[CRITICAL_LR]:.3g}: "
                f"loss ratio {below:.3g} at 0.9x, {above:.3g} at 1.1x")
    ok = not broken.finite and std.finite and std.learned and below < 1 < above
    return (Verdict.confirmed if ok else Verdict.refuted), evidence


CLAIMS = [
    Claim("Unscaled features make SGD diverge, and standardizing them fixes it.", _unscaled_diverges, "seeds 001, 004"),
]


# The same measurement in Keras and JAX (nanlab.frameworks): the builders live in
# nanlab.scenarios.frameworks.unscaled_sgd, which imports no torch.
FRAMEWORKS = {"keras": "nanlab.scenarios.frameworks.unscaled_sgd:keras_recipe",
              "jax": "nanlab.scenarios.frameworks.unscaled_sgd:jax_recipe"}
