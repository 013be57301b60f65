"""Verdicts you can trust on real code: each test here failed on the checker before it
was made to judge what the kernel returned, at the dtype it returned, on every case."""
import dataclasses
import json
import math
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanlab import jsonio
from nanlab.config import options
from nanlab.errors import ConfigError
from nanlab.kernels import Case, cases, check, load_report
from nanlab.kernels import examples as ex
from nanlab.kernels.catalogue import IGNORE, REQUIRED_KEYWORDS, reference

checker = sys.modules["nanlab.kernels.check"]  # the module; nanlab.kernels.check is the function


def by_label(report):
    return {(c.name, c.dtype): c for c in report.cases}


def one_case(name, kind, description, tensors, **keywords):
    return Case(name, kind, description, lambda g: ([t.clone() for t in tensors], dict(keywords)))


# ---------------------------------------------------------------- 1. a kernel that cannot run the core cases never passes

def zero_loss(logits, target):
    return torch.zeros((), requires_grad=True)


def test_a_kernel_without_reduction_fails_its_core_cases_instead_of_passing_them_as_unsupported():
    report = check(zero_loss, kind="cross_entropy")
    assert len(report.cases) == len(cases("cross_entropy")) * len(options.DTYPES) and not report.passed
    core = {c.name for c in cases("cross_entropy") if c.core}
    for c in report.cases:
        if c.name in core:
            assert c.status == "fail" and "takes no reduction" in c.reason and "core case" in c.reason
        else:
            assert c.status == "unsupported"
    assert len(report.failures) == 4 * len(core)


def test_the_same_kernel_with_reduction_runs_the_core_cases():
    def ce_reduction_only(logits, target, reduction="mean"):
        return F.cross_entropy(logits, target, reduction=reduction)

    report = check(ce_reduction_only, kind="cross_entropy", dtypes=["float32"])
    assert report.passed, report.table()
    assert {c.name for c in report.cases if c.status == "pass"} == {c.name for c in cases("cross_entropy") if c.core}


def test_a_check_in_which_nothing_ran_fails():
    def np_softmax(x, dim=-1):
        e = np.exp(x - x.max(dim, keepdims=True))
        return e / e.sum(dim, keepdims=True)

    nothing = check(np_softmax, kind="softmax", framework="numpy", dtypes=["bfloat16"])
    assert {c.status for c in nothing.cases} == {"unsupported"} and not nothing.passed
    assert "no case ran" in nothing.table() and "no case ran" in repr(nothing)
    assert check(np_softmax, kind="softmax", framework="numpy", dtypes=["float32"]).passed


