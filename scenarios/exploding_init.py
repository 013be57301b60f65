"""exploding_init: a deep ReLU MLP initialized with std-1 weights."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.data import sine_regression
from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Learn, Variant

SUMMARY = "A 6-layer ReLU MLP with N(0, 1) weights on 256-wide layers: outputs near 1e7, SGD overflows in 2 steps."
EXPLANATION = """
A ReLU layer with fan-in n and weights of variance v multiplies the mean square of
its input by n*v/2. With v = 1 and n = 256 that is x128 per layer, so six layers
scale the output by about 128^3 = 2e6 in standard deviation: the squared error is
near 1e13 and the gradients are as large. One SGD step at lr 1e-3 moves each weight
by ~1e9, the next forward pass overflows float32, and the loss is inf then NaN.
He init sets v = 2/n so that n*v/2 = 1 and the scale stays put. A lower lr does not
help here: the step-0 gradients are so large that even lr 1e-12 moves the weights
enough for the next forward pass to overflow (see grad_norms in result.json).
Clipping the gradient norm keeps every step finite, but a model whose outputs are
1e6 off cannot be walked back at lr * 1.0 per step.
"""
DEFAULTS = dict(optimizer="sgd", lr=1e-3, init={"name": "normal", "std": 1.0}, steps=100)
DATA = dict(n=256, features=16, width=256, depth=6)
LEARN = Learn(loss_drop=0.9)

make_data = sine_regression


def make_model(ctx, data) -> nn.Module:
    width, layers, d = int(ctx.knobs.width), [], data.x.shape[1]
    for _ in range(int(ctx.knobs.depth)):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


VARIANTS = [
    Variant("normal_std_1", "broken", "weights ~ N(0, 1), SGD lr 1e-3", F.mse_loss),
    Variant("he_normal", "fix", "He-normal weights (variance 2/fan_in), same lr", F.mse_loss,
            overrides={"init.name": "he_normal"}),
    Variant("lr_1e-12", "myth", "keep N(0, 1), lower the lr a billion-fold", F.mse_loss,
            overrides={"optimizer.lr": 1e-12}),
    Variant("clip_norm_1", "myth", "keep N(0, 1), clip the gradient norm at 1.0", F.mse_loss,
            overrides={"clip.name": "norm", "clip.threshold": 1.0}),
]


def metrics(model, data):
    with torch.no_grad():
        return {"output_std": float(model(data.x).float().std())}


def _he_and_clipping(r):
    he, clip = r.variant("he_normal"), r.variant("clip_norm_1")
    evidence = (f"he_normal at lr {r.config['optimizer']['lr']:g}: finite={he.finite}, exact loss "
                f"{he.exact_loss_start:.3g} -> {he.exact_loss_end:.3g}; N(0,1) clipped at 1.0: finite={clip.finite}, "
                f"exact loss {clip.exact_loss_start:.3g} -> {clip.exact_loss_end:.3g}")
    he_ok = he.finite and he.learned
    clip_ok = clip.finite and clip.learned
    if he_ok and clip_ok:
        return Verdict.confirmed, evidence
    if he_ok or clip.finite:
        return Verdict.partly, evidence + ("; clipping keeps it finite but does not make it learn" if clip.finite and not clip_ok else "")
    return Verdict.refuted, evidence


def _lower_lr(r):
    low = r.variant("lr_1e-12")
    first = low.first_nonfinite
    evidence = f"N(0,1) at lr 1e-12: finite={low.finite}" + (
        f", non-finite {first.quantity} at step {first.step}" if first else
        f", exact loss {low.exact_loss_start:.3g} -> {low.exact_loss_end:.3g}")
    return (Verdict.confirmed if low.finite and low.learned else Verdict.refuted), evidence


CLAIMS = [
    Claim("He-normal init with lr 1e-3 avoids exploding gradients, and clipping the norm at 0.5-1 stabilizes training.",
          _he_and_clipping, "seeds 000, 003"),
    Claim("A smaller learning rate is enough to stop an explosion caused by the initialization.", _lower_lr, "seeds 001, 003"),
]
