"""bce_log_zero: binary cross-entropy written by hand on saturated probabilities."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant
from nanlab.scenarios.frameworks.bce_log_zero import KERAS_OWN, PROBE_LOGITS, grad_key

SUMMARY = "Hand-written BCE on sigmoid outputs that saturate to exactly 0 or 1: log(0) and 0*(-inf) = NaN."
EXPLANATION = """
In float32, sigmoid(z) rounds to exactly 1.0 once z > 16.6 and to exactly 0.0 once
z < -103.3. With logits in the hundreds, -[y log p + (1-y) log(1-p)] then takes
log(0) = -inf, and even a correctly classified example computes 0 * (-inf) = NaN in
the term its label switches off. Clamping p to [1e-7, 1-1e-7] is finite, but a clamp
has zero gradient where it is active (|z| > 16.1), so a confidently wrong example
gets no gradient at all. torch's binary_cross_entropy clamps each log at -100 for
the same reason, so its loss is at most 100 per example; its backward divides by
max(p(1-p), 1e-12), which through the sigmoid scales a wrong example's gradient by
p(1-p)/1e-12 once |z| > 27.6, and to exactly 0 once p underflows (z < -103). BCE on
logits computes max(z,0) - z*y + log(1 + exp(-|z|)), whose gradient sigmoid(z) - y
stays -1 for any wrong example. The probes measure all four at z = -5, -30, -120.
Here, with separable data, the clamped losses still learn: the harm is to the
examples that start saturated on the wrong side. They even end a little lower than
BCE on logits (0.0129 and 0.0133 against 0.0148 at the defaults), at the same
accuracy: on separable data the logistic loss keeps falling as the weights grow
along the separating direction. BCE on logits fits in about 5 steps and its
gradient then fades (0.17 at step 5), so its weights stop growing (norm 0.55);
the clamped losses, their wrong examples silenced, take longer and end with larger
weights (0.62 and 0.60). The lower number is a larger weight norm, not a better fit.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.01, steps=60)
DATA = dict(n=256, features=4, input_scale=100.0)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    n, d = int(knobs.n), int(knobs.features)
    w = rng.randn(d)
    x = rng.randn(n, d)
    y = (x @ w > 0).double()
    return Data(x * float(knobs.input_scale), y)


class LogisticRegression(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.linear = nn.Linear(d, 1)

    def forward(self, x):
        return self.linear(x).squeeze(-1)  # logits


def make_model(ctx, data) -> nn.Module:
    return LogisticRegression(data.x.shape[1])


def exact_loss(logits, y):
    return F.binary_cross_entropy_with_logits(logits, y)


def accuracy(logits, y):
    return ((logits > 0).double() == y).double().mean()


def hand_bce(p, y):
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()


def hand_bce_on_sigmoid(logits, y):
    return hand_bce(torch.sigmoid(logits), y)


def clamped_bce(logits, y, eps=1e-7):
    return hand_bce(torch.sigmoid(logits).clamp(eps, 1 - eps), y)


def torch_bce_on_probs(logits, y):
    return F.binary_cross_entropy(torch.sigmoid(logits), y)


VARIANTS = [
    Variant("hand_bce", "broken", "-[y log p + (1-y) log(1-p)] on sigmoid outputs", hand_bce_on_sigmoid),
    Variant("clamp_eps_1e-7", "fix", "clamp p to [1e-7, 1 - 1e-7] first", clamped_bce, lossy=True),
    Variant("torch_bce_on_probs", "fix", "F.binary_cross_entropy on sigmoid outputs (log clamped at -100)",
            torch_bce_on_probs, lossy=True),
    Variant("bce_with_logits", "fix", "F.binary_cross_entropy_with_logits on logits", F.binary_cross_entropy_with_logits),
]


def _grad_wrt_logit(loss_fn, z, y, dtype, device):
    logit = torch.tensor([z], dtype=dtype, device=device, requires_grad=True)
    loss_fn(logit, torch.tensor([y], dtype=dtype, device=device)).backward()
    return float(logit.grad[0])


PROBED_LOSSES = {"hand": hand_bce_on_sigmoid, "clamp_1e-7": clamped_bce, "torch_bce": torch_bce_on_probs,
                 "with_logits": F.binary_cross_entropy_with_logits}


def probes(ctx, train):
    """The gradient each loss gives a wrong example (label 1) at logits -5, -30 and
    -120; the exact gradient is sigmoid(z) - 1, about -1 for all three."""
    out = {}
    for z in PROBE_LOGITS:
        for name, fn in PROBED_LOSSES.items():
            out[grad_key(name, z)] = _grad_wrt_logit(fn, z, 1.0, ctx.dtype, ctx.device)
    return out


LIBRARY_BCE = {"torch_bce": "torch's BCE", "keras_bce": "Keras' binary_crossentropy"}


def _eps_prevents_nan(r):
    clamp, exact = r.variant("clamp_eps_1e-7"), r.variant("bce_with_logits")
    g = r.probes[grad_key("clamp_1e-7", -30)]
    evidence = (f"clamped BCE finite={clamp.finite}, accuracy {clamp.accuracy_end:.3f} vs {exact.accuracy_end:.3f} "
                f"with logits; gradient at a wrong logit of -30: {g:.3g} (exact: "
                f"{r.probes[grad_key('with_logits', -30)]:.3g})")
    # The library's own BCE on probabilities, where this framework has one: torch's
    # clamps the log at -100, Keras' clips p at 1e-7 (the claim's own epsilon, built in).
    for key, said in LIBRARY_BCE.items():
        if grad_key(key, -30) in r.probes:
            evidence += (f"; {said} there: {r.probes[grad_key(key, -30)]:.3g}, and at -120: "
                         f"{r.probes[grad_key(key, -120)]:.3g}")
    own = next((v for v in r.variants if v.name == KERAS_OWN), None)
    if own is not None:
        evidence += f" (trained with it: finite={own.finite}, accuracy {own.accuracy_end:.3f})"
    if not clamp.finite:
        return Verdict.refuted, evidence
    return (Verdict.partly if g == 0.0 else Verdict.confirmed), evidence + (
        "; the NaN is gone, but the clamp zeroes the gradient of saturated examples" if g == 0.0 else "")


CLAIMS = [
    Claim("Adding an epsilon of 1e-7 inside the log (clamping p) prevents NaN in binary cross-entropy.",
          _eps_prevents_nan, "seeds 001, 004"),
]


# The same measurement in Keras and JAX (nanlab.frameworks): the builders live in
# nanlab.scenarios.frameworks.bce_log_zero, which imports no torch.
FRAMEWORKS = {"keras": "nanlab.scenarios.frameworks.bce_log_zero:keras_recipe",
              "jax": "nanlab.scenarios.frameworks.bce_log_zero:jax_recipe"}
