// One function per instruction set over every (dtype, state, variant), and the
// choice of instruction set at import.
#pragma once

// The kernel's table: one row per (parameter policy, gradient format, state
// storage) it is built for, X(P, G, STORAGE) (fa_params.hpp, fa_formats.hpp).  A
// new parameter dtype is a format and, if it needs one, a policy in
// fa_params.hpp, its code in fa_step.hpp's enum, and its rows here.
typedef fa_param_plain<fa_f32> fa_p_f32;
typedef fa_param_plain<fa_f64> fa_p_f64;
typedef fa_param_plain<fa_bf16> fa_p_bf16;
typedef fa_param_plain<fa_bf16, true> fa_p_bf16_stochastic;
typedef fa_param_plain<fa_f16> fa_p_f16;
typedef fa_param_master<fa_bf16> fa_p_bf16_master;
typedef fa_param_master<fa_f16> fa_p_f16_master;
#define FA_EVERY_STORAGE(X, P, G) X(P, G, FA_STORAGE_NATIVE) X(P, G, FA_STORAGE_BF16) X(P, G, FA_STORAGE_INT8)
#define FA_KERNELS(X)                                                                             \
    FA_EVERY_STORAGE(X, fa_p_f32, fa_f32)                                                         \
    X(fa_p_f64, fa_f64, FA_STORAGE_NATIVE)                                                        \
    FA_EVERY_STORAGE(X, fa_p_f32, fa_bf16)                                                        \
    X(fa_p_bf16, fa_bf16, FA_STORAGE_NATIVE) X(fa_p_bf16, fa_f32, FA_STORAGE_NATIVE)              \
    X(fa_p_bf16_stochastic, fa_bf16, FA_STORAGE_NATIVE)                                           \
    X(fa_p_bf16_stochastic, fa_f32, FA_STORAGE_NATIVE)                                            \
    X(fa_p_f16, fa_f16, FA_STORAGE_NATIVE) X(fa_p_f16, fa_f32, FA_STORAGE_NATIVE)                 \
    X(fa_param_split, fa_bf16, FA_STORAGE_NATIVE) X(fa_param_split, fa_bf16, FA_STORAGE_BF16)     \
    X(fa_p_bf16_master, fa_bf16, FA_STORAGE_NATIVE) X(fa_p_bf16_master, fa_bf16, FA_STORAGE_BF16) \
    X(fa_p_f16_master, fa_f16, FA_STORAGE_NATIVE) X(fa_p_f16_master, fa_f16, FA_STORAGE_BF16)

// The table's rows as numbers, for the test that runs every flag on every row
// (tests/test_every_row.py): each row's parameter dtype, parameter policy's mode,
// gradient dtype, state storage and whether it follows torch's order.
#define FA_ROW_NUMBERS(P, G, STORAGE) P::dtype, P::mode, G::code, STORAGE, (int)P::torch_order,
static const int fa_kernel_rows[] = {FA_KERNELS(FA_ROW_NUMBERS)};
#undef FA_ROW_NUMBERS
enum { FA_ROW_FIELDS = 5, FA_N_KERNEL_ROWS = sizeof(fa_kernel_rows) / sizeof(int) / FA_ROW_FIELDS };

// The gradients' formats, for the read-only passes.
#define FA_GRADIENT_FORMATS(X) X(fa_f32) X(fa_f64) X(fa_bf16) X(fa_f16)

// The flags a row's loops compile: FA_COMPILED_BITS, and maximize on the
// compressed-state rows of float32 parameters, whose AVX-512 paths
// (fa_avx512.hpp) were 2-5% slower reading it at run time
// (benchmarks/results/run-time-flags-ab.txt); every other row reads it at run time.
template <typename P, typename G, int STORAGE>
struct fa_row {
    static constexpr int compiled =
        FA_COMPILED_BITS | (fa_plain_float32<P, G>::value && STORAGE != FA_STORAGE_NATIVE ? FA_MAXIMIZE : 0);
};

// Every variant of one table row: each code of the flags the row compiles its
// own loop with no branch inside, chosen by a chain of compares outside the
// loop; the other flags are read by the loops.  Inlined into each ISA's
// function below, so every loop is compiled for that ISA.
template <typename P, typename G, int STORAGE, int ISA, int CODE>
static inline __attribute__((always_inline)) bool fa_adam_if(const fa_item &it, int code, int64_t a, int64_t b) {
    constexpr int compiled = fa_row<P, G, STORAGE>::compiled;
    if constexpr ((CODE & FA_WD_MASK) > FA_WD_DECOUPLED || (CODE & ~compiled) != 0) {
        return false;  // not a weight-decay mode; or a run-time flag's bit, which no loop is built for
    } else {
        if (code != CODE) return false;
        fa_adam_loop<P, G, fa_loop_code(CODE, compiled), STORAGE, ISA>(it, a, b);
        return true;
    }
}

template <typename P, typename G, int STORAGE, int ISA, int... CODES>
static inline __attribute__((always_inline)) void fa_adam_variants(const fa_item &it, int64_t a, int64_t b,
                                                                  std::integer_sequence<int, CODES...>) {
    const int code = it.variant & fa_row<P, G, STORAGE>::compiled;
    (void)(fa_adam_if<P, G, STORAGE, ISA, CODES>(it, code, a, b) || ...);
}

