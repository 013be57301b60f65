"""Where scenarios come from: the built-in ``nanlab.scenarios`` package and the
``nanlab.scenarios`` entry-point group, both read the same way.

A scenario's name is its module's file name (built-in) or its entry-point name
(plugin). Its SUMMARY, DEFAULTS, DATA and FRAMEWORKS are literals read from the
module's source without importing it, so that composing a config, ``mode=list`` and error messages
never import torch or a scenario module. A module whose source breaks the contract
is left out with one warning line, so one broken plugin cannot stop the others.
"""
from __future__ import annotations

import ast
import importlib
import re
import importlib.util
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata, resources

from nanlab.config import options
from nanlab.errors import ConfigError
from nanlab.lab.scenario import REQUIRED, ContractError

BUILTIN_PACKAGE = "nanlab.scenarios"
ENTRY_POINT_GROUP = "nanlab.scenarios"
# Keys DEFAULTS may set: the config groups (options.CONFIG_GROUPS), each a name or a
# dict with "name" and settings, and these plain values.
PLAIN_KEYS = ("lr", "steps", "dtype", "device", "seed")
KNOB_TYPES = (bool, int, float, str)
# FRAMEWORKS values: "package.module:function", the builder imported by framework workers.
BUILDER_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class Declaration:
    """What a scenario module declares about itself, read from its source."""

    name: str
    module: str
    summary: str = ""
    defaults: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    # {framework family: "module:function"}: its Keras and JAX builders (nanlab.frameworks).
    frameworks: dict = field(default_factory=dict)

    def knob_type(self, key: str) -> type:
        value = self.data[key]
        return next(t for t in KNOB_TYPES if isinstance(value, t))


def _literal(node: ast.AST):
    """A literal value; ``dict(a=1)`` counts as the literal ``{"a": 1}``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    return ast.literal_eval(node)


def _top_level_names(tree: ast.Module) -> dict:
    """Every name the module binds at its top level -> the value node (None if not an assignment)."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node.value
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = None
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = None
    return names


def _check_defaults(module: str, defaults: dict) -> None:
    for key, value in defaults.items():
        if key in options.CONFIG_GROUPS:
            if not (isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("name"), str))):
                raise ContractError(module, f"DEFAULTS[{key!r}] must be a name or a dict with a 'name'")
        elif key not in PLAIN_KEYS:
            allowed = ", ".join(options.CONFIG_GROUPS + PLAIN_KEYS)
            raise ContractError(module, f"DEFAULTS key {key!r} is not one of {allowed}")


def _check_frameworks(module: str, frameworks) -> None:
    families = sorted({option.family for option in options.FRAMEWORKS.values()} - {"torch"})
    if not isinstance(frameworks, dict):
        raise ContractError(module, "FRAMEWORKS must be a dict of framework family -> 'module:function'")
    for family, reference in frameworks.items():
        if family not in families:
            raise ContractError(module, f"FRAMEWORKS key {family!r} is not a framework family; use {' or '.join(families)}")
        if not (isinstance(reference, str) and BUILDER_REFERENCE.fullmatch(reference)):
            raise ContractError(module, f"FRAMEWORKS[{family!r}] must be a 'package.module:function' string, "
                                f"not {reference!r}")


