"""tanh_explosion: a tanh MLP on x100 inputs, SGD at a learning rate that diverges."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.data import standardize
from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant

SUMMARY = "A tanh MLP on inputs scaled x100 diverges under SGD at lr 0.2; Adam at 1e-3 does not."
EXPLANATION = """
Inputs in [0, 100] push most first-layer tanh units to +-1, so the last hidden
layer's features are large and nearly collinear. The output layer's loss Hessian is
about (2/n) H^T H over those features, whose top eigenvalue grows with the layer
width (64 saturated units give ~2*64): any lr above 2/lambda_max makes each update
overshoot by a growing factor, and the loss grows geometrically to inf. The tanh does
not explode anything itself; the step size does. Clipping the gradient norm to 1.0
caps each update at lr * 1.0, which cannot compound; standardizing the inputs
un-saturates the units and shrinks lambda_max; a 10x lower lr sits below the
critical value. Adam divides each step by a running RMS of the gradient, so its
step is about lr per weight whatever the gradient's scale: at lr 1e-3 it is stable.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.2, steps=200)
DATA = dict(n=256, features=10, width=64, input_scale=100.0)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    n, d = int(knobs.n), int(knobs.features)
    x = rng.rand(n, d)
    w = rng.randn(d)
    y = torch.sin(((x - 0.5) * 3.46) @ w)  # a smooth target of the unit-variance inputs
    return Data(x * float(knobs.input_scale), y[:, None])


def make_model(ctx, data) -> nn.Module:
    width = int(ctx.knobs.width)
    return nn.Sequential(nn.Linear(data.x.shape[1], width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 1))


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


VARIANTS = [
    Variant("sgd_large_lr", "broken", "SGD at the scenario's lr on x100 inputs", F.mse_loss),
    Variant("clip_norm_1", "fix", "same, gradients clipped to global norm 1.0", F.mse_loss,
            overrides={"clip.name": "norm", "clip.threshold": 1.0}),
    Variant("standardized", "fix", "same lr, inputs standardized", F.mse_loss, prepare=standardize),
    Variant("lr_10x_lower", "fix", "same inputs, lr / 10", F.mse_loss,
            overrides=lambda data, cfg: {"optimizer.lr": cfg.optimizer.lr / 10}),
    Variant("adam_1e-3", "fix", "Adam at lr 1e-3 on the x100 inputs (the setup said to explode)", F.mse_loss,
            overrides={"optimizer.name": "adam", "optimizer.lr": 1e-3, "optimizer.eps": 1e-8}),
]


def _adam_explodes(r):
    adam, sgd = r.variant("adam_1e-3"), r.broken
    evidence = (f"Adam lr 1e-3: finite={adam.finite}, exact loss {adam.exact_loss_start:.3g} -> "
                f"{adam.exact_loss_end:.3g}; SGD lr {r.config['optimizer']['lr']:g}: non-finite at step "
                f"{sgd.nonfinite_step}")
    return (Verdict.confirmed if not adam.finite else Verdict.refuted), evidence


def _sgd_large_lr_diverges(r):
    sgd = r.broken
    first = sgd.first_nonfinite
    return (Verdict.confirmed if not sgd.finite else Verdict.refuted), (
        f"SGD lr {r.config['optimizer']['lr']:g}: finite={sgd.finite}, first non-finite "
        f"{first.quantity if first else None} at step {first.step if first else None}")


def _clip_prevents(r):
    clip = r.variant("clip_norm_1")
    evidence = f"clip_norm_1 at the same lr: finite={clip.finite}, exact loss {clip.exact_loss_start:.3g} -> {clip.exact_loss_end:.3g}"
    if not clip.finite:
        return Verdict.refuted, evidence
    return (Verdict.confirmed if clip.learned else Verdict.partly), evidence + ("" if clip.learned else " (finite but did not learn)")


CLAIMS = [
    Claim("A tanh MLP on inputs scaled x100 explodes under Adam at lr 1e-3.", _adam_explodes, "seed 003"),
    Claim("The same tanh MLP diverges under SGD at a large learning rate.", _sgd_large_lr_diverges, "seed 003"),
    Claim("Clipping the gradient norm at 1.0 prevents the divergence.", _clip_prevents, "seeds 000, 003"),
]


# The same measurement in Keras and JAX (nanlab.frameworks): the builders live in
# nanlab.scenarios.frameworks.tanh_explosion, which imports no torch.
FRAMEWORKS = {"keras": "nanlab.scenarios.frameworks.tanh_explosion:keras_recipe",
              "jax": "nanlab.scenarios.frameworks.tanh_explosion:jax_recipe"}
