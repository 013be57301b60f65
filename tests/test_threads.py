"""Runs use one CPU thread unless OMP_NUM_THREADS or threads= says otherwise."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Runs tanh_explosion once per argument, "OMP_NUM_THREADS|overrides" (an empty
# OMP_NUM_THREADS: unset), and prints, per run, its argument, the set of torch thread
# counts seen inside each variant's training, and torch's count before and after it.
PROBE = """
import os, sys, torch
import nanlab.lab.runner as runner
import nanlab
seen = set()
train = runner.train
def counted(*args, **kwargs):
    seen.add(torch.get_num_threads())
    return train(*args, **kwargs)
runner.train = counted
for run in sys.argv[1:]:
    omp, overrides = run.split("|")
    os.environ.pop("OMP_NUM_THREADS", None)
    os.environ.update({"OMP_NUM_THREADS": omp} if omp else {})
    seen.clear()
    before = torch.get_num_threads()
    nanlab.run("tanh_explosion", "steps=2", *overrides.split())
    print(f"{run}|{sorted(seen)}|{before}|{torch.get_num_threads()}")
"""
# torch reads OMP_NUM_THREADS once, when it starts (and caps it at the cores): one
# fresh interpreter, started with 2, runs first with the variable set, then without it
# (nanlab reads it at each run); the key asks for 3, a count torch never had.
STARTED_WITH = 2
PROBED = ("2|", "2|threads=1", "|", "|threads=3")


@pytest.fixture(scope="module")
def threads_seen():
    """{(overrides, OMP_NUM_THREADS or None): (threads seen in training, before, after)}."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = str(STARTED_WITH)
    out = subprocess.run([sys.executable, "-c", PROBE, *PROBED], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=240, check=True).stdout
    seen = {}
    for line in out.strip().splitlines()[-len(PROBED):]:
        omp, overrides, threads, before, after = line.split("|")
        seen[overrides, int(omp) if omp else None] = (threads, int(before), int(after))
    return seen


def test_a_run_without_omp_num_threads_uses_one_thread_and_gives_the_count_back(threads_seen):
    assert threads_seen["", None] == ("[1]", STARTED_WITH, STARTED_WITH)
    assert {seen[1:] for seen in threads_seen.values()} == {(STARTED_WITH, STARTED_WITH)}  # every run gives it back


@pytest.mark.parametrize("overrides, omp, expected", [
    ("", STARTED_WITH, f"[{STARTED_WITH}]"),  # the user's OMP_NUM_THREADS wins over the default of 1
    ("threads=3", None, "[3]"),  # so does the key
    ("threads=1", STARTED_WITH, "[1]"),  # and the key wins over the environment
])
def test_explicit_thread_settings_win(threads_seen, overrides, omp, expected):
    assert threads_seen[overrides, omp][0] == expected


def test_threads_key_out_of_range_is_one_line(cli):
    done = cli("scenario=tanh_explosion", "threads=-1")
    assert done.returncode == 2
    assert done.stderr.strip() == ("nanlab: error: threads=-1: must be an integer in [1, 1024], "
                                   "or 0 or auto for torch's default")
    assert "Traceback" not in done.stderr


def test_requested_rules(monkeypatch):
    from nanlab.lab import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.requested(None) == 1
    assert threads.requested(0) is None and threads.requested("auto") is None
    assert threads.requested(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads.requested(None) is None  # torch reads the environment itself
    assert threads.fixed(None) is None and threads.fixed(2) == 2


# Small items of issue 19, each with its test.

def test_a_worker_framework_with_float64_names_float64_and_what_is_allowed(cli, tmp_path):
    done = cli("scenario=sparse_ce_bad_labels", "framework=jax", "dtype=float64", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert line.count("\n") == 0
    assert line.startswith("nanlab: error: dtype=float64: framework=jax trains in float32 only: float64 would need")
    assert "use dtype=float32, or framework=torch for float64, float16 and bfloat16" in line
    assert not (tmp_path / "outputs").exists()  # refused at validation: no run folder left


def test_a_run_refused_at_validation_leaves_no_run_folder(cli, tmp_path):
    done = cli("scenario=tanh_explosion", "optimizer.lr=-1", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("nanlab: error: optimizer.lr=-1")
    assert not (tmp_path / "outputs").exists(), list((tmp_path / "outputs").rglob("*"))
    # a folder the user named, holding files of their own, is left as it was
    own = tmp_path / "mine"
    own.mkdir()
    (own / "notes.txt").write_text("keep")
    done = cli("scenario=tanh_explosion", "optimizer.lr=-1", f"hydra.run.dir={own}", cwd=tmp_path)
    assert done.returncode == 2
    assert own.is_dir() and (own / "notes.txt").read_text() == "keep"


def test_bce_log_zero_says_why_its_lossy_fixes_end_lower(result_of):
    """The lossy fixes end below the exact fix because their weights end larger (on
    separable data the loss falls as the weights grow), which the explanation says."""
    r = result_of("bce_log_zero")
    exact = r.variant("bce_with_logits")
    for name in ("clamp_eps_1e-7", "torch_bce_on_probs"):
        lossy = r.variant(name)
        assert lossy.exact_loss_end < exact.exact_loss_end
        assert lossy.param_norms[-1] > exact.param_norms[-1]  # the reason, measured
        assert lossy.accuracy_end == exact.accuracy_end
    assert "not a better fit" in r.explanation and "larger weight norm" in r.explanation.replace("\n", " ")


def test_the_batched_engine_trains_on_its_count_and_gives_the_count_back():
    import torch

    from nanlab.lab import registry
    from nanlab.config.compose import compose
    from nanlab.sweeps.engine import Engine, Run

    scenario = registry.load("tanh_explosion")
    seen, before = set(), torch.get_num_threads()
    engine = Engine(scenario, threads=2)
    original = torch.set_num_threads
    try:
        torch.set_num_threads = lambda n: (seen.add(n), original(n))
        engine.train(engine.schedule([Run(scenario.broken, compose(["scenario=tanh_explosion", "steps=3"]))]))
    finally:
        torch.set_num_threads = original
    assert 2 in seen and torch.get_num_threads() == before
