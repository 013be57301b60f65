"""mode=sweep: the whole grid in this one process, trained on the batched engine
(nanlab.sweeps.engine) wherever the scenario's model allows; it writes the same
summary.csv and summary.md as a Hydra multirun of the same overrides, row for row.
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from nanlab import jsonio
from nanlab.errors import ConfigError
from nanlab.sweeps.summary import (AXES, GROUP_AXES, SUMMARY_CSV, SUMMARY_MD, Summary, draw_stability,
                                   format_value, read_csv_rows, whole_rows)


@dataclass
class Grid:
    """The axes of a mode=sweep grid, in the order given on the command line: the
    last axis varies fastest, as in a Hydra multirun of the same overrides."""

    axes: list  # (axis name, override key, values)

    @classmethod
    def from_config(cls, cfg, order: Sequence[str] = ()) -> "Grid":
        given = [name for name in AXES if cfg.sweep.get(name) is not None]
        ordered = [name for name in order if name in given]
        ordered += [name for name in given if name not in ordered]
        return cls([(name, AXES[name], list(cfg.sweep[name])) for name in ordered])

    @property
    def keys(self) -> list:
        return [key for _, key, _ in self.axes]

    def __len__(self) -> int:
        return math.prod(len(values) for _, _, values in self.axes)

    def points(self) -> list:
        """Each point as {axis name: value}, in job order."""
        names = [name for name, _, _ in self.axes]
        return [dict(zip(names, combo)) for combo in itertools.product(*(values for _, _, values in self.axes))]

    def columns(self, point: dict) -> dict:
        return {AXES[name]: format_value(AXES[name], value) for name, value in point.items()}


def axis_order(overrides: Sequence[str]) -> list:
    """The sweep.* axes in the order the overrides name them."""
    names = []
    for text in overrides:
        key = text.lstrip("+~").split("=", 1)[0]
        if key.startswith("sweep.") and key[6:] in AXES:
            names.append(key[6:])
    return names


def _hydra_overrides() -> list:
    """The task overrides of the running Hydra app (empty outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


class PointConfigs:
    """The finalized config of each grid point, as a multirun job would compose it.

    Hydra composes once per combination of group choices (optimizer, clip, init),
    keeping the run's other overrides (``overrides``: those ``cfg`` was composed
    from); the other axes are set on a copy of that."""

    def __init__(self, cfg, overrides: Sequence[str]):
        self.cfg = cfg
        self.base = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
        self._composed: dict = {}
        self._plain: dict = {}

    def _combo(self, point: dict):
        from nanlab.config.compose import compose

        choices = tuple((name, point[name]) for name in GROUP_AXES if name in point)
        if not choices:
            return self.cfg
        if choices not in self._composed:
            chosen = {name for name, _ in choices}
            keep = [o for o in self.base if o.lstrip("+~").split("=", 1)[0] not in chosen]
            composed = compose(keep + [f"{name}={value}" for name, value in choices])
            for key in ("scenario", "steps", "seed", "dtype", "device", "variant"):
                if composed.get(key) != self.cfg.get(key):
                    raise ValueError(f"the overrides given ({' '.join(self.base) or 'none'}) do not compose the "
                                     f"config being swept ({key} differs): pass the overrides it was composed from")
            self._composed[choices] = composed
        return self._composed[choices]

    def __call__(self, point: dict):
        import copy

        from omegaconf import OmegaConf

        combo = self._combo(point)
        if id(combo) not in self._plain:
            plain = OmegaConf.to_container(combo)
            # A point is one run, as a multirun job is: the grid's axes are not part of
            # its config (a 64-value list carried by each of 64 configs took about a
            # second to build).
            plain["sweep"] = {**plain["sweep"], **{axis: None for axis in AXES}}
            self._plain[id(combo)] = plain
        plain = copy.deepcopy(self._plain[id(combo)])
        for name, value in point.items():
            if name == "lr":
                plain["optimizer"]["lr"] = float(value)
            elif name == "clip_threshold":
                plain["clip"]["threshold"] = float(value)
            elif name in ("dtype", "seed"):
                plain[name] = value
        return OmegaConf.create(plain)


def run_sweep(cfg, run_dir) -> int:
    """mode=sweep (nanlab.cli): the grid in this process; exit status 1 if a point failed."""
    summary, failed = sweep(cfg, run_dir, _hydra_overrides())
    return 1 if failed else 0


def sweep(cfg, run_dir, overrides: Sequence[str] = (), out: Callable[[str], None] = print) -> tuple:
    """Run cfg's grid (``cfg.sweep.*``) into ``run_dir``; (Summary, number of failed points).

    Rows are appended to summary.csv and flushed one at a time, as the points of
    each batch finish; ``sweep.resume=true`` keeps the rows already there and runs
    only the rest."""
    from nanlab.lab import registry
    from nanlab.lab.runner import chosen_variants
    from nanlab.lab.scenario import ContractError

    run_dir = Path(run_dir)
    grid = Grid.from_config(cfg, axis_order(overrides))
    scenario = registry.load(cfg.scenario.name)
    variants = chosen_variants(scenario, cfg.get("variant"))
    summary = Summary(grid.keys, [v.name for v in variants], scenario=scenario.name, steps=int(cfg.steps),
                      broken=next((v.name for v in variants if v.role == "broken"), None))
    points = grid.points()
    done, dropped = _resume(summary, run_dir / SUMMARY_CSV, bool(cfg.sweep.resume), grid)
    todo = [p for p in points if tuple(grid.columns(p).values()) not in done]
    keys_text = " x ".join(f"{key} ({len(values)})" for _, key, values in grid.axes) or "no axes (one point)"
    out(f"sweep: {scenario.name}, {len(points)} points: {keys_text}; variants: {', '.join(summary.variants)}"
        + (f"; resuming: {len(points) - len(todo)} rows already in {SUMMARY_CSV}" if done else "")
        + (f"; {dropped} damaged, failed or repeated lines dropped, their points run again" if dropped else ""))

    from nanlab.lab import threads
    from nanlab.sweeps.engine import Engine, Run

    engine = Engine(scenario, force_loop=cfg.sweep.engine == "loop", max_batch=int(cfg.sweep.max_batch),
                    threads=threads.fixed(cfg.get("threads")))
    configs = PointConfigs(cfg, overrides)
    per_chunk = max(1, int(cfg.sweep.max_batch) // max(1, len(variants)))
    chunks = [todo[i:i + per_chunk] for i in range(0, len(todo), per_chunk)]
    failed, described = 0, set()
    with _progress(len(chunks)) as bar, open(run_dir / SUMMARY_CSV, "a", encoding="utf-8") as csv_file:
        for number, chunk in enumerate(chunks):
            # One config per point, shared by its variants: composing it costs more than a
            # short run's training, and the engine keys its per-config work on the object.
            runs = [Run(v, cfg) for cfg in map(configs, chunk) for v in variants]
            try:
                schedule = engine.schedule(runs)
                bar.plan(number, schedule.total_steps)
                _say_new(schedule.describe(), described, out)
                outcomes = engine.train(schedule, bar.advance)
                _say_new(schedule.describe(), described, out)  # a loss vmap refused moves to the loop
                rows = [summary.row(grid.columns(point), [o.result for o in outcomes[i:i + len(variants)]])
                        for point, i in zip(chunk, range(0, len(outcomes), len(variants)))]
            except (ConfigError, ContractError, KeyboardInterrupt):
                raise
            except Exception as err:  # one bad batch fails its rows, not the sweep
                failed += len(chunk)
                why = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                rows = [summary.row(grid.columns(point), status=why) for point in chunk]
            for row in rows:
                csv_file.write(summary.csv_line(row))
                csv_file.flush()
    by_key = {tuple(r[k] for k in grid.keys): r for r in read_csv_rows(run_dir / SUMMARY_CSV)[1]}
    summary.rows = [by_key[tuple(grid.columns(p).values())] for p in points if tuple(grid.columns(p).values()) in by_key]
    notes = [f"# Sweep summary: {scenario.name}", f"{len(summary.rows)} points, in-process sweep (mode=sweep)",
             *(f"- {line}" for line in sorted(described))]
    files = [jsonio.write_text(run_dir / SUMMARY_MD, summary.markdown(notes))]
    out(summary.markdown())
    if bool(cfg.plot):
        files += draw_stability(summary, run_dir)
    out(f"Wrote {run_dir / SUMMARY_CSV}")
    for path in files:
        out(f"Wrote {path}")
    return summary, failed


def _say_new(lines: list, said: set, out: Callable[[str], None]) -> None:
    for line in lines:
        if line not in said:
            said.add(line)
            out(line)


def _resume(summary: Summary, path: Path, resume: bool, grid: Grid) -> tuple:
    """Start summary.csv (header only), or with resume, keep the rows there that can
    be proved whole (each exactly once); (their swept values, lines dropped). Every
    other point is trained again."""
    if not resume or not path.exists():
        jsonio.write_text(path, summary.csv_line())
        return set(), 0
    wanted = {tuple(grid.columns(p).values()) for p in grid.points()}
    header, rows, dropped = whole_rows(path, summary.header, wanted, grid.keys)
    if header != summary.header:
        raise ConfigError("sweep.resume", "true", f"{path} was written for other columns ({', '.join(header)}); "
                          "resume with the same axes and variants, or use a new hydra.run.dir")
    if not rows and dropped:
        # Nothing provably whole and something there: a different grid is the likely
        # reason, and retraining everything silently would hide it.
        _, any_rows = read_csv_rows(path)
        stray = [tuple(r.get(k, "") for k in grid.keys) for r in any_rows]
        stray = [s for s in stray if s not in wanted]
        if stray:
            raise ConfigError("sweep.resume", "true", f"{path} holds rows outside this grid (e.g. "
                              f"{dict(zip(grid.keys, stray[0]))}); resume with the same grid")
    jsonio.write_text(path, summary.csv_line() + "".join(summary.csv_line(r) for r in rows.values()))
    return set(rows), dropped


class _progress:
    """A tqdm bar in steps, shown only once a sweep has run for a few seconds.

    Only the current chunk's steps are known ahead (scheduling a chunk builds its
    models); the total assumes the chunks still to come are like this one."""

    DELAY_S = 3.0

    def __init__(self, chunks: int):
        self.chunks, self.known = chunks, 0
        self.bar = None

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="step", delay=self.DELAY_S, desc="sweep", leave=False, file=sys.stderr,
                        disable=None)  # only on a terminal: logs stay clean
        return self

    def plan(self, number: int, steps: int) -> None:
        self.known += steps
        self.bar.total = self.known + steps * (self.chunks - number - 1)

    def advance(self, steps: int) -> None:
        self.bar.update(steps)

    def __exit__(self, *exc) -> None:
        self.bar.close()
