"""mode=claims: run every scenario, then tabulate the claims they decide."""
from __future__ import annotations

import sys
import textwrap
from collections import Counter
from pathlib import Path

from nanlab import jsonio, registry
from nanlab.config import compose
from nanlab.result import ClaimResult, Verdict
from nanlab.runner import run_scenario
from nanlab.scenario import ContractError

CLAIM_KEYS = ("scenario", "claim", "verdict", "evidence")


def collect_claims(seed: int = 0, device: str = "cpu", run=run_scenario) -> list[ClaimResult]:
    """Every scenario at its defaults (plus seed and device); their claims in order.
    A scenario module that breaks the contract is skipped with one warning line."""
    rows = []
    for name in registry.names():
        try:
            overrides = [f"scenario={name}", f"seed={seed}", f"device={device}"]
            result = run(compose(overrides), overrides)
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


def write_claims(rows: list[ClaimResult], run_dir) -> Path:
    return jsonio.write_json(Path(run_dir) / "claims.json", [{k: row.to_dict()[k] for k in CLAIM_KEYS} for row in rows])


def run_claims(cfg, run_dir) -> int:
    rows = collect_claims(int(cfg.seed), str(cfg.device))
    path = write_claims(rows, run_dir)
    print(render_table(rows))
    print(f"Wrote {path}")
    return 0
