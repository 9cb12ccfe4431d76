"""The Numba backend (``backend="numba"``): the fused update as a JIT kernel.

The same per-element operations, in the same order and rounding, as the
compiled kernel (src/adam_kernel.hpp) and the NumPy reference, so all three
agree bitwise.  The flush-to-zero rule is the hardware's on x86-64, as in the
compiled kernel: each thread sets the FTZ and DAZ bits of its MXCSR around its
loop and restores them after (``_numba_intrinsics.enter_ftz``: LLVM's stmxcsr/ldmxcsr
intrinsics).  Elsewhere, or with FASTADAM_NUMBA_FTZ=software, and for
``maximize`` (see ``_kernel``), every operation is followed by the rule in
software (``_ftz``), at several times the cost.

Each variant (weight-decay mode, AMSGrad, maximize) is its own
function: the flags are closure constants, frozen at compile time, so the
loop has no branch on them.  A variant is compiled for float32 and float64 the
first time it is used, with ``cache=True`` (Numba keys its cache on the
closure's constants), so a new process loads it from disk instead of
compiling.

Only imported when the backend is used: ``import fastadam`` does not import numba.
"""
import inspect
import math
import os
import platform
import threading

import numba
import numpy as np
from numba import njit, prange, types
from numba.np.unsafe.ndarray import to_fixed_tuple

from . import _threads
from ._numba_intrinsics import (as_bits, as_float, enter_ftz, launch, leave_ftz,
                                set_team_size, team_size)
from ._formats import FlushToZero
from ._step import FLAGS as ALL_FLAGS
from ._step import SCALAR_FLAGS
from ._step import WD_DECOUPLED, WD_L2, WD_MASK, StepScalars, rule_flag_values, variant

# Numba's default "workqueue" layer aborts the process when two threads enter
# a parallel function at once.  Prefer a thread-safe layer (OpenMP or TBB)
# unless the user chose one; if only workqueue is there, parallel calls are
# serialised with a lock (see _parallel_lock).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"

ALIGN = 16  # thread boundaries fall on multiples of 16 elements (a 64-byte line of float32)

HARDWARE_FTZ = (platform.machine().lower() in ("x86_64", "amd64")
                and os.environ.get("FASTADAM_NUMBA_FTZ", "hardware") != "software")

_compiled = {}
_compile_lock = threading.Lock()
_workqueue_lock = threading.Lock()


# A subnormal read with no arithmetic (AMSGrad's old max) is flushed by a compare and
# select, as the compiled kernel flushes it; under DAZ the compare sees it as zero.
@njit(inline="always", error_model="numpy")
def _flush(x, c):
    return x * c[3] if abs(x) < c[0] else x


# The flush-to-zero rule of fastadam/_formats.py.  With ``hw`` (a compile-time
# constant) the hardware applies it to every operation; without, each operation is
# followed by it in software: a result below the smallest normal (after rounding with
# an unbounded exponent: `scaled` is the same operation with its operands scaled by
# 2**SCALE_EXP) is a zero of its sign; r * 0 is that zero (r is finite there).
@njit(inline="always", error_model="numpy")
def _ftz(r, scaled, c):
    a = abs(r)
    if a < c[0] or (a == c[0] and abs(scaled) < c[1]):
        return r * c[3]
    return r


@njit(inline="always", error_model="numpy")
def _daz(x, c, hw):
    return x if hw else _flush(x, c)


@njit(inline="always", error_model="numpy")
def _mul(a, b, c, hw):
    return a * b if hw else _ftz(a * b, (a * c[2]) * b, c)


@njit(inline="always", error_model="numpy")
def _add(a, b, c, hw):
    return a + b if hw else _ftz(a + b, a * c[2] + b * c[2], c)


@njit(inline="always", error_model="numpy")
def _sub(a, b, c, hw):
    return a - b if hw else _ftz(a - b, a * c[2] - b * c[2], c)


@njit(inline="always", error_model="numpy")
def _div(a, b, c, hw):
    return a / b if hw else _ftz(a / b, (a * c[2]) / b, c)


