"""A backend runs only the option flags it implements (``backend.flags``): a flag of
fastadam._step.FLAGS whose math a backend lacks is refused with its name, before the
first step and on any later step whose groups set it, and such a step changes nothing.
This is what lets a new flag land in the compiled kernel and the oracle first
(docs/architecture.md).  Every flag of today is implemented everywhere, so the Numba
kernel is made to lack one here."""
import numpy as np
import pytest

import fastadam
from fastadam import _backends, _step

pytestmark = pytest.mark.slow  # the Numba backend's JIT compiles

numba = pytest.importorskip("numba")


def test_the_compiled_kernel_and_the_oracle_implement_every_flag():
    """They define a flag (docs/architecture.md); the Numba backend follows, and has today's."""
    from fastadam import _numba_kernel
    for name, reason in _backends.available().items():
        if reason is None and name != "numba":
            assert _backends.load(name).flags == _step.FLAGS
    assert set(_numba_kernel.FLAGS) <= set(_step.FLAGS)
    assert {"amsgrad", "maximize"} <= set(_numba_kernel.FLAGS)


@pytest.fixture(params=["compiled checks", "python checks"])
def numba_without_maximize(request, monkeypatch):
    """The Numba backend as if its rule did not take ``maximize``; its step verified by
    the compiled plan (where built) or by the Python checks."""
    from fastadam import _numba_kernel
    if request.param == "python checks":
        monkeypatch.setattr(_backends, "compiled_or_none", lambda: None)
    elif _backends.compiled_or_none() is None:
        pytest.skip("the compiled extension is not built")
    monkeypatch.setattr(_numba_kernel, "FLAGS", tuple(f for f in _numba_kernel.FLAGS if f != "maximize"))


def test_a_flag_the_backend_lacks_is_refused_at_construction(numba_without_maximize):
    p = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match=r"backend 'numba' does not implement maximize=True"):
        fastadam.Adam([p], backend="numba", maximize=True)
    with pytest.raises(ValueError, match=r"maximize=True \(param_groups\[1\]\)"):
        fastadam.Adam([{"params": [p]}, {"params": [np.zeros(3, np.float32)], "maximize": True}],
                      backend="numba")
    fastadam.Adam([p], backend="numba", amsgrad=True)  # a flag it implements


@pytest.mark.parametrize("size", [1000, 1 << 16])  # serial, and parallel where threads allow
def test_a_flag_set_after_a_step_is_refused_and_changes_nothing(numba_without_maximize, rng, size):
    params = [rng.standard_normal(size).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    opt = fastadam.Adam([{"params": params[:1]}, {"params": params[1:]}], backend="numba",
                        amsgrad=True, num_threads=2)
    ref = fastadam.Adam([{"params": [p.copy() for p in params[:1]]},
                         {"params": [p.copy() for p in params[1:]]}], backend="numpy", amsgrad=True)
    for _ in range(2):
        assert opt.step(grads) is True
        ref.step(grads)
    before = [p.copy() for p in params]
    state = {k: {key: np.copy(value) for key, value in entry.items()} for k, entry in opt.state.items()}
    opt.param_groups[1]["maximize"] = True
    with pytest.raises(ValueError, match=r"does not implement maximize=True \(param_groups\[1\]\)"):
        opt.step(grads)
    for p, b in zip(params, before):
        assert np.array_equal(p, b)
    for k, entry in opt.state.items():
        assert entry.keys() == state[k].keys()
        for key, value in entry.items():
            assert np.array_equal(value, state[k][key])
    opt.param_groups[1]["maximize"] = False  # and the optimizer goes on, with the oracle's bits
    assert opt.step(grads) is True
    ref.step(grads)
    for p, r in zip(params, ref._parameters()):
        assert np.array_equal(p, r)
