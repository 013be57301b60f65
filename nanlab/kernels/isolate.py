"""Run a kernel's cases in a forked child process, so that the kernel cannot end the check.

This module knows jobs, not cases: nanlab.kernels.check hands it one job per case
and dtype, and turns what comes back into the report (so the two never import each
other in a cycle).

A kernel is the user's code, and some of what it can do ends the process it runs
in: ``os._exit``, a segfault in a native extension, a signal it sends itself, the
kernel OOM killer. Run in a child, that ends the child only. The child sends each
case's result to the parent as soon as it has it (one JSON line per case through a
pipe), so when the child dies the parent knows which case was running: that case
fails with how the child ended (its exit status, or the signal's name), the check
stops there, and the report counts the pairs not run, as after a timeout.

The deadline is kept from outside as well: at ``timeout`` the parent kills the
child. That stops what the in-process alarm cannot (one native call that never
returns, a kernel that catches every exception in a loop), and works from any
thread.

Why fork rather than spawn: a kernel may be a lambda or a closure, which a spawned
interpreter could not receive, and a forked child starts at once with torch already
imported (a spawned one pays torch's import again: 2.2 to 2.8 s of CPU measured on
this shared machine, against 0.03 s for the fork and pipe). What fork costs: the
child runs torch on one thread (check() sets it up so), because a child forked after
the parent used its OpenMP pool hangs in its first parallel op (measured here with a
matmul and a softmax); the loss kernels checked here are small, and one thread runs
them fastest (nanlab.lab.threads). A child cannot use CUDA once the parent has initialised it; a
kernel that tries then fails its cases with torch's own message. And fork is POSIX
only.
"""
from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

# While no line arrives, how often the parent looks whether the child is still alive
# (a child that died while a grandchild of it holds the pipe open gives no end of file).
POLL_S = 0.05
DONE = "done"


@dataclass
class Forked:
    """What came back from the child: each finished job's result, in order; and, when
    it did not finish them all, whether the deadline stopped it or how it ended."""

    results: list = field(default_factory=list)
    timed_out: bool = False
    ended: str = ""  # "exited with status 0 (...)" or "was killed by SIGSEGV (...)"; "" when it finished


def run_forked(jobs: int, run_one: Callable[[int], dict], timeout: Optional[float],
               prepare: Callable[[], None] = lambda: None) -> Forked:
    """Run ``run_one(0) .. run_one(jobs - 1)`` in a forked child, after ``prepare()``
    there; each returns a JSON-able dict, sent back as soon as it is made. The child
    is killed at ``timeout`` seconds. A job that raises (the caller's own bug, not the
    code under test, which run_one must catch) raises RuntimeError here with its traceback."""
    if not hasattr(os, "fork"):
        raise ValueError("check(isolate=True) forks a child process, which this platform cannot; "
                         "leave isolate=False to check in this process")
    for stream in (sys.stdout, sys.stderr):  # or the child prints the parent's unflushed output again
        stream.flush()
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns about forking a threaded process; the child runs torch on one
        # thread and leaves with os._exit, which is what makes this fork safe.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(write_end, jobs, run_one, prepare)  # never returns
    os.close(write_end)
    child = _Child(pid)
    forked = Forked()
    try:
        _collect(child, read_end, jobs, forked, timeout)
    finally:
        os.close(read_end)
        child.end()
    return forked


def _send(pipe, message) -> None:
    pipe.write(json.dumps(message) + "\n")
    pipe.flush()  # before the next job starts: the child's death must not lose this line


def _child(fd: int, jobs: int, run_one, prepare) -> None:
    code = 0
    pipe = os.fdopen(fd, "w", encoding="utf-8")
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it ends the child
        if faulthandler.is_enabled():  # a crash is the parent's to report, in one line
            faulthandler.disable()
        prepare()
        for i in range(jobs):
            _send(pipe, run_one(i))
        _send(pipe, DONE)
    except BaseException:  # the caller's own failure: the parent raises it with this text
        code = 1
        try:
            _send(pipe, {"error": traceback.format_exc()})
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # no atexit handlers, no finalizers: they are the parent's


class _Child:
    def __init__(self, pid: int):
        self.pid, self.status = pid, None

    def poll(self) -> Optional[int]:
        """The child's wait status once it has ended, else None."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status

    def wait(self) -> int:
        if self.status is None:
            self.status = os.waitpid(self.pid, 0)[1]
        return self.status

    def end(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait()


def _collect(child: _Child, fd: int, jobs: int, forked: Forked, timeout: Optional[float]) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = b""
    while True:
        wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
        ready, _, _ = select.select([fd], [], [], wait)
        chunk = os.read(fd, 1 << 16) if ready else None
        if chunk:
            pending = _take_lines(pending + chunk, forked.results)
            if pending is None:
                return
            continue
        if chunk == b"":  # end of file: the child has closed the pipe, so it is ending
            child.wait()
        elif child.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                child.end()
                forked.timed_out = len(forked.results) < jobs
                return
            continue
        else:  # ended, but a process it started holds the pipe: read what it had sent
            while pending is not None and select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                pending = _take_lines(pending + chunk, forked.results)
            if pending is None:
                return
        if len(forked.results) < jobs:  # ended after its last job: nothing was cut short
            forked.ended = _how_it_ended(child.status)
        return


def _take_lines(data: bytes, results: list) -> Optional[bytes]:
    """Add each whole line's result; returns the unfinished rest, or None once the child said it is done."""
    *lines, rest = data.split(b"\n")
    for line in lines:
        message = json.loads(line)
        if message == DONE:
            return None
        if isinstance(message, dict) and set(message) == {"error"}:
            raise RuntimeError(f"the check failed in its child process, on job {len(results)}:\n{message['error']}")
        results.append(message)
    return rest


def _how_it_ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        said = signal.strsignal(number) if hasattr(signal, "strsignal") else None
        return f"was killed by {name}" + (f" ({said})" if said else "")
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    return f"exited with status {code} (os._exit, or an exit in native code)"
