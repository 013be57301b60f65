"""mode=boundary: the largest lr at which a scenario's broken variant stays finite.

For each combination of ``boundary.init`` and ``boundary.clip``, the search keeps a
bracket [lo, hi]: lo stayed finite for the configured steps, hi went non-finite
(hi is the smallest lr tried that went non-finite, lo the largest finite one below
it). Each round tries ``boundary.candidates`` lrs spaced evenly in log space: the
first over three decades either side of the config's own lr, then, while every lr
tried stayed finite (or none did), the next six decades up (or down), never past
[lr_min, lr_max]; once there is a bracket, inside it, until hi / lo is at most
1 + ``boundary.precision``. Starting near the config's lr, rather than spreading the
first round over all of [lr_min, lr_max], keeps the first bracket narrow: three
rounds instead of four or five for the scenarios here. All combinations'
candidates of a round train on the batched engine (nanlab.sweeps.engine), split
evenly over ``sweep.workers`` processes (nanlab.sweeps.workers).

``critical_lr`` is the bracket's geometric midpoint. A combination that stayed
finite up to lr_max has lo = lr_max and no hi (critical_lr null); one that was
non-finite already at lr_min has hi = lr_min and no lo.
"""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import Callable, Optional

from nanlab import jsonio

BOUNDARY_JSON = "boundary.json"


def geometric(lo: float, hi: float, count: int) -> list:
    """``count`` lrs from lo to hi inclusive, evenly spaced in log space. The ends are
    lo and hi themselves: exp(log(1e-12)) is 1.000000000000001e-12, and a search that
    walks down to lr_min stops only when it has tried lr_min exactly."""
    if count == 1:
        return [lo]
    step = (math.log(hi) - math.log(lo)) / (count - 1)
    # The ends are lo and hi exactly: exp(log(x)) need not give x back, and a search
    # that compares its next candidate with lr_min must be able to reach it.
    return [lo] + [math.exp(math.log(lo) + i * step) for i in range(1, count - 1)] + [hi]


# A search ends when no bracket has an lr left to try; this budget is the backstop
# (a bracket narrows by (candidates + 1)x a round, so 200 rounds is far past any
# precision float64 can resolve).
MAX_ROUNDS = 200

# How far a round looks: three decades either side of the config's lr at first,
# then six more decades at a time in the direction the boundary must lie.
FIRST_SPAN, NEXT_SPAN = 1e3, 1e6


class Bracket:
    """What one combination's search knows: the lrs tried and whether each stayed finite."""

    def __init__(self, init: str, clip: str):
        self.init, self.clip = init, clip
        self.tried: dict = {}  # lr -> stayed finite

    @property
    def hi(self) -> Optional[float]:
        bad = [lr for lr, finite in self.tried.items() if not finite]
        return min(bad) if bad else None

    @property
    def lo(self) -> Optional[float]:
        hi = self.hi
        good = [lr for lr, finite in self.tried.items() if finite and (hi is None or lr < hi)]
        return max(good) if good else None

    def next_candidates(self, start: float, lr_min: float, lr_max: float, count: int, precision: float) -> list:
        """The lrs to try next, none of them tried before; empty when the search is done."""
        return [lr for lr in self._next_span(start, lr_min, lr_max, count, precision) if lr not in self.tried]

    def _next_span(self, start: float, lr_min: float, lr_max: float, count: int, precision: float) -> list:
        if not self.tried:
            return geometric(max(lr_min, start / FIRST_SPAN), min(lr_max, start * FIRST_SPAN), count)
        lo, hi = self.lo, self.hi
        if hi is None:  # finite everywhere so far: look higher
            top = max(self.tried)
            return [] if top >= lr_max else geometric(top, min(lr_max, top * NEXT_SPAN), count + 1)[1:]
        if lo is None:  # non-finite everywhere below hi: look lower
            bottom = min(self.tried)
            return [] if bottom <= lr_min else geometric(max(lr_min, bottom / NEXT_SPAN), bottom, count + 1)[:-1]
        if hi / lo <= 1 + precision:
            return []
        return geometric(lo, hi, count + 2)[1:-1]

    def entry(self) -> dict:
        lo, hi = self.lo, self.hi
        critical = math.sqrt(lo * hi) if lo is not None and hi is not None else None
        return {"init": self.init, "clip": self.clip, "critical_lr": critical, "lo": lo, "hi": hi}


def narrow(brackets: list, start: float, boundary, measure: Callable, out: Callable = print) -> list:
    """Run the bracketing rounds until every bracket is done; returns the brackets.

    ``measure(candidates)`` takes a round's [(bracket, lr), ...] and returns, in the
    same order, whether each lr stayed finite, and a list of words for the round's log
    line. Training is the caller's (search's engine), so that the rounds can be
    tested against any stability rule."""
    limits = (float(boundary.lr_min), float(boundary.lr_max), int(boundary.candidates), float(boundary.precision))
    start = min(max(start, limits[0]), limits[1])
    round_number = 0
    while round_number < MAX_ROUNDS:
        candidates = [(bracket, lr) for bracket in brackets for lr in bracket.next_candidates(start, *limits)]
        if not candidates:
            return brackets
        round_number += 1
        stayed_finite, how = measure(candidates)
        for (bracket, lr), finite in zip(candidates, stayed_finite):
            bracket.tried[lr] = finite
        lrs = [lr for _, lr in candidates]
        out(f"round {round_number}: {len(candidates)} lrs from {min(lrs):.3g} to {max(lrs):.3g} ({'; '.join(how)})")
    out(f"boundary: stopped after {MAX_ROUNDS} rounds; the brackets below are as far as they got")
    return brackets


class RoundLost(RuntimeError):
    """A round's chunk of candidates came back untrained (its worker process died).
    Unlike a grid's points, a search's later rounds depend on every candidate of this
    one, so the search cannot go on; ``mode=boundary`` ends with this one line."""

    def __init__(self, lost: list, reason: str):
        combos = ", ".join(dict.fromkeys(f"{bracket.init}/{bracket.clip}" for bracket, _ in lost))
        lrs = [lr for _, lr in lost]
        super().__init__(f"boundary: {len(lost)} candidate lr{'s' if len(lost) > 1 else ''} "
                         f"({min(lrs):.3g} to {max(lrs):.3g}, init/clip {combos}) came back untrained: {reason}; "
                         "the brackets cannot narrow without them, so nothing was written; "
                         "running the command again repeats the search")


def search(engine, broken, configs: Callable, combos: list, boundary, start: float,
           out: Callable = print, workers: int = 1) -> list:
    """Bracket each (init, clip) combination's critical lr; a Bracket per combination.

    ``configs(init, clip, lr)`` gives the finalized config of one candidate; ``start``
    is the lr the first round centres on. Each round's candidates are trained in
    chunks (:func:`round_chunks`) by ``workers`` processes."""
    from nanlab.sweeps.engine import Run, add_tallies, describe
    from nanlab.sweeps.workers import Lost, in_workers

    def train(chunk: list) -> tuple:
        schedule = engine.schedule([run for _, run in chunk])
        outcomes = engine.train(schedule)
        return [outcome.result.first_nonfinite is None for outcome in outcomes], schedule.tally()

    def measure(candidates: list) -> tuple:
        # Configs, data and models are made here, before the round's workers fork, so
        # that every round's workers inherit what earlier rounds made instead of
        # composing and building it again each time.
        runs = [Run(broken, configs(bracket.init, bracket.clip, lr)) for bracket, lr in candidates]
        prepared = [engine.prepare(run) for run in runs]
        engine.calibrate(prepared)
        chunks = round_chunks(list(zip(candidates, runs)), prepared, workers)
        engine.max_batch = max(len(chunk) for chunk in chunks)
        finite, tally = [None] * len(chunks), {}
        for index, result in in_workers(train, chunks, workers):
            if isinstance(result, Lost):  # a bracket cannot narrow without its candidates
                raise RoundLost([candidate for candidate, _ in chunks[index]], result.reason)
            finite[index] = result[0]
            add_tallies(tally, result[1])
        stayed = {id(candidate): f for chunk, flags in zip(chunks, finite) for (candidate, _), f in zip(chunk, flags)}
        return [stayed[id(candidate)] for candidate in candidates], describe(tally)

    return narrow([Bracket(init, clip) for init, clip in combos], start, boundary, measure, out)


