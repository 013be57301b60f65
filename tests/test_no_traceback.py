"""Bad input, interruptions and failed writes end as one line and a status, never a
traceback, and never destroy an earlier result."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nanlab.errors import install_hint

SWEEP_UNFINISHED = "nanlab: the sweep did not finish; summarizing the jobs that did"


@pytest.mark.parametrize("args,expected", [
    (["seed=9223372036854775808"], "seed=9223372036854775808: must be an integer in [0, 9007199254740992)"),
    (["optimizer.lr=1e39"], "optimizer.lr=1e+39: must be a number > 0 and at most float32's largest"),
    (["optimizer.weight_decay=1e39"], "optimizer.weight_decay=1e+39: must be a number >= 0"),
    (["clip=norm", "clip.threshold=1e39"], "clip.threshold=1e+39: must be a number > 0 and at most float32's"),
    (["scenario.data.n=-5"], "scenario.data.n=-5: must be an integer >= 0"),
    (["scenario.data.n=0"], "scenario.data.n=0: softmax_overflow cannot run with this data knob value"),
    (["+foo=1"], "foo=1: not a nanlab config key"),
    (["+optimizer.foo=1"], "optimizer.foo=1: not a nanlab config key"),
    (["scenario=1"], "scenario=1: takes one name: bce_log_zero,"),
    (["optimizer=1"], "optimizer=1: takes one name: sgd, adam, rmsprop"),
    (["init=3.5"], "init=3.5: takes one name:"),
    (["scenario=null"], "scenario=null: takes one name:"),
    (["scenario=../../etc/passwd"], "scenario=../../etc/passwd: takes one name:"),
    (["clip=[norm,value]"], "clip=[norm,value]: takes one name: none, norm, value; to try several"),
    (["scenario=s\u00f3ftmax"], "cannot be parsed: unquoted values take ASCII"),
    (["mode=claims", "variant=nope"], "variant=nope: applies to mode=run and mode=sweep, not mode=claims"),
    (["mode=list", "steps=-1"], "steps=-1: must be an integer >= 1"),
    (["-m", "optimizer.lr=0.1,abc", "steps=2"], "optimizer.lr=0.1,abc: must be a number > 0"),
    (["-m", "optimizer.lr=range(0,2000)", "steps=2"], "multirun=2000 jobs: a multirun of more than 1024 jobs"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, args, expected):
    proc = cli(*args, f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'multirun'}")
    lines = proc.stderr.strip().splitlines()
    # A multirun whose later job is refused also says that the sweep did not finish.
    said = lines[:1] if args[0] == "-m" and lines[1:] == [SWEEP_UNFINISHED] else lines
    assert proc.returncode == 2 and len(said) == 1 and said[0].startswith("nanlab: error: "), proc.stderr
    assert expected in said[0] and "Traceback" not in proc.stderr


def test_a_run_dir_that_is_a_file_is_one_line(cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = cli(f"hydra.run.dir={blocker}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"nanlab: error: {blocker}: cannot create the output folder")


# `ulimit -f 16; python -m nanlab ...`: the same file-size limit, set by the process
# itself, so the run can fork from the warm CLI server.
UNDER_A_16_KIB_FILE_LIMIT = ("import resource, runpy\n"
                             "resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))\n"
                             "runpy.run_module('nanlab', run_name='__main__', alter_sys=True)\n")


def test_a_failed_write_keeps_the_earlier_result(tmp_path):
    """A full disk, simulated with a file-size limit: the new result.json cannot be
    written, and the valid one from an earlier run is still there, whole."""
    from conftest import run_cli, run_python

    assert run_cli("scenario=softmax_overflow", f"hydra.run.dir={tmp_path}").returncode == 0
    earlier = (tmp_path / "result.json").read_bytes()
    assert len(earlier) > 16 * 1024  # bigger than the limit
    proc = run_python("-c", UNDER_A_16_KIB_FILE_LIMIT, "scenario=softmax_overflow", "seed=1",
                      f"hydra.run.dir={tmp_path}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"could not write {tmp_path / 'result.json'}:" in lines[-1] and "left as it was" in lines[-1]
    assert (tmp_path / "result.json").read_bytes() == earlier
    assert json.loads(earlier)["config"]["seed"] == 0
    assert not list(tmp_path.glob(".result.json.*"))  # no temporary file left behind


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "nanlab", "mode=list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` that has read enough
    assert proc.stderr.read() == b"" and proc.wait() == 141


def test_ctrl_c_is_one_line_and_exit_130_and_a_redirected_run_draws_no_bar(tmp_path):
    from conftest import run_cli

    def interrupt_once_training(pid):
        # Hydra writes the run's .hydra folder just before nanlab's run starts; six
        # seconds later a bar (shown after 5 s of a variant) would have been drawn had
        # stderr been a terminal; redirected, it must stay out of the log.
        deadline = time.monotonic() + 60
        while not (tmp_path / ".hydra").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(6)
        with contextlib.suppress(ProcessLookupError):  # a run that failed early: the asserts say how
            os.kill(pid, signal.SIGINT)

    proc = run_cli("scenario=tanh_explosion", "steps=100000000", f"hydra.run.dir={tmp_path}",
                   started=interrupt_once_training, timeout=180)
    assert (tmp_path / ".hydra").is_dir()
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.rstrip() == "nanlab: interrupted" and "\r" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("launcher,extra", [("joblib", "parallel"), ("submitit_local", "cluster")])
def test_a_missing_launcher_plugin_names_its_extra(tmp_path, launcher, extra):
    """An empty regular package named hydra_plugins shadows the installed namespace
    package, as if the launcher's extra had never been installed."""
    import os

    (tmp_path / "hydra_plugins").mkdir()
    (tmp_path / "hydra_plugins" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "nanlab", "-m", f"hydra/launcher={launcher}", "steps=2",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"nanlab: error: hydra/launcher={launcher}: Hydra's {launcher} launcher is not installed; "
                        f"install the {extra} extra: {install_hint(extra)}")


