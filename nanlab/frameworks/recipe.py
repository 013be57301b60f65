"""What a scenario's framework builder returns. Torch-free: the worker imports it.

A scenario module names its builders in a literal dict, read from source like DEFAULTS::

    FRAMEWORKS = {"keras": "nanlab.scenarios.frameworks.softmax_overflow:keras_recipe",
                  "jax": "nanlab.scenarios.frameworks.softmax_overflow:jax_recipe"}

``keras`` serves keras-torch, keras-jax and keras-tensorflow alike; ``jax`` is plain
JAX. Each value is ``"module:function"``: the builder lives in a module of its own
that does not import torch, and the worker imports it (never the scenario module) and
calls ``builder(kit, data, knobs)``. Everything framework-specific comes in ``kit`` (``kit.keras``, ``kit.ops``, ``kit.jax``, ``kit.jnp``, ``kit.np``,
``kit.Recipe``, ``kit.Variant``, ``kit.JaxModel``). ``data`` holds the raw data as
numpy arrays (``data.x``, ``data.y``); ``knobs`` the scenario's data knobs.

A builder returns a :class:`Recipe`. Its variants are matched by name to the
scenario's torch variants, whose role, summary, data preparation and config
overrides (a lower lr, clipping, another optimizer) they share; the recipe supplies
only what the framework writes differently: the model and the loss. A variant the
torch scenario does not have sets its own ``role`` and ``summary`` (Keras' own
probability cross-entropy, say), and may train on another variant's data and
settings with ``like``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional


@dataclass(frozen=True)
class FrameworkVariant:
    """``loss(output, target)``, written with the framework's ops, is the training loss.
    ``model`` replaces the recipe's model for this variant (called like it)."""

    loss: Callable
    model: Optional[Callable] = None
    role: Optional[str] = None
    summary: Optional[str] = None
    lossy: bool = False
    like: Optional[str] = None
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JaxModel:
    """A plain-JAX model: ``init(key, x) -> params`` (a pytree) and ``apply(params, x) -> output``."""

    init: Callable
    apply: Callable


@dataclass(frozen=True)
class Recipe:
    """``model(data)``: a Keras model (keras builders) or a :class:`JaxModel` (jax builders),
    built after the worker seeds the framework. ``probes()`` returns one-off
    measurements of the framework's own functions (JSON-able values)."""

    model: Callable
    variants: Mapping[str, FrameworkVariant]
    probes: Optional[Callable[[], dict]] = None


def call_outcome(fn: Callable, to_float: Callable = float) -> tuple[str, bool, float]:
    """Run ``fn()`` and say what happened, as the scenarios' own probes do:
    (what a person reads, whether it raised, the value or NaN if it raised)."""
    try:
        value = to_float(fn())
    except Exception as err:  # noqa: BLE001 - each framework raises its own kind; that is the measurement
        message = str(err).strip()
        if message.startswith("{{"):  # TensorFlow puts the op's node name before the message
            message = message.split("}}", 1)[-1].strip().split(".  ")[0]  # and the values after the sentence
        return f"raises {type(err).__name__}: " + (message.splitlines() or [""])[0][:80], True, float("nan")
    return f"loss {value:.4g}", False, value
