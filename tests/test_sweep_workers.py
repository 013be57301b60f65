"""mode=sweep on worker processes and submitit: the same rows as one worker, a dead
worker's chunk trained again on resume, the Slurm executor as the config says; the
engine's chunk size and its written-out activation backward."""
import os
import signal

import pytest
import torch
from torch import nn

import nanlab
from nanlab.config.compose import compose
from nanlab.sweeps import engine as batched
from nanlab.sweeps import workers
from nanlab.sweeps.grid import sweep
from nanlab.sweeps.summary import SUMMARY_CSV, read_csv_rows

# Four points, two variants, one point a chunk: two workers share them out.
GRID = ["scenario=tanh_explosion", "mode=sweep", "steps=20", "variant=[sgd_large_lr,clip_norm_1]",
        "sweep.lr=[0.05,0.1,0.2,0.5]", "sweep.max_batch=1"]


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_worker")
    overrides = [*GRID, "sweep.workers=1"]
    sweep(compose(overrides), folder, overrides, out=lambda line: None)
    return (folder / SUMMARY_CSV).read_bytes()


def test_a_killed_worker_loses_its_chunk_and_resume_gives_the_uninterrupted_summary(one_worker, tmp_path,
                                                                                    monkeypatch):
    """Two workers; the one that takes lr 0.2 is killed (SIGKILL) while training it.
    The other points' rows are written, the sweep says which were lost and fails;
    sweep.resume=true trains only the lost one, and summary.csv is then byte for byte
    the one-worker sweep's."""
    parent, real = os.getpid(), batched.Engine.train
    trained = []

    def train(self, schedule):
        lrs = {float(run.cfg.optimizer.lr) for run in schedule.runs}
        if os.getpid() != parent and 0.2 in lrs:
            os.kill(os.getpid(), signal.SIGKILL)
        trained.append(lrs)
        return real(self, schedule)

    monkeypatch.setattr(batched.Engine, "train", train)
    overrides = [*GRID, "sweep.workers=2"]
    lines = []
    summary, failed = sweep(compose(overrides), tmp_path, overrides, out=lines.append)
    assert failed == 1 and "2 workers" in lines[0]
    assert any(line.startswith("sweep: 1 point lost: its worker (pid ") and "exit code -9" in line for line in lines)
    assert [r["optimizer.lr"] for r in read_csv_rows(tmp_path / SUMMARY_CSV)[1]] == ["0.05", "0.1", "0.5"]

    monkeypatch.setattr(batched.Engine, "train", train)
    lines.clear()
    resumed = [*overrides, "sweep.resume=true"]
    summary, failed = sweep(compose(resumed), tmp_path, resumed, out=lines.append)
    assert failed == 0 and "resuming: 3 rows" in lines[0] and "1 chunk of up to 1 point, 1 worker" in lines[0]
    assert trained[-1] == {0.2}  # only the lost point, here in this process (one chunk, one worker)
    assert (tmp_path / SUMMARY_CSV).read_bytes() == one_worker


def test_submitit_local_jobs_give_one_workers_rows(one_worker, tmp_path):
    """Two submitit_local jobs, dealt two chunks each: each writes its own rows file,
    and the summary assembled from them is the one-worker sweep's, byte for byte."""
    pytest.importorskip("submitit")
    overrides = [*GRID, "sweep.workers=2", "sweep.launcher=submitit_local", "sweep.max_batch=2"]
    summary, failed = sweep(compose(overrides), tmp_path, overrides, out=lambda line: None)
    assert failed == 0
    assert (tmp_path / SUMMARY_CSV).read_bytes() == one_worker
    job_rows = [(tmp_path / "rows" / f"collected-job-{k}.csv").read_text().splitlines() for k in range(2)]
    assert [len(rows) for rows in job_rows] == [2, 2]
    assert sorted(job_rows[0] + job_rows[1]) == sorted(one_worker.decode().splitlines()[1:])


def test_resume_collects_the_rows_of_jobs_the_submitting_process_never_collected(one_worker, tmp_path,
                                                                                   monkeypatch):
    """The submitting process ended with two points collected into summary.csv, while
    a job went on and wrote the other two to its own rows file (the last one cut
    short). Resume takes the job's whole row and trains only the cut one."""
    header, *rows = one_worker.decode().splitlines(keepends=True)
    (tmp_path / SUMMARY_CSV).write_text(header + rows[0] + rows[1])
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "job-1.csv").write_text(rows[2] + rows[3][:9])
    trained, real = [], batched.Engine.train

    def train(self, schedule):
        trained.append(sorted(float(run.cfg.optimizer.lr) for run in schedule.runs))
        return real(self, schedule)

    monkeypatch.setattr(batched.Engine, "train", train)
    overrides = [*GRID, "sweep.workers=1", "sweep.resume=true"]
    summary, failed = sweep(compose(overrides), tmp_path, overrides, out=lambda line: None)
    assert failed == 0 and trained == [[0.5, 0.5]]  # lr 0.5's two variants, nothing else
    assert (tmp_path / SUMMARY_CSV).read_bytes() == one_worker
    assert not (tmp_path / "rows" / "job-1.csv").exists()  # collected once, not again at the next resume
    assert (tmp_path / "rows" / "collected-job-1.csv").exists()


