"""Strict JSON for results that hold NaN and Inf, and writes that never destroy a file.

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


def dumps(obj: Any) -> str:
    return json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"


def write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``:
    a write that fails (a full disk, a killed process) leaves the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: Path | str, obj: Any) -> Path:
    return write_text(path, dumps(obj))
