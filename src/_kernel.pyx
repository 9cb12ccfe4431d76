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
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.pythread cimport (NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock, PyThread_type_lock)
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.math cimport sqrt
from libc.stdint cimport int64_t, intptr_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, qsort
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

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
        int variant
        double grad_scale
        int state
        uint32_t keys[3]
        float *absmax[3]
        double max_update
    enum:
        FA_WD_NONE, FA_WD_L2, FA_WD_DECOUPLED, FA_FLOAT32, FA_FLOAT64
        FA_WD_MASK, FA_AMSGRAD, FA_MAXIMIZE, FA_N_STEP_SCALARS
        FA_STATE_NATIVE, FA_STATE_BF16, FA_STATE_INT8
        FA_INT8_BLOCK, FA_INT8_FRACTION_BITS
        FA_INT8_SIGNED_EXPONENT_OFFSET, FA_INT8_UNSIGNED_EXPONENT_OFFSET
        FA_ISA_BASELINE, FA_ISA_AVX2, FA_ISA_AVX512
    const char *FA_STEP_SCALAR_NAMES
    int fa_variant(int wd, int amsgrad, int maximize)
    void fa_set_step(fa_item *it, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, double max_update_in_lr)
    void fa_get_step(const fa_item *it, double *out)
    uint32_t fa_mix32(uint32_t x)
    int fa_select_isa(int forced)
    int fa_isa_supported(int isa)
    int fa_isa_in_use
    void fa_run_share(const fa_item *items, const int64_t *offsets, int64_t n_items,
                      int64_t t, int64_t n_threads)
    int fa_prepass_block(const fa_item *items, const int64_t *offsets, int64_t n_items,
                         int64_t block, int want_sum, double *sum)
    int64_t fa_prepass_blocks(const int64_t *offsets, int64_t n_items)
    void fa_traffic_share(float *p, const float *g, float *m, float *v, int64_t n,
                          int64_t t, int64_t n_threads)

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


ISA_NAMES = ("baseline", "avx2", "avx512")
OPENMP_ENABLED = bool(fa_openmp_enabled)


def omp_max_threads():
    """``omp_get_max_threads()``: honours OMP_NUM_THREADS and threadpoolctl."""
    return fa_omp_max_threads()


def isa_supported(str name):
    return bool(fa_isa_supported(ISA_NAMES.index(name)))


def select_isa(name=None):
    """Use instruction-set variant ``name`` (None: the widest this CPU has)."""
    if name is not None and name not in ISA_NAMES:
        raise ValueError(f"FASTADAM_ISA must be one of {', '.join(ISA_NAMES)}; got {name!r}")
    if fa_select_isa(-1 if name is None else ISA_NAMES.index(name)) < 0:
        raise RuntimeError(f"this CPU does not support the {name!r} kernel variant")
    return ISA_NAMES[fa_isa_in_use]


def isa_in_use():
    return ISA_NAMES[fa_isa_in_use]


INT8_BLOCK = FA_INT8_BLOCK
# The step's record and option bits as the kernel was built with them
# (fastadam._step's; _backends checks them at import).
STEP_SCALAR_NAMES = tuple(FA_STEP_SCALAR_NAMES.decode().split())
VARIANT_BITS = (FA_WD_MASK, FA_AMSGRAD, FA_MAXIMIZE)
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


cdef inline double monotonic_seconds() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + 1e-9 * ts.tv_nsec


cdef inline double median5(double *x) noexcept nogil:
    """The median of x[0:5] (sorts a copy)."""
    cdef double a[5]
    cdef double t
    cdef int i, j
    for i in range(5):
        a[i] = x[i]
    for i in range(1, 5):
        t = a[i]
        j = i - 1
        while j >= 0 and a[j] > t:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = t
    return a[2]


cdef inline double clip_coefficient(double max_norm, double norm) noexcept nogil:
    """fastadam._reference.clip_coefficient, in C (the same double operations)."""
    cdef double c = max_norm / (norm + 1e-6)
    return 1.0 if c > 1.0 else c