#define FA_ADAM_ROW(P, G, STORAGE)                                                              \
    if (it.dtype == P::dtype && it.param_mode == P::mode && it.grad_dtype == G::code && it.storage == STORAGE) \
        return fa_adam_variants<P, G, STORAGE, ISA>(it, a, b, std::make_integer_sequence<int, FA_N_VARIANTS>());
#define FA_FINITE_ROW(G) \
    if (it.grad_dtype == G::code) return fa_all_finite_loop<G>((const typename G::held *)it.grad, a, b);
#define FA_SUMSQ_ROW(G) \
    if (it.grad_dtype == G::code) return fa_sumsq_loop<G>((const typename G::held *)it.grad, lane0, a, b, acc);

// One function per ISA for each pass: the table's rows, compiled for it.
#define FA_DEFINE_ISA(NAME, TARGET, ISA_CODE)                                          \
    TARGET static void fa_adam_range_##NAME(const fa_item &it, int64_t a, int64_t b) { \
        constexpr int ISA = ISA_CODE;                                                  \
        FA_KERNELS(FA_ADAM_ROW)                                                        \
    }                                                                                  \
    TARGET static int fa_finite_range_##NAME(const fa_item &it, int64_t a, int64_t b) { \
        FA_GRADIENT_FORMATS(FA_FINITE_ROW)                                               \
        return 0;                                                                      \
    }                                                                                  \
    TARGET static void fa_sumsq_range_##NAME(const fa_item &it, int64_t lane0, int64_t a, \
                                             int64_t b, double *acc) {                 \
        FA_GRADIENT_FORMATS(FA_SUMSQ_ROW)                                                \
    }

FA_DEFINE_ISA(baseline, , FA_ISA_BASELINE)
#if FA_X86_VARIANTS
FA_DEFINE_ISA(avx2, FA_AVX2_TARGET, FA_ISA_AVX2)
FA_DEFINE_ISA(avx512, FA_AVX512_TARGET, FA_ISA_AVX512)
#endif
#if FA_SVE_VARIANT
FA_DEFINE_ISA(sve, FA_SVE_TARGET, FA_ISA_SVE)
#endif

typedef void (*fa_range_fn)(const fa_item &, int64_t, int64_t);
typedef int (*fa_check_fn)(const fa_item &, int64_t, int64_t);
typedef void (*fa_sumsq_fn)(const fa_item &, int64_t, int64_t, int64_t, double *);

// Each pass's function per variant code (fa_cpu.hpp), null where not compiled.
struct fa_isa_functions {
    fa_range_fn adam;
    fa_check_fn finite;
    fa_sumsq_fn sumsq;
};
#define FA_ISA_FUNCTIONS(NAME) {fa_adam_range_##NAME, fa_finite_range_##NAME, fa_sumsq_range_##NAME}
static const fa_isa_functions fa_isa_table[FA_N_ISAS] = {
    FA_ISA_FUNCTIONS(baseline),
#if FA_X86_VARIANTS
    FA_ISA_FUNCTIONS(avx2), FA_ISA_FUNCTIONS(avx512),
#else
    {nullptr, nullptr, nullptr}, {nullptr, nullptr, nullptr},
#endif
#if FA_SVE_VARIANT
    FA_ISA_FUNCTIONS(sve),
#else
    {nullptr, nullptr, nullptr},
#endif
};
#undef FA_ISA_FUNCTIONS

// The functions every update and every finiteness check go through; set by fa_select_isa.
static fa_range_fn fa_adam_range = fa_adam_range_baseline;
static fa_check_fn fa_finite_range = fa_finite_range_baseline;
static fa_sumsq_fn fa_sumsq_range = fa_sumsq_range_baseline;
static int fa_isa_in_use = FA_ISA_BASELINE;

// Whether variant `isa` is compiled here and this CPU runs it.
static inline int fa_isa_usable(int isa) {
    return isa >= 0 && isa < FA_N_ISAS && fa_isa_table[isa].adam != nullptr && fa_isa_supported(isa);
}

// Select the widest usable variant, or `forced` (a code of fa_cpu.hpp) when >= 0.
// Returns the variant in use, or -1 when `forced` is not usable here.
static inline int fa_select_isa(int forced) {
    static const int widest_first[] = {FA_ISA_AVX512, FA_ISA_AVX2, FA_ISA_SVE, FA_ISA_BASELINE};
    int isa = FA_ISA_BASELINE;
    if (forced >= 0) {
        if (!fa_isa_usable(forced)) return -1;
        isa = forced;
    } else {
        for (int candidate : widest_first)
            if (fa_isa_usable(candidate)) {
                isa = candidate;
                break;
            }
    }
    fa_adam_range = fa_isa_table[isa].adam;
    fa_finite_range = fa_isa_table[isa].finite;
    fa_sumsq_range = fa_isa_table[isa].sumsq;
    fa_isa_in_use = isa;
    return isa;
}
