"""tanh_explosion in Keras 3 and plain JAX: the builders the lesson's FRAMEWORKS names.

Torch-free, so framework workers import it without paying for torch. Each variant's
data (standardize) and settings (clipping, lr / 10, Adam) come from the torch variant
of the same name; a builder writes only the MLP and the MSE.
"""

# Every torch variant, by name: none needs a model or loss of its own.
FRAMEWORK_VARIANTS = ("sgd_large_lr", "clip_norm_1", "standardized", "lr_10x_lower", "adam_1e-3")


def keras_recipe(kit, data, knobs):
    """The tanh MLP as Keras layers, at Keras' own initialization (Glorot uniform)."""
    keras, ops = kit.keras, kit.ops
    width = int(knobs.width)

    def model(data):
        return keras.Sequential([keras.Input(data.x.shape[1:]), keras.layers.Dense(width, activation="tanh"),
                                 keras.layers.Dense(width, activation="tanh"), keras.layers.Dense(1)])

    def mse(pred, y):
        return ops.mean(ops.square(pred - y))

    return kit.Recipe(model, {name: kit.Variant(mse) for name in FRAMEWORK_VARIANTS})


def jax_recipe(kit, data, knobs):
    """The tanh MLP as plain JAX functions, initialized as flax's Dense (LeCun normal)."""
    jax, jnp = kit.jax, kit.jnp
    width = int(knobs.width)

    def model(data):
        sizes = [data.x.shape[1], width, width, 1]

        def init(key, x):
            keys = jax.random.split(key, len(sizes) - 1)
            return [kit.dense(k, d_in, d_out) for k, d_in, d_out in zip(keys, sizes[:-1], sizes[1:])]

        def apply(params, x):
            *hidden, last = params
            for layer in hidden:
                x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
            return x @ last["kernel"] + last["bias"]

        return kit.JaxModel(init, apply)

    def mse(pred, y):
        return jnp.mean(jnp.square(pred - y))

    return kit.Recipe(model, {name: kit.Variant(mse) for name in FRAMEWORK_VARIANTS})
