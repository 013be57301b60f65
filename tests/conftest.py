import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The lab's models are tiny: one thread each is fastest, and the tests run CLI
# subprocesses side by side on 2 cores, where two OpenMP threads per process spin
# against each other and slow every matmul by orders of magnitude. Set before any
# test imports torch, and inherited by every subprocess.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run ``python -m nanlab`` in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "nanlab", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


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


@lru_cache(maxsize=None)
def scenario_result(name, *overrides):
    """Each scenario's default run, shared by every test that reads it."""
    import nanlab

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
# Tests that use it carry @pytest.mark.xdist_group("frameworks") so that `make test`
# (pytest -n 2 --dist loadgroup) runs them on one worker and measures once.
@lru_cache(maxsize=None)
def framework_measurement(*overrides):
    """{framework: {scenario: ScenarioResult}} for every scenario with builders."""
    from nanlab import frameworks, registry
    from nanlab.config import compose
    from nanlab.frameworks import source
    from nanlab.frameworks.run import measure
    from nanlab.options import FRAMEWORKS

    others = [f for f in FRAMEWORKS if f != "torch" and frameworks.installed(f)]
    names = [n for n in registry.names() if source.declared(n)]
    return measure([compose([f"scenario={n}", *overrides]) for n in names], others)


@pytest.fixture
def framework_runs():
    return framework_measurement()


def need_framework(framework):
    """Skip a test of a framework that is not installed; fail it where `make test`
    (NANLAB_REQUIRE_FRAMEWORKS=1) installed every framework."""
    from nanlab import frameworks

    if frameworks.installed(framework):
        return
    message = f"{framework} is not installed ({frameworks.install_hint(framework)})"
    if frameworks.required():
        pytest.fail(message + f"; {frameworks.REQUIRE_ENV}=1 expects every framework")
    pytest.skip(message)
