"""Strict JSON for results that hold NaN and Inf, and file writes that never destroy a file.

A run that went non-finite is a result, so its JSON must hold NaN and Inf. Strict
JSON has no such numbers: they are written as the strings "nan", "inf" and "-inf",
and :func:`number` reads them back.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def jsonable(obj: Any) -> Any:
    """``obj`` with every non-finite float as a string and every key as a string."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def number(value: Any) -> Any:
    """A float written by :func:`jsonable` read back ("inf" -> inf); other values unchanged."""
    if isinstance(value, str) and value in NONFINITE:
        return NONFINITE[value]
    return value


def numbers(values: list) -> list:
    return [number(v) for v in values]


def decoded(obj: Any) -> Any:
    """:func:`jsonable`'s output read back, nested lists and dicts included (a probe
    that holds a row of probabilities with a NaN in it)."""
    if isinstance(obj, dict):
        return {k: decoded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decoded(v) for v in obj]
    return number(obj)


def dumps(obj: Any) -> str:
    return json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``:
    a write that fails (a full disk, a killed process) leaves the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename in (None, tmp):
            # A full disk fails inside write(), which names no file: name the one asked for.
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise
    return path


def _file_mode(path: Path) -> int:
    """The mode the file has now, or the one a plain open() would give it."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_text(path: Path | str, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: Any) -> Path:
    return write_text(path, dumps(obj))
