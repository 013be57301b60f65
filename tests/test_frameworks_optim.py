"""framework=: unscaled_sgd and tanh_explosion in Keras (three backends) and plain JAX.

Every test reads the shared measurement (conftest's framework_runs); the one that
checks the JAX step's clipping against torch trains ten steps in this process."""
import dataclasses
import json
import math

import pytest

from conftest import need_framework
from nanlab.config.options import FRAMEWORKS
from nanlab.lab.result import ScenarioResult, Verdict


OTHERS = [f for f in FRAMEWORKS if f != "torch"]


def _exact_finite_run(v, steps):
    assert v.finite and v.first_nonfinite is None, v.verdict
    assert len(v.losses) == steps and all(math.isfinite(x) for x in v.losses)


# ---------------------------------------------------------------- unscaled_sgd

@pytest.mark.parametrize("framework", OTHERS)
def test_unscaled_sgd_diverges_and_its_fixes_learn(framework_runs, framework):
    need_framework(framework)
    r = framework_runs[framework]["unscaled_sgd"]
    assert r.config["framework"] == framework and r.reproduced is True and r.fixed is True
    broken = r.variant("raw_features")
    # Measured on every framework: the loss squares an error of ~1e5 times lr-sized
    # overshoots, 1e10 -> 1e26 -> inf, so step 2 is the first non-finite loss.
    assert broken.role == "broken" and broken.nonfinite_step == 2 and broken.first_nonfinite.quantity == "loss"
    assert len(broken.losses) == 3 and 1e8 < broken.losses[0] < 1e12 and math.isinf(broken.losses[2])
    std = r.variant("standardized")
    _exact_finite_run(std, 100)
    assert 0.5 < std.exact_loss_start < 10 and std.exact_loss_end < 0.1 * std.exact_loss_start
    below = r.variant("lr_below_critical")
    _exact_finite_run(below, 100)
    # The fit never reaches the small feature's weight, but the big one's error is gone.
    assert below.exact_loss_start > 1e8 and below.exact_loss_end < 1.0


@pytest.mark.parametrize("framework", OTHERS)
def test_unscaled_sgd_runs_either_side_of_the_critical_lr(framework_runs, framework):
    """The torch probe's two runs, trained by the framework as variants of its own."""
    need_framework(framework)
    from nanlab.config.compose import compose
    from nanlab.lab.scenario import Context
    from nanlab.scenarios import unscaled_sgd

    r = framework_runs[framework]["unscaled_sgd"]
    x = unscaled_sgd.make_data(Context(compose(["scenario=unscaled_sgd"]), None, None)).x
    critical = unscaled_sgd.critical_lr(x)
    assert r.probes["critical_lr"] == pytest.approx(critical, rel=1e-12)  # the builder's numpy, torch's eigvalsh
    below, above = r.variant("lr_0.9x_critical"), r.variant("lr_1.1x_critical")
    assert (below.role, above.role) == ("fix", "broken") and r.broken.name == "raw_features"
    assert below.overrides == {"optimizer.lr": pytest.approx(0.9 * critical, rel=1e-12), "steps": 300}
    assert above.overrides == {"optimizer.lr": pytest.approx(1.1 * critical, rel=1e-12), "steps": 300}
    _exact_finite_run(below, 300)
    assert below.exact_loss_end < 1e-9 * below.exact_loss_start
    # 1.1x: the error along the top eigenvector grows 1.2x a step, from ~1e5 to float32's
    # overflow after ~170 steps (measured 166..171 over the four frameworks).
    assert not above.finite and 150 <= above.nonfinite_step <= 200 and len(above.losses) == above.nonfinite_step + 1
    assert all(math.isfinite(x) for x in above.losses[:-1]) and above.losses[-2] > 1e30


@pytest.mark.parametrize("framework", OTHERS)
def test_unscaled_sgd_claim_reads_this_frameworks_runs(framework_runs, framework):
    need_framework(framework)
    r = framework_runs[framework]["unscaled_sgd"]
    (claim,) = r.claims
    assert claim.verdict is Verdict.confirmed, claim.evidence
    below = r.variant("lr_0.9x_critical")
    ratio = below.exact_loss_end / below.exact_loss_start
    assert f"loss ratio {ratio:.3g} at 0.9x, inf at 1.1x" in claim.evidence
    assert f"non-finite at step {r.broken.nonfinite_step}" in claim.evidence


def test_unscaled_sgd_claim_without_the_run_is_not_decided(framework_runs):
    """A framework result lacking the run above the critical lr cannot decide the claim:
    it says what it lacks, rather than reading torch's probe."""
    need_framework("jax")
    from nanlab.lab import registry
    from nanlab.frameworks.run import decide_framework_claims

    r = framework_runs["jax"]["unscaled_sgd"]
    short = dataclasses.replace(r, variants=[v for v in r.variants if v.name != "lr_1.1x_critical"])
    (claim,) = decide_framework_claims(registry.load("unscaled_sgd"), short, True, "jax")
    assert claim.verdict is Verdict.not_decided and "lr_1.1x_critical" in claim.evidence


# ---------------------------------------------------------------- tanh_explosion

