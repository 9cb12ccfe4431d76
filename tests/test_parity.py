"""Every backend against the NumPy reference: bitwise, on odd lengths, every variant."""
import numpy as np
import pytest

import fastadam
from fastadam import _backends
from fastadam import _reference
from conftest import backend_params

SIZES = (1, 7, 17, 1000, 100003)
VARIANTS = {
    "adam": (fastadam.Adam, {}),
    "adam-l2": (fastadam.Adam, dict(weight_decay=0.05)),
    "adamw": (fastadam.AdamW, {}),
    "amsgrad": (fastadam.Adam, dict(amsgrad=True)),
    "maximize": (fastadam.Adam, dict(maximize=True)),
    "adamw-amsgrad-maximize": (fastadam.AdamW, dict(amsgrad=True, maximize=True, weight_decay=0.1)),
    "adam-l2-amsgrad": (fastadam.Adam, dict(amsgrad=True, weight_decay=0.01, betas=(0.5, 0.9))),
}


def reference_run(p0, grads, decoupled, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=None,
                  amsgrad=False, maximize=False, lrs=None):
    """The oracle, written out directly from fastadam._reference, independent of the classes."""
    if weight_decay is None:
        weight_decay = 1e-2 if decoupled else 0.0
    p = p0.copy()
    m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    mode = _reference.WD_NONE if weight_decay == 0 else (
        _reference.WD_DECOUPLED if decoupled else _reference.WD_L2)
    for t, g in enumerate(grads, start=1):
        step_lr = lr if lrs is None else lrs[t - 1]
        s = _reference.step_scalars(step_lr, betas[0], betas[1], eps, weight_decay, t)
        _reference.adam_update(p, g, m, v, vmax if amsgrad else None, s, mode, amsgrad, maximize)
    return p, m, v, vmax


@pytest.mark.parametrize("backend", backend_params(("cython", "numba")))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bitwise_equal_to_reference(backend, dtype, n, variant, rng):
    cls, kw = VARIANTS[variant]
    steps = 120
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) * dtype(10.0 ** rng.integers(-3, 3)) for _ in range(steps)]
    p = p0.copy()
    opt = cls([p], backend=backend, **kw)
    for g in grads:
        assert opt.step([g]) is True
    ref_p, ref_m, ref_v, ref_vmax = reference_run(p0, grads, cls is fastadam.AdamW, **kw)
    np.testing.assert_array_equal(p, ref_p)
    np.testing.assert_array_equal(opt.state[0]["exp_avg"], ref_m)
    np.testing.assert_array_equal(opt.state[0]["exp_avg_sq"], ref_v)
    if kw.get("amsgrad"):
        np.testing.assert_array_equal(opt.state[0]["max_exp_avg_sq"], ref_vmax)
    assert opt.state[0]["step"] == steps
    assert not np.array_equal(p, p0)  # the step did something


@pytest.mark.parametrize("backend", backend_params())
def test_reference_matches_textbook_algorithm(backend, rng):
    """Kingma & Ba's Algorithm 1 in float64, written independently: m_hat, v_hat."""
    n, lr, b1, b2, eps = 50, 1e-2, 0.9, 0.999, 1e-8
    p0 = rng.standard_normal(n)
    p = p0.copy()
    opt = fastadam.Adam([p], lr=lr, betas=(b1, b2), eps=eps, backend=backend)
    q, m, v = p0.copy(), np.zeros(n), np.zeros(n)
    for t in range(1, 31):
        g = rng.standard_normal(n)
        opt.step([g])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        q = q - lr * m_hat / (np.sqrt(v_hat) + eps)
    np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", backend_params())
def test_updates_in_place(backend, rng):
    p = rng.standard_normal((30, 7)).astype(np.float32)
    before, address = p.copy(), p.ctypes.data
    opt = fastadam.Adam([p], lr=0.1, backend=backend)
    opt.step([np.ones_like(p)])
    assert opt.param_groups[0]["params"][0] is p
    assert p.ctypes.data == address
    assert not np.array_equal(p, before)
    m = opt.state[0]["exp_avg"]
    opt.step([np.ones_like(p)])
    assert opt.state[0]["exp_avg"] is m  # state buffers are updated in place too


