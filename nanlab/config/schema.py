"""Structured-config schemas: the types and ranges every nanlab config must satisfy.

Hydra checks types and enum values while it composes (``optimizer.lr=abc`` fails
there). Ranges that a type cannot express are checked by :func:`validate` right after.
The schemas live in the Hydra group ``schema`` so the YAML files stay plain data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from typing import Any, Dict, List, Optional, Union

from nanlab.config import options
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
KernelView = _enum("KernelView", options.KERNEL_VIEWS)
# framework=: where a scenario runs (nanlab.frameworks); "Framework" above is kernel.framework.
RunFramework = _enum("RunFramework", options.FRAMEWORK_CHOICES)


@dataclass
class OptimizerConf:
    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.01
    momentum: float = options.OPTIMIZER_DEFAULTS["momentum"]
    eps: float = options.OPTIMIZER_DEFAULTS["eps"]
    weight_decay: float = options.OPTIMIZER_DEFAULTS["weight_decay"]


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
    name: str = options.DEFAULT_SCENARIO
    # Learning rate the scenario reproduces with, per optimizer; optimizer/*.yaml reads it.
    lr: Dict[str, float] = field(default_factory=dict)
    # Scenario-specific data knobs (sizes, scales); each scenario documents its own.
    data: Dict[str, Any] = field(default_factory=dict)


@dataclass
class KernelConf:
    fn: Optional[str] = None
    # A built-in kind (KernelKind), or a user's declared nanlab.kernels.Kind as module:attribute.
    kind: Optional[str] = None
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
    show: KernelView = KernelView.all
    # Examples for a property-based search of each kind's input domain (the search extra); null: no search.
    search: Optional[int] = None
    # Wall-clock seconds the search may take, examples or not; null: no limit.
    search_seconds: Optional[float] = 30.0


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
class SlurmConf:
    """The Slurm job of ``sweep.launcher=slurm``: one per worker (sbatch's options of the same names)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    timeout_min: int = 60
    mem_gb: int = 4
    cpus_per_task: int = 1


# mode=sweep: the grid, trained in chunks (nanlab.sweeps.grid). One field per axis of
# options.SWEEP_AXES, each left out (None) takes the config's own value; the names of
# the name axes (optimizer, clip, ...) are checked by :func:`validate`, so that the
# error names the choices. Built from the table so that an axis is declared once.
SweepConf = make_dataclass("SweepConf", [
    *((axis, Optional[List[a.number or str]], field(default=None)) for axis, a in options.SWEEP_AXES.items()),
    # A grid of more than options.SWEEP_DEFAULT_MAX_POINTS points needs this set.
    ("max_points", Optional[int], field(default=None)),
    # Copies trained together in one chunk at most; None sizes chunks from the model's
    # tensors (nanlab.sweeps.workers.chunk_copies). Rows are written after each chunk.
    ("max_batch", Optional[int], field(default=None)),
    # Processes (or submitit jobs) that train the chunks; None: the cores this process may use.
    ("workers", Optional[int], field(default=None)),
    ("launcher", str, field(default="local")),
    ("slurm", SlurmConf, field(default_factory=SlurmConf)),
    ("resume", bool, field(default=False)),
    # auto: the batched engine where the model allows, the loop elsewhere; loop: always the loop.
    ("engine", str, field(default="auto")),
], namespace={"__module__": __name__})


# float64 resolves an lr to about 2.2e-16 relative; a bracket of a few such steps is
# where bisection stops telling lrs apart, so a finer precision is refused up front.
MIN_BOUNDARY_PRECISION = 1e-9


@dataclass
class BoundaryConf:
    """mode=boundary: the largest lr at which the broken variant stays finite, per
    init and clip (nanlab.sweeps.boundary). None takes the config's own init or clip."""

    init: Optional[List[str]] = None
    clip: Optional[List[str]] = None
    precision: float = 0.05  # stop when the bracket's hi / lo is at most 1 + precision
    lr_min: float = 1e-12
    lr_max: float = 1e3
    candidates: int = 16  # lrs tried at once per round, in the batched engine


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
    # torch (in this process), a Keras backend or JAX (each in its own worker process), or all of them.
    framework: RunFramework = RunFramework.torch
    # CPU threads torch uses: None is one thread unless OMP_NUM_THREADS is set (the
    # tiny models run fastest on one); 0 or auto is torch's own default (nanlab.lab.threads).
    threads: Any = None
    kernel: KernelConf = field(default_factory=KernelConf)
    report: ReportConf = field(default_factory=ReportConf)
    sweep: SweepConf = field(default_factory=SweepConf)
    boundary: BoundaryConf = field(default_factory=BoundaryConf)


FLOAT32_MAX = 3.4028234663852886e38
# Data is drawn from torch generators seeded with seed * 1000 + offset, which must fit
# in a signed 64-bit integer.
MAX_SEED = 2 ** 53

# What each number axis of a sweep accepts: (test, the words for one value).
SWEEP_NUMBERS = {
    float: (lambda x: _float32_positive(x), "numbers > 0 and at most float32's largest, 3.4e38"),
    int: (lambda s: 0 <= s < MAX_SEED, f"integers in [0, {MAX_SEED})"),  # the one int axis is the seed
}


def _sweep_axis_accepts(axis: options.SweepAxis):
    if axis.choices is not None:
        return lambda v: v in axis.choices
    return SWEEP_NUMBERS[axis.number][0]


def _sweep_axis_allowed(axis: options.SweepAxis) -> str:
    what = ", ".join(axis.choices) if axis.choices is not None else SWEEP_NUMBERS[axis.number][1]
    return f"must list one or more {'of ' if axis.choices is not None else ''}{what}, each once"


# What each range-checked key accepts, in the words the error line uses.
ALLOWED = {
    "optimizer.lr": "must be a number > 0 and at most float32's largest, 3.4e38",
    "optimizer.momentum": "must be a number in [0, 1)",
    "optimizer.eps": "must be a number > 0 and at most float32's largest, 3.4e38",
    "optimizer.weight_decay": "must be a number >= 0 and at most float32's largest, 3.4e38",
    "init.std": "must be a number > 0 and at most float32's largest, 3.4e38",
    "clip.threshold": "must be a number > 0 and at most float32's largest, 3.4e38",
    "seed": f"must be an integer in [0, {MAX_SEED})",
    "steps": "must be an integer >= 1",
    "threads": "must be an integer in [1, 1024], or 0 or auto for torch's default",
    "kernel.dtypes": "must list at least one of " + ", ".join(options.DTYPES) + ", each once",
    "kernel.timeout": "must be a finite number of seconds > 0, or null for no limit",
    "kernel.kind": ("must be one of " + ", ".join(options.KERNEL_KINDS)
                    + ", or a declared nanlab.kernels.Kind as module:attribute"),
    "kernel.search": "must be a number of examples >= 1, or null for no search",
    "kernel.search_seconds": "must be a finite number of seconds > 0, or null for no limit",
    **{f"sweep.{axis}": _sweep_axis_allowed(a) for axis, a in options.SWEEP_AXES.items()},
    "sweep.max_points": ("must be an integer >= 1, or null for the default limit of "
                         f"{options.SWEEP_DEFAULT_MAX_POINTS} points"),
    "sweep.max_batch": "must be an integer >= 1, or null to size chunks from the model",
    "sweep.workers": "must be an integer in [1, 1024], or null for the cores available",
    "sweep.launcher": "must be one of " + ", ".join(options.SWEEP_LAUNCHERS),
    "sweep.slurm.timeout_min": "must be an integer >= 1 (minutes)",
    "sweep.slurm.mem_gb": "must be an integer >= 1 (GiB)",
    "sweep.slurm.cpus_per_task": "must be an integer >= 1",
    "sweep.engine": "must be auto or loop",
    "boundary.init": "must list one or more of " + ", ".join(options.INITS) + ", each once",
    "boundary.clip": "must list one or more of " + ", ".join(options.CLIPS) + ", each once",
    "boundary.precision": "must be a number in [1e-9, 1]: the bracket's relative width to stop at (finer than float64 lrs resolve in a search is not reachable)",
    "boundary.lr_min": "must be a number > 0, below boundary.lr_max",
    "boundary.lr_max": "must be a number above boundary.lr_min and at most float32's largest, 3.4e38",
    "boundary.candidates": "must be an integer in [2, 1024]",
}


def allowed(key: str) -> str:
    """What the schema accepts at a dotted key, phrased for an error line."""
    if key in ALLOWED:
        return ALLOWED[key]
    node: Any = Config
    for part in key.split("."):
        part = part.split("[")[0]  # kernel.dtypes[0]: the list's element type
        fields = getattr(node, "__dataclass_fields__", {})
        if part not in fields:
            top = ", ".join(Config.__dataclass_fields__)
            return f"not a nanlab config key (top-level keys: {top})"
        node = fields[part].type
        node = eval(node, globals()) if isinstance(node, str) else node
        optional = [a for a in getattr(node, "__args__", ()) if a is not type(None)]
        if getattr(node, "__origin__", None) is Union and len(optional) == 1:
            node = optional[0]
        if getattr(node, "__origin__", None) is list and "[" in key:
            node = node.__args__[0]
    if isinstance(node, type) and issubclass(node, Enum):
        return "must be one of " + ", ".join(m.value for m in node)
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    return "must be " + names.get(node, "of type " + str(node))


def unknown_keys(plain: dict, node: Any = None, prefix: str = "") -> list[str]:
    """Keys in a composed config that no schema field declares (Hydra's ``+key=value``
    appends them). Dict- and Any-typed fields hold free keys and are not searched."""
    node = node or Config
    fields = node.__dataclass_fields__
    found = []
    for key, value in plain.items():
        if key not in fields:
            found.append(prefix + key)
            continue
        kind = fields[key].type
        kind = eval(kind, globals()) if isinstance(kind, str) else kind
        if hasattr(kind, "__dataclass_fields__") and isinstance(value, dict):
            found += unknown_keys(value, kind, f"{prefix}{key}.")
    return found


def register() -> None:
    """Put the schema into Hydra's ConfigStore (group ``schema``); idempotent."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="schema", name="config", node=Config)


def _check(ok: bool, key: str, value: Any) -> None:
    if not ok:
        raise ConfigError(key, value, ALLOWED[key])


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _float32_positive(x: float) -> bool:
    """Positive and representable in float32: a bigger lr, say, is inf on a float32 tensor."""
    return 0 < x <= FLOAT32_MAX


def validate(cfg) -> None:
    """Range checks that Hydra's type checks cannot express. Raises ConfigError."""
    opt = cfg.optimizer
    _check(_float32_positive(opt.lr), "optimizer.lr", opt.lr)
    _check(0.0 <= opt.momentum < 1.0, "optimizer.momentum", opt.momentum)
    _check(_float32_positive(opt.eps), "optimizer.eps", opt.eps)
    _check(opt.weight_decay == 0 or _float32_positive(opt.weight_decay), "optimizer.weight_decay", opt.weight_decay)
    _check(_float32_positive(cfg.init.std), "init.std", cfg.init.std)
    _check(_float32_positive(cfg.clip.threshold), "clip.threshold", cfg.clip.threshold)
    _check(0 <= cfg.seed < MAX_SEED, "seed", cfg.seed)
    _check(cfg.steps >= 1, "steps", cfg.steps)
    threads = cfg.get("threads")
    _check(threads is None or threads == "auto" or (isinstance(threads, int) and not isinstance(threads, bool)
                                                    and 0 <= threads <= 1024), "threads", threads)
    kernel = cfg.kernel
    dtypes = [getattr(d, "value", d) for d in kernel.dtypes]
    _check(len(dtypes) >= 1 and len(set(dtypes)) == len(dtypes), "kernel.dtypes", dtypes)
    _check(kernel.timeout is None or _positive(kernel.timeout), "kernel.timeout", kernel.timeout)
    _check(kernel.get("search") is None or kernel.search >= 1, "kernel.search", kernel.get("search"))
    _check(kernel.get("search_seconds") is None or _positive(kernel.search_seconds), "kernel.search_seconds",
           kernel.get("search_seconds"))
    _check(kernel.kind is None or _kernel_kind(kernel.kind), "kernel.kind", kernel.kind)
    if cfg.get("sweep") is not None:
        _validate_sweep(cfg.sweep)
    if cfg.get("boundary") is not None:
        _validate_boundary(cfg.boundary)


def _kernel_kind(value: str) -> bool:
    """A built-in kind's name, or an import path module:attribute (resolved by mode=check)."""
    if value in {k.value for k in KernelKind}:
        return True
    module, sep, attr = value.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".") + attr.split("."))


