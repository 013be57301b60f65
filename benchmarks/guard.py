"""What nanlab.guard costs on a language model: extra peak memory and time per step.

A TransformerEncoder language model (d=512, 8 heads, feed-forward 2048, 6 layers,
vocabulary 8192, causal mask; about 27M parameters) trained with AdamW on random
tokens, batch 8 x 128, one thread. Three ways of stepping:

- plain: the step alone;
- guard: ``nanlab.guard(step, model, opt)``, which checks each update before it is
  made and copies only what it cannot prove finite;
- guard always: ``nanlab.guard(..., snapshot="always")``, a copy of the parameters,
  buffers and optimizer state before every step.

Memory: each way trains in a fresh process (this script, run again with
``--worker``), and the figure is that process's peak resident set
(``ru_maxrss``), so it is what a user sees. Time: the three ways run interleaved in
one process, a step each per round; each step is timed in CPU time
(``time.process_time``, one thread), so other work on a shared machine does not
count, and the ratio is the median of the per-round ratios to plain. On a busy
machine that ratio still moves by a few percent from round to round, more than the
guard costs, so the guard's own work (its snapshot, the hooks around the update and
the sentinel) is also timed from inside, and added to plain's median step.

    python benchmarks/guard.py [--steps 4] [--rounds 8] [--quick]

``--quick`` runs a tiny model (d=64, 2 layers, vocabulary 2048, batch 2 x 16), and
the three memory runs one after another in a single worker process, to check the
script, not to measure.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import nanlab

FULL = dict(d=512, heads=8, ff=2048, layers=6, vocab=8192, batch=8, length=128)
# Just over the guard's 1 MiB of parameters below which it copies instead of proving.
QUICK = dict(d=64, heads=2, ff=128, layers=2, vocab=2048, batch=2, length=16)
WAYS = ("plain", "guard", "guard always")
MEMORY_TARGET_MIB = 16
TIME_TARGET = 1.005


class LanguageModel(nn.Module):
    def __init__(self, d, heads, ff, layers, vocab, length, **_):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        # A plain attribute, not a buffer: the guard checks floating point buffers, and
        # this mask's -inf would read as non-finite.
        self.causal = nn.Transformer.generate_square_subsequent_mask(length)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.encoder(h, mask=self.causal, is_causal=True))


def make(way: str, size: dict):
    """(step taking a batch, model) for one way of stepping, seeded alike."""
    torch.manual_seed(0)
    model = LanguageModel(**size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(tokens):
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return loss

    if way == "plain":
        return step, model
    return nanlab.guard(step, model, opt, snapshot="always" if way == "guard always" else "auto"), model


def batches(size: dict, count: int) -> list:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, size["vocab"], (size["batch"], size["length"] + 1), generator=generator)
            for _ in range(count)]


def worker(ways: list, size: dict, steps: int) -> None:
    """Train ``steps`` steps each way, in turn; after each, print the way, the peak RSS
    so far in MiB and how many steps copied."""
    torch.set_num_threads(1)
    for way in ways:
        step, _ = make(way, size)
        copied = 0
        for tokens in batches(size, steps):
            step(tokens).item()
            copied += bool(getattr(step, "copied", False))
        print(f"{way}\t{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}\t{copied}")


def peak_memory(size_flag: list, steps: int, together: bool) -> dict:
    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed, and
    # later tensors land on a heap it does not give back, so the peak RSS of the same
    # run moves by tens of MiB. With it, every tensor of 64 KiB or more is mapped and
    # unmapped as it lives and dies, and the peak follows the memory in use.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    # Side by side: a process's peak RSS does not depend on what else runs.
    groups = [list(WAYS)] if together else [[way] for way in WAYS]
    procs = [subprocess.Popen([sys.executable, __file__, "--steps", str(steps), *size_flag, "--worker", *ways],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for ways in groups]
    found = {}
    for ways, proc in zip(groups, procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"guard.py: the worker for {', '.join(ways)} failed:\n{err}")
        for line in out.splitlines():
            way, rss, copied = line.split("\t")
            found[way] = (float(rss), int(copied))
    return found


class _Timed:
    """Adds the CPU time of each call to ``spent[0]``."""

    def __init__(self, fn, spent: list):
        self.fn, self.spent = fn, spent

    def __call__(self, *args, **kwargs):
        start = time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.spent[0] += time.process_time() - start


def time_own_work(guarded) -> list:
    """Time what the guard itself does in a step: its snapshot, the hook before and
    after the update, and the sentinel. Returns the running total, [seconds]."""
    spent = [0.0]
    snapshot = guarded.snapshot
    snapshot.take = _Timed(snapshot.take, spent)
    guarded._sentinel.check = _Timed(guarded._sentinel.check, spent)
    if guarded._watch is not None:  # the hooks look these up on the instance
        for name in ("before", "after", "unchecked"):
            setattr(guarded._watch, name, _Timed(getattr(guarded._watch, name), spent))
    return spent


def step_times(size: dict, rounds: int) -> tuple[dict, dict]:
    """CPU seconds of each way's steps, interleaved: round r runs each way once; and
    each guard's own CPU seconds per step."""
    torch.set_num_threads(1)
    ways = {way: make(way, size)[0] for way in WAYS}
    data = batches(size, rounds + 1)
    for step in ways.values():  # warm up: Adam's state, the first-step allocations
        step(data[0]).item()
    own = {way: time_own_work(step) for way, step in ways.items() if way != "plain"}
    times = {way: [] for way in WAYS}
    for tokens in data[1:]:
        for way, step in ways.items():
            start = time.process_time()
            step(tokens).item()
            times[way].append(time.process_time() - start)
    return times, {way: spent[0] / rounds for way, spent in own.items()}


