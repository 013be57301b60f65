import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from shared_runs import made_once, memoized_runs

ROOT = Path(__file__).resolve().parents[1]

# The lab's models are tiny: one thread each is fastest, and the tests run CLI
# subprocesses side by side on 2 cores, where two OpenMP threads per process spin
# against each other and slow every matmul by orders of magnitude. Set before any
# test imports torch, and inherited by every subprocess.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cli_env(env):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return full_env


def run_cli_fresh(*args, cwd=None, env=None, timeout=300):
    """Run ``python -m nanlab`` in a new interpreter; returns CompletedProcess. For
    what only a fresh process shows: start-up imports, import-time environment."""
    return subprocess.run([sys.executable, "-m", "nanlab", *args], capture_output=True, text=True,
                          cwd=cwd, env=_cli_env(env), timeout=timeout)


# Read when an interpreter or torch starts, so a warm fork cannot honour a change.
_IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "TORCH", "CUDA", "KERAS", "JAX", "XLA", "TF_", "MPL")


class WarmCLI:
    """``python ...`` forked from a server that has imported torch, Hydra and
    matplotlib once (tests/cli_server.py): the same exit status and output as a new
    interpreter, without paying its imports on every command."""

    def __init__(self):
        self.server = None

    def close(self):
        if self.server is not None:
            self.server.stdin.close()  # the server's loop ends; wait so its CPU time is counted as ours
            self.server.wait(timeout=30)
            self.server = None

    def _start(self):
        self.server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_server.py"))],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       env=_cli_env(None))
        assert json.loads(self.server.stdout.readline()) == {"ready": True}

    def serves(self, env) -> bool:
        return not any(key.startswith(_IMPORT_TIME_ENV) and os.environ.get(key) != value
                       for key, value in (env or {}).items())

    def run(self, python_args, cwd, env, timeout, started=None, shared_runs=None):
        import select
        import signal
        import tempfile

        if self.server is None or self.server.poll() is not None:
            self._start()
        with tempfile.TemporaryDirectory() as scratch:
            out, err = Path(scratch, "stdout"), Path(scratch, "stderr")
            request = {"args": list(python_args), "cwd": str(Path(cwd or os.getcwd()).resolve()), "env": _cli_env(env),
                       "stdout": str(out), "stderr": str(err)}
            if shared_runs is not None:
                request["shared_runs"] = str(shared_runs)
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            pid = json.loads(self.server.stdout.readline())["pid"]
            if started is not None:
                started(pid)
            ready, _, _ = select.select([self.server.stdout], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
            status = json.loads(self.server.stdout.readline())["status"]
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        command = [sys.executable, *python_args]
        if not ready:
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
        return subprocess.CompletedProcess(command, status, stdout, stderr)


_warm_cli = WarmCLI()


def pytest_unconfigure(config):
    _warm_cli.close()


def run_python(*python_args, cwd=None, env=None, timeout=300, started=None, shared=False):
    """``python ARGS`` (``-m MODULE ...``, ``-c CODE ...`` or ``SCRIPT ...``) as a user
    runs it, forked warm where the environment allows; returns CompletedProcess.
    ``started(pid)``, if given, is called once the forked command runs (to signal it).
    ``shared=True``: its scenario runs are read from the session's shared runs where
    the same run was made (tests/shared_runs.py). For tests whose point is what a
    command shows; those about running (determinism, seeds, threads, Ctrl-C, failed
    writes) leave it off. A command that cannot be forked warm runs for real."""
    if not _warm_cli.serves(env):
        assert started is None, "started= is for commands the warm server runs"
        return subprocess.run([sys.executable, *python_args], capture_output=True, text=True,
                              cwd=cwd, env=_cli_env(env), timeout=timeout)
    return _warm_cli.run(python_args, cwd, env, timeout, started, xdist_shared_dir() if shared else None)


def run_cli(*args, cwd=None, env=None, timeout=300, started=None, shared=False):
    """``python -m nanlab ARGS`` as a user runs it; returns CompletedProcess."""
    return run_python("-m", "nanlab", *args, cwd=cwd, env=env, timeout=timeout, started=started, shared=shared)


def training_step(optimizer, compute_loss):
    """One step as users write it: zero the gradients, compute the loss, backward,
    optimizer step. Returns the step function, which returns the loss."""

    def step():
        optimizer.zero_grad()
        loss = compute_loss()
        loss.backward()
        optimizer.step()
        return loss

    return step


_session = {}


def pytest_configure(config):
    _session["config"] = config


def xdist_shared_dir() -> Path:
    """A folder every pytest-xdist worker of this session sees (the parent of their
    temp dirs), or this process's own temp dir without xdist."""
    base = _session["config"]._tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@lru_cache(maxsize=None)
def scenario_result(name, *overrides):
    """Each scenario's run at these overrides, shared by every test that reads it and
    by the documented commands (tests/shared_runs.py): made once per session, read
    back through ScenarioResult.from_dict, which the memo checks gives the run back
    exactly."""
    import nanlab

    with memoized_runs(xdist_shared_dir()):
        return nanlab.run(name, *overrides)


@pytest.fixture
def result_of():
    return scenario_result


@pytest.fixture
def make_step():
    return training_step


@pytest.fixture
def cli():
    return run_cli


def read_json(path):
    return json.loads(Path(path).read_text())


pytest_plugins = ["pytester"]


# Every framework test reads one measurement: each scenario that declares framework
# builders, at its defaults, in every installed framework, one worker per framework.
# docs/frameworks.md's command (FRAMEWORK_COMMAND) is that measurement's
# sparse_ce_bad_labels part, run as written: its workers train the scenario once for
# both the docs test and the framework tests, which read its result.json files. The
# other scenarios are measured in this process's own workers, meanwhile.
# It is taken once per test session, whichever pytest-xdist worker asks first: the
# others wait on a file lock and load the saved results (ScenarioResult.from_dict,
# which the tests check round-trips).
FRAMEWORK_COMMAND = "python -m nanlab scenario=sparse_ce_bad_labels framework=all"
FRAMEWORK_COMMAND_SCENARIO = FRAMEWORK_COMMAND.split("scenario=")[1].split()[0]


def share_jax_compilations(shared: Path) -> None:
    """Every later JAX process of this session (worker, CLI) keeps its compiled
    programs in one folder, so a test that trains a step some earlier worker compiled
    loads it instead of compiling again: the same program, so the same numbers."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(shared / "jax-compilations"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def framework_measurement(shared: Path) -> dict:
    """{"runs": {framework: {scenario: ScenarioResult}}, "command": CompletedProcess of
    FRAMEWORK_COMMAND}, saved under ``shared``."""
    from nanlab.lab.result import ScenarioResult

    share_jax_compilations(shared)
    data = made_once(shared, "framework-runs", FRAMEWORK_COMMAND, lambda: _measure_frameworks(shared))
    runs = {f: {n: ScenarioResult.from_dict(d) for n, d in by.items()} for f, by in data["runs"].items()}
    done = data["command"]
    return {"runs": runs, "command": subprocess.CompletedProcess(FRAMEWORK_COMMAND.split(), done["returncode"],
                                                                 done["stdout"], done["stderr"])}


def _measure_frameworks(shared: Path) -> dict:
    import tempfile
    import threading

    from nanlab import frameworks
    from nanlab.lab import registry
    from nanlab.config.compose import compose
    from nanlab.frameworks.run import measure
    from nanlab.config.options import FRAMEWORKS

    others = [f for f in FRAMEWORKS if f != "torch" and frameworks.installed(f)]
    names = [n for n in registry.names() if frameworks.declared(n) and n != FRAMEWORK_COMMAND_SCENARIO]
    cwd = Path(tempfile.mkdtemp(prefix="framework-command-", dir=shared))
    done = {}

    def run_the_command():
        done["proc"] = run_python(*FRAMEWORK_COMMAND.split()[1:], cwd=cwd, timeout=600)

    command = threading.Thread(target=run_the_command)
    command.start()
    try:
        measured = measure([compose([f"scenario={n}"]) for n in names], others)
    finally:
        command.join()
    runs = {f: {n: json.loads(r.to_json()) for n, r in by.items()} for f, by in measured.items()}
    for path in cwd.glob(f"outputs/{FRAMEWORK_COMMAND_SCENARIO}/*/*/result.json"):  # <time>/<framework>/
        if path.parent.name in runs:
            runs[path.parent.name][FRAMEWORK_COMMAND_SCENARIO] = json.loads(path.read_text())
    proc = done.get("proc")
    if proc is None:  # the thread raised (a timeout, say), and printed why
        raise RuntimeError(f"{FRAMEWORK_COMMAND} did not finish")
    return {"runs": runs, "command": {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}}


@pytest.fixture(scope="session")
def framework_measured():
    return framework_measurement(xdist_shared_dir())


@pytest.fixture(scope="session")
def framework_runs(framework_measured):
    runs, done = framework_measured["runs"], framework_measured["command"]
    lacking = [f for f, by in runs.items() if FRAMEWORK_COMMAND_SCENARIO not in by]
    if lacking:
        pytest.fail(f"{FRAMEWORK_COMMAND} wrote no result for {lacking} (exit {done.returncode}):\n"
                    f"{(done.stdout + done.stderr)[-2000:]}")
    return runs


def _missing(message):
    """Skip a test whose optional extra is missing; fail it where `make test`
    (NANLAB_REQUIRE_FRAMEWORKS=1) installed every extra."""
    from nanlab import frameworks

    if frameworks.required():
        pytest.fail(message + f"; {frameworks.REQUIRE_ENV}=1 expects every extra installed")
    pytest.skip(message)


def need_framework(framework):
    """Skip (or, under `make test`, fail) a test of a framework that is not installed."""
    from nanlab import frameworks

    if not frameworks.installed(framework):
        _missing(f"{framework} is not installed ({frameworks.install_hint(framework)})")


# The Hydra launcher plugins behind nanlab's launcher extras (pyproject.toml).
LAUNCHER_MODULES = {"parallel": "hydra_plugins.hydra_joblib_launcher",
                    "cluster": "hydra_plugins.hydra_submitit_launcher"}


def need_extra(extra):
    """Skip (or, under `make test`, fail) a test of a launcher extra that is not installed."""
    import importlib.util

    from nanlab.errors import install_hint

    if importlib.util.find_spec(LAUNCHER_MODULES[extra]) is None:
        _missing(f"the {extra} extra is not installed ({install_hint(extra)})")
