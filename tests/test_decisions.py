"""The lab's decisions, each pinned by a test that fails when the decision changes:
what counts as a reproduced stall, how far a loss may be off before it reads wrong,
which settings leave claims undecided, how tight a boundary bracket gets, and that
each shared table has one home. Hand-made results and a fake stability rule: no training."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from nanlab.config import options
from nanlab.lab import verdicts
from nanlab.lab.result import FirstNonFinite, ScenarioResult, VariantResult
from nanlab.lab.scenario import Learn
from nanlab.reports.scenario_report import verdict_lines
from nanlab.sweeps import boundary

ROOT = Path(__file__).resolve().parents[1]


def variant(role, finite=True, start=2.0, end=0.5, gap=0.0, name=None, nonfinite_step=0, steps=10):
    """A judged variant: ``start`` and ``end`` are its exact losses, ``gap`` its
    training loss minus the exact loss at the start."""
    losses = [start + gap] + [end] * (steps - 1)
    v = VariantResult(name=name or role, role=role, summary="", lossy=False, overrides={}, finite=finite,
                      first_nonfinite=None if finite else FirstNonFinite(nonfinite_step, "loss", math.nan),
                      losses=losses, grad_norms=[], param_norms=[], final_loss=end, exact_loss_start=start,
                      exact_loss_end=end, accuracy_start=None, accuracy_end=None, loss_gap=gap)
    return verdicts.judge_learning(v, Learn(loss_drop=0.5))


def scenario(failure, *variants_, changed=None):
    """A ScenarioResult judged by verdicts.judge, as the runner builds it."""
    variants_ = list(variants_)
    reproduced, fixed = verdicts.judge(variants_, failure, Learn(loss_drop=0.5))
    return ScenarioResult("s", "", "", failure, {}, reproduced, fixed, variants_, changed=changed or {})


# ---------------------------------------------------------------- a stall is finite


def test_a_stall_that_went_non_finite_is_not_reproduced():
    """vanishing_gradients and dying_relu reproduce a stall: finite, not learning. A
    broken variant that went non-finite (and so did not learn) failed some other way."""
    went_nonfinite = variant("broken", finite=False, end=math.nan, nonfinite_step=4)
    assert not went_nonfinite.learned
    result = scenario("stall", went_nonfinite, variant("fix"))
    assert result.reproduced is False
    assert went_nonfinite.verdict == "went non-finite (expected a stall)"
    assert verdict_lines(result)[0] == ("Verdict: NOT reproduced: the broken variant went non-finite at step 4, "
                                        "not a stall.")


def test_a_finite_stall_is_reproduced_and_a_learning_one_is_not():
    assert scenario("stall", variant("broken", end=1.9), variant("fix")).reproduced is True
    assert scenario("stall", variant("broken", end=0.5), variant("fix")).reproduced is False


# ---------------------------------------------------------------- a wrong loss


@pytest.mark.parametrize("start,gap,wrong", [
    (2.0, 0.005, True),  # off by 0.25% of the exact loss: wrong
    (2.0, -0.005, True),
    (2.0, 0.001, False),  # off by 0.05%: float noise, not wrong
    (0.01, 0.002, True),  # below 1, the gap is measured against 1
    (0.01, 0.0005, False),
])
def test_a_loss_reads_wrong_beyond_a_tenth_of_a_percent(start, gap, wrong):
    assert verdicts.GAP_TOLERANCE == 1e-3
    assert variant("myth", start=start, end=start / 4, gap=gap).wrong is wrong


# ---------------------------------------------------------------- claims' setup


@pytest.mark.parametrize("key", ["optimizer.name", "optimizer.lr", "init.name", "init.std", "clip.name",
                                 "clip.threshold", "dtype"])
def test_a_changed_training_setup_leaves_claims_undecided(key):
    changed = {key: ["own", "run"]}
    assert verdicts.claim_settings_changed(changed) == changed


@pytest.mark.parametrize("key", ["steps", "scenario.data.n", "seed", "device", "dtypes"])
def test_what_a_claim_measures_does_not_leave_it_undecided(key):
    assert verdicts.claim_settings_changed({key: ["own", "run"]}) == {}


def test_claim_settings_are_lesson_settings_and_the_groups_are_sweep_group_axes():
    from nanlab.lab import registry
    from nanlab.sweeps import summary

    assert set(options.TRAINING_SETUP) <= set(options.LESSON_SETTINGS)
    assert {"dtype", "steps", "scenario.data"} <= set(options.LESSON_SETTINGS)
    assert set(summary.GROUP_AXES) == set(options.CONFIG_GROUPS)
    assert not hasattr(registry, "GROUP_KEYS")


# ---------------------------------------------------------------- boundary brackets


CRITICAL = 0.37


def bracket_against(stays_finite, precision=0.05, candidates=2, start=0.01):
    """Bracket the critical lr of a fake scenario whose stability is ``stays_finite(lr)``."""
    limits = SimpleNamespace(lr_min=1e-12, lr_max=1e3, candidates=candidates, precision=precision)

    def measure(tried):
        return [stays_finite(lr) for _, lr in tried], ["fake"]

    (found,) = boundary.narrow([boundary.Bracket("default", "none")], start, limits, measure, out=lambda line: None)
    return found


@pytest.mark.parametrize("candidates", [2, 16])
@pytest.mark.parametrize("precision", [0.05, 0.2])
def test_the_bracket_holds_the_critical_lr_to_the_precision(candidates, precision):
    """Two candidates narrow the bracket by 3x in log space a round, so a search that
    stopped at 4x the precision would end wider than 1 + precision."""
    found = bracket_against(lambda lr: lr < CRITICAL, precision, candidates)
    entry = found.entry()
    assert entry["lo"] < CRITICAL <= entry["hi"]
    assert entry["hi"] / entry["lo"] <= 1 + precision
    assert entry["lo"] < entry["critical_lr"] < entry["hi"]


def test_a_bracket_stays_ordered_when_stability_is_not_monotone():
    """A finite island above the first failure (noise, a lucky seed) must not lift lo past hi."""
    found = bracket_against(lambda lr: lr < CRITICAL or 50 < lr < 60, candidates=16)
    assert found.lo < found.hi <= 50
    mixed = boundary.Bracket("default", "none")
    mixed.tried = {0.1: True, 1.0: False, 10.0: True}
    assert (mixed.lo, mixed.hi) == (0.1, 1.0)


def test_a_bracket_at_the_ends_of_the_range():
    always = bracket_against(lambda lr: True).entry()
    assert (always["lo"], always["hi"], always["critical_lr"]) == (1e3, None, None)
    never = bracket_against(lambda lr: False).entry()
    assert (never["lo"], never["hi"], never["critical_lr"]) == (None, 1e-12, None)


# ---------------------------------------------------------------- verdicts and their reasons


def test_each_scenario_verdict_carries_its_reason():
    result = scenario("nonfinite", variant("broken", finite=False, end=math.nan), variant("fix"))
    reproduced, fixed = verdicts.explain(result)
    assert (reproduced.word, reproduced.reason) == ("reproduced", "the broken variant went non-finite at step 0")
    assert (fixed.word, fixed.reason) == ("fixed", "every exact fix stayed finite and learned")
    assert verdict_lines(result) == ["Verdict: reproduced: the broken variant went non-finite at step 0.",
                                     "         fixed: every exact fix stayed finite and learned."]


def test_a_verdict_under_changed_settings_names_them():
    result = scenario("nonfinite", variant("broken"), variant("fix", end=1.9, name="f"),
                      changed={"optimizer.name": ["sgd", "adam"]})
    reproduced, fixed = verdicts.explain(result)
    assert reproduced.word == "NOT reproduced" and reproduced.setting == "optimizer=adam"
    assert verdict_lines(result) == [
        "Verdict: NOT reproduced with optimizer=adam: the broken variant stayed finite for 10 steps "
        "(the scenario is set up at optimizer=sgd).",
        "         NOT fixed with optimizer=adam: f finite, did not learn."]


def test_the_framework_report_formats_the_same_verdicts():
    from nanlab.frameworks import render

    result = scenario("nonfinite", variant("broken", finite=False, end=math.nan), variant("fix"))
    result.config = {"optimizer": {"name": "sgd", "lr": 0.1}, "clip": {"name": "none"}, "dtype": "float32",
                     "steps": 10, "seed": 0}
    text = render.render({"torch": result})
    assert "  torch             reproduced: the broken variant went non-finite at step 0.\n" in text


# ---------------------------------------------------------------- one home per table


def test_the_yaml_default_scenario_is_the_one_in_options():
    """Hydra reads conf/config.yaml's defaults list; schema and compose read options."""
    from omegaconf import OmegaConf

    from nanlab.config import schema

    defaults = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "config.yaml"))["defaults"]
    named = [d["scenario"] for d in defaults if isinstance(d, dict) and "scenario" in d]
    assert named == [options.DEFAULT_SCENARIO] == [schema.ScenarioConf().name]


