// The fused Adam/AdamW update: one pass that reads p, g, m, v (and v_max) once
// and writes p, m, v (and v_max) once, with no temporaries.
//
// Per element, in this exact order (every operation rounded in T; the
// scalars are computed once per step in double and rounded to T once):
//
//   g  = g * c                            (c: gradient clipping's coefficient, 1 when off)
//   g  = maximize ? -g : g
//   g  = g + wd * p                       (Adam, L2 weight decay)
//   p  = p * (1 - lr*wd)                  (AdamW, decoupled weight decay)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * (g * g)
//   vm = max(vm, v)                       (AMSGrad; the denominator uses vm)
//   d  = sqrt(v) * (1 / sqrt(bc2)) + eps  (bc2 = 1 - beta2^step)
//   p  = p - (lr / bc1) * (m / d)         (bc1 = 1 - beta1^step)
//
// under the flush-to-zero rule of fastadam/_reference.py (its docstring states
// it): every loop runs with the FTZ and DAZ bits of MXCSR set (fa_run_share),
// so no operation reads or produces a subnormal number and none is stored.  A
// subnormal is a ~100-cycle microcode assist per operation: measured, an MNIST
// MLP step slowed 4x as 3% of m decayed through the subnormal range, and a 1M
// step with subnormal gradients took 6.9 ms instead of 0.95 ms.  MXCSR is
// per thread and restored after the loop, so nothing else in the process sees
// the change.  The only value that passes from memory to memory without an
// arithmetic operation is vm's old value through max(); it is flushed by a
// compare and select, which DAZ evaluates as the arithmetic would.
//
// The build uses -ffp-contract=off, so no multiply-add is fused: the vector
// main loop, its scalar tail and the NumPy reference (fastadam/_reference.py)
// then round identically, and results are bitwise independent of the
// instruction set and of how the elements are split between threads.
//
// Where the state is 8-bit (fa_adam_int8_loop), the kernel works block by block
// and clamps the update's Adam term to +-10 lr: fastadam/_reference.py states
// the maps, the quantization and why.
//
// Compressed state's steps are bound by instructions more than by memory, so
// on AVX-512 they run paths written with intrinsics (fa_int8_blocks_avx512,
// fa_bf16_range_avx512): the same operations in the same order, in fewer
// instructions than GCC's vectorisation of the generic loops finds.
//
// Weight-decay mode, AMSGrad, maximize and the state's storage (native,
// bfloat16 or 8-bit) are template parameters: each variant is its own loop with no
// branch inside.  Each variant is
// compiled three times, for baseline x86-64 (SSE2), AVX2 and AVX-512; the
// widest one the CPU and OS support is picked once at import time
// (fa_select_isa), or forced with FASTADAM_ISA.  The AVX-512 variant uses
// 512-bit vectors: half the instructions of 256-bit code, which matters where
// the state is compressed and decoding and rounding add integer work (on an
// AMD EPYC (Zen 4), against 256-bit code: 64K parameters, one thread, bfloat16
// state 1.3x faster and float32 unchanged; 16M, two threads, float32 1.16x).
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

enum fa_weight_decay { FA_WD_NONE = 0, FA_WD_L2 = 1, FA_WD_DECOUPLED = 2 };
enum fa_dtype { FA_FLOAT32 = 0, FA_FLOAT64 = 1 };
enum fa_isa { FA_ISA_BASELINE = 0, FA_ISA_AVX2 = 1, FA_ISA_AVX512 = 2 };
// How m, v (and v^) are stored: in the parameter's dtype, as bfloat16 bits, or
// as 8-bit codes with a float32 absmax per block.
enum fa_state { FA_STATE_NATIVE = 0, FA_STATE_BF16 = 1, FA_STATE_INT8 = 2 };

// Variant code: bits 0-1 weight-decay mode, bit 2 amsgrad, bit 3 maximize; the
// state storage (enum fa_state) is a separate field of the item.
#define FA_VARIANT(wd, amsgrad, maximize) ((wd) | ((amsgrad) << 2) | ((maximize) << 3))
#define FA_N_VARIANTS 12

// One tensor's work: its buffers and its per-step scalars (all in double).
typedef struct {
    void *param;
    const void *grad;
    void *exp_avg;
    void *exp_avg_sq;
    void *max_exp_avg_sq;  // NULL unless amsgrad
    int64_t numel;
    int dtype;             // enum fa_dtype
    int variant;           // FA_VARIANT(...)
    double beta1, one_minus_beta1, beta2, one_minus_beta2;
    double eps, weight_decay, decay, step_size, inv_sqrt_bc2;
    double grad_scale;     // gradient clipping's coefficient (1 when off)
    int state;             // enum fa_state
    uint32_t keys[3];      // bfloat16 state: the rounding key of m, v, v^ (fastadam._reference)
    float *absmax[3];      // 8-bit state: the per-block absmax of m, v, v^ (NULL if unused)
    double max_update;     // 8-bit state: the clamp on the update's Adam term (10 lr)
} fa_item;

template <typename T>
struct fa_scalars {
    T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay,
        step_size, inv_sqrt_bc2, grad_scale;
    explicit fa_scalars(const fa_item &it)
        : beta1((T)it.beta1), one_minus_beta1((T)it.one_minus_beta1),
          beta2((T)it.beta2), one_minus_beta2((T)it.one_minus_beta2),
          eps((T)it.eps), weight_decay((T)it.weight_decay), decay((T)it.decay),
          step_size((T)it.step_size), inv_sqrt_bc2((T)it.inv_sqrt_bc2),
          grad_scale((T)it.grad_scale) {}
};

