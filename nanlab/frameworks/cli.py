"""``python -m nanlab scenario=NAME framework=...``: the side-by-side run, its files."""
from __future__ import annotations

import sys
from pathlib import Path

from nanlab import jsonio


def run_frameworks_mode(cfg, run_dir) -> int:
    from nanlab.frameworks.render import render
    from nanlab.frameworks.run import FrameworkError, run_frameworks

    try:
        results = run_frameworks(cfg)
    except FrameworkError as err:  # a worker that could not run: not bad input, but one line all the same
        print(f"nanlab: error: {err}", file=sys.stderr)
        return 1
    files = []
    for framework, result in results.items():
        files.append(str(jsonio.write_text(Path(run_dir) / framework / "result.json", result.to_json() + "\n")))
    print(render(results))
    for f in files:
        print(f"Wrote {f}")
    return 0
