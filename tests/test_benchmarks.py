"""The benchmark scripts run and print the ratios they promise. Timings are not
asserted here: this machine is shared and noisy (see the README for measured numbers)."""
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script, *args):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=240)
    return proc.returncode, proc.stdout + proc.stderr


def test_tracer_overhead_prints_both_ratios():
    rc, out = run("tracer_overhead.py", "--rounds", "1", "--steps", "1")
    assert rc == 0, out
    assert re.search(r"guard / plain = \d+\.\d\dx \(target <= 1\.15x\): (met|MISSED)", out)
    assert re.search(r"trace / detect_anomaly = \d+\.\d\dx \(target <= 1\.00x\): (met|MISSED)", out)
    for way in ("plain", "guard", "nanlab.trace", "detect_anomaly"):
        assert re.search(rf"^{re.escape(way)}\s+\d+\.\d us/step", out, re.M), way


def test_kernel_check_prints_one_line_per_kernel():
    rc, out = run("kernel_check.py")
    assert rc == 0, out
    assert len(re.findall(r"median +\d+\.\d\d s +\(\d+\.\d\d of the 3 s target: (met|MISSED)\)", out)) == 4, out


def test_tracer_overhead_rejects_a_bad_count_in_one_line():
    rc, out = run("tracer_overhead.py", "--rounds", "0")
    assert rc == 2 and "Traceback" not in out
    assert "error: argument --rounds: '0' is not a whole number >= 1" in out
