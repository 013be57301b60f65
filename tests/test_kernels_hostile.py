"""Kernels written to break the checker: they exit, crash, raise what is not an
Exception, return what is no output, leave grad mode off, or get arguments right
only at the values every case used to pass. None may pass, none may take the
checker down, and correct kernels on the same cases still pass."""
import ctypes
import json
import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanlab.errors import ConfigError
from nanlab.kernels import cases, check
from nanlab.kernels.cli import run_check
from nanlab.kernels.isolate import run_forked

# Three float32 softmax pairs: the hostile kernels below misbehave on the middle one.
PICKED = ("random", "some_neg_inf", "dim_0_rank2")


def picked(kind="softmax", names=PICKED):
    return [c for c in cases(kind) if c.name in names]


def on_neg_inf(act):
    """torch.softmax, except that on an input holding -inf it does ``act()``."""

    def kernel(x, dim=-1):
        if bool(torch.isinf(x).any()):
            act()
        return torch.softmax(x, dim)

    return kernel


def raise_(error):
    def act():
        raise error

    return act


class NotAnException(BaseException):
    pass


def swallow_everything():
    while True:  # no exception stops it, the deadline's included
        try:
            while True:
                pass
        except BaseException:
            pass


def naive_softmax(x, dim=-1):
    e = torch.exp(x)
    return e / e.sum(dim, keepdim=True)


def rows(report):
    return [(c.name, c.status) for c in report.cases]


# ---------------------------------------------------------------- isolation

@pytest.fixture(scope="module")
def warm():
    """An in-process check first, so the forked children start with torch's first-call work done."""
    return check(torch.softmax, cases=picked(), dtypes=["float32"])


def test_an_isolated_check_reports_what_the_in_process_check_does(warm):
    assert warm.passed
    assert check(torch.softmax, cases=picked(), dtypes=["float32"], isolate=True).cases == warm.cases
    inside = check(naive_softmax, kind="softmax", dtypes=["float32"])
    isolated = check(naive_softmax, kind="softmax", dtypes=["float32"], isolate=True)
    assert not inside.passed and isolated.cases == inside.cases and not isolated.stopped


@pytest.mark.parametrize("act,how", [
    (lambda: os._exit(0), "exited with status 0 (os._exit, or an exit in native code)"),
    (lambda: os._exit(3), "exited with status 3 (os._exit, or an exit in native code)"),
    (lambda: ctypes.string_at(0), "was killed by SIGSEGV (Segmentation fault)"),
    (lambda: os.kill(os.getpid(), signal.SIGSEGV), "was killed by SIGSEGV (Segmentation fault)"),
], ids=["os._exit(0)", "os._exit(3)", "null pointer read", "SIGSEGV"])
def test_a_kernel_that_ends_its_process_fails_the_case_it_was_on_and_stops_the_check(warm, act, how):
    report = check(on_neg_inf(act), cases=picked(), dtypes=["float32"], isolate=True)
    assert not report.passed and rows(report) == [("random", "pass"), ("some_neg_inf", "fail")]
    assert report.cases[-1].reason == f"the process running the kernel {how} during this case"
    assert report.stopped == f"the process running the kernel {how} on some_neg_inf [float32]; 1 case-dtype pair not run"
    assert report.not_run == 1 and report.failure_lines()[-1] == f"stopped: {report.stopped}"


@pytest.mark.parametrize("error", [SystemExit(2), KeyboardInterrupt(), GeneratorExit(), NotAnException("odd")],
                         ids=lambda e: type(e).__name__)
def test_a_kernel_raising_any_base_exception_fails_that_case_and_the_check_goes_on(warm, error):
    said = f"raised {type(error).__name__}" + (f": {error}" if str(error) else "")
    report = check(on_neg_inf(raise_(error)), cases=picked(), dtypes=["float32"], isolate=True)
    assert rows(report) == [("random", "pass"), ("some_neg_inf", "fail"), ("dim_0_rank2", "pass")]
    assert report.cases[1].reason == said and not report.passed and not report.stopped
    if not isinstance(error, KeyboardInterrupt):  # in this process a KeyboardInterrupt is Ctrl-C: it stops
        inside = check(on_neg_inf(raise_(error)), cases=picked(), dtypes=["float32"])
        assert inside.cases == report.cases


