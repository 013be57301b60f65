"""``python -m nanlab``: the Hydra app.

Start-up stays light: torch, matplotlib and the scenario module are imported only
by the modes that use them. Any config problem, from Hydra's composition or from
our own range checks, ends as one ``nanlab: error:`` line and exit status 2.
"""
from __future__ import annotations

import os
import sys

import hydra

from nanlab import config, registry
from nanlab.errors import ConfigError
from nanlab.scenario import ContractError

EXIT_BAD_INPUT = 2


def fail(err) -> None:
    print(f"nanlab: error: {err}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


@hydra.main(version_base="1.3", config_path="pkg://nanlab.conf", config_name="config")
def app(cfg) -> int:
    # SystemExit passes through Hydra's job runner untouched; an exception would
    # make it print its own error banner first.
    try:
        code = _run_mode(cfg)
    except (ConfigError, ContractError) as err:
        fail(err)
    if code:  # Hydra drops the task's return value; a failed check must still exit 1
        sys.exit(code)


# Modes other than run and list: module and function, imported only when chosen.
# Each takes the finalized config and the run dir and returns the exit status.
MODE_RUNNERS = {
    "claims": ("nanlab.claims", "run_claims"),
    "check": ("nanlab.kernels.cli", "run_check"),
    "report": ("nanlab.handout", "run_report"),
}


def _run_mode(cfg) -> int:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    mode = cfg.mode.value if hasattr(cfg.mode, "value") else str(cfg.mode)
    if mode == "list":
        for name in registry.names():
            print(f"{name:<24} {registry.summary(name)}")
        return 0
    cfg = config.finalize(cfg)
    if mode in MODE_RUNNERS:
        import importlib

        module, function = MODE_RUNNERS[mode]
        return getattr(importlib.import_module(module), function)(cfg, run_dir)
    from pathlib import Path

    from nanlab import report
    from nanlab.runner import run_scenario

    result = run_scenario(cfg)
    files = report.write(result, Path(run_dir), cfg.plot)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # One line per job; the sweep's summary table comes at the end (nanlab.sweep).
        print(f"[{hydra_cfg.job.num}] {' '.join(hydra_cfg.overrides.task)}: {report.one_line(result)}")
    else:
        print(report.render(result, files))
    return 0


def main() -> None:
    # Let Hydra's errors reach us as exceptions rather than printed tracebacks.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    config.setup()
    try:
        code = app()
    except Exception as exc:
        err = config.explain(exc, sys.argv[1:])
        if err is None:
            raise
        fail(err)
    sys.exit(code or 0)
