"""What one test session computes once and shares: JSON made by whichever
pytest-xdist worker asks first (``made_once``), and scenario runs keyed by
everything that determines them (``memoized_runs``).

Imported by conftest.py and by the warm CLI server (tests/cli_server.py), whose
forked children consult the same saved runs as the tests' own ``scenario_result``.

Sharing runs is opt-in, per caller. It is safe only where a run is a pure function
of its key: the scenario's source, the resolved config, the settings the run
changed, and the thread count (nanlab itself does not change within a session).
The tests whose point is running twice (determinism, seeds, threads, interrupted or
failed writes) must keep running for real, so nothing is memoized unless asked.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import fields, is_dataclass
from pathlib import Path


def made_once(shared: Path, stem: str, key, make) -> object:
    """The JSON that ``make()`` returns, made once per test session whichever
    pytest-xdist worker asks first (the others wait on a file lock) and saved under
    ``shared``; every caller reads it back from the file. A ``make()`` that raises
    saves nothing, so the next caller meets the same error."""
    from filelock import FileLock

    from nanlab import jsonio

    saved = shared / f"{stem}-{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}.json"
    with FileLock(str(saved) + ".lock"):
        if not saved.exists():
            jsonio.write_text(saved, json.dumps(make()))
    return json.loads(saved.read_text())


def run_key(cfg, overrides) -> tuple:
    """Everything a run_scenario(cfg, overrides) result depends on. The overrides
    reach a run only through the settings they changed (changed_settings), so runs
    composed from different words for the same config share one entry."""
    import importlib.util

    import torch
    from omegaconf import OmegaConf

    from nanlab.config.compose import changed_settings
    from nanlab.lab import registry

    source = importlib.util.find_spec(registry.declaration(str(cfg.scenario.name)).module).origin
    return (source, hashlib.sha256(Path(source).read_bytes()).hexdigest(), OmegaConf.to_yaml(cfg),
            repr(changed_settings(cfg, overrides)), torch.get_num_threads())


def same(a, b) -> bool:
    """Equal in value and in type all the way down, NaN equal to NaN: what a result
    read back from its JSON must be to stand for the run itself."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    return a == b


class MemoError(AssertionError):
    """A run the memo cannot stand in for."""


@contextlib.contextmanager
def _output_held(seen: list):
    """The block runs with what it writes (through sys.stdout and sys.stderr, to file
    descriptors 1 and 2, or as a warning) held back; afterwards, raised or not, it
    goes where it was going, and ``seen`` gets it as one string."""
    sys.stdout.flush()
    sys.stderr.flush()
    held = {fd: (io.StringIO(), tempfile.TemporaryFile(), os.dup(fd)) for fd in (1, 2)}
    try:
        with warnings.catch_warnings(record=True) as warned:
            for fd, (_, sink, _) in held.items():
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(held[1][0]), contextlib.redirect_stderr(held[2][0]):
                yield
    finally:
        text = []
        for fd, (python_text, sink, real) in held.items():
            os.dup2(real, fd)
            os.close(real)
            sink.seek(0)
            text += [sink.read().decode(errors="replace"), python_text.getvalue()]
            sink.close()
            os.write(fd, text[-2].encode())
            (sys.stdout if fd == 1 else sys.stderr).write(text[-1])
        for w in warned:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
            text.append(f"{w.category.__name__}: {w.message}\n")
        seen.append("".join(text))


def _recorded(run, cfg, overrides) -> dict:
    """A fresh run as JSON, refused if the JSON would not give the same result back
    or if the run printed something, which a memo hit could not show again."""
    from nanlab.lab.result import ScenarioResult

    printed = []
    with _output_held(printed):
        result = run(cfg, overrides)
    if printed[0]:
        raise MemoError(f"{cfg.scenario.name} printed while it ran, which a shared run would not show again; "
                        f"run it without the memo. It printed:\n{printed[0][-2000:]}")
    saved = json.loads(result.to_json())
    if not same(ScenarioResult.from_dict(saved), result):
        raise MemoError(f"{cfg.scenario.name}: ScenarioResult.from_dict(to_json) does not give the run's result "
                        "back exactly; a shared run would differ from a fresh one")
    return saved


def memoized(shared: Path, run):
    """``run`` (run_scenario's signature) made once per key for the session."""
    from nanlab.lab.result import ScenarioResult

    def shared_run(cfg, overrides=None):
        try:
            key = run_key(cfg, overrides)
        except Exception:  # a config the run itself refuses: let it, with its own error
            return run(cfg, overrides)
        saved = made_once(shared, f"run-{cfg.scenario.name}", key, lambda: _recorded(run, cfg, overrides))
        return ScenarioResult.from_dict(saved)

    return shared_run


@contextlib.contextmanager
def memoized_runs(shared: Path):
    """Within the block, every run_scenario call (nanlab.run, the CLI's modes) is
    served from the session's shared runs; the real one is back after it."""
    from nanlab.lab import runner

    real = runner.run_scenario
    runner.run_scenario = memoized(Path(shared), real)
    try:
        yield
    finally:
        runner.run_scenario = real
