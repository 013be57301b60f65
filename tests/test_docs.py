"""Every command in README.md and the docs pages runs as written and prints what
its comment or question promises; every Python block and example runs too. The
README stays a short front door: its links resolve, and no page narrates how the
work was done.

A command found in the docs but not listed here fails the test, so the docs cannot
gain a command that nothing checks."""
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import pytest
from conftest import FRAMEWORK_COMMAND, run_python

ROOT = Path(__file__).resolve().parents[1]
# The pages whose commands and Python blocks are run here. docs/kernels.md shows
# commands with placeholders (my_pkg.losses:my_ce); its own tests check it.
DOCS = [ROOT / "README.md"] + [ROOT / "docs" / f"{page}.md" for page in (
    "workshop", "running", "config", "debugging", "writing-scenarios", "sweeps", "frameworks", "performance")]

# In docs/frameworks.md. Run once per session as part of the framework tests' shared
# measurement (conftest.framework_measurement), and its output checked by
# tests/test_frameworks.py: running it here as well would train four frameworks twice.
README_FRAMEWORK_COMMAND = FRAMEWORK_COMMAND



@dataclass(frozen=True)
class Near:
    """A number the docs quote from a command's output: the first match of `pattern`
    (its one group) must be within `rel` of `value`. For numbers whose last digits are
    not the point; a string in EXPECTED is matched exactly."""
    pattern: str
    value: float
    rel: float = 0.02

    def found_in(self, output: str) -> bool:
        match = re.search(self.pattern, output)
        return match is not None and math.isclose(float(match.group(1)), self.value, rel_tol=self.rel)


def shows(output: str, want) -> bool:
    return want.found_in(output) if isinstance(want, Near) else want in output


