"""framework=: the same scenario in Keras (three backends) and JAX, each in its worker.

Tests of a framework that is not installed skip, unless NANLAB_REQUIRE_FRAMEWORKS=1
(set by `make test`, where the Makefile installs every extra): then they fail."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanlab import frameworks
from nanlab.errors import ConfigError, install_hint
from nanlab.config.options import FRAMEWORKS
from conftest import need_framework, run_cli

OTHERS = [f for f in FRAMEWORKS if f != "torch"]
ROOT = Path(__file__).resolve().parents[1]


def nanlab(*args, timeout=300):
    return run_cli(*args, timeout=timeout)


@pytest.mark.parametrize("framework", OTHERS)
def test_sparse_ce_reproduced_and_fixed_in_each_framework(framework_runs, framework):
    need_framework(framework)
    result = framework_runs[framework]["sparse_ce_bad_labels"]
    assert result.config["framework"] == framework
    assert result.reproduced is True and result.fixed is True
    broken = result.variant("per_sequence_mean")
    assert broken.nonfinite_step == 0 and broken.first_nonfinite.quantity == "loss"
    for fix in ("validate_then_drop", "safe_reduction"):
        v = result.variant(fix)
        assert v.finite and len(v.losses) == 80
        # Scored by the scenario's float64 exact loss: comparable with torch's 1.77 -> 0.34.
        assert 1.0 < v.exact_loss_start < 4.0 and v.exact_loss_end < 0.5 * v.exact_loss_start


def test_the_readme_command_shows_every_framework(framework_measured):
    """docs/frameworks.md's `python -m nanlab scenario=sparse_ce_bad_labels framework=all`,
    run as written (the shared measurement's sparse_ce_bad_labels part; tests/test_docs.py
    leaves it to this test), prints what the docs promise and writes a result.json for
    every framework, which the other tests read."""
    for framework in OTHERS:
        need_framework(framework)
    from test_docs import EXPECTED, README_FRAMEWORK_COMMAND

    done = framework_measured["command"]
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in output, output[-2000:]
    assert not [want for want in EXPECTED[README_FRAMEWORK_COMMAND] if want not in output], output[-3000:]
    saved = framework_measured["runs"]
    assert sorted(saved) == sorted(OTHERS)
    assert all(saved[f]["sparse_ce_bad_labels"].config["framework"] == f for f in OTHERS)


@pytest.mark.parametrize("framework", OTHERS)
def test_only_keras_torch_is_traced(framework_runs, framework):
    need_framework(framework)
    from nanlab.frameworks.render import first_op

    result = framework_runs[framework]["sparse_ce_bad_labels"]
    broken = result.variant("per_sequence_mean")
    if framework == "keras-torch":  # its model is a torch module: the tracer names the 0/0
        assert broken.first_nonfinite.event.op == "aten.div" and broken.first_nonfinite.event.kind == "nan"
        # the builder's line, not the Keras op that ran the division for it
        assert "(sparse_ce_bad_labels.py:" in broken.first_nonfinite.event.describe()
    else:
        assert broken.first_nonfinite.event is None
        assert first_op(result, broken) == f"first op: not traced on {framework}"


def test_out_of_range_labels_differ_by_framework(framework_runs):
    """The claim is decided from each framework's own probes, not a note."""
    for framework in OTHERS:
        need_framework(framework)
    claim = {f: framework_runs[f]["sparse_ce_bad_labels"].claims[0] for f in OTHERS}
    probes = {f: framework_runs[f]["sparse_ce_bad_labels"].probes for f in OTHERS}
    assert probes["keras-torch"]["cross_entropy_label_3_of_3_classes_raises"] is True
    assert probes["keras-tensorflow"]["cross_entropy_label_3_of_3_classes_raises"] is True
    assert probes["keras-jax"]["cross_entropy_label_3_of_3_classes_raises"] is False  # silent on JAX
    assert "finite, wrong loss with no error" in claim["keras-jax"].evidence
    # take_along_axis fills label 3 (past the end) with NaN, but wraps label -1 round to a real class
    assert claim["jax"].verdict.value == "partly" and "only the label past the last class" in claim["jax"].evidence
    assert all("Not measurable here: Keras" not in c.evidence for c in claim.values())


