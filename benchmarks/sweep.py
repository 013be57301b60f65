"""A 64-point lr grid of tanh_explosion (200 steps), timed five ways side by side:

1. Hydra's basic launcher: ``python -m nanlab -m scenario=tanh_explosion optimizer.lr=...``
   (one job per lr, every variant, in one process), wall time of the command;
2. mode=sweep on the same grid, the same summary: ``python -m nanlab mode=sweep
   sweep.lr=[...]``, wall time of the command;
3. the batched engine on the broken variant alone (what a stability map needs), in
   this process;
4. a hand-written batched loop over the same model and copies: stacked weights,
   baddbmm, tanh, per-copy lr, a finiteness check per step, no bookkeeping;
5. the batched engine on every variant, in this process: (2)'s training alone.

Targets (the sweep issue): (1) / (2) >= 8, and (3) / (4) <= 2. The in-process
measurements run interleaved, median of --rounds; the commands once per round.

It also prints the most (2) could gain at all: (5)'s work (steps summed over the
copies it trained) priced at (4)'s cost per copy-step, plus what the mode=sweep
command spends outside training ((2) minus (5)). The
runs must give a single run's numbers, so this arithmetic cannot be skipped; where
the bound is under 8x, no engine of batched torch ops meets the target.

Everything runs on --threads CPU threads (default 1: OMP_NUM_THREADS and
MKL_NUM_THREADS for the commands, torch.set_num_threads here). On a machine whose
cores other processes also use, a torch op split over 2 threads waits for the
descheduled one: a small matmul took 5 ms instead of 25 us, and a multirun 25
minutes instead of under one. One thread each keeps the comparison about nanlab.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEEDUP_TARGET, OVERHEAD_TARGET = 8.0, 2.0
SCENARIO = "tanh_explosion"


def whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number >= 1")
    return value


def grid(points: int) -> list:
    """``points`` lrs from 0.01 to 1, evenly in log space: the boundary (~0.12) inside."""
    if points == 1:
        return [0.1]
    return [float(f"{10 ** (-2 + 2 * i / (points - 1)):.6g}") for i in range(points)]


def wall(cmd: list, cwd: str, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd[:6])} ...\n{proc.stderr[-2000:]}")
    return elapsed


def engine_runs(lrs: list, steps: int, every_variant: bool = False):
    """The batched engine on the broken variant (or every variant) at each lr:
    (seconds, the broken variant's first non-finite steps, copy-steps trained)."""
    from nanlab import registry
    from nanlab.batched import Engine, Run
    from nanlab.config import compose
    from omegaconf import OmegaConf

    scenario = registry.load(SCENARIO)
    variants = scenario.variants if every_variant else [scenario.broken]
    base = compose([f"scenario={SCENARIO}", f"steps={steps}"])
    started = time.perf_counter()
    runs = []
    for lr in lrs:
        cfg = OmegaConf.create(OmegaConf.to_container(base))
        cfg.optimizer.lr = lr
        runs += [Run(variant, cfg) for variant in variants]
    engine = Engine(scenario)
    outcomes = engine.train(engine.schedule(runs))
    broken = [o.result.nonfinite_step for o in outcomes if o.result.role == "broken"]
    return time.perf_counter() - started, broken, engine.copy_steps


def hand_written(lrs: list, steps: int):
    """The same copies as one plain batched loop: (seconds, first non-finite steps)."""
    import torch

    from nanlab import registry
    from nanlab.build import DTYPES, resolve_device
    from nanlab.config import compose
    from nanlab.scenario import Context

    scenario = registry.load(SCENARIO)
    cfg = compose([f"scenario={SCENARIO}", f"steps={steps}"])
    started = time.perf_counter()
    ctx = Context(cfg, resolve_device(cfg.device), DTYPES[cfg.dtype])
    data = scenario.make_data(ctx)
    x, y = data.x.float(), data.y.float()
    torch.manual_seed(int(cfg.seed))
    model = scenario.make_model(ctx, data)
    copies = len(lrs)
    params = [p.detach().expand(copies, *p.shape).clone() for p in model.parameters()]
    lr = torch.tensor(lrs)
    first_bad = torch.full((copies,), -1)
    copy_steps = 0
    for step in range(steps):
        copy_steps += copies  # every copy, NaN or not: this loop never drops one
        leaves = [p.requires_grad_() for p in params]
        w1, b1, w2, b2, w3, b3 = leaves
        h = torch.tanh(torch.baddbmm(b1.unsqueeze(1), x.expand(copies, *x.shape), w1.transpose(1, 2)))
        h = torch.tanh(torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2)))
        out = torch.baddbmm(b3.unsqueeze(1), h, w3.transpose(1, 2))
        losses = ((out - y) ** 2).mean(dim=(1, 2))
        grads = torch.autograd.grad(losses.sum(), leaves)
        with torch.no_grad():
            params = [p - lr.view(-1, *([1] * (p.dim() - 1))) * g for p, g in zip(leaves, grads)]
            finite = torch.isfinite(losses) & torch.stack([torch.isfinite(p.flatten(1)).all(1) for p in params]).all(0)
            first_bad[(~finite) & (first_bad < 0)] = step
        if bool((first_bad >= 0).all()):
            break
    return time.perf_counter() - started, [None if s < 0 else int(s) for s in first_bad.tolist()], copy_steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=whole, default=64, help="lrs in the grid (default 64)")
    parser.add_argument("--steps", type=whole, default=200, help="training steps (default 200, the scenario's)")
    parser.add_argument("--rounds", type=whole, default=3, help="repeats; the median is reported (default 3)")
    parser.add_argument("--threads", type=whole, default=1, help="CPU threads for every way (default 1)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    lrs = grid(args.points)
    py = sys.executable
    values = ",".join(map(str, lrs))
    times = {name: [] for name in ("multirun", "mode=sweep", "engine", "hand-written", "engine, every variant")}
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "multirun": [py, "-m", "nanlab", "-m", f"scenario={SCENARIO}", f"steps={args.steps}",
                         f"optimizer.lr={values}", f"hydra.sweep.dir={tmp}/multirun"],
            "mode=sweep": [py, "-m", "nanlab", "mode=sweep", f"scenario={SCENARIO}", f"steps={args.steps}",
                           f"sweep.lr=[{values}]", f"hydra.run.dir={tmp}/sweep"],
        }
        engine_runs(lrs[:2], 2)  # warm the imports and kernels once
        hand_written(lrs[:2], 2)
        for _ in range(args.rounds):
            for name, cmd in commands.items():
                times[name].append(wall(cmd, tmp, args.threads))
            seconds, engine_steps, _ = engine_runs(lrs, args.steps)
            times["engine"].append(seconds)
            seconds, hand_steps, hand_work = hand_written(lrs, args.steps)
            times["hand-written"].append(seconds)
            seconds, _, sweep_work = engine_runs(lrs, args.steps, every_variant=True)
            times["engine, every variant"].append(seconds)
        sweep_csv = (Path(tmp) / "sweep" / "summary.csv").read_text()
        multirun_csv = (Path(tmp) / "multirun" / "summary.csv").read_text()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{SCENARIO}: {len(lrs)} lrs from {lrs[0]:g} to {lrs[-1]:g}, {args.steps} steps, median of {args.rounds}, "
          f"{args.threads} thread{'s' if args.threads > 1 else ''}")
    print(f"{'multirun (basic launcher, all variants)':<44} {med['multirun']:8.2f} s  (command wall time)")
    print(f"{'mode=sweep (batched, all variants)':<44} {med['mode=sweep']:8.2f} s  (command wall time)")
    print(f"{'batched engine, broken variant':<44} {med['engine']:8.2f} s  (in process)")
    print(f"{'hand-written batched loop, same copies':<44} {med['hand-written']:8.2f} s  (in process)")
    print(f"{'batched engine, all variants':<44} {med['engine, every variant']:8.2f} s  (in process)")
    same_rows = sweep_csv.splitlines()[0] == multirun_csv.splitlines()[0] and \
        len(sweep_csv.splitlines()) == len(multirun_csv.splitlines())
    agree = sum(a == b for a, b in zip(engine_steps, hand_steps))
    print(f"summaries: same columns and row count: {same_rows}; first non-finite steps, engine vs hand-written: "
          f"{agree} of {len(lrs)} agree")
    speedup = med["multirun"] / med["mode=sweep"]
    overhead = med["engine"] / med["hand-written"]
    print(f"\nmultirun / mode=sweep = {speedup:.2f}x (target >= {SPEEDUP_TARGET:.0f}x): "
          f"{'met' if speedup >= SPEEDUP_TARGET else 'MISSED'}")
    print(f"engine / hand-written = {overhead:.2f}x (target <= {OVERHEAD_TARGET:.0f}x): "
          f"{'met' if overhead <= OVERHEAD_TARGET else 'MISSED'}")
    per_copy_step = med["hand-written"] / hand_work
    floor = sweep_work * per_copy_step
    outside = max(0.0, med["mode=sweep"] - med["engine, every variant"])
    print(f"\nthe most mode=sweep could gain: {sweep_work} copy-steps (all variants) x {per_copy_step * 1e3:.3f} ms "
          f"(the hand-written loop's cost per copy-step) = {floor:.2f} s of arithmetic, plus {outside:.2f} s the "
          f"command spends outside training: multirun / {floor + outside:.2f} s = "
          f"{med['multirun'] / (floor + outside):.2f}x")

if __name__ == "__main__":
    main()
