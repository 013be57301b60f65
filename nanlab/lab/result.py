"""What a run measured, as typed data: the results every report, summary and claim
table is built from.

Torch-free. ``ScenarioResult.load(path)`` rebuilds a result from its result.json,
so reports can be rendered from saved runs without importing torch. The rules that
turn these numbers into verdicts live in :mod:`nanlab.lab.verdicts`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Optional

from nanlab import jsonio

TIMING_KEYS = {"seconds"}


@dataclass
class Event:
    """The tracer's account of the first op that produced a NaN or Inf.

    ``origin`` is "op" when this op made the value non-finite, "input" when the NaN
    or +Inf came in from outside the traced code. ``module`` and ``source`` may be
    None when unknown; ``node`` and ``forward_op`` are set for backward ops."""

    op: str
    phase: str
    kind: str
    origin: str
    module: Optional[str] = None
    source: Optional[str] = None
    input_absmax: Optional[float] = None
    node: Optional[str] = None
    forward_op: Optional[str] = None

    @property
    def kind_word(self) -> str:
        return "NaN" if self.kind == "nan" else "Inf"

    def describe(self) -> str:
        what = self.op
        if self.node:
            what = f"{self.node} (backward of {self.forward_op or '?'})"
        where = f" in {self.module}" if self.module else ""
        src = f" ({self.source})" if self.source else ""
        came = " (came in from outside: bad input or parameters)" if self.origin == "input" else ""
        return f"{self.kind_word} first in {self.phase}: {what}{where}{src}{came}"

    def to_dict(self) -> dict:
        return jsonio.jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        known = {f.name for f in fields(cls)}
        event = cls(**{k: v for k, v in d.items() if k in known})
        event.input_absmax = jsonio.number(event.input_absmax)
        return event


@dataclass
class FirstNonFinite:
    """Where a variant's training first went non-finite. ``quantity`` is what went
    first: loss, gradients, parameters, or activations (the loss was finite but the
    tracer found the first bad value in the forward pass). ``loss`` is that step's
    loss; ``event`` the tracer's first op, None when the replay found none."""

    step: int
    quantity: str
    loss: float
    event: Optional[Event] = None

    @property
    def kind_word(self) -> str:
        """NaN or Inf, as a person reads it."""
        if self.quantity == "loss":
            return "NaN" if math.isnan(self.loss) else "Inf"
        return self.event.kind_word if self.event is not None else "non-finite"

    def to_dict(self) -> dict:
        # result.json calls the event "origin"
        return {"step": self.step, "quantity": self.quantity, "loss": self.loss,
                "origin": self.event.to_dict() if self.event is not None else None}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["FirstNonFinite"]:
        if d is None:
            return None
        origin = d.get("origin")
        return cls(int(d["step"]), d["quantity"], jsonio.number(d.get("loss", math.nan)),
                   Event.from_dict(origin) if origin else None)


@dataclass
class VariantResult:
    name: str
    role: str
    summary: str
    lossy: bool
    overrides: dict
    finite: bool
    first_nonfinite: Optional[FirstNonFinite]
    losses: list
    grad_norms: list
    param_norms: list
    final_loss: Optional[float]
    exact_loss_start: float
    exact_loss_end: float
    accuracy_start: Optional[float]
    accuracy_end: Optional[float]
    loss_gap: Optional[float]  # training loss minus exact loss, both at the initial parameters
    metrics: dict = field(default_factory=dict)
    exact_losses: list = field(default_factory=list)  # the exact float64 loss of each step's outputs
    # Set by nanlab.lab.verdicts from the numbers above.
    learned: bool = False
    wrong: bool = False  # finite, yet its training loss is not the quantity it claims to be
    cost: Optional[dict] = None  # lossy fixes: exact loss and accuracy against the best exact fix
    verdict: str = ""
    seconds: float = 0.0

    @property
    def nonfinite_step(self) -> Optional[int]:
        """The step at which it first went non-finite; None if it stayed finite."""
        return self.first_nonfinite.step if self.first_nonfinite else None

    @property
    def loss_drop(self) -> float:
        """Fraction by which the exact loss fell from start to end (NaN if undefined)."""
        start, end = self.exact_loss_start, self.exact_loss_end
        if not (math.isfinite(start) and math.isfinite(end)) or start == 0:
            return math.nan
        return 1.0 - end / start

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["first_nonfinite"] = self.first_nonfinite.to_dict() if self.first_nonfinite else None
        return jsonio.jsonable(d)

    @classmethod
    def from_dict(cls, d: dict) -> "VariantResult":
        known = {f.name for f in fields(cls)}
        v = cls(**{k: val for k, val in d.items() if k in known and k != "first_nonfinite"},
                first_nonfinite=FirstNonFinite.from_dict(d.get("first_nonfinite")))
        for name in ("losses", "grad_norms", "param_norms", "exact_losses"):
            setattr(v, name, jsonio.numbers(getattr(v, name)))
        for name in ("final_loss", "exact_loss_start", "exact_loss_end", "accuracy_start", "accuracy_end", "loss_gap"):
            setattr(v, name, jsonio.number(getattr(v, name)))
        v.metrics = {k: jsonio.number(x) for k, x in v.metrics.items()}
        if v.cost:
            v.cost = {k: jsonio.number(x) for k, x in v.cost.items()}
        return v


