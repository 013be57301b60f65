"""kernel.search: a Hypothesis search of a kind's input domain, shrunk to a case to paste into a test."""
import json
import math
import re
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from nanlab.errors import ConfigError
from nanlab.kernels import Arg, Case, Kind, check
from nanlab.kernels import examples as ex
from nanlab.kernels import search as search_module
from nanlab.kernels.catalogue import USER_KINDS
from nanlab.kernels.search import search

checker = sys.modules["nanlab.kernels.check"]  # the module; nanlab.kernels.check is the function

pytest.importorskip("hypothesis")

# The four naive kernels the search must find, within a few seconds of CPU at a small budget.
NAIVE = {"naive_softmax": "softmax", "naive_logsumexp": "logsumexp", "naive_softplus": "softplus",
         "layer_norm_without_eps": "layer_norm"}
BUDGET_S = 5.0


@pytest.mark.parametrize("name,kind", NAIVE.items())
def test_the_search_finds_each_naive_kernel_and_shrinks_it_to_a_case_that_fails(name, kind):
    fn = getattr(ex, name)
    started = time.process_time()
    found = search(fn, kind, examples=50)
    seconds = time.process_time() - started
    print(f"{name}: {found.examples} examples, {found.shrink_steps} shrinking, {seconds:.2f} s CPU")
    assert not found.passed and found.shrunk and seconds < BUDGET_S, found.text()
    assert sum(t.numel() for t in found.tensors) <= 2, found.text()  # shrunk: one row of at most two values
    # The printed case, pasted into a test, fails the same way; the kernel's correct
    # counterpart passes it.
    pasted = eval(found.case_source(), {"Case": Case, "torch": torch, "math": math})
    assert not check(fn, pasted, dtypes=[found.found.dtype]).passed
    correct = {"softmax": torch.softmax, "logsumexp": ex.stable_logsumexp, "softplus": F.softplus,
               "layer_norm": ex.upcast_layer_norm}[kind]
    assert check(correct, pasted).passed
    assert f"assert check({name}, case, dtypes=" in found.text()


@pytest.mark.parametrize("fn,kind", [
    (torch.softmax, "softmax"),
    (torch.log_softmax, "log_softmax"),
    (ex.stable_logsumexp, "logsumexp"),
    (F.softplus, "softplus"),
    (ex.upcast_layer_norm, "layer_norm"),
])
def test_the_search_finds_nothing_on_correct_kernels(fn, kind):
    found = search(fn, kind, examples=30)
    # Hypothesis draws some inputs twice; each distinct one is judged once.
    assert found.passed and 20 <= found.examples <= 30 and not found.stopped, found.text()
    assert found.text().endswith("nothing failed")


# ---------------------------------------------------------------- the rounding a float16 kernel cannot avoid

SATURATED = Case("saturated", "softmax", "one logit 12 above the rest",
                 lambda g: ([torch.tensor([[0.0, 0.0, 12.0]], dtype=torch.float64)], {"dim": -1}))
TWO_WIDE = Case("two_wide", "layer_norm", "a row of two",
                lambda g: ([torch.tensor([[0.0, 1.0]], dtype=torch.float64)], {"normalized_shape": (2,), "eps": 1e-5}))


def test_torch_s_float16_gradients_from_their_rounded_output_pass_and_only_that_rounding_is_excused(monkeypatch):
    # torch saves the float16 softmax (0.99998 rounds to 1.0) and LayerNorm's 1/std (1.99996 to 2.0),
    # and its gradient's cancellation then loses what the floor allows at the gradient's magnitude.
    assert check(torch.softmax, SATURATED, dtypes=["float16"]).passed
    assert check(F.layer_norm, TWO_WIDE, dtypes=["float16"]).passed

    class OffAtTheTop(torch.autograd.Function):
        """torch's softmax, its gradient 1e-4 off at the saturated entry: past 2x the 1.1e-5 that
        rounding the saved output moves the exact gradient there, plus the floor of 2e-5."""

        @staticmethod
        def forward(ctx, x):
            y = torch.softmax(x, -1)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, grad):
            (y,) = ctx.saved_tensors
            exact = y * (grad - (grad * y).sum(-1, keepdim=True))
            return exact + torch.tensor([0.0, 0.0, 1e-4], dtype=exact.dtype)

    report = check(lambda x, dim=-1: OffAtTheTop.apply(x), SATURATED, dtypes=["float16"])
    assert not report.passed and "rounding the reference's saved intermediates to float16" in report.cases[0].reason
    # Without the allowance torch's own gradient is past the floor: the allowance is what passes it.
    monkeypatch.setattr(checker._Reference, "saved_rounding", lambda self, upstream, dtype: torch.zeros_like(upstream))
    assert "beyond the floor" in check(torch.softmax, SATURATED, dtypes=["float16"]).cases[0].reason


