# distutils: language = c++
"""The compiled Adam kernel behind ``backend="cython"``.

A ``Plan`` holds the buffers of an optimizer's tensors after the Python layer
(fastadam/_optimizer.py) has validated them.  ``Plan.step`` re-checks them
cheaply (object identity, dtype, shape, contiguity, the hyperparameters' ranges),
computes the per-step scalars in double, and runs every tensor in one parallel
region with the GIL released.  On anything unexpected it returns False without
touching anything, and the Python layer raises the precise error: the messages
live in one place.
"""
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject
from libc.math cimport pow, sqrt
from libc.stdint cimport int64_t, intptr_t
from libc.stdlib cimport free, malloc, qsort

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
        double beta1, one_minus_beta1, beta2, one_minus_beta2
        double eps, weight_decay, decay, step_size, inv_sqrt_bc2
    enum:
        FA_WD_NONE, FA_WD_L2, FA_WD_DECOUPLED, FA_FLOAT32, FA_FLOAT64
        FA_ISA_BASELINE, FA_ISA_AVX2, FA_ISA_AVX512
    int fa_select_isa(int forced)
    int fa_isa_supported(int isa)
    int fa_isa_in_use
    void fa_run_share(const fa_item *items, const int64_t *offsets, int64_t n_items,
                      int64_t t, int64_t n_threads)
    int fa_finite_share(const fa_item *items, const int64_t *offsets, int64_t n_items,
                        int64_t t, int64_t n_threads)
    void fa_traffic_share(float *p, const float *g, float *m, float *v, int64_t n,
                          int64_t t, int64_t n_threads)

cdef extern from "fa_openmp.h" nogil:
    const int fa_openmp_enabled
    int fa_omp_max_threads()

# Below this many elements in a step, one thread does all the work: the
# fork/join of a parallel region costs more than it saves (see benchmarks/).
PARALLEL_THRESHOLD = 1 << 15
cdef int64_t _parallel_threshold = PARALLEL_THRESHOLD

# CPUs this process may use (affinity mask, cgroup quota): set once at import
# by fastadam._threads; omp_get_max_threads() is asked at every step so that
# threadpoolctl limits apply at once.
cdef int _cpu_limit = 1
# libgomp cannot start threads in a child process made by fork() after the
# parent used OpenMP: a parallel region there waits forever.  A forked child
# therefore runs every step on its calling thread.
cdef bint _in_forked_child = False


def _after_fork_in_child():
    global _in_forked_child
    _in_forked_child = True


import os as _os
_os.register_at_fork(after_in_child=_after_fork_in_child)


def set_cpu_limit(int n):
    global _cpu_limit
    _cpu_limit = max(1, n)


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


cdef bint all_finite(const fa_item *items, const int64_t *offsets, int64_t n_items,
                     int num_threads) noexcept nogil:
    """Whether every gradient of the step is finite: a read-only pass, split between
    threads as the update is."""
    cdef int t
    cdef int ok = 1
    if n_items == 0 or offsets[n_items] == 0:
        return True
    if num_threads <= 1 or offsets[n_items] < _parallel_threshold:
        return fa_finite_share(items, offsets, n_items, 0, 1) != 0
    for t in prange(num_threads, schedule='static', num_threads=num_threads):
        ok &= fa_finite_share(items, offsets, n_items, t, num_threads)
    return ok != 0


def roofline_step(float[::1] p, const float[::1] g, float[::1] m, float[::1] v, int num_threads=0):
    """Adam's memory traffic with trivial arithmetic (p += g, m += g, v += g): the
    bandwidth limit of this machine for an Adam step (benchmarks only)."""
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


cdef inline int dtype_code(cnp.ndarray a) noexcept:
    cdef int t = cnp.PyArray_TYPE(a)
    if not cnp.PyArray_ISNOTSWAPPED(a):
        return -1
    if t == cnp.NPY_FLOAT32:
        return FA_FLOAT32
    if t == cnp.NPY_FLOAT64:
        return FA_FLOAT64
    return -1


cdef inline bint same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int d, nd = cnp.PyArray_NDIM(a)
    if cnp.PyArray_NDIM(b) != nd:
        return False
    for d in range(nd):
        if cnp.PyArray_DIM(a, d) != cnp.PyArray_DIM(b, d):
            return False
    return True


cdef inline bint same_object(dict d, str key, object expected) noexcept:
    return PyDict_GetItem(d, key) == <PyObject *>expected


cdef int compare_int64(const void *a, const void *b) noexcept nogil:
    cdef int64_t x = (<const int64_t *>a)[0]
    cdef int64_t y = (<const int64_t *>b)[0]
    return (x > y) - (x < y)


cdef class StepGuard:
    """One per optimizer, shared by every Plan it builds: whether one of its steps
    is running.  Checked and set while holding the GIL, so two threads cannot
    both pass it."""
    cdef public bint busy


