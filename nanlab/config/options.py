"""Every named choice a nanlab config can make, listed once.

The schema's enums, the Hydra groups ``optimizer``, ``init`` and ``clip``, and the
builders that turn a name into a torch object all read these tables. Torch-free, so
the CLI can build its config before it knows whether torch is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Floating-point types, by their torch name (torch.float16 is ``float16``).
DTYPES = ("float32", "float64", "float16", "bfloat16")
DEVICES = ("cpu", "cuda", "auto")
MODES = ("run", "list", "claims", "check", "report", "sweep", "boundary")
CLIPS = ("none", "norm", "value")
# clip=norm scales by threshold / (norm + this): torch.nn.utils.clip_grads_with_norm_'s
# own constant, which the batched engine and the JAX worker must add as torch does.
CLIP_NORM_EPS = 1e-6
KERNEL_KINDS = ("cross_entropy", "binary_cross_entropy", "binary_cross_entropy_with_logits", "softmax",
                "log_softmax", "logsumexp", "kl_div", "nll_loss", "softplus", "log_sigmoid", "rms_norm", "layer_norm")
KERNEL_FRAMEWORKS = ("torch", "numpy")
KERNEL_VIEWS = ("all", "failures")  # kernel.show: the whole table, or only what failed


# Every ``optimizer.*`` setting besides name and lr, with its default (the schema's
# OptimizerConf fields). Each optimizer reads the ones its option names.
OPTIMIZER_DEFAULTS = {"momentum": 0.0, "eps": 1e-8, "weight_decay": 0.0}
# Read by every optimizer on top of its own settings.
OPTIMIZER_COMMON = ("weight_decay",)


@dataclass(frozen=True)
class OptimizerOption:
    """One optimizer, as torch.optim defines it, for every backend that trains with it:
    nanlab's loop (nanlab.lab.build), the batched engine (nanlab.sweeps.engine) and the
    Keras and JAX workers (nanlab.frameworks.worker) all read this table.

    ``torch_class`` is the torch.optim class (Keras names its own alike); ``lr`` the
    default when the scenario names no learning rate for this optimizer; ``settings``
    the ``optimizer.*`` keys it reads besides OPTIMIZER_COMMON; ``constants`` the
    torch.optim arguments nanlab does not expose, at torch's defaults, written here so
    that no backend writes them again."""

    torch_class: str
    lr: float
    settings: tuple = ()
    constants: dict = field(default_factory=dict)

    @property
    def keys(self) -> tuple:
        """Every ``optimizer.*`` key this optimizer reads, besides lr."""
        return (*self.settings, *OPTIMIZER_COMMON)


OPTIMIZERS = {
    "sgd": OptimizerOption("SGD", 0.01, ("momentum",)),
    "adam": OptimizerOption("Adam", 0.001, ("eps",), {"betas": (0.9, 0.999)}),
    # alpha: RMSprop's smoothing constant (Keras calls it rho, and defaults it to 0.9).
    "rmsprop": OptimizerOption("RMSprop", 0.001, ("eps", "momentum"), {"alpha": 0.99}),
}


@dataclass(frozen=True)
class InitOption:
    """A torch.nn.init function applied to every Linear/Conv weight (None keeps
    torch's own init), its fixed keyword arguments, and the ``init.*`` settings it reads."""

    function: str | None
    keywords: dict = field(default_factory=dict)
    settings: tuple = ()


INITS = {
    "default": InitOption(None),
    "xavier_uniform": InitOption("xavier_uniform_"),
    "he_normal": InitOption("kaiming_normal_", {"nonlinearity": "relu"}),
    "normal": InitOption("normal_", settings=("std",)),
}


@dataclass(frozen=True)
class FrameworkOption:
    """A framework a scenario can be measured in (``framework=``). ``family`` names
    the builder a scenario declares for it (``FRAMEWORKS = {"keras": ..., "jax": ...}``
    in the scenario module); ``keras_backend`` is the KERAS_BACKEND its worker process
    starts with; ``modules`` must be importable, and ``extras`` is what installs them."""

    family: str
    keras_backend: str | None = None
    modules: tuple = ()
    extras: tuple = ()


FRAMEWORKS = {
    "torch": FrameworkOption("torch"),
    "keras-torch": FrameworkOption("keras", "torch", ("keras",), ("keras",)),
    "keras-jax": FrameworkOption("keras", "jax", ("keras", "jax"), ("keras", "jax")),
    "keras-tensorflow": FrameworkOption("keras", "tensorflow", ("keras", "tensorflow"), ("keras", "tensorflow")),
    "jax": FrameworkOption("jax", None, ("jax",), ("jax",)),
}
# framework=all: torch and every other framework whose extras are installed.
FRAMEWORK_CHOICES = (*FRAMEWORKS, "all")

# The scenario a bare ``python -m nanlab`` runs. conf/config.yaml's defaults list must
# name it too (Hydra reads the YAML, not this module); tests/test_decisions.py checks
# that the two agree.
DEFAULT_SCENARIO = "softmax_overflow"

# Settings that pick a Hydra config group: a name brings its own set of defaults
# (optimizer=adam brings Adam's lr and eps), so a scenario's DEFAULTS, a sweep and an
# override set them by name rather than as single values.
CONFIG_GROUPS = ("optimizer", "init", "clip")
# The scenario's training setup. Claims are about this setup, so a run that changed
# any of these settings leaves its claims "not decided".
TRAINING_SETUP = (*CONFIG_GROUPS, "dtype")
# What a scenario's lesson depends on: its training setup, plus the steps and data
# knobs that a claim measures (its verdict follows them). Seed, device, mode and plot
# do not change a lesson.
LESSON_SETTINGS = (*TRAINING_SETUP, "steps", "scenario.data")


@dataclass(frozen=True)
class SweepAxis:
    """One axis of a sweep grid (``sweep.<axis>`` in mode=sweep). ``override`` is the
    key that sets it in a multirun, which also names its summary column; ``choices``
    are the names it accepts, or None for an axis of numbers of type ``number``."""

    override: str
    number: type | None = None
    choices: tuple | None = None

    @property
    def group(self) -> bool:
        """Whether each value picks a config group, so that Hydra composes each choice."""
        return self.override in CONFIG_GROUPS


# In summary column order.
SWEEP_AXES = {
    "optimizer": SweepAxis("optimizer", choices=tuple(OPTIMIZERS)),
    "lr": SweepAxis("optimizer.lr", number=float),
    "clip": SweepAxis("clip", choices=CLIPS),
    "clip_threshold": SweepAxis("clip.threshold", number=float),
    "init": SweepAxis("init", choices=tuple(INITS)),
    "dtype": SweepAxis("dtype", choices=DTYPES),
    "seed": SweepAxis("seed", number=int),
}
# Where mode=sweep trains its chunks (nanlab.sweeps.workers): worker processes on
# this machine, or submitit jobs, local processes or Slurm.
SWEEP_LAUNCHERS = ("local", "submitit_local", "slurm")
# A grid of more points than this needs sweep.max_points set, so that a typo in a list
# cannot start hours of training by accident.
SWEEP_DEFAULT_MAX_POINTS = 1024
