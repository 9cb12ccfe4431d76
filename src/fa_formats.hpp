// The state's storage formats: bfloat16 with stochastic rounding, and blockwise
// 8-bit codes (fastadam/_formats.py states both; the constants are checked
// against it at import).
#pragma once

#include <stdint.h>
#include <string.h>

#include "fa_step.hpp"

// The state's storage.  Native: the parameter's dtype.  bfloat16 (float32
// parameters only): the upper 16 bits of the float32 value, decoded exactly and
// stored with stochastic rounding (fastadam/_reference.py says why and how):
// 16 random bits are added below the kept bits before truncating; a NaN stays a
// (quiet) NaN.  Element i's random bits are r = (lo(i) ^ hi(i)*C ^ key) * K:
// the key is a full hash of (seed, tensor, step), so for each element r is
// uniform (multiplying by the odd K is a bijection) and independent from step
// to step, which is all stochastic rounding needs; m takes r's low half, v its
// high half (independent halves of a uniform word), AMSGrad's v^ the low half
// of a second stream.
static inline __attribute__((always_inline)) uint32_t fa_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}
#define FA_INDEX_HI_MULTIPLIER 0x9e3779b9u
#define FA_ROUNDING_MULTIPLIER 0x9e3779b1u

template <typename T, int STORAGE> struct fa_storage {
    typedef T stored;
    static inline __attribute__((always_inline)) T load(const stored *a, int64_t i) { return a[i]; }
    static inline __attribute__((always_inline)) void store(stored *a, int64_t i, T x, uint32_t) { a[i] = x; }
};

template <> struct fa_storage<float, FA_STORAGE_BF16> {
    typedef uint16_t stored;
    static inline __attribute__((always_inline)) float load(const stored *a, int64_t i) {
        const uint32_t bits = (uint32_t)a[i] << 16;
        float x;
        memcpy(&x, &bits, sizeof x);
        return x;
    }
    static inline __attribute__((always_inline)) void store(stored *a, int64_t i, float x, uint32_t random16) {
        uint32_t bits;
        memcpy(&bits, &x, sizeof bits);
        const uint32_t nan = (bits & 0x7fffffffu) > 0x7f800000u;
        a[i] = (uint16_t)(nan ? ((bits >> 16) | 0x0040u) : ((bits + random16) >> 16));
    }
};

// State kept in a low-precision parameter's own format F (fa_params.hpp),
// rounded to nearest: torch's semantics for bfloat16 and float16 parameters.
template <typename F> struct fa_storage_in {
    typedef typename F::held stored;
    static inline __attribute__((always_inline)) float load(const stored *a, int64_t i) { return F::load(a, i); }
    static inline __attribute__((always_inline)) void store(stored *a, int64_t i, float x, uint32_t) { a[i] = F::nearest(x); }
};

// Blockwise 8-bit state: the codes are small floating-point formats of
// value / absmax, stated in fastadam/_reference.py (the constants are checked
// against it at import, by _kernel.INT8_FORMAT).
#define FA_INT8_BLOCK 256
#define FA_INT8_FRACTION_BITS 3
#define FA_INT8_SIGNED_EXPONENT_OFFSET 15
#define FA_INT8_UNSIGNED_EXPONENT_OFFSET 31
#define FA_INT8_ABSMAX_LIMIT 0x1p126f

template <bool SIGNED>
struct fa_int8_format {
    static constexpr uint32_t exponent_offset =
        SIGNED ? FA_INT8_SIGNED_EXPONENT_OFFSET : FA_INT8_UNSIGNED_EXPONENT_OFFSET;
    static constexpr uint32_t magnitude_mask = SIGNED ? 0x7fu : 0xffu;
    static constexpr int shift = 23 - FA_INT8_FRACTION_BITS;
    // float32 bits of magnitude k, less k's own bits (k << shift)
    static constexpr uint32_t bits_base = (127u - exponent_offset) << FA_INT8_FRACTION_BITS;
    // Rounding works on y = value / absmax's bits (non-negative floats order as
    // their bits do).  The bits of 1.0, the top code's magnitude:
    static constexpr uint32_t one = 0x3f800000u;
    // half the smallest magnitude: 2^-E * 0.5625 = 2^(-E-1) * (1 + 1/8)
    static constexpr uint32_t half_smallest = ((bits_base - 8u) << shift) + (1u << 20);
    // k = round(magnitude bits >> shift) - bits_base, as one add and an arithmetic shift
    static constexpr int32_t rounding_bias = (int32_t)(1u << (shift - 1)) - (int32_t)(bits_base << shift);
};
// A code's bits are (k + bits_base) << shift; k's bits and bits_base's do not
// overlap, so the sum is an OR (the AVX-512 decoding relies on it).
static_assert(((fa_int8_format<true>::bits_base << fa_int8_format<true>::shift) &
               (0x7fu << fa_int8_format<true>::shift)) == 0, "signed map: k and bits_base overlap");