static inline __attribute__((always_inline)) float fa_sqrt(float x) { return __builtin_sqrtf(x); }
static inline __attribute__((always_inline)) double fa_sqrt(double x) { return __builtin_sqrt(x); }
static inline __attribute__((always_inline)) float fa_abs(float x) { return __builtin_fabsf(x); }
static inline __attribute__((always_inline)) double fa_abs(double x) { return __builtin_fabs(x); }
static inline __attribute__((always_inline)) float fa_signed_zero(float x) { return __builtin_copysignf(0.0f, x); }
static inline __attribute__((always_inline)) double fa_signed_zero(double x) { return __builtin_copysign(0.0, x); }
// -x as the reference computes it: the sign bit flipped, a NaN's too.  GCC
// treats a NaN's sign as unspecified and folds -(g * c) into g * -c, which
// keeps the gradient NaN's sign; an integer XOR it leaves alone.
template <typename T>
static inline __attribute__((always_inline)) T fa_flip_sign(T x) {
    typedef typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type Bits;
    Bits bits;
    memcpy(&bits, &x, sizeof bits);
    bits ^= (Bits)1 << (8 * sizeof(Bits) - 1);
    memcpy(&x, &bits, sizeof x);
    return x;
}
template <typename T> struct fa_min_normal;
template <> struct fa_min_normal<float> { static constexpr float value = __FLT_MIN__; };
template <> struct fa_min_normal<double> { static constexpr double value = __DBL_MIN__; };

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

template <typename T, int STATE> struct fa_storage {
    typedef T stored;
    static inline __attribute__((always_inline)) T load(const stored *a, int64_t i) { return a[i]; }
    static inline __attribute__((always_inline)) void store(stored *a, int64_t i, T x, uint32_t) { a[i] = x; }
};

template <> struct fa_storage<float, FA_STATE_BF16> {
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

// One block of n elements of a tensor with 8-bit state, starting at element
// b0: decoded, updated and requantized while its m and v wait in L1-resident
// buffers, so memory is read and written once.
template <int WD, bool AMSGRAD, bool MAXIMIZE>
static inline __attribute__((always_inline)) void
fa_int8_block(const fa_item &it, const fa_scalars<float> &s, int64_t b0, int64_t n) {
    const float max_update = (float)it.max_update;
    const int64_t block = b0 / FA_INT8_BLOCK;
    const float scale_m = it.absmax[0][block], scale_v = it.absmax[1][block];
    const float scale_vmax = AMSGRAD ? it.absmax[2][block] : 0.0f;
    float *__restrict__ pb = (float *)it.param + b0;
    const float *__restrict__ gb = (const float *)it.grad + b0;
    uint8_t *__restrict__ mb = (uint8_t *)it.exp_avg + b0;
    uint8_t *__restrict__ vb = (uint8_t *)it.exp_avg_sq + b0;
    uint8_t *__restrict__ vmaxb = AMSGRAD ? (uint8_t *)it.max_exp_avg_sq + b0 : nullptr;
    alignas(64) float bm[FA_INT8_BLOCK], bv[FA_INT8_BLOCK], bvmax[FA_INT8_BLOCK];
    uint32_t largest_m = 0, largest_v = 0, largest_vmax = 0;  // fa_magnitude_bits
    for (int64_t j = 0; j < n; ++j) {  // decode, update, absmax (vectorised)
        float gi = gb[j] * s.grad_scale;
        gi = MAXIMIZE ? fa_flip_sign(gi) : gi;
        float pi = pb[j];
        if (WD == FA_WD_L2) gi = gi + s.weight_decay * pi;
        if (WD == FA_WD_DECOUPLED) pi = pi * s.decay;
        const float mi = s.beta1 * (fa_int8_decode<true>(mb[j]) * scale_m) + s.one_minus_beta1 * gi;
        const float vi = s.beta2 * (fa_int8_decode<false>(vb[j]) * scale_v)
                         + s.one_minus_beta2 * (gi * gi);
        float vd = vi;
        if (AMSGRAD) {
            const float old = fa_int8_decode<false>(vmaxb[j]) * scale_vmax;
            vd = (old > vi || old != old) ? old : vi;  // np.maximum: a NaN wins, a tie takes v
            bvmax[j] = vd;
            const uint32_t bits = fa_magnitude_bits(vd);
            largest_vmax = bits > largest_vmax ? bits : largest_vmax;
        }
        const float denom = fa_sqrt(vd) * s.inv_sqrt_bc2 + s.eps;
        float update = s.step_size * (mi / denom);
        update = update > max_update ? max_update : update;
        update = update < -max_update ? -max_update : update;
        pb[j] = pi - update;
        bm[j] = mi;
        bv[j] = vi;
        const uint32_t bits_m = fa_magnitude_bits(mi), bits_v = fa_magnitude_bits(vi);
        largest_m = bits_m > largest_m ? bits_m : largest_m;
        largest_v = bits_v > largest_v ? bits_v : largest_v;
    }
    fa_int8_store_block<true>(bm, n, fa_int8_set_absmax(fa_ignore_nan(largest_m, bm, n), &it.absmax[0][block]), mb);
    fa_int8_store_block<false>(bv, n, fa_int8_set_absmax(fa_ignore_nan(largest_v, bv, n), &it.absmax[1][block]), vb);
    if (AMSGRAD)
        fa_int8_store_block<false>(
            bvmax, n, fa_int8_set_absmax(fa_ignore_nan(largest_vmax, bvmax, n), &it.absmax[2][block]), vmaxb);
}

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's AVX-512 intrinsics start some results from _mm512_undefined_*, which
// -Wmaybe-uninitialized reports at every use (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FA_AVX512_TARGET \
    __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#define FA_AVX512_INLINE FA_AVX512_TARGET static inline __attribute__((always_inline))

// fa_scalars<float>, in all 16 lanes.
struct fa_vector_scalars {
    __m512 grad_scale, weight_decay, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
        inv_sqrt_bc2;
};

FA_AVX512_INLINE fa_vector_scalars fa_broadcast(const fa_scalars<float> &s) {
    return {_mm512_set1_ps(s.grad_scale), _mm512_set1_ps(s.weight_decay), _mm512_set1_ps(s.decay),
            _mm512_set1_ps(s.beta1),      _mm512_set1_ps(s.one_minus_beta1), _mm512_set1_ps(s.beta2),
            _mm512_set1_ps(s.one_minus_beta2), _mm512_set1_ps(s.eps),     _mm512_set1_ps(s.step_size),
            _mm512_set1_ps(s.inv_sqrt_bc2)};
}

// The update's first lines for 16 elements: g clipped, negated (maximize) and
// with L2 weight decay; p with decoupled weight decay.
template <int WD, bool MAXIMIZE>
FA_AVX512_INLINE void fa_gradient16(const fa_vector_scalars &c, const float *g, const float *p, __m512 &gi,
                                    __m512 &pi) {
    gi = _mm512_mul_ps(_mm512_loadu_ps(g), c.grad_scale);
    if (MAXIMIZE) gi = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gi), _mm512_set1_epi32((int32_t)0x80000000u)));
    pi = _mm512_loadu_ps(p);
    if (WD == FA_WD_L2) gi = _mm512_add_ps(gi, _mm512_mul_ps(c.weight_decay, pi));
    if (WD == FA_WD_DECOUPLED) pi = _mm512_mul_ps(pi, c.decay);
}

