"""The CLI end to end: report, result.json, determinism, list, lazy imports."""
import subprocess
import sys

from conftest import read_json

from nanlab.lab.result import strip_timing


def test_run_writes_report_and_result(cli, tmp_path):
    proc = cli("scenario=softmax_overflow", f"hydra.run.dir={tmp_path}", "plot=true")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "hand_softmax" in out and "reproduced" in out and "Why:" in out and "result.json" in out
    assert "NaN first in forward: aten.exp" not in out  # exp overflows to inf first
    assert "Inf first in forward: aten.exp" in out
    data = read_json(tmp_path / "result.json")
    assert data["scenario"] == "softmax_overflow" and data["reproduced"] is True and data["fixed"] is True
    assert data["config"]["optimizer"]["lr"] == 0.001
    for v in data["variants"]:
        assert {"name", "role", "lossy", "finite", "first_nonfinite", "losses", "final_loss", "learned"} <= set(v)
    broken = data["variants"][0]
    assert broken["first_nonfinite"]["step"] == 0 and broken["first_nonfinite"]["origin"]["op"] == "aten.exp"
    assert (tmp_path / "losses.png").stat().st_size > 1000


def test_same_config_same_result(cli, tmp_path):
    runs = []
    for sub in ("a", "b"):
        proc = cli("scenario=tanh_explosion", "steps=30", f"hydra.run.dir={tmp_path / sub}")
        assert proc.returncode == 0, proc.stderr
        runs.append(strip_timing(read_json(tmp_path / sub / "result.json")))
    assert runs[0] == runs[1]


def test_seed_changes_the_numbers():
    import nanlab

    a = nanlab.run("unscaled_sgd", "steps=5", "seed=1").to_dict()
    b = nanlab.run("unscaled_sgd", "steps=5", "seed=2").to_dict()
    assert a["variants"][1]["losses"] != b["variants"][1]["losses"]


def test_list_prints_every_scenario_without_torch(cli):
    """Each listed line is the module's own SUMMARY, as importing the module gives it."""
    import importlib

    from nanlab.lab import registry

    proc = cli("mode=list")
    assert proc.returncode == 0
    lines = dict(line.split(None, 1) for line in proc.stdout.strip().splitlines())
    assert set(lines) == set(registry.builtin_names())
    for name, summary in lines.items():
        assert summary == importlib.import_module(f"nanlab.scenarios.{name}").SUMMARY


def test_cli_start_imports_no_torch_matplotlib_or_scenarios():
    code = ("import sys, nanlab.cli, nanlab.config.compose; nanlab.config.compose.setup();"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','matplotlib') or m.startswith('nanlab.scenarios.')];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_api_returns_the_same_result_as_the_cli(cli, tmp_path):
    import nanlab

    proc = cli("scenario=bce_log_zero", "steps=10", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0
    api = nanlab.run("bce_log_zero", steps=10)
    assert strip_timing(api.to_dict()) == strip_timing(read_json(tmp_path / "result.json"))


def test_hydra_mode_probe_is_skipped_only_where_it_can_only_answer_none(monkeypatch):
    """The CLI answers Hydra's hydra.mode probe without composing. That is right only
    while nanlab's config leaves hydra.mode unset: Hydra's own probe, on the config as
    a run and as a multirun composes it, must answer None. A command line that sets
    hydra.mode keeps Hydra's probe."""
    import hydra
    from hydra._internal.hydra import Hydra
    from hydra.types import RunMode

    from nanlab import cli
    from nanlab.config.compose import CONFIG_MODULE, setup

    setup()
    with hydra.initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        from hydra.core.global_hydra import GlobalHydra

        loader = GlobalHydra.instance().config_loader()
        for run_mode in (RunMode.RUN, RunMode.MULTIRUN):
            cfg = loader.load_configuration("config", ["scenario=tanh_explosion", "optimizer.lr=0.1,1"], run_mode,
                                            validate_sweep_overrides=False)
            assert cfg.hydra.mode is None, run_mode
    original = Hydra.get_mode
    monkeypatch.setattr(Hydra, "get_mode", original)
    cli.skip_hydra_mode_probe(["scenario=tanh_explosion", "hydra.mode=MULTIRUN"])
    assert Hydra.get_mode is original
    cli.skip_hydra_mode_probe(["scenario=tanh_explosion"])
    assert Hydra.get_mode is not original and Hydra.get_mode(None, "config", ["x=1"]) is None


def test_hydra_mode_on_the_command_line_still_makes_a_multirun(cli, tmp_path):
    proc = cli("hydra.mode=MULTIRUN", "scenario=unscaled_sgd", "steps=2", "optimizer.lr=1e-10,2e-10",
               f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "[0] " in proc.stdout and "[1] " in proc.stdout, proc.stdout
    assert len(list(tmp_path.glob("*/result.json"))) == 2
