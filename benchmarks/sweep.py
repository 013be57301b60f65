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

It also prices the sweep's arithmetic: (5)'s work (steps summed over the copies it
trained) at (4)'s cheapest cost per copy-step, in batches of 8, 16, 32 or all the
copies. Every point must give a single run's numbers, so that arithmetic cannot be
skipped: multirun / arithmetic is the most any sweep of these ops could reach, even
with no start-up at all. Where it is under 8x, no engine of batched torch ops
meets the target. A second ratio adds what the mode=sweep command spends outside
training ((2) minus (5)): an estimate of the most this command could reach.

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
BATCHES = (8, 16, 32)  # copies per batch the hand-written loop is also priced at
SCENARIO = "tanh_explosion"


def whole(text: str, least: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < least:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number >= {least}")
    return value


def grid(points: int) -> list:
    """``points`` (>= 2) lrs from 0.01 to 1, evenly in log space: the boundary (~0.12) inside."""
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
    from nanlab.lab import registry
    from nanlab.sweeps.engine import Engine, Run
    from nanlab.config.compose import compose
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


def hand_written(lrs: list, steps: int, batch: int = 0):
    """The same copies as a plain batched loop, ``batch`` copies at a time (0: all at
    once): (seconds, first non-finite steps, copy-steps computed)."""
    import torch

    from nanlab.lab import registry
    from nanlab.lab.build import DTYPES, resolve_device
    from nanlab.config.compose import compose
    from nanlab.lab.scenario import Context

    scenario = registry.load(SCENARIO)
    cfg = compose([f"scenario={SCENARIO}", f"steps={steps}"])
    started = time.perf_counter()
    ctx = Context(cfg, resolve_device(cfg.device), DTYPES[cfg.dtype])
    data = scenario.make_data(ctx)
    x, y = data.x.float(), data.y.float()
    torch.manual_seed(int(cfg.seed))
    model = scenario.make_model(ctx, data)
    batch = batch or len(lrs)
    first_steps, copy_steps = [], 0
    for chunk in (lrs[i:i + batch] for i in range(0, len(lrs), batch)):
        copies = len(chunk)
        params = [p.detach().expand(copies, *p.shape).clone() for p in model.parameters()]
        lr = torch.tensor(chunk)
        first_bad = torch.full((copies,), -1)
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
                finite = torch.isfinite(losses) & torch.stack(
                    [torch.isfinite(p.flatten(1)).all(1) for p in params]).all(0)
                first_bad[(~finite) & (first_bad < 0)] = step
            if bool((first_bad >= 0).all()):
                break
        first_steps += [None if s < 0 else int(s) for s in first_bad.tolist()]
    return time.perf_counter() - started, first_steps, copy_steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Two at least: a multirun over one value is not a sweep of that key (no column for it).
    parser.add_argument("--points", type=lambda t: whole(t, 2), default=64, help="lrs in the grid (default 64)")
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
        # Smaller batches can cost less per copy-step (their tensors stay in cache):
        # the arithmetic is priced at the cheapest of these.
        batches = [b for b in BATCHES if b < len(lrs)] + [len(lrs)]
        per_copy_step = {b: [] for b in batches}
        for _ in range(args.rounds):
            for name, cmd in commands.items():
                times[name].append(wall(cmd, tmp, args.threads))
            seconds, engine_steps, _ = engine_runs(lrs, args.steps)
            times["engine"].append(seconds)
            seconds, hand_steps, hand_work = hand_written(lrs, args.steps)
            times["hand-written"].append(seconds)
            per_copy_step[len(lrs)].append(seconds / hand_work)
            for b in batches[:-1]:
                seconds, _, work = hand_written(lrs, args.steps, b)
                per_copy_step[b].append(seconds / work)
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
    cost = {b: statistics.median(ts) for b, ts in per_copy_step.items()}
    cheapest = min(cost, key=cost.get)
    arithmetic = sweep_work * cost[cheapest]
    outside = max(0.0, med["mode=sweep"] - med["engine, every variant"])
    print("\nhand-written loop, cost per copy-step: " + ", ".join(
        f"{cost[b] * 1e3:.3f} ms in batches of {b}" for b in reversed(batches)))
    print(f"this sweep's arithmetic: {sweep_work} copy-steps (the engine's, all variants) x {cost[cheapest] * 1e3:.3f} ms "
          f"= {arithmetic:.4g} s")
    print(f"multirun / arithmetic alone = {med['multirun'] / arithmetic:.2f}x: the most any sweep of these batched "
          f"torch ops could reach, start-up and bookkeeping left out")
    print(f"multirun / (arithmetic + the {outside:.4g} s mode=sweep spends outside training) = "
          f"{med['multirun'] / (arithmetic + outside):.2f}x: an estimate with this command's start-up")


if __name__ == "__main__":
    main()