// The new m and v of 16 elements from their decoded old values.
FA_AVX512_INLINE void fa_moments16(const fa_vector_scalars &c, __m512 m, __m512 v, __m512 gi, __m512 &mi,
                                   __m512 &vi) {
    mi = _mm512_add_ps(_mm512_mul_ps(c.beta1, m), _mm512_mul_ps(c.one_minus_beta1, gi));
    vi = _mm512_add_ps(_mm512_mul_ps(c.beta2, v), _mm512_mul_ps(c.one_minus_beta2, _mm512_mul_ps(gi, gi)));
}

// AMSGrad's max(old, v) of 16 elements: old > v || old != old ? old : v (a NaN
// wins, a tie takes v).
FA_AVX512_INLINE __m512 fa_amsgrad_max16(__m512 old, __m512 vi) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(old, vi, _CMP_GT_OQ) | _mm512_cmp_ps_mask(old, old, _CMP_UNORD_Q),
                                vi, old);
}

// The Adam term of 16 elements: step_size * (m / (sqrt(vd) * inv_sqrt_bc2 + eps)).
FA_AVX512_INLINE __m512 fa_adam_term16(const fa_vector_scalars &c, __m512 mi, __m512 vd) {
    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vd), c.inv_sqrt_bc2), c.eps);
    return _mm512_mul_ps(c.step_size, _mm512_div_ps(mi, denom));
}

// The top 16-bit word of each of the 32 dwords of (a, b), in order.
FA_AVX512_INLINE __m512i fa_top_words(__m512i a, __m512i b) {
    // word i <- word 2i + 1 of the pair
    return _mm512_permutex2var_epi16(
        a, _mm512_set_epi32(0x003f003d, 0x003b0039, 0x00370035, 0x00330031, 0x002f002d, 0x002b0029, 0x00270025,
                            0x00230021, 0x001f001d, 0x001b0019, 0x00170015, 0x00130011, 0x000f000d, 0x000b0009,
                            0x00070005, 0x00030001),
        b);
}

// fa_int8_decode<true> of 16 codes of m, as bits.
FA_AVX512_INLINE __m512i fa_int8_decode16_signed(const uint8_t *codes) {
    typedef fa_int8_format<true> F;
    // code i to the top byte of lane i (sign in bit 31, k in 24-30), zeros below
    const __m512i top = _mm512_shuffle_epi8(
        _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)codes)),
        _mm512_set_epi32(0x0f808080, 0x0e808080, 0x0d808080, 0x0c808080, 0x0b808080, 0x0a808080,
                         0x09808080, 0x08808080, 0x07808080, 0x06808080, 0x05808080, 0x04808080,
                         0x03808080, 0x02808080, 0x01808080, 0x00808080));
    // k == 0 (a zero of the code's sign, which top already is) stays top.
    // Else k << shift with copies of the sign above it, then those bits but
    // the sign <- bits_base's: (x & ~above) | base.
    const __mmask16 nonzero = _mm512_test_epi32_mask(top, _mm512_set1_epi32(F::magnitude_mask << 24));
    const __m512i x = _mm512_mask_srai_epi32(top, nonzero, top, 24 - F::shift);
    return _mm512_mask_ternarylogic_epi32(x, nonzero, _mm512_set1_epi32(0x7fffffff & ~((0x80u << F::shift) - 1)),
                                          _mm512_set1_epi32(F::bits_base << F::shift), 0xba);
}