def test_the_install_hint_fits_how_nanlab_was_installed(tmp_path, monkeypatch):
    import json
    import shlex
    import shutil
    from importlib import metadata
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    records = [json.loads(d.read_text("direct_url.json") or "{}") for d in metadata.distributions(name="nanlab")]
    if not any(r.get("dir_info", {}).get("editable") for r in records):
        pytest.skip("nanlab is not installed editable here")
    # python on PATH is another interpreter (a venv not activated): this one is named
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/python")
    monkeypatch.chdir(repo)  # a clone, as the README sets it up: the command it gives
    this = shlex.quote(sys.executable)
    assert install_hint("keras") == f"{this} -m pip install -e '.[keras]'"
    monkeypatch.chdir(tmp_path)  # elsewhere: the same folder, named
    assert install_hint("keras,jax") == f"{this} -m pip install -e '{repo}[keras,jax]'"
    # an activated venv: python is this interpreter
    monkeypatch.setattr(shutil, "which", lambda name: sys.executable)
    assert install_hint("keras") == f"python -m pip install -e '{repo}[keras]'"


class _Installed:
    """A nanlab distribution as importlib.metadata gives it: its direct_url.json and Requires-Dist."""

    def __init__(self, direct_url, requires=()):
        self.direct_url, self.requires = direct_url, list(requires)

    def read_text(self, name):
        return self.direct_url if name == "direct_url.json" else None


REQUIRES = ["torch==2.13.0", 'keras<4,>=3.10; extra == "keras"', 'jax[cpu]>=0.4.30; extra == "jax"',
            'pytest>=7; extra == "test"']


@pytest.mark.parametrize("direct_url", [None, '{"url": "file:///wheels/nanlab-0.1.0-py3-none-any.whl", '
                                        '"archive_info": {}}', '{"url": "https://example.org/nanlab.git", '
                                        '"vcs_info": {"vcs": "git"}}'])
def test_an_install_hint_without_a_clone_names_the_extras_requirements(monkeypatch, direct_url):
    import shutil
    from importlib import metadata

    monkeypatch.setattr(shutil, "which", lambda name: sys.executable)
    monkeypatch.setattr(metadata, "distributions", lambda name: [_Installed(direct_url, REQUIRES)])
    assert install_hint("keras") == "python -m pip install 'keras<4,>=3.10'"
    assert install_hint("keras,jax") == "python -m pip install 'keras<4,>=3.10' 'jax[cpu]>=0.4.30'"
    monkeypatch.setattr(metadata, "distributions", lambda name: [])  # a source tree on PYTHONPATH
    assert install_hint("keras") == "python -m pip install 'nanlab[keras]'"


@pytest.mark.parametrize("direct_url", ["null", '{"dir_info": null, "url": null}', "not json"])
def test_the_install_hint_never_raises(monkeypatch, direct_url):
    import os
    from importlib import metadata

    def gone():
        raise FileNotFoundError("the current folder was deleted")

    monkeypatch.setattr(metadata, "distributions", lambda name: [_Installed(direct_url)])
    hint = install_hint("keras")
    assert hint.endswith("install 'nanlab[keras]'"), hint
    monkeypatch.setattr(metadata, "distributions",
                        lambda name: [_Installed('{"dir_info": {"editable": true}, "url": "file:///src/nanlab"}')])
    monkeypatch.setattr(os, "getcwd", gone)
    assert install_hint("keras") == "pip install 'nanlab[keras]'"


