"""The Numba backend (``backend="numba"``): the fused update as a JIT kernel.

The same per-element operations, in the same order and rounding, as the
compiled kernel (src/adam_kernel.hpp) and the NumPy reference, so all three
agree bitwise.  Each variant (weight-decay mode, AMSGrad, maximize) is its own
function: the flags are closure constants, frozen at compile time, so the
loop has no branch on them.  A variant is compiled for float32 and float64 the
first time it is used, with ``cache=True`` (Numba keys its cache on the
closure's constants), so a new process loads it from disk instead of
compiling.

Only imported when the backend is used: ``import fastadam`` does not import numba.
"""
import math
import os
import threading

import numba
from numba import njit, prange

from . import _threads
from ._formats import FlushToZero
from ._step import WD_DECOUPLED, WD_L2, StepScalars

# Numba's default "workqueue" layer aborts the process when two threads enter
# a parallel function at once.  Prefer a thread-safe layer (OpenMP or TBB)
# unless the user chose one; if only workqueue is there, parallel calls are
# serialised with a lock (see _parallel_lock).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"

ALIGN = 16  # thread boundaries fall on multiples of 16 elements (a 64-byte line of float32)

N_RULE_CONSTANTS = 4  # (smallest normal, scaled smallest normal, 2**SCALE_EXP, 0) in T

_compiled = {}
_compile_lock = threading.Lock()
_workqueue_lock = threading.Lock()


# The flush-to-zero rule of fastadam/_formats.py, one operation at a time: a
# result below the smallest normal (after rounding with an unbounded exponent:
# `scaled` is the same operation with its operands scaled by 2**SCALE_EXP) is a
# zero of its sign; r * 0 is that zero (r is finite there).
@njit(inline="always", error_model="numpy")
def _ftz(r, scaled, c):
    a = abs(r)
    if a < c[0] or (a == c[0] and abs(scaled) < c[1]):
        return r * c[3]
    return r


@njit(inline="always", error_model="numpy")
def _daz(x, c):
    return x * c[3] if abs(x) < c[0] else x


@njit(inline="always", error_model="numpy")
def _mul(a, b, c):
    return _ftz(a * b, (a * c[2]) * b, c)


@njit(inline="always", error_model="numpy")
def _add(a, b, c):
    return _ftz(a + b, a * c[2] + b * c[2], c)


@njit(inline="always", error_model="numpy")
def _sub(a, b, c):
    return _ftz(a - b, a * c[2] - b * c[2], c)


@njit(inline="always", error_model="numpy")
def _div(a, b, c):
    return _ftz(a / b, (a * c[2]) / b, c)


@njit(inline="always", error_model="numpy")
def _update_element(p, g, m, v, vmax, i, wd_mode, amsgrad, maximize, s, c):
    """One element; ``s`` the step's scalars in T (a StepScalars), ``c`` the rule's
    constants (N_RULE_CONSTANTS)."""
    gi = _mul(_daz(g[i], c), s.grad_scale, c)
    gi = -gi if maximize else gi
    pi = _daz(p[i], c)
    if wd_mode == WD_L2:
        gi = _add(gi, _mul(s.weight_decay, pi, c), c)
    elif wd_mode == WD_DECOUPLED:
        pi = _mul(pi, s.decay, c)
    mi = _add(_mul(s.beta1, _daz(m[i], c), c), _mul(s.one_minus_beta1, gi, c), c)
    square = _mul(gi, gi, c)
    if maximize and square != square:
        # A NaN's sign: the reference's (-g) * (-g) is -g's NaN; LLVM folds the two
        # negations away and gives g's.
        square = gi
    vi = _add(_mul(s.beta2, _daz(v[i], c), c), _mul(s.one_minus_beta2, square, c), c)
    m[i] = mi
    v[i] = vi
    vd = vi
    if amsgrad:
        old = _daz(vmax[i], c)
        if old > vi or old != old:  # np.maximum: NaN on either side wins, a tie takes v
            vd = old
        vmax[i] = vd
    # math.sqrt, not np.sqrt: Numba lowers it to the llvm.sqrt intrinsic, which
    # vectorises (np.sqrt becomes a call to libm sqrtf, which may set errno).
    # The sqrt of a normal or zero v is never tiny.
    denom = _add(_mul(math.sqrt(vd), s.inv_sqrt_bc2, c), s.eps, c)
    p[i] = _sub(pi, _mul(s.step_size, _div(mi, denom, c), c), c)