cdef class Plan:
    """The validated buffers of an optimizer, in its tensor order.

    ``params``, ``exp_avgs``, ``exp_avg_sqs``: one array per tensor;
    ``max_exp_avg_sqs``: one array or None per tensor; ``group_sizes``: how many
    tensors each parameter group has; ``decoupled``: AdamW's weight decay;
    ``guard``: the optimizer's StepGuard.
    The caller guarantees that the arrays are C-contiguous, aligned, writeable,
    float32 or float64, of matching shapes, and that none overlaps another.
    """
    cdef fa_item *items
    cdef int64_t *offsets
    cdef int64_t *written      # sorted pairs (start, end) of the memory the kernel writes
    cdef Py_ssize_t n_written
    cdef Py_ssize_t n
    cdef list params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, group_sizes
    cdef int wd_mode_if_nonzero
    cdef StepGuard guard

    def __cinit__(self, list params, list exp_avgs, list exp_avg_sqs, list max_exp_avg_sqs,
                  list group_sizes, bint decoupled, StepGuard guard not None):
        cdef Py_ssize_t k, j
        cdef cnp.ndarray buf
        self.n = len(params)
        if not (len(exp_avgs) == len(exp_avg_sqs) == len(max_exp_avg_sqs) == self.n):
            raise ValueError("Plan: one state entry per parameter is needed")
        if sum(group_sizes) != self.n:
            raise ValueError("Plan: group_sizes must add up to the number of parameters")
        self.params, self.exp_avgs, self.exp_avg_sqs = params, exp_avgs, exp_avg_sqs
        self.max_exp_avg_sqs, self.group_sizes = max_exp_avg_sqs, group_sizes
        self.wd_mode_if_nonzero = FA_WD_DECOUPLED if decoupled else FA_WD_L2
        self.guard = guard
        self.items = <fa_item *>malloc(max(self.n, 1) * sizeof(fa_item))
        self.offsets = <int64_t *>malloc((self.n + 1) * sizeof(int64_t))
        self.written = <int64_t *>malloc(max(8 * self.n, 2) * sizeof(int64_t))
        if self.items == NULL or self.offsets == NULL or self.written == NULL:
            raise MemoryError()
        self.offsets[0] = 0
        self.n_written = 0
        for k in range(self.n):
            buffers = (params[k], exp_avgs[k], exp_avg_sqs[k], max_exp_avg_sqs[k])
            for j, obj in enumerate(buffers):
                if obj is None and j == 3:
                    continue
                buf = <cnp.ndarray?>obj
                if (not cnp.PyArray_ISCARRAY(buf) or dtype_code(buf) != dtype_code(params[k])
                        or dtype_code(buf) < 0 or not same_shape(buf, params[k])):
                    raise ValueError("Plan: state buffers must be writeable, C-contiguous, "
                                     "and match their parameter's dtype and shape")
                if cnp.PyArray_NBYTES(buf) > 0:
                    self.written[2 * self.n_written] = <int64_t><intptr_t>cnp.PyArray_DATA(buf)
                    self.written[2 * self.n_written + 1] = (
                        self.written[2 * self.n_written] + cnp.PyArray_NBYTES(buf))
                    self.n_written += 1
            buf = params[k]
            self.items[k].param = cnp.PyArray_DATA(buf)
            self.items[k].numel = cnp.PyArray_SIZE(buf)
            self.items[k].dtype = dtype_code(buf)
            self.items[k].exp_avg = cnp.PyArray_DATA(<cnp.ndarray>exp_avgs[k])
            self.items[k].exp_avg_sq = cnp.PyArray_DATA(<cnp.ndarray>exp_avg_sqs[k])
            self.items[k].max_exp_avg_sq = (
                NULL if max_exp_avg_sqs[k] is None
                else cnp.PyArray_DATA(<cnp.ndarray>max_exp_avg_sqs[k]))
            self.offsets[k + 1] = self.offsets[k] + self.items[k].numel
        qsort(self.written, self.n_written, 2 * sizeof(int64_t), compare_int64)
        for j in range(1, self.n_written):
            if self.written[2 * j] < self.written[2 * j - 1]:
                raise ValueError("Plan: buffers overlap")

    def __dealloc__(self):
        free(self.items)
        free(self.offsets)
        free(self.written)

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

    def step(self, list groups, grads, dict state, int num_threads, bint skip_if_nonfinite=False,
             bint run_kernel=True):
        """Apply one step: True.  With ``skip_if_nonfinite`` and a NaN or Inf gradient:
        False, and nothing changed.  None (and nothing changed) if anything is off.

        ``num_threads`` <= 0 means the default (see default_num_threads).  With
        ``run_kernel=False`` the step is checked and its step counts committed, but
        another kernel (the Numba backend) is to do the update: the result is a list
        of (variant, beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, decay,
        step_size, 1/sqrt(bc2)) per tensor, and the guard stays busy until the
        caller clears it.
        """
        cdef int threads = resolve_num_threads(num_threads)
        cdef bint finite = True
        cdef Py_ssize_t gi, j, k, n_in_group
        cdef double lr, beta1, beta2, eps, weight_decay, bc1, bc2
        cdef int variant
        cdef long long step
        cdef PyObject *ptr
        cdef cnp.ndarray g
        cdef list group_params
        cdef fa_item *it
        if self.guard.busy:
            raise RuntimeError("Adam.step() called from two threads at once on the same "
                               "optimizer; its buffers can take one step at a time")
        if type(grads) is not list and type(grads) is not tuple:
            return None
        if len(grads) != self.n or len(groups) != len(self.group_sizes):
            return None
        # Pass 1: check everything and fill the items; nothing is changed yet.
        k = 0
        for gi in range(len(groups)):
            group = groups[gi]
            if type(group) is not dict:
                return None
            try:
                group_params = <list?>group["params"]
                betas = group["betas"]
                if len(betas) != 2:
                    return None
                lr = float(group["lr"])
                beta1 = float(betas[0])
                beta2 = float(betas[1])
                eps = float(group["eps"])
                weight_decay = float(group["weight_decay"])
                variant = (
                    (0 if weight_decay == 0.0 else self.wd_mode_if_nonzero)
                    | (<int>bool(group["amsgrad"]) << 2) | (<int>bool(group["maximize"]) << 3))
            except Exception:
                return None
            if not (0.0 <= lr and 0.0 <= eps and 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0
                    and 0.0 <= weight_decay):
                return None
            n_in_group = self.group_sizes[gi]
            if PyList_GET_SIZE(group_params) != n_in_group:
                return None
            for j in range(n_in_group):
                it = &self.items[k]
                if <object>PyList_GET_ITEM(group_params, j) is not self.params[k]:
                    return None
                if ((variant >> 2) & 1) != (self.max_exp_avg_sqs[k] is not None):
                    return None
                ptr = PyDict_GetItem(state, k)
                if ptr == NULL or type(<object>ptr) is not dict:
                    return None
                st = <dict>ptr
                ptr = PyDict_GetItem(st, "step")
                if ptr == NULL or type(<object>ptr) is not int:
                    return None
                if not (0 <= <object>ptr < (1 << 53)):
                    return None
                step = <long long>(<object>ptr)
                if not (same_object(st, "exp_avg", self.exp_avgs[k])
                        and same_object(st, "exp_avg_sq", self.exp_avg_sqs[k])):
                    return None
                if self.max_exp_avg_sqs[k] is not None and not same_object(
                        st, "max_exp_avg_sq", self.max_exp_avg_sqs[k]):
                    return None
                gobj = grads[k]
                if not cnp.PyArray_Check(gobj):
                    return None
                g = <cnp.ndarray>gobj
                if (not cnp.PyArray_ISCARRAY_RO(g) or dtype_code(g) != it.dtype
                        or not same_shape(g, <cnp.ndarray>self.params[k]) or self.overlaps_written(g)):
                    return None
                it.grad = cnp.PyArray_DATA(g)
                it.variant = variant
                step += 1
                bc1 = 1.0 - pow(beta1, <double>step)
                bc2 = 1.0 - pow(beta2, <double>step)
                it.beta1 = beta1
                it.one_minus_beta1 = 1.0 - beta1
                it.beta2 = beta2
                it.one_minus_beta2 = 1.0 - beta2
                it.eps = eps
                it.weight_decay = weight_decay
                it.decay = 1.0 - lr * weight_decay
                it.step_size = lr / bc1
                it.inv_sqrt_bc2 = 1.0 / sqrt(bc2)
                k += 1
        if skip_if_nonfinite:
            self.guard.busy = True
            try:
                with nogil:
                    finite = all_finite(self.items, self.offsets, self.n, threads)
            finally:
                self.guard.busy = False
            if not finite:
                return False
        # Pass 2: commit.  Nothing below can fail but a MemoryError from a
        # new int, and that is raised before any buffer is touched.
        new_steps = [state[k]["step"] + 1 for k in range(self.n)]
        for k in range(self.n):
            PyDict_SetItem(<dict>state[k], "step", new_steps[k])
        if not run_kernel:
            self.guard.busy = True
            return [(it.variant, it.beta1, it.one_minus_beta1, it.beta2, it.one_minus_beta2, it.eps,
                     it.weight_decay, it.decay, it.step_size, it.inv_sqrt_bc2)
                    for it in self.items[:self.n]]
        self.guard.busy = True
        try:
            with nogil:
                run_items(self.items, self.offsets, self.n, threads)
        finally:
            self.guard.busy = False
        return True


def _select_isa_from_environment():
    import os
    select_isa(os.environ.get("FASTADAM_ISA") or None)


_select_isa_from_environment()
