"""How many CPU threads torch uses for a run.

The scenarios' models are tiny: one thread runs them fastest, and on a machine whose
cores other processes also use, torch's default (one thread per core) measured 4 to
13 times slower than one thread (benchmarks/threads.py). So a run uses one thread
unless the user said otherwise: ``threads=N`` (0 or auto: torch's own default), or
else OMP_NUM_THREADS in the environment, which torch reads itself.

torch is imported only when a count is applied, so the CLI's start-up stays light.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

ENV = "OMP_NUM_THREADS"
MAX_THREADS = 1024

_torch_default: Optional[int] = None  # torch's count before nanlab first changed it


def requested(key) -> Optional[int]:
    """The count a run uses: the ``threads`` key's value (None when unset; 0 or "auto"
    for torch's default), else None where OMP_NUM_THREADS is set, else 1.
    None means: leave torch's count as it is."""
    if key is not None:
        return None if key in (0, "0", "auto") else int(key)
    if os.environ.get(ENV, "").strip():
        return None
    return 1


def torch_default() -> int:
    """torch's own count in this process (what it had before nanlab changed it)."""
    import torch

    return _torch_default if _torch_default is not None else torch.get_num_threads()


@contextlib.contextmanager
def use(key):
    """Run the block on ``requested(key)`` threads; the count before it comes back after.
    Set before the first op, it also keeps the OpenMP pool from starting more threads."""
    global _torch_default
    count = requested(key)
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if _torch_default is None:
        _torch_default = before
    if count == 1:
        with contextlib.suppress(RuntimeError):  # only possible before any inter-op work
            torch.set_num_interop_threads(1)
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fixed(key) -> Optional[int]:
    """The count ``threads=N`` fixes for the batched engine; None where the key is unset
    or asks for torch's default (the sweeps then train each worker on one thread)."""
    return requested(key) if key is not None else None
