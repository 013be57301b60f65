"""A scenario's training time on a busy machine, by CPU thread count.

Starts --load CPU-bound processes of its own (default 2, each ends by itself after
at most --limit seconds, and is stopped when the benchmark ends), then runs the
scenario in a fresh process per measurement, interleaved, three ways:

  torch default     threads=auto: torch's own count (one per core)
  nanlab default    no OMP_NUM_THREADS, no threads= key: what a plain run uses
  OMP_NUM_THREADS=1 the reference

and prints each way's median training time (the run's own seconds, start-up left
out) and its ratio to the reference, side by side from this one run. A ratio near
1.00 for nanlab's default is the point; torch's default measured 4 to 13 times
slower on a loaded 2-core machine. The machine's own other work adds noise: read
the numbers as a comparison made at one time, not as constants.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

# The run, then the thread count it trained on: threads.use(key) applies the rule the
# run applied, in the same process and environment, so no second process is started
# only to count threads.
CHILD = """
import sys, torch, nanlab
from nanlab.lab import threads
scenario, steps, key = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
r = nanlab.run(scenario, f"steps={steps}", *([f"threads={key}"] if key is not None else []))
with threads.use(key):
    print(f"{r.seconds:.6f} {torch.get_num_threads()}")
"""
# A busy loop that ends by itself: the benchmark never leaves load behind.
LOAD = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


def whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def measure(scenario: str, steps: int, omp, key) -> tuple:
    """(the run's training seconds, the threads it trained on), in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(omp)
    args = [scenario, str(steps)] + ([key] if key is not None else [])
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"threads.py: error: the run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    seconds, count = proc.stdout.split()[-2:]
    return float(seconds), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="tanh_explosion")
    parser.add_argument("--steps", type=whole, default=100, help="training steps per run (default 100)")
    parser.add_argument("--rounds", type=whole, default=3, help="runs per way, interleaved (default 3)")
    parser.add_argument("--load", type=int, default=2, help="CPU-bound processes beside the runs (default 2)")
    parser.add_argument("--limit", type=whole, default=600, help="seconds the load may run at most (default 600)")
    args = parser.parse_args()
    if args.load < 0:
        parser.error(f"argument --load: '{args.load}' is not a whole number >= 0")

    ways = {  # name: (OMP_NUM_THREADS, threads= key)
        "torch default": (None, "auto"),
        "nanlab default": (None, None),
        "OMP_NUM_THREADS=1": (1, None),
    }
    load = [subprocess.Popen([sys.executable, "-c", LOAD.format(limit=args.limit)]) for _ in range(args.load)]
    times = {name: [] for name in ways}
    counts = {}
    try:
        time.sleep(0.2 if load else 0)
        for _ in range(args.rounds):
            for name, (omp, key) in ways.items():
                seconds, counts[name] = measure(args.scenario, args.steps, omp, key)
                times[name].append(seconds)
    finally:
        for proc in load:
            proc.kill()
            proc.wait()
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = medians["OMP_NUM_THREADS=1"]
    print(f"{args.scenario}, {args.steps} steps, median of {args.rounds}, beside {args.load} CPU-bound "
          f"process{'es' if args.load != 1 else ''} on {os.cpu_count()} CPUs")
    for name, median in medians.items():
        print(f"{name:<18} {counts[name]:>3} thread(s)  {median:8.3f} s  {median / reference:6.2f}x of OMP_NUM_THREADS=1")


if __name__ == "__main__":
    main()
