"""The scenario contract. A scenario is a module that reads top to bottom and defines:

``NAME``, ``SUMMARY``
    its name and a one-line summary (``SUMMARY`` is read from source by ``mode=list``).
``EXPLANATION``
    a few lines on the mechanism, with the arithmetic that fails.
``FAILURE``
    ``"nonfinite"`` (default): the broken variant goes NaN/Inf; or ``"stall"``: it
    stays finite but fails to learn.
``LEARN``
    a :class:`Learn`: how much the exact loss must fall (or which accuracy to reach)
    for a variant to count as having learned.
``make_data(ctx) -> Data``, ``make_model(ctx, data) -> nn.Module``
    synthetic data from ``ctx.generator()`` and the model, both seeded.
``exact_loss(output, target)``
    the loss computed the stable way in float64; every variant is scored by it.
``VARIANTS``
    exactly one ``broken`` :class:`Variant`, one or more ``fix`` variants, and any
    ``myth`` variants (remedies often recommended that measure as not working).
Optional: ``accuracy(output, target)``, ``metrics(model, data) -> dict`` (measured
after training, per variant), ``probes(ctx, train) -> dict`` (one-off measurements
outside training; ``train(variant)`` runs a variant through the shared loop) and
``CLAIMS``, a list of :class:`Claim`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping, Optional, Union

ROLES = ("broken", "fix", "myth")
FAILURES = ("nonfinite", "stall")


@dataclass
class Data:
    """Inputs and targets; ``extra`` carries whatever else a scenario's model needs."""

    x: Any
    y: Any
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """One way of training the scenario's model.

    ``loss(output, target)`` is the training loss. ``model`` replaces the scenario's
    make_model, ``prepare`` transforms the data (standardizing, say), ``overrides``
    sets config keys for this variant only, e.g. ``{"optimizer.lr": 1e-3}``, or is a
    function ``(data, cfg)`` of the prepared Data and the run's config returning them. ``amp`` is None, "float16" or
    "bfloat16" (autocast), and ``loss_scaling`` adds torch.amp.GradScaler. A lossy
    fix changes what is learned (clipping, clamping); the report measures the cost.
    """

    name: str
    role: str
    summary: str
    loss: Callable
    model: Optional[Callable] = None
    prepare: Optional[Callable] = None
    overrides: Union[Mapping[str, Any], Callable[[Data, Any], Mapping[str, Any]]] = field(default_factory=dict)
    lossy: bool = False
    amp: Optional[str] = None
    loss_scaling: bool = False


@dataclass(frozen=True)
class Learn:
    """A variant learned if its exact loss fell by ``loss_drop`` (a fraction of the
    starting value), or, when ``accuracy`` is set, if it reached that accuracy.
    ``loss_below`` replaces the relative drop by an absolute bar: stall scenarios
    use it, because fitting only the mean already lowers the loss a lot."""

    loss_drop: float = 0.5
    accuracy: Optional[float] = None
    loss_below: Optional[float] = None


@dataclass(frozen=True)
class Claim:
    """A sentence from the folklore, in our words, and the measurement that decides it.

    ``decide(result)`` receives the ScenarioResult and returns
    ``(verdict, evidence)`` with verdict one of confirmed, refuted, partly.
    """

    text: str
    decide: Callable[[Any], tuple]
    source: str = ""


@dataclass
class Scenario:
    name: str
    summary: str
    explanation: str
    failure: str
    learn: Learn
    make_data: Callable
    make_model: Callable
    exact_loss: Callable
    variants: list
    accuracy: Optional[Callable] = None
    metrics: Optional[Callable] = None
    probes: Optional[Callable] = None
    claims: list = field(default_factory=list)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    @property
    def broken(self) -> Variant:
        return next(v for v in self.variants if v.role == "broken")

    @classmethod
    def from_module(cls, mod: ModuleType) -> "Scenario":
        where = mod.__name__
        missing = [a for a in ("NAME", "SUMMARY", "EXPLANATION", "make_data", "make_model", "exact_loss", "VARIANTS")
                   if not hasattr(mod, a)]
        if missing:
            raise TypeError(f"scenario module {where} lacks {', '.join(missing)} (see nanlab.scenario)")
        variants = list(mod.VARIANTS)
        roles = [v.role for v in variants]
        if roles.count("broken") != 1 or "fix" not in roles or any(r not in ROLES for r in roles):
            raise TypeError(f"scenario {where} needs exactly one broken variant, at least one fix, roles from {ROLES}")
        if len({v.name for v in variants}) != len(variants):
            raise TypeError(f"scenario {where} has two variants with the same name")
        failure = getattr(mod, "FAILURE", "nonfinite")
        if failure not in FAILURES:
            raise TypeError(f"scenario {where}: FAILURE must be one of {FAILURES}")
        return cls(
            name=mod.NAME, summary=mod.SUMMARY, explanation=mod.EXPLANATION.strip(), failure=failure,
            learn=getattr(mod, "LEARN", Learn()), make_data=mod.make_data, make_model=mod.make_model,
            exact_loss=mod.exact_loss, variants=variants, accuracy=getattr(mod, "accuracy", None),
            metrics=getattr(mod, "metrics", None), probes=getattr(mod, "probes", None),
            claims=list(getattr(mod, "CLAIMS", [])),
        )
