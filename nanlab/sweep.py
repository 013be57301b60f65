"""Sweeps: a grid of configs, run two ways, summarized the same way.

- ``python -m nanlab -m scenario=... optimizer.lr=0.01,0.1 clip=none,norm`` is a Hydra
  multirun: one job per config, with any launcher (basic, joblib, submitit). Each job
  writes its result.json; :class:`SweepSummary`, a Hydra callback, reads them all at
  the end (``on_multirun_end``, in the main process) and writes summary.csv and
  summary.md into the sweep dir.
- ``python -m nanlab mode=sweep scenario=... sweep.lr=[...] sweep.clip=[...]`` runs the
  whole grid in this one process (:func:`run_sweep`), on the batched engine
  (nanlab.batched) wherever the scenario's model allows, and writes the same two files
  with the same columns, row for row.

A summary has one row per job (grid point), in job order: a column per swept key,
named as its override (``optimizer.lr``, ``clip``), then for each variant
``<variant>.first_nonfinite_step`` (empty when it stayed finite),
``<variant>.final_loss`` and ``<variant>.learned``, then ``status``: ``ok``, or what
went wrong with that job.

This module imports neither torch nor matplotlib: Hydra instantiates the callback
in every run, and the summary of a multirun needs only the saved results.
"""
from __future__ import annotations

import atexit
import csv
import io
import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra.experimental.callback import Callback

from nanlab import jsonio
from nanlab.errors import ConfigError
from nanlab.result import ScenarioResult, VariantResult

# sweep.<axis> -> the override that sets it in a multirun, which names its column.
AXES = {"optimizer": "optimizer", "lr": "optimizer.lr", "clip": "clip", "clip_threshold": "clip.threshold",
        "init": "init", "dtype": "dtype", "seed": "seed"}
# Group axes pick a config group (a different optimizer brings its own defaults), so
# each choice is composed by Hydra; the others are single values set on top.
GROUP_AXES = ("optimizer", "clip", "init")
VARIANT_COLUMNS = ("first_nonfinite_step", "final_loss", "learned")
STATUS = "status"
OK = "ok"
SUMMARY_CSV, SUMMARY_MD = "summary.csv", "summary.md"


# ---------------------------------------------------------------------------
# Rows and tables


def _field_type(key: str):
    """The schema's type at a dotted key (float for optimizer.lr), or None."""
    from nanlab import schema

    node: Any = schema.Config
    for part in key.split("."):
        fields_ = getattr(node, "__dataclass_fields__", {})
        if part not in fields_:
            return None
        node = fields_[part].type
        if isinstance(node, str):
            node = eval(node, vars(schema))
    return node


def format_value(key: str, value) -> str:
    """A swept value as the summary writes it: floats by repr (1e-2 and 0.01 both read
    0.01), so that a multirun's and mode=sweep's rows compare as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if _field_type(key) is float and isinstance(value, (int, float)):
        return repr(float(value))
    return str(getattr(value, "value", value))


def variant_cells(v: VariantResult) -> dict:
    first = v.first_nonfinite
    return {f"{v.name}.first_nonfinite_step": "" if first is None else str(first.step),
            f"{v.name}.final_loss": "" if v.final_loss is None else repr(float(v.final_loss)),
            f"{v.name}.learned": "true" if v.learned else "false"}


@dataclass
class Summary:
    """The table both paths write: swept keys, per-variant columns, status."""

    keys: list
    variants: list
    rows: list = field(default_factory=list)  # dicts, column -> text
    broken: Optional[str] = None  # the broken variant's name, for the stability map
    scenario: str = ""
    steps: Optional[int] = None

    @property
    def header(self) -> list:
        return [*self.keys, *(f"{v}.{c}" for v in self.variants for c in VARIANT_COLUMNS), STATUS]

    def row(self, values: dict, variants: Sequence[VariantResult] = (), status: str = OK) -> dict:
        row = {column: "" for column in self.header}
        row.update({key: values[key] for key in self.keys})
        for v in variants:
            row.update({k: c for k, c in variant_cells(v).items() if k in row})
        row[STATUS] = status
        return row

    def csv_line(self, row: Optional[dict] = None) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(self.header if row is None else [row[c] for c in self.header])
        return out.getvalue()

    def csv_text(self) -> str:
        return self.csv_line() + "".join(self.csv_line(r) for r in self.rows)

    def markdown(self, notes: Sequence[str] = ()) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|") if text else " "

        lines = [*notes, *([""] if notes else []),
                 "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(cell(r[c]) for c in self.header) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path, notes: Sequence[str] = ()) -> list:
        """summary.csv and summary.md, each written whole (atomically)."""
        return [jsonio.write_text(folder / SUMMARY_CSV, self.csv_text()),
                jsonio.write_text(folder / SUMMARY_MD, self.markdown(notes))]


def read_csv_rows(path: Path) -> tuple:
    """(header, rows) of a summary.csv; a last line cut short by an interruption is
    dropped, and so is the file's tail after it."""
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        jsonio.write_text(path, text)
    records = list(csv.reader(io.StringIO(text)))
    if not records:
        return [], []
    header = records[0]
    return header, [dict(zip(header, r)) for r in records[1:] if len(r) == len(header)]