def test_results_round_trip_through_json(framework_runs):
    from nanlab.lab.result import ScenarioResult

    for framework, by_scenario in framework_runs.items():
        result = by_scenario["sparse_ce_bad_labels"]
        again = ScenarioResult.from_dict(json.loads(result.to_json()))
        assert again.to_dict() == result.to_dict()


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        frameworks.require("keras-tensorflow")
    assert str(err.value).endswith(f": {install_hint('keras,tensorflow')}") and "\n" not in str(err.value)
    assert "keras-tensorflow" not in frameworks.chosen("all")


def test_builders_import_without_torch():
    """A Keras-JAX or TensorFlow worker imports the worker and every declared builder,
    and never torch (seconds of import for nothing it measures)."""
    code = ("import sys; from nanlab import frameworks; from nanlab.lab import registry; "
            "import nanlab.frameworks.worker; "
            "built = {(n, f): frameworks.builder(n, f) for n in registry.names() for f in frameworks.declared(n)}; "
            "assert len(built) >= 12 and all(map(callable, built.values())), built; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# What Keras or JAX code in a lesson would name: the kit a builder is given, the
# frameworks themselves, a recipe.
FRAMEWORK_IDENTIFIERS = {"kit", "keras", "jax", "jnp", "tensorflow", "tf", "ops", "JaxModel", "Recipe"}


def test_lesson_modules_hold_no_framework_code():
    """A scenario module is the torch lesson: its Keras and JAX builders live in the
    module its FRAMEWORKS names, and nothing in it names a framework's code."""
    import ast

    from nanlab.lab import registry

    for name in registry.builtin_names():
        module = registry.declaration(name).module
        path = ROOT / "scenarios" / f"{name}.py"
        tree = ast.parse(path.read_text())
        named = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        named |= {node.arg for node in ast.walk(tree) if isinstance(node, ast.arg)}
        named |= {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                  for alias in node.names}
        named |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not named & FRAMEWORK_IDENTIFIERS, (name, sorted(named & FRAMEWORK_IDENTIFIERS))
        recipes = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                   and node.name.endswith("_recipe")]
        assert not recipes, (name, recipes)
        for reference in frameworks.declared(name).values():
            assert not reference.startswith(module + ":"), f"{name}: builders live outside the lesson"


def test_nothing_compiles_or_execs_source():
    """Builders are imported, not run from a scenario's source: no exec or compile
    anywhere in nanlab. (The schema's eval resolves its own type annotations.)"""
    import ast

    for path in (ROOT / "nanlab").rglob("*.py"):
        calls = [node.func.id for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Name) and node.func.id in ("exec", "compile")]
        assert not calls, (str(path.relative_to(ROOT)), calls)


def test_the_framework_builders_package_is_not_a_scenario():
    from nanlab.lab import registry

    assert (ROOT / "scenarios" / "frameworks" / "__init__.py").exists()
    assert "frameworks" not in registry.builtin_names() and "frameworks" not in registry.names()


def test_bad_framework_name_is_one_line():
    done = nanlab("scenario=sparse_ce_bad_labels", "framework=keras")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("nanlab: error: framework=keras") and done.stderr.count("\n") == 1


def test_scenario_without_builder_is_one_line():
    need_framework("jax")
    done = nanlab("scenario=dying_relu", "framework=jax")
    assert done.returncode == 2, done.stderr
    assert "dying_relu has no jax builder" in done.stderr and done.stderr.count("\n") == 1


def test_cli_single_framework_writes_its_result_and_repeats_the_numbers(framework_runs, tmp_path):
    """framework=jax alone writes its result.json; and its numbers equal the shared
    measurement's, taken by another worker process: same seed, same numbers."""
    need_framework("jax")
    done = nanlab("scenario=sparse_ce_bad_labels", "framework=jax", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    assert "first op: not traced on jax" in done.stdout
    from nanlab.lab.result import ScenarioResult

    again, first = ScenarioResult.load(tmp_path / "jax" / "result.json"), framework_runs["jax"]["sparse_ce_bad_labels"]
    assert again.config["framework"] == "jax" and again.reproduced is True
    assert [v.name for v in again.variants] == [v.name for v in first.variants]
    for variant in first.variants:
        assert again.variant(variant.name).losses == variant.losses, variant.name
        assert again.variant(variant.name).exact_loss_end == variant.exact_loss_end, variant.name


# ---------------------------------------------------------------- claims x framework

def _row(verdict, framework, claim="c", scenario="s", evidence="e"):
    from nanlab.lab.result import ClaimResult, Verdict

    return ClaimResult(scenario, claim, Verdict(verdict), evidence, "", framework)


def test_a_claim_that_differs_by_framework_says_so_and_one_that_agrees_does_not():
    from nanlab.lab.claims import note_differences

    rows = note_differences([_row("refuted", "torch"), _row("refuted", "keras-jax"), _row("confirmed", "jax"),
                             _row("not decided", "keras-torch"),
                             _row("confirmed", "torch", claim="d"), _row("confirmed", "jax", claim="d")])
    note = " [differs by framework: refuted on torch, keras-jax; confirmed on jax]"
    assert [r.evidence for r in rows[:3]] == ["e" + note] * 3
    assert rows[3].evidence == "e"  # not decided: takes no part
    assert [r.evidence for r in rows[4:]] == ["e", "e"]


def test_claims_table_has_a_column_per_framework_and_a_dash_where_no_builder():
    from nanlab.lab.claims import render_framework_table

    rows = [_row("refuted", "torch"), _row("confirmed", "jax"), _row("confirmed", "torch", scenario="t", claim="other")]
    table = render_framework_table(rows, ["torch", "jax"]).splitlines()
    assert table[0].split() == ["scenario", "torch", "jax", "claim"]
    assert table[2].split() == ["s", "refuted", "confirmed", "c"]
    assert table[3].split() == ["t", "confirmed", "-", "other"]
    assert "Where the frameworks disagree:" in table and "    jax [confirmed]: e" in table
    assert "torch: 2 claims: 1 confirmed, 1 refuted" in table and "jax: 1 claims: 1 confirmed" in table


def test_claim_rows_carry_their_framework_through_json():
    from nanlab.lab.result import ClaimResult

    row = _row("partly", "keras-tensorflow")
    assert ClaimResult.from_dict(row.to_dict()) == row
    saved_before_frameworks = {k: v for k, v in row.to_dict().items() if k != "framework"}
    assert ClaimResult.from_dict(saved_before_frameworks).framework == "torch"


def test_claims_mode_tabulates_each_framework(framework_runs, tmp_path, monkeypatch, capsys):
    """mode=claims framework=jax, in process: the workers' part is the shared
    measurement (what measure() ran), the rest is the mode's own."""
    need_framework("jax")
    from contextlib import contextmanager

    from nanlab.lab.claims import run_claims
    from nanlab.config.compose import compose
    from nanlab.frameworks import run, runs_on
    from nanlab.lab.registry import names

    @contextmanager
    def measured_workers(cfgs, frameworks, on_error=None):
        assert frameworks == ["jax"] and sorted(c.scenario.name for c in cfgs) == with_jax
        yield lambda: {"jax": framework_runs["jax"]}

    with_jax = sorted(n for n in names() if "jax" in runs_on(n))
    monkeypatch.setattr(run, "workers", measured_workers)
    assert run_claims(compose(["mode=claims", "framework=jax"]), tmp_path) == 0
    rows = json.loads((tmp_path / "claims.json").read_text())
    assert {r["framework"] for r in rows} == {"jax"} and sorted({r["scenario"] for r in rows}) == with_jax
    expected = [c.verdict.value for n in with_jax for c in framework_runs["jax"][n].claims]
    assert sorted(r["verdict"] for r in rows) == sorted(expected) and "not decided" not in expected
    assert capsys.readouterr().out.splitlines()[0].split() == ["scenario", "jax", "claim"]


def test_list_framework_shows_where_each_scenario_runs():
    done = nanlab("mode=list", "framework=jax")
    assert done.returncode == 0, done.stderr
    listed = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert "sparse_ce_bad_labels" in listed and "dying_relu" not in listed
    assert listed["sparse_ce_bad_labels"] == "torch, keras-torch, keras-jax, keras-tensorflow, jax"


def test_the_docs_framework_table_is_what_a_fresh_run_measures(framework_runs, result_of):
    """docs/frameworks.md shows, per scenario and variant, what happened in each
    framework; `make docs` writes that table, and it must match today's numbers.
    The table lives on that page only: the README links to it."""
    from pathlib import Path

    from nanlab.frameworks import runs_on
    from nanlab.frameworks.render import framework_matrix
    from nanlab.lab.registry import builtin_names

    for framework in OTHERS:
        need_framework(framework)
    with_builders = [n for n in builtin_names() if len(runs_on(n)) > 1]
    results = {"torch": {n: result_of(n) for n in with_builders}, **framework_runs}
    table = framework_matrix(results, list(FRAMEWORKS))
    root = Path(__file__).resolve().parents[1]
    assert "framework-table" not in (root / "README.md").read_text()
    text = (root / "docs" / "frameworks.md").read_text()
    assert f"<!-- framework-table:start -->\n{table}<!-- framework-table:end -->" in text, (
        f"frameworks.md's framework table is stale; run `make docs`. Measured now:\n{table}")


def test_framework_matrix_cells_follow_the_results():
    from nanlab.frameworks.render import framework_matrix
    from nanlab.lab.result import FirstNonFinite, ScenarioResult, VariantResult

    def variant(name, role, step=None, loss=float("nan"), verdict=""):
        first = FirstNonFinite(step, "loss", loss) if step is not None else None
        v = VariantResult(name, role, "", False, {}, first is None, first, [], [], [], None, 1.0, 0.5,
                          None, None, None)
        v.verdict = verdict
        return v

    def result(*variants):
        return ScenarioResult("s", "", "", "", {}, None, None, list(variants))

    table = framework_matrix({"torch": {"s": result(variant("b", "broken", 3), variant("f", "fix", verdict="fixed"))},
                              "jax": {"s": result(variant("b", "broken", 0, loss=float("inf")),
                                                  variant("f", "fix", verdict="finite, did not learn"),
                                                  variant("own", "myth", verdict="myth: finite but wrong"))}},
                             ["torch", "jax"])
    assert table.splitlines()[2:] == ["| s | b (broken) | NaN at step 3 | Inf at step 0 |",
                                      "|  | f (fix) | fixed | finite, did not learn |",
                                      "|  | own (myth) | - | myth: finite but wrong |"]


def test_framework_in_a_mode_that_has_none_is_one_line():
    done = nanlab("mode=sweep", "scenario=tanh_explosion", "framework=jax")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "nanlab: error: framework=jax: applies to mode=run and mode=claims, not mode=sweep\n"


@pytest.mark.parametrize("overrides,key", [
    (["dtype=float64"], "dtype=float64"),  # JAX and Keras would quietly train in float32
    (["optimizer.weight_decay=0.01"], "optimizer.weight_decay=0.01"),  # Keras decays apart from the gradient
])
def test_settings_keras_cannot_match_are_one_line(overrides, key):
    from nanlab.config.compose import compose
    from nanlab.frameworks.run import check_settings

    cfg = compose(["scenario=tanh_explosion", *overrides])
    with pytest.raises(ConfigError) as err:
        check_settings(cfg, "keras-torch")
    assert str(err.value).startswith(key) and "\n" not in str(err.value)
    check_settings(compose(["scenario=tanh_explosion"]), "keras-torch")  # the defaults pass


def test_jax_rmsprop_momentum_is_one_line_and_plain_rmsprop_passes():
    from nanlab.config.compose import compose
    from nanlab.frameworks.run import check_settings

    with pytest.raises(ConfigError, match="optimizer.momentum=0.9"):
        check_settings(compose(["scenario=tanh_explosion", "optimizer=rmsprop", "optimizer.momentum=0.9"]), "jax")
    check_settings(compose(["scenario=tanh_explosion", "optimizer=rmsprop"]), "jax")
    check_settings(compose(["scenario=tanh_explosion", "optimizer=rmsprop", "optimizer.momentum=0.9"]), "keras-jax")


@pytest.mark.parametrize("framework", OTHERS)
def test_masked_softmax_and_the_frameworks_own_masked_softmax(framework_runs, framework):
    """A hand-written -inf fill is NaN at step 0 everywhere; Keras' Softmax(mask=) and
    JAX's softmax(where=) give an empty row zero weights: the guard, built in."""
    need_framework(framework)
    import math

    r = framework_runs[framework]["masked_softmax"]
    assert r.reproduced is True and r.fixed is True
    broken = r.variant("softmax_of_all_-inf")
    assert broken.nonfinite_step == 0 and math.isnan(broken.first_nonfinite.loss)
    guard = r.variant("guard_empty_rows")
    own = r.variant("jax_softmax_where" if framework == "jax" else "keras_softmax_layer")
    assert guard.finite and guard.learned and own.finite and own.learned and own.role == "fix"
    assert own.losses == pytest.approx(guard.losses, rel=1e-5)  # the same weights, computed another way
    assert r.variant("fill_-1e9").verdict == "fixed (lossy)"
    assert r.probes["fully_masked_row_library_softmax"] == [0.0] * 6
    assert r.probes["fully_masked_row_plain_is_nan"] is True
    (claim,) = r.claims
    assert claim.verdict.value == "confirmed" and f"({own.name}) gives an empty row zero weights" in claim.evidence


def test_claims_json_says_where_a_claim_differs(tmp_path, monkeypatch, capsys):
    from nanlab.lab import claims
    from nanlab.config.compose import compose

    rows = [_row("refuted", "torch"), _row("confirmed", "jax")]
    monkeypatch.setattr(claims, "collect_framework_claims", lambda cfg: (rows, ["torch", "jax"]))
    assert claims.run_claims(compose(["mode=claims", "framework=jax"]), tmp_path) == 0
    saved = json.loads((tmp_path / "claims.json").read_text())
    assert [r["evidence"] for r in saved] == ["e [differs by framework: refuted on torch; confirmed on jax]"] * 2
    assert "    jax [confirmed]: e\n" in capsys.readouterr().out  # the table shows the evidence itself


def test_each_scenario_reports_its_own_share_of_the_worker(framework_runs):
    for framework in OTHERS:
        need_framework(framework)
        seconds = [r.seconds for r in framework_runs[framework].values()]
        assert all(s > 0 for s in seconds) and len(set(seconds)) == len(seconds), (framework, seconds)


def test_each_worker_loads_only_its_own_framework(framework_runs):
    """A worker that imports another framework pays seconds of CPU for nothing (Keras
    imports JAX and TensorFlow wherever they are installed); each result lists the
    frameworks its worker loaded."""
    from nanlab.frameworks.worker import FRAMEWORK_MODULES, own_modules

    for framework in OTHERS:
        need_framework(framework)
        own = own_modules(framework)
        assert framework.split("-")[-1] in own and own <= set(FRAMEWORK_MODULES)
        for name, result in framework_runs[framework].items():
            assert set(result.config["framework_versions"]) == own, (framework, name, result.config["framework_versions"])