// fa_int8_decode<false> of 16 codes of v or v^, as bits.
FA_AVX512_INLINE __m512i fa_int8_decode16_unsigned(const uint8_t *codes) {
    typedef fa_int8_format<false> F;
    const __m512i x = _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes)), F::shift);
    return _mm512_maskz_or_epi32(_mm512_test_epi32_mask(x, x), x, _mm512_set1_epi32(F::bits_base << F::shift));
}

// fa_int8_store_block of 64 values.  The code depends only on the top 16 bits
// of y's (every constant of fa_int8_format's rounding is a multiple of 2^16),
// so the rounding runs on 16-bit words, 32 to a vector.  NON_NEGATIVE: no
// value has its sign bit set but a NaN (v, a sum of non-negative products, and
// v^, the max of v and a decoded v^, whose -0 loses the tie to v's +0), so
// |y|'s bits are y's wherever they decide the code (a NaN's is the top one).
template <bool SIGNED, bool NON_NEGATIVE>
FA_AVX512_INLINE void fa_int8_store64(const float *__restrict__ values, __m512 inverse, uint8_t *__restrict__ codes) {
    typedef fa_int8_format<SIGNED> F;
    static_assert((F::one & 0xffffu) == 0 && (F::half_smallest & 0xffffu) == 0 &&
                  ((uint32_t)F::rounding_bias & 0xffffu) == 0 && F::shift >= 16,
                  "the rounding needs the low 16 bits of y");
    __m512i code[2];
    for (int h = 0; h < 2; ++h) {
        const __m512i y = fa_top_words(_mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(values + 32 * h), inverse)),
                                       _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(values + 32 * h + 16), inverse)));
        __m512i magnitude = NON_NEGATIVE ? y : _mm512_and_si512(y, _mm512_set1_epi16(0x7fff));
        magnitude = _mm512_min_epu16(magnitude, _mm512_set1_epi16((short)(F::one >> 16)));
        const __m512i k = _mm512_srai_epi16(
            _mm512_add_epi16(magnitude, _mm512_set1_epi16((short)(F::rounding_bias >> 16))), F::shift - 16);
        code[h] = _mm512_maskz_max_epi16(
            _mm512_cmpge_epu16_mask(magnitude, _mm512_set1_epi16((short)(F::half_smallest >> 16))), k,
            _mm512_set1_epi16(1));
        if (SIGNED)  // code | ((y >> 8) & 0x80)
            code[h] = _mm512_ternarylogic_epi32(code[h], _mm512_srli_epi16(y, 8), _mm512_set1_epi16(0x80), 0xf8);
    }
    // the pack interleaves the two vectors' lanes eight bytes at a time: back in order
    _mm512_storeu_si512(codes, _mm512_permutexvar_epi64(_mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0),
                                                        _mm512_packus_epi16(code[0], code[1])));
}

// 64 elements of a block's new m, v (and v^), from offset q, into codes.
template <bool AMSGRAD>
FA_AVX512_INLINE void fa_int8_requantize64(const float (*values)[FA_INT8_BLOCK], const __m512 *inverse, int q,
                                           uint8_t *m, uint8_t *v, uint8_t *vmax) {
    fa_int8_store64<true, false>(values[0] + q, inverse[0], m + q);
    fa_int8_store64<false, true>(values[1] + q, inverse[1], v + q);
    if (AMSGRAD) fa_int8_store64<false, true>(values[2] + q, inverse[2], vmax + q);
}