@pytest.mark.parametrize("backend", backend_params())
def test_groups_schedules_and_many_tensors(backend, rng):
    """Groups with their own hyperparameters, lr changed between steps, 2-D arrays:
    each tensor matches its own reference run."""
    shapes = [(13, 5), (40000,), (3, 3, 3), (1,), (70001,)]
    dts = [np.float32, np.float64, np.float32, np.float64, np.float32]
    p0 = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dts)]
    ps = [x.copy() for x in p0]
    groups = [{"params": ps[:2]},
              {"params": ps[2:4], "lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1},
              {"params": ps[4:], "amsgrad": True, "eps": 1e-6}]
    opt = fastadam.AdamW(groups, lr=3e-3, backend=backend)
    steps = 40
    grads = [[rng.standard_normal(s).astype(d) for s, d in zip(shapes, dts)] for _ in range(steps)]
    lrs = [3e-3 * (0.95 ** t) for t in range(steps)]
    for t in range(steps):
        opt.param_groups[0]["lr"] = lrs[t]
        opt.step(grads[t])
    settings = [dict(lrs=lrs), dict(lrs=lrs), dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
                dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
                dict(lr=3e-3, amsgrad=True, eps=1e-6)]
    for k in range(len(shapes)):
        ref_p, *_ = reference_run(p0[k], [g[k] for g in grads], True, **settings[k])
        np.testing.assert_array_equal(ps[k], ref_p, err_msg=f"tensor {k}")


@pytest.mark.parametrize("backend", backend_params(("cython", "numba")))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_across_thread_counts(backend, dtype, rng):
    shapes = [1_000_003, 17, 65536 * 3 + 5, 300_000]
    p0 = [rng.standard_normal(n).astype(dtype) for n in shapes]
    grads = [[rng.standard_normal(n).astype(dtype) for n in shapes] for _ in range(5)]
    results = []
    for threads in (1, 2, 3, 8):
        ps = [x.copy() for x in p0]
        opt = fastadam.AdamW(ps, amsgrad=True, backend=backend, num_threads=threads)
        for g in grads:
            opt.step(g)
        results.append(ps)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", backend_params())
def test_flat_buffer_is_one_tensor(backend, rng):
    """A model in a FlatParameters buffer steps exactly like its separate arrays."""
    shapes = {"W1": (20, 30), "b1": (30,), "W2": (30, 3), "b2": (3,)}
    flat = fastadam.FlatParameters(shapes)
    separate = {}
    for name, shape in shapes.items():
        flat.params[name][...] = rng.standard_normal(shape)
        separate[name] = flat.params[name].copy()
    for views, buffer in ((flat.params, flat.data), (flat.grads, flat.grad)):
        start, end = buffer.ctypes.data, buffer.ctypes.data + buffer.nbytes
        for v in views.values():
            assert start <= v.ctypes.data and v.ctypes.data + v.nbytes <= end
            assert v.ctypes.data % 64 == 0  # each view starts on a cache line
    assert flat.data.ctypes.data % 64 == 0
    opt_flat = fastadam.Adam([flat.data], lr=0.01, backend=backend)
    opt_sep = fastadam.Adam(list(separate.values()), lr=0.01, backend="numpy")
    for _ in range(10):
        grads = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        for name in shapes:
            flat.grads[name][...] = grads[name]
        opt_flat.step([flat.grad])
        opt_sep.step(list(grads.values()))
    for name in shapes:
        np.testing.assert_array_equal(flat.params[name], separate[name])


def test_fast_and_checked_paths_agree(rng):
    """The compiled fast path and the Python-checked path give the same bits.
    A numpy.float64 lr is a valid float that the fast path leaves to the checked path."""
    pytest.importorskip("fastadam._kernel")
    p0 = rng.standard_normal(1000).astype(np.float32)
    a, b = p0.copy(), p0.copy()
    fast = fastadam.Adam([a], lr=0.01, backend="cython")
    slow = fastadam.Adam([b], lr=np.float64(0.01), backend="cython")
    for _ in range(20):
        g = rng.standard_normal(1000).astype(np.float32)
        fast.step([g])
        slow.step([g])
    np.testing.assert_array_equal(a, b)
    assert fast.state[0]["step"] == slow.state[0]["step"] == 20


@pytest.mark.parametrize("backend", backend_params())
def test_amsgrad_switched_on_later(backend, rng):
    p = rng.standard_normal(100)
    opt = fastadam.Adam([p], backend=backend)
    opt.step([rng.standard_normal(100)])
    opt.param_groups[0]["amsgrad"] = True
    opt.step([rng.standard_normal(100)])
    np.testing.assert_array_equal(opt.state[0]["max_exp_avg_sq"], opt.state[0]["exp_avg_sq"])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decaying_moment_never_goes_subnormal(backend, dtype, rng):
    """Zero gradients after a few real ones: m decays by beta1 per step.  It is stored
    as zero once below the smallest normal number (never subnormal), bitwise as the
    reference."""
    n = 1000
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(3)]
    grads += [np.zeros(n, dtype)] * (900 if dtype == np.float32 else 7000)
    p = p0.copy()
    opt = fastadam.Adam([p], backend=backend, betas=(0.9, 0.999))
    tiny = np.finfo(dtype).smallest_normal
    saw_tiny_range = False
    for g in grads:
        opt.step([g])
        m = opt.state[0]["exp_avg"]
        assert not np.any((m != 0) & (np.abs(m) < tiny))
        saw_tiny_range |= bool(np.any((m != 0) & (np.abs(m) < 1e4 * tiny)))
    assert saw_tiny_range and not opt.state[0]["exp_avg"].any()
    ref_p, *_ = reference_run(p0, grads, False, betas=(0.9, 0.999))
    np.testing.assert_array_equal(p, ref_p)


def test_numba_with_python_checks_matches_the_reference(rng):
    """Without the compiled extension the Numba backend checks its steps in Python
    (fastadam/_checks.py): same bits."""
    pytest.importorskip("numba")
    p0 = rng.standard_normal(5000).astype(np.float32)
    grads = [rng.standard_normal(5000).astype(np.float32) for _ in range(10)]
    p = p0.copy()
    opt = fastadam.AdamW([p], amsgrad=True, backend="numba")
    # As when fastadam._kernel is not built: no compiled checks behind the Numba kernel.
    opt._backend = _backends.NumbaBackend(opt._backend.module, None)
    for g in grads:
        opt.step([g])
    assert type(opt._plan._checks).__name__ == "Checks"
    ref_p, *_ = reference_run(p0, grads, True, amsgrad=True)
    np.testing.assert_array_equal(p, ref_p)
