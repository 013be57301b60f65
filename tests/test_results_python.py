"""Results from Python: short str and repr, plot(path) and save(path), on a run's
result and on one loaded from result.json, with no torch for the loaded one."""
import json
import subprocess
import sys

from conftest import ROOT

LIMIT = 3000

LOADED = """
import sys
from nanlab.lab.result import ScenarioResult
r = ScenarioResult.load(sys.argv[1])
print(len(str(r)), len(repr(r)))
r.plot(sys.argv[2])
print(r.save(sys.argv[3]))
print("torch" in sys.modules)
"""


def test_a_run_and_a_loaded_result_print_plot_and_save(tmp_path):
    import nanlab

    result = nanlab.run("tanh_explosion", steps=20)
    assert len(str(result)) < LIMIT and len(repr(result)) < LIMIT
    assert repr(result) == str(result) and "reproduced" in str(result)
    saved = result.save(tmp_path)  # a folder: result.json inside
    assert saved == tmp_path / "result.json"
    figure = result.plot(tmp_path / "run.png")
    assert figure is not None and (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = tmp_path / "again.json"
    done = subprocess.run([sys.executable, "-c", LOADED, str(saved), str(tmp_path / "loaded.png"), str(again)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lengths, path, torch_imported = done.stdout.split("\n")[:3]
    assert all(0 < int(n) < LIMIT for n in lengths.split())
    assert path == str(again)
    assert torch_imported == "False"  # loading, printing, plotting and saving stay torch-free
    assert (tmp_path / "loaded.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(again.read_text()) == json.loads(saved.read_text())  # round-trips
    assert len(saved.read_text()) > LIMIT  # the numbers are all there, only the printout is short


def test_save_leaves_no_temporary_file_and_replaces_whole(tmp_path):
    import nanlab
    from nanlab.lab.result import ScenarioResult

    result = nanlab.run("tanh_explosion", steps=3)
    target = tmp_path / "r.json"
    target.write_text("old")
    result.save(target)
    assert ScenarioResult.load(target).to_dict() == result.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
