"""Whole calls: a step, a load and a snapshot apply completely or not at all, under
other threads and under Ctrl-C, on every backend; memory the kernel uses is held.

The cases that used to crash the process run in a child process, so a crash
is a failed test, not a dead test run.
"""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastadam
from conftest import backend_params

BACKENDS = backend_params()


def run_child(code, timeout=240):
    """Run ``code`` in a fresh interpreter; return its stdout (it must exit 0).

    glibc returns a freed large block to the OS only below its mmap threshold,
    which it raises after each such free; fixing the threshold makes every freed
    gradient unmapped at once, so a read of freed memory is a crash, not luck."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def alongside(background, foreground):
    """Run ``background()`` in a loop on another thread while ``foreground()`` runs;
    return the exceptions the background raised and how often it ran."""
    errors, runs = [], [0]
    done = threading.Event()

    def loop():
        while not done.is_set():
            try:
                background()
                runs[0] += 1
            except Exception as e:
                errors.append(e)

    t = threading.Thread(target=loop)
    t.start()
    try:
        foreground()
    finally:
        done.set()
        t.join()
    return errors, runs[0]


@pytest.mark.parametrize("backend", [b if b.values[0] != "numpy" else pytest.param(
    "numpy", marks=[*b.marks, pytest.mark.slow]) for b in BACKENDS])  # numpy: 14 s of reference steps
def test_gradient_dropped_by_another_thread_mid_step(backend):
    """Another thread replaces the caller's gradients while the kernel runs (GIL
    released), dropping the last reference to the arrays being read: the step holds
    its own references, so nothing is freed under it (this was a SIGSEGV)."""
    out = run_child(f"""
        import threading, numpy as np, fastadam
        n = 1 << 21
        ps = [np.zeros(n, np.float32) for _ in range(4)]
        opt = fastadam.Adam(ps, backend={backend!r}, num_threads=2)
        grads = [np.ones(n, np.float32) for _ in range(4)]
        opt.step(grads)
        stop = threading.Event()
        churned = [0]
        def churn():
            while not stop.is_set():
                for k in range(4):
                    grads[k] = np.ones(n, np.float32)  # the old array loses its last reference
                churned[0] += 1
        t = threading.Thread(target=churn); t.start()
        for _ in range(40):
            opt.step(grads)
        stop.set(); t.join()
        assert {{opt.state[k]["step"] for k in range(4)}} == {{41}}
        assert all(np.array_equal(ps[0], p) for p in ps)
        print("ok", churned[0])
    """)
    assert out.startswith("ok") and int(out.split()[1]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["exp_avg", "param"])
def test_array_resized_in_place(backend, which):
    """``resize(refcheck=False)`` moves an array's memory under the same object: the
    next step notices (data pointer and size) and refuses; it never writes through the
    old pointer.  With NumPy's reference check, the plan's reference makes NumPy refuse."""
    out = run_child(f"""
        import numpy as np, fastadam
        p = np.zeros(1000, np.float32)
        opt = fastadam.Adam([p], backend={backend!r})
        opt.step([np.ones(1000, np.float32)])
        a = opt.state[0]["exp_avg"] if {which!r} == "exp_avg" else p
        if {backend!r} != "numpy":
            try:
                a.resize(16)
                raise SystemExit("resize with refcheck should be refused while the plan holds a")
            except ValueError:
                pass
        a.resize(16, refcheck=False)
        try:
            opt.step([np.ones(1000, np.float32)])
        except ValueError as e:
            print("refused:", e)
        else:
            raise SystemExit("a step on a resized array was applied")
        assert opt.state[0]["step"] == 1
    """)
    assert "refused:" in out and "shape (16,)" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_while_another_thread_steps_is_never_torn(backend):
    """Every snapshot is of one moment between steps: all entries at the same step,
    and every moment equal to the one a serial run has at that step."""
    n, k = 1 << 18, 3
    ps = [np.zeros(n, np.float32) for _ in range(k)]
    opt = fastadam.Adam(ps, backend=backend, num_threads=2)
    grads = [np.full(n, 0.5, np.float32) for _ in range(k)]
    # With constant gradients every element of every tensor follows the same sequence.
    expected_m = {0: 0.0}
    ref = fastadam.Adam([np.zeros(16, np.float32)], backend="numpy")
    for s in range(1, 61):
        ref.step([np.full(16, 0.5, np.float32)])
        expected_m[s] = float(ref.state[0]["exp_avg"][0])
    snapshots = []

    def steps():
        for _ in range(60):
            opt.step(grads)

    errors, _ = alongside(lambda: snapshots.append(opt.state_dict()), steps)
    assert not errors
    assert snapshots
    for sd in snapshots:
        steps = {entry["step"] for entry in sd["state"].values()}
        assert len(steps) <= 1
        for entry in sd["state"].values():
            m = entry["exp_avg"]
            assert m.min() == m.max() == np.float32(expected_m[entry["step"]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_while_another_thread_steps(backend):
    n, k = 1 << 17, 3
    ps = [np.zeros(n, np.float32) for _ in range(k)]
    opt = fastadam.Adam(ps, backend=backend, num_threads=2)
    grads = [np.full(n, 0.5, np.float32) for _ in range(k)]
    opt.step(grads)
    saved = opt.state_dict()

    def steps():
        for _ in range(40):
            opt.step(grads)

    errors, loads = alongside(lambda: opt.load_state_dict(saved), steps)
    assert not errors and loads > 0
    steps = {opt.state[i]["step"] for i in range(k)}
    assert len(steps) == 1
    # Whatever interleaving happened, the state is that of a serial run at that step.
    ref = fastadam.Adam([np.zeros(16, np.float32)], backend="numpy")
    for _ in range(steps.pop()):
        ref.step([np.full(16, 0.5, np.float32)])
    for i in range(k):
        assert opt.state[i]["exp_avg"].min() == opt.state[i]["exp_avg"].max() == ref.state[0]["exp_avg"][0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_stepping_one_optimizer_take_turns(backend):
    """Concurrent steps on one optimizer are serialised by its lock: every step applies
    whole, and the result is that of the same number of steps taken one after another."""
    n = 1 << 20
    p = np.zeros(n, np.float32)
    opt = fastadam.Adam([p], backend=backend, num_threads=1)
    g = np.full(n, 0.25, np.float32)
    barrier = threading.Barrier(2)
    errors = []

    def run():
        barrier.wait()
        for _ in range(10):
            try:
                opt.step([g])
            except Exception as e:
                errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ref = np.zeros(16, np.float32)
    ref_opt = fastadam.Adam([ref], backend="numpy")
    for _ in range(20):
        ref_opt.step([np.full(16, 0.25, np.float32)])
    assert opt.state[0]["step"] == 20
    assert p.min() == p.max() == ref[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_during_steps_never_leaves_a_half_step(backend):
    """SIGINT at random moments while stepping many tensors: each KeyboardInterrupt
    arrives between steps, never inside one (all step counts equal, all tensors alike)."""
    out = run_child(f"""
        import os, random, signal, threading, time, numpy as np, fastadam
        # Python's own handler, whatever this child inherited: a shell starts a
        # background job (nohup, &) with SIGINT ignored, and Python then keeps it so.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ps = [np.zeros(20000, np.float32) for _ in range(60)]
        grads = [np.full(20000, 0.5, np.float32) for _ in range(60)]
        opt = fastadam.Adam(ps, backend={backend!r}, num_threads=1)
        opt.step(grads)
        stop, go = threading.Event(), threading.Event()
        def interrupt():  # from the moment the harness below can take a KeyboardInterrupt
            go.wait()
            rnd = random.Random(1)
            while not stop.is_set():
                time.sleep(rnd.uniform(0.0005, 0.004))
                os.kill(os.getpid(), signal.SIGINT)
        t = threading.Thread(target=interrupt, daemon=True); t.start()
        def one_step_count():
            while True:  # a signal may land in this check too: check again
                try:
                    return {{e["step"] for e in opt.state.values()}}
                except KeyboardInterrupt:
                    pass
        interrupted = 0
        deadline = time.time() + 4
        while True:
            try:  # a signal may land in the harness itself (the loop's own lines): go on
                if not go.is_set():  # once: a signal landing inside Event.set() would leave its lock held
                    go.set()
                if time.time() >= deadline:
                    break
                try:
                    opt.step(grads)
                except KeyboardInterrupt:
                    interrupted += 1
                steps = one_step_count()
                assert len(steps) == 1, steps
            except KeyboardInterrupt:
                pass
        while True:
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                break
            except KeyboardInterrupt:
                pass
        stop.set(); t.join()
        steps = one_step_count()
        assert all(np.array_equal(ps[0], p) for p in ps), "tensors disagree: a half step"
        print("ok", interrupted, steps)
    """)
    assert out.startswith("ok")
    assert int(out.split()[1]) > 0  # the signals did arrive


def test_ctrl_c_is_deferred_in_a_child_forked_from_another_thread():
    """After fork() from a thread other than the main one, that thread is the child's
    main thread, where Python runs signal handlers: a SIGINT inside a deferral is
    held until the block ends, as in the parent (exit 0), not raised inside it (3)."""
    out = run_child("""
        import os, signal, threading
        from fastadam import _interrupts
        signal.signal(signal.SIGINT, signal.default_int_handler)  # not an inherited SIG_IGN
        def fork_and_interrupt():
            pid = os.fork()
            if pid:
                print("child exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
                return
            inside = None
            try:
                with _interrupts.deferred():
                    os.kill(os.getpid(), signal.SIGINT)
                    for _ in range(10000):  # bytecodes, where a handler would run
                        pass
                    inside = "held"
            except KeyboardInterrupt:
                os._exit(0 if inside == "held" else 3)
            os._exit(4)  # the held signal was lost
        t = threading.Thread(target=fork_and_interrupt)
        t.start(); t.join()
    """)
    assert out.split() == ["child", "exit", "0"], out


@pytest.mark.parametrize("value, exc", [
    (0, ValueError), (-1, ValueError), (10 ** 6, ValueError), (1025, ValueError),
    (2.0, TypeError), (True, TypeError), ("2", TypeError)])
def test_num_threads_is_validated_in_the_constructor_and_when_set(value, exc):
    with pytest.raises(exc, match="num_threads must be None or a positive int"):
        fastadam.Adam([np.zeros(3)], num_threads=value)
    opt = fastadam.Adam([np.zeros(3)], num_threads=2)
    with pytest.raises(exc, match="num_threads must be None or a positive int"):
        opt.num_threads = value
    assert opt.num_threads == 2
    opt.num_threads = np.int64(3)
    assert opt.num_threads == 3 and type(opt.num_threads) is int


def test_skip_if_nonfinite_is_validated_when_set():
    opt = fastadam.Adam([np.zeros(3)])
    with pytest.raises(TypeError, match="skip_if_nonfinite must be True or False, got 1"):
        opt.skip_if_nonfinite = 1
    assert opt.skip_if_nonfinite is False


@pytest.mark.parametrize("backend", backend_params(("cython",)))
def test_many_threads_up_to_the_limit_run(backend):
    """The largest accepted thread count runs (oversubscribed) and gives the same bits."""
    p = np.zeros(1 << 16, np.float32)
    q = p.copy()
    g = np.linspace(-1, 1, p.size, dtype=np.float32)
    fastadam.Adam([p], backend=backend, num_threads=64).step([g])
    fastadam.Adam([q], backend="numpy").step([g])
    np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalar_hyperparameters_are_remembered_not_rechecked(backend, rng):
    """A NumPy scalar lr, validated once, is accepted by identity on later steps; a new
    value goes through the checked path; the bits are the reference's either way."""
    p = rng.standard_normal(100).astype(np.float32)
    q = p.copy()
    opt = fastadam.Adam([p], backend=backend)
    ref = fastadam.Adam([q], backend="numpy")
    for opt_ in (opt, ref):
        opt_.param_groups[0]["lr"] = np.float64(0.01)
    for i in range(5):
        g = rng.standard_normal(100).astype(np.float32)
        if i == 3:
            for opt_ in (opt, ref):
                opt_.param_groups[0]["lr"] = np.float32(0.02)
        opt.step([g])
        ref.step([g])
    np.testing.assert_array_equal(p, q)
