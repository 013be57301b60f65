"""``python -m nanlab.frameworks.worker REQUEST OUT_DIR``: one framework, one process.

The parent (:mod:`nanlab.frameworks.run`) writes a request: the framework, and per
scenario the data each variant trains on (numpy arrays, already prepared the way
the torch variant prepares them) and its settings. This process imports only that
framework (KERAS_BACKEND is in its environment before keras is imported), builds
each scenario's recipe with the builder its ``FRAMEWORKS`` names (imported from a
torch-free module; the scenario module itself is never imported here), trains every variant full-batch
for ``steps`` steps, and writes back the training loss of every step, where it first
went non-finite, and the model's outputs before training and at the end. The parent
scores those outputs with the scenario's float64 exact loss.

On keras-torch the model is a torch module, so the step that first went non-finite is
replayed under nanlab's tracer to name the op; other frameworks are not traced.
"""
from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np

from nanlab import frameworks
from nanlab.frameworks import recipe as recipe_api
from nanlab.config.options import CLIP_NORM_EPS, FRAMEWORKS, OPTIMIZERS


def _set(settings: dict, dotted: str, value) -> None:
    node = settings
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _with_overrides(settings: dict, overrides: dict) -> dict:
    out = json.loads(json.dumps(settings))
    for key, value in overrides.items():
        _set(out, key, value)
    return out


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


# ---------------------------------------------------------------- Keras

# Keras' argument for each key of the optimizer table (options.OPTIMIZERS): its settings
# and torch's constants. A key missing here stops the run, rather than leaving Keras at
# its own default where torch would use the table's value.
KERAS_ARGUMENTS = {"momentum": "momentum", "eps": "epsilon", "weight_decay": "weight_decay",
                   "betas": ("beta_1", "beta_2"), "alpha": "rho"}