def round_chunks(items: list, prepared: list, workers: int) -> list:
    """A round's (candidate, run) pairs in chunks, each within one clip (the engine
    batches one clip kind at a time): an even share of the round for each worker,
    and no smaller than nanlab.sweeps.workers.chunk_copies. Bigger chunks are fewer
    steps, and each step pays a fixed cost in Python: on tanh_explosion a copy cost
    the same CPU time within 10% in batches of 16 and of 64, so smaller chunks than
    an even share would only add steps."""
    from nanlab.sweeps.workers import chunk_copies

    size = max(chunk_copies(prepared[0]), math.ceil(len(items) / workers))
    groups: dict = {}
    for item in items:
        groups.setdefault(item[0][0].clip, []).append(item)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def run_boundary(cfg, run_dir, overrides=None) -> int:
    """mode=boundary (nanlab.cli): write boundary.json (and boundary.png with plot=true).
    ``overrides`` are those cfg was composed from (by default, the running Hydra app's)."""
    from nanlab.lab import registry
    from nanlab.sweeps.engine import Engine
    from nanlab.sweeps.grid import PointConfigs, _hydra_overrides

    scenario = registry.load(cfg.scenario.name)
    broken = scenario.broken
    inits = list(cfg.boundary.init) if cfg.boundary.init is not None else [str(cfg.init.name)]
    clips = list(cfg.boundary.clip) if cfg.boundary.clip is not None else [str(cfg.clip.name)]
    combos = list(itertools.product(inits, clips))
    point_configs = PointConfigs(cfg, _hydra_overrides() if overrides is None else overrides)

    def configs(init: str, clip: str, lr: float):
        return point_configs({"init": init, "clip": clip, "lr": lr})

    print(f"boundary: {scenario.name}, variant {broken.name}, {len(combos)} combinations of init x clip, "
          f"lr in [{cfg.boundary.lr_min:g}, {cfg.boundary.lr_max:g}], {int(cfg.steps)} steps, "
          f"to {100 * cfg.boundary.precision:g}%")
    from nanlab.lab import threads
    from nanlab.sweeps.workers import worker_count

    engine = Engine(scenario, threads=threads.fixed(cfg.get("threads")) or 1)  # one thread a worker
    try:
        brackets = search(engine, broken, configs, combos, cfg.boundary, float(cfg.optimizer.lr),
                          workers=worker_count(cfg.sweep, str(cfg.device)))
    except RoundLost as err:  # not the user's input (exit 2): the run failed, and a rerun may not
        print(f"nanlab: error: {err}", file=sys.stderr)
        return 1
    entries = [b.entry() for b in brackets]
    print(render(entries))
    files = [jsonio.write_json(Path(run_dir) / BOUNDARY_JSON, entries)]
    if bool(cfg.plot):
        from nanlab.sweeps import maps

        files.append(maps.boundary_map(entries, Path(run_dir) / "boundary.png", scenario.name))
    for path in files:
        print(f"Wrote {path}")
    return 0


def render(entries: list) -> str:
    def num(x) -> str:
        return "-" if x is None else f"{x:.4g}"

    lines = [f"  {'init':<16} {'clip':<6} {'critical lr':>12} {'lo':>12} {'hi':>12}"]
    for e in entries:
        note = ""
        if e["hi"] is None:
            note = "  (finite at every lr tried)"
        elif e["lo"] is None:
            note = "  (non-finite at every lr tried)"
        lines.append(f"  {e['init']:<16} {e['clip']:<6} {num(e['critical_lr']):>12} {num(e['lo']):>12} "
                     f"{num(e['hi']):>12}{note}")
    return "\n".join(lines)
