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