def roofline_step(float[::1] p, const float[::1] g, float[::1] m, float[::1] v, int num_threads=0):
    """Adam's memory traffic with trivial arithmetic (p += g, m += g, v += g): where the
    memory wall of an Adam step is (benchmarks only; a plain streaming loop, not a proven bound)."""
    cdef int64_t n = p.shape[0]
    cdef int t, nt = resolve_num_threads(num_threads)
    if g.shape[0] != n or m.shape[0] != n or v.shape[0] != n:
        raise ValueError("roofline_step: the four arrays must have the same length")
    if n == 0:
        return
    with nogil:
        if nt <= 1 or n < _parallel_threshold:
            fa_traffic_share(&p[0], &g[0], &m[0], &v[0], n, 0, 1)
        else:
            for t in prange(nt, schedule='static', num_threads=nt):
                fa_traffic_share(&p[0], &g[0], &m[0], &v[0], n, t, nt)


cdef inline int dtype_code(int typenum) noexcept:
    if typenum == cnp.NPY_FLOAT32:
        return FA_FLOAT32
    if typenum == cnp.NPY_FLOAT64:
        return FA_FLOAT64
    return -1


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

# The thread planner (Plan.threads_for_step): steps timed per candidate in a
# trial (median5 takes the median of five), and steps between trials.
cdef enum:
    PLANNER_SAMPLES = 5
    PLANNER_REPLAN_EVERY = 1000
TRIAL_SAMPLES, REPLAN_EVERY = PLANNER_SAMPLES, PLANNER_REPLAN_EVERY

# An 8-bit state entry's absmax arrays (fastadam._rules.ABSMAX_KEYS), in moment order.
ABSMAX_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax", "max_exp_avg_sq_absmax")

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

    def acquire(self):
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


