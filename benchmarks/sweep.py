"""The 64-point grid of tanh_explosion (32 lrs from 1e-3 to 1 x clip none,norm, every
variant, 200 steps), timed four ways side by side, with the kernel floor:

1. Hydra's basic launcher: ``python -m nanlab -m scenario=tanh_explosion optimizer.lr=... clip=none,norm``
   (one job after another, in one process);
2. Hydra's joblib launcher, ``hydra.launcher.n_jobs=2``;
3. ``mode=sweep sweep.workers=1``: the batched engine, in cache-sized chunks, one process;
4. ``mode=sweep sweep.workers=2``: the same chunks on two worker processes.

Every command runs with OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1. Each is timed by its
wall clock and by the CPU time it and its children used (getrusage of the children,
so a pool's workers count): on a machine other processes also use, the CPU time says
what a way costs, the wall time what an idle machine would see only roughly. The
commands run interleaved, --rounds times; the medians are printed. All four
summary.csv files must be the same, byte for byte, and the benchmark says whether they are.
--forked runs the basic multirun and both mode=sweep commands in children forked
from the benchmark's own process instead, start-up left out (the joblib multirun still
starts fresh): a quick check that every way runs and agrees, not a timing of what a
user's command costs.

The kernel floor prices the arithmetic alone: a hand-written batched loop over the
same model (stacked weights, baddbmm, tanh, autograd, a per-copy lr, no checks, no
bookkeeping) gives the cost of one copy-step in batches of 16, and the engine's
own count of copy-steps for the grid (retired copies stop costing work) times that
cost is what any engine of these batched torch ops must spend, start-up aside.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SCENARIO = "tanh_explosion"
FLOOR_BATCH = 16


def whole(text: str, least: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < least:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number >= {least}")
    return value


def grid(points: int) -> list:
    """``points`` (>= 2) lrs from 1e-3 to 1, evenly in log space: the boundary (~0.12) inside."""
    return [float(f"{10 ** (-3 + 3 * i / (points - 1)):.6g}") for i in range(points)]


def timed(cmd: list, cwd: str) -> tuple:
    """(wall seconds, CPU seconds of the command and every child it waited for)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd[:8])} ...\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def forked(cmd: list, cwd: str) -> tuple:
    """As timed(), for ``python -m nanlab ARGS`` run by nanlab.cli in a forked child,
    which finds torch, Hydra and nanlab imported by this process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                os.dup2(err.fileno(), 2)
                os.chdir(cwd)
                os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                sys.argv = ["nanlab", *cmd[3:]]
                from nanlab.cli import main

                main()
                code = 0
            except SystemExit as exit:
                code = 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                # No atexit hooks: the parent's (its temporary folder's removal among
                # them) are not the child's, and a finished multirun leaves none of its own.
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"benchmark command failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd[:8])} ...\n"
                     f"{err.read().decode(errors='replace')[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def copy_steps(lrs: list, steps: int) -> int:
    """The copy-steps the engine trains for the whole grid (every variant, both clips)."""
    from omegaconf import OmegaConf

    from nanlab.config.compose import compose
    from nanlab.lab import registry
    from nanlab.sweeps.engine import Engine, Run
    from nanlab.sweeps.workers import MIN_CHUNK

    scenario = registry.load(SCENARIO)
    runs = []
    for clip in ("none", "norm"):
        base = compose([f"scenario={SCENARIO}", f"steps={steps}", f"clip={clip}"])
        for lr in lrs:
            cfg = OmegaConf.create(OmegaConf.to_container(base))
            cfg.optimizer.lr = lr
            runs += [Run(variant, cfg) for variant in scenario.variants]
    engine = Engine(scenario, max_batch=MIN_CHUNK, threads=1)
    engine.train(engine.schedule(runs))
    return engine.copy_steps


def floor_per_copy_step(lrs: list, steps: int, batch: int = FLOOR_BATCH) -> float:
    """CPU seconds per copy-step of a plain batched loop over the same model and copies."""
    import torch

    from nanlab.config.compose import compose
    from nanlab.lab import registry
    from nanlab.lab.build import DTYPES, resolve_device
    from nanlab.lab.scenario import Context

    scenario = registry.load(SCENARIO)
    cfg = compose([f"scenario={SCENARIO}", f"steps={steps}"])
    ctx = Context(cfg, resolve_device(cfg.device), DTYPES[cfg.dtype])
    data = scenario.make_data(ctx)
    x, y = data.x.float(), data.y.float()
    torch.manual_seed(int(cfg.seed))
    model = scenario.make_model(ctx, data)
    started, work = time.process_time(), 0
    for chunk in (lrs[i:i + batch] for i in range(0, len(lrs), batch)):
        copies = len(chunk)
        params = [p.detach().expand(copies, *p.shape).clone() for p in model.parameters()]
        lr = torch.tensor(chunk)
        for _ in range(steps):
            work += copies
            leaves = [p.requires_grad_() for p in params]
            w1, b1, w2, b2, w3, b3 = leaves
            h = torch.tanh(torch.baddbmm(b1.unsqueeze(1), x.expand(copies, *x.shape), w1.transpose(1, 2)))
            h = torch.tanh(torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2)))
            out = torch.baddbmm(b3.unsqueeze(1), h, w3.transpose(1, 2))
            losses = ((out - y) ** 2).mean(dim=(1, 2))
            grads = torch.autograd.grad(losses.sum(), leaves)
            with torch.no_grad():
                params = [p - lr.view(-1, *([1] * (p.dim() - 1))) * g for p, g in zip(leaves, grads)]
    return (time.process_time() - started) / work


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=lambda t: whole(t, 2), default=32, help="lrs in the grid (default 32)")
    parser.add_argument("--steps", type=whole, default=200, help="training steps (default 200, the scenario's)")
    parser.add_argument("--rounds", type=whole, default=1, help="repeats; the median is printed (default 1)")
    parser.add_argument("--forked", action="store_true",
                        help="run every way but joblib's forked from this process, start-up left out "
                             "(a quick check, not a timing)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    lrs = grid(args.points)
    # Before the ways, so that --forked children inherit what it imported and set up.
    work = copy_steps(lrs, args.steps)
    per_copy_step = floor_per_copy_step(lrs, args.steps)
    if args.forked:
        import nanlab.cli  # noqa: F401
    py, values = sys.executable, ",".join(map(str, lrs))
    common = [f"scenario={SCENARIO}", f"steps={args.steps}"]
    ways = {
        "multirun, basic launcher": lambda d: [py, "-m", "nanlab", "-m", *common, f"optimizer.lr={values}",
                                               "clip=none,norm", f"hydra.sweep.dir={d}"],
        "multirun, joblib n_jobs=2": lambda d: [py, "-m", "nanlab", "-m", *common, f"optimizer.lr={values}",
                                                "clip=none,norm", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                                f"hydra.sweep.dir={d}"],
        "mode=sweep, 1 worker": lambda d: [py, "-m", "nanlab", "mode=sweep", *common, f"sweep.lr=[{values}]",
                                           "sweep.clip=[none,norm]", "sweep.workers=1", f"hydra.run.dir={d}"],
        "mode=sweep, 2 workers": lambda d: [py, "-m", "nanlab", "mode=sweep", *common, f"sweep.lr=[{values}]",
                                            "sweep.clip=[none,norm]", "sweep.workers=2", f"hydra.run.dir={d}"],
    }
    # joblib's loky workers, reused for minutes, would outlive a forked launcher's
    # os._exit uncounted: that launcher always starts fresh and shuts them down itself.
    basic, joblib = "multirun, basic launcher", "multirun, joblib n_jobs=2"
    run = {name: forked if args.forked and name != joblib else timed for name in ways}
    walls = {name: [] for name in ways}
    cpus = {name: [] for name in ways}
    summaries = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_number in range(args.rounds):
            for number, (name, cmd) in enumerate(ways.items()):
                folder = Path(tmp) / f"{round_number}-{number}"
                wall, cpu = run[name](cmd(folder), tmp)
                walls[name].append(wall)
                cpus[name].append(cpu)
                summaries[name] = (folder / "summary.csv").read_bytes()
    floor = work * per_copy_step
    wall = {name: statistics.median(ts) for name, ts in walls.items()}
    cpu = {name: statistics.median(ts) for name, ts in cpus.items()}
    print(f"{SCENARIO}: {len(lrs)} lrs from {lrs[0]:g} to {lrs[-1]:g} x clip none,norm = {2 * len(lrs)} points, "
          f"every variant, {args.steps} steps; OMP_NUM_THREADS=1; median of {args.rounds}"
          f"{'; forked, start-up left out' if args.forked else ''}")
    print(f"{'way':<28} {'wall s':>8} {'CPU s':>8} {'basic/way wall':>15} {'basic/way CPU':>14} {'joblib/way wall':>16}")
    for name in ways:
        print(f"{name:<28} {wall[name]:8.2f} {cpu[name]:8.2f} {wall[basic] / wall[name]:14.2f}x "
              f"{cpu[basic] / cpu[name]:13.2f}x {wall[joblib] / wall[name]:15.2f}x")
    print(f"{'kernel floor':<28} {'':>8} {floor:8.2f}   ({work} copy-steps x {per_copy_step * 1e6:.0f} us, "
          f"batches of {FLOOR_BATCH})")
    same = len(set(summaries.values())) == 1
    print(f"summary.csv: {'the same, byte for byte, every way' if same else 'DIFFERENT between ways'}")


if __name__ == "__main__":
    main()
