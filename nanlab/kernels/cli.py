"""mode=check: check a kernel named by import path; exit 0 pass, 1 fail, 2 bad input."""
from __future__ import annotations

import importlib
from pathlib import Path

from nanlab import jsonio, options
from nanlab.errors import ConfigError

EXIT_FAIL = 1


def resolve(path: str, key: str):
    """'package.module:function' -> the function, or a ConfigError naming the key."""
    module_name, sep, attr = (path or "").partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(key, path, "must be an import path of the form package.module:function")
    try:
        target = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail to import in any way
        raise ConfigError(key, path, f"cannot import {module_name} ({type(err).__name__}: {err})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(key, path, f"{module_name} has no attribute {attr}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(key, path, "does not name a callable")
    return target


def run_check(cfg, run_dir) -> int:
    kernel = cfg.kernel
    if kernel.kind is None:
        raise ConfigError("kernel.kind", None, "is required; choose one of " + ", ".join(options.KERNEL_KINDS))
    fn = resolve(kernel.fn, "kernel.fn")
    grad_fn = resolve(kernel.grad_fn, "kernel.grad_fn") if kernel.grad_fn else None
    from nanlab.kernels.check import check

    report = check(fn, kind=kernel.kind, framework=kernel.framework, dtypes=list(kernel.dtypes), grad_fn=grad_fn)
    path = jsonio.write_json(Path(run_dir) / "check.json", report.to_dict())
    print(report.table())
    print(f"Wrote {path}")
    return 0 if report.passed else EXIT_FAIL
