"""sparse_ce_bad_labels: integer-label cross-entropy fed labels it cannot use."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant
from nanlab.debug.validate import DataError, label_problems, validate_labels

SUMMARY = "A token-tagging batch whose padded sequences are all ignore_index: a per-sequence mean is 0/0 = NaN."
EXPLANATION = """
Labels outside [0, C) do not quietly give NaN in torch: on the CPU cross_entropy
raises "Target N is out of bounds" (and on CUDA it trips a device-side assert that
aborts the process), and NaN labels cast to long become a huge negative number that
raises the same way. Floats cast to long are truncated silently (2.7 becomes 2): wrong,
but finite. The path that really produces a NaN loss is ignore_index: a mean over a
set of labels that are all ignored divides 0 by 0. Here each sequence's loss is the
mean over its tokens, and fully padded sequences make that 0/0. validate_labels
finds them (and every out-of-range, negative, NaN or fractional label) before training,
in one message; a safe reduction divides the summed token losses by max(count, 1).
"""
DEFAULTS = dict(optimizer="sgd", lr=0.5, steps=80)
DATA = dict(sequences=64, tokens=12, features=8, classes=5, empty_sequences=4)
LEARN = Learn(loss_drop=0.5)
IGNORE = -100


def make_data(ctx) -> Data:
    knobs, rng = ctx.knobs, ctx.rng()
    n, t, d, c = int(knobs.sequences), int(knobs.tokens), int(knobs.features), int(knobs.classes)
    x = rng.randn(n, t, d)
    w = rng.randn(d, c)
    y = (x @ w).argmax(-1)
    lengths = rng.randint(1, t + 1, (n,))
    lengths[: int(knobs.empty_sequences)] = 0  # fully padded sequences
    y[torch.arange(t)[None, :] >= lengths[:, None]] = IGNORE
    return Data(x, y)


def make_model(ctx, data) -> nn.Module:
    return nn.Linear(data.x.shape[-1], int(ctx.knobs.classes))


def exact_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)


def accuracy(logits, y):
    keep = y != IGNORE
    return (logits.argmax(-1)[keep] == y[keep]).double().mean()


def per_sequence_mean(logits, y):
    token = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")
    counts = (y != IGNORE).sum(1)
    return (token.sum(1) / counts).mean()


def safe_per_sequence_mean(logits, y):
    token = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")
    counts = (y != IGNORE).sum(1)
    has_tokens = counts > 0
    return (token.sum(1)[has_tokens] / counts[has_tokens]).mean()


def drop_empty_sequences(data: Data) -> Data:
    """What a training script does after validate_labels reports empty rows."""
    try:
        validate_labels(data.y, num_classes=int(data.y.max()) + 1, ignore_index=IGNORE)
        return data
    except DataError:
        keep = (data.y != IGNORE).any(1)
        return Data(data.x[keep], data.y[keep])


VARIANTS = [
    Variant("per_sequence_mean", "broken", "mean over each sequence's tokens, then over sequences", per_sequence_mean),
    Variant("validate_then_drop", "fix", "validate_labels before training; drop the sequences it names",
            per_sequence_mean, prepare=drop_empty_sequences),
    Variant("safe_reduction", "fix", "per-sequence means only where a sequence has tokens", safe_per_sequence_mean),
]


def _what_cross_entropy_does(labels, classes=3) -> tuple[str, bool, float]:
    """(what a person reads, whether it raised, the loss or NaN if it raised)."""
    logits = torch.zeros(len(labels), classes)
    try:
        loss = float(F.cross_entropy(logits, labels))
        return f"loss {loss:.4g}", False, loss
    except (RuntimeError, IndexError) as err:
        return "raises: " + str(err).splitlines()[0][:80], True, float("nan")


CASES = {"label_3_of_3_classes": [0, 3, 1], "label_-1": [0, -1, 1], "all_ignored": [IGNORE, IGNORE, IGNORE]}
# Four problems, one of each kind validate_labels knows: NaN, fractional, >= classes, negative.
BAD_LABELS = [0.0, 2.7, float("nan"), 5.0, -3.0]


def ce_key(case: str, what: str = "") -> str:
    """Probe keys: what cross_entropy did on a case ("" for the words, "raises", "loss")."""
    return f"cross_entropy_{case}" + (f"_{what}" if what else "")


PROBLEM_COUNT = "validate_labels_problem_count"


def shared_probes(ctx):
    """nanlab's own label check on labels with one problem of each kind. It runs
    before training, whatever trains afterwards, so every framework's result carries it."""
    problems = label_problems(torch.tensor(BAD_LABELS), 3, IGNORE)
    return {"validate_labels_on_bad_labels": "; ".join(problems), PROBLEM_COUNT: len(problems)}