# ---------------------------------------------------------------------------
# The Hydra callback: summarize a multirun from its jobs' result.json files


def _parse_overrides(overrides: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def expected_jobs(config) -> tuple:
    """(swept keys, each job's override list) of a basic-sweeper multirun, in job
    order, as Hydra's BasicSweeper enumerates them (every launcher uses it)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from omegaconf import OmegaConf

    task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + task
    parsed = _parse_overrides(arguments)
    keys = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override() and key not in keys:
            keys.append(key)
    (jobs,) = BasicSweeper.split_arguments(parsed, None)
    return keys, jobs


def job_dirs(sweep_dir: Path, output_subdir: str) -> dict:
    """Each job folder under the sweep dir, by its override list (from .hydra/overrides.yaml)."""
    from omegaconf import OmegaConf

    found = {}
    for path in sorted(sweep_dir.rglob("overrides.yaml"), key=lambda p: p.stat().st_mtime):
        if path.parent.name != output_subdir:
            continue
        overrides = OmegaConf.to_container(OmegaConf.load(path))
        if isinstance(overrides, list):
            found[tuple(overrides)] = path.parent.parent  # a later sweep into the same dir wins
    return found


def summarize_multirun(config) -> tuple:
    """The Summary of a multirun's sweep dir and the sweep dir itself."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    keys, jobs = expected_jobs(config)
    folders = job_dirs(sweep_dir, str(config.hydra.output_subdir or ".hydra"))
    loaded = []
    for overrides in jobs:
        values = {}
        for override in _parse_overrides(overrides):
            key = override.get_key_element()
            if key in keys:
                values[key] = format_value(key, override.value())
        folder = folders.get(tuple(overrides))
        if folder is None:
            loaded.append((values, None, "not run: no job folder (the sweep stopped before this job)"))
            continue
        path = folder / "result.json"
        where = folder.relative_to(sweep_dir) if folder.is_relative_to(sweep_dir) else folder
        if not path.exists():
            loaded.append((values, None, f"failed: no result.json in {where}"))
            continue
        try:
            loaded.append((values, ScenarioResult.load(path), OK))
        except (OSError, ValueError, KeyError, TypeError) as err:
            loaded.append((values, None, f"failed: {where}/result.json unreadable ({type(err).__name__}: {err})"))
    variants, broken, scenario, steps = [], None, "", None
    for _, result, _ in loaded:
        if result is None:
            continue
        variants += [v.name for v in result.variants if v.name not in variants]
        if result.broken is not None and broken is None:
            broken, scenario, steps = result.broken.name, result.scenario, int(result.config.get("steps", 0)) or None
    summary = Summary(keys, variants, broken=broken, scenario=scenario, steps=steps)
    for values, result, status in loaded:
        summary.rows.append(summary.row(values, result.variants if result else (), status))
    return summary, sweep_dir


class SweepSummary(Callback):
    """Writes summary.csv and summary.md into a multirun's sweep dir, and prints the table.

    Registered under ``hydra.callbacks`` in conf/config.yaml. ``on_multirun_end``
    fires in the main process with every launcher, but Hydra skips it when a job
    failed (the sweep re-raises that job's exception) or the sweep was interrupted;
    an exit hook registered at ``on_multirun_start`` writes the summary then, with
    those jobs' rows saying what happened to them."""

    def __init__(self) -> None:
        self._config = None
        self._done = False

    def on_multirun_start(self, config, **kwargs) -> None:
        self._config = config
        atexit.register(self._at_exit)

    def on_multirun_end(self, config, **kwargs) -> None:
        atexit.unregister(self._at_exit)
        self._write(config)

    def _at_exit(self) -> None:
        if not self._done and self._config is not None:
            print("nanlab: the sweep did not finish; summarizing the jobs that did", file=sys.stderr)
            self._write(self._config)

    def _write(self, config) -> None:
        self._done = True
        summary, sweep_dir = summarize_multirun(config)
        failed = sum(r[STATUS] != OK for r in summary.rows)
        notes = [f"# Sweep summary: {summary.scenario or 'multirun'}",
                 f"{len(summary.rows)} jobs ({failed} without a result), Hydra multirun in {sweep_dir}"]
        files = summary.write(sweep_dir, notes)
        print(summary.markdown())
        if bool(config.get("plot", False)):
            files += draw_stability(summary, sweep_dir)
        for path in files:
            print(f"Wrote {path}")


def draw_stability(summary: Summary, folder: Path) -> list:
    """stability.png for a summary that swept the lr; a line saying why not otherwise."""
    lr_key = AXES["lr"]
    if lr_key not in summary.keys or summary.broken is None:
        print(f"nanlab: no stability map: it needs {lr_key} among the swept keys and a broken variant in the results")
        return []
    from nanlab import maps

    return [maps.stability_map(summary, Path(folder) / "stability.png")]


# ---------------------------------------------------------------------------
# mode=sweep: the grid in one process


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
        from nanlab.config import compose

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
    from nanlab import registry
    from nanlab.runner import chosen_variants
    from nanlab.scenario import ContractError

    run_dir = Path(run_dir)
    grid = Grid.from_config(cfg, axis_order(overrides))
    scenario = registry.load(cfg.scenario.name)
    variants = chosen_variants(scenario, cfg.get("variant"))
    summary = Summary(grid.keys, [v.name for v in variants], scenario=scenario.name, steps=int(cfg.steps),
                      broken=next((v.name for v in variants if v.role == "broken"), None))
    points = grid.points()
    done = _resume(summary, run_dir / SUMMARY_CSV, bool(cfg.sweep.resume), grid)
    todo = [p for p in points if tuple(grid.columns(p).values()) not in done]
    keys_text = " x ".join(f"{key} ({len(values)})" for _, key, values in grid.axes) or "no axes (one point)"
    out(f"sweep: {scenario.name}, {len(points)} points: {keys_text}; variants: {', '.join(summary.variants)}"
        + (f"; resuming: {len(points) - len(todo)} rows already in {SUMMARY_CSV}" if done else ""))

    from nanlab.batched import Engine, Run

    engine = Engine(scenario, force_loop=cfg.sweep.engine == "loop", max_batch=int(cfg.sweep.max_batch))
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


def _resume(summary: Summary, path: Path, resume: bool, grid: Grid) -> set:
    """Start summary.csv (header only), or with resume, check the one there and
    return the swept values of the rows it already holds."""
    if not resume or not path.exists():
        jsonio.write_text(path, summary.csv_line())
        return set()
    header, rows = read_csv_rows(path)
    if header != summary.header:
        raise ConfigError("sweep.resume", "true", f"{path} was written for other columns ({', '.join(header)}); "
                          "resume with the same axes and variants, or use a new hydra.run.dir")
    wanted = {tuple(grid.columns(p).values()) for p in grid.points()}
    done = {tuple(r[k] for k in grid.keys) for r in rows if r[STATUS] == OK}
    stray = done - wanted
    if stray:
        raise ConfigError("sweep.resume", "true", f"{path} holds rows outside this grid (e.g. "
                          f"{dict(zip(grid.keys, sorted(stray)[0]))}); resume with the same grid")
    if len(done) != len(rows):  # failed rows are run again: keep only the good ones
        jsonio.write_text(path, summary.csv_line() + "".join(
            summary.csv_line({c: r[c] for c in summary.header}) for r in rows if r[STATUS] == OK))
    return done


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

        self.bar = tqdm(total=0, unit="step", delay=self.DELAY_S, desc="sweep", leave=False, file=sys.stderr)
        return self

    def plan(self, number: int, steps: int) -> None:
        self.known += steps
        self.bar.total = self.known + steps * (self.chunks - number - 1)

    def advance(self, steps: int) -> None:
        self.bar.update(steps)

    def __exit__(self, *exc) -> None:
        self.bar.close()
