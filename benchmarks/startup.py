"""Wall time of `python -m nanlab scenario=softmax_overflow` against the floor any
torch training script pays: `import torch` plus one torch.optim step.

Interleaved runs, median of RUNS each, measured side by side in this one process.
Target (issue 9): nanlab / floor <= 1.10. torch.optim (and TorchDispatchMode,
GradScaler, gradcheck) import torch._dynamo on first use, which `import torch`
alone does not, so `import torch` alone is shown for reference only.
"""
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = 7
TARGET = 1.10


def wall(cmd, cwd):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    py = sys.executable
    commands = {
        "import torch": [py, "-c", "import torch"],
        "import torch + one optimizer step": [py, "-c", "import torch; p = torch.zeros(1, requires_grad=True); "
                                              "p.sum().backward(); torch.optim.SGD([p], lr=0.1).step()"],
        "nanlab scenario=softmax_overflow": [py, "-m", "nanlab", "scenario=softmax_overflow", "hydra.run.dir=out"],
    }
    times = {name: [] for name in commands}
    with tempfile.TemporaryDirectory() as tmp:
        for cmd in commands.values():  # warm the file cache once
            wall(cmd, tmp)
        for _ in range(RUNS):
            for name, cmd in commands.items():
                times[name].append(wall(cmd, tmp))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["import torch"]
    for name, m in med.items():
        print(f"{name:<36} median {m:6.2f} s   ratio {m / base:5.2f}x")
    ratio = med["nanlab scenario=softmax_overflow"] / med["import torch + one optimizer step"]
    print(f"\nnanlab / (import torch + one optimizer step) = {ratio:.2f}x (target <= {TARGET}x): "
          f"{'met' if ratio <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
