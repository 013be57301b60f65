"""Every verdict rule, in one place. Each is a function of measured numbers.

A variant *learned* when its exact float64 loss fell far enough (or its accuracy
reached the bar); a myth reads *wrong* when its training loss differs from the
exact loss; a scenario is *reproduced* when its broken variant failed the way the
scenario says, and *fixed* when every exact (non-lossy) fix stayed finite and learned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from nanlab.config import options

# The rules read a VariantResult (nanlab.lab.result) as `v`; they do not import it, so
# that results can render their own reports without a cycle.

# A myth's loss counts as "wrong" when it differs from the exact loss by more than
# this fraction of the exact loss (or of 1, for losses below 1).
GAP_TOLERANCE = 1e-3


def learned(finite: bool, start: float, end: float, accuracy_end: Optional[float], learn) -> bool:
    """``learn`` is the scenario's :class:`nanlab.lab.scenario.Learn` bar."""
    if not finite or not (math.isfinite(start) and math.isfinite(end)):
        return False
    if learn.accuracy is not None and accuracy_end is not None and accuracy_end >= learn.accuracy:
        return True
    if learn.loss_below is not None:
        return end <= learn.loss_below
    return end <= (1.0 - learn.loss_drop) * start


def reads_wrong(v) -> bool:
    gap = v.loss_gap
    return gap is not None and math.isfinite(gap) and abs(gap) > GAP_TOLERANCE * max(1.0, abs(v.exact_loss_start))


def judge_learning(v, learn):
    """Fill in the rules that need only this variant's numbers."""
    v.learned = learned(v.finite, v.exact_loss_start, v.exact_loss_end, v.accuracy_end, learn)
    v.wrong = reads_wrong(v)
    return v


def variant_verdict(v, failure: str) -> str:
    """One word or phrase, computed from the variant's run."""
    if v.role == "broken":
        if failure == "stall":
            if not v.finite:
                return "went non-finite (expected a stall)"
            return "not reproduced (it learned)" if v.learned else "stalled"
        return "reproduced" if not v.finite else "not reproduced (stayed finite)"
    if v.role == "myth":
        if not v.finite:
            return "myth: still non-finite"
        if v.wrong:
            return "myth: finite but wrong"
        if not v.learned:
            return "myth: finite, did not learn"
        return "works here (not a myth in this setup)"
    if not v.finite:
        return "still non-finite"
    if not v.learned:
        return "finite, did not learn"
    return "fixed (lossy)" if v.lossy else "fixed"


def scenario_verdicts(variants: list, failure: str, all_run: bool = True) -> tuple:
    """(reproduced, fixed). With only some variants run (``all_run`` False), a verdict
    whose variants were left out is None: not measured, rather than false."""
    broken = next((v for v in variants if v.role == "broken"), None)
    if broken is None:
        reproduced = None
    else:
        reproduced = (broken.finite and not broken.learned) if failure == "stall" else not broken.finite
    exact_fixes = [v for v in variants if v.role == "fix" and not v.lossy]
    fixed = bool(exact_fixes) and all(v.finite and v.learned for v in exact_fixes)
    if not all_run and not exact_fixes:
        fixed = None
    return reproduced, fixed


@dataclass(frozen=True)
class ScenarioVerdict:
    """One of a scenario's two verdicts with its reason, for the reports to print:
    ``question`` is what was judged ("reproduced" or "fixed"), ``holds`` the answer
    (None: not measured), ``setting`` the run's changed settings it was measured
    with ("" at the scenario's own) and ``reason`` what in the run decided it."""

    question: str
    holds: Optional[bool]
    reason: str
    setting: str = ""

    @property
    def word(self) -> str:
        # "reproduced?": a verdict that was not measured must not read as one that holds.
        return {False: "NOT " + self.question, None: self.question + "?"}.get(self.holds, self.question)


def what_happened(v) -> str:
    """A variant's run in a few words: where it first went non-finite, or how long it stayed finite."""
    first = v.first_nonfinite
    if first is None:
        return f"finite for {len(v.losses)} steps"
    return f"{first.kind_word} {first.quantity} at step {first.step}"


def explain(result) -> tuple:
    """(reproduced, fixed) of a ScenarioResult, each a :class:`ScenarioVerdict` whose
    reason is read from the result's variants. When the run changed the scenario's
    own settings, a verdict says with what; a failure that does not happen then is a
    finding, not a broken lab, so its reason also names the scenario's own settings."""
    setting = result.settings_text(1) if result.changed else ""
    broken = result.broken
    if result.reproduced is None:
        reproduced = ScenarioVerdict("reproduced", None, "not measured (the broken variant was not run: variant= left it out)")
    else:
        if result.reproduced:
            when = f" at step {broken.nonfinite_step}" if broken.first_nonfinite else ""
            failed = "stalled: it stayed finite and did not learn" if result.failure == "stall" else "went non-finite"
            why = f"the broken variant {failed}{when}"
        elif not broken.finite:
            why = f"the broken variant went non-finite at step {broken.nonfinite_step}, not a stall"
        elif result.failure == "stall":
            why = "the broken variant learned"
        else:
            why = f"the broken variant stayed finite for {len(broken.losses)} steps"
        if not result.reproduced and result.changed:
            why += f" (the scenario is set up at {result.settings_text(0)})"
        reproduced = ScenarioVerdict("reproduced", result.reproduced, why, setting)
    if result.fixed is None:
        fixed = ScenarioVerdict("fixed", None, "not measured (no exact fix was run: variant= left them out)")
    elif result.fixed:
        fixed = ScenarioVerdict("fixed", True, "every exact fix stayed finite and learned", setting)
    else:
        exact = [v for v in result.variants if v.role == "fix" and not v.lossy]
        failing = [f"{v.name} {v.verdict}" for v in exact if not (v.finite and v.learned)]
        fixed = ScenarioVerdict("fixed", False, "; ".join(failing) or "the scenario has no exact fix", setting)
    return reproduced, fixed


def lossy_cost(v, variants: list) -> Optional[dict]:
    """What a lossy fix costs, against the best non-lossy fix that learned."""
    refs = [r for r in variants if r.role == "fix" and not r.lossy and r.finite and r.learned]
    if not refs:
        return None
    ref = min(refs, key=lambda r: r.exact_loss_end)
    cost = {"against": ref.name, "exact_loss": v.exact_loss_end - ref.exact_loss_end}
    if v.accuracy_end is not None and ref.accuracy_end is not None:
        cost["accuracy"] = v.accuracy_end - ref.accuracy_end
    return cost


def judge(variants: list, failure: str, learn, all_run: bool = True) -> tuple:
    """Every variant's verdict and cost, then the scenario's (reproduced, fixed)."""
    for v in variants:
        judge_learning(v, learn)
    for v in variants:
        if v.lossy:
            v.cost = lossy_cost(v, variants)
        v.verdict = variant_verdict(v, failure)
    return scenario_verdicts(variants, failure, all_run)


def claim_settings_changed(changed: dict) -> dict:
    """The changed settings (``{"optimizer.name": [own, run], ...}``) that leave claims
    "not decided": those of the scenario's training setup (options.TRAINING_SETUP).
    Data knobs, steps and seed are part of what a claim measures, so its verdict
    follows them."""
    return {k: v for k, v in changed.items() if _under(k, options.TRAINING_SETUP)}


def _under(key: str, settings: tuple) -> bool:
    """Whether a dotted key is one of ``settings`` or inside one (optimizer.lr is in optimizer)."""
    return any(key == s or key.startswith(s + ".") for s in settings)