@njit(inline="always", error_model="numpy")
def _rule(p, g, m, v, vmax, wd_mode, amsgrad, maximize, s, c, hw):
    """The update of one element from its stored values (``vmax`` read only with
    ``amsgrad``): the new (p, m, v, v^).  ``s`` the step's scalars in T (a
    StepScalars), ``c`` the rule's constants (see ``constants``, as a tuple); ``hw``:
    the hardware's flush-to-zero is on."""
    gi = _mul(_daz(g, c, hw), s.grad_scale, c, hw)
    gi = -gi if maximize else gi
    pi = _daz(p, c, hw)
    if wd_mode == WD_L2:
        gi = _add(gi, _mul(s.weight_decay, pi, c, hw), c, hw)
    elif wd_mode == WD_DECOUPLED:
        pi = _mul(pi, s.decay, c, hw)
    mi = _add(_mul(s.beta1, _daz(m, c, hw), c, hw), _mul(s.one_minus_beta1, gi, c, hw), c, hw)
    square = _mul(gi, gi, c, hw)
    if maximize and square != square:
        # A NaN's sign: the reference's (-g) * (-g) is -g's NaN; LLVM folds the two
        # negations away and gives g's.
        square = gi
    vi = _add(_mul(s.beta2, _daz(v, c, hw), c, hw), _mul(s.one_minus_beta2, square, c, hw), c, hw)
    vd = vi
    if amsgrad:
        old = _flush(vmax, c)
        if old > vi or old != old:  # np.maximum: NaN on either side wins, a tie takes v
            vd = old
    # math.sqrt, not np.sqrt: Numba lowers it to the llvm.sqrt intrinsic, which
    # vectorises (np.sqrt becomes a call to libm sqrtf, which may set errno).
    # The sqrt of a normal or zero v is never tiny.
    denom = _add(_mul(math.sqrt(vd), s.inv_sqrt_bc2, c, hw), s.eps, c, hw)
    return _sub(pi, _mul(s.step_size, _div(mi, denom, c, hw), c, hw), c, hw), mi, vi, vd


# The option flags this kernel implements: those its rule takes by name, and those
# whose effect is all in the scalars it is given.  The backend refuses a group that
# sets another (fastadam._backends.NumbaBackend), so a new flag of
# fastadam._step.FLAGS works on the other backends before its math is here.
_RULE_FLAGS = tuple(name for name in inspect.signature(_rule.py_func).parameters if name in ALL_FLAGS)
FLAGS = _RULE_FLAGS + SCALAR_FLAGS


@njit(inline="always", error_model="numpy")
def _update_element(p, g, m, v, vmax, i, index, keys, wd_mode, amsgrad, maximize, s, c, hw):
    """Element i of a tensor whose state is stored in T (``index`` and ``keys``
    unused)."""
    p[i], m[i], v[i], vd = _rule(p[i], g[i], m[i], v[i], vmax[i] if amsgrad else m[i],
                                 wd_mode, amsgrad, maximize, s, c, hw)
    if amsgrad:
        vmax[i] = vd


# bfloat16 state (fastadam/_formats.py): m, v and v^ are the upper halves of
# float32 values, decoded by a shift and stored rounded stochastically, with the
# random bits of element ``index`` of the streams keys[0] (m: low half, v: high)
# and keys[1] (v^: low half).
@njit(inline="always", error_model="numpy")
def _bf16_decode(half):
    return as_float(numba.uint32(half) << numba.uint32(16))


@njit(inline="always", error_model="numpy")
def _bf16_round(x, random16):
    """bf16_round_stochastic of one float32: ``random16`` added below the kept bits."""
    b = as_bits(x)
    if (b & numba.uint32(0x7FFFFFFF)) > numba.uint32(0x7F800000):  # NaN stays NaN
        return numba.uint16((b >> numba.uint32(16)) | numba.uint32(0x0040))
    return numba.uint16(numba.uint32(b + random16) >> numba.uint32(16))


@njit(inline="always", error_model="numpy")
def _random_bits(index, key):
    """rounding_bits(key, n)[index]: (lo ^ hi * C ^ key) * K in 32 bits."""
    lo = numba.uint32(index & 0xFFFFFFFF)
    hi = numba.uint32(numba.uint32(index >> 32) * numba.uint32(0x9E3779B9))
    return numba.uint32((lo ^ hi ^ key) * numba.uint32(0x9E3779B1))


