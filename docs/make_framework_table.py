"""Measure every scenario that has framework builders in torch and every installed
framework, and write the result as the table between the framework-table markers in
docs/frameworks.md (run by `make docs`; tests/test_frameworks.py checks
the table against a fresh measurement)."""
import re
import sys
from pathlib import Path

from nanlab import frameworks
from nanlab.lab import registry
from nanlab.config.compose import compose
from nanlab.frameworks.render import framework_matrix
from nanlab.frameworks.run import measure
from nanlab.config.options import FRAMEWORKS

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- framework-table:start -->\n", "<!-- framework-table:end -->")


def measured_table() -> str:
    missing = [f for f in FRAMEWORKS if not frameworks.installed(f)]
    if missing:  # a table with a column left out would read as "not reproduced there"
        sys.exit(f"docs/make_framework_table.py needs every framework; missing: {', '.join(missing)}")
    names = [n for n in registry.builtin_names() if frameworks.declared(n)]
    results = measure([compose([f"scenario={n}"]) for n in names], list(FRAMEWORKS))
    return framework_matrix(results, list(FRAMEWORKS))


def main():
    table = measured_table()
    path = ROOT / "docs" / "frameworks.md"
    text = path.read_text()
    if MARKERS[0] not in text:
        sys.exit(f"{path} has no {MARKERS[0].strip()} marker")
    pattern = re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1])
    path.write_text(re.sub(pattern, lambda _: MARKERS[0] + table + MARKERS[1], text, flags=re.S))


if __name__ == "__main__":
    main()
