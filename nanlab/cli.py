"""``python -m nanlab``: the Hydra app.

Start-up stays light: torch, matplotlib and the scenario module are imported only
by the modes that use them. Any config problem, from Hydra's composition or from
our own range checks, ends as one ``nanlab: error:`` line and exit status 2.
"""
from __future__ import annotations

import os
import signal
import sys

import hydra

from nanlab.config import compose as config
from nanlab.lab import registry
from nanlab.errors import ConfigError
from nanlab.lab.scenario import ContractError

EXIT_BAD_INPUT = 2


EXIT_FAILED = 1  # a check that failed, or a result that could not be written
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as `head` closing the pipe ends other tools


# Set by the SIGINT handler. Code that Ctrl-C interrupts may turn the KeyboardInterrupt
# into an error of its own (one seen: a Hydra compose cut short became "defaults=?: not
# a nanlab config key"), so any error after a Ctrl-C is reported as the interruption.
_sigint_received = False


def _on_sigint(signum, frame) -> None:
    global _sigint_received
    _sigint_received = True
    raise KeyboardInterrupt


def fail(err, code: int = EXIT_BAD_INPUT) -> None:
    if _sigint_received:  # the error is what a Ctrl-C turned into (see _on_sigint)
        _interrupted()
    print(f"nanlab: error: {err}", file=sys.stderr)
    sys.exit(code)


