"""masked_softmax: attention pooling where some sequences are entirely padding."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant
from nanlab.scenarios.frameworks.masked_softmax import (FULLY_MASKED_IS_NAN, OWN_FULLY_MASKED_ROW, OWN_MASKED_SOFTMAX,
                                                    PARTLY_MASKED_DIFFERENCE, PROBE_MASK)

SUMMARY = "Attention over a fully masked row: softmax of all -inf is 0/0 = NaN; partly masked rows are fine."
EXPLANATION = """
Masked attention sets the scores of padding positions to -inf so that softmax gives
them weight exp(-inf) = 0. A row with at least one real position is fine: the max
is finite, the masked terms vanish. A row that is all padding (an empty sequence, a
query with nothing to attend to) has max = -inf, and softmax computes
exp(-inf - (-inf)) = exp(NaN): the whole row is NaN, and so is every gradient that
touches it. Guarding the row means deciding what an empty row should produce
(here: zero weights), computing softmax on a finite stand-in, and selecting the
answer with torch.where so no NaN exists in either branch. Replacing -inf by a
large negative number such as -1e9 is finite too, but an empty row then attends
uniformly to its padding, which is a different answer, so it is marked lossy.
"""
DEFAULTS = dict(optimizer="sgd", lr=0.1, steps=150)
DATA = dict(sequences=64, tokens=8, features=6, empty_sequences=4)
LEARN = Learn(loss_drop=0.5)


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    n, t, d = int(knobs.sequences), int(knobs.tokens), int(knobs.features)
    x = rng.randn(n, t, d)
    lengths = rng.randint(1, t + 1, (n,))
    lengths[: int(knobs.empty_sequences)] = 0
    mask = torch.arange(t)[None, :] < lengths[:, None]
    w = rng.randn(d)
    real = (x @ w) * mask
    y = real.sum(1) / lengths.clamp_min(1)  # the mean over real tokens; 0 for an empty sequence
    return Data(x, y[:, None], {"mask": mask})


class AttentionPool(nn.Module):
    def __init__(self, d, mask, masked_softmax):
        super().__init__()
        self.score = nn.Linear(d, 1)
        self.value = nn.Linear(d, 1)
        self.register_buffer("mask", mask)
        self.masked_softmax = masked_softmax

    def forward(self, x):
        weights = self.masked_softmax(self.score(x).squeeze(-1), self.mask)
        return (weights[..., None] * self.value(x)).sum(1)


def plain_masked_softmax(scores, mask):
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)


def guarded_masked_softmax(scores, mask):
    has_any = mask.any(-1, keepdim=True)
    stand_in = torch.where(has_any, scores.masked_fill(~mask, float("-inf")), torch.zeros_like(scores))
    return torch.where(has_any, torch.softmax(stand_in, -1), torch.zeros_like(scores))


def large_negative_masked_softmax(scores, mask):
    return torch.softmax(scores.masked_fill(~mask, -1e9), -1)


def make_model(ctx, data, softmax=plain_masked_softmax) -> nn.Module:
    return AttentionPool(data.x.shape[-1], data.extra["mask"], softmax)


def exact_loss(pred, y):
    return F.mse_loss(pred, y)


VARIANTS = [
    Variant("softmax_of_all_-inf", "broken", "masked_fill(-inf) then softmax", F.mse_loss),
    Variant("guard_empty_rows", "fix", "empty rows get zero weights; softmax only sees finite stand-ins", F.mse_loss,
            swap={"softmax": guarded_masked_softmax}),
    Variant("fill_-1e9", "fix", "masked_fill(-1e9) instead of -inf", F.mse_loss,
            swap={"softmax": large_negative_masked_softmax}, lossy=True),
]


def probes(ctx, train):
    """Partly masked rows must come out the same with and without the guard."""
    g = torch.Generator().manual_seed(ctx.seed)
    scores = torch.randn(4, 6, generator=g)
    mask = torch.tensor(PROBE_MASK)
    plain, guarded = plain_masked_softmax(scores, mask), guarded_masked_softmax(scores, mask)
    return {PARTLY_MASKED_DIFFERENCE: float((plain[:3] - guarded[:3]).abs().max()),
            FULLY_MASKED_IS_NAN: bool(plain[3].isnan().all()),
            "fully_masked_row_guarded_sum": float(guarded[3].sum())}


def _fully_masked(r):
    p = r.probes
    fix = r.variant("guard_empty_rows")
    evidence = (f"fully masked row NaN: {p[FULLY_MASKED_IS_NAN]}; partly masked rows differ by "
                f"{p[PARTLY_MASKED_DIFFERENCE]:g} between plain and guarded; guarded training: "
                f"finite={fix.finite}, learned={fix.learned}")
    own = next((v for v in r.variants if v.name in OWN_MASKED_SOFTMAX.values()), None)
    if own is not None:  # Keras and JAX: the library's own masked softmax on the same empty row
        row = p[OWN_FULLY_MASKED_ROW]
        said = ("zero weights, as the guard gives" if all(w == 0 for w in row) else
                "NaN, as the plain softmax" if all(math.isnan(w) for w in row) else f"weights {row}")
        evidence += (f"; the framework's own masked softmax ({own.name}) gives an empty row {said}; training "
                     f"with it: finite={own.finite}, learned={own.learned}")
    ok = p[FULLY_MASKED_IS_NAN] and p[PARTLY_MASKED_DIFFERENCE] == 0 and fix.finite and fix.learned
    return (Verdict.confirmed if ok else Verdict.refuted), evidence


CLAIMS = [
    Claim("Only a fully masked attention row makes softmax NaN; guarding empty rows fixes it without changing the others.",
          _fully_masked, "practice"),
]


# The same measurement in Keras and JAX (nanlab.frameworks): the builders live in
# nanlab.scenarios.frameworks.masked_softmax, which imports no torch.
FRAMEWORKS = {"keras": "nanlab.scenarios.frameworks.masked_softmax:keras_recipe",
              "jax": "nanlab.scenarios.frameworks.masked_softmax:jax_recipe"}
