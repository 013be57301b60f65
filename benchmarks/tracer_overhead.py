"""Cost of nanlab's guard and tracer against plain training and detect_anomaly.

Small MLP (6 x (Linear 32 + Tanh) + Linear 3), batch 64, SGD, cross-entropy. The
four ways of stepping run interleaved in one process, in rounds, and the script
prints each one's median time per step and its ratio to plain training.
Targets (issue 4): guard <= 1.15x plain; nanlab.trace no slower than
torch.autograd.detect_anomaly(check_nan=True), while also covering the forward pass.
The plain loop reads loss.item() each step, as a loop that logs its loss does.

    python benchmarks/tracer_overhead.py [--device cuda] [--rounds 40] [--steps 20]

On CUDA, nanlab.trace runs in its deferred mode (one host sync per block).
"""
import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import nanlab

warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")


def make(device="cpu"):
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(32, 32), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(32, 3)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32, device=device), torch.randint(0, 3, (64,), device=device)

    def step():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, opt, step


def plain(device):
    model, opt, step = make(device)
    return lambda: step().item()


def guarded(device):
    model, opt, step = make(device)
    return nanlab.guard(step, model, opt)


def traced(device):
    model, opt, step = make(device)

    def run():
        with nanlab.trace():
            step().item()

    return run


def anomaly(device):
    model, opt, step = make(device)

    def run():
        with torch.autograd.detect_anomaly(check_nan=True):
            step().item()

    return run


def positive_int(text):
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=positive_int, default=40)
    parser.add_argument("--steps", type=positive_int, default=20, help="steps per way in each round")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "tracer_overhead.py: error: --device cuda: torch sees no CUDA device\n")
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    ways = {"plain": plain(args.device), "guard": guarded(args.device),
            "nanlab.trace": traced(args.device), "detect_anomaly": anomaly(args.device)}
    for step in ways.values():
        for _ in range(10):  # warm up
            step()
    per_step = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, step in ways.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            per_step[name].append((time.perf_counter() - start) / args.steps)
    med = {name: statistics.median(v) for name, v in per_step.items()}
    print(f"{args.device}, {args.rounds} rounds of {args.steps} steps, median per step")
    for name, m in med.items():
        print(f"{name:<16} {m * 1e6:8.1f} us/step   {m / med['plain']:5.2f}x plain")
    g, t, a = med["guard"] / med["plain"], med["nanlab.trace"], med["detect_anomaly"]
    print(f"\nguard / plain = {g:.2f}x (target <= 1.15x): {'met' if g <= 1.15 else 'MISSED'}")
    print(f"trace / detect_anomaly = {t / a:.2f}x (target <= 1.00x): {'met' if t <= a else 'MISSED'}")


if __name__ == "__main__":
    main()
