"""Run a scenario: every variant through the shared loop, then verdicts and claims."""
from __future__ import annotations

import contextlib
import time

from omegaconf import OmegaConf

from nanlab.lab import registry
from nanlab.lab import verdicts
from nanlab.lab.build import DTYPES, resolve_device
from nanlab.config.compose import changed_settings
from nanlab.errors import ConfigError
from nanlab.lab.loop import train
from nanlab.lab.result import ClaimResult, ScenarioResult, Verdict
from nanlab.lab.scenario import Context, ContractError


def chosen_variants(scenario, wanted) -> list:
    """The variants ``variant=`` names (a name or a list; None for all), in the scenario's order."""
    if wanted is None:
        return list(scenario.variants)
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    known = [v.name for v in scenario.variants]
    for name in names:
        if name not in known:
            raise ConfigError("variant", name, f"not a variant of {scenario.name}; choose from {', '.join(known)}")
    if not names:
        raise ConfigError("variant", "[]", "name at least one variant, or leave variant out to run them all")
    return [v for v in scenario.variants if v.name in names]


@contextlib.contextmanager
def _knobs_blamed(name: str, changed: dict):
    """A scenario that crashes on data knobs a user changed (``scenario.data.n=0``)
    gets one config error naming those knobs. At its own knobs a crash is a bug in
    the scenario, and keeps its traceback."""
    knobs = {k: v[1] for k, v in changed.items() if k.startswith("scenario.data.")}
    try:
        yield
    except (RuntimeError, ValueError, IndexError, TypeError, ZeroDivisionError) as err:
        if not knobs:
            raise
        key, value = next(iter(knobs.items())) if len(knobs) == 1 else ("scenario.data", knobs)
        raise ConfigError(key, value, f"{name} cannot run with {'this' if len(knobs) == 1 else 'these'} data knob "
                          f"value ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from err


def decide_claims(scenario, result: ScenarioResult, all_run: bool) -> list:
    """Each claim's verdict. A run at other training settings than the scenario's, or
    with variants left out, does not decide the claims: it says so instead."""
    changed = verdicts.claim_settings_changed(result.changed)
    if changed:
        reason = (f"not decided at these settings: the claim is about {result.settings_text(0)}, "
                  f"this run used {result.settings_text(1)}")
    elif not all_run:
        reason = "not decided: variant= ran only " + ", ".join(v.name for v in result.variants)
    claims = []
    for claim in scenario.claims:
        if changed or not all_run:
            verdict, evidence = Verdict.not_decided, reason
        else:
            verdict, evidence = claim.decide(result)
            if not isinstance(verdict, Verdict):
                raise ContractError(scenario.name, f"a claim must decide with a nanlab.lab.result.Verdict, not {verdict!r}")
        claims.append(ClaimResult(scenario.name, claim.text, verdict, evidence, claim.source,
                                  str(result.config.get("framework", "torch"))))
    return claims


def run_scenario(cfg, overrides=None) -> "ScenarioResult":
    """``cfg`` is a finalized config (see nanlab.config.compose.finalize); ``overrides``, the
    command-line overrides it was composed from, when known."""
    started = time.perf_counter()
    scenario = registry.load(cfg.scenario.name)
    chosen = chosen_variants(scenario, cfg.get("variant"))
    all_run = len(chosen) == len(scenario.variants)
    ctx = Context(cfg, resolve_device(cfg.device), DTYPES[cfg.dtype])
    changed = changed_settings(cfg, overrides)
    with _knobs_blamed(scenario.name, changed):
        raw = scenario.make_data(ctx)

        def run_variant(variant):
            return verdicts.judge_learning(train(scenario, variant, cfg, raw, ctx), scenario.learn)

        variants = [train(scenario, v, cfg, raw, ctx) for v in chosen]
        probes = scenario.probes(ctx, run_variant) if scenario.probes else {}
    reproduced, fixed = verdicts.judge(variants, scenario.failure, scenario.learn, all_run)
    result = ScenarioResult(
        scenario=scenario.name, summary=scenario.summary, explanation=scenario.explanation,
        failure=scenario.failure, config=OmegaConf.to_container(cfg), reproduced=reproduced, fixed=fixed,
        variants=variants, probes=probes, changed=changed,
    )
    result.claims = decide_claims(scenario, result, all_run)
    result.seconds = time.perf_counter() - started
    return result


def run(scenario: str, *overrides: str, **options) -> "ScenarioResult":
    """``nanlab.run("softmax_overflow", "optimizer=adam", steps=20)``.

    Positional overrides use the CLI's syntax; keyword options become ``key=value``
    (use a dict for dotted keys: ``**{"optimizer.lr": 0.1}``).
    """
    from nanlab.config.compose import check_command_line, compose

    from nanlab.lab import threads

    args = [f"scenario={scenario}", *overrides, *(f"{k}={v}" for k, v in options.items())]
    check_command_line(args)
    cfg = compose(args)
    with threads.use(cfg.get("threads")):
        return run_scenario(cfg, args)