def test_the_zero_kernel_fails_the_fixture(pytester):
    pytester.makepyfile("""
        import torch

        def zero_loss(logits, target):
            return torch.zeros((), requires_grad=True)

        def test_zero(nanlab_check):
            nanlab_check(zero_loss, kind="cross_entropy", dtypes=["float32"])
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*random?none? ?float32?: the kernel takes no reduction; every cross_entropy "
                                 "kernel must take reduction (a core case)*"])


def test_sys_exit_in_a_kernel_fails_the_case_and_the_check_goes_on():
    calls = []

    def exits_on_neg_inf(x, dim=-1):
        calls.append(1)
        if torch.isinf(x).any():
            sys.exit(0)
        return torch.softmax(x, dim)

    report = check(exits_on_neg_inf, kind="softmax", dtypes=["float32"])
    failed = {c.name: c.reason for c in report.failures}
    assert failed == {name: "raised SystemExit: 0" for name in ("some_neg_inf", "fully_neg_inf_row", "fully_neg_inf_dim_0")}
    assert len(calls) == len(report.cases) == len(cases("softmax"))  # it went on after the exits


def test_keyboard_interrupt_in_a_kernel_still_stops_the_check():
    previous = signal.getsignal(signal.SIGALRM)

    def interrupted(x, dim=-1):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check(interrupted, kind="softmax", dtypes=["float32"])
    assert signal.getsignal(signal.SIGALRM) is previous and signal.getitimer(signal.ITIMER_REAL)[0] == 0


def _hangs_on_neg_inf(how):
    def kernel(x, dim=-1):
        if torch.isinf(x).any():
            if how == "python":
                while True:
                    pass
            if how == "torch":
                y = x
                while True:
                    y = torch.nan_to_num(y) * 1.0
            if how == "sleep":
                time.sleep(3600)
            if how == "swallows_once":
                try:
                    time.sleep(3600)
                except BaseException:
                    pass
                while True:
                    pass
        return torch.softmax(x, dim)

    return kernel


@pytest.mark.parametrize("how", ["python", "torch", "sleep", "swallows_once"])
def test_a_hanging_kernel_is_stopped_and_the_case_it_was_on_named(how):
    start = time.monotonic()
    report = check(_hangs_on_neg_inf(how), kind="softmax", dtypes=["float32"], timeout=2)
    assert time.monotonic() - start < 10
    assert not report.passed
    assert [c.status for c in report.cases] == ["pass"] * 5 + ["fail"]  # random .. all_equal ran, then some_neg_inf
    assert report.cases[-1].name == "some_neg_inf" and report.cases[-1].reason.startswith("timed out")
    left = len(cases("softmax")) - 6
    assert report.stopped == f"timed out after 2 s on some_neg_inf [float32]; {left} case-dtype pairs not run"
    assert report.not_run == left and "stopped: timed out" in report.table()


def test_the_deadline_puts_back_the_alarm_it_found():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        assert check(torch.softmax, kind="softmax", dtypes=["float32"], timeout=5).passed
        assert signal.getsignal(signal.SIGALRM) is not None and not fired
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 20 < remaining < 30  # the other timer still runs, less the time the check took
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_default_check_runs_off_the_main_thread_and_an_explicit_timeout_there_is_refused():
    # Issue 18: the library's default is no deadline, so check() works from any thread;
    # asking for one where SIGALRM cannot be installed is refused, never silently dropped.
    outcome = {}

    def in_thread():
        outcome["default"] = check(torch.softmax, kind="softmax", dtypes=["float32"]).passed
        try:
            check(torch.softmax, kind="softmax", dtypes=["float32"], timeout=5)
        except ValueError as err:
            outcome["explicit"] = str(err)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert outcome["default"] is True and "main thread" in outcome["explicit"]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the default armed nothing
    for bad in (0, -1, math.inf, "60", 1e308, 86400.5):
        with pytest.raises(ConfigError, match="timeout="):
            check(torch.softmax, kind="softmax", timeout=bad)
    assert check(torch.softmax, kind="softmax", dtypes=["float32"], timeout=86400).passed  # the largest accepted


def test_an_alarm_inside_the_deadlines_enter_leaves_no_timer_armed(monkeypatch):
    # Issue 23: the alarm fires before __enter__ returns (forced here: the arming call
    # waits for it). The first case is reported timed out, and afterwards no timer is
    # set and the old handler is back, so nothing fires later in user code.
    real = signal.setitimer

    def arm_then_wait(which, seconds, interval=0.0):
        previous = real(which, seconds, interval)
        if seconds > 0:
            time.sleep(5)  # interrupted by the alarm's CheckTimedOut
        return previous

    monkeypatch.setattr(signal, "setitimer", arm_then_wait)
    before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    report = check(torch.softmax, kind="softmax", dtypes=["float32"], timeout=0.01)
    monkeypatch.undo()
    assert time.monotonic() - start < 4
    assert not report.passed and report.cases[0].reason.startswith("timed out") and len(report.cases) == 1
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) is before
    time.sleep(0.6)  # past two RETRY_S intervals: a timer left armed would raise CheckTimedOut here


def test_a_tiny_timeout_fails_the_check_and_leaves_nothing_armed():
    for tiny in (1e-9, 1e-6, 1e-3):
        report = check(torch.softmax, kind="softmax", dtypes=["float32"], timeout=tiny)
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        assert report.stopped.startswith("timed out") or report.passed  # either way, said so
    time.sleep(0.6)


def test_an_output_of_the_wrong_shape_fails_with_both_shapes():
    def extra_axis(x, dim=-1):
        return x.softmax(-1)[None]

    report = check(extra_axis, kind="softmax", dtypes=["float32", "float64", "float16"])
    assert len(report.cases) == len(report.failures) == 3 * len(cases("softmax"))  # every case x 3 dtypes
    assert report.cases[0].reason == "forward: shape (1, 8, 5) where the reference has shape (8, 5)"

    def np_extra_axis(x, dim=-1):  # no gradient to trip over: the forward alone must catch it
        e = np.exp(x - x.max(dim, keepdims=True))
        return (e / e.sum(dim, keepdims=True))[None]

    report = check(np_extra_axis, kind="softmax", framework="numpy", dtypes=["float32", "float64", "float16"])
    assert len(report.failures) == 3 * len(cases("softmax")) and all("shape (1, " in c.reason for c in report.failures)
    assert check(lambda x, dim=-1: x.softmax(dim), kind="softmax", dtypes=["float32"]).passed


def test_a_numpy_gradient_of_the_wrong_shape_fails():
    case = cases("cross_entropy")[0]
    grad = lambda *a, **k: ex.numpy_cross_entropy_grad(*a, **k)[None]  # noqa: E731
    report = check(ex.numpy_cross_entropy, case, framework="numpy", grad_fn=grad, dtypes=["float64"])
    assert report.cases[0].reason == "gradient: shape (1, 8, 5) where the reference has shape (8, 5)"


# ---------------------------------------------------------------- 2. judged in the dtype the kernel returned

# float16 holds 65504 and -30128 exactly; the exact loss for target 1 is 95632, beyond float16's 65504.
LOSS_95632 = one_case("loss_95632", "cross_entropy", "logits [65504, -30128], target 1: the exact loss is 95632",
                      [torch.tensor([[65504.0, -30128.0]], dtype=torch.float64), torch.tensor([1])], reduction="none")


def test_a_kernel_that_upcasts_float16_and_returns_the_exact_loss_passes():
    def upcast_ce(logits, target, reduction="mean"):
        return F.cross_entropy(logits.float(), target, reduction=reduction)

    report = check(upcast_ce, LOSS_95632, dtypes=["float16"])
    assert report.passed, report.table()
    assert report.cases[0].forward_error == 0.0


def test_the_reference_is_rounded_to_a_dtype_only_when_the_output_has_that_dtype():
    assert check(F.cross_entropy, LOSS_95632, dtypes=["float16"]).passed  # float16 out: inf is the right answer

    def float16_ce_returned_as_float32(logits, target, reduction="mean"):
        return F.cross_entropy(logits, target, reduction=reduction).float()

    report = check(float16_ce_returned_as_float32, LOSS_95632, dtypes=["float16"])
    assert report.cases[0].reason == "forward: inf where the reference is 95632 at [0] (row 0 of the input, finite, target 1)"


def test_tolerances_follow_the_output_dtype():
    def float16_softmax_returned_as_float32(x, dim=-1):
        return torch.softmax(x, dim).float()

    report = check(float16_softmax_returned_as_float32, kind="softmax", dtypes=["float16"])
    assert "random" in {c.name for c in report.failures}
    assert "ulp of float32" in by_label(report)["random", "float16"].reason
    assert check(torch.softmax, kind="softmax", dtypes=["float16"]).passed


# ---------------------------------------------------------------- 3. the framework's op: a margin, and no self-vouching

def test_an_error_of_8_47e_5_against_the_frameworks_8_25e_5_is_noise_not_a_failure():
    # Gradient-like values up to 0.3: one float16 ulp there is 2.44e-4, and both
    # errors, at an entry of 0.012, are beyond torch.testing's tolerance (2.2e-5).
    # The floor is 2 * (1e-5 + 1e-3 * 0.3) = 6.2e-4 (2.5 ulp at 0.3).
    ref = torch.tensor([0.3, -0.25, 0.012, 0.1], dtype=torch.float64)
    bump = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    framework = ref + 8.25e-5 * bump
    measured = lambda: checker.compare(framework, ref, torch.float16)  # noqa: E731
    ok, error, why = checker.judge(ref + 8.47e-5 * bump, ref, torch.float16, measured, part="gradient")
    assert ok and error == pytest.approx(8.47e-5) and "within the floor" in why and not why.startswith("imprecise")
    # 3x the op's error, within the floor: passes, and says "imprecise" (not a failure).
    ok, _, why = checker.judge(ref + 3 * 8.25e-5 * bump, ref, torch.float16, measured, part="gradient")
    assert ok and why.startswith("imprecise") and "over 2x the framework's op" in why
    # Just past the floor fails, though the op would have vouched for less: flip at the floor.
    ok, _, why = checker.judge(ref + 6.3e-4 * bump, ref, torch.float16, measured, part="gradient")
    assert not ok and "beyond the floor of 0.00062" in why and "at [2] (" not in why
    ok, _, why = checker.judge(ref + 6.1e-4 * bump, ref, torch.float16, measured, part="gradient")
    assert ok
    assert checker.judge(ref + 1e-6 * bump, ref, torch.float16, lambda: pytest.fail("not needed"), part="gradient")[0]


def test_a_float32_upcast_attention_softmax_passes():
    def attention_softmax(x, dim=-1):
        return torch.softmax(x.float(), dim).to(x.dtype)

    report = check(attention_softmax, kind="softmax")
    assert report.passed, report.table()


def test_torch_logsumexp_cannot_vouch_for_its_own_gradient_on_1e4_times_5():
    case = next(c for c in cases("logsumexp") if c.name == "all_equal")
    assert torch.equal(case.build(torch.Generator())[0][0], torch.full((4, 5), 1e4, dtype=torch.float64))
    x = torch.full((5,), 1e4, dtype=torch.float16, requires_grad=True)
    torch.logsumexp(x, 0).backward()
    assert x.grad.tolist() == [1.0] * 5  # the exact gradient is 0.2 per entry
    report = check(torch.logsumexp, case, dtypes=["float16"])
    assert not report.passed and report.cases[0].reason.startswith("gradient: max error")
    # Without the record it still fails: 6690 ulp is beyond the floor, whatever the op does.
    report = check(torch.logsumexp, dataclasses.replace(case, framework_failures=()), dtypes=["float16"])
    assert not report.passed and "beyond the floor" in report.cases[0].reason
    assert check(ex.stable_logsumexp, case).passed


def test_torch_binary_cross_entropy_zero_gradient_at_0_and_1_fails():
    case = next(c for c in cases("binary_cross_entropy") if c.name == "probs_0_and_1_agreeing[none]")
    report = check(F.binary_cross_entropy, case, dtypes=["float32"])
    assert not report.passed and " 0 where the reference is" in report.cases[0].reason


@pytest.mark.parametrize("kind", options.KERNEL_KINDS)
def test_torch_fails_exactly_the_failures_the_catalogue_records(kind):
    op = checker.FRAMEWORK_OPS[kind]
    recorded = {(c.name, f.dtype): f for c in cases(kind) for f in c.framework_failures}
    report = check(op, kind=kind)
    assert {(c.name, c.dtype) for c in report.failures} == set(recorded), report.table()
    for c in report.failures:
        record = recorded[c.name, c.dtype]
        measured = c.forward_error if record.part == "forward" else c.grad_error
        assert c.part == record.part
        assert (measured == record.error == math.inf) or record.error / 2 <= measured <= 2 * record.error
    # Each record describes a real failure: without it the op fails all the same.
    stripped = [dataclasses.replace(c, framework_failures=()) for c in cases(kind) if c.framework_failures]
    for case in stripped:
        dtypes = sorted({d for (name, d) in recorded if name == case.name})
        assert not check(op, case, dtypes=dtypes).counts()["pass"]


def test_the_catalogue_records_torch_s_failures_on_these_cases():
    recorded = {(c.kind, c.name) for kind in options.KERNEL_KINDS for c in cases(kind) if c.framework_failures}
    assert recorded == {("cross_entropy", "fully_neg_inf_row_ignored"),
                        ("binary_cross_entropy", "probs_0_and_1_agreeing[none]"),
                        ("binary_cross_entropy", "probs_0_and_1_disagreeing[none]"),
                        ("binary_cross_entropy", "probs_near_0_and_1[none]"),
                        ("logsumexp", "all_equal"), ("logsumexp", "huge_close_values"),
                        ("kl_div", "zero_targets_next_to_neg_inf[none]"),
                        ("kl_div", "zero_targets_next_to_neg_inf[batchmean]"), ("kl_div", "log_target_neg_inf[batchmean]"),
                        ("layer_norm", "constant_rows"), ("layer_norm", "large_offset")}


# ---------------------------------------------------------------- 4. every case checks the gradient

@pytest.mark.parametrize("kind", options.KERNEL_KINDS)
def test_every_case_has_a_gradient_reference(kind):
    for case in cases(kind):
        tensors, keywords = case.build(torch.Generator().manual_seed(0))
        for dtype in (torch.float32, torch.float16):
            x = tensors[0].to(dtype).double().requires_grad_(True)
            rest = [t.to(dtype).double() if t.is_floating_point() else t for t in tensors[1:]]
            out = reference(case, [x, *rest], keywords)
            assert out.requires_grad, case
            (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
            assert grad.shape == x.shape, case


class _NaNBackward(torch.autograd.Function):
    """A correct logsumexp whose backward is all NaN."""

    @staticmethod
    def forward(ctx, x):
        ctx.input_shape = x.shape
        return ex.stable_logsumexp(x.detach(), -1)

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.input_shape, math.nan, dtype=grad.dtype)


def test_a_logsumexp_with_an_all_nan_backward_fails_the_50_digit_case():
    case = next(c for c in cases("logsumexp") if c.name == "huge_close_values")
    report = check(lambda x, dim=-1: _NaNBackward.apply(x), case, dtypes=["float32", "float64"])
    assert {c.dtype for c in report.failures} == {"float32", "float64"}
    assert all(c.reason.startswith("gradient: nan where the reference is") for c in report.failures)
    exact = check(ex.stable_logsumexp, case)
    assert exact.passed, exact.table()


def test_the_50_digit_gradient_is_the_softmax_of_the_row():
    case = next(c for c in cases("logsumexp") if c.name == "huge_close_values")
    (x,), keywords = case.build(torch.Generator())
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reference(case, [x], keywords), x, torch.ones(2, dtype=torch.float64))
    weights = torch.exp(torch.arange(6, dtype=torch.float64) - 5)
    assert torch.allclose(grad[0], weights / weights.sum(), rtol=1e-15, atol=0)


# ---------------------------------------------------------------- 5. unsupported means one thing

def gather_ce(logits, target, reduction="mean"):
    """Cross-entropy with no ignore_index: a target of -100 would index out of range."""
    nll = -torch.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    return nll if reduction == "none" else nll.sum() if reduction == "sum" else nll.mean()


def test_a_kernel_without_ignore_index_is_unsupported_on_the_ignore_cases_not_crashing():
    report = check(gather_ce, kind="cross_entropy", dtypes=["float32"])
    unsupported = {c.name: c.reason for c in report.cases if c.status == "unsupported"}
    assert {"ignore_index_rows[none]", "ignore_index_rows[sum]", "ignore_index_rows", "fully_neg_inf_row_ignored",
            "all_rows_ignored", "all_rows_ignored[sum]"} <= set(unsupported)
    assert not any("raised" in c.reason for c in report.cases)
    assert report.passed, report.table()


@pytest.mark.parametrize("kind", options.KERNEL_KINDS)
def test_case_names_are_unique_within_a_kind(kind):
    names = [c.name for c in cases(kind)]  # xfail and baselines find cases by name
    assert len(names) == len(set(names))


@pytest.mark.parametrize("kind", options.KERNEL_KINDS)
def test_cases_pass_every_keyword_their_inputs_need_and_core_means_required_only(kind):
    for case in cases(kind):
        tensors, keywords = case.build(torch.Generator().manual_seed(0))
        assert case.core == (set(keywords) <= set(REQUIRED_KEYWORDS[kind])), case
        if kind == "cross_entropy" and bool((tensors[1] == IGNORE).any()):
            assert keywords.get("ignore_index") == IGNORE, case


# ---------------------------------------------------------------- 6. xfail and baselines

def test_xfail_keeps_torch_cross_entropy_under_test():
    report = check(F.cross_entropy, kind="cross_entropy", xfail=["fully_neg_inf_row_ignored"])
    assert report.passed, report.table()
    assert {c.dtype for c in report.cases if c.status == "xfail"} == set(options.DTYPES)
    assert "4 xfail" in report.summary()


def test_a_listed_case_that_passes_fails_the_check_as_xpass():
    report = check(F.cross_entropy, kind="cross_entropy", dtypes=["float32"], xfail=["fully_neg_inf_row_ignored", "random"])
    assert not report.passed
    assert [(c.name, c.status) for c in report.failures] == [("random", "xpass")]
    assert "take it off the list" in report.failures[0].reason


def test_xfail_by_dtype():
    failing = ["all_equal@float32", "all_equal@float16", "all_equal@bfloat16",
               "huge_close_values@float32", "huge_close_values@float64", "huge_close_values@bfloat16"]
    assert check(torch.logsumexp, kind="logsumexp", xfail=failing).passed
    report = check(torch.logsumexp, kind="logsumexp", xfail=["all_equal", *failing[3:]])
    assert [c.label for c in report.failures] == ["all_equal [float64]"]


def test_xfail_rejects_names_that_are_no_case():
    with pytest.raises(ConfigError, match="xfail=fully_neg_inf_row: not a cross_entropy case"):
        check(F.cross_entropy, kind="cross_entropy", xfail=["fully_neg_inf_row"])
    with pytest.raises(ConfigError, match="float8 is not a dtype"):
        check(F.cross_entropy, kind="cross_entropy", xfail=["random@float8"])


def scaled_ce(scale):
    """F.cross_entropy with a relative error of ``scale`` in the loss."""

    def kernel(logits, target, reduction="mean", ignore_index=IGNORE, label_smoothing=0.0):
        loss = F.cross_entropy(logits, target, reduction=reduction, ignore_index=ignore_index,
                               label_smoothing=label_smoothing)
        return loss * (1 + scale)

    return kernel


def save(report, path):
    return jsonio.write_json(path, report.to_dict())


def test_a_baseline_fails_only_what_got_worse(tmp_path):
    some = [c for c in cases("cross_entropy") if c.name in ("random", "random[sum]", "large_gap", "odd_sizes")]
    base = check(scaled_ce(1e-2), cases=some, dtypes=["float32"])
    assert len(base.failures) == 4
    path = save(base, tmp_path / "check.json")
    same = check(scaled_ce(1e-2), cases=some, dtypes=["float32"], baseline=path)
    assert same.passed and {c.change for c in same.cases} == {"unchanged"}
    within_margin = check(scaled_ce(1.5e-2), cases=some, dtypes=["float32"], baseline=path)
    assert within_margin.passed, within_margin.table()
    worse = check(scaled_ce(5e-2), cases=some, dtypes=["float32"], baseline=path)
    assert not worse.passed and {c.change for c in worse.failures} == {"regressed"}
    assert "forward error grew from" in worse.failures[0].reason and "over 2x the baseline's" in worse.failures[0].reason
    fixed = check(scaled_ce(0.0), cases=some, dtypes=["float32"], baseline=path)
    assert fixed.passed and {c.change for c in fixed.cases} == {"improved"}
    assert f"against the baseline {path}: 0 regressed, 4 improved (random[sum] [float32], random [float32]," in fixed.table()


def test_a_baseline_flags_a_case_that_passed_there_and_fails_now(tmp_path):
    path = save(check(F.cross_entropy, kind="cross_entropy"), tmp_path / "torch.json")
    kept = check(F.cross_entropy, kind="cross_entropy", baseline=path)
    assert kept.passed and [c.change for c in kept.cases if c.status == "fail"] == ["unchanged"] * 4
    naive = check(ex.naive_softmax_cross_entropy, kind="cross_entropy", baseline=path)
    assert not naive.passed and naive.failures
    assert all(c.change == "regressed" and "(the baseline: pass)" in c.reason for c in naive.failures
               if c.name != "fully_neg_inf_row_ignored")


def test_a_baseline_that_cannot_be_read_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        check(F.cross_entropy, kind="cross_entropy", baseline=tmp_path / "missing.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a check.json written by mode=check"):
        load_report(tmp_path / "garbage.json")
    (tmp_path / "other.json").write_text(json.dumps({"cases": [{"dtype": "float32"}]}))
    with pytest.raises(ConfigError, match="is not a check.json"):
        load_report(tmp_path / "other.json")
    path = save(check(torch.softmax, kind="softmax", dtypes=["float32"]), tmp_path / "softmax.json")
    with pytest.raises(ConfigError, match="is a check of kind softmax, not cross_entropy"):
        check(F.cross_entropy, kind="cross_entropy", baseline=path)


def test_a_report_round_trips_through_check_json(tmp_path):
    report = check(ex.naive_softmax_cross_entropy, kind="cross_entropy", dtypes=["float16"])
    loaded = load_report(save(report, tmp_path / "check.json"))
    assert loaded.to_dict() == report.to_dict()
    assert any(c.forward_error == math.inf for c in loaded.cases)


def test_the_fixture_takes_xfail_and_baseline(pytester, tmp_path):
    path = save(check(F.cross_entropy, kind="cross_entropy", dtypes=["float32"]), tmp_path / "base.json")
    pytester.makepyfile(f"""
        import torch.nn.functional as F
        from nanlab.kernels import examples as ex

        def test_xfail(nanlab_check):
            nanlab_check(F.cross_entropy, kind="cross_entropy", dtypes=["float32"], xfail=["fully_neg_inf_row_ignored"])

        def test_baseline(nanlab_check):
            nanlab_check(F.cross_entropy, kind="cross_entropy", dtypes=["float32"], baseline={str(path)!r})

        def test_regression(nanlab_check):
            nanlab_check(ex.naive_softmax_cross_entropy, kind="cross_entropy", dtypes=["float32"], baseline={str(path)!r})
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*large_logits_both_signs?none? ?float32?: forward: * ?regressed against the baseline?"])


# ---------------------------------------------------------------- 7. readable output

def naive_softmax(x, dim=-1):
    e = torch.exp(x)
    return e / e.sum(dim, keepdim=True)


def test_a_non_finite_failure_says_what_came_out():
    report = check(naive_softmax, kind="softmax", dtypes=["float32"])
    all_equal = by_label(report)["all_equal", "float32"]
    assert all_equal.reason == "forward: nan where the reference is 0.2 at [0, 0] (input 10000)"
    assert all_equal.forward_error == math.inf
    table = report.table()
    assert "every entry 1e4" in table and "    forward: nan where the reference is 0.2" in table


def test_the_failures_only_table_and_the_repr_list_the_failing_cases():
    report = check(naive_softmax, kind="softmax", dtypes=["float32"])
    short = report.table(failures_only=True)
    assert " pass " not in short and "all_equal" in short and "random " not in short
    assert short.splitlines()[-1] == report.summary()
    text = repr(report)
    assert text.startswith("<Report naive_softmax (softmax, torch):") and "all_equal [float32]: forward: nan" in text
    assert "CaseResult(" not in text


@pytest.fixture
def kernels_module(tmp_path):
    """A folder holding the user's own kernels module: ``python -m nanlab`` run there
    imports it, as from a project's folder."""
    (tmp_path / "user_kernels.py").write_text(
        "import sys, torch\n"
        "def hangs(x, dim=-1):\n    while True:\n        pass\n"
        "def exits(x, dim=-1):\n    sys.exit(0)\n")
    return tmp_path


def test_cli_timeout_and_sys_exit(cli, tmp_path, kernels_module):
    proc = cli("mode=check", "kernel.fn=user_kernels:hangs", "kernel.kind=softmax", "kernel.dtypes=[float32]",
               "kernel.timeout=1", f"hydra.run.dir={tmp_path / 'hang'}", cwd=kernels_module, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    left = len(cases("softmax")) - 1
    assert f"stopped: timed out after 1 s on random [float32]; {left} case-dtype pairs not run" in proc.stdout
    assert json.loads((tmp_path / "hang" / "check.json").read_text())["stopped"].startswith("timed out")
    proc = cli("mode=check", "kernel.fn=user_kernels:exits", "kernel.kind=softmax", "kernel.dtypes=[float32]",
               f"hydra.run.dir={tmp_path / 'exit'}", cwd=kernels_module)
    assert proc.returncode == 1 and "raised SystemExit: 0" in proc.stdout and "-> FAILED" in proc.stdout


def test_cli_xfail_baseline_and_show(cli, tmp_path):
    torch_ce = ["mode=check", "kernel.fn=nanlab.kernels.examples:torch_cross_entropy", "kernel.kind=cross_entropy",
                "kernel.dtypes=[float32]"]
    proc = cli(*torch_ce, f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode == 1
    baseline = tmp_path / "a" / "check.json"
    proc = cli(*torch_ce, f"kernel.baseline={baseline}", f"hydra.run.dir={tmp_path / 'b'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"against the baseline {baseline}: 0 regressed, 0 improved" in proc.stdout
    proc = cli(*torch_ce, "kernel.xfail=[fully_neg_inf_row_ignored]", "kernel.show=failures", f"hydra.run.dir={tmp_path / 'c'}")
    assert proc.returncode == 0 and " pass " not in proc.stdout and "1 xfail -> PASSED" in proc.stdout
    naive = ["mode=check", "kernel.fn=nanlab.kernels.examples:naive_softmax_cross_entropy", "kernel.kind=cross_entropy",
             "kernel.dtypes=[float32]", f"kernel.baseline={baseline}", f"hydra.run.dir={tmp_path / 'd'}"]
    proc = cli(*naive)
    assert proc.returncode == 1 and "(regressed)" in proc.stdout


def test_cli_tiny_timeout_exits_1_not_alarm_clock(cli, tmp_path):
    # Issue 23: a timeout that fires while the deadline is being set must not leave a
    # timer that later kills the process with SIGALRM (exit 142).
    for i, tiny in enumerate(("1e-9", "1e-6", "0.001")):
        proc = cli("mode=check", "kernel.fn=nanlab.kernels.examples:torch_softmax", "kernel.kind=softmax",
                   "kernel.dtypes=[float32]", f"kernel.timeout={tiny}", f"hydra.run.dir={tmp_path / str(i)}")
        assert proc.returncode in (0, 1), (proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and "Alarm clock" not in proc.stderr


@pytest.mark.parametrize("override,message", [
    ("kernel.timeout=1e308", "kernel.timeout=1e+308: must be at most 86400 seconds (a day), or None for no limit"),
    ("kernel.dtypes=[]", "kernel.dtypes=[]: must list at least one of float32, float64, float16, bfloat16, each once"),
    ("kernel.dtypes=[float32,float32]", "kernel.dtypes=['float32', 'float32']: must list at least one of"),
    ("kernel.timeout=0", "kernel.timeout=0.0: must be a finite number of seconds > 0, or null for no limit"),
    ("kernel.show=some", "kernel.show=some: must be one of all, failures"),
    ("kernel.xfail=[nope]", "kernel.xfail=nope: not a softmax case; the cases are"),
    ("kernel.baseline=/no/such/check.json", "kernel.baseline=/no/such/check.json: cannot read it"),
])
def test_cli_bad_kernel_settings_are_one_line(cli, tmp_path, override, message):
    proc = cli("mode=check", "kernel.fn=nanlab.kernels.examples:torch_softmax", "kernel.kind=softmax", override,
               f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"nanlab: error: {message}"), proc.stderr


def test_cli_unparsable_baseline_is_one_line(cli, tmp_path):
    (tmp_path / "bad.json").write_text("not json at all")
    proc = cli("mode=check", "kernel.fn=nanlab.kernels.examples:torch_softmax", "kernel.kind=softmax",
               f"kernel.baseline={tmp_path / 'bad.json'}", f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "is not a check.json written by mode=check" in proc.stderr


def test_check_rejects_an_empty_dtype_list():
    with pytest.raises(ConfigError, match="dtypes"):
        check(torch.softmax, kind="softmax", dtypes=[])


# ---------------------------------------------------------------- issue 19: the floor, imprecise, named elements

def test_textbook_max_subtracted_softmax_and_log_softmax_pass_and_the_naive_softmax_fails():
    from nanlab.kernels import examples as ex

    softmax = check(ex.max_subtracted_softmax, kind="softmax")
    assert softmax.passed and softmax.counts()["fail"] == 0, softmax.table()
    # Less precise than torch.softmax in float16/bfloat16: said, with its own word, never failed.
    imprecise = [c for c in softmax.cases if c.status == "imprecise"]
    assert imprecise and {c.dtype for c in imprecise} <= {"float16", "bfloat16"}
    assert "16 imprecise" in softmax.summary() and "-> PASSED" in softmax.summary()
    # The case is fully_neg_inf_row, but the value that was off sits on a finite row: the reason says which.
    row = by_label(softmax)["fully_neg_inf_row", "float16"]
    assert row.status == "imprecise" and "at [4, 3] (input 1.87305)" in row.reason
    log_softmax = check(ex.max_subtracted_log_softmax, kind="log_softmax")
    assert log_softmax.passed and log_softmax.counts()["fail"] == 0, log_softmax.table()
    assert not check(ex.naive_softmax, kind="softmax").passed


def test_a_wrong_value_just_beyond_the_floor_fails_and_just_within_passes():
    # Floor at float16: 2 * (1e-5 + 1e-3 * scale); softmax outputs up to 1 (scale <= 1).
    def scaled(factor):
        def kernel(x, dim=-1):
            y = torch.softmax(x.double(), dim)
            return (y * factor).to(x.dtype) if x.dtype == torch.float16 else torch.softmax(x, dim)
        return kernel

    wrong = check(scaled(1.01), kind="softmax", dtypes=["float16"])  # 1% off: ~10 ulp
    assert not wrong.passed and "beyond the floor" in wrong.failures[0].reason
    assert "at [" in wrong.failures[0].reason and "(input " in wrong.failures[0].reason
    assert check(scaled(1.001), kind="softmax", dtypes=["float16"]).passed  # 1 ulp: within


def test_imprecise_counts_as_passing_for_xfail_and_baseline():
    from nanlab.kernels import examples as ex

    report = check(ex.max_subtracted_softmax, kind="softmax", dtypes=["float16"], xfail=["many_classes"])
    assert not report.passed and by_label(report)["many_classes", "float16"].status == "xpass"


def test_show_failures_on_a_passing_kernel_says_nothing_failed():
    report = check(torch.softmax, kind="softmax", dtypes=["float32"])
    table = report.table(failures_only=True)
    assert table.splitlines()[0] == "nothing failed: every case that ran passed" and "fwd err" not in table
    failing = check(naive_softmax, kind="softmax", dtypes=["float32"]).table(failures_only=True)
    assert "fwd err" in failing and "nothing failed" not in failing


def test_cli_max_subtracted_softmax_passes_and_naive_softmax_fails(cli, tmp_path):
    for i, (name, kind, code) in enumerate([("max_subtracted_softmax", "softmax", 0),
                                            ("max_subtracted_log_softmax", "log_softmax", 0),
                                            ("naive_softmax", "softmax", 1)]):
        proc = cli("mode=check", f"kernel.fn=nanlab.kernels.examples:{name}", f"kernel.kind={kind}",
                   "kernel.show=failures", f"hydra.run.dir={tmp_path / str(i)}")
        assert proc.returncode == code, proc.stdout + proc.stderr
        assert ("nothing failed" in proc.stdout) == (code == 0)


def test_a_forward_floor_is_per_element_so_a_wrong_small_value_beside_a_large_one_fails():
    # log_softmax giving -16 for 0 in a row reaching -2e4: the floor at the row's scale
    # (2 * 1e-3 * 2e4 = 40 in float16) would hide it; each element's own floor does not.
    ref = torch.tensor([[0.0, -2e4, -3.0]], dtype=torch.float64)
    bump = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[2e4, 0.0, 2e4 - 3]], dtype=torch.float64)
    ok, _, why = checker.judge(ref - 16 * bump, ref, torch.float16, lambda: None, inputs=[x])
    assert not ok and "at [0, 0] (input 20000)" in why and "beyond the floor of 0.00202 there" in why
    ok, _, why = checker.judge(ref - 2e-3 * bump, ref, torch.float16, lambda: None, inputs=[x])
    assert ok and "within the floor" in why
    ok, _, _ = checker.judge(ref - 2.1e-3 * bump, ref, torch.float16, lambda: None, inputs=[x])
    assert not ok
    # A gradient's floor is at its largest magnitude: the same bump on a gradient reaching 2 passes.
    grad = torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.float64)
    assert checker.judge(grad - 3.9e-3 * bump, grad, torch.float16, lambda: None, part="gradient")[0]
    assert not checker.judge(grad - 4.2e-3 * bump, grad, torch.float16, lambda: None, part="gradient")[0]


class _UpstreamAsGradient(torch.autograd.Function):
    """Correct forward; the backward passes the upstream gradient through unchanged."""

    @staticmethod
    def forward(ctx, x, dim):
        y = torch.softmax(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def test_a_baseline_does_not_hide_a_gradient_bug_behind_a_forward_it_failed(tmp_path):
    # Issue 23a: the baseline failed the forward, so it never measured the gradient. A
    # kernel that fixes the forward and breaks the gradient must fail, not be "improved".
    case = next(c for c in cases("softmax") if c.name == "large_positive")
    baseline = check(naive_softmax, case, dtypes=["float32"])
    assert baseline.cases[0].part == "forward" and baseline.cases[0].grad_error is None
    broken = check(lambda x, dim=-1: _UpstreamAsGradient.apply(x, dim), case, dtypes=["float32"], baseline=baseline)
    assert not broken.passed and broken.cases[0].change == "regressed"
    assert "did not measure the gradient" in broken.cases[0].reason
    fixed = check(torch.softmax, case, dtypes=["float32"], baseline=baseline)
    assert fixed.passed and fixed.cases[0].change == "improved"


def test_a_downcast_output_is_judged_at_the_dtype_asked_for():
    # Issue 23c: bfloat16 returned from float64 inputs is held to float64's tolerance.
    def softmax_in_bfloat16(x, dim=-1):
        return torch.softmax(x.to(torch.bfloat16), dim)

    report = check(softmax_in_bfloat16, kind="softmax", dtypes=["float64", "float32"])
    assert not report.passed
    assert {c.dtype for c in report.failures} == {"float64", "float32"}
    assert "ulp of float64" in by_label(report)["random", "float64"].reason
    # The same kernel on bfloat16 inputs returns the dtype asked for, and passes; upcasting still passes.
    assert check(softmax_in_bfloat16, kind="softmax", dtypes=["bfloat16"]).passed
    assert check(lambda x, dim=-1: torch.softmax(x.double(), dim), kind="softmax", dtypes=["float16"]).passed


@pytest.mark.parametrize("kind,op", [("softmax", torch.softmax), ("log_softmax", torch.log_softmax),
                                     ("logsumexp", torch.logsumexp)])
def test_a_kernel_that_ignores_dim_fails_and_one_that_honours_it_passes(kind, op):
    # Issue 23b: cases vary dim over several axes and ranks (0, 1, -3; ranks 1 to 3).
    dims = {c.name for c in cases(kind) if c.name.startswith("dim_")}
    assert {"dim_0_rank2", "dim_1_rank3", "dim_neg3_rank3"} <= dims
    ignores = check(lambda x, dim=-1: op(x, -1), kind=kind, cases=[c for c in cases(kind) if c.name in dims],
                    dtypes=["float32"])
    assert not ignores.passed and {"dim_0_rank2", "dim_1_rank3", "dim_neg3_rank3"} <= {c.name for c in ignores.failures}
    assert check(op, kind=kind, cases=[c for c in cases(kind) if c.name in dims]).passed
