"""The terminal report of a framework run: one row per variant and framework, side by
side, scored by the same float64 exact loss. Torch-free (works on loaded results)."""
from __future__ import annotations

import textwrap

from nanlab.config.options import FRAMEWORKS
from nanlab.lab import verdicts
from nanlab.lab.result import ScenarioResult
from nanlab.reports.scenario_report import short_number, verdict_text


def first_op(result: ScenarioResult, variant) -> str:
    """The tracer's first op, or why there is none."""
    framework = result.config.get("framework", "torch")
    first = variant.first_nonfinite
    if first is None:
        return ""
    if first.event is not None:
        return first.event.describe()
    if framework == "torch" or FRAMEWORKS[framework].keras_backend == "torch":
        return "first op: the tracer's replay found none"
    return f"first op: not traced on {framework}"


def _versions(result: ScenarioResult) -> str:
    versions = result.config.get("framework_versions") or {}
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def render(results: dict) -> str:
    """``results``: {framework: ScenarioResult} for one scenario, in the order to show."""
    any_result = next(iter(results.values()))
    c = any_result.config
    out = [f"{any_result.scenario}: {any_result.summary}",
           f"config: optimizer={c['optimizer']['name']} lr={short_number(c['optimizer']['lr'])} clip={c['clip']['name']} "
           f"dtype={c['dtype']} steps={c['steps']} seed={c['seed']}; frameworks: {', '.join(results)}",
           "Every framework trains on the same data; each draws its own initial weights from the seed, so the "
           "start losses differ.", ""]
    header = f"  {'variant':<30} {'framework':<17} {'what happened':<26} {'exact loss start -> end':<24} verdict"
    out += [header, "  " + "-" * (len(header) - 2)]
    names = []
    for result in results.values():
        names += [v.name for v in result.variants if v.name not in names]
    for name in names:
        shown = False
        for framework, result in results.items():
            variant = next((v for v in result.variants if v.name == name), None)
            if variant is None:
                continue
            label = f"{name} ({variant.role}{'*' if variant.lossy else ''})" if not shown else ""
            exact = f"{short_number(variant.exact_loss_start)} -> {short_number(variant.exact_loss_end)}"
            out.append(f"  {label:<30} {framework:<17} {verdicts.what_happened(variant):<26} {exact:<24} {variant.verdict}")
            detail = first_op(result, variant)
            if variant.role == "myth" and variant.wrong:
                detail = (detail + "; " if detail else "") + (f"its loss reads {short_number(variant.losses[0])} where the "
                                                                f"exact loss is {short_number(variant.exact_loss_start)}")
            if detail:
                out.append(f"  {'':<30} {'':<17} {detail}")
            shown = True
    out.append("")
    out.append("Verdict by framework:")
    for framework, result in results.items():
        reproduced, fixed = verdicts.explain(result)
        out.append(f"  {framework:<17} {verdict_text(reproduced)}.")
        out.append(f"  {'':<17} {verdict_text(fixed)}.")
    probes = _differing_probes(results)
    if probes:
        out += ["", "Probes by framework:"]
        for key, values in probes.items():
            out.append(f"  {key}:")
            for framework, value in values.items():
                out.append(f"    {framework:<17} {short_number(value) if not isinstance(value, (list, dict)) else value}")
    claims = [(f, claim) for f, r in results.items() for claim in r.claims]
    if claims:
        out += ["", "Claims by framework (frameworks that measured the same thing share a line):"]
        for text in dict.fromkeys(claim.claim for _, claim in claims):
            out.append(f"  {text}")
            groups: dict = {}
            for framework, claim in claims:
                if claim.claim == text:
                    groups.setdefault((claim.verdict.value, claim.evidence), []).append(framework)
            for (verdict, evidence), frameworks in groups.items():
                out.append(f"    [{verdict}] {', '.join(frameworks)}")
                out += textwrap.wrap(evidence, 96, initial_indent=" " * 8, subsequent_indent=" " * 8)
    out += ["", "Versions: " + "; ".join(f"{f}: {_versions(r)}" for f, r in results.items() if _versions(r))]
    return "\n".join(out)


def _differing_probes(results: dict) -> dict:
    """Probe words (not the booleans and numbers behind them) that several frameworks measured."""
    keys = []
    for result in results.values():
        keys += [k for k, v in result.probes.items() if isinstance(v, str) and k not in keys]
    table = {}
    for key in keys:
        values = {f: r.probes[key] for f, r in results.items() if key in r.probes}
        if len(values) > 1 and len(set(map(str, values.values()))) > 1:
            table[key] = values
    return table


def _cell(variant) -> str:
    """What one variant did in one framework: where it went non-finite, or its verdict."""
    first = variant.first_nonfinite
    if first is not None:
        return f"{first.kind_word} at step {first.step}"
    return variant.verdict


def framework_matrix(results: dict, frameworks: list[str]) -> str:
    """A Markdown table: per scenario and variant, what happened in each framework.
    ``results``: {framework: {scenario: ScenarioResult}}; '-' where a framework has no
    such variant (its recipe leaves it out, or adds one of its own)."""
    scenarios = list(dict.fromkeys(name for f in frameworks for name in results.get(f, {})))
    lines = ["| scenario | variant | " + " | ".join(frameworks) + " |", "|---|---|" + "---|" * len(frameworks)]
    for scenario in sorted(scenarios):
        by_framework = {f: results.get(f, {}).get(scenario) for f in frameworks}
        names = list(dict.fromkeys(v.name for r in by_framework.values() if r for v in r.variants))
        for i, name in enumerate(names):
            role = next(v.role for r in by_framework.values() if r for v in r.variants if v.name == name)
            cells = []
            for f in frameworks:
                found = [v for v in by_framework[f].variants if v.name == name] if by_framework[f] else []
                cells.append(_cell(found[0]) if found else "-")
            lines.append(f"| {scenario if i == 0 else ''} | {name} ({role}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