// fa_int8_block over the whole blocks [start, stop), with AVX-512 intrinsics:
// the same operations on the same values in the same order, so the same bits,
// in fewer instructions than GCC's vectorisation of fa_int8_block.  And each
// block's update is interleaved, 64 elements at a time, with the
// requantization of the block before it: the update waits on the divide and
// square-root unit, the requantization on the integer pipes, and the
// interleaving lets them work at once (a block's requantization cannot start
// before its update has found the absmax).
template <int WD, bool AMSGRAD, bool MAXIMIZE>
FA_AVX512_TARGET static void fa_int8_blocks_avx512(const fa_item &it, const fa_scalars<float> &s, int64_t start,
                                                   int64_t stop) {
    const fa_vector_scalars c = fa_broadcast(s);
    const float max_update_scalar = (float)it.max_update;
    const __m512 max_update = _mm512_set1_ps(max_update_scalar), min_update = _mm512_set1_ps(-max_update_scalar);
    const __m512i magnitude_mask = _mm512_set1_epi32(0x7fffffff);
    float *__restrict__ p = (float *)it.param;
    const float *__restrict__ g = (const float *)it.grad;
    uint8_t *__restrict__ m = (uint8_t *)it.exp_avg;
    uint8_t *__restrict__ v = (uint8_t *)it.exp_avg_sq;
    uint8_t *__restrict__ vmax = (uint8_t *)it.max_exp_avg_sq;
    // [block parity][m, v, v^]: a block's new moments, awaiting requantization
    alignas(64) float moments[2][3][FA_INT8_BLOCK];
    __m512 inverse[3] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};  // the awaiting block's 1 / absmax
    int parity = 0;
    for (int64_t b0 = start; b0 < stop; b0 += FA_INT8_BLOCK, parity ^= 1) {
        float *__restrict__ bm = moments[parity][0], *__restrict__ bv = moments[parity][1];
        float *__restrict__ bvmax = moments[parity][2];
        const int64_t block = b0 / FA_INT8_BLOCK;
        const __m512 scale_m = _mm512_set1_ps(it.absmax[0][block]), scale_v = _mm512_set1_ps(it.absmax[1][block]);
        const __m512 scale_vmax = _mm512_set1_ps(AMSGRAD ? it.absmax[2][block] : 0.0f);
        __m512i largest_m = _mm512_setzero_si512(), largest_v = largest_m, largest_vmax = largest_m;
        for (int q = 0; q < FA_INT8_BLOCK; q += 64) {
            for (int j = q; j < q + 64; j += 16) {
                const int64_t i = b0 + j;
                __m512 gi, pi, mi, vi;
                fa_gradient16<WD, MAXIMIZE>(c, g + i, p + i, gi, pi);
                fa_moments16(c, _mm512_mul_ps(_mm512_castsi512_ps(fa_int8_decode16_signed(m + i)), scale_m),
                             _mm512_mul_ps(_mm512_castsi512_ps(fa_int8_decode16_unsigned(v + i)), scale_v), gi, mi, vi);
                __m512 vd = vi;
                if (AMSGRAD) {
                    vd = fa_amsgrad_max16(
                        _mm512_mul_ps(_mm512_castsi512_ps(fa_int8_decode16_unsigned(vmax + i)), scale_vmax), vi);
                    _mm512_store_ps(bvmax + j, vd);
                    largest_vmax = _mm512_max_epu32(largest_vmax, _mm512_castps_si512(vd));  // NON_NEGATIVE
                }
                __m512 update = fa_adam_term16(c, mi, vd);
                update = _mm512_min_ps(max_update, update);  // update > max_update ? max_update : update
                update = _mm512_max_ps(min_update, update);  // update < -max_update ? -max_update : update
                _mm512_storeu_ps(p + i, _mm512_sub_ps(pi, update));
                _mm512_store_ps(bm + j, mi);
                _mm512_store_ps(bv + j, vi);
                largest_m = _mm512_max_epu32(largest_m, _mm512_and_si512(_mm512_castps_si512(mi), magnitude_mask));
                largest_v = _mm512_max_epu32(largest_v, _mm512_castps_si512(vi));  // v: NON_NEGATIVE
            }
            if (b0 > start) {
                const int64_t previous = b0 - FA_INT8_BLOCK;
                fa_int8_requantize64<AMSGRAD>(moments[parity ^ 1], inverse, q, m + previous, v + previous,
                                              AMSGRAD ? vmax + previous : nullptr);
            }
        }
        const int64_t n = FA_INT8_BLOCK;
        inverse[0] = _mm512_set1_ps(
            fa_int8_set_absmax(fa_ignore_nan(_mm512_reduce_max_epu32(largest_m), bm, n), &it.absmax[0][block]));
        inverse[1] = _mm512_set1_ps(
            fa_int8_set_absmax(fa_ignore_nan(_mm512_reduce_max_epu32(largest_v), bv, n), &it.absmax[1][block]));
        if (AMSGRAD)
            inverse[2] = _mm512_set1_ps(fa_int8_set_absmax(
                fa_ignore_nan(_mm512_reduce_max_epu32(largest_vmax), bvmax, n), &it.absmax[2][block]));
    }
    if (stop > start) {
        const int64_t last = stop - FA_INT8_BLOCK;
        for (int q = 0; q < FA_INT8_BLOCK; q += 64)
            fa_int8_requantize64<AMSGRAD>(moments[parity ^ 1], inverse, q, m + last, v + last,
                                          AMSGRAD ? vmax + last : nullptr);
    }
}

// fa_storage<float, FA_STATE_BF16>::load of 16 values.
FA_AVX512_INLINE __m512 fa_bf16_load16(const uint16_t *a) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)a)), 16));
}

// fa_storage<float, FA_STATE_BF16>::store of 16 values, in the top words: the
// random bits added, or a NaN's quiet bit set.
FA_AVX512_INLINE __m512i fa_bf16_round16(__m512 x, __m512i random16) {
    const __m512i bits = _mm512_castps_si512(x);
    return _mm512_mask_or_epi32(_mm512_add_epi32(bits, random16), _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), bits,
                                _mm512_set1_epi32(0x00400000));
}

