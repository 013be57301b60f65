"""Regression-test loss, activation and norm kernels on the inputs that break naive ones.

Built-in kinds: options.KERNEL_KINDS (cross-entropy, BCE, softmax, log_softmax,
logsumexp, KL, NLL, softplus, log_sigmoid, RMSNorm, LayerNorm); any other kernel with a
reference through a declared ``Kind`` (see nanlab.kernels.kinds), and a search of a
kind's inputs for one that breaks a kernel in nanlab.kernels.search.

    from nanlab.kernels import check, cases
    report = check(my_cross_entropy, kind="cross_entropy")          # torch kernel
    report = check(np_ce, kind="cross_entropy", framework="numpy")  # any array kernel
    report = check(my_cross_entropy, case)                          # one Case of cases(kind)
    report = check(F.cross_entropy, kind="cross_entropy", xfail=["fully_neg_inf_row_ignored"])
    report = check(my_cross_entropy, kind="cross_entropy", baseline="check.json")  # only regressions fail
    report = check(my_logaddexp, kind=Kind("logaddexp", (Arg("a"), Arg("b")), reference=ref_logaddexp))
    report.passed, report.cases, print(report.table())

JAX or TensorFlow kernels are checked as NumPy callables: wrap them so they take
and return NumPy arrays, e.g. ``lambda z, t, **kw: np.asarray(jax_ce(jnp.asarray(z), jnp.asarray(t), **kw))``,
and pass ``grad_fn`` built the same way from ``jax.vjp`` (or ``tf.GradientTape``) to
check gradients too. See docs/kernels.md.
"""
from nanlab.config import options
from nanlab.kernels.catalogue import Case, KnownFailure, cases
from nanlab.kernels.check import CaseResult, Report, check, load_report
from nanlab.kernels.kinds import Arg, Kind, register

KINDS = options.KERNEL_KINDS  # kept for compatibility; the table is options.KERNEL_KINDS

__all__ = ["KINDS", "Arg", "Case", "CaseResult", "Kind", "KnownFailure", "Report", "cases", "check", "load_report",
           "register"]
