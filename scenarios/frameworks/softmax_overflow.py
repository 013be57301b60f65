"""softmax_overflow in Keras 3 and plain JAX: the builders the lesson's FRAMEWORKS names.

Torch-free, so framework workers import it without paying for torch; the lesson
(scenarios/softmax_overflow.py) imports its probe row and key names from here.
"""

# The probe row: a gap of 200 between neighbouring logits, labelled with the smallest
# one, so the exact cross-entropy is 400 and any clipped probability shows at once.
PROBE_LOGITS = [200.0, 0.0, -200.0]
PROBE_LABEL = 2
KERAS_OWN = "keras_softmax_cce"


def keras_cce_key(inputs: str) -> str:
    """Probe keys for Keras' categorical_crossentropy on the probe row."""
    return f"keras_categorical_crossentropy_on_{inputs}_of_[200,0,-200]_label_{PROBE_LABEL}"


def keras_recipe(kit, data, knobs):
    """The linear classifier in Keras 3. Each torch path written with keras.ops, and
    Keras' own habit besides: a softmax output fed to categorical_crossentropy."""
    keras, ops = kit.keras, kit.ops
    classes = int(data.y.max()) + 1

    def model(data):
        return keras.Sequential([keras.Input(data.x.shape[1:]), keras.layers.Dense(classes)])

    def at_label(values, y):
        return ops.take_along_axis(values, ops.expand_dims(ops.cast(y, "int32"), -1), axis=-1)[:, 0]

    def hand_softmax(z):
        e = ops.exp(z)
        return e / ops.sum(e, axis=-1, keepdims=True)

    def hand_softmax_ce(z, y):
        return -ops.mean(ops.log(at_label(hand_softmax(z), y)))

    def log_of_softmax(z, y):
        return -ops.mean(at_label(ops.log(ops.softmax(z)), y))

    def log_softmax_as_probs(z, y):
        # probability_ce above copies what this function does: rescale, clip to
        # [1e-7, 1 - 1e-7], -log. Here it is the real thing.
        return ops.mean(keras.losses.categorical_crossentropy(ops.one_hot(y, classes), ops.log_softmax(z)))

    def on_logits(z, y):
        return ops.mean(keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True))

    def clipped_logits_ce(z, y):
        return hand_softmax_ce(ops.clip(z, -10.0, 10.0), y)

    def softmax_then_cce(z, y):
        # The softmax is the one a Dense(activation="softmax") output layer applies; it is
        # taken here rather than in the model so that the model's output stays the logits
        # the exact loss scores. On TensorFlow, Keras' softmax tags its output with the
        # logits and categorical_crossentropy uses them: that is part of what is measured.
        return ops.mean(keras.losses.categorical_crossentropy(ops.one_hot(y, classes), keras.activations.softmax(z)))

    def probes():
        z = ops.convert_to_tensor([PROBE_LOGITS])
        label = ops.one_hot(ops.convert_to_tensor([PROBE_LABEL]), len(PROBE_LOGITS))
        values = lambda t: ops.convert_to_numpy(t)[0].tolist()  # noqa: E731
        cce = keras.losses.categorical_crossentropy
        return {
            "hand_softmax_of_[200,0,-200]": values(hand_softmax(z)),
            "log_softmax_of_[200,0,-200]": values(ops.log_softmax(z)),
            "log_of_softmax_of_[200,0,-200]": values(ops.log(ops.softmax(z))),
            keras_cce_key("softmax"): values(cce(label, keras.activations.softmax(z))),
            keras_cce_key("logits"): values(cce(label, z, from_logits=True)),
        }

    variants = {
        "hand_softmax": kit.Variant(hand_softmax_ce),
        "log_of_softmax": kit.Variant(log_of_softmax),
        "log_softmax_as_probs": kit.Variant(log_softmax_as_probs),
        "cross_entropy_on_logits": kit.Variant(on_logits),
        "clip_logits_10": kit.Variant(clipped_logits_ce),
        KERAS_OWN: kit.Variant(softmax_then_cce, role="myth",
                               summary="softmax output fed to keras.losses.categorical_crossentropy, the pairing "
                                       "Keras tutorials write"),
    }
    return kit.Recipe(model, variants, probes)


def jax_recipe(kit, data, knobs):
    """The linear classifier in plain JAX, each torch path written with jax.numpy;
    the log-sum-exp path is jax.nn.log_softmax, as optax's cross-entropy uses it."""
    jax, jnp = kit.jax, kit.jnp
    classes = int(data.y.max()) + 1

    def model(data):
        d = data.x.shape[1]
        return kit.JaxModel(lambda key, x: kit.dense(key, d, classes), lambda p, x: x @ p["kernel"] + p["bias"])

    def at_label(values, y):
        return jnp.take_along_axis(values, y[:, None], axis=-1)[:, 0]

    def hand_softmax(z):
        e = jnp.exp(z)
        return e / e.sum(-1, keepdims=True)

    def hand_softmax_ce(z, y):
        return -jnp.log(at_label(hand_softmax(z), y)).mean()

    def log_of_softmax(z, y):
        return -at_label(jnp.log(jax.nn.softmax(z)), y).mean()

    def log_softmax_as_probs(z, y, eps=1e-7):
        probs = jax.nn.log_softmax(z)
        probs = probs / probs.sum(-1, keepdims=True)
        return -jnp.log(at_label(jnp.clip(probs, eps, 1 - eps), y)).mean()

    def on_logits(z, y):
        return -at_label(jax.nn.log_softmax(z), y).mean()

    def clipped_logits_ce(z, y):
        return hand_softmax_ce(jnp.clip(z, -10.0, 10.0), y)

    def probes():
        z = jnp.asarray([PROBE_LOGITS], jnp.float32)
        return {
            "hand_softmax_of_[200,0,-200]": hand_softmax(z)[0].tolist(),
            "log_softmax_of_[200,0,-200]": jax.nn.log_softmax(z)[0].tolist(),
            "log_of_softmax_of_[200,0,-200]": jnp.log(jax.nn.softmax(z))[0].tolist(),
        }

    variants = {"hand_softmax": kit.Variant(hand_softmax_ce), "log_of_softmax": kit.Variant(log_of_softmax),
                "log_softmax_as_probs": kit.Variant(log_softmax_as_probs),
                "cross_entropy_on_logits": kit.Variant(on_logits), "clip_logits_10": kit.Variant(clipped_logits_ce)}
    return kit.Recipe(model, variants, probes)
