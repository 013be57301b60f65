"""The same scenario measured in other frameworks: Keras 3 (torch, JAX and TensorFlow
backends) and plain JAX.

``framework=torch`` (the default) is nanlab's own loop, in this process. Every other
framework runs in a worker process of its own (:mod:`nanlab.frameworks.worker`),
because a Keras backend is fixed once ``keras`` is imported and TensorFlow, JAX and
torch are best kept out of each other's way. The worker trains the scenario's
framework builder (named in the scenario module's ``FRAMEWORKS``, imported from a
torch-free module of its own), and hands back its
training losses and its model outputs; the parent scores those outputs with the
scenario's float64 ``exact_loss``, so numbers compare across frameworks.

This module is torch-free and imports no framework: it only says which are installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

from nanlab import errors
from nanlab.errors import ConfigError
from nanlab.config.options import FRAMEWORKS

# Set (to 1) where every framework is expected to be installed, as `make test` does:
# then a missing framework fails its tests instead of skipping them.
REQUIRE_ENV = "NANLAB_REQUIRE_FRAMEWORKS"


def missing_modules(name: str) -> list[str]:
    """The modules framework ``name`` needs that cannot be imported here (found without importing them)."""
    return [m for m in FRAMEWORKS[name].modules if importlib.util.find_spec(m) is None]


def installed(name: str) -> bool:
    return not missing_modules(name)


def install_hint(name: str) -> str:
    return errors.install_hint(",".join(FRAMEWORKS[name].extras))


def require(name: str) -> None:
    """ConfigError (one line, naming the extra) when ``name`` is not installed."""
    missing = missing_modules(name)
    if missing:
        extras = " and ".join(FRAMEWORKS[name].extras)
        raise ConfigError("framework", name, f"needs the optional extra{'s' if len(FRAMEWORKS[name].extras) > 1 else ''} "
                          f"{extras} ({', '.join(missing)} not installed): {install_hint(name)}")


def chosen(framework: str) -> list[str]:
    """The frameworks ``framework=`` names: one, or for ``all`` torch and every installed one."""
    if framework == "all":
        return [name for name in FRAMEWORKS if installed(name)]
    require(framework)
    return [framework]


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def declared(name: str) -> dict:
    """Scenario ``name``'s ``FRAMEWORKS``: {family: "module:function"}; {} when it has none.
    Read from its source by the registry, so asking imports neither it nor a builder."""
    from nanlab.lab import registry

    return registry.declaration(name).frameworks


def runs_on(name: str) -> list[str]:
    """The frameworks scenario ``name`` has builders for, torch first, installed or not."""
    families = {"torch", *declared(name)}
    return [f for f, option in FRAMEWORKS.items() if option.family in families]


def builder(name: str, family: str) -> Callable:
    """Scenario ``name``'s builder for ``family``, imported from the module its
    ``FRAMEWORKS`` names (never the scenario module itself, which imports torch).
    What cannot be found is the scenario's contract error, one line."""
    from nanlab.lab import registry
    from nanlab.lab.scenario import ContractError

    scenario_module = registry.declaration(name).module
    reference = declared(name).get(family)
    if reference is None:
        raise ContractError(scenario_module, f"it declares no {family} builder in FRAMEWORKS")
    module_name, function_name = reference.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - a plugin's builder module may fail to import in any way
        message = (str(err).strip().splitlines() or [""])[0]
        raise ContractError(scenario_module, f"its {family} builder module {module_name} cannot be imported "
                            f"({type(err).__name__}: {message})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ContractError(scenario_module, f"FRAMEWORKS names {reference!r}, but {module_name} has no function "
                            f"{function_name}")
    return function
