"""pytest plugin (entry point ``pytest11``): the ``nanlab_check`` fixture.

    def test_my_ce(nanlab_check):
        nanlab_check(my_ce, kind="cross_entropy")
        nanlab_check(F.cross_entropy, kind="cross_entropy", xfail=["fully_neg_inf_row_ignored"])
        nanlab_check(my_ce, kind="cross_entropy", baseline="tests/baselines/my_ce.json")
        nanlab_check(my_ce, kind="cross_entropy", search=200)  # and search 200 inputs for one that fails
        nanlab_check(my_ce, kind="cross_entropy", search=200, search_seconds=5)  # for at most 5 s

fails the test with a list of the failing cases and why; ``nanlab_check(my_ce, case)``
checks one Case of ``nanlab.kernels.cases(kind)``. Every keyword of
``nanlab.kernels.check`` (dtypes, timeout, xfail, baseline, ...) is passed through.
``pytest --nanlab-search=N`` searches N inputs after every check of a whole kind whose
call does not say ``search=`` itself (it needs the search extra).
"""
import pytest


def pytest_addoption(parser):
    parser.getgroup("nanlab").addoption(
        "--nanlab-search", type=int, default=None, metavar="N", dest="nanlab_search",
        help="after each nanlab_check of a kind, search N inputs of its domain for one that fails (Hypothesis)")


@pytest.fixture
def nanlab_check(request):
    from nanlab.errors import ConfigError
    from nanlab.kernels.catalogue import Case
    from nanlab.kernels.check import check

    def run(fn, kind=None, search=None, search_seconds=None, **options):
        examples = search if search is not None else request.config.getoption("nanlab_search", None)
        searching = bool(examples) and kind is not None and not isinstance(kind, Case)  # a search covers a whole kind
        if search and not searching:  # asked for by this call, so never skipped quietly
            pytest.fail("nanlab_check: search= needs a whole kind (kind='softmax' or a Kind), not a single Case",
                        pytrace=False)
        if searching:
            from nanlab.kernels.search import require

            try:
                require("search", examples)
            except ConfigError as err:
                pytest.fail(str(err), pytrace=False)
        report = check(fn, kind, **options)
        if not report.passed:
            lines = report.failure_lines()
            pytest.fail(f"{report.summary()}\n" + "\n".join(f"  {line}" for line in lines), pytrace=False)
        if searching:
            from nanlab.kernels.search import search as search_kind

            budget = {} if search_seconds is None else {"seconds": search_seconds}
            found = search_kind(fn, kind, examples, dtypes=options.get("dtypes"),
                                framework=options.get("framework", "torch"), grad_fn=options.get("grad_fn"), **budget)
            if not found.passed:
                pytest.fail(found.text(), pytrace=False)
        return report

    return run
