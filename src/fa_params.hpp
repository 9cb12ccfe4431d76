// Element formats (how a parameter, a gradient or a state element is held in
// memory) and parameter policies (how the loop reads p and writes it back).
// fastadam/_formats.py states the formats; a new parameter dtype is a format
// here, a policy if it needs its own, and a row in fa_dispatch.hpp's table.
#pragma once

#include <stdint.h>
#include <string.h>

#include "fa_step.hpp"

static inline __attribute__((always_inline)) uint32_t fa_bits_of(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return b;
}
static inline __attribute__((always_inline)) float fa_float_of(uint32_t b) {
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
}

// A format: its memory type `held`, its code (enum fa_dtype), the type the
// loop computes in (`value`), an exact load, and rounding to nearest even.
struct fa_f32 {
    typedef float held;
    typedef float value;
    static constexpr int code = FA_FLOAT32;
    typedef uint32_t bits;  // magnitude mask and +inf's bits: the finiteness check's
    static constexpr bits magnitude = 0x7fffffffu, inf = 0x7f800000u;
    static inline __attribute__((always_inline)) float load(const held *a, int64_t i) { return a[i]; }
    static inline __attribute__((always_inline)) held nearest(float x) { return x; }
};
struct fa_f64 {
    typedef double held;
    typedef double value;
    static constexpr int code = FA_FLOAT64;
    typedef uint64_t bits;
    static constexpr bits magnitude = 0x7fffffffffffffffull, inf = 0x7ff0000000000000ull;
    static inline __attribute__((always_inline)) double load(const held *a, int64_t i) { return a[i]; }
    static inline __attribute__((always_inline)) held nearest(double x) { return x; }
};
// bfloat16: the upper half of a float32.  Rounded to nearest even, a NaN stays a
// quiet NaN of its sign (the state format's rule, fastadam._formats.bf16_round_nearest).
struct fa_bf16 {
    typedef uint16_t held;
    typedef float value;
    static constexpr int code = FA_BFLOAT16;
    typedef uint16_t bits;
    static constexpr bits magnitude = 0x7fffu, inf = 0x7f80u;
    static inline __attribute__((always_inline)) float load(const held *a, int64_t i) {
        return fa_float_of((uint32_t)a[i] << 16);
    }
    static inline __attribute__((always_inline)) held nearest(float x) {
        const uint32_t b = fa_bits_of(x);
        const uint32_t nan = (b & 0x7fffffffu) > 0x7f800000u;
        return (uint16_t)(nan ? ((b >> 16) | 0x0040u) : ((b + 0x7fffu + ((b >> 16) & 1u)) >> 16));
    }
    // Stochastic: 16 random bits added below the kept bits, then truncated.
    static inline __attribute__((always_inline)) held stochastic(float x, uint32_t random16) {
        const uint32_t b = fa_bits_of(x);
        const uint32_t nan = (b & 0x7fffffffu) > 0x7f800000u;
        return (uint16_t)(nan ? ((b >> 16) | 0x0040u) : ((b + random16) >> 16));
    }
};
// IEEE binary16, converted with integer operations (and one exact float
// operation each way for subnormals), which GCC vectorizes on every ISA: its
// _Float16 conversions it does not (F. Giesen's method).  Rounding is to
// nearest even; a NaN stays a NaN of its sign (quiet, payload dropped).
struct fa_f16 {
    typedef uint16_t held;
    typedef float value;
    static constexpr int code = FA_FLOAT16;
    typedef uint16_t bits;
    static constexpr bits magnitude = 0x7fffu, inf = 0x7c00u;
    static inline __attribute__((always_inline)) float load(const held *a, int64_t i) {
        const uint32_t h = a[i];
        const uint32_t shifted = (h & 0x7fffu) << 13;      // exponent and fraction in float32's place
        const uint32_t exponent = shifted & (0x7c00u << 13);
        uint32_t b = shifted + ((127u - 15u) << 23);        // rebias
        b += exponent == (0x7c00u << 13) ? (128u - 16u) << 23 : 0u;  // inf, NaN: float32's top exponent
        // subnormal (or zero): 2^-14 * (1 + f) less 2^-14, exact
        const float sub = fa_float_of(b + (1u << 23)) - fa_float_of(113u << 23);
        b = exponent == 0 ? fa_bits_of(sub) : b;
        return fa_float_of(b | ((h & 0x8000u) << 16));
    }
    static inline __attribute__((always_inline)) held nearest(float x) {
        uint32_t f = fa_bits_of(x);
        const uint32_t sign = f & 0x80000000u;
        f ^= sign;
        // |x| >= 2^16: inf (or NaN); below 2^-14: a subnormal result, rounded by one
        // float add (x + 0.5 keeps x's bits from 2^-24 up); else round the fraction.
        const uint32_t big = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
        const uint32_t small = fa_bits_of(fa_float_of(f) + 0.5f) - 0x3f000000u;
        const uint32_t normal = (f + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((f >> 13) & 1u)) >> 13;
        const uint32_t h = f >= 0x47800000u ? big : f < (113u << 23) ? small : normal;
        return (uint16_t)(h | (sign >> 16));
    }
};