def test_the_deadline_stops_a_kernel_the_alarm_cannot(warm):
    report = check(on_neg_inf(swallow_everything), cases=picked(), dtypes=["float32"], isolate=True, timeout=0.5)
    assert rows(report) == [("random", "pass"), ("some_neg_inf", "fail")]
    assert report.stopped == "timed out after 0.5 s on some_neg_inf [float32]; 1 case-dtype pair not run"


def test_an_isolated_check_keeps_its_deadline_off_the_main_thread(warm):
    got = {}
    worker = threading.Thread(target=lambda: got.update(
        report=check(torch.softmax, cases=picked(), dtypes=["float32"], isolate=True, timeout=60)))
    worker.start()
    worker.join(60)
    assert got["report"].passed
    with pytest.raises(ValueError, match="main thread"):  # the in-process alarm still needs it
        _in_thread(lambda: check(torch.softmax, cases=picked(), dtypes=["float32"], timeout=60))


def _in_thread(call):
    caught = []

    def run():
        try:
            call()
        except BaseException as err:  # noqa: BLE001 (re-raised on the caller's thread)
            caught.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(60)
    if caught:
        raise caught[0]


def test_the_child_s_own_failure_is_raised_with_its_traceback_not_blamed_on_a_kernel():
    with pytest.raises(RuntimeError, match="(?s)on job 1:.*ZeroDivisionError"):
        run_forked(3, lambda i: {"i": 1 / (1 - i)}, None)


def test_a_child_that_dies_while_its_own_child_holds_the_pipe_is_still_seen_dying():
    def run_one(i):
        if i == 1 and os.fork() == 0:  # a grandchild that keeps the pipe open for a while
            time.sleep(2)
            os._exit(0)
        if i == 1:
            os._exit(5)
        return {"i": i}

    start = time.monotonic()
    forked = run_forked(3, run_one, None)
    assert time.monotonic() - start < 1.5  # seen by polling, not by the pipe's end
    assert forked.results == [{"i": 0}] and forked.ended.startswith("exited with status 5")


# ---------------------------------------------------------------- the CLI: one subprocess, the rest in process

