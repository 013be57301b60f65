"""sparse_ce_bad_labels: integer-label cross-entropy fed labels it cannot use."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from nanlab.lab.result import Verdict
from nanlab.lab.scenario import Claim, Data, Learn, Variant
from nanlab.debug.validate import DataError, label_problems, validate_labels
from nanlab.scenarios.frameworks.sparse_ce_bad_labels import CASES, IGNORE, ce_key

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


# Four problems, one of each kind validate_labels knows: NaN, fractional, >= classes, negative.
BAD_LABELS = [0.0, 2.7, float("nan"), 5.0, -3.0]


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


# The same measurement in Keras and JAX (nanlab.frameworks): the builders live in
# nanlab.scenarios.frameworks.sparse_ce_bad_labels, which imports no torch.
FRAMEWORKS = {"keras": "nanlab.scenarios.frameworks.sparse_ce_bad_labels:keras_recipe",
              "jax": "nanlab.scenarios.frameworks.sparse_ce_bad_labels:jax_recipe"}