def positive_int(text):
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive_int, default=4, help="steps each memory worker trains")
    parser.add_argument("--rounds", type=positive_int, default=8, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true", help="a tiny model, to check the script")
    parser.add_argument("--worker", nargs="+", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.worker:
        worker(args.worker, size, args.steps)
        return
    parameters = sum(p.numel() for p in LanguageModel(**size).parameters())
    print(f"TransformerEncoder LM, {parameters / 1e6:.1f}M parameters, AdamW, batch {size['batch']}x{size['length']}, "
          f"1 thread{' (--quick: not a measurement)' if args.quick else ''}")
    memory = peak_memory(["--quick"] if args.quick else [], args.steps, together=args.quick)
    plain_rss = memory["plain"][0]
    where = "all ways in one process, one after another" if args.quick else "each way in a fresh process"
    print(f"\npeak memory (ru_maxrss), {where}, {args.steps} steps:")
    for way, (rss, copied) in memory.items():
        extra = "" if way == "plain" else f"   {rss - plain_rss:+8.1f} MiB over plain, {copied} of {args.steps} steps copied"
        print(f"{way:<13} {rss:9.1f} MiB{extra}")
    times, own = step_times(size, args.rounds)
    plain = times["plain"]
    print(f"\nCPU time per step (process_time), {args.rounds} rounds interleaved in one process:")
    ratios = {}
    for way, spent in times.items():
        ratios[way] = statistics.median(t / p for t, p in zip(spent, plain))
        print(f"{way:<13} {statistics.median(spent) * 1e3:9.1f} ms median, {min(spent) * 1e3:9.1f} ms least   "
              f"{ratios[way]:.4f}x plain (median of round ratios), {min(spent) / min(plain):.4f}x (least)")
    print("\nthe guard's own work per step (its snapshot, hooks and sentinel, timed inside):")
    for way, seconds in own.items():
        print(f"{way:<13} {seconds * 1e3:9.2f} ms = {seconds / statistics.median(plain) * 100:.3f}% of plain's median step")
    extra = memory["guard"][0] - plain_rss
    print(f"\nguard extra peak memory = {extra:+.1f} MiB (target <= {MEMORY_TARGET_MIB} MiB): "
          f"{'met' if extra <= MEMORY_TARGET_MIB else 'MISSED'}")
    inside = 1 + own["guard"] / statistics.median(plain)
    for ratio, how in ((ratios["guard"], "interleaved steps, median of round ratios"),
                       (inside, "plain's median step + the guard's own work timed inside")):
        print(f"guard / plain = {ratio:.4f}x (target <= {TIME_TARGET}x): {'met' if ratio <= TIME_TARGET else 'MISSED'}"
              f"   [{how}]")
    print(f"guard always: {memory['guard always'][0] - plain_rss:+.1f} MiB, {ratios['guard always']:.4f}x plain")


if __name__ == "__main__":
    main()