def _make_variant(wd_mode, amsgrad, maximize):
    """The serial and the parallel kernel of one variant.  The flags are closure
    constants (inlined into _update_element, so its branches fold away); the
    closures hold nothing else, so Numba's cache key is the same in every process."""

    def update_range(p, g, m, v, vmax, start, stop, s, c):
        # Slices, then a loop from 0: the index is then known to be non-negative,
        # so Numba emits no wraparound select per access and LLVM vectorises.
        p, g, m, v = p[start:stop], g[start:stop], m[start:stop], v[start:stop]
        vmax = vmax[start:stop] if amsgrad else vmax
        for i in range(p.shape[0]):
            _update_element(p, g, m, v, vmax, i, wd_mode, amsgrad, maximize, s, c)

    def update_parallel(p, g, m, v, vmax, n_threads, s, c):
        n = p.shape[0]
        for t in prange(n_threads):
            start = (n * t // n_threads) // ALIGN * ALIGN
            stop = n if t == n_threads - 1 else (n * (t + 1) // n_threads) // ALIGN * ALIGN
            ps, gs, ms, vs = p[start:stop], g[start:stop], m[start:stop], v[start:stop]
            vmaxs = vmax[start:stop] if amsgrad else vmax
            for i in range(ps.shape[0]):
                _update_element(ps, gs, ms, vs, vmaxs, i, wd_mode, amsgrad, maximize, s, c)

    serial = njit(_signatures(7), cache=True, nogil=True, error_model="numpy")(update_range)

    def make_parallel():  # compiled (or loaded from the cache) on first use only
        return njit(_signatures(6), cache=True, nogil=True, parallel=True, error_model="numpy")(update_parallel)

    return serial, make_parallel


def _signatures(n_ints):
    """Eager signatures for float32 and float64: 5 arrays, then ints, then the step's
    scalars (the StepScalars record itself) and the flush-to-zero rule's constants."""
    sigs = []
    for t in (numba.float32, numba.float64):
        array = t[::1]
        ints = (numba.int64,) * (2 if n_ints == 7 else 1)
        sigs.append(numba.void(array, array, array, array, array, *ints,
                               numba.types.NamedUniTuple(t, len(StepScalars._fields), StepScalars),
                               numba.types.UniTuple(t, N_RULE_CONSTANTS)))
    return sigs


def _kernel(wd_mode, amsgrad, maximize, parallel):
    """The serial or parallel kernel of a variant, made on first use (thread-safe)."""
    key = (wd_mode, bool(amsgrad), bool(maximize))
    with _compile_lock:
        kernels = _compiled.get(key)
        if kernels is None:
            kernels = _compiled[key] = list(_make_variant(*key)) + [None]
        if not parallel:
            return kernels[0]
        if kernels[2] is None:
            kernels[2] = kernels[1]()
        return kernels[2]


def _parallel_lock():
    """A lock around parallel calls when Numba fell back to the unsafe workqueue layer."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # not initialised before the first parallel call
        return _workqueue_lock
    return _workqueue_lock if layer == "workqueue" else None


# Numba's OpenMP and workqueue layers cannot start threads in a child made by
# fork() after the parent used them: a forked child runs every step serially.
_in_forked_child = False


def _after_fork_in_child():
    global _in_forked_child
    _in_forked_child = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode,
                amsgrad, maximize, num_threads=1):
    """One in-place step of one tensor; the signature of _reference.adam_update.
    ``num_threads``: as resolved by the thread policy (fastadam/_threads.py)."""
    flat = [a.reshape(-1) for a in (param, grad, exp_avg, exp_avg_sq)]
    if not flat[1].flags.writeable:  # the signatures take writeable arrays; g is only read
        flat[1] = flat[1].copy()
    flat.append(max_exp_avg_sq.reshape(-1) if amsgrad else flat[3])
    f = FlushToZero(param.dtype)
    scalars = (StepScalars(*(f.scalar(x) for x in s)), (f.tiny, f.scaled_tiny, f.scale, f.zero))
    n = param.size
    threads = min(num_threads, numba.config.NUMBA_NUM_THREADS, max(1, n // ALIGN))
    if threads <= 1 or n < _threads.PARALLEL_THRESHOLD or _in_forked_child:
        _kernel(weight_decay_mode, amsgrad, maximize, False)(*flat, 0, n, *scalars)
        return
    parallel = _kernel(weight_decay_mode, amsgrad, maximize, True)
    lock = _parallel_lock()
    if lock is not None:
        lock.acquire()
    try:
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)  # thread-local in Numba
        try:
            parallel(*flat, threads, *scalars)
        finally:
            numba.set_num_threads(previous)
    finally:
        if lock is not None:
            lock.release()