def declare(name: str, module: str) -> Declaration:
    """Read a scenario module's declaration from its source; ContractError if it breaks the contract."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:
        raise ContractError(module, f"it cannot be found ({err})") from None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ContractError(module, "it must be a Python source module")
    try:
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), spec.origin)
    except (OSError, SyntaxError, ValueError) as err:
        raise ContractError(module, f"its source cannot be read ({type(err).__name__}: {err})") from None
    names = _top_level_names(tree)
    missing = [a for a in REQUIRED if a not in names]
    if missing:
        raise ContractError(module, f"it must define {', '.join(missing)} (see nanlab.lab.scenario)")
    values = {}
    for key in ("SUMMARY", "DEFAULTS", "DATA", "FRAMEWORKS"):
        if names.get(key) is None:
            continue
        try:
            values[key] = _literal(names[key])
        except (ValueError, TypeError, SyntaxError):
            raise ContractError(module, f"{key} must be a literal, readable without importing the module") from None
    summary, defaults, data = values.get("SUMMARY", ""), values.get("DEFAULTS", {}), values.get("DATA", {})
    if not isinstance(summary, str):
        raise ContractError(module, "SUMMARY must be a string")
    if not isinstance(defaults, dict) or not isinstance(data, dict):
        raise ContractError(module, "DEFAULTS and DATA must be dicts")
    _check_defaults(module, defaults)
    frameworks = values.get("FRAMEWORKS", {})
    _check_frameworks(module, frameworks)
    bad = [k for k, v in data.items() if not isinstance(v, KNOB_TYPES)]
    if bad:
        raise ContractError(module, f"DATA[{bad[0]!r}] must be a number, string or boolean")
    return Declaration(name, module, summary, defaults, data, frameworks)


@lru_cache(maxsize=None)
def builtin_names() -> tuple[str, ...]:
    # Scenarios are the package's .py files; its subpackage of framework builders
    # (nanlab.scenarios.frameworks) is a folder, so it is not one.
    files = resources.files(BUILTIN_PACKAGE).iterdir()
    return tuple(sorted(f.name[:-3] for f in files if f.name.endswith(".py") and not f.name.startswith("_")))


@lru_cache(maxsize=None)
def plugin_entry_points() -> dict[str, metadata.EntryPoint]:
    """Third-party scenarios: ``[project.entry-points."nanlab.scenarios"] name = "pkg.module"``."""
    found = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return {name: ep for name, ep in found.items() if name not in builtin_names()}


def module_name(name: str) -> str:
    if name in builtin_names():
        return f"{BUILTIN_PACKAGE}.{name}"
    if name in plugin_entry_points():
        return plugin_entry_points()[name].value
    raise ConfigError("scenario", name, "not a scenario; choose one of " + ", ".join(names()))


@lru_cache(maxsize=None)
def _declarations() -> tuple[dict, tuple]:
    good, skipped = {}, []
    for name in sorted(set(builtin_names()) | set(plugin_entry_points())):
        try:
            good[name] = declare(name, module_name(name))
        except ContractError as err:
            skipped.append((name, err))
    return good, tuple(skipped)


def declarations() -> dict[str, Declaration]:
    """Every usable scenario by name. A module that breaks the contract is left out,
    with one warning line on stderr (once per process)."""
    good, skipped = _declarations()
    _warn_once(skipped)
    return good


_warned: set = set()


def _warn_once(skipped) -> None:
    for name, err in skipped:
        if name not in _warned:
            _warned.add(name)
            print(f"nanlab: warning: skipping scenario {name}: {err}", file=sys.stderr)


def names() -> list[str]:
    return sorted(declarations())


def declaration(name: str) -> Declaration:
    """The named scenario's declaration; its own contract error if it is broken."""
    good = _declarations()[0]
    if name in good:
        return good[name]
    broken = contract_error(name)
    if broken is not None:
        raise broken
    raise ConfigError("scenario", name, "not a scenario; choose one of " + ", ".join(names()))


def contract_error(name: str):
    """The ContractError that keeps the named scenario out, or None."""
    return next((err for bad_name, err in _declarations()[1] if bad_name == name), None)


def summary(name: str) -> str:
    return declaration(name).summary


def load(name: str):
    """Import the scenario module and check it against the contract (nanlab.lab.scenario)."""
    from nanlab.lab.scenario import Scenario

    module = declaration(name).module
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # a plugin may fail to import in any way
        raise ContractError(module, f"importing it raised {type(err).__name__}: {err}") from None
    return Scenario.from_module(mod, name)
