"""Runs use one CPU thread unless OMP_NUM_THREADS or threads= says otherwise (issue 19)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Records torch's thread count inside each variant's training, then prints the set.
PROBE = """
import sys, torch
import nanlab.lab.runner as runner
seen = set()
train = runner.train
def counted(*args, **kwargs):
    seen.add(torch.get_num_threads())
    return train(*args, **kwargs)
runner.train = counted
import nanlab
nanlab.run("tanh_explosion", "steps=2", *sys.argv[1:])
print(sorted(seen), torch.get_num_threads())
"""


def threads_seen(*overrides, omp=None):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp is not None:
        env["OMP_NUM_THREADS"] = str(omp)
    out = subprocess.run([sys.executable, "-c", PROBE, *overrides], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=240, check=True).stdout
    return out.strip().splitlines()[-1]


def test_a_run_without_omp_num_threads_uses_one_thread_and_gives_the_count_back():
    import torch

    default = torch.get_num_threads() if "OMP_NUM_THREADS" not in os.environ else None
    seen, after = threads_seen().rsplit(" ", 1)
    assert seen == "[1]"
    if default is not None:  # nanlab.run gives the caller's count back
        assert int(after) == default


@pytest.mark.parametrize("overrides, omp, expected", [
    ((), 2, "[2]"),  # the user's OMP_NUM_THREADS wins over the default of 1
    (("threads=2",), None, "[2]"),  # so does the key
    (("threads=1",), 2, "[1]"),  # and the key wins over the environment
])
def test_explicit_thread_settings_win(overrides, omp, expected):
    assert threads_seen(*overrides, omp=omp).rsplit(" ", 1)[0] == expected


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
