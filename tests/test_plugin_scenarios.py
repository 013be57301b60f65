"""Third-party scenarios register through the `nanlab.scenarios` entry-point group."""
import json
import textwrap

PLUGIN_MODULE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    from nanlab.scenario import Data, Learn, Variant

    NAME = "log_of_zero_feature"
    SUMMARY = "A plugin scenario: log of a feature that can be exactly 0."
    EXPLANATION = """
    log(0) is -inf; a linear layer then makes it inf or NaN.
    log1p keeps 0 at 0.
    Shipped by a third-party package through an entry point.
    """
    LEARN = Learn(loss_drop=0.5)


    def make_data(ctx):
        g = ctx.generator()
        x = torch.rand(64, 3, generator=g, dtype=torch.float64)
        x[::8, 0] = 0.0
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


def make_plugin(site):
    site.mkdir()
    (site / "nanlab_plugin_example.py").write_text(PLUGIN_MODULE)
    dist = site / "nanlab_plugin_example-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nanlab-plugin-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[nanlab.scenarios]\nlog_of_zero_feature = nanlab_plugin_example\n")


def test_plugin_scenario_lists_and_runs(cli, tmp_path):
    site = tmp_path / "site"
    make_plugin(site)
    env = {"PYTHONPATH": str(site)}
    listed = cli("mode=list", env=env)
    assert listed.returncode == 0 and "log_of_zero_feature" in listed.stdout
    assert "A plugin scenario: log of a feature that can be exactly 0." in listed.stdout
    run = cli("scenario=log_of_zero_feature", "optimizer.lr=0.1", f"hydra.run.dir={tmp_path / 'out'}", env=env)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["scenario"] == "log_of_zero_feature" and result["reproduced"] is True and result["fixed"] is True
    assert result["variants"][0]["first_nonfinite"]["origin"]["op"] == "aten.log"


def test_unknown_scenario_lists_plugins_too(cli, tmp_path):
    site = tmp_path / "site"
    make_plugin(site)
    proc = cli("scenario=nope", f"hydra.run.dir={tmp_path}", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 2 and "log_of_zero_feature" in proc.stderr
