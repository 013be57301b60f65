"""mode=sweep: the whole grid, in chunks trained on the batched engine
(nanlab.sweeps.engine) wherever the scenario's model allows, by worker processes or
submitit jobs (nanlab.sweeps.workers); it writes the same summary.csv and summary.md
as a Hydra multirun of the same overrides, row for row.
"""
from __future__ import annotations

import copy
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from nanlab import jsonio
from nanlab.errors import ConfigError
from nanlab.sweeps.summary import (AXES, GROUP_AXES, SUMMARY_CSV, Summary, draw_stability, format_value,
                                   read_csv_rows, whole_rows)


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
        self._template: dict = {}  # id of a combination's config -> its points' config, pickled

    def _combo(self, point: dict):
        choices = tuple((name, point[name]) for name in GROUP_AXES if name in point)
        if not choices:
            return self.cfg
        if choices not in self._composed:
            self._composed[choices] = self._renamed(choices) or self._compose(choices)
        return self._composed[choices]

    def _compose(self, choices: tuple):
        from nanlab.config.compose import compose

        chosen = {name for name, _ in choices}
        keep = [o for o in self.base if o.lstrip("+~").split("=", 1)[0] not in chosen]
        composed = compose(keep + [f"{name}={value}" for name, value in choices])
        for key in ("scenario", "steps", "seed", "dtype", "device", "variant"):
            if composed.get(key) != self.cfg.get(key):
                raise ValueError(f"the overrides given ({' '.join(self.base) or 'none'}) do not compose the "
                                 f"config being swept ({key} differs): pass the overrides it was composed from")
        return composed

    def _renamed(self, choices: tuple):
        """A composed combination's config with the choice of each group that differs
        set by name, where the option chosen sets nothing but its own name (init and
        clip: nanlab.config.compose.setup): Hydra would compose the very same config,
        and a composition costs about 0.3 s. None where that does not hold."""
        from hydra.core.config_store import ConfigStore

        store = ConfigStore.instance()
        wanted = dict(choices)
        for done, composed in self._composed.items():
            if len(done) != len(choices) or any(name not in wanted for name, _ in done):
                continue
            differ = [(name, value) for name, value in done if wanted[name] != value]
            if all(set(store.load(f"{name}/{wanted[name]}.yaml").node) == {"name"} and
                   set(store.load(f"{name}/{value}.yaml").node) == {"name"} for name, value in differ):
                renamed = copy.deepcopy(composed)
                for name, _ in differ:
                    renamed[name].name = wanted[name]
                return renamed
        return None

    def __call__(self, point: dict):
        import pickle

        from omegaconf import OmegaConf

        combo = self._combo(point)
        if id(combo) not in self._template:
            plain = OmegaConf.to_container(combo)
            # A point is one run, as a multirun job is: the grid's axes are not part of
            # its config (a 64-value list carried by each of 64 configs took about a
            # second to build).
            plain["sweep"] = {**plain["sweep"], **{axis: None for axis in AXES}}
            # Unpickling a built DictConfig costs about a tenth of building one from
            # plain data (1 ms against 10 ms), and gives the same nodes and values.
            self._template[id(combo)] = pickle.dumps(OmegaConf.create(plain))
        cfg = pickle.loads(self._template[id(combo)])
        for name, value in point.items():
            if name == "lr":
                cfg.optimizer.lr = float(value)
            elif name == "clip_threshold":
                cfg.clip.threshold = float(value)
            elif name in ("dtype", "seed"):
                cfg[name] = value
        return cfg


# The axes whose values put runs in different batches (the engine batches only runs of
# one optimizer, clip, dtype and data): a chunk takes its points from one value of
# each, so that each of its batches is a whole chunk of copies.
BATCH_SPLITTING = ("optimizer", "clip", "dtype", "seed")


