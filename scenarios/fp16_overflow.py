"""fp16_overflow: a regression trained entirely in float16, whose squared errors pass 65504."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant

SUMMARY = "Pure float16 training on targets in the hundreds: a squared error above 65504 is inf, then NaN."
EXPLANATION = """
float16 tops out at 65504, so any value above 256 squares to inf. With targets in
the hundreds, an MSE loss computed in float16 is inf from the first step, and the
backward pass turns inf into NaN. Autocast keeps the weights in float32, runs the
matmuls in float16, and computes the loss in float32, where 1e5 is an ordinary
number. float16 also fails at the other end: its smallest subnormal is 6e-8, so
gradients smaller than that flush to 0, which is why autocast is paired with a
GradScaler that multiplies the loss by 2^16 (and skips any step whose scaled
gradients overflowed) before unscaling. bfloat16 has float32's exponent range, so
neither overflow nor this underflow happens, at the cost of 8 bits of precision.
The probe measures how many gradient entries flush to 0 with and without scaling.
"""
DEFAULTS = dict(optimizer="adam", lr=0.3, dtype="float16", steps=150)
DATA = dict(n=256, features=8, width=32, target_scale=400.0)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    x = rng.randn(int(knobs.n), int(knobs.features))
    w = rng.randn(int(knobs.features))
    return Data(x, (float(knobs.target_scale) * torch.tanh(x @ w / 2))[:, None])


def make_model(ctx, data) -> nn.Module:
    width = int(ctx.knobs.width)
    return nn.Sequential(nn.Linear(data.x.shape[1], width), nn.Tanh(), nn.Linear(width, 1))


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


VARIANTS = [
    Variant("pure_float16", "broken", "weights, activations and loss all in float16", F.mse_loss),
    Variant("autocast_fp16", "fix", "float32 weights; autocast runs matmuls in fp16, the loss in fp32", F.mse_loss,
            overrides={"dtype": "float32"}, amp="float16"),
    Variant("autocast_fp16_gradscaler", "fix", "the same, plus torch.amp.GradScaler", F.mse_loss,
            overrides={"dtype": "float32"}, amp="float16", loss_scaling=True),
    Variant("bfloat16", "fix", "weights and activations in bfloat16", F.mse_loss, overrides={"dtype": "bfloat16"},
            lossy=True),
]


ZEROS_UNSCALED, ZEROS_SCALED = "fp16_zero_grad_fraction_unscaled", "fp16_zero_grad_fraction_scaled_2^16"


def probes(ctx, train):
    """Gradient entries that flush to zero in float16 when the loss is small."""
    g = torch.Generator().manual_seed(ctx.seed)
    x = torch.randn(64, 8, generator=g).to(torch.float16)
    w = (torch.randn(8, 1, generator=g) * 1e-3).to(torch.float16).requires_grad_(True)
    tiny_loss = lambda scale: ((x @ w).float().pow(2).mean() * 1e-4 * scale)
    tiny_loss(1.0).backward()
    unscaled = float((w.grad == 0).float().mean())
    w.grad = None
    tiny_loss(2.0 ** 16).backward()
    scaled = float((w.grad.float() / 2 ** 16 == 0).float().mean())
    return {ZEROS_UNSCALED: unscaled, ZEROS_SCALED: scaled,
            "float16_max": float(torch.finfo(torch.float16).max)}


def _mixed_precision(r):
    b, amp, scaler, bf = (r.broken, r.variant("autocast_fp16"), r.variant("autocast_fp16_gradscaler"),
                          r.variant("bfloat16"))
    evidence = (f"pure fp16: finite={b.finite}; autocast: finite={amp.finite}, learned={amp.learned}; "
                f"autocast+GradScaler: finite={scaler.finite}, skipped steps {scaler.metrics.get('skipped_steps')}; "
                f"bfloat16: finite={bf.finite}; zero-gradient fraction of a tiny loss: "
                f"{r.probes[ZEROS_UNSCALED]:.2f} unscaled vs "
                f"{r.probes[ZEROS_SCALED]:.2f} scaled")
    ok = not b.finite and amp.finite and amp.learned and scaler.finite and bf.finite
    return (Verdict.confirmed if ok else Verdict.refuted), evidence


CLAIMS = [
    Claim("Mixed precision (autocast with float32 loss, plus loss scaling) or bfloat16 avoids float16 overflow.",
          _mixed_precision, "practice"),
]
