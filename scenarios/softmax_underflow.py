"""softmax_underflow: soft targets against probabilities that underflow to 0."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant

SUMMARY = "Soft targets with exact zeros against softmax probabilities that underflow to 0: 0*log(0) = NaN."
EXPLANATION = """
Distillation and label smoothing train against soft targets q. Written as
-sum(q * log(softmax(z))), any class whose logit trails the largest by more than
~104 gets p = 0 exactly in float32, so log(p) = -inf, and where the teacher gave
that class q = 0 the product is 0 * (-inf) = NaN. xlogy(q, p) defines 0*log(0) = 0,
so its forward value is finite, but its gradient with respect to p is q/p = 0/0 =
NaN at exactly those entries: the NaN moves to the backward pass. Working in log
space fixes both: log_softmax(z) is finite for any finite z, and q * log_softmax(z)
is 0 wherever q is 0, with a zero gradient there.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.002, steps=80)
DATA = dict(n=256, features=8, classes=6, input_scale=60.0)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    n, d, k = int(knobs.n), int(knobs.features), int(knobs.classes)
    x = rng.randn(n, d)
    teacher = torch.softmax(x @ rng.randn(d, k), -1)
    top2 = teacher.topk(2, -1).indices
    q = torch.zeros_like(teacher).scatter(1, top2, teacher.gather(1, top2))  # a sparse teacher: top-2 only
    return Data(x * float(knobs.input_scale), q / q.sum(-1, keepdim=True))


def make_model(ctx, data) -> nn.Module:
    return nn.Linear(data.x.shape[1], data.y.shape[1])


def exact_loss(logits, q):
    return -(q * F.log_softmax(logits, -1)).sum(-1).mean()


def log_of_softmax(logits, q):
    return -(q * torch.log(torch.softmax(logits, -1))).sum(-1).mean()


def xlogy_of_softmax(logits, q):
    return -torch.xlogy(q, torch.softmax(logits, -1)).sum(-1).mean()


VARIANTS = [
    Variant("q_times_log_softmax_probs", "broken", "-sum(q * log(softmax(z)))", log_of_softmax),
    Variant("xlogy", "myth", "-sum(xlogy(q, softmax(z))): 0*log(0) defined as 0", xlogy_of_softmax),
    Variant("log_softmax", "fix", "-sum(q * log_softmax(z))", exact_loss),
    Variant("kl_div", "fix", "F.kl_div(log_softmax(z), q) (same gradient, shifted by q's entropy)",
            lambda z, q: F.kl_div(F.log_softmax(z, -1), q, reduction="batchmean")),
]


XLOGY_AT_0, XLOGY_GRAD_AT_0 = "xlogy(0, 0)", "d xlogy(q, p) / dp at q=0, p=0"


def probes(ctx, train):
    q = torch.tensor([0.0, 1.0], dtype=torch.float64)
    p = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    torch.xlogy(q, p).sum().backward()
    return {XLOGY_AT_0: float(torch.xlogy(q, p.detach())[0]), XLOGY_GRAD_AT_0: float(p.grad[0])}


def _xlogy_fixes(r):
    x = r.variant("xlogy")
    first = x.first_nonfinite
    evidence = (f"xlogy forward at (0, 0) = {r.probes[XLOGY_AT_0]:g}, gradient {r.probes[XLOGY_GRAD_AT_0]}; "
                f"training: finite={x.finite}" + (f", non-finite {first.quantity} at step {first.step}" if first else ""))
    return (Verdict.confirmed if x.finite and x.learned else Verdict.refuted), evidence


def _underflow_nan(r):
    b, fix = r.broken, r.variant("log_softmax")
    evidence = f"-sum(q log softmax): finite={b.finite}; with log_softmax: finite={fix.finite}, learned={fix.learned}"
    return (Verdict.confirmed if not b.finite and fix.finite else Verdict.refuted), evidence


CLAIMS = [
    Claim("Very negative logits make softmax underflow, so 0 * log(0) turns a soft-target loss into NaN.",
          _underflow_nan, "seed 002"),
    Claim("xlogy, which defines 0 * log(0) = 0, removes that NaN.", _xlogy_fixes, "common advice"),
]