@pytest.fixture
def user_kernels(tmp_path, monkeypatch):
    (tmp_path / "hostile_kernels.py").write_text(
        "import ctypes, os, torch\n"
        "def exits(x, dim=-1):\n"
        "    if torch.isinf(x).any():\n        os._exit(0)\n"
        "    return torch.softmax(x, dim)\n"
        "def crashes(x, dim=-1):\n"
        "    if torch.isinf(x).any():\n        ctypes.string_at(0)\n"
        "    return torch.softmax(x, dim)\n"
        "def gradient(x, upstream, dim=-1):\n    return upstream\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return {"PYTHONPATH": str(tmp_path)}


def kernel_conf(**settings):
    conf = dict(fn=None, kind="softmax", framework="torch", grad_fn=None, dtypes=["float32"], timeout=60.0,
                baseline=None, xfail=[], show="all", search=None)
    return SimpleNamespace(kernel=SimpleNamespace(**{**conf, **settings}))


def test_cli_a_kernel_calling_os_exit_0_exits_1_naming_the_case(cli, tmp_path, user_kernels):
    proc = cli("mode=check", "kernel.fn=hostile_kernels:exits", "kernel.kind=softmax", "kernel.dtypes=[float32]",
               f"hydra.run.dir={tmp_path / 'run'}", env=user_kernels)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    left = len(cases("softmax")) - 6
    stop = (f"stopped: the process running the kernel exited with status 0 (os._exit, or an exit in native code) "
            f"on some_neg_inf [float32]; {left} case-dtype pairs not run")
    assert stop in proc.stdout.splitlines() and "-> FAILED" in proc.stdout
    assert json.loads((tmp_path / "run" / "check.json").read_text())["stopped"] == stop.removeprefix("stopped: ")


def test_mode_check_survives_a_segfaulting_kernel(tmp_path, user_kernels, capsys):
    assert run_check(kernel_conf(fn="hostile_kernels:crashes"), tmp_path) == 1
    out = capsys.readouterr().out
    assert "stopped: the process running the kernel was killed by SIGSEGV (Segmentation fault) on some_neg_inf" in out
    assert json.loads((tmp_path / "check.json").read_text())["cases"][-1]["name"] == "some_neg_inf"


def test_grad_fn_is_refused_under_torch_and_taken_under_numpy(tmp_path, user_kernels):
    with pytest.raises(ConfigError) as err:
        run_check(kernel_conf(fn="hostile_kernels:exits", grad_fn="hostile_kernels:gradient"), tmp_path)
    assert str(err.value) == ("kernel.grad_fn=hostile_kernels:gradient: applies to framework numpy only: a torch "
                              "kernel's gradient is checked through autograd")
    with pytest.raises(ConfigError, match="^grad_fn=np_softmax_grad: applies to framework numpy only"):
        check(torch.softmax, kind="softmax", grad_fn=np_softmax_grad)
    assert check(np_softmax, cases=picked(), framework="numpy", dtypes=["float32"], grad_fn=np_softmax_grad).passed


# ---------------------------------------------------------------- outputs that are no output

def np_softmax(x, dim=-1):
    e = np.exp(x - x.max(dim, keepdims=True))
    return e / e.sum(dim, keepdims=True)


def np_softmax_grad(x, upstream, dim=-1):
    y = np_softmax(x, dim)
    return (y * (upstream - (upstream * y).sum(dim, keepdims=True))).astype(x.dtype)


def returns(make):
    return lambda x, dim=-1: make(torch.softmax(x, dim)) if bool(torch.isinf(x).any()) else torch.softmax(x, dim)


def np_returns(make):
    return lambda x, dim=-1: make(np_softmax(x, dim)) if np.isinf(x).any() else np_softmax(x, dim)


def grad_returns(value):
    return lambda x, upstream, dim=-1: value if np.isinf(x).any() else np_softmax_grad(x, upstream, dim)


def leaves_grad_mode_off(x, dim=-1):
    y = torch.softmax(x, dim)
    if bool(torch.isinf(x).any()):
        torch.set_grad_enabled(False)
    return y


@pytest.mark.parametrize("kernel,framework,grad_fn,reason", [
    (returns(lambda y: y.to("meta")), "torch", None, "returned a meta tensor, which holds no values"),
    (returns(lambda y: y.to_sparse()), "torch", None, "returned a sparse_coo tensor, not a dense (strided) one"),
    (np_returns(lambda y: [list(r[: i + 1]) for i, r in enumerate(y)]), "numpy", np_softmax_grad,
     "returned a list that is no array, ragged or holding other than numbers"),
    (np_returns(lambda y: "softmax"), "numpy", np_softmax_grad, "returned a str (<U7 array), not a float16, float32 "
                                                               "or float64 array"),
    (np_softmax, "numpy", grad_returns(None), "grad_fn returned None, not a float16, float32 or float64 array"),
    (np_softmax, "numpy", grad_returns("0.5"), "grad_fn returned a str (<U3 array), not a float16, float32 or "
                                               "float64 array"),
    (leaves_grad_mode_off, "torch", None, "left grad mode off: it called torch.set_grad_enabled(False) and did not "
                                          "restore it, which breaks its caller's autograd"),
], ids=["meta", "sparse", "ragged list", "string", "grad_fn None", "grad_fn string", "grad mode left off"])
def test_an_odd_output_fails_its_case_in_one_line_and_the_next_case_runs(kernel, framework, grad_fn, reason):
    report = check(kernel, cases=picked(), framework=framework, grad_fn=grad_fn, dtypes=["float32"])
    assert rows(report) == [("random", "pass"), ("some_neg_inf", "fail"), ("dim_0_rank2", "pass")]
    assert report.cases[1].reason.startswith(reason), report.cases[1].reason
    assert "\n" not in report.cases[1].reason and not report.passed
    assert torch.is_grad_enabled()  # put back for the caller too


def test_a_check_under_no_grad_still_checks_gradients():
    with torch.no_grad():
        report = check(torch.softmax, cases=picked(), dtypes=["float32"])
        assert not torch.is_grad_enabled()
    assert report.passed and all(c.grad_error is not None for c in report.cases)


# ---------------------------------------------------------------- arguments every case used to pass alike

def ce_ignoring_minus_100_only(logits, target, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    return F.cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing)


def ce_masking_with_lowest_finite(logits, target, reduction="mean", ignore_index=-100):
    finite = logits.nan_to_num(neginf=torch.finfo(logits.dtype).min)
    return F.cross_entropy(finite, target, reduction=reduction, ignore_index=ignore_index)


def softmax_stable_on_the_last_dim_only(x, dim=-1):
    if dim in (-1, x.dim() - 1):
        return torch.softmax(x, dim)
    e = torch.exp(x)
    return e / e.sum(dim, keepdim=True)


def logsumexp_unguarded_off_the_last_dim(x, dim=-1):
    if dim in (-1, x.dim() - 1):
        return torch.logsumexp(x, dim)
    m = x.amax(dim, keepdim=True)  # -inf for an all -inf slice: -inf - -inf is NaN
    return (m + torch.log(torch.exp(x - m).sum(dim, keepdim=True))).squeeze(dim)


@pytest.mark.parametrize("kind,kernel,framework_op,only_failures", [
    ("cross_entropy", ce_ignoring_minus_100_only, F.cross_entropy,
     {"ignore_index_real_class", "ignore_index_real_class[none]", "ignore_index_minus_1", "ignore_index_num_classes"}),
    ("cross_entropy", ce_masking_with_lowest_finite, F.cross_entropy,
     {"target_on_neg_inf_logit", "target_on_neg_inf_logit[none]"}),
    ("softmax", softmax_stable_on_the_last_dim_only, torch.softmax, {"large_dim_0"}),
    ("logsumexp", logsumexp_unguarded_off_the_last_dim, torch.logsumexp, {"fully_neg_inf_dim_0"}),
], ids=["ignore_index hard-coded", "-inf as the lowest finite", "stable on dim -1 only", "-inf unguarded off dim -1"])
def test_a_kernel_right_only_where_every_case_used_to_look_fails_the_new_cases(kind, kernel, framework_op,
                                                                             only_failures):
    known = {"fully_neg_inf_row_ignored", "all_equal", "huge_close_values"}  # the framework op's recorded failures
    report = check(kernel, kind=kind, dtypes=["float32"])
    assert {c.name for c in report.failures} - known == only_failures, report.table(failures_only=True)
    assert not report.passed
    fixed = check(framework_op, cases=[c for c in cases(kind) if c.name in only_failures])
    assert fixed.passed, fixed.table()


def test_the_masked_target_fails_on_the_lowest_finite_value_it_returned():
    report = check(ce_masking_with_lowest_finite, cases=picked("cross_entropy", ["target_on_neg_inf_logit[none]"]),
                   dtypes=["float32"])
    assert report.cases[0].reason == ("forward: 3.40282e+38 where the reference is inf at [1] "
                                      "(row 1 of the input, non-finite, target 3)"), report.cases[0].reason


def test_new_cases_keep_the_catalogue_s_rules():
    names = {c.name: c for c in cases("cross_entropy")}
    for value, name in ((2, "ignore_index_real_class"), (-1, "ignore_index_minus_1"), (5, "ignore_index_num_classes")):
        tensors, keywords = names[name].build(torch.Generator().manual_seed(0))
        assert keywords["ignore_index"] == value and bool((tensors[1] == value).any()) and not names[name].core
    for kind in ("softmax", "log_softmax", "logsumexp"):
        dims = {c.build(torch.Generator().manual_seed(0))[1]["dim"] for c in cases(kind)}
        assert {-1, 0, 1, -3} <= dims
