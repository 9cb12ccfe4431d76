# distutils: language = c++
"""The compiled Adam kernel behind ``backend="cython"``.

``Plan`` holds an optimizer's buffers after the checked path
(fastadam/_optimizer.py, with the rules of fastadam/_rules.py) has validated
them; ``Plan.step`` is the fast path: it verifies exactly and cheaply that the
step may run on what the plan holds, computes the per-step scalars in double,
and runs every tensor in one parallel region with the GIL released.  Anything
it cannot verify exactly it hands back (UNVERIFIED) without touching anything,
and the checked path decides: the rules and their messages live in one place.
The math is in adam_kernel.hpp.
"""
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.pythread cimport (NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock, PyThread_type_lock)
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.ref cimport PyObject
from libc.math cimport sqrt
from libc.stdint cimport int64_t, intptr_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, qsort
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from "fa_python.h":  # macros, or under the stable ABI functions
    Py_ssize_t fa_list_size(object)
    PyObject *fa_list_item(object, Py_ssize_t)
    Py_ssize_t fa_tuple_size(object)
    PyObject *fa_tuple_item(object, Py_ssize_t)
    double fa_float_value(object)

cimport numpy as cnp
from cython.parallel cimport prange

cnp.import_array()

cdef extern from "adam_kernel.hpp" nogil:
    ctypedef struct fa_item:
        void *param
        const void *grad
        void *exp_avg
        void *exp_avg_sq
        void *max_exp_avg_sq
        int64_t numel
        int dtype
        int grad_dtype
        int param_mode
        void *master
        int variant
        double grad_scale
        int storage
        uint32_t keys[4]
        float *absmax[3]
        double max_update
    enum:
        FA_WD_NONE, FA_WD_L2, FA_WD_DECOUPLED, FA_FLOAT32, FA_BFLOAT16, FA_N_DTYPES
        FA_PARAM_NEAREST, FA_PARAM_STOCHASTIC, FA_PARAM_SPLIT, FA_PARAM_MASTER
        FA_WD_MASK, FA_AMSGRAD, FA_MAXIMIZE, FA_N_FLAGS, FA_N_STEP_SCALARS
        FA_STORAGE_NATIVE, FA_STORAGE_BF16, FA_STORAGE_INT8
        FA_INT8_BLOCK, FA_INT8_FRACTION_BITS
        FA_INT8_SIGNED_EXPONENT_OFFSET, FA_INT8_UNSIGNED_EXPONENT_OFFSET
        FA_N_ISAS
        FA_COMPILED_BITS, FA_ROW_FIELDS, FA_N_KERNEL_ROWS
    const int *fa_kernel_rows
    const char *FA_STEP_SCALAR_NAMES
    const char *FA_DTYPE_NAMES
    const char *FA_FLAG_KEYS
    const int *fa_flag_bits
    int fa_is_low_precision(int code)
    void fa_set_step(fa_item *it, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, double max_update_in_lr)
    void fa_get_step(const fa_item *it, double *out)
    uint32_t fa_mix32(uint32_t x)
    const char *const *fa_isa_names
    int fa_select_isa(int forced)
    int fa_isa_usable(int isa)
    int fa_sve_vector_bits()
    int fa_isa_in_use
    const int fa_flush_in_hardware
    void fa_run_share(const fa_item *items, const int64_t *offsets, int64_t n_items,
                      int64_t t, int64_t n_threads)
    int fa_prepass_block(const fa_item *items, const int64_t *offsets, int64_t n_items,
                         int64_t block, int want_sum, double *sum)
    int64_t fa_prepass_blocks(const int64_t *offsets, int64_t n_items)

# Declared here without Cython's "except? -1" so that an overflow is a value the
# fast path can refuse (UNVERIFIED), not an exception it raises.
cdef extern from "Python.h":
    long long exact_long_long "PyLong_AsLongLong"(object)
    double exact_long_as_double "PyLong_AsDouble"(object)

cdef extern from "fa_openmp.h" nogil:
    const int fa_openmp_enabled
    int fa_omp_max_threads()

# The thread policy is fastadam._threads' (one module for every backend): the
# CPUs this process may use (affinity mask, cgroup quota, MPI ranks per node),
# read once here, and the smallest step that runs in parallel.
# omp_get_max_threads() is asked at every step so that threadpoolctl limits
# apply at once.
from fastadam import _threads as _policy
cdef int64_t _parallel_threshold = _policy.PARALLEL_THRESHOLD
cdef int _cpu_limit = max(1, _policy.cpu_limit())