def _interrupted() -> None:
    print("nanlab: interrupted", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def _quiet_broken_pipe() -> None:
    """The reader went away (`mode=list | head`): stop quietly, as Unix tools do, and
    keep Python's final flush of stdout from raising again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(EXIT_BROKEN_PIPE)


def _write_failure(err: OSError) -> str:
    where = f" {err.filename}" if err.filename else ""
    return f"could not write{where}: {err.strerror or err} (an earlier file of that name is left as it was)"


@hydra.main(version_base="1.3", config_path="pkg://nanlab.conf", config_name="config")
def app(cfg) -> int:
    # SystemExit passes through Hydra's job runner untouched; an exception would
    # make it print its own error banner first.
    try:
        code = _run_mode(cfg)
    except (ConfigError, ContractError) as err:
        _discard_run_dir()
        fail(err)
    except BrokenPipeError:
        _quiet_broken_pipe()
    except KeyboardInterrupt:
        _interrupted()
    except OSError as err:  # a full disk, a folder that cannot be written
        fail(_write_failure(err), EXIT_FAILED)
    if code:  # Hydra drops the task's return value; a failed check must still exit 1
        sys.exit(code)


HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def _discard_run_dir() -> None:
    """A single run refused at validation wrote nothing: take back the folder Hydra made
    for it (its .hydra/ copies and an empty log), so no empty outputs/<scenario>/<time>/
    is left. Anything else in the folder keeps it, and it stays as it was. A multirun's
    job folder stays: the sweep summary reports the refused job from it."""
    import contextlib
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from hydra.types import RunMode

    with contextlib.suppress(Exception):
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.RUN:  # a multirun's summary reads a refused job from its folder
            return
        run_dir = Path(hydra_cfg.runtime.output_dir)
        meta = run_dir / ".hydra"
        log = run_dir / f"{hydra_cfg.job.name}.log"
        if any(p not in (meta, log) for p in run_dir.iterdir()) or any(
                p.name not in HYDRA_FILES for p in meta.iterdir()) or (log.exists() and log.stat().st_size):
            return
        for p in meta.iterdir():
            p.unlink()
        meta.rmdir()
        log.unlink(missing_ok=True)
        run_dir.rmdir()
        parent = run_dir.parent  # outputs/<scenario>/ and outputs/, when this run made them
        if parent.parent.name == "outputs" and not any(parent.iterdir()):
            parent.rmdir()
            if not any(parent.parent.iterdir()):
                parent.parent.rmdir()


# Modes other than run and list: module and function, imported only when chosen.
# Each takes the finalized config and the run dir and returns the exit status.
MODE_RUNNERS = {
    "claims": ("nanlab.lab.claims", "run_claims"),
    "check": ("nanlab.kernels.cli", "run_check"),
    "report": ("nanlab.reports.handout", "run_report"),
    "sweep": ("nanlab.sweeps.grid", "run_sweep"),
    "boundary": ("nanlab.sweeps.boundary", "run_boundary"),
}


# The modes that run chosen variants of one scenario.
VARIANT_MODES = ("run", "sweep")


def _run_mode(cfg) -> int:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    mode = cfg.mode.value if hasattr(cfg.mode, "value") else str(cfg.mode)
    cfg = config.finalize(cfg)  # every mode range-checks every key, mode=list included
    if cfg.get("variant") is not None and mode not in VARIANT_MODES:
        raise ConfigError("variant", cfg.variant, f"applies to mode={' and mode='.join(VARIANT_MODES)}, "
                          f"not mode={mode}")
    if mode == "list":
        framework = str(cfg.framework)  # finalized: plain strings
        if framework != "torch":  # which scenarios run where: read from source, nothing imported
            from nanlab.frameworks import runs_on

            for name in registry.names():
                where = runs_on(name)
                if framework == "all" or framework in where:
                    print(f"{name:<24} {', '.join(where)}")
            return 0
        for name in registry.names():
            print(f"{name:<24} {registry.summary(name)}")
        return 0
    from nanlab.lab import threads

    with threads.use(cfg.get("threads")):  # before the mode imports or runs anything of torch's
        return _run_finalized(cfg, mode, run_dir, hydra_cfg)


def _run_finalized(cfg, mode: str, run_dir: str, hydra_cfg) -> int:
    from hydra.types import RunMode

    if cfg.framework != "torch" and mode not in ("run", "claims"):
        raise ConfigError("framework", cfg.framework, f"applies to mode=run and mode=claims, not mode={mode}")
    if cfg.framework != "torch" and mode == "run":  # Keras and JAX run in worker processes (nanlab.frameworks)
        from nanlab.frameworks.cli import run_frameworks_mode

        return run_frameworks_mode(cfg, run_dir)
    if mode in MODE_RUNNERS:
        import importlib

        module, function = MODE_RUNNERS[mode]
        return getattr(importlib.import_module(module), function)(cfg, run_dir)
    from pathlib import Path

    from nanlab.reports import scenario_report as report
    from nanlab.lab.runner import run_scenario

    result = run_scenario(cfg, list(hydra_cfg.overrides.task))
    files = report.write(result, Path(run_dir), cfg.plot)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # One line per job; the sweep's summary table comes at the end (nanlab.sweeps.summary).
        print(f"[{hydra_cfg.job.num}] {' '.join(hydra_cfg.overrides.task)}: {report.one_line(result)}")
    else:
        print(report.render(result, files))
    return 0


def skip_hydra_mode_probe(args) -> None:
    """Hydra composes the whole config once only to read ``hydra.mode``, then again to
    run: one compose (0.13 s warm, measured) of every command. nanlab's config leaves ``hydra.mode`` unset (a
    test checks), so unless the command line sets it, that first compose answers None,
    which is what this answers, without composing."""
    if any(arg.lstrip("+~").startswith("hydra.mode") for arg in args):
        return
    from hydra._internal.hydra import Hydra

    Hydra.get_mode = lambda self, config_name, overrides: None


def main() -> None:
    # Let Hydra's errors reach us as exceptions rather than printed tracebacks.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        signal.signal(signal.SIGINT, _on_sigint)  # from here on, KeyboardInterrupt
        config.setup()
        config.check_command_line(sys.argv[1:])
        skip_hydra_mode_probe(sys.argv[1:])
        code = app()
    except KeyboardInterrupt:
        _interrupted()
    except BrokenPipeError:
        _quiet_broken_pipe()
    except Exception as exc:
        if _sigint_received:  # not even explained: a Ctrl-C's leftovers are no traceback
            _interrupted()
        err = config.explain(exc, config.command_overrides(sys.argv[1:]))
        if err is not None:
            fail(err)
        # Hydra's own missing-config errors are IOErrors too; they were explained above.
        if isinstance(exc, OSError) and exc.errno is not None:  # the run dir or its log file
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}cannot create the output folder or write there ({type(exc).__name__}: "
                 f"{exc.strerror or exc}); choose another with hydra.run.dir=PATH (or hydra.sweep.dir=PATH with -m)")
        raise
    sys.exit(code or 0)
