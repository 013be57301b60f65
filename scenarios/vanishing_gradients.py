"""vanishing_gradients: a 20-layer sigmoid stack whose early layers get no signal."""
import torch.nn.functional as F
from torch import nn

from nanlab.lab.data import sine_regression
from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Learn, Variant

FAILURE = "stall"
SUMMARY = "A 20-layer sigmoid MLP: each layer scales the gradient by at most 0.25, so training stalls at the mean."
EXPLANATION = """
The sigmoid's derivative is at most 0.25, and with torch's default init each layer's
weights shrink the signal further, so the gradient reaching the first layer of a
20-layer sigmoid stack is smaller than the last layer's by many orders of magnitude
(the report shows the first/last block gradient-norm ratio). The output layer learns
the targets' mean, then nothing below it moves: the loss parks at the variance
and stays finite. ReLU with He init keeps the gradient's scale layer to layer, and
residual connections (h + f(h)) give the gradient a path around every layer. A
LayerNorm in front of each sigmoid is often suggested too; it is measured here.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.1, steps=300)
DATA = dict(n=256, features=16, width=32, depth=20)
LEARN = Learn(loss_below=0.2)  # the targets' variance is 0.4

make_data = sine_regression


class Deep(nn.Module):
    """``depth`` blocks of Linear + activation, optionally residual or normalized."""

    def __init__(self, d, width, depth, activation, residual=False, norm=False):
        super().__init__()
        self.inp, self.residual = nn.Linear(d, width), residual
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), *([nn.LayerNorm(width)] if norm else []), activation())
            for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h) - 0.5 if self.residual else block(h)  # -0.5 re-centres the sigmoid
        return self.out(h)


def make_model(ctx, data, activation=nn.Sigmoid, residual=False, norm=False) -> nn.Module:
    return Deep(data.x.shape[1], int(ctx.knobs.width), int(ctx.knobs.depth), activation, residual, norm)


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


def metrics(model, data):
    model.zero_grad()
    F.mse_loss(model(data.x), data.y).backward()
    first, last = model.blocks[0][0].weight.grad.norm(), model.blocks[-1][0].weight.grad.norm()
    model.zero_grad()
    return {"grad_norm_first_over_last_block": float(first / last) if last > 0 else float("nan")}


VARIANTS = [
    Variant("sigmoid_20", "broken", "20 sigmoid layers, torch default init", F.mse_loss),
    Variant("relu_he", "fix", "ReLU with He-normal init", F.mse_loss, swap={"activation": nn.ReLU},
            overrides={"init.name": "he_normal", "optimizer.lr": 0.01}),
    Variant("residual_sigmoid", "fix", "sigmoid blocks with residual connections", F.mse_loss, swap={"residual": True}),
    Variant("layernorm_sigmoid", "myth", "LayerNorm before every sigmoid", F.mse_loss, swap={"norm": True}),
]


def _relu_fixes_vanishing(r):
    b, relu = r.broken, r.variant("relu_he")
    evidence = (f"sigmoid: exact loss {b.exact_loss_start:.3g} -> {b.exact_loss_end:.3g}, first/last gradient "
                f"{b.metrics['grad_norm_first_over_last_block']:.2g}; ReLU+He: {relu.exact_loss_start:.3g} -> "
                f"{relu.exact_loss_end:.3g}, first/last {relu.metrics['grad_norm_first_over_last_block']:.2g}")
    ok = r.reproduced and relu.learned
    return (Verdict.confirmed if ok else Verdict.refuted), evidence


CLAIMS = [
    Claim("Deep sigmoid/tanh stacks suffer vanishing gradients, and ReLU-family activations mitigate them.",
          _relu_fixes_vanishing, "seed 001"),
]
