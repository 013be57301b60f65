"""Issue 2: the five headline scenarios reproduce their failure and their fixes work."""
import math

import pytest


HEADLINE = ["softmax_overflow", "bce_log_zero", "unscaled_sgd", "tanh_explosion", "custom_backward_div0"]


@pytest.mark.parametrize("name", HEADLINE)
def test_broken_goes_nonfinite_and_exact_fixes_learn(result_of, name):
    r = result_of(name)
    assert r.reproduced and not r.broken.finite
    first = r.broken.first_nonfinite
    assert first.quantity in {"loss", "gradients", "parameters", "activations"}
    assert 0 <= first.step < r.config["steps"]
    assert len(r.broken.losses) == first.step + 1
    fixes = [v for v in r.variants if v.role == "fix" and not v.lossy]
    assert fixes and all(v.finite and v.learned for v in fixes), [(v.name, v.verdict) for v in fixes]
    assert r.fixed
    for v in fixes:
        assert len(v.losses) == r.config["steps"] and all(math.isfinite(x) for x in v.losses)
        # per-step records: gradient norm and parameter norm beside every loss
        assert len(v.grad_norms) == len(v.param_norms) == len(v.losses)
        assert all(math.isfinite(g) and g >= 0 for g in v.grad_norms) and all(p > 0 for p in v.param_norms)


def test_softmax_overflow_paths(result_of):
    r = result_of("softmax_overflow")
    event = r.broken.first_nonfinite.event
    assert event.op == "aten.exp" and event.phase == "forward" and event.kind == "inf"
    assert event.source.startswith("softmax_overflow.py:")  # scenario code counts as user code
    assert r.variant("log_of_softmax").finite is False  # the library softmax underflows, log gives -inf
    myth = r.variant("log_softmax_as_probs")
    assert myth.finite and myth.wrong and myth.verdict.startswith("myth: finite but wrong")
    clip = r.variant("clip_logits_10")
    assert clip.lossy and clip.finite and clip.cost["against"] == "cross_entropy_on_logits"
    assert clip.cost["accuracy"] < 0  # measured: clipping costs accuracy here


def test_bce_clamp_gradients_measured(result_of):
    p = result_of("bce_log_zero").probes
    assert p["dloss/dlogit_clamp_1e-7_at_z=-30"] == 0.0
    assert p["dloss/dlogit_with_logits_at_z=-30"] == pytest.approx(-1.0)
    assert -1.0 < p["dloss/dlogit_torch_bce_at_z=-30"] < 0.0  # attenuated, not zero
    assert p["dloss/dlogit_torch_bce_at_z=-120"] == 0.0
    assert math.isnan(p["dloss/dlogit_hand_at_z=-120"])


def test_unscaled_sgd_critical_lr_matches_the_run(result_of):
    """The analytic critical lr, from an independent eigen-solver, brackets the runs."""
    import numpy as np

    from nanlab.config.compose import compose
    from nanlab.lab.scenario import Context
    from nanlab.scenarios import unscaled_sgd

    p = result_of("unscaled_sgd").probes
    x = unscaled_sgd.make_data(Context(compose(["scenario=unscaled_sgd"]), None, None)).x.numpy()
    xa = np.hstack([x, np.ones((len(x), 1))])
    lambda_max = np.linalg.svd(xa, compute_uv=False)[0] ** 2 * 2 / len(x)
    assert p["critical_lr"] == pytest.approx(2 / lambda_max, rel=1e-9)
    assert p["loss_ratio_end_over_start_at_0.9x_critical"] < 1 < p["loss_ratio_end_over_start_at_1.1x_critical"]


def test_tanh_adam_stays_finite_sgd_diverges(result_of):
    r = result_of("tanh_explosion")
    assert not r.broken.finite and r.variant("adam_1e-3").finite and r.variant("clip_norm_1").finite


def test_custom_backward_origin_is_the_custom_function(result_of):
    r = result_of("custom_backward_div0")
    event = r.broken.first_nonfinite.event
    assert event.phase == "backward" and event.node == "SqrtDivByZeroBackward"
    assert event.forward_op == "SqrtDivByZero" and event.kind == "inf" and event.origin == "op"
    assert r.probes["gradcheck_correct_backward"] is True
    assert r.probes["center_grad_at_distance_0_correct"] == 0.0


def test_verdict_follows_the_measurement():
    """Shrink the inputs and the hand-written softmax no longer overflows: the
    verdict must say so rather than repeat itself."""
    import nanlab

    r = nanlab.run("softmax_overflow", "scenario.data.input_scale=0.01", "steps=5")
    assert r.broken.finite and not r.reproduced
    assert r.broken.verdict == "not reproduced (stayed finite)"
