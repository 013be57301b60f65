"""A warm ``python`` for the tests' commands (``python -m nanlab ...``, the docs'
Python blocks and example scripts).

Most of a CLI test's time is the interpreter importing torch, Hydra and matplotlib,
several seconds of CPU each time, for runs that then train for a fraction of a
second. This server imports them once and forks a child per command. The child sets
up what a fresh ``python -m nanlab`` would have (argv, cwd, sys.path[0], environment,
standard streams on the given files, default signal handlers) and runs the package's
``__main__``, so exit status, stdout and stderr are those of the real command.

What a fork cannot show, the tests that need it run as real processes
(``conftest.run_cli_fresh``): which modules the CLI imports at start, anything read
from the environment at import time (PYTHONPATH, thread counts), and signals sent to
a starting interpreter.

Protocol, one JSON object per line: a request {args, cwd, env, stdout, stderr}
(args as they would follow ``python``), with "shared_runs": FOLDER for a command
whose scenario runs may come from the session's shared runs (tests/shared_runs.py), on
stdin; the server answers {"pid": ...} once the child runs and {"status": ...}
(as subprocess reports it: negative for a signal) once it ends.
"""
import atexit
import contextlib
import importlib
import io
import json
import os
import runpy
import signal
import sys
import traceback

import shared_runs


def preload() -> None:
    # What a run imports anyway; the child then finds them in sys.modules.
    import hydra  # noqa: F401
    import matplotlib  # noqa: F401
    import numpy  # noqa: F401
    import omegaconf  # noqa: F401
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports torch._dynamo

    import nanlab.cli  # noqa: F401
    import nanlab.lab.runner  # noqa: F401

    # What a process's first compose and first figure pay once (Hydra's plugin scan
    # and override parser, matplotlib's fonts): about 0.3 s of every command and
    # 1 s of every command that draws, paid here once instead.
    from matplotlib.figure import Figure

    from nanlab.config.compose import compose

    compose(["scenario=softmax_overflow", "optimizer.lr=0.1"])
    figure = Figure(figsize=(4, 3), layout="constrained")
    axes = figure.subplots()
    axes.semilogy([1, 2], [3, 4], label="warm")
    axes.set_title("warm")
    axes.legend()
    figure.savefig(io.BytesIO(), format="png")
    forget_nanlab_state()


def forget_nanlab_state() -> None:
    """Leave nanlab as a fresh process finds it: what it found out (scenarios, plugins
    on the child's sys.path, its one-time setup and warnings) is found again by each
    child, so a child run from a plugin's folder sees that plugin."""
    import functools

    from nanlab.config import compose
    from nanlab.lab import registry

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "nanlab" and module is not None:
            for value in vars(module).values():
                if isinstance(value, functools._lru_cache_wrapper):
                    value.cache_clear()
    compose._ready = False
    registry._warned.clear()


def _exit_code(exit: SystemExit) -> int:
    code = exit.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)  # as the interpreter does with sys.exit("message")
    return 1


def run_python_args(args: list[str]) -> None:
    """Run what ``python ARGS`` runs, as ``-m MODULE``, ``-c CODE`` or a script path,
    with the sys.argv and sys.path[0] that the interpreter would set."""
    if args[0] == "-m":
        sys.path[0] = os.getcwd()
        sys.argv = ["-m", *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.path[0] = ""
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
        sys.argv = list(args)
        runpy.run_path(args[0], run_name="__main__")


def run_child(request: dict) -> None:
    """In the forked child: become ``python ARGS`` and exit. Never returns."""
    code = 1
    try:
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                                       errors="backslashreplace", line_buffering=True)
        for signum in (signal.SIGTERM, signal.SIGALRM):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython sets it at start
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        importlib.invalidate_caches()
        with shared_runs.memoized_runs(request["shared_runs"]) if "shared_runs" in request else contextlib.nullcontext():
            run_python_args(request["args"])
        code = 0
    except SystemExit as exit:
        code = _exit_code(exit)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    preload()
    replies = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the protocol stream
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


if __name__ == "__main__":
    serve()
