"""pytest plugin (entry point ``pytest11``): the ``nanlab_check`` fixture.

    def test_my_ce(nanlab_check):
        nanlab_check(my_ce, kind="cross_entropy")

fails the test with a readable list of the failing cases; ``nanlab_check(my_ce, case)``
checks one Case of ``nanlab.kernels.cases(kind)``.
"""
import pytest


@pytest.fixture
def nanlab_check():
    from nanlab.kernels.check import check

    def run(fn, kind=None, **options):
        report = check(fn, kind, **options)
        if not report.passed:
            lines = [f"  {c.name} [{c.dtype}]: {c.reason}" for c in report.failures]
            pytest.fail(f"{report.kernel} fails {len(lines)} nanlab {report.kind} case(s):\n" + "\n".join(lines), pytrace=False)
        return report

    return run