// fa_adam_loop's bfloat16 path over [start, stop) of one chunk (stop - start a
// multiple of 32), with AVX-512 intrinsics: the same operations in the same
// order, so the same bits, in fewer instructions than GCC's vectorisation
// (which carries the element index in 64 bits and narrows it every step).
template <int WD, bool AMSGRAD, bool MAXIMIZE>
FA_AVX512_TARGET static void fa_bf16_range_avx512(const fa_item &it, const fa_scalars<float> &s, int64_t start,
                                                  int64_t stop, uint32_t key_mv, uint32_t key_vmax) {
    const fa_vector_scalars c = fa_broadcast(s);
    const __m512 min_normal = _mm512_set1_ps(fa_min_normal<float>::value);
    const __m512i sign = _mm512_set1_epi32((int32_t)0x80000000u), magnitude_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512i multiplier = _mm512_set1_epi32((int32_t)FA_ROUNDING_MULTIPLIER);
    const __m512i low_half = _mm512_set1_epi32(0xffff), sixteen = _mm512_set1_epi32(16);
    const __m512i mv_key = _mm512_set1_epi32((int32_t)key_mv), vmax_key = _mm512_set1_epi32((int32_t)key_vmax);
    float *__restrict__ p = (float *)it.param;
    const float *__restrict__ g = (const float *)it.grad;
    uint16_t *__restrict__ m = (uint16_t *)it.exp_avg;
    uint16_t *__restrict__ v = (uint16_t *)it.exp_avg_sq;
    uint16_t *__restrict__ vmax = (uint16_t *)it.max_exp_avg_sq;
    // the elements' indices, mod 2^32
    __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(uint32_t)start),
                                     _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    for (int64_t i = start; i < stop; i += 32) {
        __m512i new_m[2], new_v[2], new_vmax[2];
        for (int h = 0; h < 2; ++h) {
            const int64_t j = i + 16 * h;
            const __m512i r = _mm512_mullo_epi32(_mm512_xor_si512(index, mv_key), multiplier);
            __m512 gi, pi, mi, vi;
            fa_gradient16<WD, MAXIMIZE>(c, g + j, p + j, gi, pi);
            fa_moments16(c, fa_bf16_load16(m + j), fa_bf16_load16(v + j), gi, mi, vi);
            new_m[h] = fa_bf16_round16(mi, _mm512_and_si512(r, low_half));
            new_v[h] = fa_bf16_round16(vi, _mm512_srli_epi32(r, 16));
            __m512 vd = vi;
            if (AMSGRAD) {
                // a subnormal old value flushed to a zero of its sign (DAZ: the compare sees it as zero)
                const __m512 stored = fa_bf16_load16(vmax + j);
                const __mmask16 tiny = _mm512_cmp_ps_mask(
                    _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(stored), magnitude_mask)), min_normal,
                    _CMP_LT_OQ);
                const __m512 old = _mm512_castsi512_ps(
                    _mm512_mask_and_epi32(_mm512_castps_si512(stored), tiny, _mm512_castps_si512(stored), sign));
                vd = fa_amsgrad_max16(old, vi);
                new_vmax[h] = fa_bf16_round16(
                    vd, _mm512_and_si512(_mm512_mullo_epi32(_mm512_xor_si512(index, vmax_key), multiplier), low_half));
            }
            _mm512_storeu_ps(p + j, _mm512_sub_ps(pi, fa_adam_term16(c, mi, vd)));
            index = _mm512_add_epi32(index, sixteen);
        }
        _mm512_storeu_si512(m + i, fa_top_words(new_m[0], new_m[1]));
        _mm512_storeu_si512(v + i, fa_top_words(new_v[0], new_v[1]));
        if (AMSGRAD) _mm512_storeu_si512(vmax + i, fa_top_words(new_vmax[0], new_vmax[1]));
    }
}
#pragma GCC diagnostic pop
#endif

// [start, stop) of one tensor with 8-bit state: start is a multiple of
// FA_INT8_BLOCK (fa_boundary aligns shares to it), stop a multiple or the end.
template <int WD, bool AMSGRAD, bool MAXIMIZE, int ISA>
static inline __attribute__((always_inline)) void
fa_adam_int8_loop(const fa_item &it, int64_t start, int64_t stop) {
    const fa_scalars<float> s(it);
    const int64_t whole_stop = start + (stop - start) / FA_INT8_BLOCK * FA_INT8_BLOCK;
    int64_t b0 = start;
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (ISA == FA_ISA_AVX512) {
        fa_int8_blocks_avx512<WD, AMSGRAD, MAXIMIZE>(it, s, start, whole_stop);
        b0 = whole_stop;
    }
#endif
    for (; b0 < stop; b0 += FA_INT8_BLOCK)
        fa_int8_block<WD, AMSGRAD, MAXIMIZE>(it, s, b0, stop - b0 < FA_INT8_BLOCK ? stop - b0 : FA_INT8_BLOCK);
}

// The loop over [start, stop) of one tensor, for one variant.
template <typename T, int WD, bool AMSGRAD, bool MAXIMIZE, int STATE, int ISA>
static inline __attribute__((always_inline)) void
fa_adam_loop(const fa_item &it, int64_t start, int64_t stop) {
    if constexpr (STATE == FA_STATE_INT8) {
        fa_adam_int8_loop<WD, AMSGRAD, MAXIMIZE, ISA>(it, start, stop);
    } else {
    typedef fa_storage<T, STATE> S;
    const fa_scalars<T> s(it);
    T *__restrict__ p = (T *)it.param;
    const T *__restrict__ g = (const T *)it.grad;
    typename S::stored *__restrict__ m = (typename S::stored *)it.exp_avg;
    typename S::stored *__restrict__ v = (typename S::stored *)it.exp_avg_sq;
    typename S::stored *__restrict__ vmax = (typename S::stored *)it.max_exp_avg_sq;
    // Chunks of 2^32 elements, so that the index's high half enters the rounding
    // keys once per chunk (one chunk for any tensor under 4G elements).
    for (int64_t chunk = start; chunk < stop;) {
    const int64_t chunk_stop = ((chunk >> 32) + 1) << 32 < stop ? ((chunk >> 32) + 1) << 32 : stop;
    const uint32_t hi = (uint32_t)((uint64_t)chunk >> 32) * FA_INDEX_HI_MULTIPLIER;
    const uint32_t key_mv = it.keys[0] ^ hi, key_vmax = it.keys[2] ^ hi;
    int64_t i = chunk;
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (ISA == FA_ISA_AVX512 && STATE == FA_STATE_BF16) {
        const int64_t whole = chunk + (chunk_stop - chunk) / 32 * 32;
        fa_bf16_range_avx512<WD, AMSGRAD, MAXIMIZE>(it, s, chunk, whole, key_mv, key_vmax);
        i = whole;
    }
#endif
    for (; i < chunk_stop; ++i) {
        const uint32_t r = STATE == FA_STATE_BF16 ? ((uint32_t)i ^ key_mv) * FA_ROUNDING_MULTIPLIER : 0u;
        T gi = g[i] * s.grad_scale;
        gi = MAXIMIZE ? fa_flip_sign(gi) : gi;
        T pi = p[i];
        if (WD == FA_WD_L2) gi = gi + s.weight_decay * pi;
        if (WD == FA_WD_DECOUPLED) pi = pi * s.decay;
        const T mi = s.beta1 * S::load(m, i) + s.one_minus_beta1 * gi;
        const T vi = s.beta2 * S::load(v, i) + s.one_minus_beta2 * (gi * gi);
        S::store(m, i, mi, r & 0xffffu);
        S::store(v, i, vi, r >> 16);
        T vd = vi;
        if (AMSGRAD) {
            // Stored as it is, a subnormal old value would survive: flush it (DAZ
            // makes the compare see it as zero, so the select picks the zero).
            const T stored = S::load(vmax, i);
            const T old = fa_abs(stored) < fa_min_normal<T>::value ? fa_signed_zero(stored) : stored;
            // np.maximum: a NaN on either side wins, and a tie takes v (+0 over a
            // flushed -0, the one tie whose bits differ).
            vd = (old > vi || old != old) ? old : vi;
            S::store(vmax, i, vd,
                     STATE == FA_STATE_BF16 ? (((uint32_t)i ^ key_vmax) * FA_ROUNDING_MULTIPLIER) & 0xffffu : 0u);
        }
        const T denom = fa_sqrt(vd) * s.inv_sqrt_bc2 + s.eps;
        p[i] = pi - s.step_size * (mi / denom);
    }
    chunk = chunk_stop;
    }
    }
}