# libgomp cannot start threads in a child process made by fork() after the
# parent used OpenMP: a parallel region there waits forever.  A forked child
# therefore runs every step on its calling thread.
cdef bint _in_forked_child = False


def _after_fork_in_child():
    global _in_forked_child
    _in_forked_child = True


import os as _os
import sys as _sys
_os.register_at_fork(after_in_child=_after_fork_in_child)


def parallel_threshold():
    return _parallel_threshold


def default_num_threads():
    """The threads a step uses when the optimizer's num_threads is None."""
    return resolve_num_threads(0)


cdef inline int resolve_num_threads(int requested) noexcept nogil:
    if not fa_openmp_enabled or _in_forked_child:
        return 1
    if requested > 0:
        return requested
    return max(1, min(_cpu_limit, fa_omp_max_threads()))


# The kernel's variants in this build, by name (src/fa_cpu.hpp): x86-64 has baseline, avx2 and
# avx512, aarch64 neon and sve; FASTADAM_ISA names one.
_ISA_CODES = {fa_isa_names[code].decode(): code for code in range(FA_N_ISAS) if fa_isa_names[code][0] != 0}
ISA_NAMES = tuple(_ISA_CODES)
# Whether the flush-to-zero rule (fastadam/_formats.py) is the CPU's mode here, as the
# reference's bits need: on x86-64 and aarch64.
FLUSH_TO_ZERO_IN_HARDWARE = bool(fa_flush_in_hardware)
OPENMP_ENABLED = bool(fa_openmp_enabled)


def omp_max_threads():
    """``omp_get_max_threads()``: honours OMP_NUM_THREADS and threadpoolctl."""
    return fa_omp_max_threads()


def isa_supported(str name):
    return bool(fa_isa_usable(_ISA_CODES[name]))


def select_isa(name=None):
    """Use instruction-set variant ``name`` (None: the widest this CPU has)."""
    if name is not None and name not in ISA_NAMES:
        raise ValueError(f"FASTADAM_ISA must be one of {', '.join(ISA_NAMES)}; got {name!r}")
    if fa_select_isa(-1 if name is None else _ISA_CODES[name]) < 0:
        raise RuntimeError(f"this CPU does not support the {name!r} kernel variant")
    return isa_in_use()


def isa_in_use():
    return fa_isa_names[fa_isa_in_use].decode()


def sve_vector_bits():
    """The calling thread's SVE vector length in bits; 0 where the CPU has no SVE."""
    return fa_sve_vector_bits()


INT8_BLOCK = FA_INT8_BLOCK
# The step's record and option bits as the kernel was built with them
# (fastadam._step's; _backends checks them at import).
STEP_SCALAR_NAMES = tuple(FA_STEP_SCALAR_NAMES.decode().split())
# VARIANT_BITS: the weight-decay modes' mask, then each flag's key and bit.
# (interned, as a group's literal keys are: the plan's lookups then compare pointers)
FLAG_KEYS = tuple(_sys.intern(key) for key in FA_FLAG_KEYS.decode().split())
VARIANT_BITS = (FA_WD_MASK, *[(key, fa_flag_bits[j]) for j, key in enumerate(FLAG_KEYS)])
cdef tuple _FLAG_KEYS = FLAG_KEYS  # read by the plan: the groups' keys of the option flags
# The element dtypes' names, by their codes (enum fa_dtype).
DTYPE_NAMES = tuple(FA_DTYPE_NAMES.decode().split())
# The flags compiled into the loops (each code its own loop); the others are read at run time.
COMPILED_FLAGS = tuple(key for j, key in enumerate(FLAG_KEYS) if fa_flag_bits[j] & FA_COMPILED_BITS)
# The kernel's table (fa_dispatch.hpp's FA_KERNELS), a row each: (parameter dtype, parameter
# mode, gradient dtype, state storage, torch's order), as names.
PARAM_MODES = ("nearest", "stochastic", "split", "master")      # enum fa_param_mode
STORAGE_KINDS = ("native", "bfloat16", "int8")                  # enum fa_storage_kind
KERNEL_ROWS = tuple(
    (DTYPE_NAMES[fa_kernel_rows[r * FA_ROW_FIELDS]], PARAM_MODES[fa_kernel_rows[r * FA_ROW_FIELDS + 1]],
     DTYPE_NAMES[fa_kernel_rows[r * FA_ROW_FIELDS + 2]], STORAGE_KINDS[fa_kernel_rows[r * FA_ROW_FIELDS + 3]],
     bool(fa_kernel_rows[r * FA_ROW_FIELDS + 4]))
    for r in range(FA_N_KERNEL_ROWS))