// Parameter policies.  Each reads element i as `value` and stores the updated
// value; `torch_order` says which order of operations the rule uses
// (fa_rule.hpp), `state_format` the state's format where the state is kept in
// the parameter's own low precision (void: fa_formats.hpp's storage decides).

// p in its own format, updated in place: float32/float64 parameters as they are,
// and bfloat16/float16 parameters with torch's semantics (state in the
// parameter's dtype, math in float32, rounded to nearest; or, for bfloat16,
// the parameter rounded stochastically: STOCHASTIC).
template <typename F, bool STOCHASTIC = false>
struct fa_param_plain {
    typedef typename F::value value;
    static constexpr bool low_precision = sizeof(typename F::held) == 2;
    static constexpr bool torch_order = low_precision;
    static constexpr bool stochastic = STOCHASTIC;
    static constexpr int dtype = F::code;
    static constexpr int mode = STOCHASTIC ? FA_PARAM_STOCHASTIC : FA_PARAM_NEAREST;
    typedef F format;
    typename F::held *__restrict__ p;
    explicit fa_param_plain(const fa_item &it) : p((typename F::held *)it.param) {}
    inline __attribute__((always_inline)) value load(int64_t i) const { return F::load(p, i); }
    inline __attribute__((always_inline)) void store(int64_t i, value x, uint32_t random16) {
        if constexpr (STOCHASTIC) p[i] = F::stochastic(x, random16);
        else p[i] = F::nearest(x);
    }
};

// bfloat16 parameters with split master weights: p holds the upper 16 bits of a
// float32 master and the state's `master` buffer its lower 16 bits; the step
// updates the float32 master exactly as a float32 parameter, and writes both
// halves back (the parameter is the master truncated to bfloat16).
struct fa_param_split {
    typedef float value;
    static constexpr bool low_precision = true;
    static constexpr bool torch_order = false;
    static constexpr bool stochastic = false;
    static constexpr int dtype = FA_BFLOAT16;
    static constexpr int mode = FA_PARAM_SPLIT;
    typedef fa_f32 format;
    uint16_t *__restrict__ high;
    uint16_t *__restrict__ low;
    explicit fa_param_split(const fa_item &it) : high((uint16_t *)it.param), low((uint16_t *)it.master) {}
    inline __attribute__((always_inline)) float load(int64_t i) const {
        return fa_float_of(((uint32_t)high[i] << 16) | low[i]);
    }
    inline __attribute__((always_inline)) void store(int64_t i, float x, uint32_t) {
        const uint32_t b = fa_bits_of(x);
        high[i] = (uint16_t)(b >> 16);
        low[i] = (uint16_t)b;
    }
};

// Low-precision parameters with a float32 master in the state: the master is
// updated as a float32 parameter, and p is written from it, rounded to nearest.
template <typename F>
struct fa_param_master {
    typedef float value;
    static constexpr bool low_precision = true;
    static constexpr bool torch_order = false;
    static constexpr bool stochastic = false;
    static constexpr int dtype = F::code;
    static constexpr int mode = FA_PARAM_MASTER;
    typedef fa_f32 format;
    typename F::held *__restrict__ p;
    float *__restrict__ master;
    explicit fa_param_master(const fa_item &it) : p((typename F::held *)it.param), master((float *)it.master) {}
    inline __attribute__((always_inline)) float load(int64_t i) const { return master[i]; }
    inline __attribute__((always_inline)) void store(int64_t i, float x, uint32_t) {
        master[i] = x;
        p[i] = F::nearest(x);
    }
};

// float32 parameters updated in torch's order with float32 state: the loop a
// float16 block runs on once staged into float32 (fa_adam_f16_staged).
struct fa_param_torch_f32 : fa_param_plain<fa_f32> {
    static constexpr bool torch_order = true;
    explicit fa_param_torch_f32(const fa_item &it) : fa_param_plain<fa_f32>(it) {}
};
