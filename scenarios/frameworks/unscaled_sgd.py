"""unscaled_sgd in Keras 3 and plain JAX: the builders the lesson's FRAMEWORKS names.

Torch-free, so framework workers import it without paying for torch; the lesson
(scenarios/unscaled_sgd.py) imports the probe's run length and key names from here.
The torch variants' data (standardize) and settings (the lr below critical) come with
their names; a builder writes only the linear model and the MSE.
"""

CRITICAL_LR = "critical_lr"
PROBE_STEPS = 300  # how long the runs around the critical lr train, torch's probe and the builders' variants alike


def critical_variant(factor: float) -> str:
    """The name of another framework's run at ``factor`` x the critical lr (see the builders below)."""
    return f"lr_{factor}x_critical"


def numpy_lambda_max(np, x) -> float:
    """hessian_max_eigenvalue in numpy, for workers without torch."""
    xa = np.hstack([np.asarray(x, dtype=np.float64), np.ones((len(x), 1))])
    return float(np.linalg.eigvalsh(2.0 / len(x) * xa.T @ xa).max())


def framework_variants(kit, data, loss) -> tuple[dict, dict]:
    """The torch variants, plus the torch probe's two runs around the critical lr as
    variants: a worker's probes cannot train, its variants can. Below it is a fix; above
    it is the same failure as raw_features. Also the probes the claim reads with them."""
    lambda_max = numpy_lambda_max(kit.np, data.x)
    critical = 2.0 / lambda_max
    variants = {name: kit.Variant(loss) for name in ("raw_features", "standardized", "lr_below_critical")}
    for factor, role, said in ((0.9, "fix", "below"), (1.1, "broken", "above")):
        variants[critical_variant(factor)] = kit.Variant(
            loss, role=role, summary=f"raw features, lr = {factor} x the critical 2/lambda_max, just {said} it "
                                     f"({PROBE_STEPS} steps, as torch's probe)",
            overrides={"optimizer.lr": factor * critical, "steps": PROBE_STEPS})
    return variants, {"lambda_max": lambda_max, CRITICAL_LR: critical}


def keras_recipe(kit, data, knobs):
    """The linear model as one Keras Dense layer, at Keras' own initialization."""
    keras, ops = kit.keras, kit.ops

    def model(data):
        return keras.Sequential([keras.Input(data.x.shape[1:]), keras.layers.Dense(1)])

    def mse(pred, y):
        return ops.mean(ops.square(pred - y))

    variants, probed = framework_variants(kit, data, mse)
    return kit.Recipe(model, variants, lambda: probed)


def jax_recipe(kit, data, knobs):
    """The linear model as a plain JAX function, initialized as flax's Dense."""
    jnp = kit.jnp

    def model(data):
        d = data.x.shape[1]
        return kit.JaxModel(lambda key, x: kit.dense(key, d, 1), lambda p, x: x @ p["kernel"] + p["bias"])

    def mse(pred, y):
        return jnp.mean(jnp.square(pred - y))

    variants, probed = framework_variants(kit, data, mse)
    return kit.Recipe(model, variants, lambda: probed)
