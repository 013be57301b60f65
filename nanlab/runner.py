"""Run a scenario: every variant through the shared loop, then verdicts and claims."""
from __future__ import annotations

import time

from omegaconf import OmegaConf

from nanlab import registry, verdicts
from nanlab.build import DTYPES, resolve_device
from nanlab.loop import train
from nanlab.result import ClaimResult, ScenarioResult, Verdict
from nanlab.scenario import Context, ContractError


def run_scenario(cfg) -> ScenarioResult:
    """``cfg`` is a finalized config (see nanlab.config.finalize)."""
    started = time.perf_counter()
    scenario = registry.load(cfg.scenario.name)
    ctx = Context(cfg, resolve_device(cfg.device), DTYPES[cfg.dtype])
    raw = scenario.make_data(ctx)

    def run_variant(variant):
        return verdicts.judge_learning(train(scenario, variant, cfg, raw, ctx), scenario.learn)

    variants = [train(scenario, v, cfg, raw, ctx) for v in scenario.variants]
    reproduced, fixed = verdicts.judge(variants, scenario.failure, scenario.learn)
    probes = scenario.probes(ctx, run_variant) if scenario.probes else {}
    result = ScenarioResult(
        scenario=scenario.name, summary=scenario.summary, explanation=scenario.explanation,
        failure=scenario.failure, config=OmegaConf.to_container(cfg), reproduced=reproduced, fixed=fixed,
        variants=variants, probes=probes,
    )
    for claim in scenario.claims:
        verdict, evidence = claim.decide(result)
        if not isinstance(verdict, Verdict):
            raise ContractError(scenario.name, f"a claim must decide with a nanlab.result.Verdict, not {verdict!r}")
        result.claims.append(ClaimResult(scenario.name, claim.text, verdict, evidence, claim.source))
    result.seconds = time.perf_counter() - started
    return result


def run(scenario: str, *overrides: str, **options) -> ScenarioResult:
    """``nanlab.run("softmax_overflow", "optimizer=adam", steps=20)``.

    Positional overrides use the CLI's syntax; keyword options become ``key=value``
    (use a dict for dotted keys: ``**{"optimizer.lr": 0.1}``).
    """
    from nanlab.config import compose

    args = [f"scenario={scenario}", *overrides, *(f"{k}={v}" for k, v in options.items())]
    return run_scenario(compose(args))
