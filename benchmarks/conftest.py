import pytest

from fastadam import bench


def pytest_collection_modifyitems(items):
    for item in items:  # the benchmarks are long: keep them out of a plain `pytest tests/`
        item.add_marker(pytest.mark.benchmark_suite)


@pytest.fixture(params=[1, "all"], ids=lambda t: f"{t}thread" if t == 1 else "allthreads")
def threads(request):
    return bench.all_threads() if request.param == "all" else request.param
