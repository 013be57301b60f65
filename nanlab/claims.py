"""mode=claims: run every scenario, then tabulate the claims they decide."""
from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

from nanlab import registry
from nanlab.config import compose
from nanlab.runner import run_scenario

VERDICTS = ("confirmed", "partly", "refuted")


def collect_claims(seed: int = 0, device: str = "cpu") -> list[dict]:
    """Every scenario at its defaults (plus seed and device); their claims in order."""
    rows = []
    for name in registry.names():
        result = run_scenario(compose([f"scenario={name}", f"seed={seed}", f"device={device}"]))
        rows += [{k: c[k] for k in ("scenario", "claim", "verdict", "evidence")} for c in result.claims]
    return rows


def render_table(rows: list[dict]) -> str:
    lines = [f"{'scenario':<24} {'verdict':<10} claim", "-" * 100]
    for row in rows:
        lines.append(f"{row['scenario']:<24} {row['verdict']:<10} {row['claim']}")
        lines += textwrap.wrap(row["evidence"], 96, initial_indent=" " * 36, subsequent_indent=" " * 36)
    counts = Counter(row["verdict"] for row in rows)
    lines.append("")
    lines.append(f"{len(rows)} claims: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS))
    return "\n".join(lines)


def run_claims(cfg, run_dir) -> int:
    rows = collect_claims(int(cfg.seed), str(cfg.device))
    path = Path(run_dir) / "claims.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(render_table(rows))
    print(f"Wrote {path}")
    return 0
