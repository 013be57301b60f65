"""masked_softmax in Keras 3 and plain JAX: the builders the lesson's FRAMEWORKS names.

Torch-free, so framework workers import it without paying for torch; the lesson
(scenarios/masked_softmax.py) imports its probe mask and key names from here. Keras
and JAX each ship a masked softmax of their own; it is a variant here, because what
it does with an empty row is the framework's choice.
"""

PARTLY_MASKED_DIFFERENCE, FULLY_MASKED_IS_NAN = "partly_masked_rows_max_difference", "fully_masked_row_plain_is_nan"
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
