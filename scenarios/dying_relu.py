"""dying_relu: a learning rate high enough to push ReLU units permanently negative."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.data import sine_regression
from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Learn, Variant

FAILURE = "stall"
SUMMARY = "SGD at lr 1.0 knocks a ReLU MLP's units into the negative region for good: no NaN, training just stops."
EXPLANATION = """
A ReLU unit whose pre-activation is negative for every input outputs 0 and passes
back a gradient of exactly 0, so nothing can ever move it again: it is dead. One
large update is enough: at lr 1.0 the first steps overshoot, biases and weights
swing negative, and most of the second hidden layer ends up negative on every input.
The loss stays finite but stops improving: a stall, not a NaN. A 10x lower lr keeps
the units alive. LeakyReLU keeps a 0.01 slope below zero, so a unit stuck negative
still gets 1% of its gradient and is not dead; whether that rescues training at
this lr, and whether He init does, is measured in the report, not assumed. The
fraction of units negative on every input is reported per hidden layer.
"""
DEFAULTS = dict(optimizer="sgd", lr=1.0, steps=300)
DATA = dict(n=256, features=16, width=64)
LEARN = Learn(loss_below=0.2)  # the targets' variance is 0.4: half of it must be explained

make_data = sine_regression


def make_model(ctx, data, activation=nn.ReLU) -> nn.Module:
    d, width = data.x.shape[1], int(ctx.knobs.width)
    return nn.Sequential(nn.Linear(d, width), activation(), nn.Linear(width, width), activation(), nn.Linear(width, 1))


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


def metrics(model, data):
    """Fraction of hidden units whose pre-activation is <= 0 on every input: dead for
    ReLU (zero gradient), still trainable at a 0.01 slope for LeakyReLU."""
    out, h, layer = {}, data.x, 0
    with torch.no_grad():
        for module in model:
            if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
                layer += 1
                out[f"always_negative_fraction_layer{layer}"] = float((h <= 0).all(0).float().mean())
            h = module(h)
    return out


VARIANTS = [
    Variant("relu_lr_1", "broken", "ReLU MLP, SGD lr 1.0", F.mse_loss),
    Variant("relu_lr_0.1", "fix", "same network, lr 0.1", F.mse_loss, overrides={"optimizer.lr": 0.1}),
    Variant("leaky_relu_lr_1", "myth", "LeakyReLU(0.01) at the same lr", F.mse_loss, swap={"activation": nn.LeakyReLU}),
    Variant("he_init_lr_1", "myth", "He-normal init at the same lr", F.mse_loss, overrides={"init.name": "he_normal"}),
]


def _leaky_prevents(r):
    relu, leaky = r.broken, r.variant("leaky_relu_lr_1")
    dead_relu = max(relu.metrics.values())
    stuck_leaky = max(leaky.metrics.values())
    dead_leaky = 0.0  # a LeakyReLU unit always passes 1% of its gradient back
    first = leaky.first_nonfinite
    evidence = (f"units negative on every input: ReLU {dead_relu:.2f} (dead: zero gradient), LeakyReLU "
                f"{stuck_leaky:.2f} (not dead: 0.01 slope); LeakyReLU run: "
                f"finite={leaky.finite}" + (f" (non-finite {first.quantity} at step {first.step})" if first else
                                            f", learned={leaky.learned}"))
    if dead_leaky < dead_relu and leaky.finite and leaky.learned:
        return Verdict.confirmed, evidence
    if dead_leaky < dead_relu:
        return Verdict.partly, evidence + "; no unit dies, but training still fails at this lr"
    # (dead_leaky is 0 by construction, so a ReLU run with no dead units is the only way here)
    return Verdict.refuted, evidence


CLAIMS = [
    Claim("LeakyReLU prevents dying ReLU units.", _leaky_prevents, "seed 001"),
]
