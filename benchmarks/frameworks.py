"""What a framework run costs beyond Keras' own import, against a plain Keras `fit`.

For each Keras backend, two processes train tanh_explosion's five variants (the same
data, models, optimizers and 200 full-batch epochs), interleaved, median of RUNS:

- plain: the script a Keras user writes, `model.fit(..., callbacks=[TerminateOnNaN()])`
  per variant, then one `predict`;
- nanlab: the framework worker (`python -m nanlab.frameworks.worker`) on the request
  the parent writes for `python -m nanlab scenario=tanh_explosion framework=...`:
  it also records every step's loss, keeps the weights from before each epoch, takes
  the outputs before and after training, and on keras-torch traces the failing step.

Both report the seconds after `import keras`; the ratio compares those.
Target (issue 13): nanlab / plain <= 1.2. The end-to-end wall time of the CLI (which
also imports torch and Hydra in the parent) is printed for reference.
"""
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 3
TARGET = 1.2
SCENARIO = "tanh_explosion"
BACKENDS = ("keras-torch", "keras-jax", "keras-tensorflow")

# The plain Keras script: the variants of tanh_explosion as a user would write them.
PLAIN = r'''
import json, sys, time
import numpy as np
started = time.perf_counter()
import keras
imported = time.perf_counter()
arrays = np.load(sys.argv[1])
x, x_std, y = arrays["x"].astype("float32"), arrays["x_std"].astype("float32"), arrays["y"].astype("float32")
runs = {"sgd_large_lr": (x, keras.optimizers.SGD, dict(learning_rate=0.2)),
        "clip_norm_1": (x, keras.optimizers.SGD, dict(learning_rate=0.2, global_clipnorm=1.0)),
        "standardized": (x_std, keras.optimizers.SGD, dict(learning_rate=0.2)),
        "lr_10x_lower": (x, keras.optimizers.SGD, dict(learning_rate=0.02)),
        "adam_1e-3": (x, keras.optimizers.Adam, dict(learning_rate=1e-3, epsilon=1e-8))}
for name, (inputs, optimizer, settings) in runs.items():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(inputs.shape[1:]), keras.layers.Dense(64, activation="tanh"),
                              keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer(**settings), loss="mse")
    model.fit(inputs, y, batch_size=len(inputs), epochs=200, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.TerminateOnNaN()])
    model.predict(inputs, batch_size=len(inputs), verbose=0)
print(json.dumps({"import_seconds": imported - started, "seconds": time.perf_counter() - started}))
'''


def plain_run(framework, arrays, env):
    done = subprocess.run([sys.executable, "-c", PLAIN, str(arrays)], env=env, capture_output=True, text=True,
                          check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["seconds"] - report["import_seconds"]


def nanlab_run(framework, request, folder):
    from nanlab.frameworks.run import finish_worker, start_worker

    sub = Path(tempfile.mkdtemp(dir=folder))
    response, _ = finish_worker(framework, start_worker(framework, request, sub), sub)
    return response["seconds"] - response["import_seconds"]


def cli_run(framework, folder):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nanlab", f"scenario={SCENARIO}", f"framework={framework}",
                    f"hydra.run.dir={folder}/cli"], check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    import numpy as np

    from nanlab import frameworks
    from nanlab.config.compose import compose
    from nanlab.frameworks.run import _request, prepare_job, worker_env

    missing = [f for f in BACKENDS if not frameworks.installed(f)]
    if missing:
        sys.exit(f"benchmarks/frameworks.py: {', '.join(missing)} not installed: "
                 + "; ".join(frameworks.install_hint(f) for f in missing))
    job = prepare_job(compose([f"scenario={SCENARIO}"]))
    raw = job.raw
    standardized = next(prepared for variant, prepared, _, _ in job.specs if variant.name == "standardized")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        arrays = folder / "plain.npz"
        np.savez(arrays, x=raw.x.numpy(), x_std=standardized.x.numpy(), y=raw.y.numpy())
        (folder / "request").mkdir()
        request = _request([job], folder / "request")
        rows = []
        for framework in BACKENDS:
            env = worker_env(framework)
            plain_run(framework, arrays, env)  # warm the file cache once
            plain, ours = [], []
            for _ in range(RUNS):
                plain.append(plain_run(framework, arrays, env))
                ours.append(nanlab_run(framework, request, folder))
            cli = cli_run(framework, folder)
            rows.append((framework, statistics.median(plain), statistics.median(ours), cli))
    print(f"{SCENARIO}: 5 variants x 200 full-batch epochs; seconds after `import keras`, median of {RUNS}\n")
    print(f"{'framework':<18} {'plain fit':>10} {'nanlab':>10} {'ratio':>7}   CLI end to end")
    for framework, plain, ours, cli in rows:
        verdict = "met" if ours / plain <= TARGET else "MISSED"
        print(f"{framework:<18} {plain:9.2f}s {ours:9.2f}s {ours / plain:6.2f}x   {cli:.1f} s   "
              f"(target <= {TARGET}x: {verdict})")


if __name__ == "__main__":
    main()
