// fastadam's step as an XLA FFI handler on the CPU (fastadam.jax): one call
// steps a whole pytree of tensors with the kernel fastadam._kernel compiled,
// reached through its capsule (fa_kernel_api.h), so every dtype row, state
// storage and option is the NumPy API's, bit for bit.
//
// Written against the FFI's stable C API (xla/ffi/api/c_api.h) and C's library
// only, with no C++ runtime (no exceptions, no std::): the module needs nothing
// beyond what the wheels' manylinux policy allows (docs/building.md).
//
// Operands: the steps taken so far (s32 scalar), the traced hyperparameters
// (a float vector, one per entry of the attribute dyn_slots), then per tensor
// its param, grad, exp_avg, exp_avg_sq, [max_exp_avg_sq], [master], [absmaxes].
// Results: per tensor the same buffers but the gradient, each aliased to its
// operand (fastadam/_jax_call.py), then `applied` (s32) and the gradients'
// global norm (f32; NaN without clipping).  Nothing is written before every
// buffer has been checked against what the attributes say it must be.
#include <Python.h>
#include <math.h>
#include <sched.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fa_kernel_api.h"
#include "xla/ffi/api/c_api.h"

namespace {

const fa_kernel_api *kernel = nullptr;  // set by fastadam._jax_ffi.bind before any call

// The hyperparameters' order in the attribute `hypers` and in dyn_slots.
enum { LR, BETA1, BETA2, EPS, WEIGHT_DECAY, EPS_ROOT, N_HYPERS };

XLA_FFI_Error *fail(const XLA_FFI_Api *api, const char *format, ...) {
    char message[512];
    int used = snprintf(message, sizeof message, "fastadam.jax step: ");
    va_list args;
    va_start(args, format);
    vsnprintf(message + used, sizeof message - used, format, args);
    va_end(args);
    XLA_FFI_Error_Create_Args create;
    memset(&create, 0, sizeof create);
    create.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
    create.message = message;
    create.errc = XLA_FFI_Error_Code_INVALID_ARGUMENT;
    return api->XLA_FFI_Error_Create(&create);
}

int dtype_code(XLA_FFI_DataType t) {
    switch (t) {
        case XLA_FFI_DataType_F32: return FA_FLOAT32;
        case XLA_FFI_DataType_F64: return FA_FLOAT64;
        case XLA_FFI_DataType_BF16: return FA_BFLOAT16;
        case XLA_FFI_DataType_F16: return FA_FLOAT16;
        default: return -1;
    }
}

int byte_width(XLA_FFI_DataType t) {
    switch (t) {
        case XLA_FFI_DataType_S8: case XLA_FFI_DataType_U8: case XLA_FFI_DataType_PRED: return 1;
        case XLA_FFI_DataType_S16: case XLA_FFI_DataType_U16: case XLA_FFI_DataType_F16:
        case XLA_FFI_DataType_BF16: return 2;
        case XLA_FFI_DataType_S32: case XLA_FFI_DataType_U32: case XLA_FFI_DataType_F32: return 4;
        case XLA_FFI_DataType_S64: case XLA_FFI_DataType_U64: case XLA_FFI_DataType_F64: return 8;
        default: return 0;
    }
}

int64_t element_count(const XLA_FFI_Buffer *b) {
    int64_t n = 1;
    for (int64_t d = 0; d < b->rank; ++d) n *= b->dims[d];
    return n;
}

// An attribute by name and kind (XLA sorts them by name; there are few).
const void *attribute(const XLA_FFI_Attrs *attrs, const char *name, XLA_FFI_AttrType type) {
    const size_t len = strlen(name);
    for (int64_t i = 0; i < attrs->size; ++i)
        if (attrs->types[i] == type && attrs->names[i]->len == len &&
            memcmp(attrs->names[i]->ptr, name, len) == 0)
            return attrs->attrs[i];
    return nullptr;
}

bool scalar(const XLA_FFI_Attrs *attrs, const char *name, XLA_FFI_DataType dtype, void *out) {
    auto *s = static_cast<const XLA_FFI_Scalar *>(attribute(attrs, name, XLA_FFI_AttrType_SCALAR));
    if (s == nullptr || s->dtype != dtype) return false;
    memcpy(out, s->value, byte_width(dtype));
    return true;
}

const XLA_FFI_Array *array(const XLA_FFI_Attrs *attrs, const char *name, XLA_FFI_DataType dtype) {
    auto *a = static_cast<const XLA_FFI_Array *>(attribute(attrs, name, XLA_FFI_AttrType_ARRAY));
    return a != nullptr && (a->dtype == dtype || a->size == 0) ? a : nullptr;
}

// Shares of the items' work claimed from a counter by the calling thread and by
// tasks on XLA's intra-op pool, so the call finishes even when no pool thread is
// free (XLA may run it on a pool thread itself).  A task that starts after every
// share is claimed does nothing; the record is freed by whoever leaves it last.
struct Work {
    const fa_item *items;
    const int64_t *offsets;
    int64_t n_items, shares, next, done;
    int refs;
};

void run_claimed(Work *w) {
    for (int64_t t; (t = __atomic_fetch_add(&w->next, 1, __ATOMIC_ACQ_REL)) < w->shares;) {
        kernel->run_share(w->items, w->offsets, w->n_items, t, w->shares);
        __atomic_fetch_add(&w->done, 1, __ATOMIC_RELEASE);
    }
}

void leave(Work *w) {
    if (__atomic_sub_fetch(&w->refs, 1, __ATOMIC_ACQ_REL) == 0) free(w);
}

void pool_task(void *data) {
    run_claimed(static_cast<Work *>(data));
    leave(static_cast<Work *>(data));
}

bool has_pool(const XLA_FFI_Api *api) {
    return api->struct_size >= offsetof(XLA_FFI_Api, XLA_FFI_ThreadPool_NumThreads) +
                               sizeof(api->XLA_FFI_ThreadPool_NumThreads);
}

// The pool's size, or 0 where this XLA offers none.
int64_t pool_threads(XLA_FFI_CallFrame *frame) {
    const XLA_FFI_Api *api = frame->api;
    if (!has_pool(api)) return 0;
    int64_t n = 0;
    XLA_FFI_ThreadPool_NumThreads_Args args;
    memset(&args, 0, sizeof args);
    args.struct_size = XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE;
    args.ctx = frame->ctx;
    args.num_threads = &n;
    if (XLA_FFI_Error *e = api->XLA_FFI_ThreadPool_NumThreads(&args)) {
        XLA_FFI_Error_Destroy_Args destroy = {XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, nullptr, e};
        api->XLA_FFI_Error_Destroy(&destroy);
        return 0;
    }
    return n;
}

// Runs every item as `shares` shares on the pool and the calling thread; false
// (nothing run) if the record cannot be allocated.
bool run_on_pool(XLA_FFI_CallFrame *frame, const fa_item *items, const int64_t *offsets,
                 int64_t n_items, int64_t shares) {
    const XLA_FFI_Api *api = frame->api;
    Work *w = static_cast<Work *>(calloc(1, sizeof(Work)));
    if (w == nullptr) return false;
    *w = Work{items, offsets, n_items, shares, 0, 0, static_cast<int>(shares)};
    for (int64_t t = 1; t < shares; ++t) {
        XLA_FFI_ThreadPool_Schedule_Args args;
        memset(&args, 0, sizeof args);
        args.struct_size = XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE;
        args.ctx = frame->ctx;
        args.task = pool_task;
        args.data = w;
        if (XLA_FFI_Error *e = api->XLA_FFI_ThreadPool_Schedule(&args)) {  // not run: its share is ours
            XLA_FFI_Error_Destroy_Args destroy = {XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, nullptr, e};
            api->XLA_FFI_Error_Destroy(&destroy);
            leave(w);
        }
    }
    run_claimed(w);
    while (__atomic_load_n(&w->done, __ATOMIC_ACQUIRE) < shares) sched_yield();  // claimed: running
    leave(w);
    return true;
}

XLA_FFI_Error *metadata(const XLA_FFI_Api *api, XLA_FFI_Metadata_Extension *extension) {
    if (extension->extension_base.struct_size < XLA_FFI_Metadata_Extension_STRUCT_SIZE ||
        extension->metadata->struct_size < XLA_FFI_Metadata_STRUCT_SIZE)
        return fail(api, "this XLA's FFI metadata is older than the handler's headers");
    extension->metadata->api_version = XLA_FFI_Api_Version{XLA_FFI_Api_Version_STRUCT_SIZE, nullptr,
                                                           XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR};
    extension->metadata->traits = 0;
    return nullptr;
}

struct Scratch {  // the call's own memory, freed on every return
    fa_item *items = nullptr;
    int64_t *offsets = nullptr;
    double *partial = nullptr;
    ~Scratch() { free(items); free(offsets); free(partial); }
};

XLA_FFI_Error *step(XLA_FFI_CallFrame *frame) {
    const XLA_FFI_Api *api = frame->api;
    const XLA_FFI_Attrs *attrs = &frame->attrs;
    if (kernel == nullptr) return fail(api, "the kernel is not bound (import fastadam.jax)");
    const XLA_FFI_Array *hypers = array(attrs, "hypers", XLA_FFI_DataType_F64);
    const XLA_FFI_Array *dyn_slots = array(attrs, "dyn_slots", XLA_FFI_DataType_S64);
    const XLA_FFI_Array *modes = array(attrs, "modes", XLA_FFI_DataType_S64);
    const XLA_FFI_Array *storages = array(attrs, "storages", XLA_FFI_DataType_S64);
    const XLA_FFI_Array *decayed = array(attrs, "decayed", XLA_FFI_DataType_S64);
    int64_t decoupled, flags, skip_if_nonfinite, num_threads, xla_pool;
    uint64_t seed;
    double max_grad_norm;
    if (!hypers || !dyn_slots || !modes || !storages || !decayed ||
        !scalar(attrs, "decoupled", XLA_FFI_DataType_S64, &decoupled) ||
        !scalar(attrs, "flags", XLA_FFI_DataType_S64, &flags) ||
        !scalar(attrs, "seed", XLA_FFI_DataType_U64, &seed) ||
        !scalar(attrs, "skip_if_nonfinite", XLA_FFI_DataType_S64, &skip_if_nonfinite) ||
        !scalar(attrs, "max_grad_norm", XLA_FFI_DataType_F64, &max_grad_norm) ||
        !scalar(attrs, "num_threads", XLA_FFI_DataType_S64, &num_threads) ||
        !scalar(attrs, "xla_pool", XLA_FFI_DataType_S64, &xla_pool))
        return fail(api, "an attribute is missing or of another type");
    const size_t n = modes->size;
    const int64_t *mode = static_cast<const int64_t *>(modes->data);
    const int64_t *storage_of = static_cast<const int64_t *>(storages->data);
    const int64_t *decayed_of = static_cast<const int64_t *>(decayed->data);
    if (storages->size != n || decayed->size != n || hypers->size != N_HYPERS)
        return fail(api, "attributes of different lengths");
    const int64_t n_args = frame->args.size, n_rets = frame->rets.size;
    for (int64_t i = 0; i < n_args; ++i)
        if (frame->args.types[i] != XLA_FFI_ArgType_BUFFER) return fail(api, "operand %lld", (long long)i);
    for (int64_t i = 0; i < n_rets; ++i)
        if (frame->rets.types[i] != XLA_FFI_RetType_BUFFER) return fail(api, "result %lld", (long long)i);
    auto arg = [&](int64_t i) { return static_cast<XLA_FFI_Buffer *>(frame->args.args[i]); };
    auto ret = [&](int64_t i) { return static_cast<XLA_FFI_Buffer *>(frame->rets.rets[i]); };
    if (n_args < 2) return fail(api, "fewer buffers than the attributes describe");

    // The scalars: the attributes' doubles, where traced the operand's values.
    double h[N_HYPERS];
    memcpy(h, hypers->data, sizeof h);
    const XLA_FFI_Buffer *count = arg(0), *dyn = arg(1);
    if (element_count(dyn) != static_cast<int64_t>(dyn_slots->size))
        return fail(api, "dyn holds one value per slot");
    for (size_t j = 0; j < dyn_slots->size; ++j) {
        const int64_t slot = static_cast<const int64_t *>(dyn_slots->data)[j];
        if (slot < 0 || slot >= N_HYPERS) return fail(api, "dyn_slots");
        if (dyn->dtype == XLA_FFI_DataType_F32) h[slot] = static_cast<const float *>(dyn->data)[j];
        else if (dyn->dtype == XLA_FFI_DataType_F64) h[slot] = static_cast<const double *>(dyn->data)[j];
        else return fail(api, "traced hyperparameters must be float32 or float64");
    }
    if (!(h[LR] >= 0 && isfinite(h[LR]) && h[EPS] >= 0 && isfinite(h[EPS]) && h[BETA1] >= 0 &&
          h[BETA1] < 1 && h[BETA2] >= 0 && h[BETA2] < 1 && h[WEIGHT_DECAY] >= 0 &&
          isfinite(h[WEIGHT_DECAY])))
        return fail(api, "a traced hyperparameter is out of range (learning_rate, eps and "
                         "weight_decay must be finite and >= 0, b1 and b2 in [0, 1))");
    if (h[EPS_ROOT] != 0.0) return fail(api, "eps_root must be 0 (the kernel has no eps_root)");
    if (count->dtype != XLA_FFI_DataType_S32 || element_count(count) != 1)
        return fail(api, "count must be an int32 scalar");
    const int64_t taken = *static_cast<const int32_t *>(count->data);
    if (taken < 0) return fail(api, "count must be >= 0");
    const int flag_bits = static_cast<int>(flags) & ~FA_WD_MASK;
    const bool amsgrad = (flag_bits & FA_AMSGRAD) != 0;

    Scratch s;
    s.items = static_cast<fa_item *>(calloc(n ? n : 1, sizeof(fa_item)));
    s.offsets = static_cast<int64_t *>(calloc(n + 1, sizeof(int64_t)));
    if (!s.items || !s.offsets) return fail(api, "out of memory");
    int64_t a = 2, r = 0;
    for (size_t k = 0; k < n; ++k) {
        const bool mastered = mode[k] == FA_PARAM_SPLIT || mode[k] == FA_PARAM_MASTER;
        const int storage = static_cast<int>(storage_of[k]);
        const int64_t n_written = 3 + amsgrad + mastered + (storage == FA_STORAGE_INT8 ? 2 + amsgrad : 0);
        if (a + n_written + 1 > n_args || r + n_written > n_rets)
            return fail(api, "fewer buffers than the attributes describe");
        const XLA_FFI_Buffer *p = arg(a), *g = arg(a + 1);
        const int code = dtype_code(p->dtype), grad_code = dtype_code(g->dtype);
        const int64_t numel = element_count(p);
        if (code < 0 || grad_code < 0)
            return fail(api, "tensor %zu: parameters and gradients are floats", k);
        if (element_count(g) != numel)
            return fail(api, "tensor %zu: the gradient's size differs from the parameter's", k);
        fa_item &it = s.items[k];
        it.numel = numel;
        it.dtype = code;
        it.grad_dtype = grad_code;
        it.param_mode = static_cast<int>(mode[k]);
        it.storage = storage;
        it.grad = g->data;
        // The written buffers in order, each checked (its element count and width)
        // and, where XLA did not alias it, started from its operand.
        const int state_bytes = storage == FA_STORAGE_BF16 ? 2 : storage == FA_STORAGE_INT8 ? 1
                                : mastered ? 4 : byte_width(p->dtype);
        const int64_t blocks = (numel + kernel->int8_block - 1) / kernel->int8_block;
        void *out[8];
        for (int64_t w = 0; w < n_written; ++w) {
            const XLA_FFI_Buffer *in = arg(w == 0 ? a : a + 1 + w), *res = ret(r + w);
            int64_t want_count = numel;
            int want_bytes = byte_width(p->dtype);
            if (w >= 1 && w <= 2 + amsgrad) want_bytes = state_bytes;
            else if (w == 3 + amsgrad && mastered) want_bytes = mode[k] == FA_PARAM_SPLIT ? 2 : 4;
            else if (w > 0) { want_count = blocks; want_bytes = 4; }
            if (element_count(in) != want_count || byte_width(in->dtype) != want_bytes ||
                element_count(res) != want_count || res->dtype != in->dtype)
                return fail(api, "tensor %zu: buffer %lld is not of the expected size", k, (long long)w);
            out[w] = res->data;
        }
        for (int64_t w = 0; w < n_written; ++w) {
            const XLA_FFI_Buffer *in = arg(w == 0 ? a : a + 1 + w);
            if (out[w] != in->data) memcpy(out[w], in->data, element_count(in) * byte_width(in->dtype));
        }
        int64_t j = 0;
        it.param = out[j++];
        it.exp_avg = out[j++];
        it.exp_avg_sq = out[j++];
        it.max_exp_avg_sq = amsgrad ? out[j++] : nullptr;
        it.master = mastered ? out[j++] : nullptr;
        if (storage == FA_STORAGE_INT8)
            for (int m = 0; m < 2 + amsgrad; ++m) it.absmax[m] = static_cast<float *>(out[j++]);
        // Weight decay where the mask has it (a zero decay is no decay, as in the NumPy API).
        const double wd = decayed_of[k] ? h[WEIGHT_DECAY] : 0.0;
        const int variant = flag_bits | (wd != 0.0 ? (decoupled ? FA_WD_DECOUPLED : FA_WD_L2) : 0);
        kernel->set_step(&it, h[LR], h[BETA1], h[BETA2], h[EPS], wd, variant, taken + 1, seed,
                         static_cast<int64_t>(k));
        s.offsets[k + 1] = s.offsets[k] + numel;
        a += n_written + 1;
        r += n_written;
    }
    if (a != n_args || r + 2 != n_rets) return fail(api, "more buffers than the attributes describe");
    XLA_FFI_Buffer *applied = ret(r), *norm_out = ret(r + 1);
    if (applied->dtype != XLA_FFI_DataType_S32 || norm_out->dtype != XLA_FFI_DataType_F32)
        return fail(api, "applied is int32 and the norm float32");

    const int threads = kernel->threads_for(static_cast<int>(num_threads), s.offsets[n]);
    const bool clip = max_grad_norm >= 0.0;
    bool finite = true;
    double norm = NAN;
    if (skip_if_nonfinite || clip) {
        const int64_t blocks = kernel->prepass_blocks(s.offsets, n);
        s.partial = static_cast<double *>(calloc(blocks > 0 ? blocks : 1, sizeof(double)));
        if (!s.partial) return fail(api, "out of memory");
        double sum_norm = 0.0;
        finite = kernel->prepass(s.items, s.offsets, n, xla_pool ? 1 : threads, clip, s.partial,
                                 &sum_norm) != 0;
        if (clip) {
            norm = sum_norm;
            const double c = kernel->clip_coefficient(max_grad_norm, norm);
            for (size_t k = 0; k < n; ++k) s.items[k].grad_scale = c;
        }
    }
    const bool apply = finite || !skip_if_nonfinite;
    if (apply) {
        const int64_t pool = xla_pool && threads > 1 ? pool_threads(frame) : 0;
        const int64_t shares = pool + 1 < threads ? pool + 1 : threads;
        if (!(pool > 0 && run_on_pool(frame, s.items, s.offsets, n, shares)))
            kernel->run(s.items, s.offsets, n, xla_pool ? 1 : threads);
    }
    *static_cast<int32_t *>(applied->data) = apply ? 1 : 0;
    *static_cast<float *>(norm_out->data) = static_cast<float>(norm);
    return nullptr;
}

XLA_FFI_Error *handler(XLA_FFI_CallFrame *frame) {
    const XLA_FFI_Api *api = frame->api;
    if (frame->struct_size < XLA_FFI_CallFrame_STRUCT_SIZE)
        return fail(api, "this XLA's FFI call frame is older than the handler's headers");
    if (frame->extension_start != nullptr && frame->extension_start->type == XLA_FFI_Extension_Metadata)
        return metadata(api, reinterpret_cast<XLA_FFI_Metadata_Extension *>(frame->extension_start));
    if (frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return nullptr;  // nothing to prepare
    return step(frame);
}

}  // namespace

// The Python module: bind(capsule) takes the kernel's entry points once;
// handler() is the handler's capsule for jax.ffi.register_ffi_target.
static PyObject *bind(PyObject *, PyObject *capsule) {
    auto *found = static_cast<const fa_kernel_api *>(PyCapsule_GetPointer(capsule, FA_KERNEL_API_CAPSULE));
    if (found == nullptr) return nullptr;
    if (found->abi_version != FA_KERNEL_API_VERSION || found->item_size != (int)sizeof(fa_item)) {
        PyErr_SetString(PyExc_ImportError, "fastadam._jax_ffi was built with another fastadam._kernel; "
                                           "rebuild fastadam");
        return nullptr;
    }
    kernel = found;
    Py_RETURN_NONE;
}

static PyObject *handler_capsule(PyObject *, PyObject *) {
    return PyCapsule_New(reinterpret_cast<void *>(&handler), nullptr, nullptr);
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_O, "Take fastadam._kernel's entry points (its KERNEL_API capsule)."},
    {"handler", handler_capsule, METH_NOARGS, "The step's XLA FFI handler, as a capsule."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastadam._jax_ffi",
                             "fastadam's step as an XLA FFI handler (fastadam.jax).", -1, methods};

PyMODINIT_FUNC PyInit__jax_ffi(void) { return PyModule_Create(&module); }
