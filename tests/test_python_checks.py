"""The Numba backend where the compiled extension is not built: its step is verified in
Python (fastadam/_checks.py) and still takes the fast path, with the reference's bits,
the thread policy's planner, and every refusal of the compiled checks."""
import numpy as np
import pytest

import fastadam
from fastadam import _backends, _checks, _threads

pytestmark = pytest.mark.slow  # the Numba backend's JIT compiles

numba = pytest.importorskip("numba")


@pytest.fixture
def without_extension(monkeypatch):
    """As in an install without a compiler: the Numba backend finds no compiled kernel."""
    monkeypatch.setattr(_backends, "compiled_or_none", lambda: None)


def counting_checked_steps(opt):
    """Count the steps that go through the optimizer's checked path."""
    calls = []
    checked = opt._checked_step

    def counted(grads):
        calls.append(1)
        return checked(grads)
    opt._checked_step = counted
    return calls


VARIANTS = [
    dict(),
    dict(weight_decay=0.05),
    dict(amsgrad=True, maximize=True),
    dict(amsgrad=True, weight_decay=0.1, betas=(0.5, 0.9)),
]


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", [dict(), dict(max_grad_norm=1.0, skip_if_nonfinite=True)],
                         ids=["plain", "clip-skip"])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("cls", [fastadam.Adam, fastadam.AdamW])
def test_python_checks_take_the_fast_path_with_the_reference_bits(without_extension, rng, cls,
                                                                    variant, options, state_dtype):
    shapes = [(33, 7), (1000,), (5,)]
    dtypes = [np.float32] * 3 if state_dtype == "bfloat16" else [np.float32, np.float64, np.float32]
    init = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    params = {name: [a.copy() for a in init] for name in ("numba", "numpy")}
    opts = {name: cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01}], backend=name, seed=3,
                      state_dtype=state_dtype, **VARIANTS[variant], **options)
            for name, ps in params.items()}
    checked = counting_checked_steps(opts["numba"])
    for step in range(12):
        grads = [rng.standard_normal(s).astype(d) * 3 for s, d in zip(shapes, dtypes)]
        if step == 5:
            grads[1][3] = np.nan  # skipped with skip_if_nonfinite, else propagated
        results = {name: opt.step([g.copy() for g in grads]) for name, opt in opts.items()}
        assert results["numba"] == results["numpy"]
    assert isinstance(opts["numba"]._plan._checks, _checks.Checks)
    assert len(checked) == 1  # the first step only
    assert opts["numba"].skipped_steps == opts["numpy"].skipped_steps
    assert repr(opts["numba"].last_grad_norm) == repr(opts["numpy"].last_grad_norm)
    for a, b in zip(params["numba"], params["numpy"]):
        assert a.tobytes() == b.tobytes()
    for k, entry in opts["numpy"].state.items():
        for key, value in entry.items():
            mine = opts["numba"].state[k][key]
            assert (mine.tobytes() == value.tobytes()) if isinstance(value, np.ndarray) else mine == value


def _set_dtype(a, dtype):
    a.dtype = dtype


# Changes between two steps, each made alike to the optimizer whose Numba backend checks
# in Python and to the reference's, which checks everything every step: (optimizer,
# its parameters) -> the gradients of the next step.
def _changed(change, grads=lambda opt, ps: [np.ones_like(p) for p in ps]):
    def apply(opt, ps):
        change(opt, ps)
        return grads(opt, ps)
    return apply


CHANGES = {
    "none": _changed(lambda opt, ps: None),
    "param readonly": _changed(lambda opt, ps: ps[0].setflags(write=False)),
    "param dtype in place": _changed(lambda opt, ps: _set_dtype(ps[0], np.int32)),
    "param byte-swapped in place": _changed(
        lambda opt, ps: _set_dtype(ps[0], ps[0].dtype.newbyteorder())),
    "state reshaped in place": _changed(
        lambda opt, ps: setattr(opt.state[0]["exp_avg"], "shape", (1000,))),
    "state readonly": _changed(lambda opt, ps: opt.state[1]["exp_avg_sq"].setflags(write=False)),
    "state replaced": _changed(lambda opt, ps: opt.state[1].__setitem__(
        "exp_avg", opt.state[1]["exp_avg"].copy())),
    "state entry gone": _changed(lambda opt, ps: opt.state.pop(1)),
    "step count too large": _changed(lambda opt, ps: opt.state[0].__setitem__("step", 2 ** 53)),
    "step count a bool": _changed(lambda opt, ps: opt.state[0].__setitem__("step", True)),
    "step count a NumPy int": _changed(
        lambda opt, ps: opt.state[0].__setitem__("step", np.int64(4))),
    "lr negative": _changed(lambda opt, ps: opt.param_groups[0].__setitem__("lr", -1.0)),
    "lr a NumPy float": _changed(
        lambda opt, ps: opt.param_groups[1].__setitem__("lr", np.float32(0.01))),
    "amsgrad an int": _changed(lambda opt, ps: opt.param_groups[0].__setitem__("amsgrad", 1)),
    "amsgrad switched on": _changed(
        lambda opt, ps: opt.param_groups[0].__setitem__("amsgrad", True)),
    "betas a list": _changed(lambda opt, ps: opt.param_groups[0].__setitem__("betas", [0.8, 0.9])),
    "parameter replaced": _changed(lambda opt, ps: opt.param_groups[1]["params"].__setitem__(
        0, ps[2].copy())),
    "gradient aliases the state": _changed(
        lambda opt, ps: None, lambda opt, ps: [np.ones_like(ps[0]), opt.state[1]["exp_avg"],
                                               np.ones_like(ps[2])]),
    "gradient a list": _changed(lambda opt, ps: None,
                                lambda opt, ps: [np.ones_like(ps[0]), np.ones(ps[1].shape).tolist(),
                                            np.ones_like(ps[2])]),
    "gradient Fortran-ordered": _changed(
        lambda opt, ps: None, lambda opt, ps: [np.asfortranarray(np.ones_like(ps[0])),
                                          np.ones_like(ps[1]), np.ones_like(ps[2])]),
    "gradient of another dtype": _changed(
        lambda opt, ps: None, lambda opt, ps: [np.ones_like(ps[0]), np.ones(ps[1].shape, np.float32),
                                          np.ones_like(ps[2])]),
    "gradient read-only": _changed(
        lambda opt, ps: None, lambda opt, ps: [np.ones_like(ps[0]), np.ones_like(ps[1]),
                                               _readonly(ps[2])]),
    "too few gradients": _changed(lambda opt, ps: None, lambda opt, ps: [np.ones_like(ps[0])]),
}