# command -> what its output must contain (stdout and stderr together)
EXPECTED = {
    "python -m nanlab scenario=softmax_overflow": [
        "NaN loss at step 0", "Inf first in forward: aten.exp", "Verdict: reproduced: the broken variant went non-finite at step 0."],
    "python -m nanlab scenario=tanh_explosion optimizer=adam optimizer.lr=1e-3": [
        "Verdict: NOT reproduced with optimizer=adam lr=0.001: the broken variant stayed finite for 200 steps",
        "[not decided]"],
    "python -m nanlab scenario=unscaled_sgd dtype=float64 seed=3 plot=true": [
        "Inf loss at step 18", "Verdict: reproduced", "losses.png"],
    "python -m nanlab scenario=masked_softmax variant=guard_empty_rows": [
        "guard_empty_rows", "reproduced? not measured (the broken variant was not run", "fixed: every exact fix stayed finite and learned"],
    "python -m nanlab mode=list": ["softmax_overflow", "zero_variance_features"],
    "python -m nanlab mode=list framework=all": [
        "sparse_ce_bad_labels     torch, keras-torch, keras-jax, keras-tensorflow, jax", "dying_relu               torch"],
    README_FRAMEWORK_COMMAND: [
        "NaN first in forward: aten.div (sparse_ce_bad_labels.py:", "first op: not traced on keras-jax",
        "first op: not traced on jax", "keras-tensorflow  reproduced: the broken variant went non-finite at step 0.",
        "Claims by framework"],
    "python -m nanlab mode=claims": ["23 claims: 12 confirmed, 5 partly, 6 refuted", "claims.json"],
    "python -m nanlab mode=report": ["15 scenarios in the handout", "report.html"],
    "python -m nanlab mode=check kernel.fn=nanlab.kernels.examples:naive_softmax_cross_entropy "
    "kernel.kind=cross_entropy": ["FAILED"],
    "python -m nanlab -m scenario=tanh_explosion optimizer.lr=0.01,0.1,0.2,0.5": [
        "[0] scenario=tanh_explosion optimizer.lr=0.01: NOT reproduced",
        "[2] scenario=tanh_explosion optimizer.lr=0.2: reproduced"],
    "python -m nanlab scenario=unscaled_sgd": [
        Near(r"probe critical_lr: (\S+)", 1.028e-10), "probe loss_ratio_end_over_start_at_0.9x_critical",
        "probe loss_ratio_end_over_start_at_1.1x_critical: inf"],
    "python -m nanlab -m scenario=unscaled_sgd optimizer.lr=5e-11,1e-10,2e-10": [
        "[0] scenario=unscaled_sgd optimizer.lr=5e-11: NOT reproduced",
        "[1] scenario=unscaled_sgd optimizer.lr=1e-10: NOT reproduced",
        "[2] scenario=unscaled_sgd optimizer.lr=2e-10: reproduced"],
    "python -m nanlab -m scenario=tanh_explosion optimizer.lr=0.05,0.2,1.0 clip=none,norm": [
        "optimizer.lr=0.05 clip=none: NOT reproduced", "optimizer.lr=0.2 clip=none: reproduced",
        "optimizer.lr=1.0 clip=none: reproduced", "optimizer.lr=1.0 clip=norm: NOT reproduced"],
    "python -m nanlab scenario=tanh_explosion clip=norm clip.threshold=1e-4 variant=sgd_large_lr": [
        "NOT reproduced with clip=norm clip.threshold=0.0001",
        Near(r"sgd_large_lr +broken +finite for 200 steps +(\S+) ->", 0.5877),
        Near(r"sgd_large_lr +broken +finite for 200 steps +\S+ -> (\S+)", 0.58)],
    "python -m nanlab scenario=zero_variance_features dtype=float16 variant=std_plus_eps": [
        "std_plus_eps", "still non-finite"],
    "python examples/trace_first_nan.py": [
        "NaN first in forward: aten._softmax in TinyAttention (trace_first_nan.py:20)"],
    "python examples/guard_training.py": [
        "stopped: non-finite loss at step 2", "parameters restored to before that step, all finite: True"],
    "pip install -e examples/scenario_plugin": [],
    "python -m nanlab scenario=log_of_zero_feature": [
        "first in forward: aten.log", "Verdict: reproduced: the broken variant went non-finite at step 0.",
        "fixed: every exact fix stayed finite and learned"],
    "python -m nanlab scenario=log_of_zero_feature scenario.data.zero_every=2": ["Verdict: reproduced"],
    "python -m nanlab -m scenario=tanh_explosion optimizer.lr=0.01,0.2,0.5 clip=none,norm": [
        "| 0.2 | none | 18 |", "| 0.01 | none |   |", "summary.csv", "summary.md"],
    "python -m nanlab mode=sweep scenario=tanh_explosion sweep.lr=[0.01,0.2,0.5] sweep.clip=[none,norm]": [
        "| 0.2 | none | 18 |", "| 0.5 | none | 12 |", "summary.md"],
    "python -m nanlab mode=sweep scenario=tanh_explosion sweep.lr=[0.01,0.02,0.05,0.1,0.2,0.5,1.0] "
    "sweep.init=[default,xavier_uniform,he_normal] variant=sgd_large_lr plot=true": [
        "| 0.2 | xavier_uniform | 15 |", "stability.png"],
    "python -m nanlab mode=boundary scenario=tanh_explosion boundary.init=[default,xavier_uniform,he_normal] "
    "boundary.clip=[none,norm] plot=true": [
        Near(r"default\s+none\s+(\d[\d.e+-]*)", 0.1186), "(finite at every lr tried)", "boundary.json", "boundary.png"],
}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, opening and closing fences told apart."""
    blocks, language, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, body = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(body) + "\n"))
                language = None
        elif language is not None:
            body.append(line)
    return blocks


def doc_commands() -> list[str]:
    """Commands in the docs' plain fenced blocks and in backticks that start with one."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for language, block in fenced_blocks(text):
            if language:
                continue
            for line in block.replace("\\\n", " ").splitlines():  # join continued lines
                command = " ".join(line.split("  #")[0].split())
                if command.startswith(("python ", "pip ")):
                    found.append(command)
        found += [c for c in re.findall(r"`((?:python|pip) [^`]+)`", text) if c in EXPECTED]
    return list(dict.fromkeys(found))


def python_blocks() -> list[str]:
    return [body for doc in DOCS for language, body in fenced_blocks(doc.read_text()) if language == "python"]


def test_every_documented_command_is_checked():
    assert sorted(doc_commands()) == sorted(EXPECTED)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """`pip install -e examples/scenario_plugin`, without touching this venv: the same
    package installed into a folder that the plugin's commands get on PYTHONPATH."""
    site = tmp_path_factory.mktemp("plugin_site")
    # Built from a copy: pip builds in the source folder, where two test workers building
    # at once break each other's build.
    source = tmp_path_factory.mktemp("plugin_source") / "scenario_plugin"
    shutil.copytree(ROOT / "examples" / "scenario_plugin", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(source)], check=True, capture_output=True)
    return site