@njit(inline="always", error_model="numpy")
def _update_element_bf16(p, g, m, v, vmax, i, index, keys, wd_mode, amsgrad, maximize, s, c, hw):
    """Element i (``index`` in its tensor) of a float32 tensor with bfloat16 state."""
    p[i], mi, vi, vd = _rule(p[i], g[i], _bf16_decode(m[i]), _bf16_decode(v[i]),
                             _bf16_decode(vmax[i]) if amsgrad else numba.float32(0),
                             wd_mode, amsgrad, maximize, s, c, hw)
    r = _random_bits(index, keys[0])
    m[i] = _bf16_round(mi, r & numba.uint32(0xFFFF))
    v[i] = _bf16_round(vi, r >> numba.uint32(16))
    if amsgrad:
        vmax[i] = _bf16_round(vd, _random_bits(index, keys[1]) & numba.uint32(0xFFFF))


N_SCALARS = len(StepScalars._fields)


@njit(inline="always", error_model="numpy")
def _scalars(rows, k, c):
    """Row k of ``rows`` (float64, StepScalars' fields first) as a StepScalars in T,
    the dtype of ``c``: each double rounded to T once under the flush-to-zero rule
    (FlushToZero.scalar: to nearest, then the rule on the result, with 2**SCALE_EXP
    times the double as its scaled twin).  Taken before the loop sets FTZ."""
    rounded = np.empty((2, N_SCALARS), c.dtype)
    for j in range(N_SCALARS):
        rounded[0, j] = rows[k, j]
        rounded[1, j] = rows[k, j] * c[2]
    out = np.empty(N_SCALARS, c.dtype)
    for j in range(N_SCALARS):
        out[j] = _ftz(rounded[0, j], rounded[1, j], c)
    return StepScalars(*to_fixed_tuple(out, N_SCALARS))


KEY_COLUMNS = (N_SCALARS + 1, N_SCALARS + 3)  # a row's keys of m and v, and of v^


