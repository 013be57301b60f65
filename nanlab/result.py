"""Results and verdicts. Every verdict here is a function of measured numbers.

Torch-free, so reports and claim tables can be built from saved result.json files.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

# A myth's loss counts as "wrong" when it differs from the exact loss by more than this.
GAP_TOLERANCE = 1e-3
TIMING_KEYS = {"seconds"}


@dataclass
class VariantResult:
    name: str
    role: str
    summary: str
    lossy: bool
    overrides: dict
    finite: bool
    first_nonfinite: Optional[dict]  # {step, quantity, origin: tracer Event as dict or None}
    losses: list
    grad_norms: list
    param_norms: list
    final_loss: Optional[float]
    exact_loss_start: float
    exact_loss_end: float
    accuracy_start: Optional[float]
    accuracy_end: Optional[float]
    learned: bool
    loss_gap: Optional[float]  # training loss minus exact loss, both at the initial parameters
    metrics: dict = field(default_factory=dict)
    cost: Optional[dict] = None  # lossy fixes: exact loss and accuracy against the best exact fix
    verdict: str = ""
    seconds: float = 0.0

    @property
    def loss_drop(self) -> float:
        """Fraction by which the exact loss fell from start to end."""
        if not (math.isfinite(self.exact_loss_start) and math.isfinite(self.exact_loss_end)) or self.exact_loss_start == 0:
            return float("nan")
        return 1.0 - self.exact_loss_end / self.exact_loss_start

    @property
    def wrong(self) -> bool:
        """Finite, yet its training loss is not the quantity it claims to be."""
        gap = self.loss_gap
        return gap is not None and math.isfinite(gap) and abs(gap) > GAP_TOLERANCE * max(1.0, abs(self.exact_loss_start))


@dataclass
class ScenarioResult:
    scenario: str
    summary: str
    explanation: str
    failure: str
    config: dict
    reproduced: bool
    fixed: bool
    variants: list
    probes: dict = field(default_factory=dict)
    claims: list = field(default_factory=list)
    seconds: float = 0.0

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)

    @property
    def broken(self) -> VariantResult:
        return next(v for v in self.variants if v.role == "broken")

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


def variant_verdict(v: VariantResult, failure: str) -> str:
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


def learned(v_finite: bool, start: float, end: float, acc_end: Optional[float], learn) -> bool:
    if not v_finite or not (math.isfinite(start) and math.isfinite(end)):
        return False
    if learn.accuracy is not None and acc_end is not None and acc_end >= learn.accuracy:
        return True
    if learn.loss_below is not None:
        return end <= learn.loss_below
    return end <= (1.0 - learn.loss_drop) * start


def scenario_verdicts(variants: list, failure: str) -> tuple[bool, bool]:
    """(reproduced, fixed): the broken variant failed the way the scenario says, and
    every non-lossy fix stayed finite and learned."""
    broken = next(v for v in variants if v.role == "broken")
    reproduced = (broken.finite and not broken.learned) if failure == "stall" else not broken.finite
    exact_fixes = [v for v in variants if v.role == "fix" and not v.lossy]
    fixed = bool(exact_fixes) and all(v.finite and v.learned for v in exact_fixes)
    return reproduced, fixed


def lossy_cost(v: VariantResult, variants: list) -> Optional[dict]:
    """What a lossy fix costs, against the best non-lossy fix that learned."""
    refs = [r for r in variants if r.role == "fix" and not r.lossy and r.finite and r.learned]
    if not refs:
        return None
    ref = min(refs, key=lambda r: r.exact_loss_end)
    cost = {"against": ref.name, "exact_loss": v.exact_loss_end - ref.exact_loss_end}
    if v.accuracy_end is not None and ref.accuracy_end is not None:
        cost["accuracy"] = v.accuracy_end - ref.accuracy_end
    return cost


def _jsonable(obj: Any) -> Any:
    """Strict JSON: non-finite floats become the strings 'nan', 'inf', '-inf'."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def strip_timing(obj: Any) -> Any:
    """The result without wall-clock fields: what determinism is judged on."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj
