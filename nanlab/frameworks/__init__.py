"""The same scenario measured in other frameworks: Keras 3 (torch, JAX and TensorFlow
backends) and plain JAX.

``framework=torch`` (the default) is nanlab's own loop, in this process. Every other
framework runs in a worker process of its own (:mod:`nanlab.frameworks.worker`),
because a Keras backend is fixed once ``keras`` is imported and TensorFlow, JAX and
torch are best kept out of each other's way. The worker trains the scenario's
framework builder (``FRAMEWORKS`` in the scenario module), and hands back its
training losses and its model outputs; the parent scores those outputs with the
scenario's float64 ``exact_loss``, so numbers compare across frameworks.

This module is torch-free and imports no framework: it only says which are installed.
"""
from __future__ import annotations

import importlib.util
import os

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


def runs_on(name: str) -> list[str]:
    """The frameworks scenario ``name`` has builders for, torch first, installed or not."""
    from nanlab.frameworks import source

    families = {"torch", *source.declared(name)}
    return [f for f, option in FRAMEWORKS.items() if option.family in families]
