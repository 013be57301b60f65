"""Regenerate the README's scenario table and docs/scenarios.md from the scenario
modules (run by `make docs`; tests/test_catalogue.py checks they are in sync)."""
import re
from pathlib import Path

from nanlab.lab import registry
from nanlab.frameworks import runs_on

ROOT = Path(__file__).resolve().parents[1]


def main():
    names = registry.builtin_names()
    table = "| scenario | what fails |\n|---|---|\n" + "".join(f"| {n} | {registry.summary(n)} |\n" for n in names)
    readme = ROOT / "README.md"
    readme.write_text(re.sub(r"<!-- scenario-table:start -->.*<!-- scenario-table:end -->",
                             "<!-- scenario-table:start -->\n" + table + "<!-- scenario-table:end -->",
                             readme.read_text(), flags=re.S))
    parts = ["# The scenario catalogue\n\nEach section is one module in `scenarios/`; "
             "`python -m nanlab scenario=NAME` runs it.",
             "The explanations below are the modules' own `EXPLANATION` text.\n"]
    for name in names:
        s, decl = registry.load(name), registry.declaration(name)
        roles = ", ".join(f"`{v.name}` ({v.role}{', lossy' if v.lossy else ''})" for v in s.variants)
        settings = " ".join(f"{k}={v['name'] if isinstance(v, dict) else v}" for k, v in decl.defaults.items())
        knobs = ", ".join(f"`{k}={v}`" for k, v in decl.data.items())
        where = ", ".join(runs_on(name))
        parts.append(f"## {name}\n\n{s.summary}\n\nRuns at: `{settings}`. Data knobs (`scenario.data.*`): {knobs}.\n\n"
                     f"Variants: {roles}.\n\nFrameworks (`framework=`): {where}"
                     + (" (what each did: [frameworks.md](frameworks.md))" if len(runs_on(name)) > 1 else "")
                     + f".\n\n{s.explanation}\n")
    (ROOT / "docs" / "scenarios.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