def _readonly(p):
    g = np.ones_like(p)
    g.setflags(write=False)
    return g


def _outcome(fn):
    try:
        return fn(), None
    except Exception as e:  # the comparison is the point: any exception must match
        return None, (type(e), str(e))


def _everything(opt, ps):
    state = {(k, key): v.tobytes() if isinstance(v, np.ndarray) else repr(v)
             for k, entry in opt.state.items() for key, v in entry.items()}
    return [p.tobytes() for p in ps], state


@pytest.mark.parametrize("change", list(CHANGES))
def test_python_checks_accept_and_refuse_as_the_reference_does(without_extension, rng, change):
    """After each change, the next step's outcome (applied, or the error and its message)
    and every bit after it are the reference's; a refused step changes nothing."""
    init = [rng.standard_normal((20, 50)).astype(np.float32), rng.standard_normal(300),
            rng.standard_normal(7).astype(np.float32)]
    params = {name: [a.copy() for a in init] for name in ("numba", "numpy")}
    opts = {name: fastadam.Adam([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01}], backend=name)
            for name, ps in params.items()}
    for name, opt in opts.items():
        for _ in range(2):
            opt.step([np.full_like(p, 0.5) for p in params[name]])
    assert isinstance(opts["numba"]._plan._checks, _checks.Checks)
    results, before = {}, {}
    for name, opt in opts.items():
        ps = params[name]
        grads = CHANGES[change](opt, ps)
        before[name] = _everything(opt, ps)
        results[name] = _outcome(lambda: opt.step(grads))
    assert results["numba"] == results["numpy"], results
    for name, opt in opts.items():
        if results[name][1] is not None:
            assert _everything(opt, params[name]) == before[name]
    assert _everything(opts["numba"], params["numba"]) == _everything(opts["numpy"], params["numpy"])


def test_python_checks_notice_memory_moved_under_the_same_array(without_extension):
    """NumPy's __setstate__ (as pickle uses it) gives the same array object new memory:
    the plan notices the address and the checked path rebuilds it on the new memory."""
    p = np.zeros((20, 50), np.float32)
    opt = fastadam.Adam([p], backend="numba")
    opt.step([np.ones_like(p)])
    assert isinstance(opt._plan._checks, _checks.Checks)
    m = opt.state[0]["exp_avg"]
    m.__setstate__((1, m.shape, m.dtype, False, np.full(m.shape, 7, np.float32).tobytes()))
    opt.step([np.ones_like(p)])
    assert opt.state[0]["step"] == 2 and m[0, 0] == np.float32(0.9) * 7 + np.float32(0.1) * 1


def test_python_checks_use_the_thread_policy_planner(without_extension):
    """A step that may run in parallel asks the planner (every backend's), one that
    cannot does not; an explicit num_threads is taken as it is."""
    big = np.zeros(2 * _threads.PARALLEL_THRESHOLD, np.float32)
    opt = fastadam.Adam([big], backend="numba")
    opt.step([np.ones_like(big)])
    checks = opt._plan._checks
    most = _threads.default_num_threads()
    first = checks.threads_for_step(0)
    assert first == (most if most > 1 else 1)
    assert checks.threads_for_step(3) == 3
    small = fastadam.Adam([np.zeros(100, np.float32)], backend="numba")
    small.step([np.ones(100, np.float32)])
    assert small._plan._checks.threads_for_step(0) == 1
    planner = opt._plan._checks._planner
    assert isinstance(planner, _threads.ThreadPlanner)
    for _ in range(50):
        opt.step([np.ones_like(big)])
    if most > 1:
        assert planner._trials >= 1  # the steps were timed and a trial ended


def test_numba_without_the_extension_is_bit_for_bit_the_numba_with_it(rng):
    """The two sets of checks feed one kernel: the same bits from both."""
    if _backends.compiled_or_none() is None:
        pytest.skip("needs the compiled extension, for its checks")
    p0 = rng.standard_normal(3000).astype(np.float32)
    grads = [rng.standard_normal(3000).astype(np.float32) for _ in range(8)]
    results = []
    for compiled in (True, False):
        p = p0.copy()
        opt = fastadam.AdamW([p], amsgrad=True, backend="numba", state_dtype="bfloat16", seed=9)
        if not compiled:
            opt._backend = _backends.NumbaBackend(opt._backend.module, None)
        for g in grads:
            opt.step([g])
        results.append((p.tobytes(), opt.state[0]["exp_avg"].tobytes()))
        assert isinstance(opt._plan._checks, _checks.Checks) == (not compiled)
    assert results[0] == results[1]