# The 8-bit codes' formats (fastadam._reference states them; checked at import).
INT8_FORMAT = (FA_INT8_BLOCK, FA_INT8_FRACTION_BITS, FA_INT8_SIGNED_EXPONENT_OFFSET,
               FA_INT8_UNSIGNED_EXPONENT_OFFSET)
# The clamp of the 8-bit state's update, in units of lr (fastadam._formats.INT8_MAX_UPDATE;
# checked at import).
cdef double _int8_max_update = 10.0
INT8_MAX_UPDATE = _int8_max_update


cdef void run_items(const fa_item *items, const int64_t *offsets, int64_t n_items,
                    int num_threads) noexcept nogil:
    cdef int t
    if n_items == 0 or offsets[n_items] == 0:
        return
    if num_threads <= 1 or offsets[n_items] < _parallel_threshold:
        fa_run_share(items, offsets, n_items, 0, 1)
        return
    for t in prange(num_threads, schedule='static', num_threads=num_threads):
        fa_run_share(items, offsets, n_items, t, num_threads)


cdef bint prepass(const fa_item *items, const int64_t *offsets, int64_t n_items,
                  int num_threads, bint want_norm, double *partial, double *norm) noexcept nogil:
    """The read-only pass over the gradients: whether all are finite, and with
    ``want_norm`` their global L2 norm in *norm (float64, the same bits for every
    thread count: see fa_prepass_block).  ``partial`` has one double per block."""
    cdef int64_t b, n_blocks
    cdef int ok = 1
    cdef double sumsq = 0.0
    if n_items == 0 or offsets[n_items] == 0:
        norm[0] = 0.0
        return True
    n_blocks = fa_prepass_blocks(offsets, n_items)
    if num_threads <= 1 or offsets[n_items] < _parallel_threshold:
        for b in range(n_blocks):
            ok &= fa_prepass_block(items, offsets, n_items, b, want_norm, &partial[b])
    else:
        for b in prange(n_blocks, schedule='static', num_threads=num_threads):
            ok &= fa_prepass_block(items, offsets, n_items, b, want_norm, &partial[b])
    if want_norm:
        for b in range(n_blocks):
            sumsq += partial[b]
        norm[0] = sqrt(sumsq)
    return ok != 0


cdef inline uint32_t rounding_key(uint64_t seed, uint64_t tensor, uint64_t step,
                                  uint32_t moment) noexcept nogil:
    """fastadam._reference.rounding_key, in C (the same 32-bit operations)."""
    cdef uint32_t key = fa_mix32(<uint32_t>seed ^ fa_mix32(<uint32_t>(seed >> 32)))
    key = fa_mix32(key ^ <uint32_t>tensor)
    key = fa_mix32(key ^ <uint32_t>step ^ fa_mix32(<uint32_t>(step >> 32)))
    return fa_mix32(key ^ moment)


cdef void set_item_step(fa_item *it, double lr, double beta1, double beta2, double eps,
                        double weight_decay, int variant, int64_t step, uint64_t seed,
                        int64_t k) noexcept nogil:
    """Item k's scalars for taking step number ``step`` (counting from 1), in double, and
    its stochastic-rounding keys: one home for the plan and the JAX handler."""
    it.variant = variant
    fa_set_step(it, lr, beta1, beta2, eps, weight_decay, step, _int8_max_update)
    if it.storage == FA_STORAGE_BF16:
        it.keys[0] = rounding_key(seed, k, step, 0)
        it.keys[1] = rounding_key(seed, k, step, 1)
        it.keys[2] = rounding_key(seed, k, step, 2)
    if it.param_mode == FA_PARAM_STOCHASTIC:
        it.keys[3] = rounding_key(seed, k, step, 3)


cdef inline double monotonic_seconds() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + 1e-9 * ts.tv_nsec


cdef inline double clip_coefficient(double max_norm, double norm) noexcept nogil:
    """fastadam._reference.clip_coefficient, in C (the same double operations)."""
    cdef double c = max_norm / (norm + 1e-6)
    return 1.0 if c > 1.0 else c


