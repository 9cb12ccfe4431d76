import numpy as np
import pytest

from fastadam import _backends

AVAILABLE = [name for name, reason in _backends.available().items() if reason is None]


def backend_params(names=_backends.BACKENDS):
    """Parametrize over backends; one that is not available is skipped with its reason."""
    reasons = _backends.available()
    return [pytest.param(n, marks=pytest.mark.skipif(reasons[n] is not None, reason=f"{n}: {reasons[n]}"))
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
