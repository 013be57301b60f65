"""The built wheel works in a fresh venv, run from another directory."""
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_in_fresh_venv(tmp_path):
    dist, source = tmp_path / "dist", tmp_path / "source"
    # A copy without build/: setuptools would reuse a stale build/lib from an earlier layout.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                                "outputs", "multirun", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(source)], check=True, capture_output=True)
    wheel = next(dist.glob("nanlab-*.whl"))
    venv = tmp_path / "venv"
    # Without pip of its own (ensurepip costs seconds): this venv's pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # Reuse this venv's torch and Hydra instead of downloading them again: a .pth line
    # adds its site-packages after the fresh venv's own (which will hold nanlab).
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([str(py), "-m", "nanlab", "scenario=unscaled_sgd", "steps=5", "hydra.run.dir=out"],
                          cwd=work, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((work / "out" / "result.json").read_text())
    assert result["scenario"] == "unscaled_sgd" and result["reproduced"] is True
    where = subprocess.run([str(py), "-c", "import nanlab.scenarios, nanlab.conf; print(nanlab.scenarios.__file__, nanlab.conf.__file__)"],
                           cwd=work, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(ROOT) not in where
    check = subprocess.run([str(py), "-m", "nanlab", "mode=check", "kernel.fn=nanlab.kernels.examples:torch_softmax",
                            "kernel.kind=softmax", "kernel.dtypes=[float32]", "hydra.run.dir=chk"],
                           cwd=work, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    plugins = subprocess.run([str(py), "-c", "from importlib.metadata import entry_points; "
                              "print([e.value for e in entry_points(group='pytest11')])"],
                             cwd=work, capture_output=True, text=True, check=True).stdout
    assert "nanlab.kernels.plugin" in plugins