# The NumPy type number of each of the kernel's dtype codes (enum fa_dtype), found by
# the names the kernel states; -1 while a dtype's NumPy type is unknown (ml_dtypes'
# bfloat16 is a user type, known once ml_dtypes is imported, which a bfloat16 array
# implies).
cdef int _typenums[FA_N_DTYPES]
for _code in range(FA_N_DTYPES):
    _typenums[_code] = -1


cdef void note_dtypes() except *:
    cdef int code
    for code in range(FA_N_DTYPES):
        if _typenums[code] < 0:
            dtype = _formats.numpy_dtype(DTYPE_NAMES[code])
            if dtype is not None:
                _typenums[code] = dtype.num


cdef inline int dtype_code(int typenum) noexcept:
    """The kernel's element dtype (enum fa_dtype) of a NumPy type number, or -1."""
    cdef int code
    if typenum >= 0:
        for code in range(FA_N_DTYPES):
            if _typenums[code] == typenum:
                return code
    return -1


# How a parameter of each dtype code is updated under the optimizer's options
# (enum fa_param_mode), and the state's master key (fastadam._rules.MASTER_KEYS).
cdef int param_mode(int code, str param_rounding, object master_weights) noexcept:
    if not fa_is_low_precision(code):
        return FA_PARAM_NEAREST
    if master_weights == "split":
        return FA_PARAM_SPLIT
    if master_weights == "float32":
        return FA_PARAM_MASTER
    return FA_PARAM_STOCHASTIC if param_rounding == "stochastic" else FA_PARAM_NEAREST


cdef int compare_int64(const void *a, const void *b) noexcept nogil:
    cdef int64_t x = (<const int64_t *>a)[0]
    cdef int64_t y = (<const int64_t *>b)[0]
    return (x > y) - (x < y)


# What Plan.step reports.  UNVERIFIED: something differs from what the plan
# holds or is of a type it does not read exactly; nothing was changed, and
# the caller's checked path decides (fastadam/_optimizer.py).
SKIPPED, APPLIED, UNVERIFIED = 0, 1, 2
cdef enum:
    _SKIPPED = 0
    _APPLIED = 1
    _UNVERIFIED = 2

# Hyperparameters of a group, in the order of a group's remembered slots.
cdef enum:
    SLOT_LR = 0
    SLOT_BETA1 = 1
    SLOT_BETA2 = 2
    SLOT_EPS = 3
    SLOT_WEIGHT_DECAY = 4
    N_SLOTS = 5

# A step count may not reach this: fastadam._rules.MAX_STEP (checked at import).
cdef long long _max_step = (1LL << 53) - 1
MAX_STEP = _max_step

# fastadam._rules' names: an 8-bit state entry's absmax arrays, in moment order,
# and the state dtypes.
from fastadam import _formats, _rules
note_dtypes()  # the NumPy types known now (ml_dtypes' bfloat16 once it is imported)
ABSMAX_KEYS = tuple(_rules.ABSMAX_KEYS[key] for key in _rules.STATE_BUFFERS)
cdef tuple _STATE_DTYPES = _rules.STATE_DTYPES

cdef object _NOTHING = object()  # an empty remembered slot: no user value is this object


cdef class Lock:
    """An optimizer's lock: ``threading.Lock``'s acquire, release and ``with``, on
    CPython's own thread lock, which the compiled fast path takes from C with no
    Python call (a ``with threading.Lock()`` costs ~150 ns, half the budget of a
    small step's checks).  Waiting releases the GIL."""
    cdef PyThread_type_lock handle

    def __cinit__(self):
        self.handle = PyThread_allocate_lock()
        if self.handle == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.handle != NULL:
            PyThread_free_lock(self.handle)

    cdef inline void take(self) noexcept:
        if not PyThread_acquire_lock(self.handle, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.handle, WAIT_LOCK)

    cdef inline void give(self) noexcept:
        PyThread_release_lock(self.handle)

    def acquire(self, bint blocking=True):
        if not blocking:
            return PyThread_acquire_lock(self.handle, NOWAIT_LOCK) != 0
        self.take()
        return True

    def release(self):
        self.give()

    def __enter__(self):
        self.take()
        return self

    def __exit__(self, *exc):
        self.give()
        return False


include "_checks.pxi"
include "_buffers.pxi"
include "_plan.pxi"
include "_kernel_api.pxi"
include "_torch_plan.pxi"


def _select_isa_from_environment():
    import os
    select_isa(os.environ.get("FASTADAM_ISA") or None)


_select_isa_from_environment()
