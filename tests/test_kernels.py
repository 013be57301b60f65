"""Issue 5: the kernel checker breaks naive kernels, passes stable ones, and says why."""
import json
import math

import numpy as np
import pytest
import torch

from nanlab.config import options
from nanlab.kernels import KINDS, CaseResult, Report, cases, check
from nanlab.kernels import examples as ex


def failing(report):
    return {c.name for c in report.failures}


@pytest.mark.parametrize("name,kind", [(n, k) for n, k in ex.STABLE.items() if n != "torch_cross_entropy"])
def test_stable_torch_kernels_pass(name, kind):
    report = check(getattr(ex, name), kind=kind)
    assert report.passed, report.table()
    assert {c.dtype for c in report.cases} == {"float32", "float64", "float16", "bfloat16"}


def test_torch_cross_entropy_fails_only_the_documented_case():
    # torch's own op gives a NaN gradient for an ignored row that is entirely -inf
    # (its log_softmax backward runs before the row is ignored). Reported, not hidden.
    report = check(ex.torch_cross_entropy, kind="cross_entropy")
    assert failing(report) == {"fully_neg_inf_row_ignored"}
    assert all("gradient: nan" in c.reason for c in report.failures)


def test_stable_numpy_kernel_passes_forward_and_gradient():
    report = check(ex.numpy_cross_entropy, kind="cross_entropy", framework="numpy", grad_fn=ex.numpy_cross_entropy_grad)
    assert report.passed, report.table()
    assert any(c.grad_error is not None for c in report.cases)
    assert {c.status for c in report.cases if c.dtype == "bfloat16"} == {"unsupported"}


@pytest.mark.parametrize("name,must_fail", [
    ("naive_softmax_cross_entropy", "large_logits_both_signs"),
    ("log_of_softmax_cross_entropy", "large_gap"),
    ("bce_without_clamp", "probs_0_and_1_agreeing[none]"),
    ("bce_with_logits_via_sigmoid", "saturating_120[none]"),
    ("log_softmax_without_max", "large_positive"),
    ("cross_entropy_none_backward_uses_first_upstream", "random[none]"),
    ("cross_entropy_masks_after_lse", "fully_neg_inf_row_ignored"),
])
def test_naive_kernels_fail_where_they_should(name, must_fail):
    report = check(getattr(ex, name), kind=ex.NAIVE[name])
    assert not report.passed and must_fail in failing(report), report.table()


def test_all_ones_upstream_would_hide_the_per_row_backward_bug():
    """With reduction='mean' every row's upstream is equal, so the bug is invisible;
    the random upstream of reduction='none' exposes it in the gradient."""
    report = check(ex.cross_entropy_none_backward_uses_first_upstream, kind="cross_entropy", dtypes=["float64"])
    by_name = {c.name: c for c in report.cases}
    assert by_name["random"].status == "pass"
    assert by_name["random[none]"].status == "fail" and by_name["random[none]"].reason.startswith("gradient")


def test_missing_keyword_is_unsupported_not_failed():
    def ce_without_options(logits, target, reduction="mean"):
        return torch.nn.functional.cross_entropy(logits, target, reduction=reduction)

    report = check(ce_without_options, kind="cross_entropy", dtypes=["float32"])
    unsupported = {c.name: c.reason for c in report.cases if c.status == "unsupported"}
    assert {"label_smoothing", "label_smoothing_neg_inf"} <= set(unsupported)
    assert all(r == "the kernel takes no label_smoothing" for n, r in unsupported.items() if "smoothing" in n)
    assert report.passed, report.table()


def test_undefined_reference_accepts_any_value_and_defined_infinities_must_match():
    def zeros_for_empty_rows(x, dim=-1):
        out = torch.softmax(x, dim)
        return torch.where(torch.isnan(out), torch.zeros_like(out), out)

    assert check(zeros_for_empty_rows, kind="softmax").passed  # NaN or 0 both accepted for an all -inf row

    def nan_logsumexp_for_empty_rows(x, dim=-1):
        m = x.amax(dim, keepdim=True)
        return (m + torch.log(torch.exp(x - m).sum(dim, keepdim=True))).squeeze(dim)  # -inf - -inf = NaN

    report = check(nan_logsumexp_for_empty_rows, kind="logsumexp", dtypes=["float32"])
    bad = {c.name: c for c in report.failures}
    assert "fully_neg_inf_row" in bad and "nan where the reference is -inf" in bad["fully_neg_inf_row"].reason


def test_catalogue_covers_the_issue():
    names = {c.name for c in cases("cross_entropy")}
    assert {"large_logits_both_signs", "large_gap", "all_equal", "some_neg_inf", "fully_neg_inf_row_ignored",
            "label_smoothing_neg_inf", "ignore_index_rows", "all_rows_ignored", "random[none]", "random[sum]",
            "noncontiguous[none]", "odd_sizes", "many_classes", "near_fp16_max"} <= names
    assert {"probs_0_and_1_agreeing[none]", "probs_0_and_1_disagreeing[none]"} <= {c.name for c in cases("binary_cross_entropy")}
    assert {"saturating_20[none]", "saturating_50[none]", "saturating_120[none]"} <= {
        c.name for c in cases("binary_cross_entropy_with_logits")}
    assert all(cases(kind) for kind in KINDS)
    with pytest.raises(ValueError, match="unknown kernel kind"):
        cases("hinge")


@pytest.mark.parametrize("case", cases("log_softmax"), ids=str)
def test_cases_parametrize_one_test_per_case(case):
    assert check(torch.log_softmax, case).passed


