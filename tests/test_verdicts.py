"""The verdict rules, on hand-made results: each label follows the numbers."""
import pytest

import math

from nanlab.lab.result import FirstNonFinite, VariantResult
from nanlab.lab.scenario import Learn
from nanlab.lab.verdicts import judge_learning, learned, lossy_cost, scenario_verdicts, variant_verdict


def variant(role="fix", finite=True, start=1.0, end=0.1, lossy=False, gap=0.0, acc=None, name="v"):
    v = VariantResult(name=name, role=role, summary="", lossy=lossy, overrides={}, finite=finite,
                      first_nonfinite=None if finite else FirstNonFinite(3, "loss", math.nan), losses=[start + gap],
                      grad_norms=[], param_norms=[], final_loss=end, exact_loss_start=start, exact_loss_end=end,
                      accuracy_start=None, accuracy_end=acc, loss_gap=gap)
    return judge_learning(v, Learn(loss_drop=0.5))


@pytest.mark.parametrize("kw,failure,expected", [
    (dict(role="broken", finite=False), "nonfinite", "reproduced"),
    (dict(role="broken"), "nonfinite", "not reproduced (stayed finite)"),
    (dict(role="broken", end=0.9), "stall", "stalled"),
    (dict(role="broken"), "stall", "not reproduced (it learned)"),
    (dict(role="broken", finite=False), "stall", "went non-finite (expected a stall)"),
    (dict(), "nonfinite", "fixed"),
    (dict(lossy=True), "nonfinite", "fixed (lossy)"),
    (dict(end=0.9), "nonfinite", "finite, did not learn"),
    (dict(finite=False), "nonfinite", "still non-finite"),
    (dict(role="myth", finite=False), "nonfinite", "myth: still non-finite"),
    (dict(role="myth", gap=-5.0), "nonfinite", "myth: finite but wrong"),
    (dict(role="myth", end=0.9), "nonfinite", "myth: finite, did not learn"),
    (dict(role="myth"), "nonfinite", "works here (not a myth in this setup)"),
])
def test_variant_verdicts(kw, failure, expected):
    assert variant_verdict(variant(**kw), failure) == expected


def test_learning_bars():
    assert learned(True, 1.0, 0.5, None, Learn(loss_drop=0.5))
    assert not learned(True, 1.0, 0.51, None, Learn(loss_drop=0.5))
    assert learned(True, 1.0, 0.9, 0.95, Learn(loss_drop=0.5, accuracy=0.9))
    assert not learned(True, 0.5, 0.3, None, Learn(loss_below=0.2))  # a 40% drop, still above the bar
    assert not learned(False, 1.0, 0.0, None, Learn())


def test_scenario_verdicts_ignore_lossy_fixes_and_need_one_exact_fix():
    broken = variant(role="broken", finite=False)
    assert scenario_verdicts([broken, variant(), variant(lossy=True, end=0.9)], "nonfinite") == (True, True)
    assert scenario_verdicts([broken, variant(), variant(end=0.9)], "nonfinite") == (True, False)
    assert scenario_verdicts([broken, variant(lossy=True)], "nonfinite") == (True, False)


def test_lossy_cost_is_measured_against_the_best_exact_fix():
    exact_a, exact_b = variant(name="a", end=0.3, acc=0.9), variant(name="b", end=0.1, acc=0.95)
    cost = lossy_cost(variant(lossy=True, end=0.4, acc=0.7), [exact_a, exact_b])
    assert cost["against"] == "b" and cost["exact_loss"] == pytest.approx(0.3) and cost["accuracy"] == pytest.approx(-0.25)
