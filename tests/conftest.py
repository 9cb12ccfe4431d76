import numpy as np
import pytest

from fastadam import _backends

AVAILABLE = [name for name, reason in _backends.available().items() if reason is None]


def backend_params(names=_backends.BACKENDS):
    """Parametrize over backends; one that is not available is skipped with its reason."""
    reasons = _backends.available()
    return [pytest.param(n, marks=pytest.mark.skipif(reasons[n] is not None, reason=f"{n}: {reasons[n]}"))
            for n in names]


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
