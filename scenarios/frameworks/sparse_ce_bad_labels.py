"""sparse_ce_bad_labels in Keras 3 and plain JAX: the builders the lesson's FRAMEWORKS names.

Torch-free, so framework workers import it without paying for torch; the lesson
(scenarios/sparse_ce_bad_labels.py) imports its ignore_index, label cases and probe
keys from here.
"""

IGNORE = -100
CASES = {"label_3_of_3_classes": [0, 3, 1], "label_-1": [0, -1, 1], "all_ignored": [IGNORE, IGNORE, IGNORE]}


def ce_key(case: str, what: str = "") -> str:
    """Probe keys: what cross_entropy did on a case ("" for the words, "raises", "loss")."""
    return f"cross_entropy_{case}" + (f"_{what}" if what else "")


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
