"""Bad numbers, fork, a save killed mid-write, and property-based parity."""
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fastadam
from conftest import backend_params
from test_errors import assert_unchanged, snapshot
from test_parity import reference_run

BACKENDS = backend_params()


# -- non-finite gradients -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_skip_if_nonfinite_leaves_everything_untouched(backend, bad, rng):
    shapes = [(300_001,), (17,), (200, 300)]  # large enough for the parallel path
    ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt = fastadam.AdamW(ps, amsgrad=True, backend=backend, skip_if_nonfinite=True)
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    assert opt.step(grads) is True
    snap = snapshot(opt)
    bad_grads = [g.copy() for g in grads]
    bad_grads[2][123, 45] = bad
    assert opt.step(bad_grads) is False
    assert_unchanged(opt, snap)
    assert opt.skipped_steps == 1
    assert opt.step(grads) is True and opt.state[0]["step"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_first_step_creates_no_state(backend):
    p = np.zeros(10)
    opt = fastadam.Adam([p], backend=backend, skip_if_nonfinite=True)
    assert opt.step([np.full(10, np.nan)]) is False
    assert opt.state == {} and not p.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_by_default_like_torch(backend, rng):
    p0 = rng.standard_normal(100).astype(np.float32)
    g = rng.standard_normal(100).astype(np.float32)
    g[[3, 50]] = [np.nan, np.inf]
    p = p0.copy()
    opt = fastadam.Adam([p], backend=backend)
    assert opt.step([g]) is True
    ref, *_ = reference_run(p0, [g], False)
    np.testing.assert_array_equal(p, ref)  # NaN where the reference has NaN
    assert np.isnan(p[3]) and np.isnan(p[50]) and np.isfinite(np.delete(p, [3, 50])).all()


# -- extreme values --------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["zero", "tiny", "huge", "subnormal", "eps0", "lr0"])
def test_extreme_values(backend, dtype, case, rng):
    """Documented behaviour, bitwise as the reference in every case."""
    n = 1001
    p0 = rng.standard_normal(n).astype(dtype)
    scale = {"zero": 0.0, "tiny": 1e-30, "huge": 1e30, "subnormal": 1e-40}.get(case, 1.0)
    if dtype == np.float64 and case == "subnormal":
        scale = 1e-310
    grads = [(rng.standard_normal(n) * scale).astype(dtype) for _ in range(20)]
    kw = {"eps0": dict(eps=0.0), "lr0": dict(lr=0.0)}.get(case, {})
    p = p0.copy()
    opt = fastadam.Adam([p], backend=backend, **kw)
    for g in grads:
        opt.step([g])
    ref, *_ = reference_run(p0, grads, False, **kw)
    np.testing.assert_array_equal(p, ref)
    if case in ("zero", "lr0"):
        np.testing.assert_array_equal(p, p0)  # no gradient, or no step size: no movement
    if case == "huge" and dtype == np.float32:
        # g*g overflows float32 to inf, so v = inf and m / sqrt(v) = 0: p stays put, no NaN.
        assert np.isinf(opt.state[0]["exp_avg_sq"]).all() and np.array_equal(p, p0)
    if case in ("tiny", "subnormal", "eps0"):
        assert np.isfinite(p).all()


def test_eps0_with_an_always_zero_gradient_is_nan_as_in_torch():
    p = np.ones(3, np.float32)
    opt = fastadam.Adam([p], eps=0.0)
    opt.step([np.array([0.0, 1.0, 0.0], np.float32)])
    assert np.isnan(p[0]) and np.isnan(p[2]) and np.isfinite(p[1])


# -- property-based parity ----------------------------------------------------------

hyper = st.fixed_dictionaries({
    "lr": st.floats(0, 1), "beta1": st.floats(0, 0.999), "beta2": st.floats(0, 0.9999),
    "eps": st.sampled_from([0.0, 1e-12, 1e-8, 1e-3]), "weight_decay": st.sampled_from([0.0, 1e-4, 0.1]),
    "amsgrad": st.booleans(), "maximize": st.booleans(), "decoupled": st.booleans(),
})


@pytest.mark.parametrize("backend", backend_params(("cython", "numba")))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 3000), offset=st.integers(0, 37), dtype=st.sampled_from([np.float32, np.float64]),
       h=hyper, steps=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), threads=st.sampled_from([None, 1, 3]))
def test_random_configurations_match_the_reference(backend, n, offset, dtype, h, steps, seed, threads):
    """Random lengths, dtypes and hyperparameters, parameters that are views at odd
    offsets into a larger buffer: bitwise the reference."""
    rng = np.random.default_rng(seed)
    buffer = rng.standard_normal(n + offset + 5).astype(dtype)
    before = buffer.copy()
    p = buffer[offset:offset + n]  # a view at an odd element offset
    p0 = p.copy()
    grads = [rng.standard_normal(n).astype(dtype) * dtype(rng.choice([1e-3, 1.0, 1e3])) for _ in range(steps)]
    cls = fastadam.AdamW if h["decoupled"] else fastadam.Adam
    kw = dict(lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weight_decay"],
              amsgrad=h["amsgrad"], maximize=h["maximize"])
    opt = cls([p], backend=backend, num_threads=threads, **kw)
    for g in grads:
        opt.step([g])
    ref, *_ = reference_run(p0, grads, h["decoupled"], **kw)
    np.testing.assert_array_equal(p, ref)
    view = np.arange(offset, offset + n)
    np.testing.assert_array_equal(np.delete(buffer, view), np.delete(before, view))  # nothing outside the view moved


# -- processes -----------------------------------------------------------------------

def run(code, timeout=120):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("backend", backend_params(("cython", "numba")))
def test_step_in_forked_child_does_not_hang(backend):
    """libgomp cannot start threads in a forked child: fastadam runs the child's steps
    on its calling thread instead of waiting forever."""
    out = run(f"""
        import os, numpy as np, fastadam
        p = np.zeros(1_000_000, np.float32); g = np.ones_like(p)
        opt = fastadam.Adam([p], backend={backend!r}, num_threads=2)
        opt.step([g])
        pid = os.fork()
        if pid == 0:
            opt.step([g])
            os._exit(0 if opt.state[0]["step"] == 2 else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), opt.state[0]["step"])
    """, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "1"]


def test_save_killed_mid_write_leaves_the_previous_file_intact(tmp_path):
    """A process saving a large state over and over is killed with SIGKILL at several
    moments; the file is always a complete save (loadable, a step it wrote)."""
    path = tmp_path / "opt.npz"
    writer = textwrap.dedent(f"""
        import sys, numpy as np, fastadam
        p = np.zeros(4_000_000, np.float32)
        opt = fastadam.Adam([p])
        g = np.ones_like(p)
        opt.step([g]); opt.save({str(path)!r})
        print("ready", flush=True)
        while True:
            opt.step([g]); opt.save({str(path)!r})
    """)
    for delay in (0.05, 0.2, 0.35, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        opt = fastadam.Adam([np.zeros(4_000_000, np.float32)])
        opt.load(path)  # raises if the file were torn
        assert opt.state[0]["step"] >= 1
        np.testing.assert_array_equal(opt.state[0]["exp_avg"][:5],
                                      np.full(5, opt.state[0]["exp_avg"][0]))
