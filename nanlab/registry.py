"""Where scenarios come from: the built-in ``nanlab.scenarios`` package and the
``nanlab.scenarios`` entry-point group. Listing reads source text only, so that
``mode=list`` and error messages never import torch or a scenario module."""
from __future__ import annotations

import ast
import importlib
import importlib.util
from functools import lru_cache
from importlib import metadata, resources

from nanlab.errors import ConfigError

BUILTIN_PACKAGE = "nanlab.scenarios"
ENTRY_POINT_GROUP = "nanlab.scenarios"


@lru_cache(maxsize=None)
def builtin_names() -> tuple[str, ...]:
    files = resources.files(BUILTIN_PACKAGE).iterdir()
    return tuple(sorted(f.name[:-3] for f in files if f.name.endswith(".py") and not f.name.startswith("_")))


@lru_cache(maxsize=None)
def plugin_entry_points() -> dict[str, metadata.EntryPoint]:
    """Third-party scenarios: ``[project.entry-points."nanlab.scenarios"] name = "pkg.module"``."""
    found = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return {name: ep for name, ep in found.items() if name not in builtin_names()}


def names() -> list[str]:
    return sorted(set(builtin_names()) | set(plugin_entry_points()))


def module_name(name: str) -> str:
    if name in builtin_names():
        return f"{BUILTIN_PACKAGE}.{name}"
    if name in plugin_entry_points():
        return plugin_entry_points()[name].value
    raise ConfigError("scenario", name, "choose one of " + ", ".join(names()))


def load(name: str):
    """Import the scenario module and check it against the contract (nanlab.scenario)."""
    from nanlab.scenario import Scenario

    return Scenario.from_module(importlib.import_module(module_name(name)))


def summary(name: str) -> str:
    """The module's SUMMARY constant, read from its source without importing it."""
    spec = importlib.util.find_spec(module_name(name))
    if spec is None or spec.origin is None:
        return ""
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SUMMARY" for t in node.targets):
            value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
    return ""
