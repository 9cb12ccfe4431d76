// What one step of one tensor is: its buffers, its variant's option bits and
// its per-step scalars.  The scalars' record is FA_STEP_SCALARS, in the order
// of fastadam/_step.py's StepScalars (checked at import through
// FA_STEP_SCALAR_NAMES); the option bits are checked there too.
#pragma once

#include <math.h>
#include <stdint.h>
#include <type_traits>

// glibc 2.29 gave pow a second symbol version, the same function without the
// old SVID error wrapper (which only acts on errors: beta**t never has one).
// Binding the original version keeps the kernel loadable on older glibc, and
// so the wheel's manylinux tag (docs/building.md); the results are the same.
// (The original version is each architecture's first: 2.2.5 on x86-64, 2.17 on aarch64.)
#if defined(__GLIBC__) && defined(__x86_64__)
__asm__(".symver pow,pow@GLIBC_2.2.5");
#elif defined(__GLIBC__) && defined(__aarch64__)
__asm__(".symver pow,pow@GLIBC_2.17");
#endif

enum fa_weight_decay { FA_WD_NONE = 0, FA_WD_L2 = 1, FA_WD_DECOUPLED = 2 };
// Element dtypes of parameters and gradients (fa_params.hpp's formats).
// The element dtypes, each with its NumPy name and its width in bits: enum
// fa_dtype (FA_FLOAT32, ...), and the names by which the plan finds a NumPy
// array's code (FA_DTYPE_NAMES, src/_kernel.pyx).  A dtype narrower than 32 bits
// is a low-precision one: its math is float32, with float32 gradients allowed.
#define FA_DTYPES(X) X(FLOAT32, float32, 32) X(FLOAT64, float64, 64) X(BFLOAT16, bfloat16, 16) \
    X(FLOAT16, float16, 16)
#define FA_DTYPE_CODE(code, name, bits) FA_##code,
enum fa_dtype { FA_DTYPES(FA_DTYPE_CODE) FA_N_DTYPES };
#undef FA_DTYPE_CODE
#define FA_DTYPE_NAME(code, name, bits) #name " "
static const char FA_DTYPE_NAMES[] = FA_DTYPES(FA_DTYPE_NAME);
#undef FA_DTYPE_NAME
#define FA_DTYPE_BITS(code, name, bits) bits,
static const int fa_dtype_bits[FA_N_DTYPES] = {FA_DTYPES(FA_DTYPE_BITS)};
#undef FA_DTYPE_BITS
static inline int fa_is_low_precision(int code) {
    return code >= 0 && code < FA_N_DTYPES && fa_dtype_bits[code] < 32;
}
// How a parameter is updated (fa_params.hpp's policies): in place, rounded to
// nearest (float32 and float64 need no rounding) or stochastically (bfloat16);
// as split bfloat16 master weights; or from a float32 master in the state.
enum fa_param_mode { FA_PARAM_NEAREST = 0, FA_PARAM_STOCHASTIC = 1, FA_PARAM_SPLIT = 2, FA_PARAM_MASTER = 3 };
// How m, v (and v^) are stored: in the parameter's dtype, as bfloat16 bits, or
// as 8-bit codes with a float32 absmax per block.
enum fa_storage_kind { FA_STORAGE_NATIVE = 0, FA_STORAGE_BF16 = 1, FA_STORAGE_INT8 = 2 };

// A variant's code: bits 0-1 its weight-decay mode (enum fa_weight_decay), then
// one bit per option flag, in the order of FA_FLAGS: the parameter groups' keys,
// fastadam._step.FLAGS (checked at import).  X(NAME, key, COMPILED): a flag the
// loops read at run time (COMPILED 0, a new flag's default) is a branch-free or
// loop-invariant test in fa_rule.hpp and adds no loop to the build; a compiled
// one (COMPILED 1) is a template argument, each of its codes its own loop, which
// doubles the loops and the build's time.  amsgrad is compiled: it adds a state
// buffer, so its loops read and write other memory (a run-time test there would
// stop GCC vectorising them).  A new flag is a row here and its math in fa_rule.hpp.
#define FA_FLAGS(X) X(AMSGRAD, amsgrad, 1) X(MAXIMIZE, maximize, 0) X(EPS_HAT, eps_hat, 0)
#define FA_FLAG_POSITION(NAME, key, compiled) FA_POSITION_##NAME,
enum { FA_FLAGS(FA_FLAG_POSITION) FA_N_FLAGS };
#undef FA_FLAG_POSITION
#define FA_FLAG_BIT(NAME, key, compiled) FA_##NAME = 4 << FA_POSITION_##NAME,
// FA_N_VARIANTS: the number of codes; FA_COMPILED_BITS: the bits every row compiles.
enum fa_option_bits { FA_WD_MASK = 3, FA_FLAGS(FA_FLAG_BIT) FA_N_VARIANTS = 4 << FA_N_FLAGS };
#undef FA_FLAG_BIT
#define FA_FLAG_IF_COMPILED(NAME, key, compiled) | ((compiled) ? FA_##NAME : 0)
enum { FA_COMPILED_BITS = FA_WD_MASK FA_FLAGS(FA_FLAG_IF_COMPILED) };
#undef FA_FLAG_IF_COMPILED
#define FA_FLAG_KEY(NAME, key, compiled) #key " "
static const char FA_FLAG_KEYS[] = FA_FLAGS(FA_FLAG_KEY);
#undef FA_FLAG_KEY
#define FA_FLAG_VALUE(NAME, key, compiled) FA_##NAME,
static const int fa_flag_bits[FA_N_FLAGS] = {FA_FLAGS(FA_FLAG_VALUE)};
#undef FA_FLAG_VALUE
// Whether variant code V has flag F (a template argument's test).
static constexpr bool fa_has(int v, int f) { return (v & f) != 0; }

