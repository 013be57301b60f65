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


def _run_mode(cfg) -> int:
    from hydra.core.hydra_config import HydraConfig

    run_dir = HydraConfig.get().runtime.output_dir
    mode = cfg.mode.value if hasattr(cfg.mode, "value") else str(cfg.mode)
    if mode == "list":
        for name in registry.names():
            print(f"{name:<24} {registry.summary(name)}")
        return 0
    cfg = config.finalize(cfg)
    if mode == "claims":
        from nanlab.claims import run_claims

        return run_claims(cfg, run_dir)
    if mode == "check":
        from nanlab.kernels.cli import run_check

        return run_check(cfg, run_dir)
    from pathlib import Path

    from nanlab import report
    from nanlab.runner import run_scenario

    result = run_scenario(cfg)
    files = report.write(result, Path(run_dir), cfg.plot)
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
