"""Structured-config schemas: the types and ranges every nanlab config must satisfy.

Hydra checks types and enum values while it composes (``optimizer.lr=abc`` fails
there). Ranges that a type cannot express are checked by :func:`validate` right after.
The schemas live in the Hydra group ``schema`` so the YAML files stay plain data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Union

from nanlab import options
from nanlab.errors import ConfigError


def _enum(name: str, values) -> type:
    return Enum(name, {v: v for v in values}, module=__name__)


OptimizerName = _enum("OptimizerName", options.OPTIMIZERS)
InitName = _enum("InitName", options.INITS)
ClipName = _enum("ClipName", options.CLIPS)
Device = _enum("Device", options.DEVICES)
DType = _enum("DType", options.DTYPES)
Mode = _enum("Mode", options.MODES)
KernelKind = _enum("KernelKind", options.KERNEL_KINDS)
Framework = _enum("Framework", options.KERNEL_FRAMEWORKS)


@dataclass
class OptimizerConf:
    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.01
    momentum: float = 0.0
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class InitConf:
    name: InitName = InitName.default
    std: float = 0.02


@dataclass
class ClipConf:
    name: ClipName = ClipName.none
    threshold: float = 1.0


@dataclass
class ScenarioConf:
    name: str = "softmax_overflow"
    # Learning rate the scenario reproduces with, per optimizer; optimizer/*.yaml reads it.
    lr: Dict[str, float] = field(default_factory=dict)
    # Scenario-specific data knobs (sizes, scales); each scenario documents its own.
    data: Dict[str, Any] = field(default_factory=dict)


@dataclass
class KernelConf:
    fn: Optional[str] = None
    kind: Optional[KernelKind] = None
    framework: Framework = Framework.torch
    grad_fn: Optional[str] = None
    dtypes: List[DType] = field(default_factory=lambda: [DType.float32, DType.float64, DType.float16, DType.bfloat16])
    # Seconds for the whole check of the kernel; null runs it without a limit.
    timeout: Optional[float] = 60.0
    # A check.json from an earlier run: only cases that got worse than it fail the check.
    baseline: Optional[str] = None
    # Cases expected to fail, as name or name@dtype; one that passes fails the check (strict).
    xfail: List[str] = field(default_factory=list)
    # all: every case in the table; failures: only the cases that failed.
    show: str = "all"


@dataclass
class ReportConf:
    """mode=report: the handout. ``scenarios`` None means every scenario; ``results``
    is the folder of saved results to build from (default: the run dir's results/);
    ``run`` false rebuilds from the saved results without running anything;
    ``sweeps`` is a folder whose sweep figures are added."""

    scenarios: Optional[List[str]] = None
    results: Optional[str] = None
    run: bool = True
    sweeps: Optional[str] = None


@dataclass
class Config:
    scenario: ScenarioConf = field(default_factory=ScenarioConf)
    optimizer: OptimizerConf = field(default_factory=OptimizerConf)
    init: InitConf = field(default_factory=InitConf)
    clip: ClipConf = field(default_factory=ClipConf)
    device: Device = Device.cpu
    dtype: DType = DType.float32
    seed: int = 0
    steps: int = 100
    mode: Mode = Mode.run
    plot: bool = False
    # Run only these variants of the scenario (a name or a list); None runs them all.
    variant: Any = None
    kernel: KernelConf = field(default_factory=KernelConf)
    report: ReportConf = field(default_factory=ReportConf)


# What each range-checked key accepts, in the words the error line uses.
ALLOWED = {
    "optimizer.lr": "must be a finite number > 0",
    "optimizer.momentum": "must be a number in [0, 1)",
    "optimizer.eps": "must be a finite number > 0",
    "optimizer.weight_decay": "must be a finite number >= 0",
    "init.std": "must be a finite number > 0",
    "clip.threshold": "must be a finite number > 0",
    "seed": "must be an integer >= 0",
    "steps": "must be an integer >= 1",
    "kernel.dtypes": "must list at least one of " + ", ".join(options.DTYPES) + ", each once",
    "kernel.timeout": "must be a finite number of seconds > 0, or null for no limit",
    "kernel.show": "must be all or failures",
}


def allowed(key: str) -> str:
    """What the schema accepts at a dotted key, phrased for an error line."""
    if key in ALLOWED:
        return ALLOWED[key]
    node: Any = Config
    for part in key.split("."):
        fields = getattr(node, "__dataclass_fields__", {})
        if part not in fields:
            top = ", ".join(Config.__dataclass_fields__)
            return f"not a nanlab config key (top-level keys: {top})"
        node = fields[part].type
        node = eval(node, globals()) if isinstance(node, str) else node
        optional = [a for a in getattr(node, "__args__", ()) if a is not type(None)]
        if getattr(node, "__origin__", None) is Union and len(optional) == 1:
            node = optional[0]
    if isinstance(node, type) and issubclass(node, Enum):
        return "must be one of " + ", ".join(m.value for m in node)
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    return "must be " + names.get(node, "of type " + str(node))


def register() -> None:
    """Put the schema into Hydra's ConfigStore (group ``schema``); idempotent."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="schema", name="config", node=Config)


def _check(ok: bool, key: str, value: Any) -> None:
    if not ok:
        raise ConfigError(key, value, ALLOWED[key])


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def validate(cfg) -> None:
    """Range checks that Hydra's type checks cannot express. Raises ConfigError."""
    opt = cfg.optimizer
    _check(_positive(opt.lr), "optimizer.lr", opt.lr)
    _check(0.0 <= opt.momentum < 1.0, "optimizer.momentum", opt.momentum)
    _check(_positive(opt.eps), "optimizer.eps", opt.eps)
    _check(math.isfinite(opt.weight_decay) and opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay)
    _check(_positive(cfg.init.std), "init.std", cfg.init.std)
    _check(_positive(cfg.clip.threshold), "clip.threshold", cfg.clip.threshold)
    _check(cfg.seed >= 0, "seed", cfg.seed)
    _check(cfg.steps >= 1, "steps", cfg.steps)
    kernel = cfg.kernel
    dtypes = [getattr(d, "value", d) for d in kernel.dtypes]
    _check(len(dtypes) >= 1 and len(set(dtypes)) == len(dtypes), "kernel.dtypes", dtypes)
    _check(kernel.timeout is None or _positive(kernel.timeout), "kernel.timeout", kernel.timeout)
    _check(kernel.show in ("all", "failures"), "kernel.show", kernel.show)