def test_check_takes_the_kind_from_its_cases():
    some = cases("cross_entropy")[:2]
    one = check(ex.naive_softmax_cross_entropy, some[0], dtypes=["float32"])
    assert one.kind == "cross_entropy" and {c.name for c in one.cases} == {some[0].name}
    several = check(ex.naive_softmax_cross_entropy, cases=some, dtypes=["float32"])
    assert several.kind == "cross_entropy" and [c.name for c in several.cases] == [c.name for c in some]
    assert several.to_dict() == check(ex.naive_softmax_cross_entropy, kind="cross_entropy", cases=some,
                                      dtypes=["float32"]).to_dict()
    with pytest.raises(ValueError, match="all of one kind"):
        check(torch.softmax, cases=[cases("softmax")[0], cases("log_softmax")[0]])
    with pytest.raises(ValueError, match="kind='softmax'"):
        check(torch.softmax, kind="softmax", cases=cases("log_softmax")[:1])
    with pytest.raises(TypeError, match="needs a kind"):
        check(torch.softmax)
    with pytest.raises(AttributeError, match=r"check\(fn, case\)"):
        some[0].check(torch.softmax)


def test_per_kind_tables_have_every_kind_once():
    from nanlab.kernels.catalogue import REFERENCES
    from nanlab.kernels.check import FRAMEWORK_OPS

    assert KINDS is options.KERNEL_KINDS
    assert set(REFERENCES) == set(FRAMEWORK_OPS) == set(options.KERNEL_KINDS)
    assert {case.kind for kind in KINDS for case in cases(kind)} == set(options.KERNEL_KINDS)
    with pytest.raises(ValueError, match="unknown framework 'jax'; choose torch or numpy"):
        check(torch.softmax, kind="softmax", framework="jax")


def test_report_json_writes_non_finite_errors_as_strings():
    report = Report("k", "softmax", "torch", [CaseResult("c", "float32", "d", "fail", math.inf, -math.inf, "r"),
                                              CaseResult("e", "float32", "d", "fail", math.nan)])
    data = report.to_dict()
    assert [(c["forward_error"], c["grad_error"]) for c in data["cases"]] == [("inf", "-inf"), ("nan", None)]
    assert data["passed"] is False
    json.dumps(data, allow_nan=False)


def test_bce_probs_torch_clamp_is_reported_honestly():
    # torch clamps log at -100: a loss of 100 where the exact loss is +inf.
    report = check(torch.nn.functional.binary_cross_entropy, kind="binary_cross_entropy", dtypes=["float32"])
    assert "probs_0_and_1_disagreeing[none]" in failing(report)


def test_jax_kernel_through_numpy(tmp_path):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def jax_log_softmax(x, dim=-1):
        return np.asarray(jax.nn.log_softmax(jnp.asarray(x), axis=dim))

    report = check(jax_log_softmax, kind="log_softmax", framework="numpy", dtypes=["float32"])
    assert report.passed, report.table()


def test_plugin_fixture_lists_failing_cases(pytester):
    pytester.makepyfile("""
        from nanlab.kernels import examples as ex

        def test_naive(nanlab_check):
            nanlab_check(ex.log_softmax_without_max, kind="log_softmax", dtypes=["float32"])

        def test_stable(nanlab_check):
            nanlab_check(ex.torch_log_softmax, kind="log_softmax", dtypes=["float32"])

        def test_one_case(nanlab_check):
            from nanlab.kernels import cases
            assert len(nanlab_check(ex.torch_log_softmax, cases("log_softmax")[0], dtypes=["float32"]).cases) == 1
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*log_softmax_without_max (log_softmax, torch): * fail* -> FAILED",
                                 "*  large_positive ?float32?: forward: *inf where the reference is*"])
    assert "Report(" not in result.stdout.str() and "CaseResult(" not in result.stdout.str()


@pytest.mark.parametrize("args,code", [
    (["kernel.fn=nanlab.kernels.examples:torch_log_softmax", "kernel.kind=log_softmax"], 0),
    (["kernel.fn=nanlab.kernels.examples:naive_softmax_cross_entropy", "kernel.kind=cross_entropy",
      "kernel.dtypes=[float32]"], 1),
    (["kernel.fn=no.such.module:f", "kernel.kind=softmax"], 2),
    (["kernel.fn=nanlab.kernels.examples:torch_softmax", "kernel.kind=hinge"], 2),
])
def test_check_cli_exit_codes(cli, tmp_path, args, code):
    proc = cli("mode=check", *args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == code, proc.stderr
    if code == 2:
        assert proc.stderr.startswith("nanlab: error: kernel.") and len(proc.stderr.strip().splitlines()) == 1
    else:
        data = json.loads((tmp_path / "check.json").read_text())
        assert data["passed"] is (code == 0) and data["cases"] and "case" in proc.stdout


def test_a_kernel_that_crashes_fails_its_cases_without_stopping_the_check():
    def crashes(x, dim=-1):
        raise ZeroDivisionError("kernel bug")

    report = check(crashes, kind="softmax", dtypes=["float32"])
    assert not report.passed and len(report.failures) == len(report.cases)
    assert all(c.reason == "raised ZeroDivisionError: kernel bug" for c in report.failures)


def test_check_cli_bad_kernel_module_and_missing_fn(cli, tmp_path):
    (tmp_path / "broken_kernels.py").write_text("raise RuntimeError('cannot even import')\n")
    proc = cli("mode=check", "kernel.fn=broken_kernels:f", "kernel.kind=softmax", f"hydra.run.dir={tmp_path / 'o'}",
               cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "nanlab: error: kernel.fn=broken_kernels:f: cannot import broken_kernels (RuntimeError: cannot even import)")
    proc = cli("mode=check", "kernel.kind=softmax", f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "must be an import path of the form package.module:function" in proc.stderr
    assert "Traceback" not in proc.stderr
