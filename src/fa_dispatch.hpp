// One function per instruction set over every (dtype, state, variant), and the
// choice of instruction set at import.
#pragma once

// One function per ISA: a switch over the variants, outside the loop, for each
// (dtype, state storage) pair that exists.  Macros, not helper functions, so that
// every case is compiled inside the ISA's target function.
#define FA_AMSGRAD_MAXIMIZE_CASES(T, WD, STATE, ISA)                                   \
    case FA_VARIANT(WD, 0, 0): fa_adam_loop<T, WD, false, false, STATE, ISA>(it, a, b); break; \
    case FA_VARIANT(WD, 0, 1): fa_adam_loop<T, WD, false, true, STATE, ISA>(it, a, b); break;  \
    case FA_VARIANT(WD, 1, 0): fa_adam_loop<T, WD, true, false, STATE, ISA>(it, a, b); break;  \
    case FA_VARIANT(WD, 1, 1): fa_adam_loop<T, WD, true, true, STATE, ISA>(it, a, b); break;

#define FA_VARIANT_CASES(T, STATE, ISA)                                                \
    switch (it.variant) {                                                              \
    FA_AMSGRAD_MAXIMIZE_CASES(T, FA_WD_NONE, STATE, ISA)                               \
    FA_AMSGRAD_MAXIMIZE_CASES(T, FA_WD_L2, STATE, ISA)                                 \
    FA_AMSGRAD_MAXIMIZE_CASES(T, FA_WD_DECOUPLED, STATE, ISA)                          \
    default: break;                                                                    \
    }

#define FA_DEFINE_ISA(NAME, TARGET, ISA)                                               \
    TARGET static void fa_adam_range_##NAME(const fa_item &it, int64_t a, int64_t b) { \
        if (it.dtype == FA_FLOAT32 && it.state == FA_STATE_BF16) {                     \
            FA_VARIANT_CASES(float, FA_STATE_BF16, ISA)                                \
        } else if (it.dtype == FA_FLOAT32 && it.state == FA_STATE_INT8) {              \
            FA_VARIANT_CASES(float, FA_STATE_INT8, ISA)                                \
        } else if (it.dtype == FA_FLOAT32) {                                           \
            FA_VARIANT_CASES(float, FA_STATE_NATIVE, ISA)                              \
        } else {                                                                       \
            FA_VARIANT_CASES(double, FA_STATE_NATIVE, ISA)                             \
        }                                                                              \
    }                                                                                  \
    TARGET static int fa_finite_range_##NAME(const fa_item &it, int64_t a, int64_t b) { \
        if (it.dtype == FA_FLOAT32)                                                    \
            return fa_all_finite_loop<float, uint32_t, 0x7fffffffu, 0x7f800000u>(      \
                (const float *)it.grad, a, b);                                         \
        return fa_all_finite_loop<double, uint64_t, 0x7fffffffffffffffull,            \
                                  0x7ff0000000000000ull>((const double *)it.grad, a, b); \
    }                                                                                  \
    TARGET static void fa_sumsq_range_##NAME(const fa_item &it, int64_t lane0, int64_t a, \
                                             int64_t b, double *acc) {                 \
        if (it.dtype == FA_FLOAT32)                                                    \
            fa_sumsq_loop<float>((const float *)it.grad, lane0, a, b, acc);           \
        else                                                                           \
            fa_sumsq_loop<double>((const double *)it.grad, lane0, a, b, acc);         \
    }

FA_DEFINE_ISA(baseline, , FA_ISA_BASELINE)
#if defined(__x86_64__) && defined(__GNUC__)
#define FA_HAVE_X86_VARIANTS 1
FA_DEFINE_ISA(avx2, __attribute__((target("avx2,fma"))), FA_ISA_AVX2)
FA_DEFINE_ISA(avx512, FA_AVX512_TARGET, FA_ISA_AVX512)
#else
#define FA_HAVE_X86_VARIANTS 0
#endif

typedef void (*fa_range_fn)(const fa_item &, int64_t, int64_t);
typedef int (*fa_check_fn)(const fa_item &, int64_t, int64_t);
typedef void (*fa_sumsq_fn)(const fa_item &, int64_t, int64_t, int64_t, double *);

// The functions every update and every finiteness check go through; set by fa_select_isa.
static fa_range_fn fa_adam_range = fa_adam_range_baseline;
static fa_check_fn fa_finite_range = fa_finite_range_baseline;
static fa_sumsq_fn fa_sumsq_range = fa_sumsq_range_baseline;
static int fa_isa_in_use = FA_ISA_BASELINE;

static inline int fa_isa_supported(int isa) {
    if (isa == FA_ISA_BASELINE) return 1;
#if FA_HAVE_X86_VARIANTS
    __builtin_cpu_init();  // libgcc checks CPUID and that the OS saves the registers (XGETBV)
    if (isa == FA_ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == FA_ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
    return 0;
}

// Select the widest supported variant, or `forced` (0, 1, 2) when >= 0.
// Returns the ISA in use, or -1 when `forced` is not supported here.
static inline int fa_select_isa(int forced) {
    int isa;
    if (forced >= 0) {
        if (!fa_isa_supported(forced)) return -1;
        isa = forced;
    } else {
        isa = fa_isa_supported(FA_ISA_AVX512) ? FA_ISA_AVX512
              : fa_isa_supported(FA_ISA_AVX2) ? FA_ISA_AVX2
                                              : FA_ISA_BASELINE;
    }
#if FA_HAVE_X86_VARIANTS
    fa_adam_range = isa == FA_ISA_AVX512 ? fa_adam_range_avx512
                    : isa == FA_ISA_AVX2 ? fa_adam_range_avx2
                                         : fa_adam_range_baseline;
    fa_finite_range = isa == FA_ISA_AVX512 ? fa_finite_range_avx512
                      : isa == FA_ISA_AVX2 ? fa_finite_range_avx2
                                           : fa_finite_range_baseline;
    fa_sumsq_range = isa == FA_ISA_AVX512 ? fa_sumsq_range_avx512
                     : isa == FA_ISA_AVX2 ? fa_sumsq_range_avx2
                                          : fa_sumsq_range_baseline;
#endif
    fa_isa_in_use = isa;
    return isa;
}