def _listed_once(values, ok) -> bool:
    """None (the axis is left out), or a non-empty list of acceptable values, each once."""
    return values is None or (len(values) >= 1 and len(set(values)) == len(values) and all(ok(v) for v in values))


def _validate_sweep(sweep) -> None:
    for axis, spec in options.SWEEP_AXES.items():
        values = None if sweep[axis] is None else list(sweep[axis])
        _check(_listed_once(values, _sweep_axis_accepts(spec)), f"sweep.{axis}", values)
    _check(sweep.max_points is None or sweep.max_points >= 1, "sweep.max_points", sweep.max_points)
    _check(sweep.max_batch is None or sweep.max_batch >= 1, "sweep.max_batch", sweep.max_batch)
    _check(sweep.workers is None or 1 <= sweep.workers <= 1024, "sweep.workers", sweep.workers)
    _check(sweep.launcher in options.SWEEP_LAUNCHERS, "sweep.launcher", sweep.launcher)
    for key in ("timeout_min", "mem_gb", "cpus_per_task"):
        _check(sweep.slurm[key] >= 1, f"sweep.slurm.{key}", sweep.slurm[key])
    _check(sweep.engine in ("auto", "loop"), "sweep.engine", sweep.engine)
    points = math.prod(len(sweep[axis]) for axis in options.SWEEP_AXES if sweep[axis] is not None)
    limit = sweep.max_points if sweep.max_points is not None else options.SWEEP_DEFAULT_MAX_POINTS
    if points > limit:
        how = ("raise sweep.max_points" if sweep.max_points is not None
               else f"more than {options.SWEEP_DEFAULT_MAX_POINTS} need sweep.max_points={points} (or more)")
        raise ConfigError("sweep", f"{points} points", f"the grid is larger than {limit} points; {how}")


def _validate_boundary(boundary) -> None:
    for axis, choices in (("init", options.INITS), ("clip", options.CLIPS)):
        values = None if boundary[axis] is None else list(boundary[axis])
        _check(_listed_once(values, lambda v, c=choices: v in c), f"boundary.{axis}", values)
    _check(MIN_BOUNDARY_PRECISION <= boundary.precision <= 1, "boundary.precision", boundary.precision)
    _check(_float32_positive(boundary.lr_min) and boundary.lr_min < boundary.lr_max, "boundary.lr_min",
           boundary.lr_min)
    _check(_float32_positive(boundary.lr_max), "boundary.lr_max", boundary.lr_max)
    _check(2 <= boundary.candidates <= 1024, "boundary.candidates", boundary.candidates)
