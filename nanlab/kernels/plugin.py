"""pytest plugin (entry point ``pytest11``): the ``nanlab_check`` fixture.

    def test_my_ce(nanlab_check):
        nanlab_check(my_ce, kind="cross_entropy")
        nanlab_check(F.cross_entropy, kind="cross_entropy", xfail=["fully_neg_inf_row_ignored"])
        nanlab_check(my_ce, kind="cross_entropy", baseline="tests/baselines/my_ce.json")

fails the test with a list of the failing cases and why; ``nanlab_check(my_ce, case)``
checks one Case of ``nanlab.kernels.cases(kind)``. Every keyword of
``nanlab.kernels.check`` (dtypes, timeout, xfail, baseline, ...) is passed through.
"""
import pytest


@pytest.fixture
def nanlab_check():
    from nanlab.kernels.check import check

    def run(fn, kind=None, **options):
        report = check(fn, kind, **options)
        if not report.passed:
            lines = report.failure_lines()
            pytest.fail(f"{report.summary()}\n" + "\n".join(f"  {line}" for line in lines), pytrace=False)
        return report

    return run
