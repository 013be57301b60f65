"""The handout (mode=report) and the figures a workshop shows."""
import base64
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import nanlab
from nanlab.lab.result import FirstNonFinite, ScenarioResult, VariantResult


class Page(HTMLParser):
    """Sections, images and the numbers each table row carries."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.cells, self.summary = [], [], {}, {}
        self._section = self._row = self._cell = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and "data-scenario" in attrs:
            self._section = attrs["data-scenario"]
            self.sections.append(self._section)
        elif tag == "tr" and "data-variant" in attrs:
            self._row = (self._section, attrs["data-variant"])
            self.cells[self._row] = []
        elif tag == "tr" and "data-scenario" in attrs:
            self._row = ("summary", attrs["data-scenario"])
            self.summary[attrs["data-scenario"]] = []
        elif tag == "td" and self._row is not None:
            self._cell, self._text = attrs.get("data-value"), ""
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        self._text += data

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None:
            target = self.summary[self._row[1]] if self._row[0] == "summary" else self.cells[self._row]
            target.append((self._cell, self._text.strip()))
        elif tag == "tr":
            self._row = None


def read_page(path):
    page = Page()
    page.feed(Path(path).read_text())
    return page


def decodes_as_png(src):
    import matplotlib.image

    assert src.startswith("data:image/png;base64,")
    pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
    return pixels.shape[0] > 100 and pixels.shape[1] > 100


def agrees(text, value):
    """A displayed number agrees with the exact one to the 4 digits it shows."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return text in ("-", "nan")
    if isinstance(value, float) and math.isinf(value):
        return text == str(value)
    return abs(float(text) - value) <= 5e-4 * abs(value) + 1e-12