def test_the_slurm_executor_is_built_as_the_config_says(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    cfg = compose(["mode=sweep", "scenario=tanh_explosion", "sweep.launcher=slurm", "sweep.slurm.partition=gpu",
                   "sweep.slurm.account=acme", "sweep.slurm.timeout_min=30", "sweep.slurm.mem_gb=8"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun: a one-line config error, not submitit's traceback
    with pytest.raises(nanlab.ConfigError, match="sweep.launcher=slurm: Slurm's srun is not on this machine's PATH"):
        workers.executor(cfg.sweep, tmp_path / "submitit")
    srun = tmp_path / "srun"  # submitit looks for srun before it builds a Slurm executor; nothing is submitted
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    executor = workers.executor(cfg.sweep, tmp_path / "submitit")
    script = executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=acme", "#SBATCH --time=30", "#SBATCH --mem=8G",
                 "#SBATCH --cpus-per-task=1", "#SBATCH --ntasks-per-node=1"):
        assert line in script, line
    assert "--qos" not in script  # left unset in the config: not passed
    local = workers.executor(compose(["sweep.launcher=submitit_local"]).sweep, tmp_path / "local")
    assert type(local).__name__ == "LocalExecutor"


@pytest.mark.parametrize("key,bad,good,message", [
    ("sweep.workers", "0", "4", "must be an integer in [1, 1024], or null for the cores available"),
    ("sweep.launcher", "pbs", "slurm", "must be one of local, submitit_local, slurm"),
    ("sweep.slurm.mem_gb", "0", "4", "must be an integer >= 1 (GiB)"),
    ("sweep.max_batch", "0", "4", "must be an integer >= 1, or null to size chunks from the model"),
])
def test_bad_worker_settings_are_one_line_errors(key, bad, good, message):
    with pytest.raises(nanlab.ConfigError) as err:
        compose(["mode=sweep", "scenario=tanh_explosion", f"{key}={bad}"])
    assert str(err.value) == f"{key}={bad}: {message}"
    compose(["mode=sweep", "scenario=tanh_explosion", f"{key}={good}"])  # in range: accepted


def test_chunks_fill_the_cache_within_their_bounds():
    """tanh_explosion's step holds 2 x 256 x 257 floats of layer outputs and
    gradients and 4 x 4929 of parameter state: 605,200 bytes a copy."""
    from nanlab.lab import registry
    from nanlab.sweeps.engine import Engine, Run
    from nanlab.sweeps.workers import MAX_CHUNK, MIN_CHUNK, chunk_copies

    scenario = registry.load("tanh_explosion")
    prepared = Engine(scenario).prepare(Run(scenario.broken, compose(["scenario=tanh_explosion"])))
    per_copy = 4 * (2 * 256 * (64 + 64 + 64 + 64 + 1) + 4 * 4929)
    assert chunk_copies(prepared, cache=20 * per_copy) == 20
    assert chunk_copies(prepared, cache=20 * per_copy - 1) == 19
    assert chunk_copies(prepared, cache=2 ** 20) == MIN_CHUNK
    assert chunk_copies(prepared, cache=2 ** 30) == MAX_CHUNK


@pytest.mark.parametrize("module", [nn.Tanh(), nn.Sigmoid(), nn.ReLU(), nn.GELU(), nn.LeakyReLU(0.1)])
def test_the_written_out_activation_backward_is_autograds_per_copy(module, monkeypatch):
    """Each activation's backward, batched, gives every copy autograd's gradient bits
    (FROM_OUTPUT's op, or autograd itself for the rest); a wrong op is caught."""
    exact = batched.Exactness(4, torch.device("cpu"), torch.float32, seed=11)
    assert exact.elementwise(module, (7, 5))
    if type(module) in batched.FROM_OUTPUT:
        monkeypatch.setattr(batched.Exactness, "_found", {})
        wrong = batched.FROM_OUTPUT[nn.Sigmoid] if type(module) is not nn.Sigmoid else batched.FROM_OUTPUT[nn.Tanh]
        monkeypatch.setitem(batched.FROM_OUTPUT, type(module), wrong)
        assert not batched.Exactness(4, torch.device("cpu"), torch.float32, seed=11).elementwise(module, (7, 5))
