"""The new built-in kinds (KL, NLL, softplus, log-sigmoid, RMSNorm, LayerNorm) and kinds a user declares."""
import math
import re
import time
import warnings
from pathlib import Path

import pytest
import torch

from nanlab.kernels import Arg, Case, Kind, cases, check, register
from nanlab.kernels import examples as ex
from nanlab.kernels.catalogue import USER_KINDS
from nanlab.kernels.kinds import BUILTIN

NEW_KINDS = ("kl_div", "nll_loss", "softplus", "log_sigmoid", "rms_norm", "layer_norm")
ALL_DTYPES = ("bfloat16", "float16", "float32", "float64")
# The naive form of each new kind, and a case it must fail at every dtype (one-pass variance:
# float64 keeps enough digits).
NAIVE_FAILS = {
    "naive_softplus": "past_exp_overflow",
    "log_of_sigmoid": "past_sigmoid_underflow",
    "naive_kl_div": "zero_targets_next_to_neg_inf[none]",
    "nll_loss_via_exp_log": "very_negative_target_log_prob[none]",
    "rms_norm_without_eps": "all_zero_row",
    "layer_norm_without_eps": "constant_rows",
    "layer_norm_one_pass_variance": "large_offset",
    "naive_logsumexp": "large_positive",
}
CORRECT = ("torch_softplus", "torch_log_sigmoid", "torch_nll_loss", "torch_rms_norm", "stable_kl_div",
           "upcast_layer_norm")


@pytest.fixture(scope="module")
def reports():
    """One full check (every case, all four dtypes) of each example kernel, and its CPU seconds."""
    measured = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # F.kl_div's reduction='mean' warns on every call
        for name in (*NAIVE_FAILS, *CORRECT):
            kind = {**ex.NAIVE, **ex.STABLE}[name]
            started = time.process_time()
            report = check(getattr(ex, name), kind=kind)
            measured[name] = (report, time.process_time() - started)
    return measured


def test_torch_or_a_careful_kernel_passes_every_new_kind(reports):
    assert {ex.STABLE[name] for name in CORRECT} == set(NEW_KINDS)
    for name in CORRECT:
        report, _ = reports[name]
        assert report.passed, report.table(failures_only=True)
        assert {c.dtype for c in report.cases} == {"float32", "float64", "float16", "bfloat16"}


def test_each_naive_form_fails_its_case_at_every_dtype(reports):
    for name, case in NAIVE_FAILS.items():
        report, _ = reports[name]
        assert not report.passed
        expected = ALL_DTYPES[:3] if name == "layer_norm_one_pass_variance" else ALL_DTYPES
        assert tuple(sorted(c.dtype for c in report.failures if c.name == case)) == expected, (
            name, report.table(failures_only=True))


def test_a_full_check_of_a_new_kind_stays_under_3_seconds(reports):
    seconds = {name: round(reports[name][1], 3) for name in CORRECT}
    print("CPU seconds per full check:", seconds)
    assert max(seconds.values()) < 3.0, seconds


def test_every_new_case_says_what_it_is_and_the_norms_take_eps_explicitly():
    for kind in NEW_KINDS:
        for case in cases(kind):
            assert case.description, case
            _, keywords = case.build(torch.Generator().manual_seed(0))
            if kind in ("rms_norm", "layer_norm"):
                assert "eps" in keywords and "normalized_shape" in keywords, case


def test_keyword_tensors_come_in_the_cases_dtype():
    """F.nll_loss refuses a float64 weight with float16 inputs: the class weight is cast with them."""
    case = next(c for c in cases("nll_loss") if c.name == "class_weights")
    report = check(torch.nn.functional.nll_loss, case, dtypes=["float16", "bfloat16"])
    assert report.passed, report.table()
    wrong_weight = check(lambda x, t, weight=None, ignore_index=-100, reduction="mean":
                         torch.nn.functional.nll_loss(x, t, None, ignore_index=ignore_index, reduction=reduction),
                         case, dtypes=["float32"])
    assert not wrong_weight.passed  # ignoring the weight is caught


# ---------------------------------------------------------------- a kind the user declares

