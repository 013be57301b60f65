"""Cost of nanlab's guard and tracer against plain training and detect_anomaly.

Small MLP (6 x (Linear 32 + Tanh) + Linear 3), batch 64, SGD, cross-entropy. The
four ways of stepping run interleaved in one process, in rounds, and the script
prints each one's median time per step and its ratio to plain training.
Targets (issue 4): guard <= 1.15x plain; nanlab.trace no slower than
torch.autograd.detect_anomaly(check_nan=True), while also covering the forward pass.
The plain loop reads loss.item() each step, as a loop that logs its loss does.
"""
import statistics
import time
import warnings

import torch
from torch import nn

import nanlab

STEPS, ROUNDS = 20, 40
warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")


def make():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(32, 32), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32), torch.randint(0, 3, (64,))

    def step():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, opt, step


def plain():
    model, opt, step = make()
    return lambda: step().item()


def guarded():
    model, opt, step = make()
    return nanlab.guard(step, model, opt)


def traced():
    model, opt, step = make()

    def run():
        with nanlab.trace():
            step().item()

    return run


def anomaly():
    model, opt, step = make()

    def run():
        with torch.autograd.detect_anomaly(check_nan=True):
            step().item()

    return run


def main():
    torch.set_num_threads(1)
    ways = {"plain": plain(), "guard": guarded(), "nanlab.trace": traced(), "detect_anomaly": anomaly()}
    for step in ways.values():
        for _ in range(10):  # warm up
            step()
    per_step = {name: [] for name in ways}
    for _ in range(ROUNDS):
        for name, step in ways.items():
            start = time.perf_counter()
            for _ in range(STEPS):
                step()
            per_step[name].append((time.perf_counter() - start) / STEPS)
    med = {name: statistics.median(v) for name, v in per_step.items()}
    for name, m in med.items():
        print(f"{name:<16} {m * 1e6:8.1f} us/step   {m / med['plain']:5.2f}x plain")
    g, t, a = med["guard"] / med["plain"], med["nanlab.trace"], med["detect_anomaly"]
    print(f"\nguard / plain = {g:.2f}x (target <= 1.15x): {'met' if g <= 1.15 else 'MISSED'}")
    print(f"trace / detect_anomaly = {t / a:.2f}x (target <= 1.00x): {'met' if t <= a else 'MISSED'}")


if __name__ == "__main__":
    main()
