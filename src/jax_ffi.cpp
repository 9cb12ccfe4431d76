// fastadam's step as an XLA FFI handler on the CPU (fastadam.jax): one call
// steps a whole pytree of tensors with the kernel fastadam._kernel compiled,
// reached through its capsule (fa_kernel_api.h), so every dtype row, state
// storage and option is the NumPy API's, bit for bit.
//
// Operands: the steps taken so far (s32 scalar), the traced hyperparameters
// (a float vector, one per entry of the attribute dyn_slots), then per tensor
// its param, grad, exp_avg, exp_avg_sq, [max_exp_avg_sq], [master], [absmaxes].
// Results: per tensor the same buffers but the gradient, each aliased to its
// operand (fastadam/_jax_call.py), then `applied` (s32) and the gradients'
// global norm (f32; NaN without clipping).  Nothing is written before every
// buffer has been checked against what the attributes say it must be.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <Python.h>

#include "fa_kernel_api.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

const fa_kernel_api *api = nullptr;  // set by fastadam._jax_ffi.bind before any call

// The hyperparameters' order in the attribute `hypers` and in dyn_slots.
enum { LR, BETA1, BETA2, EPS, WEIGHT_DECAY, EPS_ROOT, N_HYPERS };

int dtype_code(ffi::DataType t) {
    switch (t) {
        case ffi::DataType::F32: return FA_FLOAT32;
        case ffi::DataType::F64: return FA_FLOAT64;
        case ffi::DataType::BF16: return FA_BFLOAT16;
        case ffi::DataType::F16: return FA_FLOAT16;
        default: return -1;
    }
}

ffi::Error invalid(const std::string &what) {
    return ffi::Error::InvalidArgument("fastadam.jax step: " + what);
}

// Runs every item's work as `shares` shares on XLA's intra-op pool, the calling
// thread taking shares too, so that the call finishes even when no pool thread
// is free.  Shares are claimed from a counter; a task that starts after all are
// claimed does nothing, and the shared record outlives the call for it.
void run_on_pool(ffi::ThreadPool &pool, const fa_item *items, const int64_t *offsets,
                 int64_t n_items, int64_t shares) {
    struct Work {
        std::atomic<int64_t> next{0};
        int64_t done = 0;
        std::mutex mutex;
        std::condition_variable finished;
    };
    auto work = std::make_shared<Work>();
    auto run_claimed = [=]() {
        for (int64_t t; (t = work->next.fetch_add(1)) < shares;) {
            api->run_share(items, offsets, n_items, t, shares);
            std::lock_guard<std::mutex> lock(work->mutex);
            if (++work->done == shares) work->finished.notify_all();
        }
    };
    for (int64_t t = 1; t < shares; ++t) pool.Schedule(decltype(run_claimed)(run_claimed));
    run_claimed();
    std::unique_lock<std::mutex> lock(work->mutex);
    work->finished.wait(lock, [&] { return work->done == shares; });
}

