"""A user's override that defeats the failure is a finding, said in plain words;
claims about the scenario's own settings are not decided by another run."""
import pytest

import nanlab
from nanlab.lab.result import Verdict


def test_an_optimizer_override_that_keeps_it_finite_is_said_plainly():
    r = nanlab.run("tanh_explosion", "optimizer=adam", "optimizer.lr=1e-3")
    assert r.reproduced is False
    assert r.changed == {"optimizer.name": ["sgd", "adam"], "optimizer.lr": [0.2, 0.001]}
    text = str(r)
    assert ("Verdict: NOT reproduced with optimizer=adam lr=0.001: the broken variant stayed finite for 200 steps "
            "(the scenario is set up at optimizer=sgd lr=0.2).") in text
    # no claim is decided from a run at other settings, and none quotes SGD for an Adam run
    assert [c.verdict for c in r.claims] == [Verdict.not_decided] * 3
    assert all("this run used optimizer=adam lr=0.001" in c.evidence for c in r.claims)
    assert "non-finite at step None" not in text


def test_at_its_own_settings_nothing_is_said_about_settings(result_of):
    r = result_of("tanh_explosion")
    assert r.changed == {} and "with " not in str(r).split("Verdict:")[1]
    assert [c.verdict for c in r.claims] == [Verdict.refuted, Verdict.confirmed, Verdict.confirmed]


def test_not_fixed_names_the_fix_that_failed_and_why():
    r = nanlab.run("softmax_overflow", "optimizer=adam", steps=30)
    assert r.fixed is False and r.changed == {"optimizer.name": ["sgd", "adam"], "steps": [60, 30]}
    assert "NOT fixed with optimizer=adam steps=30: cross_entropy_on_logits finite, did not learn." in str(r)
    assert "its cost is not measured (no exact fix learned" in str(r)


def test_data_knobs_change_the_measurement_and_the_claims_follow(result_of):
    r = result_of("softmax_overflow", "scenario.data.input_scale=0.01", "steps=5")
    assert r.claims[0].verdict is Verdict.refuted  # decided: data knobs are part of what is measured
    assert "NOT reproduced with steps=5 scenario.data.input_scale=0.01" in str(r)


def test_variant_runs_only_the_named_variants():
    r = nanlab.run("softmax_overflow", "variant=cross_entropy_on_logits")
    assert [v.name for v in r.variants] == ["cross_entropy_on_logits"]
    assert r.reproduced is None and r.fixed is True
    assert all(c.verdict is Verdict.not_decided for c in r.claims)
    assert "reproduced? not measured (the broken variant was not run: variant= left it out)" in str(r)
    assert "reproduced:" not in str(r)  # no line that reads as "reproduced"
    both = nanlab.run("softmax_overflow", "variant=[hand_softmax,clip_logits_10]")
    assert [v.name for v in both.variants] == ["hand_softmax", "clip_logits_10"]
    assert both.reproduced is True and both.fixed is None


@pytest.mark.parametrize("value,expected", [
    ("typo", "variant=typo: not a variant of softmax_overflow; choose from hand_softmax, log_of_softmax"),
    ("[]", "variant=[]: name at least one variant"),
])
def test_an_unknown_variant_is_one_line(cli, tmp_path, value, expected):
    proc = cli(f"variant={value}", f"hydra.run.dir={tmp_path}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr


@pytest.mark.parametrize("overrides,touches", [
    (["scenario=tanh_explosion", "seed=3", "device=cpu", "plot=true"], False),
    (["optimizer=adam"], True), (["optimizer.lr=0.1"], True), (["+init.std=2"], True), (["clip=norm"], True),
    (["dtype=float64"], True), (["steps=5"], True), (["scenario.data.n=10"], True),
])
def test_only_overrides_that_touch_the_lesson_are_compared(overrides, touches):
    """The shortcut that skips composing the scenario's own config agrees with the full comparison."""
    from nanlab.config.compose import changed_settings, compose, touches_lesson

    assert touches_lesson(overrides) is touches
    if not touches:
        cfg = compose(["scenario=tanh_explosion", *overrides])
        assert changed_settings(cfg) == {} == changed_settings(cfg, overrides)