def probes(ctx, train):
    out = {}
    for case, labels in CASES.items():
        said, raised, loss = _what_cross_entropy_does(torch.tensor(labels))
        out[ce_key(case)], out[ce_key(case, "raises")] = said, raised
        if not raised:
            out[ce_key(case, "loss")] = loss
    out["cross_entropy_nan_label_cast_to_long"] = _what_cross_entropy_does(torch.tensor([0.0, float("nan"), 2.0]).long())[0]
    out["float_labels_2.7_1.2_cast_to_long"] = str(torch.tensor([0.0, 2.7, 1.2]).long().tolist())
    out.update(shared_probes(ctx))
    return out


def _out_of_range_is_nan(r):
    p = r.probes
    evidence = (f"label 3 of 3 classes: {p[ce_key('label_3_of_3_classes')]}; label -1: "
                f"{p[ce_key('label_-1')]}; all targets ignored: {p[ce_key('all_ignored')]}")
    if r.config.get("framework", "torch") == "torch":
        evidence += ". Not measurable here: CUDA's device-side assert (no GPU in this run)"
    raises = p[ce_key("label_3_of_3_classes", "raises")]
    nan_labels = [case for case in ("label_3_of_3_classes", "label_-1")
                  if not p[ce_key(case, "raises")] and math.isnan(p[ce_key(case, "loss")])]
    nan_path = not p[ce_key("all_ignored", "raises")] and math.isnan(p[ce_key("all_ignored", "loss")])
    if len(nan_labels) == 2:
        return Verdict.confirmed, evidence
    if nan_labels:  # plain JAX: a label past the end reads NaN, a negative one wraps to a real class
        return Verdict.partly, evidence + " -> only the label past the last class gives NaN; the other gives a finite, wrong loss"
    if raises and nan_path:
        return Verdict.refuted, evidence + " -> out-of-range labels raise on CPU; the NaN comes from all-ignored targets"
    said = "raise" if raises else "give a finite, wrong loss with no error"
    ignored = "the NaN comes from all-ignored targets" if nan_path else "all-ignored targets give no NaN either"
    return Verdict.refuted, evidence + f" -> out-of-range labels {said}; {ignored}"


def _validation_catches(r):
    fix = r.variant("validate_then_drop")
    found = r.probes[PROBLEM_COUNT]
    evidence = (f"validate_labels found {found} of 4 problems: {r.probes['validate_labels_on_bad_labels']}; "
                f"training after dropping flagged rows: finite={fix.finite}")
    return (Verdict.confirmed if fix.finite and fix.learned and found == 4 else Verdict.refuted), evidence


CLAIMS = [
    Claim("Out-of-range labels give a NaN loss with sparse categorical cross-entropy.", _out_of_range_is_nan, "seed 000"),
    Claim("Validating labels before training (range, type, NaN) prevents this class of NaN.", _validation_catches,
          "seed 000"),
]


# The same measurement in other frameworks (nanlab.frameworks). These builders run in
# a worker that has not imported torch: they use the kit they are given, and only the
# functions and literal constants of this module (IGNORE, CASES, ce_key).
FRAMEWORKS = {"keras": "keras_recipe", "jax": "jax_recipe"}


def case_probes(case: str, said: str, raised: bool, loss: float) -> dict:
    """One label case as the torch probes record it: what happened, whether it raised,
    and the loss when it did not."""
    return {ce_key(case): said, ce_key(case, "raises"): raised, **({} if raised else {ce_key(case, "loss"): loss})}