ffi::Error fastadam_step(ffi::ThreadPool pool, ffi::AnyBuffer count, ffi::AnyBuffer dyn,
                         ffi::RemainingArgs args, ffi::RemainingRets rets,
                         ffi::Span<const double> hypers, ffi::Span<const int64_t> dyn_slots,
                         ffi::Span<const int64_t> modes, ffi::Span<const int64_t> storages,
                         ffi::Span<const int64_t> decayed, int64_t decoupled, int64_t flags, uint64_t seed,
                         int64_t skip_if_nonfinite, double max_grad_norm, int64_t num_threads,
                         int64_t xla_pool) {
    if (api == nullptr) return invalid("the kernel is not bound (import fastadam.jax)");
    const size_t n = modes.size();
    if (storages.size() != n || decayed.size() != n || hypers.size() != N_HYPERS)
        return invalid("attributes of different lengths");
    // The scalars: the attributes' doubles, where traced the operand's values.
    double h[N_HYPERS];
    for (int j = 0; j < N_HYPERS; ++j) h[j] = hypers[j];
    if (dyn.element_count() != dyn_slots.size()) return invalid("dyn holds one value per slot");
    for (size_t j = 0; j < dyn_slots.size(); ++j) {
        if (dyn_slots[j] < 0 || dyn_slots[j] >= N_HYPERS) return invalid("dyn_slots");
        if (dyn.element_type() == ffi::DataType::F32)
            h[dyn_slots[j]] = static_cast<const float *>(dyn.untyped_data())[j];
        else if (dyn.element_type() == ffi::DataType::F64)
            h[dyn_slots[j]] = static_cast<const double *>(dyn.untyped_data())[j];
        else
            return invalid("traced hyperparameters must be float32 or float64");
    }
    if (!(h[LR] >= 0 && std::isfinite(h[LR]) && h[EPS] >= 0 && std::isfinite(h[EPS]) &&
          h[BETA1] >= 0 && h[BETA1] < 1 && h[BETA2] >= 0 && h[BETA2] < 1 &&
          h[WEIGHT_DECAY] >= 0 && std::isfinite(h[WEIGHT_DECAY])))
        return invalid("a traced hyperparameter is out of range (learning_rate, eps and "
                       "weight_decay must be finite and >= 0, b1 and b2 in [0, 1))");
    if (h[EPS_ROOT] != 0.0) return invalid("eps_root must be 0 (the kernel has no eps_root)");
    if (count.element_type() != ffi::DataType::S32 || count.element_count() != 1)
        return invalid("count must be an int32 scalar");
    const int64_t taken = *static_cast<const int32_t *>(count.untyped_data());
    if (taken < 0) return invalid("count must be >= 0");
    const int flag_bits = static_cast<int>(flags) & ~FA_WD_MASK;
    const bool amsgrad = (flag_bits & FA_AMSGRAD) != 0;

    std::vector<fa_item> items(n);
    std::vector<int64_t> offsets(n + 1, 0);
    struct Copy { void *to; const void *from; size_t bytes; };
    std::vector<Copy> copies;  // results XLA did not alias to their operands
    size_t a = 0, r = 0;
    for (size_t k = 0; k < n; ++k) {
        const std::string at = "tensor " + std::to_string(k) + ": ";
        const bool mastered = modes[k] == FA_PARAM_SPLIT || modes[k] == FA_PARAM_MASTER;
        const int storage = static_cast<int>(storages[k]);
        const size_t n_written = 3 + amsgrad + mastered + (storage == FA_STORAGE_INT8 ? 2 + amsgrad : 0);
        if (a + n_written + 1 > args.size() || r + n_written > rets.size())
            return invalid("fewer buffers than the attributes describe");
        auto p = args.get<ffi::AnyBuffer>(a).value();
        auto g = args.get<ffi::AnyBuffer>(a + 1).value();
        const int code = dtype_code(p.element_type());
        const int grad_code = dtype_code(g.element_type());
        const int64_t numel = static_cast<int64_t>(p.element_count());
        if (code < 0 || grad_code < 0) return invalid(at + "parameters and gradients are floats");
        if (static_cast<int64_t>(g.element_count()) != numel)
            return invalid(at + "the gradient's size differs from the parameter's");
        fa_item &it = items[k];
        std::memset(&it, 0, sizeof it);
        it.numel = numel;
        it.dtype = code;
        it.grad_dtype = grad_code;
        it.param_mode = static_cast<int>(modes[k]);
        it.storage = storage;
        it.grad = g.untyped_data();
        // The written buffers in order, each checked: its element count and width.
        const int state_bytes = storage == FA_STORAGE_BF16 ? 2 : storage == FA_STORAGE_INT8 ? 1
                                : mastered ? 4 : static_cast<int>(ffi::ByteWidth(p.element_type()));
        const int64_t blocks = (numel + api->int8_block - 1) / api->int8_block;
        void *out[8];
        size_t j = 0;
        for (size_t w = 0; w < n_written; ++w) {
            auto in = args.get<ffi::AnyBuffer>(w == 0 ? a : a + 1 + w).value();
            auto res = rets.get<ffi::AnyBuffer>(r + w).value();
            int64_t want_count = numel;
            size_t want_bytes = ffi::ByteWidth(p.element_type());
            if (w >= 1 && w <= 2u + amsgrad) want_bytes = state_bytes;
            else if (w == 3u + amsgrad && mastered)
                want_bytes = modes[k] == FA_PARAM_SPLIT ? 2 : 4;
            else if (w > 0) { want_count = blocks; want_bytes = 4; }
            if (static_cast<int64_t>(in.element_count()) != want_count ||
                ffi::ByteWidth(in.element_type()) != want_bytes ||
                res->element_count() != in.element_count() ||
                res->element_type() != in.element_type())
                return invalid(at + "buffer " + std::to_string(w) + " is not of the expected size");
            if (res->untyped_data() != in.untyped_data())
                copies.push_back({res->untyped_data(), in.untyped_data(), in.size_bytes()});
            out[j++] = res->untyped_data();
        }
        j = 0;
        it.param = out[j++];
        it.exp_avg = out[j++];
        it.exp_avg_sq = out[j++];
        it.max_exp_avg_sq = amsgrad ? out[j++] : nullptr;
        it.master = mastered ? out[j++] : nullptr;
        if (storage == FA_STORAGE_INT8)
            for (int m = 0; m < 2 + amsgrad; ++m) it.absmax[m] = static_cast<float *>(out[j++]);
        // Weight decay where the mask has it (a zero decay is no decay, as in the NumPy API).
        const double wd = decayed[k] ? h[WEIGHT_DECAY] : 0.0;
        const int variant = flag_bits | (wd != 0.0 ? (decoupled ? FA_WD_DECOUPLED : FA_WD_L2) : 0);
        api->set_step(&it, h[LR], h[BETA1], h[BETA2], h[EPS], wd, variant, taken + 1, seed,
                      static_cast<int64_t>(k));
        offsets[k + 1] = offsets[k] + numel;
        a += n_written + 1;
        r += n_written;
    }
    if (a != args.size() || r + 2 != rets.size())
        return invalid("more buffers than the attributes describe");
    auto applied = rets.get<ffi::AnyBuffer>(r).value();
    auto norm_out = rets.get<ffi::AnyBuffer>(r + 1).value();
    if (applied->element_type() != ffi::DataType::S32 || norm_out->element_type() != ffi::DataType::F32)
        return invalid("applied is int32 and the norm float32");
    for (auto &c : copies)  // XLA gave a result its own buffer: it starts as the operand
        std::memcpy(c.to, c.from, c.bytes);

    const int64_t total = offsets[n];
    int threads = api->threads_for(static_cast<int>(num_threads), total);
    const bool clip = max_grad_norm >= 0.0;
    bool finite = true;
    double norm = NAN;
    if (skip_if_nonfinite || clip) {
        std::vector<double> partial(std::max<int64_t>(api->prepass_blocks(offsets.data(), n), 1));
        double sum_norm = 0.0;
        finite = api->prepass(items.data(), offsets.data(), n, xla_pool ? 1 : threads, clip,
                              partial.data(), &sum_norm) != 0;
        if (clip) {
            norm = sum_norm;
            const double c = api->clip_coefficient(max_grad_norm, norm);
            for (auto &it : items) it.grad_scale = c;
        }
    }
    const bool apply = finite || !skip_if_nonfinite;
    if (apply) {
        if (xla_pool && threads > 1)
            run_on_pool(pool, items.data(), offsets.data(), n,
                        std::min<int64_t>(threads, pool.num_threads() + 1));
        else
            api->run(items.data(), offsets.data(), n, xla_pool ? 1 : threads);
    }
    *static_cast<int32_t *>(applied->untyped_data()) = apply ? 1 : 0;
    *static_cast<float *>(norm_out->untyped_data()) = static_cast<float>(norm);
    return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fastadam_step_handler, fastadam_step,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // count
                                  .Arg<ffi::AnyBuffer>()  // dyn
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const double>>("hypers")
                                  .Attr<ffi::Span<const int64_t>>("dyn_slots")
                                  .Attr<ffi::Span<const int64_t>>("modes")
                                  .Attr<ffi::Span<const int64_t>>("storages")
                                  .Attr<ffi::Span<const int64_t>>("decayed")
                                  .Attr<int64_t>("decoupled")
                                  .Attr<int64_t>("flags")
                                  .Attr<uint64_t>("seed")
                                  .Attr<int64_t>("skip_if_nonfinite")
                                  .Attr<double>("max_grad_norm")
                                  .Attr<int64_t>("num_threads")
                                  .Attr<int64_t>("xla_pool"));

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
    api = found;
    Py_RETURN_NONE;
}

static PyObject *handler(PyObject *, PyObject *) {
    return PyCapsule_New(reinterpret_cast<void *>(&fastadam_step_handler), nullptr, nullptr);
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_O, "Take fastadam._kernel's entry points (its KERNEL_API capsule)."},
    {"handler", handler, METH_NOARGS, "The step's XLA FFI handler, as a capsule."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastadam._jax_ffi",
                             "fastadam's step as an XLA FFI handler (fastadam.jax).", -1, methods};

PyMODINIT_FUNC PyInit__jax_ffi(void) { return PyModule_Create(&module); }