static_assert(((fa_int8_format<false>::bits_base << fa_int8_format<false>::shift) &
               (0xffu << fa_int8_format<false>::shift)) == 0, "unsigned map: k and bits_base overlap");

// A code's value, relative to its block's absmax.
template <bool SIGNED>
static inline __attribute__((always_inline)) float fa_int8_decode(uint8_t code) {
    typedef fa_int8_format<SIGNED> F;
    // m's codes are read sign-extended, so the sign bit lands in bit 31.
    const uint32_t c = SIGNED ? (uint32_t)(int32_t)(int8_t)code : (uint32_t)code;
    const uint32_t k = c & F::magnitude_mask;
    uint32_t bits = (k + F::bits_base) << F::shift;
    bits = k != 0 ? bits : 0u;
    if (SIGNED) bits |= c & 0x80000000u;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

// |x|'s bits.  The largest magnitude of a block (NaN ignored) is an integer max
// of these (non-negative floats order as their bits do), which vectorises where
// a float max reduction would not without -ffast-math.  In these bits a NaN
// exceeds +inf: the update loop takes the plain max, and fa_ignore_nan scans
// again only a block that holds a NaN.
#define FA_INF_BITS 0x7f800000u

static inline __attribute__((always_inline)) uint32_t fa_magnitude_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits & 0x7fffffffu;
}

// `largest`, the max of fa_magnitude_bits over values[0, n); if that is a NaN's,
// the largest of the others.
static inline uint32_t fa_ignore_nan(uint32_t largest, const float *values, int64_t n) {
    if (largest <= FA_INF_BITS) return largest;
    largest = 0;
    for (int64_t j = 0; j < n; ++j) {
        const uint32_t bits = fa_magnitude_bits(values[j]);
        largest = bits <= FA_INF_BITS && bits > largest ? bits : largest;
    }
    return largest;
}

// A block's new absmax, from the bits of its largest magnitude: capped and
// stored; returns 1 / absmax (0 for an all-zero block), which maps the block
// onto [-1, 1].
static inline __attribute__((always_inline)) float fa_int8_set_absmax(uint32_t largest_bits, float *absmax) {
    float largest;
    memcpy(&largest, &largest_bits, sizeof largest);
    largest = largest < FA_INT8_ABSMAX_LIMIT ? largest : FA_INT8_ABSMAX_LIMIT;
    *absmax = largest;
    return largest > 0.0f ? 1.0f / largest : 0.0f;
}

// Requantize n values: the nearest code of each value * inverse, |y| capped
// at 1 (NaN -> 1), by rounding y's float32 bits (one vectorised loop).
template <bool SIGNED>
static inline __attribute__((always_inline)) void
fa_int8_store_block(const float *__restrict__ values, int64_t n, float inverse, uint8_t *__restrict__ codes) {
    typedef fa_int8_format<SIGNED> F;
    // Integer operations on y's bits only: a float compare in the loop keeps GCC
    // from vectorising it.
    for (int64_t j = 0; j < n; ++j) {
        const float y = values[j] * inverse;
        uint32_t bits;
        memcpy(&bits, &y, sizeof bits);
        uint32_t magnitude = bits & 0x7fffffffu;
        magnitude = magnitude < F::one ? magnitude : F::one;  // NaN, inf -> 1
        const int32_t k = ((int32_t)magnitude + F::rounding_bias) >> F::shift;
        // k >= 1 implies magnitude >= half_smallest; below the smallest code, round to it or to 0
        uint32_t code = magnitude >= F::half_smallest ? (uint32_t)(k > 1 ? k : 1) : 0u;
        if (SIGNED) code |= (bits >> 24) & 0x80u;
        codes[j] = (uint8_t)code;
    }
}
