"""masked_softmax: attention pooling where some sequences are entirely padding."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant

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


PARTLY_MASKED_DIFFERENCE, FULLY_MASKED_IS_NAN = "partly_masked_rows_max_difference", "fully_masked_row_plain_is_nan"


def probes(ctx, train):
    """Partly masked rows must come out the same with and without the guard."""
    g = torch.Generator().manual_seed(ctx.seed)
    scores = torch.randn(4, 6, generator=g)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False],
                         [False, True, False, True, False, False], [False] * 6])
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


# The same measurement in other frameworks (nanlab.frameworks). The builders run in a
# worker that has not imported torch, so they use only the kit and this module's
# literal constants. Keras and JAX each ship a masked softmax of their own; it is a
# variant there, because what it does with an empty row is the framework's choice.
FRAMEWORKS = {"keras": "keras_recipe", "jax": "jax_recipe"}
OWN_MASKED_SOFTMAX = {"keras": "keras_softmax_layer", "jax": "jax_softmax_where"}
OWN_FULLY_MASKED_ROW = "fully_masked_row_library_softmax"
PROBE_MASK = [[True] * 6, [True, True, False, False, False, False],
              [False, True, False, True, False, False], [False] * 6]


def _probe_rows(np, plain, guarded, own):
    """The torch probes' measurement with a framework's functions: partly masked rows
    must agree with and without the guard; the fully masked row is the question."""
    scores = np.random.default_rng(0).standard_normal((4, 6)).astype("float32")
    mask = np.array(PROBE_MASK)
    rows = {name: np.asarray(fn(scores, mask), dtype="float64") for name, fn in
            (("plain", plain), ("guarded", guarded), ("own", own))}
    return {PARTLY_MASKED_DIFFERENCE: float(np.abs(rows["plain"][:3] - rows["guarded"][:3]).max()),
            FULLY_MASKED_IS_NAN: bool(np.isnan(rows["plain"][3]).all()),
            "fully_masked_row_guarded_sum": float(rows["guarded"][3].sum()),
            OWN_FULLY_MASKED_ROW: [float(v) for v in rows["own"][3]]}


def keras_recipe(kit, data, knobs):
    """The attention pool as a Keras model, the mask held as a constant as torch holds
    it in a buffer; keras.layers.Softmax with its mask argument besides."""
    keras, ops, np = kit.keras, kit.ops, kit.np
    mask = ops.convert_to_tensor(data.extra["mask"])

    def plain(scores, m):
        return ops.softmax(ops.where(m, scores, float("-inf")), axis=-1)

    def guarded(scores, m):
        has_any = ops.any(m, axis=-1, keepdims=True)
        stand_in = ops.where(has_any, ops.where(m, scores, float("-inf")), ops.zeros_like(scores))
        return ops.where(has_any, ops.softmax(stand_in, axis=-1), ops.zeros_like(scores))

    def large_negative(scores, m):
        return ops.softmax(ops.where(m, scores, -1e9), axis=-1)

    def keras_own(scores, m):
        return keras.layers.Softmax(axis=-1)(scores, mask=m)

    def pool(softmax):
        class AttentionPool(keras.Model):
            def __init__(self):
                super().__init__()
                self.score, self.value = keras.layers.Dense(1), keras.layers.Dense(1)

            def call(self, x):
                weights = softmax(ops.squeeze(self.score(x), -1), mask)
                return ops.sum(weights[..., None] * self.value(x), axis=1)

        return lambda data: AttentionPool()

    def mse(pred, y):
        return ops.mean(ops.square(pred - y))

    def probes():
        as_numpy = lambda fn: lambda s, m: ops.convert_to_numpy(fn(ops.convert_to_tensor(s), ops.convert_to_tensor(m)))  # noqa: E731,E501
        return _probe_rows(np, as_numpy(plain), as_numpy(guarded), as_numpy(keras_own))

    variants = _variants(kit, mse, pool, plain, guarded, large_negative,
                         (OWN_MASKED_SOFTMAX["keras"], keras_own, "keras.layers.Softmax given the mask"))
    return kit.Recipe(pool(plain), variants, probes)


def _variants(kit, loss, pool, plain, guarded, large_negative, own):
    """The torch variants by name, each pooling with its framework's masked softmax, and
    ``own`` = (name, softmax, summary): the framework's own masked softmax, as a fix."""
    name, softmax, summary = own
    return {"softmax_of_all_-inf": kit.Variant(loss, model=pool(plain)),
            "guard_empty_rows": kit.Variant(loss, model=pool(guarded)),
            "fill_-1e9": kit.Variant(loss, model=pool(large_negative)),
            name: kit.Variant(loss, model=pool(softmax), role="fix", summary=summary)}


def jax_recipe(kit, data, knobs):
    """The attention pool in plain JAX; jax.nn.softmax with its where= mask besides."""
    jax, jnp = kit.jax, kit.jnp
    mask = jnp.asarray(data.extra["mask"])

    def plain(scores, m):
        return jax.nn.softmax(jnp.where(m, scores, -jnp.inf), axis=-1)

    def guarded(scores, m):
        has_any = m.any(-1, keepdims=True)
        stand_in = jnp.where(has_any, jnp.where(m, scores, -jnp.inf), 0.0)
        return jnp.where(has_any, jax.nn.softmax(stand_in, axis=-1), 0.0)

    def large_negative(scores, m):
        return jax.nn.softmax(jnp.where(m, scores, -1e9), axis=-1)

    def jax_own(scores, m):
        return jax.nn.softmax(scores, axis=-1, where=m)

    def pool(softmax):
        def init(key, x):
            score_key, value_key = jax.random.split(key)
            d = x.shape[-1]
            return {"score": kit.dense(score_key, d, 1), "value": kit.dense(value_key, d, 1)}

        def apply(p, x):
            scores = (x @ p["score"]["kernel"] + p["score"]["bias"])[..., 0]
            values = x @ p["value"]["kernel"] + p["value"]["bias"]
            return (softmax(scores, mask)[..., None] * values).sum(1)

        return lambda data: kit.JaxModel(init, apply)

    def mse(pred, y):
        return jnp.mean(jnp.square(pred - y))

    def probes():
        as_numpy = lambda fn: lambda s, m: kit.np.asarray(fn(jnp.asarray(s), jnp.asarray(m)))  # noqa: E731
        return _probe_rows(kit.np, as_numpy(plain), as_numpy(guarded), as_numpy(jax_own))

    variants = _variants(kit, mse, pool, plain, guarded, large_negative,
                         (OWN_MASKED_SOFTMAX["jax"], jax_own, "jax.nn.softmax given the mask as where="))
    return kit.Recipe(pool(plain), variants, probes)