def tagger_variants(kit, per_sequence_mean, safe_per_sequence_mean) -> dict:
    """The torch variants by name; validate_then_drop trains on the data its prepare
    cleaned, with the same loss as the broken variant."""
    return {"per_sequence_mean": kit.Variant(per_sequence_mean),
            "validate_then_drop": kit.Variant(per_sequence_mean),
            "safe_reduction": kit.Variant(safe_per_sequence_mean)}


def keras_recipe(kit, data, knobs):
    """The linear tagger in Keras 3, its token losses from Keras' own sparse
    cross-entropy with ignore_class, reduced per sequence as the torch variants do."""
    keras, ops = kit.keras, kit.ops

    def model(data):
        return keras.Sequential([keras.Input(data.x.shape[1:]), keras.layers.Dense(int(knobs.classes))])

    def sequence_sums(logits, y):
        token = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True, ignore_class=IGNORE)
        counts = ops.sum(ops.cast(ops.not_equal(y, IGNORE), logits.dtype), axis=1)
        return ops.sum(token, axis=1), counts

    def per_sequence_mean(logits, y):
        sums, counts = sequence_sums(logits, y)
        return ops.mean(sums / counts)

    def safe_per_sequence_mean(logits, y):
        # A mask instead of torch's boolean indexing, which a jitted step cannot do.
        sums, counts = sequence_sums(logits, y)
        has_tokens = ops.cast(counts > 0, logits.dtype)
        return ops.sum(has_tokens * sums / ops.maximum(counts, 1.0)) / ops.sum(has_tokens)

    def probes():
        zeros = lambda n: ops.zeros((n, 3))  # noqa: E731 - three classes, as the torch probes
        out = {}
        for case, labels in CASES.items():
            if case == "all_ignored":  # Keras' ignore_class: its mean over the tokens that are left
                loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=IGNORE)
                fn = lambda: loss(ops.convert_to_tensor(labels), zeros(len(labels)))  # noqa: E731
            else:
                fn = lambda labels=labels: ops.mean(keras.losses.sparse_categorical_crossentropy(  # noqa: E731
                    ops.convert_to_tensor(labels), zeros(len(labels)), from_logits=True))
            out.update(case_probes(case, *kit.call_outcome(fn, lambda v: float(ops.convert_to_numpy(v)))))
        return out

    return kit.Recipe(model, tagger_variants(kit, per_sequence_mean, safe_per_sequence_mean), probes)


def jax_recipe(kit, data, knobs):
    """The linear tagger in plain JAX; token losses as JAX code writes them (optax's
    integer-label cross-entropy): log_softmax, then take_along_axis at the label."""
    jax, jnp = kit.jax, kit.jnp

    def model(data):
        d, c = data.x.shape[-1], int(knobs.classes)
        return kit.JaxModel(lambda key, x: kit.dense(key, d, c), lambda p, x: x @ p["kernel"] + p["bias"])

    def token_losses(logits, y):
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]
        return -picked

    def sequence_sums(logits, y):
        keep = y != IGNORE
        token = jnp.where(keep, token_losses(logits, jnp.where(keep, y, 0)), 0.0)
        return token.sum(1), keep.sum(1).astype(logits.dtype)

    def per_sequence_mean(logits, y):
        sums, counts = sequence_sums(logits, y)
        return (sums / counts).mean()

    def safe_per_sequence_mean(logits, y):
        sums, counts = sequence_sums(logits, y)
        has_tokens = (counts > 0).astype(logits.dtype)
        return (has_tokens * sums / jnp.maximum(counts, 1.0)).sum() / has_tokens.sum()

    def probes():
        out = {}
        for case, labels in CASES.items():
            y = jnp.asarray(labels)
            if case == "all_ignored":  # the mean over the labels that are kept, written out
                keep = y != IGNORE
                fn = lambda: jnp.where(keep, token_losses(jnp.zeros((3, 3)), jnp.where(keep, y, 0)), 0.0).sum() / keep.sum()  # noqa: E731,E501
            else:
                fn = lambda y=y: token_losses(jnp.zeros((len(labels), 3)), y).mean()  # noqa: E731
            out.update(case_probes(case, *kit.call_outcome(fn)))
        return out

    return kit.Recipe(model, tagger_variants(kit, per_sequence_mean, safe_per_sequence_mean), probes)