// The per-step scalars, computed once per step in double (fa_set_step) and
// rounded once to the loop's type (fa_scalars).
#define FA_STEP_SCALARS(X) \
    X(beta1) X(one_minus_beta1) X(beta2) X(one_minus_beta2) X(eps) X(weight_decay) \
    X(decay) X(step_size) X(inv_sqrt_bc2) X(sqrt_bc2) X(grad_scale)
#define FA_NAME_STRING(name) #name " "
static const char FA_STEP_SCALAR_NAMES[] = FA_STEP_SCALARS(FA_NAME_STRING);
#define FA_COUNT_ONE(name) +1
enum { FA_N_STEP_SCALARS = 0 FA_STEP_SCALARS(FA_COUNT_ONE) };

// One tensor's work: its buffers and its per-step scalars (all in double).
typedef struct {
    void *param;
    const void *grad;
    void *exp_avg;
    void *exp_avg_sq;
    void *max_exp_avg_sq;  // NULL unless amsgrad
    int64_t numel;
    int dtype;             // enum fa_dtype: the parameter's
    int grad_dtype;        // enum fa_dtype: the gradient's
    int param_mode;        // enum fa_param_mode
    void *master;          // the state's master weights (float32, or split's low halves); NULL if none
    int variant;           // its code: weight-decay mode | flags
#define FA_DOUBLE_FIELD(name) double name;
    FA_STEP_SCALARS(FA_DOUBLE_FIELD)
#undef FA_DOUBLE_FIELD
    int storage;           // enum fa_storage_kind: how m, v (and v^) are stored
    uint32_t keys[4];      // stochastic rounding: the keys of m, v, v^ (bfloat16 state) and p (fastadam._formats)
    float *absmax[3];      // 8-bit state: the per-block absmax of m, v, v^ (NULL if unused)
    double max_update;     // 8-bit state: the clamp on the update's Adam term (10 lr)
} fa_item;

// The scalars of fastadam._step.step_scalars for taking step number `step`
// (counting from 1) with the item's variant (set first), and the 8-bit guard's
// clamp (max_update_in_lr * lr).  eps_hat is all here: the bias correction of v
// moves into the step size, and the rules divide by 1.
static inline void fa_set_step(fa_item *it, double lr, double beta1, double beta2, double eps,
                               double weight_decay, int64_t step, double max_update_in_lr) {
    const double bc1 = 1.0 - pow(beta1, (double)step);
    const double bc2 = 1.0 - pow(beta2, (double)step);
    it->beta1 = beta1;
    it->one_minus_beta1 = 1.0 - beta1;
    it->beta2 = beta2;
    it->one_minus_beta2 = 1.0 - beta2;
    it->eps = eps;
    it->weight_decay = weight_decay;
    it->decay = 1.0 - lr * weight_decay;
    const bool eps_hat = (it->variant & FA_EPS_HAT) != 0;
    it->step_size = eps_hat ? lr * sqrt(bc2) / bc1 : lr / bc1;
    it->inv_sqrt_bc2 = eps_hat ? 1.0 : 1.0 / sqrt(bc2);
    it->sqrt_bc2 = eps_hat ? 1.0 : sqrt(bc2);
    it->grad_scale = 1.0;
    it->max_update = max_update_in_lr * lr;
}

// The item's scalars in record order, into out[0, FA_N_STEP_SCALARS).
static inline void fa_get_step(const fa_item *it, double *out) {
    int k = 0;
#define FA_COPY_OUT(name) out[k++] = it->name;
    FA_STEP_SCALARS(FA_COPY_OUT)
#undef FA_COPY_OUT
}

// The scalars rounded once to the loop's type T.
template <typename T>
struct fa_scalars {
#define FA_T_FIELD(name) T name;
    FA_STEP_SCALARS(FA_T_FIELD)
#undef FA_T_FIELD
    fa_scalars() = default;
    // The step's variant code, for the flags the loops read at run time (fa_on);
    // maximize as a mask: its sign bit, or zero, XORed into the gradient (fa_rule.hpp).
    int variant;
    typename std::conditional<sizeof(T) == 8, uint64_t, uint32_t>::type maximize;
#define FA_ROUND(name) name = (T)it.name;
    explicit fa_scalars(const fa_item &it) {
        FA_STEP_SCALARS(FA_ROUND)
        variant = it.variant;
        maximize = (it.variant & FA_MAXIMIZE) ? (decltype(maximize))1 << (8 * sizeof(maximize) - 1) : 0;
    }
#undef FA_ROUND
};

// A loop's template argument VARIANT: the code of the flags it compiles (the bits
// below FA_N_VARIANTS), and, above them, which flags those are (fa_loop_code): the
// loops of a table row compile FA_COMPILED_BITS and may compile more
// (fa_dispatch.hpp's fa_row).
static constexpr int fa_loop_code(int code, int compiled) { return code | compiled * FA_N_VARIANTS; }
static constexpr bool fa_compiles(int loop, int f) { return ((loop / FA_N_VARIANTS) & f) != 0; }

// Whether flag F is on in a step run by loop VARIANT: a constant where the loop
// compiles F, else the step's own bit (the same in every element, so the test
// is loop-invariant).
template <int F, int VARIANT, typename S>
static inline __attribute__((always_inline)) bool fa_on(const S &s) {
    if constexpr (fa_compiles(VARIANT, F)) return fa_has(VARIANT, F);
    else return (s.variant & F) != 0;
}