SCENARIOS = ["softmax_overflow", "unscaled_sgd"]


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("handout")
    proc = run_cli("mode=report", f"report.scenarios=[{','.join(SCENARIOS)}]", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    return out


def test_every_scenario_has_a_section_and_every_image_decodes(handout):
    page = read_page(handout / "report.html")
    assert page.sections == SCENARIOS and list(page.summary) == SCENARIOS
    assert len(page.images) == len(SCENARIOS) and all(decodes_as_png(src) for src in page.images)
    assert "http://" not in (handout / "report.html").read_text().replace("http://www.w3.org", "")  # self-contained


def test_no_number_in_the_page_disagrees_with_result_json(handout):
    page = read_page(handout / "report.html")
    for name in SCENARIOS:
        saved = json.loads((handout / "results" / name / "result.json").read_text())
        result = ScenarioResult.from_dict(saved)
        for v in result.variants:
            cells = page.cells[(name, v.name)]
            step_value, step_text = cells[3]
            assert step_value == ("" if v.nonfinite_step is None else str(v.nonfinite_step))
            assert step_text == ("finite" if v.nonfinite_step is None else str(v.nonfinite_step))
            for (raw, text), exact in ((cells[5], v.exact_loss_start), (cells[6], v.exact_loss_end)):
                assert float(raw) == exact or (math.isnan(exact) and raw == "nan"), (name, v.name, raw, exact)
                assert agrees(text, exact), (name, v.name, text, exact)
            assert cells[7][1] == v.verdict
        summary = dict(enumerate(page.summary[name]))
        assert summary[2][0] == str(result.reproduced) and summary[3][0] == str(result.fixed)
        assert summary[4][0] == ("" if result.broken.nonfinite_step is None else str(result.broken.nonfinite_step))


def test_the_handout_ran_what_the_shared_runs_hold(handout, result_of):
    """The handout ran its scenarios for real, one after another in one process; the
    session's shared runs (tests/shared_runs.py), which the docs' mode=report and
    mode=claims commands read, hold the same results."""
    from nanlab.lab.result import strip_timing

    for name in SCENARIOS:
        saved = json.loads((handout / "results" / name / "result.json").read_text())
        shared = result_of(name, f"seed={saved['config']['seed']}")  # a rerun below may have changed the seed
        assert strip_timing(saved) == strip_timing(json.loads(shared.to_json())), name


def test_rerun_one_scenario_into_saved_results_and_rebuild(handout, cli, tmp_path):
    results = handout / "results"
    kept = (results / "softmax_overflow" / "result.json").read_bytes()
    proc = cli("mode=report", "report.scenarios=[unscaled_sgd]", f"report.results={results}", "seed=1",
               f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert (results / "softmax_overflow" / "result.json").read_bytes() == kept  # not rerun
    assert json.loads((results / "unscaled_sgd" / "result.json").read_text())["config"]["seed"] == 1
    assert read_page(tmp_path / "report.html").sections == SCENARIOS
    rebuilt = cli("mode=report", "report.run=false", f"report.results={results}", f"hydra.run.dir={tmp_path / 'b'}")
    assert rebuilt.returncode == 0 and read_page(tmp_path / "b" / "report.html").sections == SCENARIOS


@pytest.mark.parametrize("args,expected", [
    (["report.scenarios=[nope]"], "report.scenarios=nope: not a scenario"),
    (["report.run=false", "report.results=/nonexistent"], "report.results=/nonexistent: is not a folder"),
    (["report.sweeps=/nonexistent"], "report.sweeps=/nonexistent: must be a folder"),
])
def test_bad_report_input_is_one_line(cli, tmp_path, args, expected):
    proc = cli("mode=report", *args, f"hydra.run.dir={tmp_path}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr


def _variant(name, role, losses, step=None):
    first = FirstNonFinite(step, "loss", losses[-1]) if step is not None else None
    return VariantResult(name=name, role=role, summary="", lossy=False, overrides={}, finite=first is None,
                         first_nonfinite=first, losses=losses, grad_norms=losses, param_norms=[], final_loss=None,
                         exact_loss_start=losses[0], exact_loss_end=losses[-1], accuracy_start=None,
                         accuracy_end=None, loss_gap=0.0, exact_losses=losses)


def test_the_figure_draws_any_number_and_labels_its_axes():
    from nanlab.reports.figures import png_bytes, variant_figure

    extreme = [1.0, 1e300, math.inf, math.nan, -5.0, 0.0, 1e-320, 1.7e308]
    result = ScenarioResult("extreme", "every kind of number", "", "nonfinite", {}, True, True, [
        _variant("at_step_0", "broken", [math.nan], step=0),
        _variant("extreme", "myth", extreme, step=7),
        _variant("same_a", "fix", [3.0, 2.0, 1.0]),
        _variant("same_b", "fix", [3.0, 2.0, 1.0]),
    ])
    fig = variant_figure(result)
    assert len(png_bytes(fig)) > 10_000
    loss_ax, grad_ax = fig.axes
    assert (loss_ax.get_xlabel(), loss_ax.get_ylabel()) == ("step", "exact loss (float64, log scale)")
    assert (grad_ax.get_xlabel(), grad_ax.get_ylabel()) == ("step", "gradient norm (log scale)")
    assert loss_ax.get_title() and grad_ax.get_title() and fig.get_suptitle().startswith("extreme")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["at_step_0 (broken)", "extreme (myth)", "same_a (fix)", "same_b (fix)", "went non-finite here"]
    styles = {(line.get_color(), str(line.get_linestyle()), line.get_marker())
              for line in loss_ax.get_lines() if line.get_label().endswith(")")}
    assert len(styles) == 4  # identical lines stay distinguishable
    crosses = [line for line in loss_ax.get_lines() if line.get_marker() == "X"]
    assert [c.get_xdata()[0] for c in crosses] == [0, 7]  # step 0 is marked too


def test_a_float64_run_that_reaches_1e300_plots(cli, tmp_path):
    proc = cli("scenario=unscaled_sgd", "dtype=float64", "seed=3", "plot=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    assert "Verdict: reproduced" in proc.stdout and (tmp_path / "losses.png").stat().st_size > 10_000


def test_a_result_from_nanlab_run_shows_itself():
    """print(result) is the CLI's report, .plot() a matplotlib Figure with the two
    panels, and Jupyter's _repr_html_ the handout section."""
    import nanlab
    from nanlab.reports.scenario_report import render

    r = nanlab.run("softmax_overflow", "variant=[hand_softmax,cross_entropy_on_logits]")
    assert str(r) == repr(r) == render(r, brief=True) and str(r).startswith("softmax_overflow: ")
    fig = r.plot()
    assert [ax.get_ylabel() for ax in fig.axes] == ["exact loss (float64, log scale)", "gradient norm (log scale)"]
    page = Page()
    page.feed(r._repr_html_())
    assert page.sections == ["softmax_overflow"] and len(page.images) == 1 and decodes_as_png(page.images[0])
    assert [name for _, name in page.cells] == ["hand_softmax", "cross_entropy_on_logits"]


def test_sweep_maps_found_under_report_sweeps_are_embedded(handout, cli, tmp_path):
    """report.sweeps=DIR adds every stability.png and boundary.png found under DIR."""
    from nanlab.reports.figures import png_bytes, variant_figure

    figure = png_bytes(variant_figure(ScenarioResult.load(handout / "results" / "unscaled_sgd" / "result.json")))
    sweeps = tmp_path / "sweeps"
    for where in ("lr_grid/stability.png", "boundary/boundary.png"):
        (sweeps / where).parent.mkdir(parents=True)
        (sweeps / where).write_bytes(figure)
    proc = cli("mode=report", "report.run=false", f"report.results={handout / 'results'}", f"report.sweeps={sweeps}",
               f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    page = read_page(tmp_path / "out" / "report.html")
    assert len(page.images) == len(SCENARIOS) + 2 and all(decodes_as_png(src) for src in page.images)
    assert "lr_grid/stability.png" in (tmp_path / "out" / "report.html").read_text()


def test_the_handout_escapes_every_field_of_a_crafted_result(tmp_path):
    """A result.json is data from disk: every string in it, config fields and a
    variant's role included, reaches the page escaped."""
    import json

    from nanlab.lab.result import ScenarioResult
    from nanlab.reports.handout import build_html

    payload = "<script>alert(1)</script>"
    path = tmp_path / "result.json"
    data = json.loads(nanlab.run("softmax_overflow", "steps=2").to_json())
    keep = {"verdict", "failure", "loss", "losses", "grad_norms", "loss_gap", "kind", "phase", "origin", "quantity", "role"}

    def poison(x, key=""):
        if isinstance(x, dict):
            return {k: poison(v, k) for k, v in x.items()}
        if isinstance(x, list):
            return [poison(v, key) for v in x]
        if isinstance(x, str) and key not in keep and x not in ("nan", "inf", "-inf"):
            return x + payload
        return x

    data = poison(data)
    data["config"]["seed"] = payload
    data["variants"][1]["role"] = payload
    path.write_text(json.dumps(data))
    page = build_html([ScenarioResult.load(path)])
    assert payload not in page and "&lt;script&gt;" in page


def test_sweep_maps_are_captioned_with_the_scenario_and_settings_that_drew_them(tmp_path):
    """Read from what Hydra saved beside each map: .hydra/ of a mode=sweep run,
    multirun.yaml of a multirun. A map with neither keeps its path as caption."""
    from nanlab.reports.handout import sweep_figures

    sweeps = tmp_path / "sweeps"
    (sweeps / "grid" / ".hydra").mkdir(parents=True)
    (sweeps / "grid" / ".hydra" / "config.yaml").write_text("scenario:\n  name: tanh_explosion\n")
    (sweeps / "grid" / ".hydra" / "overrides.yaml").write_text(
        "- mode=sweep\n- scenario=tanh_explosion\n- sweep.lr=[0.1,0.2]\n- hydra.run.dir=somewhere\n- plot=true\n")
    (sweeps / "multi").mkdir()
    (sweeps / "multi" / "multirun.yaml").write_text(
        "scenario:\n  name: unscaled_sgd\nhydra:\n  overrides:\n    task:\n    - optimizer.lr=1e-10,2e-10\n")
    (sweeps / "bare").mkdir()
    for folder in ("grid", "multi", "bare"):
        (sweeps / folder / "stability.png").write_bytes(b"png")
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", sweep_figures(sweeps))
    assert captions == ["First non-finite step per lr (bare/stability.png)",
                        "First non-finite step per lr: tanh_explosion, mode=sweep sweep.lr=[0.1,0.2] (grid/stability.png)",
                        "First non-finite step per lr: unscaled_sgd, optimizer.lr=1e-10,2e-10 (multi/stability.png)"]


def test_the_handout_prints_a_page_per_scenario_with_the_summary_on_one(handout, tmp_path):
    """Printed by headless Chromium where it is installed (the system package): the
    summary page, then one page for each scenario, softmax_overflow's tall one among them."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("needs headless Chromium to print (Debian package chromium)")
    pdf = tmp_path / "handout.pdf"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                    f"--print-to-pdf={pdf}", (handout / "report.html").as_uri()], capture_output=True, timeout=180)
    pages = len(re.findall(rb"/Type\s*/Page[^s]", pdf.read_bytes()))
    assert pages == 1 + len(SCENARIOS), pages
