"""bce_log_zero in Keras 3 and plain JAX: the builders the lesson's FRAMEWORKS names.

Torch-free, so framework workers import it without paying for torch; the lesson
(scenarios/bce_log_zero.py) imports its probe points and key names from here.
torch_bce_on_probs is torch's own function and has no counterpart here; Keras' own
probability BCE is a variant of its own.
"""

# Wrong examples (label 1) at these logits: barely, well past the clamp, and past
# sigmoid's float32 underflow. The torch probes and the builders' probes both use them.
PROBE_LOGITS = (-5.0, -30.0, -120.0)
KERAS_OWN = "keras_bce_on_probs"


def grad_key(loss_name: str, z: float) -> str:
    return f"dloss/dlogit_{loss_name}_at_z={z:g}"


def keras_grad(kit, loss, z: float, y: float) -> float:
    """d loss / d logit at one logit, by the Keras backend's own autodiff: keras.ops has
    no gradient, and the backend's is what a Keras fit would use."""
    backend, ops = __import__(kit.backend), kit.ops
    target = ops.convert_to_tensor([y], "float32")
    logit = ops.convert_to_tensor([z], "float32")
    if kit.backend == "jax":
        return float(backend.grad(lambda t: loss(t, target))(logit)[0])
    if kit.backend == "tensorflow":
        with backend.GradientTape() as tape:
            tape.watch(logit)
            value = loss(logit, target)
        return float(tape.gradient(value, logit)[0])
    logit.requires_grad_(True)  # torch: the tensor is a fresh leaf
    loss(logit, target).backward()
    return float(logit.grad[0])


def keras_recipe(kit, data, knobs):
    """Logistic regression in Keras 3: the torch losses written with keras.ops, BCE on
    logits from Keras' own binary_crossentropy, and Keras' probability BCE besides."""
    keras, ops = kit.keras, kit.ops

    def model(data):
        inputs = keras.Input(data.x.shape[1:])
        return keras.Model(inputs, ops.squeeze(keras.layers.Dense(1)(inputs), -1))  # logits, as the torch model

    def hand(p, y):
        return -ops.mean(y * ops.log(p) + (1 - y) * ops.log(1 - p))

    def hand_on_sigmoid(z, y):
        return hand(ops.sigmoid(z), y)

    def clamped(z, y, eps=1e-7):
        return hand(ops.clip(ops.sigmoid(z), eps, 1 - eps), y)

    def with_logits(z, y):
        return keras.losses.binary_crossentropy(y, z, from_logits=True)  # rank 1: the mean over examples

    def keras_on_probs(z, y):
        # What a Dense(1, activation="sigmoid") output with loss="binary_crossentropy"
        # computes; the sigmoid is taken here so that the model's output stays the logits
        # the exact loss scores. On TensorFlow, Keras' sigmoid tags its output with the
        # logits and the loss uses them: that is part of what is measured.
        return keras.losses.binary_crossentropy(y, keras.activations.sigmoid(z))

    def probes():
        losses = {"hand": hand_on_sigmoid, "clamp_1e-7": clamped, "with_logits": with_logits,
                  "keras_bce": keras_on_probs}
        return {grad_key(name, z): keras_grad(kit, fn, z, 1.0) for z in PROBE_LOGITS for name, fn in losses.items()}

    variants = {
        "hand_bce": kit.Variant(hand_on_sigmoid),
        "clamp_eps_1e-7": kit.Variant(clamped),
        "bce_with_logits": kit.Variant(with_logits),
        KERAS_OWN: kit.Variant(keras_on_probs, role="fix", lossy=True,
                               summary="sigmoid output fed to keras.losses.binary_crossentropy, the pairing "
                                       "Keras tutorials write"),
    }
    return kit.Recipe(model, variants, probes)


def jax_recipe(kit, data, knobs):
    """Logistic regression in plain JAX, the torch losses written with jax.numpy; BCE
    on logits through jax.nn.log_sigmoid, as optax's sigmoid cross-entropy does."""
    jax, jnp = kit.jax, kit.jnp

    def model(data):
        d = data.x.shape[1]
        return kit.JaxModel(lambda key, x: kit.dense(key, d, 1), lambda p, x: (x @ p["kernel"] + p["bias"])[:, 0])

    def hand(p, y):
        return -(y * jnp.log(p) + (1 - y) * jnp.log(1 - p)).mean()

    def hand_on_sigmoid(z, y):
        return hand(jax.nn.sigmoid(z), y)

    def clamped(z, y, eps=1e-7):
        return hand(jnp.clip(jax.nn.sigmoid(z), eps, 1 - eps), y)

    def with_logits(z, y):
        return -(y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z)).mean()

    def probes():
        losses = {"hand": hand_on_sigmoid, "clamp_1e-7": clamped, "with_logits": with_logits}
        y = jnp.ones((1,), jnp.float32)
        return {grad_key(name, z): float(jax.grad(lambda t, fn=fn: fn(t, y))(jnp.asarray([z], jnp.float32))[0])
                for z in PROBE_LOGITS for name, fn in losses.items()}

    variants = {"hand_bce": kit.Variant(hand_on_sigmoid), "clamp_eps_1e-7": kit.Variant(clamped),
                "bce_with_logits": kit.Variant(with_logits)}
    return kit.Recipe(model, variants, probes)
