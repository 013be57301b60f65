"""mode=report: the handout, one self-contained HTML page built from saved results.

Each scenario's result.json is written to a results folder, and the page is built
from that folder through ``ScenarioResult.load``. A teacher can rerun one scenario
into the same folder (``report.scenarios=[...] report.results=DIR``) and rebuild the
page without rerunning the rest, or rebuild it alone (``report.run=false``).
Images are embedded as data URIs, so the page opens anywhere and prints as it shows.
"""
from __future__ import annotations

import base64
import sys
from collections import Counter
from html import escape
from pathlib import Path

from nanlab import jsonio
from nanlab.lab import registry, verdicts
from nanlab.errors import ConfigError
from nanlab.reports.scenario_report import html_section, verdict_text
from nanlab.lab.result import ScenarioResult, Verdict

SWEEP_FIGURES = ("stability.png", "boundary.png")

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #111; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; } h2 { margin-top: 2.2em; border-bottom: 2px solid #333; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 4px 6px; vertical-align: top; text-align: left; }
th { background: #eee; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.role-broken td:first-child { border-left: 4px solid #000; }
tr.role-fix td:first-child { border-left: 4px dashed #666; }
tr.role-myth td:first-child { border-left: 4px dotted #666; }
pre.mechanism { background: #f6f6f6; padding: 0.6em 0.8em; white-space: pre-wrap; font-size: 0.92em; }
figure { margin: 1em 0; } img { max-width: 100%; } figcaption { font-size: 0.85em; color: #444; }
.verdict { font-weight: 600; } .evidence { font-size: 0.88em; color: #333; margin: 0.2em 0 0.6em; }
ul.claims { padding-left: 1.2em; } .scenario-verdict { font-weight: 600; }
.v-confirmed::before { content: "\\2713  "; } .v-refuted::before { content: "\\2717  "; }
.v-partly::before { content: "\\00BD  "; } .v-not_decided::before { content: "?  "; }
.meta { color: #444; font-size: 0.9em; }
@media print {
  /* A page per scenario, and the summary table on the first page: sized to fit US
     Letter, the shorter of Letter and A4. */
  @page { margin: 12mm; }
  body { margin: 0; max-width: none; font-size: 8.5pt; line-height: 1.3; }
  h1 { font-size: 15pt; } h2 { font-size: 12pt; margin: 0 0 0.3em; } h3 { font-size: 9pt; margin: 0.6em 0 0.2em; }
  table { font-size: 7.5pt; } th, td { padding: 1px 4px; }
  pre.mechanism { font-size: 7.5pt; padding: 0.3em 0.5em; margin: 0.2em 0; }
  .evidence { font-size: 7.5pt; } ul.claims { margin: 0.2em 0; }
  figure { margin: 0.4em 0; } figure img { max-height: 6.5cm; width: auto; max-width: 100%; }
  section { break-before: page; } a { color: inherit; text-decoration: none; }
  table.summary, figure, tr, li { break-inside: avoid; }
  thead { display: table-header-group; }
}
"""


def load_results(folder: Path) -> list[ScenarioResult]:
    """Every ``<scenario>/result.json`` in the folder, in scenario-name order. Each is
    rendered once without its figure as it is read, so a file that loads but holds
    the wrong types is refused here, by name, rather than half-way through the page."""
    results = []
    for path in sorted(folder.glob("*/result.json")):
        try:
            result = ScenarioResult.load(path)
            summary_table([result])
            html_section(result, figure=False)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as err:
            why = str(err).splitlines()[0][:200] if str(err) else ""
            raise ConfigError("report.results", str(path), f"cannot be read as a nanlab result.json "
                              f"({type(err).__name__}{': ' + why if why else ''})") from None
        results.append(result)
    return sorted(results, key=lambda r: r.scenario)


def _yes_no(value) -> str:
    return {True: "yes", False: "NO", None: "not measured"}[value]


def summary_table(results: list[ScenarioResult]) -> str:
    rows = []
    for r in results:
        broken = r.broken
        event = broken.first_nonfinite.event if broken and broken.first_nonfinite and broken.first_nonfinite.event else None
        counts = Counter(c.verdict for c in r.claims)
        claims = ", ".join(f"{counts[v]} {v.value}" for v in Verdict if counts[v]) or "-"
        step = broken.nonfinite_step if broken else None
        rows.append(
            f'<tr data-scenario="{escape(r.scenario)}"><td><a href="#{escape(r.scenario)}">{escape(r.scenario)}</a></td>'
            f"<td>{escape(r.summary)}</td>"
            f'<td data-value="{escape(str(r.reproduced))}">{_yes_no(r.reproduced)}</td>'
            f'<td data-value="{escape(str(r.fixed))}">{_yes_no(r.fixed)}</td>'
            f'<td class="num" data-value="{"" if step is None else escape(str(step))}">{"-" if step is None else escape(str(step))}</td>'
            f"<td>{escape(event.op) if event else '-'}</td><td>{escape(claims)}</td></tr>")
    return ("<table class=\"summary\"><thead><tr><th>scenario</th><th>what fails</th><th>reproduced</th>"
            "<th>fixed</th><th>broken: first non-finite step</th><th>first bad op</th><th>claims</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _sweep_settings(folder: Path) -> tuple[str | None, list[str]]:
    """The scenario and the command-line settings of the run that drew a map, read
    from what Hydra saved beside it: .hydra/ of a mode=sweep or mode=boundary run,
    multirun.yaml of a multirun. (None, []) where neither can be read."""
    from omegaconf import OmegaConf

    try:
        if (folder / ".hydra" / "config.yaml").is_file():
            config = OmegaConf.load(folder / ".hydra" / "config.yaml")
            overrides = list(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
        elif (folder / "multirun.yaml").is_file():
            config = OmegaConf.load(folder / "multirun.yaml")
            overrides = list(config.hydra.overrides.task)
        else:
            return None, []
        scenario = OmegaConf.select(config, "scenario.name")
    except Exception:  # a saved file of any shape: the map is still shown, under its path
        return None, []
    settings = [str(o) for o in overrides if not str(o).startswith(("hydra.", "hydra/", "scenario=", "plot="))]
    return (str(scenario) if scenario is not None else None), settings


def sweep_caption(path: Path, folder: Path) -> str:
    what = {"stability.png": "First non-finite step per lr", "boundary.png": "Critical lr per init and clip"}[path.name]
    scenario, settings = _sweep_settings(path.parent)
    where = str(path.relative_to(folder))
    if scenario is None:
        return f"{what} ({where})"
    return f"{what}: {scenario}" + (f", {' '.join(settings)}" if settings else "") + f" ({where})"


def sweep_figures(folder: Path) -> str:
    """The maps found under a folder of sweep outputs, embedded, each captioned with
    the scenario and settings that drew it."""
    parts = []
    for path in sorted(p for name in SWEEP_FIGURES for p in folder.rglob(name)):
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        caption = escape(sweep_caption(path, folder))
        parts.append(f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{caption}</figcaption></figure>")
    return "".join(parts)


def build_html(results: list[ScenarioResult], sweeps: Path | None = None) -> str:
    sections = "".join(html_section(r) for r in results)
    sweep_part = sweep_figures(sweeps) if sweeps else ""
    if sweep_part:
        sweep_part = f'<section id="sweeps"><h2>Where training stops being stable</h2>{sweep_part}</section>'
    seeds = sorted({str(r.config.get("seed")) for r in results})
    devices = sorted({str(r.config.get("device")) for r in results})
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>nanlab handout</title><style>{STYLE}</style></head><body>"
            "<h1>Why training goes NaN: the nanlab handout</h1>"
            f"<p class=\"meta\">{len(results)} scenario{'s' if len(results) != 1 else ''}, each a failure reproduced beside its fixes and the "
            f"folklore about it, measured. Seed {escape(', '.join(seeds))}, device {escape(', '.join(devices))}. Every verdict "
            "below was computed from the run.</p>"
            f"{summary_table(results)}{sections}{sweep_part}</body></html>\n")


def run_report(cfg, run_dir) -> int:
    from nanlab.config.compose import compose
    from nanlab.lab.runner import run_scenario

    report = cfg.report
    results_dir = Path(report.results) if report.results else Path(run_dir) / "results"
    chosen = list(report.scenarios) if report.scenarios is not None else registry.names()
    unknown = [name for name in chosen if name not in registry.names()]
    if unknown:
        raise ConfigError("report.scenarios", unknown[0], "not a scenario; choose from " + ", ".join(registry.names()))
    sweeps = Path(report.sweeps) if report.sweeps else None
    if sweeps is not None and not sweeps.is_dir():
        raise ConfigError("report.sweeps", report.sweeps, "must be a folder holding sweep outputs")
    if report.run:
        for name in chosen:
            overrides = [f"scenario={name}", f"seed={cfg.seed}", f"device={cfg.device}"]
            result = run_scenario(compose(overrides), overrides)
            jsonio.write_text(results_dir / name / "result.json", result.to_json() + "\n")
            print(f"{name}: {verdict_text(verdicts.explain(result)[0])}.", file=sys.stderr)
    if not results_dir.is_dir():
        raise ConfigError("report.results", str(results_dir), "is not a folder of saved results")
    results = load_results(results_dir)
    if not results:
        raise ConfigError("report.results", str(results_dir), "holds no <scenario>/result.json; run with report.run=true")
    path = jsonio.write_text(Path(run_dir) / "report.html", build_html(results, sweeps))
    print(f"{len(results)} scenarios in the handout")
    print(f"Wrote {path}")
    return 0