def run_documented(command: str, cwd: Path, site: Path) -> subprocess.CompletedProcess:
    words = command.split()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if "log_of_zero_feature" in command:
        env["PYTHONPATH"] = str(site)
    if words[0] == "python" and words[1] != "-m":
        words[1] = str(ROOT / words[1])  # an example script, run from a scratch folder
    # What a command shows is the point here, not that its runs ran again: the runs come
    # from the session's shared runs (tests/shared_runs.py) where the same run was made.
    return run_python(*words[1:], cwd=cwd, env=env, timeout=600, shared=True)


# One test per command, so that pytest-xdist spreads them over its workers.
@pytest.mark.parametrize("command", [c for c in doc_commands()
                                     if not c.startswith("pip ") and c != README_FRAMEWORK_COMMAND])
def test_every_documented_command_runs_and_shows_what_it_promises(command, tmp_path, plugin_site):
    proc = run_documented(command, tmp_path, plugin_site)
    output = proc.stdout + proc.stderr
    expected_code = 1 if "naive_softmax_cross_entropy" in command else 0  # a failing kernel check exits 1
    assert proc.returncode == expected_code and "Traceback" not in output, f"exit {proc.returncode}\n{output[-1500:]}"
    missing = [want for want in EXPECTED.get(command, ()) if not shows(output, want)]
    assert not missing, f"missing {missing}\n{output[-3000:]}"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_every_python_block_runs(index, tmp_path, result_of):
    if '"result.json"' in python_blocks()[index]:  # a block that loads a saved run gets one
        (tmp_path / "result.json").write_text(result_of("softmax_overflow").to_json())
    proc = run_python("-c", python_blocks()[index], cwd=tmp_path, shared=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


# Phrases that tell how the work went (who lent what, which target was missed, which
# issue asked for it) rather than what the tool does and what was measured.
PROCESS_PHRASES = [r"\blent\b", r"\bmissed\b", r"\btargets? (?:is |was )?met\b", r":\s*met\b", r"\bthe issue\b",
                   r"\bissue'?s?\s*#?\d+", r"\bissue's\b", r"\bthis stop\b", r"\bsessions? so far\b",
                   r"\bthis work\b", r"\bseed articles?\b", r"\bno GPU was\b"]


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_no_page_narrates_how_the_work_was_done(page):
    text = page.read_text()
    found = [m.group(0) for phrase in PROCESS_PHRASES for m in re.finditer(phrase, text, flags=re.I)]
    assert not found, f"{page.name}: {found}"


def test_every_relative_link_in_the_readme_resolves():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]
    assert relative, "the README links into docs/"
    assert not [t for t in relative if not (ROOT / t).exists()]


def schema_keys(node, prefix=""):
    """Every dotted key the structured-config schema declares, leaves and dict fields alike."""
    for field in fields(node):
        kind = field.type
        kind = eval(kind, vars(sys.modules[node.__module__])) if isinstance(kind, str) else kind
        if is_dataclass(kind):
            yield from schema_keys(kind, f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


def test_docs_config_lists_every_schema_key():
    from nanlab.config.schema import Config

    text = (ROOT / "docs" / "config.md").read_text()
    keys = list(schema_keys(Config))
    assert {"framework", "sweep.lr", "boundary.candidates", "kernel.show", "scenario.data"} <= set(keys)
    # `sweep.clip` must be there in its own right, not as the start of `sweep.clip_threshold`.
    missing = [k for k in keys if not re.search(r"`" + re.escape(k) + r"(?![\w])", text)]
    assert not missing, f"docs/config.md lacks {missing}"


def test_workshop_exercise_6_makes_a_scenario_of_ones_own(tmp_path):
    """The copy-rename-install steps of docs/workshop.md, run as written from a checkout,
    give a scenario that `scenario=my_scn` runs. `pip install -e` becomes an install into
    a folder on PYTHONPATH, so this venv is left as it was."""
    blocks = [body for language, body in fenced_blocks((ROOT / "docs" / "workshop.md").read_text()) if language == "bash"]
    assert len(blocks) == 1
    shutil.copytree(ROOT / "examples" / "scenario_plugin", tmp_path / "examples" / "scenario_plugin")
    site = tmp_path / "site"
    python = f'"{sys.executable}"'
    lines = []
    for line in blocks[0].splitlines():
        if line.startswith("pip install -e "):
            line = f'{python} -m pip install -q --no-deps --no-build-isolation --target "{site}" {line.split()[-1]}'
        elif line.startswith("python "):
            line = python + line[len("python"):]
        lines.append(line)
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "PYTHONPATH": str(site)}
    proc = subprocess.run(["bash", "-ec", "\n".join(lines)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in output, output[-2000:]
    assert output.startswith("my_scn: ") and "Verdict: reproduced" in output, output[-2000:]