class KerasTrainer:
    """Keras' own ``fit``: full batch, one batch per epoch, so epoch k is step k."""

    def __init__(self, framework: str):
        import keras

        self.framework, self.keras = framework, keras
        self.backend = keras.backend.backend()
        if self.backend == "torch":
            import torch

            torch.set_num_threads(1)  # tiny models: threads only add noise and nondeterminism

    def kit(self):
        keras = self.keras
        return types.SimpleNamespace(keras=keras, ops=keras.ops, np=np, backend=self.backend,
                                     framework=self.framework, Recipe=recipe_api.Recipe,
                                     Variant=recipe_api.FrameworkVariant, call_outcome=recipe_api.call_outcome)

    def optimizer(self, settings: dict):
        """The Keras optimizer of the same name, given every key the table says torch's
        reads. Keras' RMSprop still adds eps inside the square root, torch outside it."""
        opt, clip, keras = settings["optimizer"], settings["clip"], self.keras
        option = OPTIMIZERS[opt["name"]]
        arguments = {"learning_rate": opt["lr"]}
        if clip["name"] == "norm":
            arguments["global_clipnorm"] = clip["threshold"]  # torch's clip_grad_norm_: one norm over all gradients
        elif clip["name"] == "value":
            arguments["clipvalue"] = clip["threshold"]
        for key, value in {**{key: opt[key] for key in option.keys}, **option.constants}.items():
            if key == "weight_decay" and not value:
                continue  # Keras decays by any weight_decay it is given, 0 too (x - x * 0 is NaN at an inf weight)
            if key not in KERAS_ARGUMENTS:
                raise ValueError(f"optimizer {opt['name']}: the Keras worker has no argument for {key!r}")
            name = KERAS_ARGUMENTS[key]
            arguments.update(zip(name, value) if isinstance(name, tuple) else [(name, value)])
        return getattr(keras.optimizers, option.torch_class)(**arguments)  # Keras names its classes as torch does

    def _loss(self, fn):
        keras = self.keras

        class RecipeLoss(keras.losses.Loss):
            """The recipe's loss as written: Keras' Loss.__call__ would cast integer
            labels to the output's float dtype and reshape them first."""

            def __call__(self, y_true, y_pred, sample_weight=None):
                return fn(y_pred, y_true)

            def call(self, y_true, y_pred):
                return fn(y_pred, y_true)

        return RecipeLoss(name="recipe_loss")

    def _build(self, recipe, variant, data, settings):
        self.keras.utils.set_random_seed(int(settings["seed"]))
        model = (variant.model or recipe.model)(data)
        model.compile(optimizer=self.optimizer(settings), loss=self._loss(variant.loss))
        return model

    def _fit(self, model, x, y, epochs: int):
        """Keras' fit, stopped at the first non-finite loss. Returns the losses and the
        weights from before the last epoch: by the time a callback sees an epoch's loss,
        Keras has already applied that epoch's update."""
        keras = self.keras
        losses, before = [], {}

        class Watch(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                before["weights"] = self.model.get_weights()  # tiny models: a copy costs microseconds

            def on_epoch_end(self, epoch, logs=None):
                losses.append(float(logs["loss"]))
                if not math.isfinite(losses[-1]):
                    self.model.stop_training = True

        if epochs <= 0:
            return losses, None
        if self.backend == "tensorflow":
            # From numpy arrays, Keras on TensorFlow builds a new input pipeline every
            # epoch (about 35 ms, 200 epochs in 7 s); one repeated full batch gives the
            # same losses, bit for bit, in 0.4 s.
            import tensorflow as tf

            batches = tf.data.Dataset.from_tensors((x, y)).repeat()
            model.fit(batches, steps_per_epoch=1, epochs=epochs, verbose=0, callbacks=[Watch()])
        else:
            model.fit(x, y, batch_size=len(x), epochs=epochs, shuffle=False, verbose=0, callbacks=[Watch()])
        return losses, before.get("weights")

    def _output(self, model, x) -> np.ndarray:
        return np.asarray(self.keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)

    def train(self, recipe, variant, data, settings) -> dict:
        x, y = data.x.astype(settings["dtype"]), data.y
        y = y.astype(settings["dtype"]) if y.dtype.kind == "f" else y
        model = self._build(recipe, variant, data, settings)
        start = self._output(model, x)
        fit_started = time.perf_counter()
        losses, weights_before_last = self._fit(model, x, y, int(settings["steps"]))
        fit_seconds = time.perf_counter() - fit_started
        first, event = None, None
        if losses and not _finite(losses[-1]):
            # Back to the weights before the failing step: the end state nanlab's own loop
            # reports, and on keras-torch the state to trace the failing step from.
            model.set_weights(weights_before_last)
            if self.backend == "torch":
                event = self._trace(model, variant.loss, x, y)
            first = {"step": len(losses) - 1, "quantity": "loss", "loss": losses[-1], "event": event}
        return {"losses": losses, "first_nonfinite": first, "output_start": start,
                "output_end": self._output(model, x), "fit_seconds": fit_seconds}

    def _trace(self, model, loss_fn, x, y):
        """The failing step's forward and backward under nanlab's tracer: a Keras model
        on the torch backend is a torch.nn.Module, and its ops are aten ops."""
        from nanlab.debug.tracer import replay

        ops = self.keras.ops
        xt, yt = ops.convert_to_tensor(x), ops.convert_to_tensor(y)

        def step():
            loss = loss_fn(model(xt, training=True), yt)
            loss.backward()
            return loss

        seen = replay(step, watch=(model,))
        return seen.first.to_dict() if seen.first is not None else None


# ---------------------------------------------------------------- plain JAX

class JaxTrainer:
    """A jitted full-batch step: value_and_grad, clipping, and the optimizer written
    out as torch.optim computes it, so that only the framework differs."""

    def __init__(self, framework: str):
        import jax

        self.framework, self.jax = framework, jax

    def kit(self):
        jax = self.jax
        return types.SimpleNamespace(jax=jax, jnp=jax.numpy, np=np, framework=self.framework,
                                     Recipe=recipe_api.Recipe, Variant=recipe_api.FrameworkVariant,
                                     JaxModel=recipe_api.JaxModel, dense=self.dense,
                                     call_outcome=recipe_api.call_outcome)

    def dense(self, key, d_in: int, d_out: int):
        """A dense layer's parameters, initialized as flax's Dense is: LeCun-normal
        kernel (truncated normal, variance 1/d_in), zero bias."""
        jnp = self.jax.numpy
        init = self.jax.nn.initializers.lecun_normal()
        return {"kernel": init(key, (d_in, d_out), jnp.float32), "bias": jnp.zeros((d_out,), jnp.float32)}

    def _optimizer(self, settings: dict):
        """(init, update) for the table's optimizer (options.OPTIMIZERS), its settings and
        torch's constants read from the table; each update is torch.optim's, written out."""
        jax, opt, clip = self.jax, settings["optimizer"], settings["clip"]
        jnp, tree = jax.numpy, jax.tree_util
        constants = OPTIMIZERS[opt["name"]].constants
        lr, wd = opt["lr"], opt["weight_decay"]

        def clipped(grads):
            if clip["name"] == "norm":
                total = jnp.sqrt(sum(jnp.sum(g * g) for g in tree.tree_leaves(grads)))
                scale = jnp.minimum(1.0, clip["threshold"] / (total + CLIP_NORM_EPS))  # as torch's clip_grad_norm_
                return tree.tree_map(lambda g: g * scale, grads)
            if clip["name"] == "value":
                return tree.tree_map(lambda g: jnp.clip(g, -clip["threshold"], clip["threshold"]), grads)
            return grads

        def decayed(params, grads):
            return tree.tree_map(lambda p, g: g + wd * p, params, grads) if wd else grads

        zeros = lambda params: tree.tree_map(jnp.zeros_like, params)  # noqa: E731
        if opt["name"] == "sgd":
            momentum = opt["momentum"]

            def update(params, grads, state):
                grads = decayed(params, clipped(grads))
                buf = tree.tree_map(lambda b, g: momentum * b + g, state, grads) if momentum else grads
                return tree.tree_map(lambda p, b: p - lr * b, params, buf), buf

            return zeros, update
        if opt["name"] == "adam":
            (b1, b2), eps = constants["betas"], opt["eps"]

            def update(params, grads, state):
                m, v, t = state
                grads = decayed(params, clipped(grads))
                t = t + 1
                m = tree.tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
                v = tree.tree_map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, grads)
                c1, c2 = 1 - b1 ** t, 1 - b2 ** t
                new = tree.tree_map(lambda p, m_, v_: p - lr * (m_ / c1) / (jnp.sqrt(v_ / c2) + eps), params, m, v)
                return new, (m, v, t)

            return (lambda params: (zeros(params), zeros(params), jnp.zeros((), jnp.float32))), update
        if opt["name"] == "rmsprop":
            # No momentum here: run.check_settings refuses rmsprop momentum for JAX.
            alpha, eps = constants["alpha"], opt["eps"]

            def update(params, grads, state):
                grads = decayed(params, clipped(grads))
                state = tree.tree_map(lambda s, g: alpha * s + (1 - alpha) * g * g, state, grads)
                return tree.tree_map(lambda p, g, s: p - lr * g / (jnp.sqrt(s) + eps), params, grads, state), state

            return zeros, update
        raise ValueError(f"optimizer {opt['name']} has no JAX counterpart here")

    def train(self, recipe, variant, data, settings) -> dict:
        jax = self.jax
        jnp = jax.numpy
        x = jnp.asarray(data.x, dtype=settings["dtype"])
        y = jnp.asarray(data.y, dtype=settings["dtype"]) if data.y.dtype.kind == "f" else jnp.asarray(data.y)
        model = variant.model(data) if variant.model else recipe.model(data)
        params = model.init(jax.random.PRNGKey(int(settings["seed"])), x)
        if settings["dtype"] != "float32":
            params = jax.tree_util.tree_map(lambda p: p.astype(settings["dtype"]), params)
        init_state, update = self._optimizer(settings)
        state = init_state(params)

        def objective(p):
            return variant.loss(model.apply(p, x), y)

        @jax.jit
        def step(p, s):
            loss, grads = jax.value_and_grad(objective)(p)
            new_p, new_s = update(p, grads, s)
            return new_p, new_s, loss

        start = np.asarray(model.apply(params, x), dtype=np.float64)
        losses, first = [], None
        fit_started = time.perf_counter()
        for i in range(int(settings["steps"])):
            new_params, new_state, loss = step(params, state)
            losses.append(float(loss))
            if not math.isfinite(losses[-1]):
                # Keep the parameters from before the failing step, as nanlab's loop does.
                first = {"step": i, "quantity": "loss", "loss": losses[-1], "event": None}
                break
            params, state = new_params, new_state
        fit_seconds = time.perf_counter() - fit_started
        return {"losses": losses, "first_nonfinite": first, "output_start": start,
                "output_end": np.asarray(model.apply(params, x), dtype=np.float64), "fit_seconds": fit_seconds}