def _make_variant(wd_mode, amsgrad, maximize, hw, bf16):
    """The serial and the parallel kernel of one variant.  The flags, whether the
    hardware flushes (``hw``) and whether the state is bfloat16 are closure
    constants (inlined, so their branches fold away); the closures hold nothing
    else, so Numba's cache key is the same in every process that makes the same
    variant.  Both take the step's scalars as row k of a float64 array (StepScalars'
    fields, the variant, then the rounding keys of bfloat16 state: see _scalars and
    KEY_COLUMNS) and the rule's constants."""
    def update_range(p, g, m, v, vmax, start, stop, rows, k, rule):
        s, c = _scalars(rows, k, rule), (rule[0], rule[1], rule[2], rule[3])
        keys = (numba.uint32(rows[k, KEY_COLUMNS[0]]), numba.uint32(rows[k, KEY_COLUMNS[1]]))
        # Slices, then a loop from 0: the index is then known to be non-negative,
        # so Numba emits no wraparound select per access and LLVM vectorises.
        p, g, m, v = p[start:stop], g[start:stop], m[start:stop], v[start:stop]
        vmax = vmax[start:stop] if amsgrad else vmax
        saved = enter_ftz(hw)
        for i in range(p.shape[0]):
            if bf16:  # a closure constant: Numba prunes the other branch before typing
                _update_element_bf16(p, g, m, v, vmax, i, start + i, keys, wd_mode, amsgrad,
                                     maximize, s, c, hw)
            else:
                _update_element(p, g, m, v, vmax, i, start + i, keys, wd_mode, amsgrad, maximize,
                                s, c, hw)
        leave_ftz(saved, hw)

    def update_parallel(p, g, m, v, vmax, n_threads, rows, k, rule):
        s, c = _scalars(rows, k, rule), (rule[0], rule[1], rule[2], rule[3])
        keys = (numba.uint32(rows[k, KEY_COLUMNS[0]]), numba.uint32(rows[k, KEY_COLUMNS[1]]))
        n = p.shape[0]
        previous = team_size()  # the team for this call (thread-local in Numba)
        set_team_size(n_threads)
        for t in prange(n_threads):
            start = (n * t // n_threads) // ALIGN * ALIGN
            stop = n if t == n_threads - 1 else (n * (t + 1) // n_threads) // ALIGN * ALIGN
            ps, gs, ms, vs = p[start:stop], g[start:stop], m[start:stop], v[start:stop]
            vmaxs = vmax[start:stop] if amsgrad else vmax
            saved = enter_ftz(hw)  # on the thread that runs this chunk
            for i in range(ps.shape[0]):
                if bf16:
                    _update_element_bf16(ps, gs, ms, vs, vmaxs, i, start + i, keys, wd_mode,
                                         amsgrad, maximize, s, c, hw)
                else:
                    _update_element(ps, gs, ms, vs, vmaxs, i, start + i, keys, wd_mode, amsgrad,
                                    maximize, s, c, hw)
            leave_ftz(saved, hw)
        set_team_size(previous)

    serial = njit(_signatures(3, bf16), cache=True, nogil=True, error_model="numpy")(update_range)

    def make_parallel():  # compiled (or loaded from the cache) on first use only
        launch()
        return njit(_signatures(2, bf16), cache=True, nogil=True, parallel=True,
                    error_model="numpy")(update_parallel)

    return serial, make_parallel


def _signatures(n_ints, bf16):
    """Eager signatures, for float32 and float64 (bfloat16 state: float32 with uint16
    state): 5 arrays, then ints (start and stop, or the thread count), the rows
    (float64) and row index, and the flush-to-zero rule's constants (in T)."""
    sigs = []
    for t in ((numba.float32,) if bf16 else (numba.float32, numba.float64)):
        array, read_only = t[::1], types.Array(t, 1, "C", readonly=True)  # g is only read
        state = numba.uint16[::1] if bf16 else array
        ints = (numba.int64,) * (n_ints - 1)
        sigs.append(numba.void(array, read_only, state, state, state, *ints,
                               types.Array(numba.float64, 2, "C", readonly=True), numba.int64,
                               types.Array(t, 1, "C", readonly=True)))
    return sigs


def _kernel(code, parallel, bf16=False):
    """The serial or parallel kernel of variant ``code`` (fastadam._step.variant)."""
    flags = rule_flag_values(code)
    missing = [name for name, on in flags.items() if on and name not in _RULE_FLAGS]
    if missing:  # the backend refuses such a group before its step: this is a guard
        raise ValueError(f"the Numba kernel does not implement {missing[0]}")
    return _made(code & WD_MASK, parallel, bf16, **{name: flags[name] for name in _RULE_FLAGS})


def _made(wd_mode, parallel, bf16, amsgrad=False, maximize=False):
    """The kernel of a variant, by its rule's flags, made on first use (thread-safe)."""
    # maximize keeps the software rule: under the hardware's, LLVM folds -(g * c) and
    # m + (1 - b1) * -g into forms that keep a NaN gradient's sign where the reference
    # flips it, and a fence against that costs the loop its vectorisation (10x slower).
    key = (wd_mode, amsgrad, maximize, HARDWARE_FTZ and not maximize, bool(bf16))
    with _compile_lock:
        kernels = _compiled.get(key)
        if kernels is None:
            kernels = _compiled[key] = list(_make_variant(*key)) + [None]
        if not parallel:
            return kernels[0]
        if kernels[2] is None:
            kernels[2] = kernels[1]()
        return kernels[2]


_layer_is_safe = False  # known once a parallel call has chosen the layer


def _parallel_lock():
    """A lock around parallel calls when Numba fell back to the unsafe workqueue layer."""
    global _layer_is_safe
    if _layer_is_safe:
        return None
    try:
        layer = numba.threading_layer()
    except ValueError:  # not initialised before the first parallel call
        return _workqueue_lock
    if layer == "workqueue":
        return _workqueue_lock
    _layer_is_safe = True
    return None


# Numba's OpenMP and workqueue layers cannot start threads in a child made by
# fork() after the parent used them: a forked child runs every step serially.
_in_forked_child = False


def _after_fork_in_child():
    global _in_forked_child
    _in_forked_child = True


def in_forked_child():
    """Whether this process is a child made by fork() (its steps run serially)."""
    return _in_forked_child


os.register_at_fork(after_in_child=_after_fork_in_child)


@njit(cache=True, nogil=True)
def addresses(p, m, v, w, g):
    """The data addresses of a tensor's arrays, as the checks of a step compare them
    (fastadam/_checks.py): one call, where NumPy's ``__array_interface__`` costs
    more than a microsecond an array."""
    return p.ctypes.data, m.ctypes.data, v.ctypes.data, w.ctypes.data, g.ctypes.data


_CONSTANTS = {}  # dtype -> the flush-to-zero rule's constants, a read-only array


def constants(dtype):
    """The flush-to-zero rule's constants in ``dtype``: (smallest normal, scaled
    smallest normal, 2**SCALE_EXP, 0), the kernels' last argument."""
    dtype = np.dtype(dtype)
    c = _CONSTANTS.get(dtype)
    if c is None:
        f = FlushToZero(dtype)
        c = np.array([f.tiny, f.scaled_tiny, f.scale, f.zero], dtype)
        c.flags.writeable = False
        c = _CONSTANTS.setdefault(dtype, c)
    return c


_BY_VARIANT = {}  # (variant code, parallel, bfloat16 state) -> kernel


def update(p, g, m, v, vmax, rows, k, code, rule, num_threads, bf16=False):
    """One in-place step of one tensor, its arrays flat (1-D, C-contiguous; ``vmax``
    any such array when the variant has no AMSGrad), p and g of one dtype and the
    state too, or bfloat16 bits (uint16) with ``bf16``; its scalars row k of
    ``rows`` (float64: see _make_variant); ``code`` its variant (see
    fastadam._step.variant; a float of that value will do); ``rule`` =
    constants(dtype); ``num_threads`` as resolved by the thread policy
    (fastadam/_threads.py)."""
    n = p.shape[0]
    threads = 1
    if num_threads > 1 and n >= _threads.PARALLEL_THRESHOLD and not _in_forked_child:
        threads = min(num_threads, numba.config.NUMBA_NUM_THREADS, n // ALIGN)
    parallel = threads > 1
    kernel = _BY_VARIANT.get((code, parallel, bf16))
    if kernel is None:
        kernel = _BY_VARIANT[(code, parallel, bf16)] = _kernel(int(code), parallel, bf16)
    if not parallel:
        kernel(p, g, m, v, vmax, 0, n, rows, k, rule)
        return
    lock = None if _layer_is_safe else _parallel_lock()
    if lock is None:
        kernel(p, g, m, v, vmax, threads, rows, k, rule)
        return
    with lock:
        kernel(p, g, m, v, vmax, threads, rows, k, rule)


def _row(s, code, keys=(0, 0, 0)):
    return np.array([(*s, code, *keys)], np.float64)


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode,
                amsgrad, maximize, num_threads=1):
    """One in-place step of one tensor; the signature of _reference.adam_update."""
    flat = [a.reshape(-1) for a in (param, grad, exp_avg, exp_avg_sq)]
    flat.append(max_exp_avg_sq.reshape(-1) if amsgrad else flat[3])
    code = variant(weight_decay_mode, amsgrad, maximize)
    update(*flat, _row(s, code), 0, code, constants(param.dtype), num_threads)


def adam_update_bf16(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode,
                     amsgrad, maximize, keys, num_threads=1):
    """One in-place step of a float32 tensor with bfloat16 state; the signature of
    _reference.adam_update_bf16 (``keys``: the rounding keys of moments 0, 1, 2)."""
    flat = [a.reshape(-1) for a in (param, grad, exp_avg, exp_avg_sq)]
    flat.append(max_exp_avg_sq.reshape(-1) if amsgrad else flat[3])
    code = variant(weight_decay_mode, amsgrad, maximize)
    update(*flat, _row(s, code, keys), 0, code, constants(param.dtype), num_threads, bf16=True)