class Verdict(str, Enum):
    """What a claim's measurement says of it. ``not_decided``: the run was not at the
    settings the claim is about (another optimizer, say), so it says nothing."""

    confirmed = "confirmed"
    partly = "partly"
    refuted = "refuted"
    not_decided = "not decided"

    def __str__(self) -> str:
        return self.value


@dataclass
class ClaimResult:
    scenario: str
    claim: str
    verdict: Verdict
    evidence: str
    source: str = ""
    # Where it was measured (nanlab.config.options.FRAMEWORKS); results saved before frameworks were torch.
    framework: str = "torch"

    def to_dict(self) -> dict:
        return {"scenario": self.scenario, "claim": self.claim, "verdict": self.verdict.value,
                "evidence": self.evidence, "source": self.source, "framework": self.framework}

    @classmethod
    def from_dict(cls, d: dict) -> "ClaimResult":
        return cls(d["scenario"], d["claim"], Verdict(d["verdict"]), d["evidence"], d.get("source", ""),
                   d.get("framework", "torch"))


@dataclass
class ScenarioResult:
    scenario: str
    summary: str
    explanation: str
    failure: str
    config: dict
    reproduced: Optional[bool]  # None when the broken variant was not run (variant=...)
    fixed: Optional[bool]  # None when no exact fix was run
    variants: list
    probes: dict = field(default_factory=dict)
    claims: list = field(default_factory=list)
    # Settings this run changed from the scenario's own: {key: [scenario's, this run's]}.
    changed: dict = field(default_factory=dict)
    seconds: float = 0.0

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"{self.scenario} has no variant {name!r}; its variants are "
                       + ", ".join(v.name for v in self.variants))

    @property
    def broken(self) -> Optional[VariantResult]:
        return next((v for v in self.variants if v.role == "broken"), None)

    def settings_text(self, which: int) -> str:
        """The changed settings as ``key=value`` words: the scenario's (0) or this run's (1)."""
        return " ".join(f"{_short_key(key)}={_word(pair[which])}" for key, pair in self.changed.items())

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["variants"] = [v.to_dict() for v in self.variants]
        d["claims"] = [c.to_dict() for c in self.claims]
        return jsonio.jsonable(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> "ScenarioResult":
        known = {f.name for f in fields(cls)}
        result = cls(**{k: v for k, v in d.items() if k in known})
        result.variants = [VariantResult.from_dict(v) for v in d["variants"]]
        result.claims = [ClaimResult.from_dict(c) for c in d.get("claims", [])]
        result.probes = jsonio.decoded(result.probes)
        return result

    @classmethod
    def load(cls, path) -> "ScenarioResult":
        """Rebuild a result from a result.json written by a run (no torch needed)."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def __str__(self) -> str:
        """The CLI's report, brief: each variant, the claims and the verdict (under 3,000
        characters, where the dataclass's own repr dumped every step's numbers)."""
        from nanlab.reports.scenario_report import render

        return render(self, brief=True)

    __repr__ = __str__  # what the REPL shows for ``nanlab.run(...)``: the report, not the raw numbers

    def show(self) -> None:
        """Print the CLI's full report, the mechanism and each claim's evidence included."""
        from nanlab.reports.scenario_report import render

        print(render(self))

    def save(self, path) -> Path:
        """Write this result as result.json at ``path`` (into it, where ``path`` is a
        folder), atomically: a file already there is replaced whole or not at all."""
        path = Path(path)
        if path.is_dir():
            path = path / "result.json"
        return jsonio.write_text(path, self.to_json() + "\n")

    def plot(self, path=None):
        """Each variant's exact loss and gradient norm per step, as a matplotlib Figure;
        with ``path``, also written there as a PNG (atomically). matplotlib is imported
        only here."""
        from nanlab.reports import figures

        fig = figures.variant_figure(self)
        if path is not None:
            figures.write_png(fig, Path(path))
        return fig

    def _repr_html_(self) -> str:
        """Jupyter shows a result as its handout section."""
        from nanlab.reports.scenario_report import html_section

        return html_section(self)


def _short_key(key: str) -> str:
    """optimizer.name -> optimizer, optimizer.lr -> lr: the words a person types."""
    return {"optimizer.lr": "lr"}.get(key, key.removesuffix(".name"))


def _word(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def strip_timing(obj):
    """The result without wall-clock fields: what determinism is judged on."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj
