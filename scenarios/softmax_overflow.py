"""softmax_overflow: large logits through a hand-written softmax."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant
from nanlab.scenarios.frameworks.softmax_overflow import KERAS_OWN, PROBE_LABEL, PROBE_LOGITS, keras_cce_key

SUMMARY = "A hand-written softmax overflows exp() on large logits: inf/inf = NaN."
EXPLANATION = """
Unscaled inputs (x100) give a linear classifier logits in the hundreds. In float32,
exp(z) overflows to inf once z > 88.7, so a softmax written as exp(z)/sum(exp(z))
computes inf/inf = NaN for the largest logit. Library softmax subtracts max(z)
first and never overflows, but its smallest probabilities underflow: exp(-104) is
below float32's smallest subnormal, so p = 0 exactly, log(p) = -inf, and the backward
pass multiplies 0 by -inf, giving NaN gradients. Working in log space avoids both:
log_softmax(z) = z - max(z) - log(sum(exp(z - max(z)))) has no exp of a large number
and no log of a tiny one. Clipping logits to [-10, 10] is finite too, but the clamp
has zero gradient outside that range, so examples whose logits start beyond it stop
learning; the report measures that cost against log_softmax.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.001, steps=60)
DATA = dict(n=256, features=8, classes=4, input_scale=100.0)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    n, d, k = int(knobs.n), int(knobs.features), int(knobs.classes)
    centers = 2.0 * rng.randn(k, d)
    y = rng.randint(0, k, (n,))
    x = centers[y] + rng.randn(n, d)
    return Data(x * float(knobs.input_scale), y)


def make_model(ctx, data) -> nn.Module:
    return nn.Linear(data.x.shape[1], int(data.y.max()) + 1)


def exact_loss(logits, y):
    return F.cross_entropy(logits, y)


def accuracy(logits, y):
    return (logits.argmax(-1) == y).double().mean()


def hand_softmax(z):
    e = torch.exp(z)
    return e / e.sum(-1, keepdim=True)


def hand_softmax_ce(logits, y):
    return -torch.log(hand_softmax(logits).gather(1, y[:, None])).mean()


def log_of_library_softmax(logits, y):
    return F.nll_loss(torch.log(torch.softmax(logits, -1)), y)


def probability_ce(probs, y, eps=1e-7):
    """A cross-entropy that expects probabilities, the way Keras' categorical
    cross-entropy does: rescale to sum 1, clip to [eps, 1 - eps], take -log."""
    probs = probs / probs.sum(-1, keepdim=True)
    return -torch.log(probs.clamp(eps, 1 - eps).gather(1, y[:, None])).mean()


def log_softmax_into_probability_ce(logits, y):
    return probability_ce(F.log_softmax(logits, -1), y)


def clipped_logits_ce(logits, y):
    return hand_softmax_ce(logits.clamp(-10.0, 10.0), y)


VARIANTS = [
    Variant("hand_softmax", "broken", "exp(z) / sum(exp(z)) written by hand", hand_softmax_ce),
    Variant("log_of_softmax", "myth", "library softmax, then log: stable softmax, unstable log", log_of_library_softmax),
    Variant("log_softmax_as_probs", "myth", "log_softmax output fed to a loss that expects probabilities",
            log_softmax_into_probability_ce),
    Variant("cross_entropy_on_logits", "fix", "F.cross_entropy on logits (log-sum-exp inside)", F.cross_entropy),
    Variant("clip_logits_10", "fix", "clamp logits to [-10, 10] before the hand-written softmax",
            clipped_logits_ce, lossy=True),
]


def probes(ctx, train):
    """Where each path breaks, on one row of logits with a gap of 200."""
    z = torch.tensor([PROBE_LOGITS], dtype=ctx.dtype, device=ctx.device)
    return {
        "hand_softmax_of_[200,0,-200]": hand_softmax(z)[0].tolist(),
        "log_softmax_of_[200,0,-200]": F.log_softmax(z, -1)[0].tolist(),
        "log_of_softmax_of_[200,0,-200]": torch.log(torch.softmax(z, -1))[0].tolist(),
    }


def _large_logits_nan(r):
    hand, log_sm, exact = r.variant("hand_softmax"), r.variant("log_of_softmax"), r.variant("cross_entropy_on_logits")
    evidence = (f"hand-written softmax: finite={hand.finite}; library softmax then log: finite={log_sm.finite}; "
                f"cross_entropy on logits: finite={exact.finite}")
    own = _own_softmax_cce(r)
    if not hand.finite and not exact.finite:
        return Verdict.confirmed, evidence + " (every path failed)" + own
    if not hand.finite and exact.finite:
        failing = "the hand-written path fails" if log_sm.finite else "the hand-written and log(softmax) paths fail"
        return Verdict.partly, evidence + f" (only {failing}; the library's log-sum-exp path does not)" + own
    return Verdict.refuted, evidence + own


def _own_softmax_cce(r) -> str:
    """What the framework's own softmax-then-cross-entropy did, where its recipe has one
    (Keras: a softmax output into categorical_crossentropy); "" elsewhere."""
    own = next((v for v in r.variants if v.name == KERAS_OWN), None)
    if own is None:
        return ""
    on_softmax, on_logits = r.probes[keras_cce_key("softmax")], r.probes[keras_cce_key("logits")]
    said = (f"; Keras' softmax then categorical_crossentropy: finite={own.finite}, loss {own.losses[0]:.4g} at step 0 "
            f"against the exact {own.exact_loss_start:.4g}; on [200, 0, -200] labelled {PROBE_LABEL} it gives "
            f"{on_softmax:.4g} where from_logits=True gives {on_logits:.4g}")
    ceiling = -float(torch.log(torch.tensor(1e-7, dtype=torch.float64)))  # what a probability clipped at 1e-7 scores
    if own.finite and own.wrong:
        clipped = abs(on_softmax - ceiling) < 1e-5 * ceiling
        return said + " -> no NaN, but a wrong loss" + (f": it clips probabilities at 1e-7, so an example scores at "
                                                        f"most -ln(1e-7) = {ceiling:.4g}" if clipped else "")
    if own.finite:
        return said + " -> no NaN and the exact loss" + (": Keras took the logits back from its own softmax"
                                                          if on_softmax == on_logits else "")
    return said


def _clipping_removes_nan(r):
    clip, exact = r.variant("clip_logits_10"), r.variant("cross_entropy_on_logits")
    evidence = (f"clipped: finite={clip.finite}, exact loss {clip.exact_loss_end:.4g}, accuracy {clip.accuracy_end:.3f}; "
                f"log_softmax: exact loss {exact.exact_loss_end:.4g}, accuracy {exact.accuracy_end:.3f}")
    if not clip.finite:
        return Verdict.refuted, evidence
    costs = clip.exact_loss_end > exact.exact_loss_end * 1.01 or clip.accuracy_end < exact.accuracy_end - 0.01
    return (Verdict.partly if costs else Verdict.confirmed), evidence + (" (finite, but it costs loss or accuracy)" if costs else "")


def _log_softmax_as_probs(r):
    myth = r.variant("log_softmax_as_probs")
    evidence = (f"finite={myth.finite}; at step 0 its loss reads {myth.losses[0]:.4g} against the exact "
                f"cross-entropy {myth.exact_loss_start:.4g}; exact loss after training {myth.exact_loss_end:.4g}")
    works = myth.finite and not myth.wrong and myth.learned
    return (Verdict.confirmed if works else Verdict.refuted), evidence


CLAIMS = [
    Claim("Large logits make softmax followed by cross-entropy produce NaN.", _large_logits_nan, "seed 002"),
    Claim("Clipping logits to [-10, 10] removes the NaN without harm.", _clipping_removes_nan, "seed 002"),
    Claim("Passing log_softmax output to a cross-entropy that expects probabilities fixes the NaN.",
          _log_softmax_as_probs, "seed 002"),
]


# The same measurement in Keras and JAX (nanlab.frameworks): the builders live in
# nanlab.scenarios.frameworks.softmax_overflow, which imports no torch.
FRAMEWORKS = {"keras": "nanlab.scenarios.frameworks.softmax_overflow:keras_recipe",
              "jax": "nanlab.scenarios.frameworks.softmax_overflow:jax_recipe"}