class GridJob:
    """What training a grid's points takes, built alike in this process, in a forked
    worker (inherited) and in a cluster job (from the config)."""

    def __init__(self, cfg, overrides: Sequence[str] = (), chunk: Optional[int] = None):
        from nanlab.lab import registry, threads
        from nanlab.lab.runner import chosen_variants
        from nanlab.sweeps.engine import Engine

        self.cfg, self.overrides = cfg, list(overrides)
        self.grid = Grid.from_config(cfg, axis_order(overrides))
        self.scenario = registry.load(cfg.scenario.name)
        self.variants = chosen_variants(self.scenario, cfg.get("variant"))
        self.summary = Summary(self.grid.keys, [v.name for v in self.variants], scenario=self.scenario.name,
                               steps=int(cfg.steps),
                               broken=next((v.name for v in self.variants if v.role == "broken"), None))
        self.configs = PointConfigs(cfg, overrides)
        # Each worker is one thread: the other cores are the other workers'.
        self.engine = Engine(self.scenario, force_loop=cfg.sweep.engine == "loop",
                             threads=threads.fixed(cfg.get("threads")) or 1)
        self.chunk = chunk

    def chunk_points(self, points: list) -> int:
        """Points per chunk: sweep.max_batch, or the copies the engine sizes a batch to."""
        if self.cfg.sweep.max_batch is not None:
            return int(self.cfg.sweep.max_batch)
        from nanlab.sweeps.engine import Run
        from nanlab.sweeps.workers import chunk_copies

        return chunk_copies(self.engine.prepare(Run(self.variants[0], self.configs(points[0]))))

    def chunks(self, points: list) -> list:
        """The points in chunks of ``self.chunk``, each within one value of every
        BATCH_SPLITTING axis, in grid order otherwise."""
        self.chunk = self.chunk or self.chunk_points(points)
        groups: dict = {}
        for point in points:
            groups.setdefault(tuple(point.get(name) for name in BATCH_SPLITTING), []).append(point)
        return [group[i:i + self.chunk] for group in groups.values() for i in range(0, len(group), self.chunk)]

    def train(self, points: list) -> tuple:
        """summary.csv's lines for these points, the engine's account of how they ran,
        and how many failed. One bad batch fails its rows, not the sweep."""
        from nanlab.lab.scenario import ContractError
        from nanlab.sweeps.engine import Run

        self.engine.max_batch = self.chunk or len(points)
        # One config per point, shared by its variants: composing it costs more than a
        # short run's training, and the engine keys its per-config work on the object.
        runs = [Run(v, cfg) for cfg in map(self.configs, points) for v in self.variants]
        n = len(self.variants)
        try:
            schedule = self.engine.schedule(runs)
            outcomes = self.engine.train(schedule)
            rows = [self.summary.row(self.grid.columns(point), [o.result for o in outcomes[i:i + n]])
                    for point, i in zip(points, range(0, len(outcomes), n))]
            return [self.summary.csv_line(row) for row in rows], schedule.tally(), 0
        except (ConfigError, ContractError, KeyboardInterrupt):
            raise
        except Exception as err:
            why = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            return [self.summary.csv_line(self.summary.row(self.grid.columns(p), status=why)) for p in points], {}, \
                len(points)


def run_sweep(cfg, run_dir) -> int:
    """mode=sweep (nanlab.cli): the grid in this process; exit status 1 if a point failed."""
    summary, failed = sweep(cfg, run_dir, _hydra_overrides())
    return 1 if failed else 0


def sweep(cfg, run_dir, overrides: Sequence[str] = (), out: Callable[[str], None] = print) -> tuple:
    """Run cfg's grid (``cfg.sweep.*``) into ``run_dir``; (Summary, number of failed points).

    The grid is trained in chunks, by ``sweep.workers`` processes (or submitit jobs,
    ``sweep.launcher``). Rows are appended to summary.csv and flushed as each chunk
    finishes; ``sweep.resume=true`` keeps the rows already there and trains only the
    rest. At the end summary.csv is written again in grid order, whatever order the
    chunks finished in."""
    from nanlab.sweeps import workers as pool

    run_dir = Path(run_dir)
    job = GridJob(cfg, overrides)
    grid, summary = job.grid, job.summary
    points = grid.points()
    if cfg.sweep.resume:
        _collect_job_rows(run_dir, summary)
    done, dropped = _resume(summary, run_dir / SUMMARY_CSV, bool(cfg.sweep.resume), grid)
    todo = [p for p in points if tuple(grid.columns(p).values()) not in done]
    chunks = job.chunks(todo) if todo else []
    workers = min(pool.worker_count(cfg.sweep, str(cfg.device)), max(1, len(chunks)))
    launcher = str(cfg.sweep.launcher)
    trainers = f"{workers} {'worker' if launcher == 'local' else launcher + ' job'}{'s' if workers > 1 else ''}"
    keys_text = " x ".join(f"{key} ({len(values)})" for _, key, values in grid.axes) or "no axes (one point)"
    out(f"sweep: {job.scenario.name}, {len(points)} points: {keys_text}; variants: {', '.join(summary.variants)}"
        + (f"; resuming: {len(points) - len(todo)} rows already in {SUMMARY_CSV}" if done else "")
        + (f"; {dropped} damaged, failed or repeated lines dropped, their points run again" if dropped else "")
        + (f"; {len(chunks)} chunk{'s' if len(chunks) > 1 else ''} of up to {job.chunk} "
           f"point{'s' if job.chunk > 1 else ''}, {trainers}" if chunks else ""))

    if launcher == "local":
        finished = _local(job, chunks, workers)
    else:
        finished = _submitted(job, chunks, workers, run_dir)
    from nanlab.sweeps.engine import add_tallies, describe

    failed, tally = 0, {}
    with _progress(len(todo)) as bar, open(run_dir / SUMMARY_CSV, "a", encoding="utf-8") as csv_file:
        for lines, how, bad, lost, points_done in finished:
            csv_file.write("".join(lines))
            csv_file.flush()
            add_tallies(tally, how)
            failed += bad + lost[0]
            if lost[0]:
                out(f"sweep: {lost[0]} point{'s' if lost[0] > 1 else ''} lost: {lost[1]}; "
                    "sweep.resume=true trains them again")
            bar.update(points_done)
    for line in describe(tally):
        out(line)
    by_key = {tuple(r[k] for k in grid.keys): r for r in read_csv_rows(run_dir / SUMMARY_CSV)[1]}
    summary.rows = [by_key[tuple(grid.columns(p).values())] for p in points if tuple(grid.columns(p).values()) in by_key]
    notes = [f"# Sweep summary: {job.scenario.name}", f"{len(summary.rows)} points, mode=sweep on {trainers}",
             *(f"- {line}" for line in describe(tally))]
    files = summary.write(run_dir, notes)
    out(summary.markdown())
    if bool(cfg.plot):
        files += draw_stability(summary, run_dir)
    for path in files:
        out(f"Wrote {path}")
    return summary, failed


