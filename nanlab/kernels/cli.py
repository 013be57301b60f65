"""mode=check: check a kernel named by import path; exit 0 pass, 1 fail, 2 bad input.

``kernel.fn`` (and ``kernel.grad_fn``) are imported and run: the check executes
that code, so name only code you trust. It runs in a forked child process
(nanlab.kernels.isolate), so a kernel that exits or crashes fails the case it was
on and stops the check, with the table and check.json, instead of ending nanlab.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from nanlab import jsonio
from nanlab.config import options
from nanlab.errors import ConfigError

EXIT_FAIL = 1


def resolve(path: str, key: str, what: str = "function"):
    """'package.module:function' -> the function (or what the path names), or a ConfigError naming the key."""
    module_name, sep, attr = (path or "").partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(key, path, f"must be an import path of the form package.module:{what}")
    try:
        target = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail to import in any way
        raise ConfigError(key, path, f"cannot import {module_name} ({type(err).__name__}: {err})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(key, path, f"{module_name} has no attribute {attr}")
        target = getattr(target, part)
    if what == "function" and not callable(target):
        raise ConfigError(key, path, "does not name a callable")
    return target


def declared_kind(value: str):
    """kernel.kind: a built-in kind's name as is, or the nanlab.kernels.Kind that module:attribute names."""
    if value in options.KERNEL_KINDS:
        return value
    from nanlab.kernels.kinds import Kind, register

    if ":" not in value:  # a mistyped built-in name, not an import path
        from nanlab.kernels.catalogue import unknown_kind

        raise ConfigError("kernel.kind", value, unknown_kind(value))
    kind = resolve(value, "kernel.kind", "attribute")
    if not isinstance(kind, Kind):
        raise ConfigError("kernel.kind", value, f"names a {type(kind).__name__}, not a nanlab.kernels.Kind; "
                                                f"or choose one of {', '.join(options.KERNEL_KINDS)}")
    try:
        return register(kind)
    except ValueError as err:  # a declared kind under a built-in name
        raise ConfigError("kernel.kind", value, str(err)) from None


def run_check(cfg, run_dir) -> int:
    kernel = cfg.kernel
    if kernel.kind is None:
        raise ConfigError("kernel.kind", None, "is required; choose one of " + ", ".join(options.KERNEL_KINDS)
                          + ", or name a declared nanlab.kernels.Kind as module:attribute")
    kind = declared_kind(kernel.kind)
    fn = resolve(kernel.fn, "kernel.fn")
    grad_fn = resolve(kernel.grad_fn, "kernel.grad_fn") if kernel.grad_fn else None
    examples = kernel.search
    if examples:
        from nanlab.kernels.search import require

        require("kernel.search", examples)  # before the check runs: one line naming the extra
    from nanlab.kernels.check import check, load_report

    # The CLI keeps the deadline that check() leaves off by default; the isolated child is killed at it.

    baseline = load_report(kernel.baseline, key="kernel.baseline") if kernel.baseline else None
    name = kind if isinstance(kind, str) else kind.name
    if baseline is not None and baseline.kind != name:
        raise ConfigError("kernel.baseline", kernel.baseline, f"is a check of kind {baseline.kind}, not {name}")
    try:
        report = check(fn, kind=kind, framework=kernel.framework, dtypes=list(kernel.dtypes), grad_fn=grad_fn,
                       timeout=kernel.timeout, xfail=list(kernel.xfail), baseline=baseline, isolate=True)
    except ConfigError as err:  # check() names its own arguments; here they are kernel.* keys, as the user wrote them
        value = kernel.grad_fn if err.key == "grad_fn" else err.value
        raise ConfigError(f"kernel.{err.key}", value, err.allowed) from None
    if baseline is not None:
        report.baseline = kernel.baseline
    found = None
    if examples and not report.stopped:  # a check that timed out has a kernel that hangs: no search after it
        from nanlab.kernels.search import search

        found = search(fn, kind, examples, dtypes=list(kernel.dtypes), framework=kernel.framework,
                       grad_fn=grad_fn, seconds=kernel.get("search_seconds"))
    record = report.to_dict() if found is None else {**report.to_dict(), "search": found.to_dict()}
    path = jsonio.write_json(Path(run_dir) / "check.json", record)
    print(report.table(failures_only=kernel.show == "failures"))
    if found is not None:
        print(found.text())
    print(f"Wrote {path}")
    return 0 if report.passed and (found is None or found.passed) else EXIT_FAIL
