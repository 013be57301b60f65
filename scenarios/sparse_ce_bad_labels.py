"""sparse_ce_bad_labels: integer-label cross-entropy fed labels it cannot use."""
import torch
import torch.nn.functional as F
from torch import nn

from nanlab.scenario import Claim, Data, Learn, Variant
from nanlab.validate import DataError, label_problems, validate_labels

NAME = "sparse_ce_bad_labels"
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
LEARN = Learn(loss_drop=0.5)
IGNORE = -100


def make_data(ctx) -> Data:
    knobs, g = ctx.knobs, ctx.generator()
    n, t, d, c = int(knobs.sequences), int(knobs.tokens), int(knobs.features), int(knobs.classes)
    x = torch.randn(n, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, c, generator=g, dtype=torch.float64)
    y = (x @ w).argmax(-1)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
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


def _what_cross_entropy_does(labels, classes=3):
    logits = torch.zeros(len(labels), classes)
    try:
        loss = F.cross_entropy(logits, labels)
        return f"loss {float(loss):.4g}"
    except (RuntimeError, IndexError) as err:
        return "raises: " + str(err).splitlines()[0][:80]


def probes(ctx, train):
    nan_labels = torch.tensor([0.0, float("nan"), 2.0])
    float_labels = torch.tensor([0.0, 2.7, 1.2])
    return {
        "cross_entropy_label_3_of_3_classes": _what_cross_entropy_does(torch.tensor([0, 3, 1])),
        "cross_entropy_label_-1": _what_cross_entropy_does(torch.tensor([0, -1, 1])),
        "cross_entropy_nan_label_cast_to_long": _what_cross_entropy_does(nan_labels.long()),
        "float_labels_2.7_1.2_cast_to_long": str(float_labels.long().tolist()),
        "cross_entropy_all_ignored": _what_cross_entropy_does(torch.tensor([IGNORE, IGNORE, IGNORE])),
        "validate_labels_on_bad_labels": "; ".join(label_problems(torch.tensor([0.0, 2.7, float("nan"), 5.0, -3.0]), 3, IGNORE)),
    }


def _out_of_range_is_nan(r):
    p = r.probes
    evidence = (f"label 3 of 3 classes: {p['cross_entropy_label_3_of_3_classes']}; label -1: "
                f"{p['cross_entropy_label_-1']}; all targets ignored: {p['cross_entropy_all_ignored']}. "
                "Not measurable here: Keras/TensorFlow's behaviour, and CUDA's device-side assert (no GPU in this run)")
    raises = p["cross_entropy_label_3_of_3_classes"].startswith("raises")
    nan_path = "nan" in p["cross_entropy_all_ignored"]
    if raises and nan_path:
        return "refuted", evidence + " -> out-of-range labels raise on CPU; the NaN comes from all-ignored targets"
    return ("confirmed" if not raises else "partly"), evidence


def _validation_catches(r):
    fix = r.variant("validate_then_drop")
    problems = r.probes["validate_labels_on_bad_labels"]
    evidence = f"validate_labels found: {problems}; training after dropping flagged rows: finite={fix.finite}"
    return ("confirmed" if fix.finite and fix.learned and problems.count(";") >= 3 else "refuted"), evidence


CLAIMS = [
    Claim("Out-of-range labels give a NaN loss with sparse categorical cross-entropy.", _out_of_range_is_nan, "seed 000"),
    Claim("Validating labels before training (range, type, NaN) prevents this class of NaN.", _validation_catches,
          "seed 000"),
]
