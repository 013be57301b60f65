"""Wall time of `python -m nanlab scenario=softmax_overflow` against the floor any
torch training script pays: `import torch` plus one torch.optim step.

Interleaved runs, median of --runs (default 7) each, measured side by side in this one process.
Target (issue 9): nanlab / floor <= 1.10. torch.optim (and TorchDispatchMode,
GradScaler, gradcheck) import torch._dynamo on first use, which `import torch`
alone does not, so `import torch` alone is shown for reference only.

A bare Hydra app (no config of its own) whose task is that same floor is timed
beside them: what any Hydra CLI pays before it does anything of its own (importing
Hydra, composing its config twice, as Hydra 1.3 does, and creating the run dir).
The rest, nanlab over the bare app, is nanlab's own: its config, its imports, and
training five variants under the guard.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 7
TARGET = 1.10
FLOOR = ("import torch; p = torch.zeros(1, requires_grad=True); p.sum().backward(); "
         "torch.optim.SGD([p], lr=0.1).step()")
BARE_HYDRA_APP = f"""import hydra


@hydra.main(version_base="1.3", config_path=None)
def app(cfg):
    {FLOOR}


app()
"""


def wall(cmd, cwd):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=RUNS, help=f"runs of each command; the median is reported "
                        f"(default {RUNS})")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"argument --runs: '{args.runs}' is not a whole number >= 1")
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        bare_app = Path(tmp) / "bare_hydra_app.py"
        bare_app.write_text(BARE_HYDRA_APP)
        commands = {
            "import torch": [py, "-c", "import torch"],
            "import torch + one optimizer step": [py, "-c", FLOOR],
            "bare Hydra app, task = the floor": [py, str(bare_app), "hydra.run.dir=bare"],
            "nanlab scenario=softmax_overflow": [py, "-m", "nanlab", "scenario=softmax_overflow", "hydra.run.dir=out"],
        }
        times = {name: [] for name in commands}
        for cmd in commands.values():  # warm the file cache once
            wall(cmd, tmp)
        for _ in range(args.runs):
            for name, cmd in commands.items():
                times[name].append(wall(cmd, tmp))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    floor = med["import torch + one optimizer step"]
    for name, m in med.items():
        print(f"{name:<36} median {m:6.2f} s   {m / floor:5.2f}x the floor")
    nanlab, bare = med["nanlab scenario=softmax_overflow"], med["bare Hydra app, task = the floor"]
    ratio = nanlab / floor
    print(f"\nnanlab / (import torch + one optimizer step) = {ratio:.2f}x (target <= {TARGET}x): "
          f"{'met' if ratio <= TARGET else 'MISSED'}")
    print(f"of which a bare Hydra app pays {bare - floor:+.2f} s ({bare / floor:.2f}x the floor), "
          f"and nanlab's own config, imports and training {nanlab - bare:+.2f} s")


if __name__ == "__main__":
    main()