cdef class Plan:
    """An optimizer's validated buffers in its tensor order, and the operations of a step.

    Built by the checked path (fastadam/_optimizer.py) from buffers it has
    validated: ``params``, ``exp_avgs``, ``exp_avg_sqs`` (one array each per
    tensor), ``max_exp_avg_sqs`` (an array or None per tensor), ``group_sizes``
    (tensors per parameter group) and ``decoupled`` (AdamW).  The plan holds a
    reference to every array, so none can be freed while it lives, and records
    each one's data pointer, dtype and shape.

    Operations:
      ``step(...)``: the fast path, one call: ``verify``, then the finiteness
          check if asked, the kernel and the step counts.  Returns APPLIED,
          SKIPPED or UNVERIFIED (nothing changed).
      ``verify(groups, grads, state)``: whether this step can run on the plan as
          it is: the same parameter and state objects, still the same memory
          (data pointer, dtype, shape, C-contiguous, aligned, writeable), step
          counts and hyperparameters of exact types (or the very objects the
          checked path validated) in range, and gradients that fit.  On True the
          step's scalars are set and the gradients are held until ``release``.
      ``load(hypers, remembered, grads, entries, steps)``: the same, from values
          the checked path has validated: it cannot refuse.
      ``inspect_gradients(threads, want_norm)``, ``scale_gradients_by(c)``,
          ``run(threads)``, ``commit_steps()``,
          ``release()``, ``scalars()``: the parts of a step, for the checked
          path and the Numba backend.
    """
    cdef fa_item *items
    cdef int64_t *offsets
    cdef int64_t *written      # sorted pairs (start, end) of the memory the kernel writes
    cdef Py_ssize_t n_written
    cdef Py_ssize_t n, n_groups
    cdef int *typenums         # per tensor: the parameter's dtype
    cdef int *state_typenums   # per tensor: the state's dtype (the parameter's, or uint16 for bfloat16)
    cdef int state_kind        # enum fa_state
    cdef uint64_t seed
    cdef int *ndims            # per tensor
    cdef Py_ssize_t *dims_at   # per tensor: where its shape starts in dims
    cdef cnp.npy_intp *dims
    cdef Py_ssize_t *group_sizes
    cdef double *remembered_values  # N_SLOTS per group
    cdef list params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, remembered
    cdef list absmaxes         # per tensor: None, or (m's, v's, v^'s or None) for 8-bit state
    cdef int wd_mode_if_nonzero
    # Held from verify/load until release: the gradients (so another thread that
    # drops one cannot free memory the kernel reads), the state entries whose
    # step counts a commit sets, and the new counts.
    cdef tuple held_grads
    cdef list held_entries, new_steps
    cdef double *partial       # one double per pre-pass block
    # The thread planner: candidates 1 and the policy's maximum, timed in turn.
    cdef int planned_max, trial_left, trial_index
    cdef public int chosen_threads
    cdef int64_t steps_since_trial
    cdef double samples[2][PLANNER_SAMPLES]
    cdef int n_samples[2]
    cdef public object last_grad_norm  # of the last pre-pass that computed it (None before)

    def __cinit__(self, list params, list exp_avgs, list exp_avg_sqs, list max_exp_avg_sqs,
                  list group_sizes, bint decoupled, str state_dtype="float32", uint64_t seed=0,
                  list absmaxes=None):
        cdef Py_ssize_t k, j, n_dims = 0
        cdef cnp.ndarray buf, p
        self.n = len(params)
        self.n_groups = len(group_sizes)
        if not (len(exp_avgs) == len(exp_avg_sqs) == len(max_exp_avg_sqs) == self.n):
            raise ValueError("Plan: one state entry per parameter is needed")
        if sum(group_sizes) != self.n:
            raise ValueError("Plan: group_sizes must add up to the number of parameters")
        for k in range(self.n):
            n_dims += (<cnp.ndarray?>params[k]).ndim
        self.params, self.exp_avgs, self.exp_avg_sqs = list(params), list(exp_avgs), list(exp_avg_sqs)
        self.max_exp_avg_sqs = list(max_exp_avg_sqs)
        self.remembered = [_NOTHING] * (N_SLOTS * self.n_groups)
        self.held_entries = [None] * self.n
        self.new_steps = [None] * self.n
        self.wd_mode_if_nonzero = FA_WD_DECOUPLED if decoupled else FA_WD_L2
        if state_dtype not in ("float32", "bfloat16", "int8"):
            raise ValueError(f"Plan: state_dtype {state_dtype!r}")
        self.absmaxes = list(absmaxes) if absmaxes is not None else [None] * self.n
        if len(self.absmaxes) != self.n or (state_dtype != "int8" and any(
                a is not None for a in self.absmaxes)):
            raise ValueError("Plan: absmaxes must hold one entry per parameter (None but for int8)")
        self.state_kind = FA_STATE_BF16 if state_dtype == "bfloat16" else FA_STATE_NATIVE
        self.seed = seed
        self.items = <fa_item *>calloc(max(self.n, 1), sizeof(fa_item))
        self.offsets = <int64_t *>calloc(self.n + 1, sizeof(int64_t))
        self.written = <int64_t *>calloc(max(14 * self.n, 2), sizeof(int64_t))
        self.typenums = <int *>calloc(max(self.n, 1), sizeof(int))
        self.state_typenums = <int *>calloc(max(self.n, 1), sizeof(int))
        self.ndims = <int *>calloc(max(self.n, 1), sizeof(int))
        self.dims_at = <Py_ssize_t *>calloc(max(self.n, 1), sizeof(Py_ssize_t))
        self.dims = <cnp.npy_intp *>calloc(max(n_dims, 1), sizeof(cnp.npy_intp))
        self.group_sizes = <Py_ssize_t *>calloc(max(self.n_groups, 1), sizeof(Py_ssize_t))
        self.remembered_values = <double *>calloc(max(N_SLOTS * self.n_groups, 1), sizeof(double))
        self.last_grad_norm = None
        self.chosen_threads = 1
        if (self.items == NULL or self.offsets == NULL or self.written == NULL
                or self.typenums == NULL or self.state_typenums == NULL or self.ndims == NULL or self.dims_at == NULL
                or self.dims == NULL or self.group_sizes == NULL or self.remembered_values == NULL):
            raise MemoryError()
        for j in range(self.n_groups):
            self.group_sizes[j] = group_sizes[j]
        n_dims = 0
        self.n_written = 0
        for k in range(self.n):
            p = <cnp.ndarray>self.params[k]
            self.typenums[k] = cnp.PyArray_TYPE(p)
            self.ndims[k] = cnp.PyArray_NDIM(p)
            self.dims_at[k] = n_dims
            for j in range(self.ndims[k]):
                self.dims[n_dims] = cnp.PyArray_DIM(p, j)
                n_dims += 1
            if dtype_code(self.typenums[k]) < 0:
                raise ValueError("Plan: parameters must be float32 or float64")
            if self.state_kind == FA_STATE_BF16 and self.typenums[k] != cnp.NPY_FLOAT32:
                raise ValueError("Plan: bfloat16 state needs float32 parameters")
            self.items[k].state = (FA_STATE_INT8 if self.absmaxes[k] is not None
                                   else self.state_kind)
            if self.items[k].state == FA_STATE_INT8 and self.typenums[k] != cnp.NPY_FLOAT32:
                raise ValueError("Plan: 8-bit state needs float32 parameters")
            self.state_typenums[k] = (cnp.NPY_UINT16 if self.items[k].state == FA_STATE_BF16
                                      else cnp.NPY_UINT8 if self.items[k].state == FA_STATE_INT8
                                      else self.typenums[k])
            buffers = (p, self.exp_avgs[k], self.exp_avg_sqs[k], self.max_exp_avg_sqs[k])
            for j, obj in enumerate(buffers):
                if obj is None and j == 3:
                    continue
                buf = <cnp.ndarray?>obj
                if not self.same_memory(buf, cnp.PyArray_DATA(buf), k,
                                        self.typenums[k] if j == 0 else self.state_typenums[k]):
                    raise ValueError("Plan: state buffers must be writeable, C-contiguous, "
                                     "and match their parameter's dtype and shape")
                self.add_written(buf)
            if self.absmaxes[k] is not None:
                for j in range(3):
                    obj = self.absmaxes[k][j]
                    if obj is None and j == 2 and self.max_exp_avg_sqs[k] is None:
                        continue
                    buf = <cnp.ndarray?>obj
                    if not self.same_absmax_memory(buf, cnp.PyArray_DATA(buf), cnp.PyArray_SIZE(p)):
                        raise ValueError("Plan: absmax buffers must be writeable, C-contiguous "
                                         "float32 arrays of one value per block")
                    self.items[k].absmax[j] = <float *>cnp.PyArray_DATA(buf)
                    self.add_written(buf)
            self.items[k].param = cnp.PyArray_DATA(p)
            self.items[k].numel = cnp.PyArray_SIZE(p)
            self.items[k].dtype = dtype_code(self.typenums[k])
            self.items[k].exp_avg = cnp.PyArray_DATA(<cnp.ndarray>self.exp_avgs[k])
            self.items[k].exp_avg_sq = cnp.PyArray_DATA(<cnp.ndarray>self.exp_avg_sqs[k])
            self.items[k].max_exp_avg_sq = (
                NULL if self.max_exp_avg_sqs[k] is None
                else cnp.PyArray_DATA(<cnp.ndarray>self.max_exp_avg_sqs[k]))
            self.offsets[k + 1] = self.offsets[k] + self.items[k].numel
        self.partial = <double *>calloc(max(fa_prepass_blocks(self.offsets, self.n), 1), sizeof(double))
        if self.partial == NULL:
            raise MemoryError()
        qsort(self.written, self.n_written, 2 * sizeof(int64_t), compare_int64)
        for j in range(1, self.n_written):
            if self.written[2 * j] < self.written[2 * j - 1]:
                raise ValueError("Plan: buffers overlap")

    def __dealloc__(self):
        free(self.items)
        free(self.offsets)
        free(self.written)
        free(self.typenums)
        free(self.state_typenums)
        free(self.ndims)
        free(self.dims_at)
        free(self.dims)
        free(self.group_sizes)
        free(self.remembered_values)
        free(self.partial)

    cdef void add_written(self, cnp.ndarray buf) noexcept:
        if cnp.PyArray_NBYTES(buf) > 0:
            self.written[2 * self.n_written] = <int64_t><intptr_t>cnp.PyArray_DATA(buf)
            self.written[2 * self.n_written + 1] = (
                self.written[2 * self.n_written] + cnp.PyArray_NBYTES(buf))
            self.n_written += 1

    # -- what verify compares ------------------------------------------------

    cdef inline bint same_absmax_memory(self, cnp.ndarray a, void *data, int64_t numel) noexcept:
        """Like same_memory, for an 8-bit state's absmax: float32, one per block."""
        return (cnp.PyArray_DATA(a) == data and cnp.PyArray_ISCARRAY(a)
                and cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32 and cnp.PyArray_ISNOTSWAPPED(a)
                and cnp.PyArray_NDIM(a) == 1
                and cnp.PyArray_DIM(a, 0) == (numel + FA_INT8_BLOCK - 1) // FA_INT8_BLOCK)

    cdef inline bint same_shape(self, cnp.ndarray a, Py_ssize_t k) noexcept:
        cdef int d
        cdef cnp.npy_intp *dims = &self.dims[self.dims_at[k]]
        if cnp.PyArray_NDIM(a) != self.ndims[k]:
            return False
        for d in range(self.ndims[k]):
            if cnp.PyArray_DIM(a, d) != dims[d]:
                return False
        return True

    cdef inline bint same_memory(self, cnp.ndarray a, void *data, Py_ssize_t k,
                                 int typenum) noexcept:
        """Whether the planned array ``a`` is still the memory the kernel was given:
        the same data pointer, C-contiguous, aligned and writeable, dtype
        ``typenum`` in native byte order, and tensor k's shape."""
        return (cnp.PyArray_DATA(a) == data and cnp.PyArray_ISCARRAY(a)
                and cnp.PyArray_TYPE(a) == typenum and cnp.PyArray_ISNOTSWAPPED(a)
                and self.same_shape(a, k))

    cdef bint absmax_unchanged(self, dict st, Py_ssize_t k, bint amsgrad) noexcept:
        """Whether state entry ``st`` holds tensor k's planned absmax arrays, unchanged."""
        cdef tuple planned = <tuple>self.absmaxes[k]
        cdef int j
        for j, key in enumerate(ABSMAX_KEYS):
            if j == 2 and not amsgrad:
                break
            if PyDict_GetItem(st, key) != <PyObject *>planned[j]:
                return False
            if not self.same_absmax_memory(<cnp.ndarray>planned[j], self.items[k].absmax[j],
                                           self.items[k].numel):
                return False
        return True

    cdef inline bint fits_as_gradient(self, object obj, Py_ssize_t k) noexcept:
        cdef cnp.ndarray g
        if not cnp.PyArray_Check(obj):
            return False
        g = <cnp.ndarray>obj
        return (cnp.PyArray_ISCARRAY_RO(g) and cnp.PyArray_TYPE(g) == self.typenums[k]
                and cnp.PyArray_ISNOTSWAPPED(g) and self.same_shape(g, k)
                and not self.overlaps_written(g))

    cdef bint overlaps_written(self, cnp.ndarray g) noexcept:
        """Whether g's memory meets any buffer the kernel writes (binary search)."""
        cdef int64_t lo = <int64_t><intptr_t>cnp.PyArray_DATA(g)
        cdef int64_t hi = lo + cnp.PyArray_NBYTES(g)
        cdef Py_ssize_t a = 0, b = self.n_written, mid
        if hi == lo:
            return False
        # The last interval starting before hi; intervals are disjoint and
        # sorted, so it is also the one that ends last among those.
        while a < b:
            mid = (a + b) // 2
            if self.written[2 * mid] < hi:
                a = mid + 1
            else:
                b = mid
        return a > 0 and self.written[2 * (a - 1) + 1] > lo

    cdef inline bint read_real(self, PyObject *ptr, Py_ssize_t slot, double *out) noexcept:
        """A hyperparameter read exactly: a float or an int object, or the very
        object the checked path validated last (a NumPy scalar, immutable)."""
        if ptr == NULL:
            return False
        x = <object>ptr
        if type(x) is float:
            out[0] = PyFloat_AS_DOUBLE(x)
            return True
        if type(x) is int:
            out[0] = exact_long_as_double(x)
            if out[0] == -1.0 and PyErr_Occurred() != NULL:  # beyond double
                PyErr_Clear()
                return False
            return True
        if x is self.remembered[slot]:
            out[0] = self.remembered_values[slot]
            return True
        return False

    cdef inline void set_scalars(self, Py_ssize_t k, double lr, double beta1, double beta2,
                                 double eps, double weight_decay, int variant,
                                 long long step) noexcept:
        """Tensor k's scalars for taking step number ``step`` (counting from 1), in double."""
        cdef fa_item *it = &self.items[k]
        it.variant = variant
        fa_set_step(it, lr, beta1, beta2, eps, weight_decay, step, _int8_max_update)
        if self.state_kind == FA_STATE_BF16:
            it.keys[0] = rounding_key(self.seed, k, step, 0)
            it.keys[1] = rounding_key(self.seed, k, step, 1)
            it.keys[2] = rounding_key(self.seed, k, step, 2)

    # -- the thread planner ----------------------------------------------------
    #
    # With num_threads None, the thread count of a step is chosen by measuring
    # in the context the step actually runs in: inside a NumPy training loop the
    # step follows matrix products whose BLAS threads keep spinning on the other
    # cores, and a second OpenMP thread then only competes with them (measured on
    # two), while alone the same step is twice as fast on two threads.  So the
    # planner times PLANNER_SAMPLES steps at the policy's maximum and as many at
    # 1 thread (each block after one warm-up step), keeps the lower median, and repeats the
    # trial every PLANNER_REPLAN_EVERY steps and whenever the maximum changes.  Results
    # are bitwise the same for every thread count, so switching is free.

    cdef int threads_for(self, int requested) noexcept:
        cdef int most
        if requested > 0 or not fa_openmp_enabled or _in_forked_child:
            return resolve_num_threads(requested)  # the request, or 1 where only 1 can run
        most = resolve_num_threads(0)
        if most <= 1 or self.offsets[self.n] < _parallel_threshold:
            return 1
        if most != self.planned_max or (self.trial_left == 0
                                        and self.steps_since_trial >= PLANNER_REPLAN_EVERY):
            self.planned_max = most
            self.trial_left = 2 * (PLANNER_SAMPLES + 1)
            self.n_samples[0] = self.n_samples[1] = 0
        if self.trial_left > 0:
            # A block of steps at the maximum, then a block at 1 thread: in turn, a
            # parallel step would pay for waking workers that slept through the
            # serial one, which steps taken back to back do not.
            self.trial_index = 0 if self.trial_left <= PLANNER_SAMPLES + 1 else 1
            return 1 if self.trial_index == 0 else most
        return self.chosen_threads

    cdef void record(self, int threads, double seconds) noexcept:
        """The duration of a step taken with ``threads`` (from threads_for)."""
        cdef int i
        if self.trial_left == 0:
            self.steps_since_trial += 1
            return
        i = self.trial_index
        # The first step of a block warms up (threads, caches): not a sample.
        if self.trial_left != PLANNER_SAMPLES + 1 and self.trial_left != 2 * (PLANNER_SAMPLES + 1):
            if self.n_samples[i] < PLANNER_SAMPLES:
                self.samples[i][self.n_samples[i]] = seconds
                self.n_samples[i] += 1
        self.trial_left -= 1
        if self.trial_left == 0:
            self.chosen_threads = (1 if median5(self.samples[0]) < median5(self.samples[1])
                                   else self.planned_max)
            self.steps_since_trial = 0

    def threads_for_step(self, int requested):
        """The thread count for the next step (``requested`` > 0 is taken as it is)."""
        return self.threads_for(requested)

    def record_step(self, int threads, double seconds):
        """Report how long a step took with ``threads``, for the planner."""
        self.record(threads, seconds)

    # -- the operations --------------------------------------------------------

    cdef bint verify_c(self, object groups, object grads, object state) except -1:
        cdef Py_ssize_t gi, j, k, n_in_group, slot
        cdef double lr, beta1, beta2, eps, weight_decay
        cdef int variant, st_type
        cdef bint amsgrad, maximize
        cdef long long step
        cdef PyObject *ptr
        cdef fa_item *it
        cdef tuple held
        cdef list entries, new_steps
        if type(groups) is not list or type(state) is not dict:
            return False
        if type(grads) is tuple:
            held = <tuple>grads
        elif type(grads) is list:
            held = tuple(<list>grads)
        else:
            return False
        if PyTuple_GET_SIZE(held) != self.n or PyList_GET_SIZE(groups) != self.n_groups:
            return False
        entries, new_steps = self.held_entries, self.new_steps
        k = 0
        for gi in range(self.n_groups):
            group = <object>PyList_GET_ITEM(groups, gi)
            if type(group) is not dict:
                return False
            slot = gi * N_SLOTS
            ptr = PyDict_GetItem(<dict>group, "betas")
            if ptr == NULL:
                return False
            betas = <object>ptr
            if type(betas) is tuple:
                if PyTuple_GET_SIZE(betas) != 2:
                    return False
                ok_betas = (self.read_real(PyTuple_GET_ITEM(betas, 0), slot + SLOT_BETA1, &beta1)
                            and self.read_real(PyTuple_GET_ITEM(betas, 1), slot + SLOT_BETA2, &beta2))
            elif type(betas) is list:
                if PyList_GET_SIZE(betas) != 2:
                    return False
                ok_betas = (self.read_real(PyList_GET_ITEM(betas, 0), slot + SLOT_BETA1, &beta1)
                            and self.read_real(PyList_GET_ITEM(betas, 1), slot + SLOT_BETA2, &beta2))
            else:
                return False
            if not (ok_betas
                    and self.read_real(PyDict_GetItem(<dict>group, "lr"), slot + SLOT_LR, &lr)
                    and self.read_real(PyDict_GetItem(<dict>group, "eps"), slot + SLOT_EPS, &eps)
                    and self.read_real(PyDict_GetItem(<dict>group, "weight_decay"),
                                       slot + SLOT_WEIGHT_DECAY, &weight_decay)):
                return False
            if not (0.0 <= lr and 0.0 <= eps and 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0
                    and 0.0 <= weight_decay):
                return False
            ptr = PyDict_GetItem(<dict>group, "amsgrad")
            if ptr == NULL or (<object>ptr is not True and <object>ptr is not False):
                return False
            amsgrad = <object>ptr is True
            ptr = PyDict_GetItem(<dict>group, "maximize")
            if ptr == NULL or (<object>ptr is not True and <object>ptr is not False):
                return False
            maximize = <object>ptr is True
            variant = fa_variant(0 if weight_decay == 0.0 else self.wd_mode_if_nonzero,
                                 amsgrad, maximize)
            ptr = PyDict_GetItem(<dict>group, "params")
            if ptr == NULL or type(<object>ptr) is not list:
                return False
            group_params = <list>ptr
            n_in_group = self.group_sizes[gi]
            if PyList_GET_SIZE(group_params) != n_in_group:
                return False
            for j in range(n_in_group):
                it = &self.items[k]
                if <object>PyList_GET_ITEM(group_params, j) is not self.params[k]:
                    return False
                if amsgrad != (self.max_exp_avg_sqs[k] is not None):
                    return False
                ptr = PyDict_GetItem(<dict>state, k)
                if ptr == NULL or type(<object>ptr) is not dict:
                    return False
                st = <dict>ptr
                ptr = PyDict_GetItem(st, "step")
                if ptr == NULL or type(<object>ptr) is not int:
                    return False
                step = exact_long_long(<object>ptr)
                if step == -1 and PyErr_Occurred() != NULL:  # beyond long long
                    PyErr_Clear()
                    return False
                if not (0 <= step < _max_step):
                    return False
                step += 1
                if not (PyDict_GetItem(st, "exp_avg") == <PyObject *>self.exp_avgs[k]
                        and PyDict_GetItem(st, "exp_avg_sq") == <PyObject *>self.exp_avg_sqs[k]
                        and (not amsgrad or PyDict_GetItem(st, "max_exp_avg_sq")
                             == <PyObject *>self.max_exp_avg_sqs[k])):
                    return False
                st_type = self.state_typenums[k]
                if not (self.same_memory(<cnp.ndarray>self.params[k], it.param, k, self.typenums[k])
                        and self.same_memory(<cnp.ndarray>self.exp_avgs[k], it.exp_avg, k, st_type)
                        and self.same_memory(<cnp.ndarray>self.exp_avg_sqs[k], it.exp_avg_sq, k,
                                             st_type)
                        and (not amsgrad or self.same_memory(
                            <cnp.ndarray>self.max_exp_avg_sqs[k], it.max_exp_avg_sq, k, st_type))):
                    return False
                if it.state == FA_STATE_INT8 and not self.absmax_unchanged(st, k, amsgrad):
                    return False
                gobj = <object>PyTuple_GET_ITEM(held, k)
                if not self.fits_as_gradient(gobj, k):
                    return False
                it.grad = cnp.PyArray_DATA(<cnp.ndarray>gobj)
                self.set_scalars(k, lr, beta1, beta2, eps, weight_decay, variant, step)
                entries[k] = st
                new_steps[k] = step
                k += 1
        self.held_grads = held
        return True

    cpdef int step(self, Lock lock, object groups, object grads, object state, int num_threads,
                   bint skip_if_nonfinite, double max_grad_norm, double grad_scale):
        """The whole fast path in one call, holding the optimizer's ``lock``:
        APPLIED, SKIPPED or UNVERIFIED.  ``max_grad_norm`` < 0: no clipping.
        ``grad_scale`` multiplies the gradients as they are read (after the
        norm is taken): ZeroAdam's 1/N averaging."""
        cdef int threads
        cdef bint finite = True
        cdef bint clip = max_grad_norm >= 0.0
        cdef double norm = 0.0
        cdef double started
        lock.take()
        try:
            if not self.verify_c(groups, grads, state):
                return _UNVERIFIED
            threads = self.threads_for(num_threads)
            started = monotonic_seconds()
            with nogil:
                if skip_if_nonfinite or clip:
                    finite = prepass(self.items, self.offsets, self.n, threads, clip,
                                     self.partial, &norm)
                if clip:
                    self.scale_gradients(grad_scale * clip_coefficient(max_grad_norm, norm))
                elif grad_scale != 1.0:
                    self.scale_gradients(grad_scale)
                if finite or not skip_if_nonfinite:
                    run_items(self.items, self.offsets, self.n, threads)
            self.record(threads, monotonic_seconds() - started)
            if clip:
                self.last_grad_norm = norm
            if skip_if_nonfinite and not finite:
                return _SKIPPED
            self.commit_steps_c()
            return _APPLIED
        finally:
            self.held_grads = None
            lock.give()

    cdef void scale_gradients(self, double c) noexcept nogil:
        cdef Py_ssize_t k
        for k in range(self.n):
            self.items[k].grad_scale = c

    def verify(self, groups, grads, state):
        """See the class docstring; True means the plan holds this step's gradients."""
        return self.verify_c(groups, grads, state)

    def load(self, list hypers, list remembered, grads, list entries, list steps):
        """Set this step from checked values: ``hypers`` per group (lr, beta1, beta2,
        eps, weight_decay, amsgrad, maximize); ``remembered``, N_SLOTS objects per
        group that the fast path may later accept by identity (None: none);
        ``grads``, ``entries`` (the state dicts) and ``steps`` (counts before this
        step) per tensor."""
        cdef Py_ssize_t gi, j, k = 0
        cdef int variant
        if (len(hypers) != self.n_groups or len(remembered) != N_SLOTS * self.n_groups
                or len(grads) != self.n or len(entries) != self.n or len(steps) != self.n):
            raise ValueError("Plan.load: one entry per group and per tensor is needed")
        held = tuple(grads)
        for j in range(N_SLOTS * self.n_groups):
            obj = remembered[j]
            self.remembered[j] = _NOTHING if obj is None else obj
        for gi in range(self.n_groups):
            lr, beta1, beta2, eps, weight_decay, amsgrad, maximize = hypers[gi]
            for j in range(N_SLOTS):
                if remembered[gi * N_SLOTS + j] is not None:
                    self.remembered_values[gi * N_SLOTS + j] = (lr, beta1, beta2, eps, weight_decay)[j]
            variant = fa_variant(0 if weight_decay == 0.0 else self.wd_mode_if_nonzero,
                                 bool(amsgrad), bool(maximize))
            for j in range(self.group_sizes[gi]):
                g = <cnp.ndarray?>held[k]
                if cnp.PyArray_NBYTES(g) != cnp.PyArray_NBYTES(<cnp.ndarray>self.params[k]):
                    raise ValueError("Plan.load: a gradient does not fit its parameter")
                self.items[k].grad = cnp.PyArray_DATA(g)
                self.set_scalars(k, lr, beta1, beta2, eps, weight_decay, variant, steps[k] + 1)
                k += 1
        self.held_grads = held
        self.held_entries[:] = entries
        self.new_steps[:] = [s + 1 for s in steps]

    def inspect_gradients(self, int num_threads, bint want_norm):
        """The read-only pre-pass over the held gradients: (all finite, global L2
        norm or None)."""
        cdef int threads = resolve_num_threads(num_threads)
        cdef bint finite
        cdef double norm = 0.0
        with nogil:
            finite = prepass(self.items, self.offsets, self.n, threads, want_norm, self.partial,
                             &norm)
        if want_norm:
            self.last_grad_norm = norm
        return finite, (norm if want_norm else None)

    def scale_gradients_by(self, double c):
        """Gradient clipping's coefficient for this step (see clip_coefficient)."""
        self.scale_gradients(c)

    def run(self, int num_threads):
        """The kernel over every tensor, with the GIL released."""
        cdef int threads = resolve_num_threads(num_threads)
        with nogil:
            run_items(self.items, self.offsets, self.n, threads)

    cdef void commit_steps_c(self) noexcept:
        cdef Py_ssize_t k
        for k in range(self.n):
            PyDict_SetItem(<dict>self.held_entries[k], "step", self.new_steps[k])

    def commit_steps(self):
        """Set each held state entry's step count to the step just taken."""
        self.commit_steps_c()

    def gradients(self):
        """The gradients held by ``verify`` or ``load`` (a tuple), for another kernel."""
        return self.held_grads

    def release(self):
        """Drop the held gradients (the caller's arrays are not kept alive between steps)."""
        self.held_grads = None

    def scalars(self):
        """Per tensor: (variant, *scalars) of the verified or loaded step, the scalars
        in the order of STEP_SCALAR_NAMES (fastadam._step.StepScalars)."""
        cdef double values[FA_N_STEP_SCALARS]
        cdef Py_ssize_t k
        out = []
        for k in range(self.n):
            fa_get_step(&self.items[k], values)
            out.append((self.items[k].variant, *[values[j] for j in range(FA_N_STEP_SCALARS)]))
        return out


def _select_isa_from_environment():
    import os
    select_isa(os.environ.get("FASTADAM_ISA") or None)


_select_isa_from_environment()