@pytest.mark.parametrize("delay", [0.15, 0.3, 0.6, 1.0])
def test_ctrl_c_during_start_up_is_one_line(tmp_path, delay):
    """Ctrl-C while the CLI is still importing (before any Python code of ours could
    catch KeyboardInterrupt) is the same line and status as later on."""
    proc = subprocess.Popen([sys.executable, "-m", "nanlab", "scenario=softmax_overflow", f"hydra.run.dir={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal came")
    if "nanlab/__main__.py" not in err and err.rstrip().endswith("KeyboardInterrupt"):
        # Python's own start-up, or `import nanlab` before nanlab/__main__.py runs (a
        # few ms): Python's handler, as for any Python program; only a loaded machine
        # ever lands a signal there.
        pytest.skip("the signal came before nanlab/__main__.py ran")
    if proc.returncode == -signal.SIGINT:
        # Killed by the signal: silently, where the interpreter itself had not started; or
        # after our line, where CPython had recorded the KeyboardInterrupt as unhandled
        # (its flag for one that escapes code run through PyRun_String, as extension
        # modules' embedded Python is, outlives our SystemExit(130)). A shell reports
        # both as status 130; the line is still the one line.
        assert err in ("", "nanlab: interrupted\n"), err
        return
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "nanlab: interrupted", err
    assert "Traceback" not in err


@pytest.mark.parametrize("ctrl_c", [True, False])
def test_an_error_that_a_ctrl_c_turned_into_is_still_the_interruption(monkeypatch, capsys, ctrl_c):
    """Hydra cut short by Ctrl-C may raise a config error of its own instead of the
    KeyboardInterrupt; after a Ctrl-C that error is the interruption (exit 130), and
    without one it is the config error it says (exit 2)."""
    from nanlab import cli
    from nanlab.errors import ConfigError

    def interrupted_compose(argv):
        try:
            if ctrl_c:
                cli._on_sigint(signal.SIGINT, None)
        except KeyboardInterrupt:
            pass
        raise ConfigError("defaults", "?", "not a nanlab config key")

    monkeypatch.setattr(cli, "_sigint_received", False)
    monkeypatch.setattr(cli.config, "check_command_line", interrupted_compose)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own SIGINT handler
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    if ctrl_c:
        assert exit_info.value.code == 130 and err == "nanlab: interrupted\n"
    else:
        assert exit_info.value.code == 2 and err == "nanlab: error: defaults=?: not a nanlab config key\n"
    with pytest.raises(SystemExit) as exit_info:  # a mode's own error after the Ctrl-C, inside the app
        cli.fail(ConfigError("steps", -1, "must be an integer >= 0"))
    assert exit_info.value.code == (130 if ctrl_c else 2)


BROKEN_RESULT_FILES = {
    "empty": b"", "truncated": b'{"scenario": "softmax_overflow", "variants": [', "binary": b"\xff\xfe\x00\x01",
    "a_list": b"[1, 2, 3]", "wrong_types": b'{"scenario": 3, "variants": "no", "claims": 7}',
    "huge_number": b'{"scenario": "x", "seconds": 1e999, "variants": [{"name": 1e999}]}',
    "deep": b"[" * 100000 + b"]" * 100000, "null": b"null",
}


@pytest.mark.parametrize("form", sorted(BROKEN_RESULT_FILES))
def test_a_report_over_a_broken_result_json_is_one_line(cli, tmp_path, form):
    (tmp_path / "results" / "softmax_overflow").mkdir(parents=True)
    (tmp_path / "results" / "softmax_overflow" / "result.json").write_bytes(BROKEN_RESULT_FILES[form])
    proc = cli("mode=report", "report.run=false", f"report.results={tmp_path / 'results'}",
               f"hydra.run.dir={tmp_path / 'out'}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "softmax_overflow/result.json: cannot be read as a nanlab result.json" in lines[0]


def test_a_folder_named_result_json_is_a_read_problem(cli, tmp_path):
    (tmp_path / "results" / "softmax_overflow" / "result.json").mkdir(parents=True)
    proc = cli("mode=report", "report.run=false", f"report.results={tmp_path / 'results'}",
               f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "cannot be read as a nanlab result.json (IsADirectoryError" in proc.stderr
