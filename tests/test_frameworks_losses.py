"""softmax_overflow and bce_log_zero in Keras (three backends) and plain JAX.

Every test reads the shared framework measurement (conftest.framework_runs). What each
framework does was measured with Keras 3.15 and JAX 0.10 on the CPU: the hand-written
losses fail at step 0 everywhere, the log-sum-exp losses learn everywhere, and Keras'
own probability cross-entropies clip at 1e-7 except on TensorFlow, where Keras' softmax
and sigmoid hand their logits to the loss, which then computes the exact value."""
import math
import re

import pytest

from conftest import need_framework


KERAS = ["keras-torch", "keras-jax", "keras-tensorflow"]
ALL = KERAS + ["jax"]
# -ln(1e-7): the most a probability clipped at 1e-7 can score.
CLIPPED = -math.log(1e-7)


def run_of(framework_runs, framework, scenario):
    need_framework(framework)
    result = framework_runs[framework][scenario]
    assert result.config["framework"] == framework
    return result


def takes_logits_back(framework):
    """Measured: only Keras on TensorFlow recovers the logits from its own softmax/sigmoid."""
    return framework == "keras-tensorflow"


# ---------------------------------------------------------------- softmax_overflow

@pytest.mark.parametrize("framework", ALL)
def test_softmax_paths_fail_or_learn_as_in_torch(framework_runs, framework):
    r = run_of(framework_runs, framework, "softmax_overflow")
    assert r.reproduced is True and r.fixed is True
    hand, log_sm = r.variant("hand_softmax"), r.variant("log_of_softmax")
    assert hand.nonfinite_step == 0 and math.isnan(hand.first_nonfinite.loss)  # inf / inf
    assert log_sm.nonfinite_step == 0 and log_sm.first_nonfinite.loss == math.inf  # log(0) of a wrong class
    exact = r.variant("cross_entropy_on_logits")
    assert exact.finite and len(exact.losses) == 60 and exact.learned
    assert exact.exact_loss_start > 100 and exact.exact_loss_end < 2 and exact.accuracy_end > 0.95
    # Finite, but its loss reads a few units where the exact loss is in the hundreds, and it unlearns.
    myth = r.variant("log_softmax_as_probs")
    assert myth.finite and myth.wrong and myth.losses[0] < 10 < exact.exact_loss_start
    assert myth.exact_loss_end > myth.exact_loss_start and myth.verdict == "myth: finite but wrong"
    clip = r.variant("clip_logits_10")
    assert clip.finite and clip.lossy and clip.exact_loss_end > 50 * exact.exact_loss_end
    p = r.probes
    assert math.isnan(p["hand_softmax_of_[200,0,-200]"][0])
    assert p["log_softmax_of_[200,0,-200]"] == [0.0, -200.0, -400.0]
    assert p["log_of_softmax_of_[200,0,-200]"][1:] == [-math.inf, -math.inf]


@pytest.mark.parametrize("framework", KERAS)
def test_keras_softmax_then_cce_clips_or_takes_the_logits(framework_runs, framework):
    r = run_of(framework_runs, framework, "softmax_overflow")
    own, exact = r.variant("keras_softmax_cce"), r.variant("cross_entropy_on_logits")
    assert own.role == "myth" and "categorical_crossentropy" in own.summary
    assert own.finite and len(own.losses) == 60  # no NaN on any backend
    on_softmax = r.probes["keras_categorical_crossentropy_on_softmax_of_[200,0,-200]_label_2"]
    assert r.probes["keras_categorical_crossentropy_on_logits_of_[200,0,-200]_label_2"] == 400.0
    if takes_logits_back(framework):
        assert on_softmax == 400.0
        assert not own.wrong and own.learned and own.verdict == "works here (not a myth in this setup)"
        assert own.losses == pytest.approx(exact.losses, rel=1e-4)
    else:
        assert on_softmax == pytest.approx(CLIPPED, rel=1e-6)
        # Every example scores at most 16.118, where the exact loss is in the hundreds.
        assert own.wrong and own.losses[0] < CLIPPED < exact.exact_loss_start
        assert not own.learned and own.verdict == "myth: finite but wrong"


def test_jax_has_no_keras_variant(framework_runs):
    r = run_of(framework_runs, "jax", "softmax_overflow")
    assert [v.name for v in r.variants] == ["hand_softmax", "log_of_softmax", "log_softmax_as_probs",
                                            "cross_entropy_on_logits", "clip_logits_10"]
    assert not any(k.startswith("keras_") for k in r.probes)