def test_sweep_axes_come_from_one_table():
    from dataclasses import fields

    from nanlab.config import schema
    from nanlab.sweeps import summary

    sweep_fields = [f.name for f in fields(schema.SweepConf)]
    assert sweep_fields[:len(options.SWEEP_AXES)] == list(options.SWEEP_AXES)
    assert list(summary.AXES.values()) == [axis.override for axis in options.SWEEP_AXES.values()]
    for axis in options.SWEEP_AXES:
        assert f"sweep.{axis}" in schema.ALLOWED
    assert str(options.SWEEP_DEFAULT_MAX_POINTS) in schema.ALLOWED["sweep.max_points"]


def test_log_axes_share_one_tick_label():
    from nanlab.reports import figures
    from nanlab.sweeps import maps

    assert maps.power_of_ten is figures.power_of_ten
    assert figures.power_of_ten(-3.0) == "$10^{-3}$" and figures.power_of_ten(0.5) == "3.16"


def test_a_multirun_line_tells_a_fix_that_did_not_learn_from_one_that_went_non_finite():
    from nanlab.lab.result import FirstNonFinite, ScenarioResult, VariantResult
    from nanlab.reports.scenario_report import one_line

    def variant(name, role, step=None, learned=True):
        first = None if step is None else FirstNonFinite(step, "loss", float("nan"), None)
        return VariantResult(name=name, role=role, summary="", lossy=False, overrides={}, finite=step is None,
                             first_nonfinite=first, losses=[1.0], grad_norms=[1.0], param_norms=[1.0],
                             final_loss=None if step is not None else 0.5, exact_loss_start=1.0, exact_loss_end=0.5,
                             accuracy_start=None, accuracy_end=None, loss_gap=0.0, learned=learned)

    stalled = ScenarioResult(scenario="s", summary="", explanation="", failure="nonfinite", config={},
                             variants=[variant("b", "broken", 3, False), variant("f", "fix", None, False)],
                             reproduced=True, fixed=False)
    line = one_line(stalled)
    assert "NOT fixed (every fix stayed finite; one did not learn)" in line and "f final loss 0.5, did not learn" in line
    blown = ScenarioResult(scenario="s", summary="", explanation="", failure="nonfinite", config={},
                           variants=[variant("b", "broken", 3, False), variant("f", "fix", 7, False)],
                           reproduced=True, fixed=False)
    assert "NOT fixed (a fix went non-finite)" in one_line(blown) and "f non-finite at step 7" in one_line(blown)
