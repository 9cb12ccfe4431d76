import numpy as np
import pytest

from fastadam import _backends

AVAILABLE = [name for name, reason in _backends.available().items() if reason is None]


# Two tiers.  The default run is the tests that guard behaviour, a few minutes on two
# cores; tests marked slow (the exhaustive grids, memcheck, MPI, long fuzzing, whole
# training runs, other interpreters) run with --slow too, as CI does.
def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="run the slow tier too (every test: what CI runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


def backend_params(names=_backends.BACKENDS):
    """Parametrize over backends; one that is not available is skipped with its reason.
    The Numba backend's cases are the slow tier: each variant they meet is a JIT compile
    (5 to 30 s on two cores); its own tests (test_backends.py) keep it in the default run."""
    reasons = _backends.available()
    return [pytest.param(n, marks=[pytest.mark.skipif(reasons[n] is not None, reason=f"{n}: {reasons[n]}")]
                         + ([pytest.mark.slow] if n == "numba" else []))
            for n in names]


def on_every_isa(kernel, run):
    """{isa: run()} for every instruction set this CPU supports; the selection is restored."""
    before = kernel.isa_in_use()
    results = {}
    try:
        for isa in [name for name in kernel.ISA_NAMES if kernel.isa_supported(name)]:
            kernel.select_isa(isa)
            results[isa] = run()
    finally:
        kernel.select_isa(before)
    return results


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