def _local(job: GridJob, chunks: list, workers: int):
    """Per chunk as it finishes: (lines, how it ran, failed, (points lost, why), points)."""
    from nanlab.sweeps.workers import Lost, in_workers

    for index, result in in_workers(job.train, chunks, workers):
        if isinstance(result, Lost):
            yield [], {}, 0, (len(chunks[index]), result.reason), len(chunks[index])
        else:
            yield (*result, (0, ""), len(chunks[index]))


ROWS_DIR = "rows"


def train_job(plain_cfg: dict, overrides: list, chunk: int, chunks: list, rows_path: str) -> tuple:
    """One submitit job: train these chunks, appending each one's rows to this job's
    own file as it finishes; (how they ran, how many points failed)."""
    from omegaconf import OmegaConf

    from nanlab.sweeps.engine import add_tallies
    from nanlab.sweeps.workers import one_thread

    one_thread()
    job = GridJob(OmegaConf.create(plain_cfg), overrides, chunk)
    tally, failed = {}, 0
    with open(rows_path, "a", encoding="utf-8") as rows:
        for points in chunks:
            lines, how, bad = job.train(points)
            rows.write("".join(lines))
            rows.flush()
            add_tallies(tally, how)
            failed += bad
    return tally, failed


def _submitted(job: GridJob, chunks: list, jobs: int, run_dir: Path):
    """The chunks dealt round-robin to ``jobs`` submitit jobs; per job as it is
    collected: the rows its file holds, and the points of its chunks without one."""
    import csv
    import io

    from omegaconf import OmegaConf

    from nanlab.sweeps import workers

    executor = workers.executor(job.cfg.sweep, run_dir / "submitit")
    folder = run_dir / ROWS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    plain = OmegaConf.to_container(job.cfg, resolve=True)
    dealt = [chunks[k::jobs] for k in range(jobs)]
    paths = [folder / f"job-{k}.csv" for k in range(jobs)]
    for path in paths:
        jsonio.write_text(path, "")  # a job appends to its own file, empty at the start
    submitted = [executor.submit(train_job, plain, job.overrides, job.chunk, mine, str(path))
                 for mine, path in zip(dealt, paths)]
    for handle, mine, path in zip(submitted, dealt, paths):
        try:
            how, failed = handle.result()
            why = ""
        except Exception as err:  # the job died or raised: the rows it wrote still count
            how, failed = {}, 0
            why = f"job {handle.job_id} failed: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err) else ''}"
        text = path.read_text(encoding="utf-8")
        lines = text[: text.rfind("\n") + 1].splitlines(keepends=True)  # a line cut short is not a row
        written = {tuple(row[:len(job.grid.keys)]) for row in csv.reader(io.StringIO("".join(lines)))}
        asked = sum(len(points) for points in mine)
        lost = sum(tuple(job.grid.columns(p).values()) not in written for points in mine for p in points)
        yield lines, how, failed, (lost, why or "its job ended without writing them"), asked
        path.replace(folder / f"collected-{path.name}")  # its rows are in summary.csv now: not collected again


def _collect_job_rows(run_dir: Path, summary: Summary) -> None:
    """Append to summary.csv the rows cluster jobs wrote that no submitting process
    collected (it ended before they did), for resume to judge like any other row."""
    files = sorted((run_dir / ROWS_DIR).glob("job-*.csv"))
    if not files:
        return
    path = run_dir / SUMMARY_CSV
    text = (path.read_bytes() if path.exists() else b"") or summary.csv_line().encode()
    whole = [text[: text.rfind(b"\n") + 1]]  # a line cut short would swallow the next one
    for file in files:
        rows = file.read_bytes()
        whole.append(rows[: rows.rfind(b"\n") + 1])
    jsonio.write_bytes(path, b"".join(whole))
    for file in files:
        file.replace(file.with_name(f"collected-{file.name}"))


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
    """A tqdm bar in points, shown only once a sweep has run for a few seconds, and
    only on a terminal: logs stay clean."""

    DELAY_S = 3.0

    def __init__(self, points: int):
        self.points = points

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=self.points, unit="point", delay=self.DELAY_S, desc="sweep", leave=False,
                        file=sys.stderr, disable=None)
        return self

    def update(self, points: int) -> None:
        self.bar.update(points)

    def __exit__(self, *exc) -> None:
        self.bar.close()