def test_the_search_finds_what_the_catalogue_misses_in_a_declared_kind():
    def ref_log1p_exp(x):
        return torch.nn.functional.softplus(x.double(), threshold=1e300)

    kind = Kind("softplus_as_declared", (Arg("x", ("N",), -200.0, 200.0),), reference=ref_log1p_exp)
    try:
        found = search(ex.naive_softplus, kind, examples=100, dtypes=["float32"])
        assert not found.passed and found.tensors[0].tolist() == [89.0], found.text()
        assert search(F.softplus, kind, examples=30, dtypes=["float32"]).passed
    finally:
        USER_KINDS.pop("softplus_as_declared", None)


def _softplus_off_above_5(x, beta=1.0, threshold=20.0):
    """Right below 5; above it 1e-4 too large: a small failure that most draws meet."""
    y = F.softplus(x, beta, threshold)
    return y + 1e-4 * (x > 5).to(y.dtype)


def _softplus_off_above_5_and_nan_far_below(x, beta=1.0, threshold=20.0):
    """The same, and NaN from -9e4 down: a failure as bad as can be, that few draws meet."""
    y = _softplus_off_above_5(x, beta, threshold)
    return torch.where((x <= -9e4) & torch.isfinite(x), torch.full_like(y, math.nan), y)


def test_the_search_reports_the_worst_input_it_found_not_the_first():
    small = search(_softplus_off_above_5, "softplus", examples=50, dtypes=["float32"])
    assert not small.passed and 1 < small.found.excess < math.inf and small.shrunk, small.text()
    worst = search(_softplus_off_above_5_and_nan_far_below, "softplus", examples=50, dtypes=["float32"])
    assert worst.found.reason.startswith("forward: nan where the reference is"), worst.text()
    assert worst.found.excess == math.inf and worst.shrunk and worst.tensors[0].numel() == 1, worst.text()
    assert worst.tensors[0].item() <= -9e4  # shrunk while as bad: still in the NaN region


def test_a_time_budget_ends_the_search_with_one_line_saying_so():
    def slow_softplus(x, beta=1.0, threshold=20.0):
        time.sleep(0.01)
        return F.softplus(x, beta, threshold)

    cut = search(slow_softplus, "softplus", examples=20, seconds=0.1)
    assert cut.passed and 1 <= cut.examples < 20, cut.text()
    assert cut.stopped.startswith(f"the 0.1 s budget ran out after {cut.examples} of 20 examples ("), cut.stopped
    assert cut.text().splitlines()[1] == f"  stopped: {cut.stopped}"
    whole = search(slow_softplus, "softplus", examples=3, seconds=None)
    assert whole.examples == 3 and not whole.stopped and "stopped" not in whole.text()
    nothing = search(slow_softplus, "softplus", examples=5, seconds=1e-9)  # the budget ends it before any input
    assert nothing.examples == 0 and not nothing.passed and "no input was judged" in nothing.text()
    for bad in (0, -1.0, math.inf, True):
        with pytest.raises(ConfigError, match="must be a finite number of seconds > 0, or None for no limit"):
            search(slow_softplus, "softplus", 3, seconds=bad)


def test_the_search_is_deterministic():
    first, second = (search(ex.naive_softplus, "softplus", dtypes=["float32"]) for _ in range(2))
    assert first.case_source() == second.case_source() and first.examples == second.examples


def test_without_hypothesis_the_search_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(search_module, "available", lambda: False)
    with pytest.raises(ConfigError) as info:
        search(ex.naive_softplus, "softplus", 10)
    assert "needs the optional extra search" in str(info.value) and "\n" not in str(info.value)
    cfg = OmegaConf.create({"kernel": {"fn": "nanlab.kernels.examples:naive_softplus", "kind": "softplus",
                                       "grad_fn": None, "search": 10}})
    from nanlab.kernels.cli import run_check

    with pytest.raises(ConfigError, match=r"^kernel.search=10: needs the optional extra search"):
        run_check(cfg, "unused")  # before any check runs
    with pytest.raises(ConfigError, match="must be a number of examples >= 1"):
        monkeypatch.undo()
        search(ex.naive_softplus, "softplus", 0)


