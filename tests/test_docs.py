"""Every command in README.md and docs/workshop.md runs as written and prints what
its comment or question promises; every Python block and example runs too.

A command found in the docs but not listed here fails the test, so the docs cannot
gain a command that nothing checks."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "workshop.md"]

# Run by tests/test_frameworks.py, which also compares its numbers with the framework
# tests' own measurement: running it here as well would pay four framework imports twice.
README_FRAMEWORK_COMMAND = "python -m nanlab scenario=sparse_ce_bad_labels framework=all"

# command -> what its output must contain (stdout and stderr together)
EXPECTED = {
    "python -m nanlab scenario=softmax_overflow": [
        "Inf first in forward: aten.exp", "Verdict: reproduced: the broken variant went non-finite at step 0."],
    "python -m nanlab scenario=tanh_explosion optimizer=adam optimizer.lr=1e-3": [
        "Verdict: NOT reproduced with optimizer=adam lr=0.001: the broken variant stayed finite for 200 steps",
        "[not decided]"],
    "python -m nanlab scenario=unscaled_sgd dtype=float64 seed=3 plot=true": [
        "Verdict: reproduced", "losses.png"],
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
    "python -m nanlab scenario=unscaled_sgd": ["probe critical_lr:", "probe loss_ratio_end_over_start_at_0.9x_critical"],
    "python -m nanlab -m scenario=unscaled_sgd optimizer.lr=5e-11,1e-10,2e-10": [
        "[0] scenario=unscaled_sgd optimizer.lr=5e-11: NOT reproduced",
        "[2] scenario=unscaled_sgd optimizer.lr=2e-10: reproduced"],
    "python -m nanlab -m scenario=tanh_explosion optimizer.lr=0.05,0.2,1.0 clip=none,norm": [
        "optimizer.lr=0.05 clip=none: NOT reproduced", "optimizer.lr=0.2 clip=none: reproduced",
        "optimizer.lr=1.0 clip=none: reproduced", "optimizer.lr=1.0 clip=norm: NOT reproduced"],
    "python -m nanlab scenario=tanh_explosion clip=norm clip.threshold=1e-4 variant=sgd_large_lr": [
        "NOT reproduced with clip=norm clip.threshold=0.0001", "0.5877 -> 0.58"],
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
    "python -m nanlab -m scenario=tanh_explosion optimizer.lr=0.01,0.1,0.2,0.5 clip=none,norm": [
        "| 0.2 | none | 18 |", "| 0.01 | none |   |", "summary.csv", "summary.md"],
    "python -m nanlab mode=sweep scenario=tanh_explosion sweep.lr=[0.01,0.1,0.2,0.5] sweep.clip=[none,norm]": [
        "| 0.2 | none | 18 |", "| 0.5 | none | 12 |", "summary.md"],
    "python -m nanlab mode=sweep scenario=tanh_explosion sweep.lr=[0.01,0.02,0.05,0.1,0.2,0.5,1.0] "
    "sweep.init=[default,xavier_uniform,he_normal] variant=sgd_large_lr plot=true": [
        "| 0.2 | xavier_uniform | 15 |", "stability.png"],
    "python -m nanlab mode=boundary scenario=tanh_explosion boundary.init=[default,xavier_uniform,he_normal] "
    "boundary.clip=[none,norm,value] plot=true": [
        "default          none         0.1186", "(finite at every lr tried)", "boundary.json", "boundary.png"],
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
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(ROOT / "examples" / "scenario_plugin")], check=True, capture_output=True)
    return site


def run_documented(command: str, cwd: Path, site: Path) -> subprocess.CompletedProcess:
    words = command.split()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if "log_of_zero_feature" in command:
        env["PYTHONPATH"] = str(site)
    if words[0] == "python" and words[1] != "-m":
        words[1] = str(ROOT / words[1])  # an example script, run from a scratch folder
    return subprocess.run([sys.executable, *words[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# One test per command, so that pytest-xdist spreads them over its workers.
@pytest.mark.parametrize("command", [c for c in doc_commands()
                                     if not c.startswith("pip ") and c != README_FRAMEWORK_COMMAND])
def test_every_documented_command_runs_and_shows_what_it_promises(command, tmp_path, plugin_site):
    proc = run_documented(command, tmp_path, plugin_site)
    output = proc.stdout + proc.stderr
    expected_code = 1 if "naive_softmax_cross_entropy" in command else 0  # a failing kernel check exits 1
    assert proc.returncode == expected_code and "Traceback" not in output, f"exit {proc.returncode}\n{output[-1500:]}"
    missing = [want for want in EXPECTED.get(command, ()) if want not in output]
    assert not missing, f"missing {missing}\n{output[-3000:]}"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_every_python_block_runs(index, tmp_path, result_of):
    if '"result.json"' in python_blocks()[index]:  # a block that loads a saved run gets one
        (tmp_path / "result.json").write_text(result_of("softmax_overflow").to_json())
    proc = subprocess.run([sys.executable, "-c", python_blocks()[index]], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
