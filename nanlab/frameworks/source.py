"""A scenario's framework side, read from its source. Torch-free.

The parent reads ``FRAMEWORKS`` (a literal) to know which builders a scenario has
without importing it. The worker needs the builders themselves, but a scenario
module imports torch at its top, and importing torch in a Keras-JAX or TensorFlow
worker would cost seconds and no measurement. So the worker runs the module's
source less its imports: its function definitions and the constants it can compute
without its imports. Class definitions and values made with torch are left out;
function bodies only run when called, so a builder that calls a torch-using helper
fails there, with a NameError that :func:`builder` turns into a contract error.
"""
from __future__ import annotations

import __future__
import ast
import builtins
import importlib.util
import sys
from typing import Callable

from nanlab.lab import registry
from nanlab.lab.scenario import ContractError

# Imports the framework side may keep: they cost nothing and cannot pull torch in.
_KEPT_IMPORTS = set(sys.stdlib_module_names) | {"numpy"}


def _path(name: str) -> str:
    module = registry.declaration(name).module
    spec = importlib.util.find_spec(module)
    return spec.origin


def _tree(name: str) -> ast.Module:
    with open(_path(name), encoding="utf-8") as f:
        return ast.parse(f.read(), _path(name))


def declared(name: str) -> dict:
    """The scenario's ``FRAMEWORKS``: {family: builder function name}; {} when it has none."""
    module = registry.declaration(name).module
    for node in _tree(name).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "FRAMEWORKS" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError):
                raise ContractError(module, "FRAMEWORKS must be a literal dict of builder function names") from None
            if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
                raise ContractError(module, "FRAMEWORKS must map a framework family to a builder function name")
            return value
    return {}


def _kept(node: ast.stmt) -> bool:
    if isinstance(node, ast.FunctionDef):
        return not node.decorator_list  # a decorator runs at definition time and may need torch
    if isinstance(node, ast.Import):
        return all(alias.name.split(".")[0] in _KEPT_IMPORTS for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] in _KEPT_IMPORTS
    return isinstance(node, ast.Assign)


def namespace(name: str) -> dict:
    """The scenario's functions and constants, defined without running its imports.
    Statements run one by one in source order; an assignment that needs what is left
    out (``VARIANTS = [Variant(...)]``, a torch tensor) is skipped."""
    path, module = _path(name), registry.declaration(name).module
    scope = {"__name__": f"{module}[framework side]", "__builtins__": builtins}
    for node in _tree(name).body:
        if not _kept(node):
            continue
        # Annotations stay unevaluated (``-> Data`` names an import that is left out),
        # whatever this module's own __future__ imports are.
        code = compile(ast.Module(body=[node], type_ignores=[]), path, "exec",
                       flags=__future__.annotations.compiler_flag, dont_inherit=True)
        try:
            exec(code, scope)  # noqa: S102 - the scenario's own source, less its imports
        except Exception:  # noqa: BLE001 - a value built from torch or nanlab: not for the framework side
            if not isinstance(node, ast.Assign):
                raise
    return scope


def builder(name: str, family: str) -> Callable:
    """The scenario's builder for ``family``, wrapped so that a builder reaching for
    what the framework side leaves out (torch, a class) is named as a contract error."""
    module = registry.declaration(name).module
    function = declared(name).get(family)
    if function is None:
        raise ContractError(module, f"it declares no {family} builder in FRAMEWORKS")
    scope = namespace(name)
    if not callable(scope.get(function)):
        raise ContractError(module, f"FRAMEWORKS names {function!r}, which is not a plain function of the module")

    def build(*args):
        try:
            return scope[function](*args)
        except NameError as err:
            raise ContractError(module, f"its {family} builder {function} uses {err.name!r}, which framework "
                                "workers do not define: builders may use only the module's functions and "
                                "literal constants, and what the kit passes in") from None

    return build