@pytest.mark.parametrize("framework", OTHERS)
def test_tanh_explosion_sgd_diverges_and_each_fix_learns(framework_runs, framework):
    need_framework(framework)
    from nanlab.scenarios import tanh_explosion

    r = framework_runs[framework]["tanh_explosion"]
    assert [v.name for v in r.variants] == [v.name for v in tanh_explosion.VARIANTS]
    assert r.reproduced is True and r.fixed is True
    sgd = r.broken
    # Torch goes at step 18; the frameworks' own inits, at 15 or 16.
    assert sgd.name == "sgd_large_lr" and 12 <= sgd.nonfinite_step <= 20
    assert sgd.first_nonfinite.quantity == "loss" and len(sgd.losses) == sgd.nonfinite_step + 1
    for name in ("clip_norm_1", "standardized", "lr_10x_lower", "adam_1e-3"):
        v = r.variant(name)
        _exact_finite_run(v, 200)
        assert 0.3 < v.exact_loss_start < 5 and v.exact_loss_end <= 0.5 * v.exact_loss_start, name
    # Adam's steps ignore the gradient's scale: it fits well, not just finitely.
    assert r.variant("adam_1e-3").exact_loss_end < 0.15 * r.variant("adam_1e-3").exact_loss_start
    # The settings came from the torch variants, not from the builders.
    assert r.variant("clip_norm_1").overrides == {"clip.name": "norm", "clip.threshold": 1.0}
    assert r.variant("lr_10x_lower").overrides == {"optimizer.lr": pytest.approx(0.02)}
    assert r.variant("adam_1e-3").overrides["optimizer.name"] == "adam"


@pytest.mark.parametrize("framework", OTHERS)
def test_tanh_explosion_claims_per_framework(framework_runs, framework):
    need_framework(framework)
    r = framework_runs[framework]["tanh_explosion"]
    verdicts = [c.verdict for c in r.claims]
    assert verdicts == [Verdict.refuted, Verdict.confirmed, Verdict.confirmed], [c.evidence for c in r.claims]
    step = r.broken.nonfinite_step
    assert f"SGD lr 0.2: non-finite at step {step}" in r.claims[0].evidence
    assert f"first non-finite loss at step {step}" in r.claims[1].evidence


@pytest.mark.parametrize("scenario", ["unscaled_sgd", "tanh_explosion"])
def test_results_round_trip_through_json(framework_runs, scenario):
    for framework in OTHERS:
        need_framework(framework)
        result = framework_runs[framework][scenario]
        again = ScenarioResult.from_dict(json.loads(result.to_json()))
        assert again.to_dict() == result.to_dict()


# ---------------------------------------------------------------- the JAX step vs torch.optim

def test_jax_step_clips_as_torch_does(monkeypatch):
    """Ten steps of tanh_explosion's clip_norm_1 in the jax worker's own step, from torch's
    initial weights, against clip_grad_norm_ and torch.optim.SGD. The frameworks' runs
    cannot be compared (each has its own init), so this one starts both at the same weights.
    The gradient norm is above 1 at every step, so every step is clipped."""
    need_framework("jax")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    import types

    import numpy as np
    import torch
    import torch.nn.functional as F

    from nanlab.config.compose import compose
    from nanlab import frameworks
    from nanlab.frameworks import recipe
    from nanlab.frameworks.run import prepare_job
    from nanlab.frameworks.worker import JaxTrainer
    from nanlab.lab.scenario import Context

    steps = 10
    cfg = compose(["scenario=tanh_explosion", f"steps={steps}"])
    job = prepare_job(cfg)
    (spec,) = [s for s in job.specs if s[0].name == "clip_norm_1"]
    settings = spec[3]
    assert settings["clip"] == {"name": "norm", "threshold": 1.0} and settings["optimizer"]["name"] == "sgd"
    x, y = job.raw.x.float(), job.raw.y.float()

    torch.manual_seed(0)
    net = job.scenario.make_model(Context(cfg, torch.device("cpu"), torch.float32), job.raw).float()
    start = [{"kernel": layer.weight.detach().numpy().T.copy(), "bias": layer.bias.detach().numpy().copy()}
             for layer in net if isinstance(layer, torch.nn.Linear)]
    opt = torch.optim.SGD(net.parameters(), lr=settings["optimizer"]["lr"])
    torch_losses, norms = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)))
        opt.step()
        torch_losses.append(loss.item())
    assert min(norms) > 1.2  # measured 1.5 to 4.8: the clip scales every step

    trainer = JaxTrainer("jax")
    raw = types.SimpleNamespace(x=job.raw.x.numpy(), y=job.raw.y.numpy())
    knobs = types.SimpleNamespace(**dict(cfg.scenario.data))
    built = frameworks.builder("tanh_explosion", "jax")(trainer.kit(), raw, knobs)
    apply = built.model(raw).apply  # the builder's own MLP, from torch's weights
    jnp = trainer.jax.numpy
    model = recipe.JaxModel(lambda key, x: [{k: jnp.asarray(v) for k, v in p.items()} for p in start], apply)
    variant = dataclasses.replace(built.variants["clip_norm_1"], model=lambda data: model)
    measured = trainer.train(built, variant, raw, settings)
    assert measured["first_nonfinite"] is None
    np.testing.assert_allclose(measured["losses"], torch_losses, rtol=1e-5)  # measured: 2.4e-7 apart
    # Without the clip the same start takes another path: the comparison can tell.
    unclipped = trainer.train(built, variant, raw, {**settings, "clip": {"name": "none"}})
    assert abs(unclipped["losses"][1] - torch_losses[1]) > 1e-2 * torch_losses[1]
