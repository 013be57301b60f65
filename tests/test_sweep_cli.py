"""Sweeps from the command line: Hydra multirun with its summary callback (basic and
submitit launchers), mode=sweep on the same grid, and bad sweep input. The joblib
launcher's summary is compared with the basic launcher's by the sweep benchmark's
smoke run (tests/test_benchmarks.py), which starts that multirun fresh anyway."""
import csv
import io

import pytest

from conftest import need_extra

# One grid, three ways. lr 0.5 diverges (at step 12) without clipping; clip=norm keeps it finite.
GRID = ["scenario=tanh_explosion", "steps=20"]
MULTIRUN_AXES = ["optimizer.lr=0.05,0.5", "clip=none,norm"]
SWEEP_AXES = ["sweep.lr=[0.05,0.5]", "sweep.clip=[none,norm]"]


def read_csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The grid as a multirun with Hydra's basic launcher (serial, one process)."""
    from conftest import run_cli

    folder = tmp_path_factory.mktemp("serial")
    proc = run_cli("-m", *GRID, *MULTIRUN_AXES, f"hydra.sweep.dir={folder}")
    assert proc.returncode == 0, proc.stderr
    return folder, proc


def test_multirun_prints_a_line_per_job_then_writes_and_prints_the_summary(serial):
    folder, proc = serial
    assert proc.stdout.count("sgd_large_lr non-finite at step 12") == 1
    rows = read_csv(folder / "summary.csv")
    assert [(r["optimizer.lr"], r["clip"]) for r in rows] == [("0.05", "none"), ("0.05", "norm"), ("0.5", "none"),
                                                             ("0.5", "norm")]
    assert list(rows[0])[:5] == ["optimizer.lr", "clip", "sgd_large_lr.first_nonfinite_step",
                                 "sgd_large_lr.final_loss", "sgd_large_lr.learned"]
    assert list(rows[0])[-1] == "status" and {r["status"] for r in rows} == {"ok"}
    assert [r["sgd_large_lr.first_nonfinite_step"] for r in rows] == ["", "", "12", ""]
    assert {"adam_1e-3.final_loss", "standardized.learned"} <= set(rows[0])
    md = (folder / "summary.md").read_text()
    assert "| optimizer.lr | clip | sgd_large_lr.first_nonfinite_step |" in md
    assert "| 0.5 | none | 12 |" in md and md.count("\n| 0.") == 4
    assert "| 0.5 | none | 12 |" in proc.stdout and f"Wrote {folder / 'summary.csv'}" in proc.stdout


def test_mode_sweep_gives_the_multirun_rows_bit_for_bit(serial, cli, tmp_path):
    """The in-process grid, batched, on two worker processes (a point a chunk) and on
    one: summary.csv is the multirun's byte for byte, so every first non-finite step
    and every final loss (written by repr) is the single run's, bit for bit."""
    from nanlab.config.compose import compose
    from nanlab.sweeps.grid import sweep

    proc = cli("mode=sweep", *GRID, *SWEEP_AXES, "sweep.workers=2", "sweep.max_batch=1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "batched engine:" in proc.stdout and "4 chunks of up to 1 point, 2 workers" in proc.stdout
    multirun = (serial[0] / "summary.csv").read_text()
    assert (tmp_path / "summary.csv").read_text() == multirun
    assert [r["sgd_large_lr.first_nonfinite_step"] for r in read_csv(tmp_path / "summary.csv")] == ["", "", "12", ""]
    overrides = ["mode=sweep", *GRID, *SWEEP_AXES, "sweep.workers=1"]
    sweep(compose(overrides), tmp_path / "one", overrides, out=lambda line: None)
    assert (tmp_path / "one" / "summary.csv").read_text() == multirun


def test_a_failed_job_is_a_row_and_the_rest_still_summarize(cli, tmp_path):
    """Job 1 is refused (a negative width); nanlab exits 2 there, which ends the sweep
    before job 2. The summary still comes, saying which job failed and which never ran."""
    proc = cli("-m", "scenario=tanh_explosion", "steps=5", "scenario.data.width=8,-1,4",
               f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2
    assert "nanlab: error: scenario.data.width=-1" in proc.stderr and "Traceback" not in proc.stderr
    rows = read_csv(tmp_path / "summary.csv")
    assert [r["scenario.data.width"] for r in rows] == ["8", "-1", "4"]
    assert rows[0]["status"] == "ok" and rows[0]["sgd_large_lr.final_loss"]
    assert rows[1]["status"].startswith("failed: no result.json in 1_") and rows[1]["sgd_large_lr.final_loss"] == ""
    assert rows[2]["status"].startswith("not run")
    assert "failed: no result.json" in (tmp_path / "summary.md").read_text()


def test_submitit_local_launcher_runs_a_two_job_sweep(cli, tmp_path):
    need_extra("cluster")
    proc = cli("-m", "scenario=tanh_explosion", "steps=10", "optimizer.lr=0.1,0.5", "hydra/launcher=submitit_local",
               f"hydra.sweep.dir={tmp_path}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(tmp_path / "summary.csv")
    assert [(r["optimizer.lr"], r["status"]) for r in rows] == [("0.1", "ok"), ("0.5", "ok")]
    assert (tmp_path / ".submitit").is_dir()


def test_the_slurm_launcher_config_composes(cli):
    need_extra("cluster")
    proc = cli("hydra/launcher=slurm", "--cfg", "hydra", "-p", "hydra.launcher")
    assert proc.returncode == 0, proc.stderr
    assert "SlurmLauncher" in proc.stdout and "array_parallelism: 64" in proc.stdout


@pytest.mark.parametrize("override,message", [
    ("sweep.lr=[]", "sweep.lr=[]: must list one or more numbers > 0"),
    ("sweep.lr=[0.1,-0.2]", "sweep.lr=[0.1, -0.2]: must list one or more numbers > 0"),
    ("sweep.init=[default,glorot]", "sweep.init=['default', 'glorot']: must list one or more of default, "
                                    "xavier_uniform, he_normal, normal"),
    ("sweep.seed=[0,1,2,3,4,5,6,7,8,9,10]", "sweep=1331 points: the grid is larger than 1024 points; more than "
                                            "1024 need sweep.max_points=1331"),
])
def test_bad_sweep_input_is_one_line_and_exit_2(cli, override, message):
    extra = ["sweep.lr=[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1]",
             "sweep.clip_threshold=[1,2,3,4,5,6,7,8,9,10,11]"] if "seed" in override else []
    proc = cli("mode=sweep", "scenario=tanh_explosion", override, *extra)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"nanlab: error: {message}"), line


def test_max_points_lets_a_large_grid_through_the_check():
    from nanlab.config.compose import compose

    axes = ["sweep.lr=[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1]", "sweep.clip_threshold=[1,2,3,4,5,6,7,8,9,10,11]",
            "sweep.seed=[0,1,2,3,4,5,6,7,8,9,10]"]
    cfg = compose(["mode=sweep", "scenario=tanh_explosion", *axes, "sweep.max_points=2000"])
    assert list(cfg.sweep.seed) == list(range(11))