@pytest.mark.parametrize("framework", ALL)
def test_softmax_claims_by_framework(framework_runs, framework):
    claims = run_of(framework_runs, framework, "softmax_overflow").claims
    assert [c.verdict.value for c in claims] == ["partly", "partly", "refuted"]
    large = claims[0].evidence
    assert "only the hand-written and log(softmax) paths fail" in large
    if framework == "jax":
        assert "Keras" not in large
    elif takes_logits_back(framework):
        assert "Keras' softmax then categorical_crossentropy: finite=True" in large
        assert "it gives 400 where from_logits=True gives 400" in large
        assert large.endswith("no NaN and the exact loss: Keras took the logits back from its own softmax")
    else:
        assert "it gives 16.12 where from_logits=True gives 400" in large
        assert "no NaN, but a wrong loss: it clips probabilities at 1e-7" in large


# ---------------------------------------------------------------- bce_log_zero

def grad(r, loss, z):
    return r.probes[f"dloss/dlogit_{loss}_at_z={z:g}"]


@pytest.mark.parametrize("framework", ALL)
def test_bce_hand_fails_and_fixes_learn(framework_runs, framework):
    r = run_of(framework_runs, framework, "bce_log_zero")
    assert r.reproduced is True and r.fixed is True
    hand = r.variant("hand_bce")
    assert hand.nonfinite_step == 0 and math.isnan(hand.first_nonfinite.loss)
    exact, clamp = r.variant("bce_with_logits"), r.variant("clamp_eps_1e-7")
    assert exact.finite and exact.learned and exact.accuracy_end > 0.99 and exact.exact_loss_end < 0.05
    assert clamp.finite and clamp.lossy and clamp.learned and len(clamp.losses) == 60
    # The clamp's loss reads small where the exact loss starts in the tens: wrong examples score 16.1 at most.
    assert clamp.losses[0] < CLIPPED < clamp.exact_loss_start
    assert "torch_bce_on_probs" not in [v.name for v in r.variants]  # torch's own function


@pytest.mark.parametrize("framework", ALL)
def test_bce_gradients_at_wrong_logits(framework_runs, framework):
    r = run_of(framework_runs, framework, "bce_log_zero")
    for loss in ("hand", "clamp_1e-7", "with_logits"):
        assert grad(r, loss, -5) == pytest.approx(-0.99331, abs=1e-5)
    assert grad(r, "hand", -30) == pytest.approx(-1.0, abs=1e-6) and math.isnan(grad(r, "hand", -120))
    assert grad(r, "clamp_1e-7", -30) == 0.0 and grad(r, "clamp_1e-7", -120) == 0.0
    assert grad(r, "with_logits", -30) == -1.0 and grad(r, "with_logits", -120) == -1.0


@pytest.mark.parametrize("framework", KERAS)
def test_keras_bce_on_probabilities(framework_runs, framework):
    r = run_of(framework_runs, framework, "bce_log_zero")
    own = r.variant("keras_bce_on_probs")
    assert own.role == "fix" and own.lossy and own.finite and own.learned
    if takes_logits_back(framework):
        assert grad(r, "keras_bce", -30) == -1.0 and grad(r, "keras_bce", -120) == -1.0
        assert own.losses == pytest.approx(r.variant("bce_with_logits").losses, rel=1e-4)
    else:
        # The clip at 1e-7 built in: the same numbers as the hand clamp, and no gradient past it.
        assert grad(r, "keras_bce", -30) == 0.0 and grad(r, "keras_bce", -120) == 0.0
        assert own.losses == pytest.approx(r.variant("clamp_eps_1e-7").losses, rel=1e-4)


@pytest.mark.parametrize("framework", ALL)
def test_bce_claim_by_framework(framework_runs, framework):
    (claim,) = run_of(framework_runs, framework, "bce_log_zero").claims
    assert claim.verdict.value == "partly"
    assert "gradient at a wrong logit of -30: " in claim.evidence and "(exact: -1)" in claim.evidence
    assert "torch's BCE" not in claim.evidence
    if framework == "jax":
        assert "Keras" not in claim.evidence
    else:
        said = "-1, and at -120: -1" if takes_logits_back(framework) else "-?0, and at -120: -?0"
        assert re.search(f"Keras' binary_crossentropy there: {said} ", claim.evidence), claim.evidence
        assert "(trained with it: finite=True" in claim.evidence


def test_table_shows_each_framework_row(framework_runs):
    """The side-by-side table: Keras' own variants appear on Keras rows only."""
    from nanlab.frameworks.render import render

    for framework in ALL:
        need_framework(framework)
    text = render({f: framework_runs[f]["bce_log_zero"] for f in ALL})
    rows = text[text.index("keras_bce_on_probs (fix*)"):].splitlines()
    assert [rows[0].split()[2]] + [line.split()[0] for line in rows[1:3]] == KERAS
    assert rows[3] == ""  # the table ends: no jax row for Keras' own variant
