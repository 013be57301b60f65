"""Wall time of `python -m nanlab scenario=softmax_overflow` against `python -c "import torch"`.

Interleaved runs, median of 5 each, measured side by side in this one process.
Target (issue 2): ratio <= 1.25. A third command shows what torch itself costs once
an optimizer steps: torch.optim (and TorchDispatchMode, GradScaler, gradcheck)
import torch._dynamo on first use, which `import torch` alone does not.
"""
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = 5
TARGET = 1.25


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
    ratio = med["nanlab scenario=softmax_overflow"] / base
    print(f"\nnanlab / import torch = {ratio:.2f}x (target <= {TARGET}x): {'met' if ratio <= TARGET else 'MISSED'}")
    print(f"nanlab / (import torch + one optimizer step) = "
          f"{med['nanlab scenario=softmax_overflow'] / med['import torch + one optimizer step']:.2f}x")


if __name__ == "__main__":
    main()
