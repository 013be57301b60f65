"""The benchmark scripts run and print the ratios they promise. Timings are not
asserted here: this machine is shared and noisy (see docs/performance.md for measured numbers)."""
import re
from pathlib import Path

import pytest

from conftest import need_extra, run_python

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script, *args):
    """``python benchmarks/SCRIPT ARGS``, forked warm: the scripts read no environment
    at import, and the processes they start themselves are fresh."""
    proc = run_python(str(BENCHMARKS / script), *args, timeout=240)
    return proc.returncode, proc.stdout + proc.stderr


def test_tracer_overhead_prints_both_ratios():
    rc, out = run("tracer_overhead.py", "--rounds", "1", "--steps", "1")
    assert rc == 0, out
    assert re.search(r"guard / plain = \d+\.\d\dx \(target <= 1\.15x\): (met|MISSED)", out)
    assert re.search(r"trace / detect_anomaly = \d+\.\d\dx \(target <= 1\.00x\): (met|MISSED)", out)
    for way in ("plain", "guard", "nanlab.trace", "detect_anomaly"):
        assert re.search(rf"^{re.escape(way)}\s+\d+\.\d us/step", out, re.M), way


def test_kernel_check_prints_one_line_per_kernel():
    rc, out = run("kernel_check.py", "--repeats", "1")
    assert rc == 0, out
    assert len(re.findall(r"median +\d+\.\d\d s +\(\d+\.\d\d of the 3 s target: (met|MISSED)\)", out)) == 4, out
    rc, out = run("kernel_check.py", "--repeats", "0")
    assert rc == 2 and "Traceback" not in out
    assert "error: argument --repeats: '0' is not a whole number >= 1" in out


def test_tracer_overhead_rejects_a_bad_count_in_one_line():
    rc, out = run("tracer_overhead.py", "--rounds", "0")
    assert rc == 2 and "Traceback" not in out
    assert "error: argument --rounds: '0' is not a whole number >= 1" in out


def test_sweep_benchmark_prints_each_way_against_the_basic_multirun():
    """Also the test of Hydra's joblib launcher: 20 steps take lr 1 without clipping
    past its first non-finite step (12), and the joblib multirun's summary.csv must be
    the basic launcher's (and mode=sweep's) byte for byte, that step included."""
    need_extra("parallel")
    rc, out = run("sweep.py", "--points", "2", "--steps", "20", "--rounds", "1", "--forked")
    assert rc == 0, out
    assert "x clip none,norm = 4 points, every variant, 20 steps;" in out and "forked, start-up left out" in out
    rows = {m.group(1): [float(v) for v in m.groups()[1:]] for m in re.finditer(
        r"^(multirun, basic launcher|multirun, joblib n_jobs=2|mode=sweep, 1 worker|mode=sweep, 2 workers)\s+"
        r"(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)x\s+(\d+\.\d\d)x\s+(\d+\.\d\d)x$", out, re.M)}
    assert len(rows) == 4, out
    basic, joblib = rows["multirun, basic launcher"], rows["multirun, joblib n_jobs=2"]
    for wall, cpu, by_wall, by_cpu, by_joblib in rows.values():  # each ratio is its columns' quotient
        assert by_wall == pytest.approx(basic[0] / wall, rel=0.02, abs=0.01), out
        assert by_cpu == pytest.approx(basic[1] / cpu, rel=0.02, abs=0.01), out
        assert by_joblib == pytest.approx(joblib[0] / wall, rel=0.02, abs=0.01), out
    floor = re.search(r"^kernel floor\s+(\d+\.\d\d)\s+\((\d+) copy-steps x (\d+) us, batches of \d+\)$", out, re.M)
    assert floor, out
    # 5 variants x 4 points x 20 steps at most; fewer where a copy stops early or trains once (adam pins its lr)
    assert 0 < int(floor.group(2)) < 5 * 4 * 20, out
    assert "summary.csv: the same, byte for byte, every way" in out, out


def test_sweep_benchmark_needs_two_points():
    rc, out = run("sweep.py", "--points", "1")
    assert rc == 2 and "argument --points: '1' is not a whole number >= 2" in out and "Traceback" not in out


def test_threads_benchmark_prints_each_way_against_one_thread():
    # The load ends itself after a second: its start and stop are what is checked here.
    rc, out = run("threads.py", "--rounds", "1", "--steps", "2", "--load", "1", "--limit", "1")
    assert rc == 0, out
    assert "beside 1 CPU-bound process on" in out
    for way in ("torch default", "nanlab default", "OMP_NUM_THREADS=1"):
        assert re.search(rf"^{re.escape(way)}\s+\d+ thread\(s\)\s+\d+\.\d{{3}} s\s+\d+\.\d\dx of OMP_NUM_THREADS=1$",
                         out, re.M), (way, out)
    assert re.search(r"^nanlab default\s+1 thread\(s\)", out, re.M)  # what a plain run uses
    assert re.search(r"^OMP_NUM_THREADS=1\s+1 thread\(s\)\s+\d+\.\d{3} s\s+1\.00x", out, re.M)


def test_threads_benchmark_rejects_a_bad_count_in_one_line():
    rc, out = run("threads.py", "--rounds", "0")
    assert rc == 2 and "Traceback" not in out
    assert "error: argument --rounds: '0' is not a whole number >= 1" in out


def test_guard_benchmark_prints_memory_and_time_for_each_way(capsys):
    """In this process, but for its one worker process (--quick trains the three ways
    there one after another)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("guard_benchmark", BENCHMARKS / "guard.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["--quick", "--steps", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    for way in ("plain", "guard", "guard always"):
        assert re.search(rf"^{way} +\d+\.\d MiB", out, re.M), (way, out)
        assert re.search(rf"^{way} +\d+\.\d ms median, +\d+\.\d ms least +\d+\.\d{{4}}x plain", out, re.M), (way, out)
    # The memory workers really trained: the guard proved both steps and copied none,
    # snapshot="always" copied both.
    assert re.search(r"^guard +[\d.]+ MiB +[+-][\d.]+ MiB over plain, 0 of 2 steps copied", out, re.M), out
    assert re.search(r"^guard always +[\d.]+ MiB +[+-][\d.]+ MiB over plain, 2 of 2 steps copied", out, re.M), out
    assert re.search(r"guard extra peak memory = [+-]\d+\.\d MiB \(target <= 16 MiB\): (met|MISSED)", out), out
    assert len(re.findall(r"guard / plain = \d+\.\d{4}x \(target <= 1\.005x\): (met|MISSED)", out)) == 2, out
    assert re.search(r"^guard +\d+\.\d\d ms = \d+\.\d{3}% of plain's median step", out, re.M), out