PLUGIN_TESTS = """
import torch
import torch.nn.functional as F

def softplus_nan_far_below(x, beta=1.0, threshold=20.0):
    # Right on every case of the catalogue (which stops at -6.5e4), NaN from -9e4 down.
    y = F.softplus(x, beta, threshold)
    return torch.where((x <= -9e4) & torch.isfinite(x), torch.full_like(y, float("nan")), y)

def test_far_below(nanlab_check):
    nanlab_check(softplus_nan_far_below, kind="softplus", dtypes=["float32"])

def test_naive(nanlab_check):
    from nanlab.kernels.examples import naive_softplus
    nanlab_check(naive_softplus, kind="softplus")

def test_search_seconds_reach_the_search(nanlab_check):
    import pytest
    from nanlab.errors import ConfigError
    with pytest.raises(ConfigError, match="search_seconds=-1"):
        nanlab_check(F.softplus, kind="softplus", dtypes=["float32"], search=5, search_seconds=-1)
"""


def test_the_plugin_flags_the_naive_kernel_and_its_search_option_finds_what_the_cases_miss(pytester):
    pytester.makepyfile(PLUGIN_TESTS)
    plain = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    plain.assert_outcomes(passed=2, failed=1)
    plain.stdout.fnmatch_lines(["*past_exp_overflow ?float32?: forward: inf where the reference is*"])
    searched = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--nanlab-search=100")
    searched.assert_outcomes(passed=1, failed=2)
    searched.stdout.fnmatch_lines(["*search: softplus_nan_far_below (softplus)*FAILED*",
                                   "*paste into a test*"])


def _docs_kind_source() -> str:
    """The example of docs/kernels.md's "Your own kinds", as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "kernels.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", text.split("## Your own kinds", 1)[1], re.S).group(1)


def test_cli_checks_and_searches_a_declared_kind_named_by_import_path(cli, tmp_path):
    (tmp_path / "user_kinds.py").write_text(_docs_kind_source())
    proc = cli("mode=check", "kernel.fn=user_kinds:fused_logaddexp", "kernel.kind=user_kinds:LOGADDEXP",
               "kernel.dtypes=[float32]", "kernel.search=50", "kernel.show=failures", f"hydra.run.dir={tmp_path / 'o'}",
               env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "extremal_values" in proc.stdout and "search: fused_logaddexp (logaddexp)" in proc.stdout
    record = json.loads((tmp_path / "o" / "check.json").read_text())
    assert record["kind"] == "logaddexp" and not record["passed"] and not record["search"]["passed"]
    assert record["search"]["found"]["case"].startswith('Case("found_by_search", "logaddexp"')


@pytest.mark.parametrize("value,message", [
    ("nanlab.kernels.examples:naive_softplus", "names a function, not a nanlab.kernels.Kind; or choose one of"),
    ("no_such_module:KIND", "cannot import no_such_module"),
    ("nanlab.kernels.kinds:NO_SUCH", "nanlab.kernels.kinds has no attribute NO_SUCH"),
    ("softmx", "unknown kernel kind 'softmx'; choose one of cross_entropy"),
])
def test_a_kernel_kind_that_names_no_kind_is_one_line(value, message):
    from nanlab.kernels.cli import declared_kind

    with pytest.raises(ConfigError) as info:
        declared_kind(value)
    assert str(info.value).startswith(f"kernel.kind={value}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_kernel_kind_takes_a_builtin_name_or_an_import_path_and_nothing_else():
    from nanlab.config import schema
    from nanlab.kernels.cli import declared_kind

    assert declared_kind("softplus") == "softplus"
    for good in ("softplus", "my_pkg.kinds:LOGADDEXP", "m:KINDS.logaddexp"):
        assert schema._kernel_kind(good), good
    for bad in ("hinge", "my_pkg.kinds", ":LOGADDEXP", "my pkg:K", "m:"):
        assert not schema._kernel_kind(bad), bad
    with pytest.raises(ConfigError, match=r"^kernel.kind=hinge: must be one of cross_entropy, .*, or a declared "
                                          r"nanlab.kernels.Kind as module:attribute$"):
        schema._check(schema._kernel_kind("hinge"), "kernel.kind", "hinge")


def test_a_search_asked_of_a_single_case_fails_rather_than_being_skipped(nanlab_check):
    from nanlab.kernels.catalogue import cases

    with pytest.raises(pytest.fail.Exception, match="search= needs a whole kind"):
        nanlab_check(F.softplus, cases("softplus")[0], dtypes=["float32"], search=5)