// Whether every value in g[a, b) is finite.  NaN and +-Inf are the values whose
// magnitude bits are at least those of +Inf, so an integer max over the
// magnitude bits decides it: a reduction that vectorises without -ffast-math.
template <typename T, typename Bits, Bits MAGNITUDE, Bits INF>
static inline __attribute__((always_inline)) int fa_all_finite_loop(const T *__restrict__ g, int64_t a, int64_t b) {
    Bits largest = 0;
    for (int64_t i = a; i < b; ++i) {
        Bits bits;
        memcpy(&bits, &g[i], sizeof bits);
        bits &= MAGNITUDE;
        largest = bits > largest ? bits : largest;
    }
    return largest < INF;
}

// The gradients' sum of squares, for global-norm clipping: in double, in an
// order fixed by the element indices alone, so the norm is bitwise the same for
// every thread count (and fastadam._reference.grad_norm reproduces it).  The
// concatenated gradients are cut into blocks of FA_NORM_BLOCK elements; in a
// block, element i adds g*g to lane (i mod FA_NORM_LANES); a block's sum is
// its lanes added in order 0..15; the norm is the blocks' sums added in order.
// Sixteen independent lanes let the loop vectorise without reassociation.
#define FA_NORM_BLOCK 4096
#define FA_NORM_LANES 16

// Lanes 0-7 and 8-15 as two vectors of doubles (GCC's vector extension: one
// zmm each on AVX-512, two ymm on AVX2, four xmm on the baseline).  Written
// element by element, GCC keeps the lanes in memory or shuffles them.
typedef double fa_lanes8 __attribute__((vector_size(64)));
typedef float fa_floats8 __attribute__((vector_size(32)));

// (By reference: a returned 64-byte vector is an ABI change GCC warns of where AVX-512 is off.)
template <typename T>
static inline __attribute__((always_inline)) void fa_load_lanes8(const T *g, fa_lanes8 &x) {
    if constexpr (sizeof(T) == sizeof(float)) {
        fa_floats8 f;
        memcpy(&f, g, sizeof f);
        x = __builtin_convertvector(f, fa_lanes8);
    } else {
        memcpy(&x, g, sizeof x);
    }
}

template <typename T>
static inline __attribute__((always_inline)) void
fa_sumsq_loop(const T *__restrict__ g, int64_t lane0, int64_t a, int64_t b, double *__restrict__ acc) {
    int64_t i = a;
    for (; i < b && ((lane0 + i - a) % FA_NORM_LANES) != 0; ++i) {
        const double x = (double)g[i];
        acc[(lane0 + i - a) % FA_NORM_LANES] += x * x;
    }
    if (i + FA_NORM_LANES <= b) {  // now i's lane is 0
        fa_lanes8 low, high;
        memcpy(&low, acc, sizeof low);
        memcpy(&high, acc + 8, sizeof high);
        for (; i + FA_NORM_LANES <= b; i += FA_NORM_LANES) {
            fa_lanes8 x, y;
            fa_load_lanes8(g + i, x);
            fa_load_lanes8(g + i + 8, y);
            low += x * x;
            high += y * y;
        }
        memcpy(acc, &low, sizeof low);
        memcpy(acc + 8, &high, sizeof high);
    }
    for (; i < b; ++i) {
        const double x = (double)g[i];
        acc[(lane0 + i - a) % FA_NORM_LANES] += x * x;
    }
}

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

// Work splitting: thread t of n_threads owns the global element range
// [fa_boundary(t), fa_boundary(t + 1)) across the concatenated tensors.
// Boundaries fall on multiples of FA_ALIGN elements inside a tensor: an 8-bit
// state's block (FA_INT8_BLOCK), and a whole number of 64-byte cache lines of
// every buffer, so threads never share a block or a line of a tensor whose data
// is line-aligned.  `offsets` has n_items + 1 prefix sums of numel.
#define FA_ALIGN FA_INT8_BLOCK

