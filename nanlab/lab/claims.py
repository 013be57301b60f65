"""mode=claims: run every scenario, then tabulate the claims they decide."""
from __future__ import annotations

import dataclasses
import sys
import textwrap
from collections import Counter
from pathlib import Path

from nanlab import jsonio
from nanlab.lab import registry, runner
from nanlab.config.compose import compose
from nanlab.lab.result import ClaimResult, Verdict
from nanlab.lab.scenario import ContractError

CLAIM_KEYS = ("scenario", "claim", "verdict", "evidence", "framework")


def collect_claims(seed: int = 0, device: str = "cpu") -> list[ClaimResult]:
    """Every scenario at its defaults (plus seed and device); their claims in order.
    A scenario module that breaks the contract is skipped with one warning line."""
    rows = []
    for name in registry.names():
        try:
            overrides = [f"scenario={name}", f"seed={seed}", f"device={device}"]
            result = runner.run_scenario(compose(overrides), overrides)
        except ContractError as err:
            print(f"nanlab: warning: skipping scenario {name}: {err}", file=sys.stderr)
            continue
        rows += result.claims
    return rows


def render_table(rows: list[ClaimResult]) -> str:
    lines = [f"{'scenario':<24} {'verdict':<10} claim", "-" * 100]
    for row in rows:
        lines.append(f"{row.scenario:<24} {row.verdict.value:<10} {row.claim}")
        lines += textwrap.wrap(row.evidence, 96, initial_indent=" " * 36, subsequent_indent=" " * 36)
    counts = Counter(row.verdict for row in rows)
    lines.append("")
    shown = [v for v in Verdict if v is not Verdict.not_decided or counts.get(v)]
    lines.append(f"{len(rows)} claims: " + ", ".join(f"{counts.get(v, 0)} {v.value}" for v in shown))
    return "\n".join(lines)


def note_differences(rows: list[ClaimResult]) -> list[ClaimResult]:
    """A claim decided differently in different frameworks says so in each row's
    evidence: which verdict held where. Rows that were not decided take no part."""
    by_claim: dict = {}
    for row in rows:
        if row.verdict is not Verdict.not_decided:
            by_claim.setdefault((row.scenario, row.claim), []).append(row)
    out = []
    for row in rows:
        decided = by_claim.get((row.scenario, row.claim), [])
        verdicts = dict.fromkeys(r.verdict for r in decided)
        if row.verdict is not Verdict.not_decided and len(verdicts) > 1:
            where = "; ".join(f"{v.value} on " + ", ".join(r.framework for r in decided if r.verdict is v)
                              for v in verdicts)
            row = dataclasses.replace(row, evidence=f"{row.evidence} [differs by framework: {where}]")
        out.append(row)
    return out


def render_framework_table(rows: list[ClaimResult], frameworks: list[str]) -> str:
    """Claims down, frameworks across; '-' where a framework has no builder for the
    scenario. Evidence follows for each claim whose verdict differs by framework."""
    claims = list(dict.fromkeys((r.scenario, r.claim) for r in rows))
    cell = {(r.scenario, r.claim, r.framework): r for r in rows}
    width = max(12, *(len(f) + 2 for f in frameworks))
    lines = [f"{'scenario':<24} " + "".join(f"{f:<{width}}" for f in frameworks) + "claim", "-" * 120]
    for scenario, claim in claims:
        verdicts = [cell[(scenario, claim, f)].verdict.value if (scenario, claim, f) in cell else "-" for f in frameworks]
        lines.append(f"{scenario:<24} " + "".join(f"{v:<{width}}" for v in verdicts) + claim)
    differing = [(s, c) for s, c in claims
                 if len({cell[(s, c, f)].verdict for f in frameworks if (s, c, f) in cell} - {Verdict.not_decided}) > 1]
    if differing:
        lines += ["", "Where the frameworks disagree:"]
        for scenario, claim in differing:
            lines.append(f"{scenario}: {claim}")
            for f in frameworks:
                if (scenario, claim, f) in cell:
                    row = cell[(scenario, claim, f)]
                    lines += textwrap.wrap(f"{f} [{row.verdict.value}]: {row.evidence}", 116, initial_indent="    ",
                                           subsequent_indent="      ")
    lines.append("")
    for f in frameworks:
        counts = Counter(r.verdict for r in rows if r.framework == f)
        total = sum(counts.values())
        shown = [v for v in Verdict if counts.get(v)]
        lines.append(f"{f}: {total} claims" + (": " + ", ".join(f"{counts[v]} {v.value}" for v in shown) if total else ""))
    lines.append("'-': the scenario has no builder for that framework (python -m nanlab mode=list framework=all lists them)")
    return "\n".join(lines)


def write_claims(rows: list[ClaimResult], run_dir) -> Path:
    return jsonio.write_json(Path(run_dir) / "claims.json", [{k: row.to_dict()[k] for k in CLAIM_KEYS} for row in rows])


def collect_framework_claims(cfg) -> tuple[list[ClaimResult], list[str]]:
    """framework=all (or one framework): the claims of every scenario with a builder,
    measured in each framework's worker while torch runs every scenario here."""
    from nanlab.frameworks import chosen
    from nanlab.frameworks.run import supported, workers

    frameworks = chosen(str(cfg.framework))
    others = [f for f in frameworks if f != "torch"]
    cfgs = []
    for name in registry.names():
        try:
            if any(supported(name, f) for f in others):
                cfgs.append(compose([f"scenario={name}", f"seed={int(cfg.seed)}"]))
        except ContractError:
            continue  # the torch pass warns about a broken module, once

    def skipped(framework, scenario, err):
        print(f"nanlab: warning: skipping {scenario} on {framework}: {err}", file=sys.stderr)

    with workers(cfgs, others, on_error=skipped) as collect:
        rows = collect_claims(int(cfg.seed), str(cfg.device)) if "torch" in frameworks else []
        measured = collect()
    rows += [claim for f in others for result in measured[f].values() for claim in result.claims]
    order = {name: i for i, name in enumerate(registry.names())}
    claim_index = {}
    for row in rows:  # torch's rows come first, in each scenario's own claim order
        claim_index.setdefault((row.scenario, row.claim), len(claim_index))
    rank = {f: i for i, f in enumerate(frameworks)}
    rows.sort(key=lambda r: (order.get(r.scenario, len(order)), claim_index[(r.scenario, r.claim)], rank[r.framework]))
    return rows, frameworks


def run_claims(cfg, run_dir) -> int:
    if str(cfg.framework) == "torch":
        rows = collect_claims(int(cfg.seed), str(cfg.device))
        table = render_table(rows)
    else:
        from nanlab.frameworks.run import FrameworkError

        try:
            rows, frameworks = collect_framework_claims(cfg)
        except FrameworkError as err:  # a worker that could not run at all: one line, as for a run
            print(f"nanlab: error: {err}", file=sys.stderr)
            return 1
        table = render_framework_table(rows, frameworks)
        rows = note_differences(rows)  # claims.json carries, in each row, where the verdicts differ
    path = write_claims(rows, run_dir)
    print(table)
    print(f"Wrote {path}")
    return 0
