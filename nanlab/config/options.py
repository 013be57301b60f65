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
KERNEL_KINDS = ("cross_entropy", "binary_cross_entropy", "binary_cross_entropy_with_logits", "softmax",
                "log_softmax", "logsumexp")
KERNEL_FRAMEWORKS = ("torch", "numpy")
KERNEL_VIEWS = ("all", "failures")  # kernel.show: the whole table, or only what failed


@dataclass(frozen=True)
class OptimizerOption:
    """A torch.optim class and the settings it reads from ``optimizer.*``. ``lr`` is
    the default when the scenario names no learning rate for this optimizer."""

    torch_class: str
    lr: float
    settings: dict = field(default_factory=dict)


OPTIMIZERS = {
    "sgd": OptimizerOption("SGD", 0.01, {"momentum": 0.0}),
    "adam": OptimizerOption("Adam", 0.001, {"eps": 1e-8}),
    "rmsprop": OptimizerOption("RMSprop", 0.001, {"eps": 1e-8, "momentum": 0.0}),
}
# Read by every optimizer on top of its own settings.
OPTIMIZER_COMMON = ("weight_decay",)


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