static inline int64_t fa_find_item(const int64_t *offsets, int64_t n_items, int64_t pos) {
    // The last item k with offsets[k] <= pos (binary search).
    int64_t lo = 0, hi = n_items - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        if (offsets[mid] <= pos) lo = mid; else hi = mid - 1;
    }
    return lo;
}

static inline int64_t fa_boundary(const int64_t *offsets, int64_t n_items, int64_t t, int64_t n_threads) {
    const int64_t total = offsets[n_items];
    if (t <= 0) return 0;
    if (t >= n_threads) return total;
    // total * t / n_threads without overflowing int64.
    const int64_t pos = (total / n_threads) * t + ((total % n_threads) * t) / n_threads;
    const int64_t k = fa_find_item(offsets, n_items, pos);
    const int64_t local = pos - offsets[k];
    return offsets[k] + (local - local % FA_ALIGN);
}

// Calls f(item, a, b) for each tensor piece [a, b) in thread t's share.
template <typename F>
static inline void fa_for_share(const fa_item *items, const int64_t *offsets, int64_t n_items,
                                int64_t t, int64_t n_threads, F f) {
    const int64_t begin = fa_boundary(offsets, n_items, t, n_threads);
    const int64_t end = fa_boundary(offsets, n_items, t + 1, n_threads);
    if (begin >= end) return;
    for (int64_t k = fa_find_item(offsets, n_items, begin); k < n_items && offsets[k] < end; ++k) {
        const int64_t a = begin > offsets[k] ? begin - offsets[k] : 0;
        const int64_t b = (end < offsets[k + 1] ? end : offsets[k + 1]) - offsets[k];
        if (b > a) f(items[k], a, b);
    }
}

// FTZ (bit 15) and DAZ (bit 6) of MXCSR: the flush-to-zero rule, in hardware.
#define FA_MXCSR_FTZ_DAZ 0x8040u

static inline void fa_run_share(const fa_item *items, const int64_t *offsets, int64_t n_items,
                                int64_t t, int64_t n_threads) {
#if defined(__x86_64__)
    // Set here, on the thread that runs the loops, and restored after them; the
    // loops are behind an indirect call (fa_adam_range), so no floating-point
    // operation can be moved across the two.
    const unsigned int saved = _mm_getcsr();
    _mm_setcsr(saved | FA_MXCSR_FTZ_DAZ);
#endif
    fa_for_share(items, offsets, n_items, t, n_threads,
                 [](const fa_item &it, int64_t a, int64_t b) { fa_adam_range(it, a, b); });
#if defined(__x86_64__)
    _mm_setcsr(saved);
#endif
}

// The read-only pre-pass over block `block` of the concatenated gradients
// (skip_if_nonfinite and clipping share it): returns 1 if every value is
// finite; with `want_sum`, stores the block's sum of squares in *sum.
static inline int fa_prepass_block(const fa_item *items, const int64_t *offsets, int64_t n_items,
                                   int64_t block, int want_sum, double *sum) {
    const int64_t total = offsets[n_items];
    const int64_t begin = block * FA_NORM_BLOCK;
    const int64_t end = begin + FA_NORM_BLOCK < total ? begin + FA_NORM_BLOCK : total;
    double acc[FA_NORM_LANES] = {0};
    int ok = 1;
#if defined(__x86_64__)
    // IEEE arithmetic here whatever the caller's mode (the reference's norm is IEEE).
    const unsigned int saved = _mm_getcsr();
    _mm_setcsr(saved & ~FA_MXCSR_FTZ_DAZ);
#endif
    for (int64_t k = fa_find_item(offsets, n_items, begin); k < n_items && offsets[k] < end; ++k) {
        const int64_t a = begin > offsets[k] ? begin - offsets[k] : 0;
        const int64_t b = (end < offsets[k + 1] ? end : offsets[k + 1]) - offsets[k];
        if (b <= a) continue;
        ok &= fa_finite_range(items[k], a, b);
        if (want_sum) fa_sumsq_range(items[k], (offsets[k] + a - begin) % FA_NORM_LANES, a, b, acc);
    }
    if (want_sum) {
        double s = 0.0;
        for (int j = 0; j < FA_NORM_LANES; ++j) s += acc[j];
        *sum = s;
    }
#if defined(__x86_64__)
    _mm_setcsr(saved);
#endif
    return ok;
}

static inline int64_t fa_prepass_blocks(const int64_t *offsets, int64_t n_items) {
    return (offsets[n_items] + FA_NORM_BLOCK - 1) / FA_NORM_BLOCK;
}

// The roofline: Adam's memory traffic (read p, g, m, v; write p, m, v) with
// trivial arithmetic, split between threads as the Adam kernel is.  Its
// speed marks the memory wall for this access pattern (a plain streaming
// loop, not a proven bound: docs/speed.md).
template <typename T>
static inline void fa_traffic_range(T *__restrict__ p, const T *__restrict__ g, T *__restrict__ m,
                                    T *__restrict__ v, int64_t start, int64_t stop) {
    for (int64_t i = start; i < stop; ++i) {
        const T gi = g[i];
        p[i] = p[i] + gi;
        m[i] = m[i] + gi;
        v[i] = v[i] + gi;
    }
}

static inline void fa_traffic_share(float *p, const float *g, float *m, float *v, int64_t n,
                                    int64_t t, int64_t n_threads) {
    const int64_t offsets[2] = {0, n};
    fa_traffic_range<float>(p, g, m, v, fa_boundary(offsets, 1, t, n_threads),
                            fa_boundary(offsets, 1, t + 1, n_threads));
}
