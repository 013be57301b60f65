"""Sweeps: a grid of configs, run two ways, summarized the same way.

- ``python -m nanlab -m scenario=... optimizer.lr=0.01,0.1 clip=none,norm`` is a Hydra
  multirun: one job per config, with any launcher (basic, joblib, submitit). Each job
  writes its result.json; :class:`SweepSummary`, a Hydra callback, reads them all at
  the end (``on_multirun_end``, in the main process) and writes summary.csv and
  summary.md into the sweep dir.
- ``python -m nanlab mode=sweep scenario=... sweep.lr=[...] sweep.clip=[...]`` runs the
  whole grid in this one process (nanlab.sweeps.grid) and writes the same two files
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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.experimental.callback import Callback

from nanlab import jsonio
from nanlab.config import options
from nanlab.lab.result import ScenarioResult, VariantResult

# sweep.<axis> -> the override that sets it in a multirun, which names its column.
AXES = {axis: spec.override for axis, spec in options.SWEEP_AXES.items()}
# Group axes pick a config group (a different optimizer brings its own defaults), so
# each choice is composed by Hydra; the others are single values set on top.
GROUP_AXES = tuple(axis for axis, spec in options.SWEEP_AXES.items() if spec.group)
VARIANT_COLUMNS = ("first_nonfinite_step", "final_loss", "learned")
STATUS = "status"
OK = "ok"
SUMMARY_CSV, SUMMARY_MD = "summary.csv", "summary.md"


# ---------------------------------------------------------------------------
# Rows and tables


def _field_type(key: str):
    """The schema's type at a dotted key (float for optimizer.lr), or None."""
    from nanlab.config import schema

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
            return _readable(text).replace("|", "\\|") if text else " "

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


def _readable(text: str) -> str:
    """A cell as a person reads it: a float to 4 significant digits (0.4160, 6.271e+35);
    summary.csv keeps the full repr, so nothing is lost."""
    if text.lstrip("-").isdigit() or text in ("true", "false", OK):
        return text
    try:
        value = float(text)
    except ValueError:
        return text
    return f"{value:.4g}"


def _cell_is_whole(column: str, text: str) -> bool:
    """Whether one variant cell reads as the summary writes it."""
    if column.endswith(".first_nonfinite_step"):
        return text == "" or text.isdigit()
    if column.endswith(".final_loss"):
        try:
            return text == "" or isinstance(float(text), float)
        except ValueError:
            return False
    if column.endswith(".learned"):
        return text in ("true", "false")
    return True


def whole_rows(path: Path, header: list, wanted: set, keys: list) -> tuple:
    """The rows of a summary.csv that can be proved whole, for sweep.resume:
    (header read, {key values: row}, number of lines dropped).

    Each row is one line, so each is judged on its own: it must decode, parse to
    exactly the header's columns, name a point of ``wanted``, hold cells of the
    right form and status ok. A line that fails any of these (garbled, cut, a
    failed point, a repeat of a point already read) is dropped, and its point is
    trained again; one bad line can no longer swallow the lines after it."""
    lines = path.read_bytes().split(b"\n")
    try:
        first = next(csv.reader([lines[0].decode("utf-8")])) if lines[0] else []
    except (UnicodeDecodeError, csv.Error):
        first = []
    rows, dropped = {}, 0
    for raw in lines[1:]:
        if not raw:
            continue
        try:
            cells = next(csv.reader([raw.decode("utf-8")]))
        except (UnicodeDecodeError, csv.Error, StopIteration):
            dropped += 1
            continue
        row = dict(zip(header, cells))
        point = tuple(row.get(k) for k in keys)
        if (len(cells) != len(header) or point not in wanted or point in rows or row[STATUS] != OK
                or not all(_cell_is_whole(c, row[c]) for c in header)):
            dropped += 1
            continue
        rows[point] = row
    return first, rows, dropped


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
    from nanlab.sweeps import maps

    return [maps.stability_map(summary, Path(folder) / "stability.png")]
