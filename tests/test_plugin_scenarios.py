"""Third-party scenarios register through the `nanlab.scenarios` entry-point group."""
import json
import textwrap

import pytest

PLUGIN_MODULE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    from nanlab.lab.scenario import Data, Learn, Variant

    SUMMARY = "A plugin scenario: log of a feature that can be exactly 0."
    EXPLANATION = """
    log(0) is -inf; a linear layer then makes it inf or NaN.
    log1p keeps 0 at 0.
    Shipped by a third-party package through an entry point.
    """
    DEFAULTS = dict(optimizer="sgd", lr=0.1, steps=40)
    DATA = dict(n=64, zero_every=8)
    LEARN = Learn(loss_drop=0.5)


    def make_data(ctx):
        x = ctx.rng().rand(int(ctx.knobs.n), 3)
        x[::int(ctx.knobs.zero_every), 0] = 0.0
        return Data(x, (x.sum(1, keepdim=True)))


    def make_model(ctx, data):
        return nn.Linear(3, 1)


    def exact_loss(pred, y):
        return F.mse_loss(pred, y)


    class LogFeatures(nn.Module):
        def __init__(self, transform):
            super().__init__()
            self.transform, self.linear = transform, nn.Linear(3, 1)

        def forward(self, x):
            return self.linear(self.transform(x))


    VARIANTS = [
        Variant("log", "broken", "log of the raw feature", F.mse_loss, model=lambda ctx, d: LogFeatures(torch.log)),
        Variant("log1p", "fix", "log1p instead", F.mse_loss, model=lambda ctx, d: LogFeatures(torch.log1p)),
    ]
