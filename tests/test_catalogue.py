"""Issue 3: the full catalogue. Every scenario reproduces its failure on CPU and
every exact fix works; stalls are reported as stalls; myths are measured."""
import json
import math

import pytest
import torch

from nanlab.lab import registry
from nanlab.lab.claims import collect_claims, render_table, write_claims
from nanlab.lab.result import Verdict
from nanlab.debug.validate import DataError, impute_column_mean, validate_data, validate_labels

ALL = registry.builtin_names()
STALLS = {"dying_relu", "vanishing_gradients"}


def test_catalogue_has_every_issue_scenario():
    assert set(ALL) >= {"softmax_overflow", "bce_log_zero", "unscaled_sgd", "tanh_explosion", "custom_backward_div0",
                        "sparse_ce_bad_labels", "exploding_init", "softmax_underflow", "zero_variance_features",
                        "nan_in_inputs", "dying_relu", "vanishing_gradients", "fp16_overflow", "masked_softmax",
                        "sqrt_at_zero"}


@pytest.mark.parametrize("name", ALL)
def test_reproduces_and_fixes(result_of, name):
    r = result_of(name)
    assert r.reproduced, [(v.name, v.verdict) for v in r.variants]
    assert r.fixed, [(v.name, v.verdict) for v in r.variants]
    for v in r.variants:
        if v.role == "fix":
            assert v.finite, v.name
        if v.role == "myth":
            assert v.verdict.startswith("myth"), (v.name, v.verdict)  # measured not to work as claimed
    if name in STALLS:
        assert r.failure == "stall" and r.broken.finite and r.broken.verdict == "stalled"
        assert "stalled" in __import__("nanlab.reports.scenario_report", fromlist=["render"]).render(r)
    else:
        assert r.broken.verdict == "reproduced"


def test_dead_units_are_measured(result_of):
    r = result_of("dying_relu")
    relu = max(r.broken.metrics.values())
    assert relu > 0.5 and max(r.variant("relu_lr_0.1").metrics.values()) < relu


def test_vanishing_gradient_ratio_is_measured(result_of):
    r = result_of("vanishing_gradients")
    assert r.broken.metrics["grad_norm_first_over_last_block"] < 1e-4
    assert r.variant("relu_he").metrics["grad_norm_first_over_last_block"] > 0.1


def test_fp16_gradscaler_and_underflow(result_of):
    r = result_of("fp16_overflow")
    assert r.broken.first_nonfinite.event.kind == "inf"
    assert r.probes["fp16_zero_grad_fraction_unscaled"] > r.probes["fp16_zero_grad_fraction_scaled_2^16"]
    assert r.variant("autocast_fp16_gradscaler").metrics["skipped_steps"] >= 1


def test_labels_raise_on_cpu_and_all_ignored_is_nan(result_of):
    p = result_of("sparse_ce_bad_labels").probes
    assert p["cross_entropy_label_3_of_3_classes_raises"] is True
    assert p["cross_entropy_label_3_of_3_classes"].startswith("raises")
    assert p["cross_entropy_all_ignored_raises"] is False and math.isnan(p["cross_entropy_all_ignored_loss"])


def test_myth_loss_gap_is_in_result_json(result_of):
    data = result_of("softmax_overflow").to_dict()
    myth = next(v for v in data["variants"] if v["name"] == "log_softmax_as_probs")
    assert myth["role"] == "myth" and abs(myth["loss_gap"]) > 10


def test_validate_labels_names_every_problem():
    with pytest.raises(DataError) as info:
        validate_labels(torch.tensor([0.0, 2.7, float("nan"), 5.0, -3.0]), num_classes=3)
    msg = str(info.value)
    assert "NaN" in msg and "non-integer" in msg and "negative" in msg and ">= num_classes=3" in msg
    with pytest.raises(DataError, match="every label = ignore_index"):
        validate_labels(torch.tensor([[0, 1], [-100, -100]]), num_classes=2)
    validate_labels(torch.tensor([[0, 1], [2, -100]]), num_classes=3)  # clean labels pass


def test_validate_data_names_rows_and_columns():
    x = torch.zeros(5, 3)
    x[1, 2], x[4, 0] = float("nan"), float("inf")
    with pytest.raises(DataError, match=r"1 NAN in rows 1, columns 2; 1 INF in rows 4, columns 0"):
        validate_data(x)
    assert torch.isfinite(impute_column_mean(x)).all()


def test_claims_table_counts(tmp_path):
    """The claims table, pinned: which claims exist and what each measures as."""
    from conftest import xdist_shared_dir
    from shared_runs import memoized_runs

    with memoized_runs(xdist_shared_dir()):
        rows = collect_claims()
    assert {r.scenario for r in rows} == set(ALL)
    counts = {v: sum(r.verdict is v for r in rows) for v in Verdict}
    assert len(rows) == 23 and counts == {Verdict.confirmed: 12, Verdict.partly: 5, Verdict.refuted: 6,
                                   Verdict.not_decided: 0}, counts
    table = render_table(rows)
    assert "23 claims: 12 confirmed, 5 partly, 6 refuted" in table
    saved = json.loads(write_claims(rows, tmp_path).read_text())
    assert [set(r) for r in saved] == [{"scenario", "claim", "verdict", "evidence", "framework"}] * 23
    assert [r["verdict"] for r in saved] == [r.verdict.value for r in rows]


def test_claims_run_for_real_give_what_the_shared_runs_gave(result_of, monkeypatch):
    """collect_claims, not shared, over two quick scenarios one after another in one
    process: the same claims as the shared runs that the table above was built from."""
    quick = ["bce_log_zero", "softmax_underflow"]
    monkeypatch.setattr(registry, "names", lambda: quick)
    real = [row.to_dict() for row in collect_claims()]
    assert len(real) == 3 and real == [c.to_dict() for name in quick for c in result_of(name).claims]


@pytest.mark.parametrize("name,overrides,claim_index,default,changed", [
    ("softmax_overflow", ("scenario.data.input_scale=0.01", "steps=5"), 0, "partly", "refuted"),
    ("unscaled_sgd", ("scenario.data.big_scale=1.0",), 0, "confirmed", "refuted"),
])
def test_claim_verdict_follows_the_measurement(result_of, name, overrides, claim_index, default, changed):
    assert result_of(name).claims[claim_index].verdict == default
    assert result_of(name, *overrides).claims[claim_index].verdict == changed


def test_readme_and_docs_list_every_scenario():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme, docs = (root / "README.md").read_text(), (root / "docs" / "scenarios.md").read_text()
    for name in ALL:
        row = f"| {name} | {registry.summary(name)} |"
        assert row in readme, row
        assert f"## {name}" in docs and registry.summary(name) in docs