def _docs_example() -> dict:
    """Run the example of docs/kernels.md's "Your own kinds" as written; its asserts are part of it."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "kernels.md").read_text(encoding="utf-8")
    section = text.split("## Your own kinds", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/kernels.md", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def docs_example():
    return _docs_example()


def test_the_docs_example_runs_and_catches_the_fused_kernels_gradient(docs_example):
    report = docs_example["report"]
    assert {c.name for c in report.failures} >= {"extremal_values"}
    assert all(c.part == "gradient" for c in report.failures), report.table(failures_only=True)
    kind = docs_example["LOGADDEXP"]
    assert [c.name for c in cases("logaddexp")] == ["random", "extremal_values", "large_magnitude", "tiny_magnitude"]
    assert kind.args[0].extremal_values()[-1] == -math.inf and 1e4 in kind.args[0].extremal_values()


def test_a_declared_kind_has_xfail_and_baselines(docs_example, tmp_path):
    fused, fixed, kind = docs_example["fused_logaddexp"], docs_example["fixed_logaddexp"], docs_example["LOGADDEXP"]
    assert check(fused, kind=kind, xfail=["extremal_values", "tiny_magnitude@float16"]).passed
    assert not check(fixed, kind=kind, xfail=["random@float16"]).passed  # strict: a listed case that passes fails
    with pytest.raises(ValueError, match="not a logaddexp case"):
        check(fixed, kind=kind, xfail=["no_such_case"])
    baseline = check(fused, kind=kind)
    assert check(fused, kind=kind, baseline=baseline).passed  # the same failures, no worse
    assert check(fixed, kind=kind, baseline=baseline).counts()["pass"] == 16


def test_a_declared_kind_checks_the_gradient_of_every_case_mpmath_ones_included(docs_example):
    class NaNBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return torch.logaddexp(a, b)

        @staticmethod
        def backward(ctx, grad):
            return torch.full_like(grad, math.nan), None

    for kind in (docs_example["LOGADDEXP"], docs_example["LOGADDEXP_MP"]):
        report = check(lambda a, b: NaNBackward.apply(a, b), kind=kind, dtypes=["float64"])
        assert all(c.status == "fail" and c.reason.startswith("gradient: nan") for c in report.cases), report.table()


def test_the_mpmath_reference_agrees_with_the_float64_one(docs_example):
    a = torch.tensor([0.0, 89.0, -1e4, 3.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.0, 89.0, 20.0, -math.inf], dtype=torch.float64)
    mp = docs_example["LOGADDEXP_MP"].reference_fn(a, b)
    (grad,) = torch.autograd.grad(mp, a, torch.ones(4, dtype=torch.float64))
    exact = docs_example["ref_logaddexp"](a.detach(), b)
    assert torch.allclose(mp, exact, rtol=1e-15, atol=0)
    assert torch.allclose(grad, torch.tensor([0.5, 0.5, 0.0, 1.0], dtype=torch.float64), rtol=1e-12, atol=1e-300)


def test_a_kind_needs_one_reference_and_a_new_name():
    arg = (Arg("x"),)
    with pytest.raises(ValueError, match="exactly one of reference= and mp_reference="):
        Kind("two_refs", arg, reference=torch.exp, mp_reference=math.exp)
    with pytest.raises(ValueError, match="built-in kind"):
        register(Kind("softmax", arg, reference=torch.exp))
    with pytest.raises(ValueError, match="declare your own with nanlab.kernels.Kind|declare it as"):
        cases("no_such_kind")
    assert set(BUILTIN) >= set(NEW_KINDS)


def test_a_hand_written_case_of_a_declared_kind_uses_its_reference():
    def ref_square(x):
        return x * x

    extra = Case("three", "square_kind", "x = 3", lambda g: ([torch.tensor([3.0], dtype=torch.float64)], {}))
    kind = Kind("square_kind", (Arg("x", ("N",), -100.0, 100.0),), reference=ref_square, cases=(extra,))
    try:
        report = check(lambda x: x * x, kind=kind, dtypes=["float32"])
        assert report.passed and [c.name for c in report.cases][0] == "three"
        assert not check(lambda x: x * x + (x == 3).to(x.dtype), kind=kind, dtypes=["float32"]).passed
    finally:
        USER_KINDS.pop("square_kind", None)
