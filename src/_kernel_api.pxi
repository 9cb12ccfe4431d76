# The kernel's entry points for other extensions (src/fa_kernel_api.h): the JAX
# FFI handler calls the kernel this module compiled, with this module's ISA
# choice, thread policy and per-step scalars.
from cpython.pycapsule cimport PyCapsule_New

cdef extern from "fa_kernel_api.h" nogil:
    ctypedef struct fa_kernel_api:
        int abi_version
        int item_size
        int64_t int8_block
        void (*set_step)(fa_item *, double, double, double, double, double, int, int64_t,
                         uint64_t, int64_t) noexcept
        int (*threads_for)(int, int64_t) noexcept
        void (*run)(const fa_item *, const int64_t *, int64_t, int) noexcept
        void (*run_share)(const fa_item *, const int64_t *, int64_t, int64_t, int64_t) noexcept
        int (*prepass)(const fa_item *, const int64_t *, int64_t, int, int, double *,
                       double *) noexcept
        int64_t (*prepass_blocks)(const int64_t *, int64_t) noexcept
        double (*clip_coefficient)(double, double) noexcept
    enum:
        FA_KERNEL_API_VERSION
    const char *FA_KERNEL_API_CAPSULE


cdef int api_threads_for(int requested, int64_t numel) noexcept nogil:
    if requested > 0 or numel >= _parallel_threshold:
        return resolve_num_threads(requested)
    return 1


cdef int api_prepass(const fa_item *items, const int64_t *offsets, int64_t n_items, int threads,
                     int want_norm, double *partial, double *norm) noexcept nogil:
    return prepass(items, offsets, n_items, threads, want_norm != 0, partial, norm)


cdef fa_kernel_api _api
_api.abi_version = FA_KERNEL_API_VERSION
_api.item_size = sizeof(fa_item)
_api.int8_block = FA_INT8_BLOCK
_api.set_step = set_item_step
_api.threads_for = api_threads_for
_api.run = run_items
_api.run_share = fa_run_share
_api.prepass = api_prepass
_api.prepass_blocks = fa_prepass_blocks
_api.clip_coefficient = clip_coefficient
KERNEL_API = PyCapsule_New(<void *>&_api, FA_KERNEL_API_CAPSULE, NULL)
