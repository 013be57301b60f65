"""The scenario contract. A scenario is one module that reads top to bottom; its name
is its file name (or, for a third-party scenario, its entry-point name). It defines:

``SUMMARY``
    a one-line summary (read from source by ``mode=list``).
``EXPLANATION``
    a few lines on the mechanism, with the arithmetic that fails.
``DEFAULTS``
    the settings the lesson is told at, as a literal dict: ``optimizer`` and ``init``
    (a name, or a dict with ``name`` and its settings), ``lr`` (for that optimizer),
    ``steps``, ``dtype``. Read from source, so the CLI need not import the module.
``DATA``
    the data knobs and their defaults, as a literal dict (``n``, ``input_scale``, ...);
    overridable as ``scenario.data.KEY=VALUE``, typed by their defaults.
``FAILURE``
    ``"nonfinite"`` (default): the broken variant goes NaN/Inf; or ``"stall"``: it
    stays finite but fails to learn.
``LEARN``
    a :class:`Learn`: how much the exact loss must fall (or which accuracy to reach)
    for a variant to count as having learned.
``make_data(ctx) -> Data``, ``make_model(ctx, data, **parts) -> nn.Module``
    synthetic data drawn from ``ctx.rng()``, and the model. A variant may swap a
    named part of the model: ``Variant(..., swap={"activation": nn.LeakyReLU})``
    calls ``make_model(ctx, data, activation=nn.LeakyReLU)``.
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
REQUIRED = ("SUMMARY", "EXPLANATION", "make_data", "make_model", "exact_loss", "VARIANTS")


class ContractError(Exception):
    """A scenario module that breaks the contract above. The message names the module
    and the rule; the CLI prints it as one line."""

    def __init__(self, module: str, rule: str):
        self.module, self.rule = module, rule
        super().__init__(f"scenario module {module} breaks the contract: {rule}")


@dataclass
class Data:
    """Inputs and targets; ``extra`` carries whatever else a scenario's model needs."""

    x: Any
    y: Any
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """One way of training the scenario's model.

    ``loss(output, target)`` is the training loss. ``swap`` replaces named parts of
    the scenario's model (keyword arguments of make_model); ``model`` replaces
    make_model outright. ``prepare`` transforms the data (standardizing, say).
    ``overrides`` sets config keys for this variant only, e.g. ``{"optimizer.lr": 1e-3}``,
    or is a function ``(data, cfg)`` of the prepared Data and the run's config
    returning them. ``amp`` is None, "float16" or "bfloat16" (autocast), and
    ``loss_scaling`` adds torch.amp.GradScaler. A lossy fix changes what is learned
    (clipping, clamping); the report measures the cost.
    """

    name: str
    role: str
    summary: str
    loss: Callable
    swap: Mapping[str, Any] = field(default_factory=dict)
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

    ``decide(result)`` receives the ScenarioResult and returns ``(Verdict, evidence)``.
    It decides from the numbers and booleans that variants and probes return.
    """

    text: str
    decide: Callable[[Any], tuple]
    source: str = ""


class Rng:
    """Seeded draws for synthetic data: float64 on the CPU, cast and moved only later,
    so that every dtype and device sees the same numbers. One generator, drawn in order."""

    def __init__(self, seed: int):
        import torch

        self._torch = torch
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, *shape):
        return self._torch.randn(*shape, generator=self.generator, dtype=self._torch.float64)

    def rand(self, *shape):
        return self._torch.rand(*shape, generator=self.generator, dtype=self._torch.float64)

    def uniform(self, low: float, high: float, *shape):
        return low + (high - low) * self.rand(*shape)

    def randint(self, low: int, high: int, shape: tuple):
        return self._torch.randint(low, high, shape, generator=self.generator)

    def randperm(self, n: int):
        return self._torch.randperm(n, generator=self.generator)


@dataclass
class Context:
    """What a scenario's functions see: the resolved config and placement."""

    cfg: Any
    device: Any  # torch.device
    dtype: Any  # torch.dtype

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def knobs(self):
        """The scenario's data knobs (its DATA, with any ``scenario.data.*`` overrides)."""
        return self.cfg.scenario.data

    def rng(self, offset: int = 0) -> Rng:
        """A fresh generator seeded from the config; ``offset`` gives an independent stream."""
        return Rng(self.seed * 1000 + offset)


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
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"{self.name} has no variant {name!r}; its variants are " + ", ".join(v.name for v in self.variants))

    @property
    def broken(self) -> Variant:
        return next(v for v in self.variants if v.role == "broken")

    @classmethod
    def from_module(cls, mod: ModuleType, name: str) -> "Scenario":
        where = mod.__name__
        missing = [a for a in REQUIRED if not hasattr(mod, a)]
        if missing:
            raise ContractError(where, f"it must define {', '.join(missing)} (see nanlab.lab.scenario)")
        variants = list(mod.VARIANTS)
        if not all(isinstance(v, Variant) for v in variants):
            raise ContractError(where, "VARIANTS must hold nanlab.lab.scenario.Variant objects")
        roles = [v.role for v in variants]
        unknown = sorted({r for r in roles if r not in ROLES})
        if unknown:
            raise ContractError(where, f"variant role {unknown[0]!r} is not one of {', '.join(ROLES)}")
        if roles.count("broken") != 1:
            raise ContractError(where, f"it needs exactly one broken variant, and has {roles.count('broken')}")
        if "fix" not in roles:
            raise ContractError(where, "it needs at least one fix variant")
        if len({v.name for v in variants}) != len(variants):
            raise ContractError(where, "two variants share a name")
        failure = getattr(mod, "FAILURE", "nonfinite")
        if failure not in FAILURES:
            raise ContractError(where, f"FAILURE must be one of {', '.join(FAILURES)}")
        return cls(
            name=name, summary=mod.SUMMARY, explanation=mod.EXPLANATION.strip(), failure=failure,
            learn=getattr(mod, "LEARN", Learn()), make_data=mod.make_data, make_model=mod.make_model,
            exact_loss=mod.exact_loss, variants=variants, accuracy=getattr(mod, "accuracy", None),
            metrics=getattr(mod, "metrics", None), probes=getattr(mod, "probes", None),
            claims=list(getattr(mod, "CLAIMS", [])),
        )
