"""The session's shared scenario runs (tests/shared_runs.py) stand for fresh runs:
keyed by everything that determines a run, refused where a saved result would not
be the run itself, and used only by the callers that ask for them."""
import contextlib
import math
import os
import sys
import warnings

import pytest
from conftest import run_python
from shared_runs import MemoError, memoized, run_key, same

from nanlab.config.compose import compose
from nanlab.lab.result import ClaimResult, ScenarioResult, VariantResult, Verdict

ARGS = ["scenario=softmax_overflow", "steps=3"]


def small_result(**changes) -> ScenarioResult:
    variant = VariantResult("broken", "broken", "", False, {}, True, None, [1.0, math.nan], [0.5, math.inf], [1.0, 1.0],
                            math.nan, 1.0, 0.5, None, 0.25, None)
    result = ScenarioResult("softmax_overflow", "s", "e", "nonfinite", {"steps": 3}, True, None, [variant],
                            probes={"row": [math.nan, 1.0], "flag": True},
                            claims=[ClaimResult("softmax_overflow", "c", Verdict.partly, "why")])
    for key, value in changes.items():
        setattr(result, key, value)
    return result


def counted(make):
    calls = []

    def run(cfg, overrides=None):
        calls.append(list(overrides or ()))
        return make()

    return run, calls


@pytest.fixture(scope="module")
def cfg():
    return compose(ARGS)


def test_a_run_is_made_once_per_key_and_read_back_exactly(cfg, tmp_path):
    run, calls = counted(small_result)
    shared = memoized(tmp_path, run)
    first, again = shared(cfg, ARGS), shared(compose(ARGS), ARGS + ["seed=0", "device=cpu"])
    assert len(calls) == 1 and same(first, small_result()) and same(again, small_result())
    shared(compose(ARGS + ["seed=1"]), ARGS + ["seed=1"])  # another config is another run
    assert len(calls) == 2


def test_the_key_holds_the_scenario_source_and_the_config(cfg, tmp_path, monkeypatch):
    import dataclasses

    from nanlab.lab import registry

    again, other_lr = compose(ARGS), compose(ARGS + ["optimizer.lr=0.5"])
    source = tmp_path / "memo_probe_scenario.py"
    source.write_text("LR = 0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    declared = registry.declaration
    monkeypatch.setattr(registry, "declaration", lambda name: dataclasses.replace(declared(name),
                                                                                  module="memo_probe_scenario"))
    key = run_key(cfg, ARGS)
    assert run_key(again, ARGS) == key and key[0] == str(source)
    assert run_key(other_lr, ARGS + ["optimizer.lr=0.5"]) != key
    source.write_text("LR = 0.2\n")
    assert run_key(cfg, ARGS) != key


@pytest.mark.parametrize("how", ["print", "stderr", "fd", "warning"])
def test_a_run_that_prints_is_refused_and_its_output_still_shows(cfg, tmp_path, capfd, how):
    def printing():
        if how == "print":
            print("step 1 of 3")
        elif how == "stderr":
            print("step 1 of 3", file=sys.stderr)
        elif how == "fd":
            os.write(2, b"step 1 of 3\n")
        else:
            warnings.warn("step 1 of 3")
        return small_result()

    run, _ = counted(printing)
    # a warning goes back where warnings were going: here, to pytest.warns
    shown = pytest.warns(UserWarning, match="step 1 of 3") if how == "warning" else contextlib.nullcontext()
    with shown, pytest.raises(MemoError, match="printed while it ran"):
        memoized(tmp_path, run)(cfg, ARGS)
    assert how == "warning" or "step 1 of 3" in "".join(capfd.readouterr())
    assert not list(tmp_path.glob("run-*.json"))  # nothing saved: the next caller runs it again


def test_a_run_that_raises_saves_nothing_and_shows_what_it_printed(cfg, tmp_path, capfd):
    def failing():
        print("before the error", file=sys.stderr)
        raise ValueError("bad knob")

    run, calls = counted(failing)
    for _ in range(2):
        with pytest.raises(ValueError, match="bad knob"):
            memoized(tmp_path, run)(cfg, ARGS)
    assert len(calls) == 2 and capfd.readouterr().err.count("before the error") == 2


@pytest.mark.parametrize("changes", [dict(probes={"pair": (1.0, 2.0)}), dict(config={"clip": math.inf}),
                                     dict(probes={3: 1.0})], ids=["tuple", "inf_in_config", "int_key"])
def test_a_result_its_json_does_not_give_back_is_refused(cfg, tmp_path, changes):
    run, _ = counted(lambda: small_result(**changes))
    with pytest.raises(MemoError, match="does not give the run's result back exactly"):
        memoized(tmp_path, run)(cfg, ARGS)


def test_same_tells_types_apart_and_nan_from_numbers():
    assert same([math.nan, {"a": 1}], [math.nan, {"a": 1}])
    assert not same(1, 1.0) and not same((1,), [1]) and not same(math.nan, 0.0) and not same("nan", math.nan)
    assert not same({"a": 1, "b": 2}, {"b": 2, "a": 1})  # key order is what result.json shows
    assert not same(small_result(), small_result(reproduced=False))


def test_only_a_command_that_asks_reads_the_shared_runs():
    code = "import nanlab.lab.runner as r; print(r.run_scenario.__qualname__)"
    assert run_python("-c", code, shared=True).stdout.split()[0].endswith("shared_run")
    assert run_python("-c", code).stdout.split() == ["run_scenario"]
