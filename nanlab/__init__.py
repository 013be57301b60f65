"""nanlab: reproduce, understand and prevent NaN/Inf failures in PyTorch training.

The public API is loaded lazily so that ``import nanlab`` (and the CLI) stays cheap:
torch is imported only when one of these names is first used.

- ``nanlab.run(scenario, *overrides, **options)`` -> ScenarioResult
- ``with nanlab.trace() as tr: ...`` -> ``tr.first`` is None or an Event
- ``nanlab.guard(step_fn, model, optimizer=None, schedulers=(), snapshot="auto")`` -> guarded step callable
- ``nanlab.NonFiniteError``, ``nanlab.ConfigError``
- ``nanlab.validate_labels``, ``nanlab.validate_data`` (data checks before training)
- ``nanlab.kernels`` (the loss-kernel checker)
"""
from nanlab.errors import ConfigError, NonFiniteError

__version__ = "0.1.0"

_LAZY = {
    "run": ("nanlab.lab.runner", "run"),
    "trace": ("nanlab.debug.tracer", "trace"),
    "Event": ("nanlab.lab.result", "Event"),
    "ScenarioResult": ("nanlab.lab.result", "ScenarioResult"),
    "guard": ("nanlab.debug.sentinel", "guard"),
    "validate_labels": ("nanlab.debug.validate", "validate_labels"),
    "validate_data": ("nanlab.debug.validate", "validate_data"),
}

__all__ = ["ConfigError", "NonFiniteError", "kernels", *_LAZY]


def __getattr__(name):
    import importlib

    if name == "kernels":
        return importlib.import_module("nanlab.kernels")
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'nanlab' has no attribute {name!r}")