''')


def make_plugin(site, plugins=None):
    """Install plugin scenarios into ``site`` through a real .dist-info entry point:
    ``plugins`` maps scenario name -> module source (default: the example above).
    ``python -m nanlab`` run with ``site`` as its folder finds them there (the folder
    is the first entry of sys.path), so the commands below fork from the warm CLI
    server instead of starting an interpreter for a PYTHONPATH."""
    plugins = plugins or {"log_of_zero_feature": PLUGIN_MODULE}
    site.mkdir(exist_ok=True)
    for name, source in plugins.items():
        (site / f"plugin_{name}.py").write_text(source)
    dist = site / "nanlab_plugin_example-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nanlab-plugin-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[nanlab.scenarios]\n" + "".join(f"{name} = plugin_{name}\n" for name in plugins))


def test_plugin_scenario_lists_and_runs(cli, tmp_path):
    site = tmp_path / "site"
    make_plugin(site)
    listed = cli("mode=list", cwd=site)
    assert listed.returncode == 0 and "log_of_zero_feature" in listed.stdout
    assert "A plugin scenario: log of a feature that can be exactly 0." in listed.stdout
    run = cli("scenario=log_of_zero_feature", f"hydra.run.dir={tmp_path / 'out'}", cwd=site)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["scenario"] == "log_of_zero_feature" and result["reproduced"] is True and result["fixed"] is True
    assert result["variants"][0]["first_nonfinite"]["origin"]["op"] == "aten.log"
    # its DEFAULTS and DATA, declared once in the module, are the run's config
    assert result["config"]["optimizer"]["lr"] == 0.1 and result["config"]["steps"] == 40
    assert result["config"]["scenario"]["data"] == {"n": 64, "zero_every": 8}


def test_plugin_data_knobs_are_overridable_and_checked(cli, tmp_path):
    site = tmp_path / "site"
    make_plugin(site)
    run = cli("scenario=log_of_zero_feature", "scenario.data.zero_every=4", "scenario.data.n=32", "steps=5",
              f"hydra.run.dir={tmp_path / 'out'}", cwd=site)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["config"]["scenario"]["data"] == {"n": 32, "zero_every": 4}
    for bad, expected in (("scenario.data.typo=1", "scenario.data.typo=1: not a data knob; log_of_zero_feature's "
                                                   "data knobs: n (int), zero_every (int)"),
                          ("scenario.data.n=2.5", "scenario.data.n=2.5: must be an integer"),
                          ("scenario.data.n=abc", "scenario.data.n=abc: must be an integer")):
        proc = cli("scenario=log_of_zero_feature", bad, f"hydra.run.dir={tmp_path / 'bad'}", cwd=site)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr


BROKEN = {
    "two_broken": PLUGIN_MODULE.replace('"log1p", "fix"', '"log1p", "broken"'),
    "no_exact_loss": PLUGIN_MODULE.replace("def exact_loss(pred, y):", "def not_the_exact_loss(pred, y):"),
    "import_fails": "import a_module_that_does_not_exist\n" + PLUGIN_MODULE,
    "defaults_not_literal": PLUGIN_MODULE.replace('DEFAULTS = dict(optimizer="sgd", lr=0.1, steps=40)',
                                                  "DEFAULTS = dict(lr=0.1 * 2)"),
    "builder_not_a_reference": PLUGIN_MODULE + 'FRAMEWORKS = {"jax": "jax_recipe"}\n',
    "builder_family_unknown": PLUGIN_MODULE + 'FRAMEWORKS = {"flax": "plugin_builders:jax_recipe"}\n',
}
RULES = {
    "two_broken": "breaks the contract: it needs exactly one broken variant, and has 2",
    "no_exact_loss": "breaks the contract: it must define exact_loss (see nanlab.lab.scenario)",
    "import_fails": "breaks the contract: importing it raised ModuleNotFoundError",
    "defaults_not_literal": "breaks the contract: DEFAULTS must be a literal",
    "builder_not_a_reference": "breaks the contract: FRAMEWORKS['jax'] must be a 'package.module:function' string",
    "builder_family_unknown": "breaks the contract: FRAMEWORKS key 'flax' is not a framework family",
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_module_that_breaks_the_contract_is_one_line(cli, tmp_path, broken):
    make_plugin(tmp_path / "site", {broken: BROKEN[broken]})
    proc = cli(f"scenario={broken}", "steps=2", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path / "site")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"scenario module plugin_{broken} {RULES[broken]}" in lines[-1]
    assert len(lines) <= 2  # a module broken in its source is also warned about while the config is built


def test_list_skips_a_broken_plugin_with_one_warning(cli, tmp_path):
    make_plugin(tmp_path / "site", {"no_exact_loss": BROKEN["no_exact_loss"], "log_of_zero_feature": PLUGIN_MODULE})
    proc = cli("mode=list", cwd=tmp_path / "site")
    assert proc.returncode == 0
    assert proc.stderr.strip().splitlines() == [
        f"nanlab: warning: skipping scenario no_exact_loss: scenario module plugin_no_exact_loss {RULES['no_exact_loss']}"]
    assert "log_of_zero_feature" in proc.stdout and "softmax_overflow" in proc.stdout
    assert "no_exact_loss" not in proc.stdout


def test_claims_skip_a_plugin_that_fails_on_import(tmp_path, monkeypatch, capsys):
    """A plugin whose source reads fine but whose import breaks the contract is skipped
    by mode=claims with one warning line; every other scenario's claims still come."""
    from conftest import xdist_shared_dir
    from shared_runs import memoized_runs

    from nanlab.config import compose as config
    from nanlab.lab import registry
    from nanlab.lab.claims import collect_claims

    make_plugin(tmp_path / "site", {"two_broken": BROKEN["two_broken"]})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for cached in (registry.plugin_entry_points, registry._declarations):
        cached.cache_clear()
    monkeypatch.setattr(config, "_ready", False)
    try:
        config.setup()
        builtin = set(registry.builtin_names())
        with memoized_runs(xdist_shared_dir()):
            rows = collect_claims()
    finally:
        monkeypatch.undo()
        for cached in (registry.plugin_entry_points, registry._declarations):
            cached.cache_clear()
    assert {r.scenario for r in rows} == builtin
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == [f"nanlab: warning: skipping scenario two_broken: scenario module plugin_two_broken {RULES['two_broken']}"]


PLUGIN_BUILDERS = textwrap.dedent('''
    def jax_recipe(kit, data, knobs):
        jnp = kit.jnp

        def model(data):
            return kit.JaxModel(lambda key, x: kit.dense(key, 3, 1), lambda p, x: x @ p["kernel"] + p["bias"])

        def mse(pred, y):
            return jnp.mean(jnp.square(pred - y))

        return kit.Recipe(model, {"log": kit.Variant(mse), "log1p": kit.Variant(mse)})
''')


def test_a_plugin_declares_builders_in_its_own_module(tmp_path):
    """A plugin names its builders the way built-in scenarios do, in a module of its
    own; the parent finds them without importing it, a worker imports only them."""
    import subprocess
    import sys

    site = tmp_path / "site"
    make_plugin(site, {"log_of_zero_feature": PLUGIN_MODULE + 'FRAMEWORKS = {"jax": "plugin_builders:jax_recipe"}\n'})
    (site / "plugin_builders.py").write_text(PLUGIN_BUILDERS)
    code = ("import sys; from nanlab import frameworks; "
            "assert frameworks.runs_on('log_of_zero_feature') == ['torch', 'jax'], frameworks.runs_on('log_of_zero_feature'); "
            "assert frameworks.builder('log_of_zero_feature', 'jax').__module__ == 'plugin_builders'; "
            "assert 'torch' not in sys.modules and 'plugin_log_of_zero_feature' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr


def test_unknown_scenario_lists_plugins_too(cli, tmp_path):
    site = tmp_path / "site"
    make_plugin(site)
    proc = cli("scenario=nope", f"hydra.run.dir={tmp_path}", cwd=site)
    assert proc.returncode == 2 and "log_of_zero_feature" in proc.stderr