# ---------------------------------------------------------------- the request

# Every framework this process may load, in the order a result lists them.
FRAMEWORK_MODULES = ("keras", "torch", "tensorflow", "jax", "jaxlib")


def own_modules(framework: str) -> set:
    """The frameworks a worker for ``framework`` runs: Keras, its backend, JAX's jaxlib."""
    option = FRAMEWORKS[framework]
    own = {*option.modules, *filter(None, [option.keras_backend])}
    return own | {"jaxlib"} if "jax" in own else own


def loaded_versions() -> dict:
    """The version of every framework loaded in this process: its own, and any other a
    library pulled in (which the tests check never happens: seconds of import for nothing)."""
    return {name: sys.modules[name].__version__ for name in FRAMEWORK_MODULES if sys.modules.get(name) is not None}


def worker_trainer(framework: str):
    """The framework's trainer, for a worker process: from now on it loads no other framework.
    Keras imports every one it finds installed (JAX for a checkpoint callback,
    TensorFlow to seed it), seconds of CPU each where none of their ops run."""
    for name in set(FRAMEWORK_MODULES) - own_modules(framework):
        sys.modules.setdefault(name, None)
    return KerasTrainer(framework) if FRAMEWORKS[framework].family == "keras" else JaxTrainer(framework)


def _run_job(trainer, family: str, job: dict, arrays, outputs: dict) -> dict:
    name, started_job = job["scenario"], time.perf_counter()
    extra = {key: arrays[path] for key, path in job["raw"].get("extra", {}).items()}
    raw = types.SimpleNamespace(x=arrays[job["raw"]["x"]], y=arrays[job["raw"]["y"]], extra=extra)
    recipe = frameworks.builder(name, family)(trainer.kit(), raw, types.SimpleNamespace(**job["knobs"]))
    torch_variants = {v["name"]: v for v in job["variants"]}
    wanted = job.get("only")
    results = []
    for vname, variant in recipe.variants.items():
        if wanted is not None and vname not in wanted:
            continue
        if variant.like is not None and variant.like not in torch_variants:
            raise ValueError(f"{family} variant {vname!r} is like={variant.like!r}, which is not a variant of {name}")
        spec = torch_variants.get(vname) or torch_variants.get(variant.like or "")
        if vname not in torch_variants and (variant.role is None or variant.summary is None):
            raise ValueError(f"{family} variant {vname!r} is not a variant of {name}: give it a role and a summary")
        spec = spec or {"name": vname, "x": job["raw"]["x"], "y": job["raw"]["y"], "settings": job["settings"],
                        "role": None, "summary": None, "lossy": False, "overrides": {}}
        settings = _with_overrides(spec["settings"], dict(variant.overrides))
        data = types.SimpleNamespace(x=arrays[spec["x"]], y=arrays[spec["y"]], extra=extra)
        started = time.perf_counter()
        measured = trainer.train(recipe, variant, data, settings)
        key = f"{name}/{vname}"
        outputs[f"{key}/start"], outputs[f"{key}/end"] = measured.pop("output_start"), measured.pop("output_end")
        own = vname in torch_variants
        results.append({
            "name": vname, "role": spec["role"] if own else variant.role,
            "summary": spec["summary"] if own else variant.summary,
            "lossy": spec["lossy"] if own else variant.lossy,
            "overrides": {**(spec["overrides"] if own or variant.like else {}), **dict(variant.overrides)},
            "target": spec["y"], "output": key, "seconds": time.perf_counter() - started, **measured,
        })
    probes = recipe.probes() if recipe.probes and job.get("probes", True) else {}
    return {"scenario": name, "variants": results, "probes": probes, "seconds": time.perf_counter() - started_job}


def main(argv=None) -> int:
    request_path, out_dir = (argv or sys.argv[1:])[:2]
    started = time.perf_counter()
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    framework = request["framework"]
    trainer = worker_trainer(framework)  # imports the framework
    imported = time.perf_counter() - started
    arrays = np.load(request["arrays"], allow_pickle=False)
    outputs, jobs = {}, []
    for job in request["jobs"]:
        try:
            jobs.append(_run_job(trainer, FRAMEWORKS[framework].family, job, arrays, outputs))
        except Exception as err:  # noqa: BLE001 - reported to the parent as one line for this scenario
            message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            jobs.append({"scenario": job["scenario"], "error": f"{type(err).__name__}: {message}"})
    out = Path(out_dir)
    np.savez(out / "outputs.npz", **outputs)
    response = {"framework": framework, "versions": loaded_versions(), "import_seconds": imported,
                "seconds": time.perf_counter() - started, "jobs": jobs}
    (out / "response.json").write_text(json.dumps(response), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
