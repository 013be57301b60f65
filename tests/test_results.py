"""Typed results: result.json loads back without torch and renders the same report."""
import json
import math
import subprocess
import sys

import pytest

from nanlab.lab.result import Event, FirstNonFinite, ScenarioResult, Verdict


def test_loaded_result_renders_the_cli_report_without_torch(cli, tmp_path):
    proc = cli("scenario=custom_backward_div0", "steps=20", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    code = ("import sys\n"
            "from nanlab.lab.result import ScenarioResult\n"
            "from nanlab.reports.scenario_report import render\n"
            f"r = ScenarioResult.load({str(tmp_path / 'result.json')!r})\n"
            "text = render(r)\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'matplotlib')]\n"
            "assert not heavy, heavy\n"
            "print(text)\n")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    report = proc.stdout.rsplit("\nWrote ", 1)[0]  # the CLI adds the files it wrote
    assert loaded.stdout.strip() == report.strip()
    assert "Inf first in backward: SqrtDivByZeroBackward" in loaded.stdout


def test_load_rebuilds_types_and_non_finite_numbers(result_of, tmp_path):
    original = result_of("softmax_overflow")
    path = tmp_path / "result.json"
    path.write_text(original.to_json())
    loaded = ScenarioResult.load(path)
    assert loaded.to_dict() == original.to_dict()
    first = loaded.broken.first_nonfinite
    assert isinstance(first, FirstNonFinite) and isinstance(first.event, Event)
    assert first.event == original.broken.first_nonfinite.event
    assert math.isnan(first.loss) or math.isinf(first.loss)  # a float again, not the string "nan"
    assert all(isinstance(c.verdict, Verdict) for c in loaded.claims)
    # a probe that is a row of numbers with a NaN in it reads back as floats too
    row = loaded.probes["hand_softmax_of_[200,0,-200]"]
    assert math.isnan(row[0]) and row[1:] == original.probes["hand_softmax_of_[200,0,-200]"][1:]
    assert "nan" in json.dumps(json.loads(path.read_text())["variants"][0]["losses"])  # strict JSON on disk


def test_an_unknown_variant_names_the_ones_there_are(result_of):
    r = result_of("softmax_overflow")
    with pytest.raises(KeyError, match="no variant 'typo'; its variants are hand_softmax, log_of_softmax"):
        r.variant("typo")
