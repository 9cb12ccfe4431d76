// The fused Adam/AdamW update: one pass that reads p, g, m, v (and v_max) once
// and writes p, m, v (and v_max) once, with no temporaries.
//
// The rule, per element, is fa_rule.hpp's, written once for every loop below
// (the scalar loops over float and double, and the AVX-512 paths of
// fa_avx512.hpp); the scalars are fa_step.hpp's, computed once per step in
// double and rounded to the loop's type once.  The files, by concern:
//
//   fa_step.hpp       the item of one tensor's work, its option bits and scalars
//   fa_rule.hpp       the update rule
//   fa_formats.hpp    the state's storage: bfloat16 and blockwise 8-bit
//   fa_avx512.hpp     compressed state's AVX-512 paths
//   this file         the loops over one tensor's range, per variant and storage
//   fa_gradients.hpp  the gradients' read-only passes (finiteness, clipping's norm)
//   fa_dispatch.hpp   one function per instruction set, chosen at import
//   fa_partition.hpp  the work split between threads, and each thread's run
//
// Under the flush-to-zero rule of fastadam/_formats.py (its docstring states
// it): every loop runs with the CPU's flush-to-zero mode set (fa_cpu.hpp: the
// FTZ and DAZ bits of MXCSR on x86-64, FPCR.FZ on aarch64; fa_run_share),
// so no operation reads or produces a subnormal number and none is stored.  A
// subnormal is a ~100-cycle microcode assist per operation: measured, an MNIST
// MLP step slowed 4x as 3% of m decayed through the subnormal range, and a 1M
// step with subnormal gradients took 6.9 ms instead of 0.95 ms.  The mode is
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
// and clamps the update's Adam term to +-10 lr: fastadam/_formats.py states
// the maps, the quantization and why.
//
// Compressed state's steps are bound by instructions more than by memory, so
// on AVX-512 they run paths written with intrinsics (fa_int8_blocks_avx512,
// fa_bf16_range_avx512): the same operations in the same order, in fewer
// instructions than GCC's vectorisation of the generic loops finds.
//
// The variant's code (weight-decay mode and option flags: fa_step.hpp) and the
// state's storage (native, bfloat16 or 8-bit) are template parameters: each
// variant is its own loop with no branch inside.  Each variant is
// compiled once per instruction set of fa_cpu.hpp (x86-64: baseline SSE2, AVX2
// and AVX-512; aarch64: NEON and SVE); the widest one the CPU and OS support
// is picked once at import time (fa_select_isa), or forced with FASTADAM_ISA.  The AVX-512 variant uses
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
#include <utility>
#include "fa_cpu.hpp"
#include "fa_step.hpp"

static inline __attribute__((always_inline)) float fa_sqrt(float x) { return __builtin_sqrtf(x); }
static inline __attribute__((always_inline)) double fa_sqrt(double x) { return __builtin_sqrt(x); }
static inline __attribute__((always_inline)) float fa_fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
static inline __attribute__((always_inline)) double fa_fma(double a, double b, double c) { return __builtin_fma(a, b, c); }
static inline __attribute__((always_inline)) float fa_abs(float x) { return __builtin_fabsf(x); }
static inline __attribute__((always_inline)) double fa_abs(double x) { return __builtin_fabs(x); }
static inline __attribute__((always_inline)) float fa_signed_zero(float x) { return __builtin_copysignf(0.0f, x); }
static inline __attribute__((always_inline)) double fa_signed_zero(double x) { return __builtin_copysign(0.0, x); }
// x with the bits of `mask` flipped: maximize's sign at run time (the sign bit,
// or nothing).  -x as the reference computes it, a NaN's sign flipped too: GCC
// treats a NaN's sign as unspecified and folds -(g * c) into g * -c, which keeps
// the gradient NaN's sign; an integer XOR it leaves alone.
template <typename T, typename B>
static inline __attribute__((always_inline)) T fa_xor_bits(T x, B mask) {
    static_assert(sizeof(T) == sizeof(B), "a mask of the value's size");
    B bits;
    memcpy(&bits, &x, sizeof bits);
    bits ^= mask;
    memcpy(&x, &bits, sizeof x);
    return x;
}
template <typename T> struct fa_min_normal;
template <> struct fa_min_normal<float> { static constexpr float value = __FLT_MIN__; };
template <> struct fa_min_normal<double> { static constexpr double value = __DBL_MIN__; };
// AMSGrad's max, as np.maximum: a NaN on either side wins, and a tie takes v.
template <typename T>
static inline __attribute__((always_inline)) T fa_amsgrad_max(T old, T vi) { return (old > vi || old != old) ? old : vi; }

namespace fa_rule {
#define FA_RULE_INLINE static inline __attribute__((always_inline))
#include "fa_rule.hpp"
#undef FA_RULE_INLINE
}  // namespace fa_rule

#include "fa_formats.hpp"
#include "fa_params.hpp"

// Whether a row is plain float32 parameters and gradients: what the AVX-512
// paths of compressed state (fa_avx512.hpp) are written for.
template <typename P, typename G>
struct fa_plain_float32 {
    static constexpr bool value = std::is_same<P, fa_param_plain<fa_f32>>::value && std::is_same<G, fa_f32>::value;
};

// One block of n elements of a tensor with 8-bit state, starting at element
// b0: decoded, updated and requantized while its m and v wait in L1-resident
// buffers, so memory is read and written once.
template <typename P, typename G, int VARIANT>
static inline __attribute__((always_inline)) void
fa_int8_block(const fa_item &it, const fa_scalars<float> &s, int64_t b0, int64_t n) {
    constexpr bool AMSGRAD = fa_has(VARIANT, FA_AMSGRAD);
    P p(it);
    const typename G::held *__restrict__ g = (const typename G::held *)it.grad;
    const float max_update = (float)it.max_update;
    const int64_t block = b0 / FA_INT8_BLOCK;
    const float scale_m = it.absmax[0][block], scale_v = it.absmax[1][block];
    const float scale_vmax = AMSGRAD ? it.absmax[2][block] : 0.0f;
    uint8_t *__restrict__ mb = (uint8_t *)it.exp_avg + b0;
    uint8_t *__restrict__ vb = (uint8_t *)it.exp_avg_sq + b0;
    uint8_t *__restrict__ vmaxb = AMSGRAD ? (uint8_t *)it.max_exp_avg_sq + b0 : nullptr;
    alignas(64) float bm[FA_INT8_BLOCK], bv[FA_INT8_BLOCK], bvmax[FA_INT8_BLOCK];
    uint32_t largest_m = 0, largest_v = 0, largest_vmax = 0;  // fa_magnitude_bits
    for (int64_t j = 0; j < n; ++j) {  // decode, update, absmax (vectorised)
        float gi, pi, mi, vi, update;
        fa_rule::gradient<VARIANT>(s, (float)G::load(g, b0 + j), p.load(b0 + j), gi, pi);
        fa_rule::moments<VARIANT>(s, fa_int8_decode<true>(mb[j]) * scale_m, fa_int8_decode<false>(vb[j]) * scale_v, gi,
                         mi, vi);
        float vd = vi;
        if (AMSGRAD) {
            vd = fa_amsgrad_max(fa_int8_decode<false>(vmaxb[j]) * scale_vmax, vi);
            bvmax[j] = vd;
            const uint32_t bits = fa_magnitude_bits(vd);
            largest_vmax = bits > largest_vmax ? bits : largest_vmax;
        }
        fa_rule::adam_term<VARIANT>(s, gi, mi, vd, update);
        update = update > max_update ? max_update : update;
        update = update < -max_update ? -max_update : update;
        p.store(b0 + j, pi - update, 0u);
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

#include "fa_avx512.hpp"

// [start, stop) of one tensor with 8-bit state: start is a multiple of
// FA_INT8_BLOCK (fa_boundary aligns shares to it), stop a multiple or the end.
template <typename P, typename G, int VARIANT, int ISA>
static inline __attribute__((always_inline)) void
fa_adam_int8_loop(const fa_item &it, int64_t start, int64_t stop) {
    const fa_scalars<float> s(it);
    int64_t b0 = start;
#if FA_X86_VARIANTS
    if constexpr (ISA == FA_ISA_AVX512 && fa_plain_float32<P, G>::value) {
        const int64_t whole_stop = start + (stop - start) / FA_INT8_BLOCK * FA_INT8_BLOCK;
        fa_int8_blocks_avx512<VARIANT>(it, s, start, whole_stop);
        b0 = whole_stop;
    }
#endif
    for (; b0 < stop; b0 += FA_INT8_BLOCK)
        fa_int8_block<P, G, VARIANT>(it, s, b0, stop - b0 < FA_INT8_BLOCK ? stop - b0 : FA_INT8_BLOCK);
}

// float16 <-> float32 in blocks, with F16C (every AVX2 CPU has it): GCC does not
// vectorize the element-wise conversions of fa_f16, which cost more than the
// step's arithmetic.  The hardware's conversions are exact one way and round to
// nearest even the other, as fa_f16's (denormals included; FTZ and DAZ do not
// apply to them); only a NaN's payload may differ.
#if FA_X86_VARIANTS
// (Called, not inlined: GCC inlines only into callers of the same target, and the
// block loop is compiled for each ISA; one call per block of 512 elements.)
#define FA_F16C_INLINE static __attribute__((noinline, target("avx2,f16c")))
FA_F16C_INLINE void fa_f16_decode(const uint16_t *__restrict__ a, float *__restrict__ out, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_store_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + j))));
    for (; j < n; ++j) out[j] = fa_f16::load(a, j);
}
FA_F16C_INLINE void fa_f16_encode(const float *__restrict__ x, uint16_t *__restrict__ out, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(out + j), _mm256_cvtps_ph(_mm256_load_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < n; ++j) out[j] = fa_f16::nearest(x[j]);
}
// The same, 16 at a time (half the conversions, which are slow on some CPUs).
#define FA_F16_512_INLINE static __attribute__((noinline, target("avx512f,avx2,f16c")))
FA_F16_512_INLINE void fa_f16_decode_512(const uint16_t *__restrict__ a, float *__restrict__ out, int64_t n) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm512_store_ps(out + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a + j))));
    for (; j < n; ++j) out[j] = fa_f16::load(a, j);
}
FA_F16_512_INLINE void fa_f16_encode_512(const float *__restrict__ x, uint16_t *__restrict__ out, int64_t n) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm256_storeu_si256((__m256i *)(out + j), _mm512_cvtps_ph(_mm512_load_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < n; ++j) out[j] = fa_f16::nearest(x[j]);
}
template <int ISA>
static inline __attribute__((always_inline)) void fa_f16_to_f32(const uint16_t *a, float *out, int64_t n) {
    if constexpr (ISA == FA_ISA_AVX512) fa_f16_decode_512(a, out, n);
    else fa_f16_decode(a, out, n);
}
template <int ISA>
static inline __attribute__((always_inline)) void fa_f32_to_f16(const float *x, uint16_t *out, int64_t n) {
    if constexpr (ISA == FA_ISA_AVX512) fa_f16_encode_512(x, out, n);
    else fa_f16_encode(x, out, n);
}

template <typename P, typename G, int VARIANT, int STORAGE, int ISA>
static inline __attribute__((always_inline)) void fa_adam_loop(const fa_item &it, int64_t start, int64_t stop);

// A float16 tensor in torch's semantics, block by block: p, m, v (v^) and a float16
// gradient decoded into L1-resident float32 buffers, updated there by the float32
// loop in torch's order, and encoded back, rounded to nearest: the same bits as
// the element-wise loop, which rounds once per value too.
template <typename G, int VARIANT, int ISA>
static inline __attribute__((always_inline)) void fa_adam_f16_staged(const fa_item &it, int64_t start, int64_t stop) {
    constexpr bool AMSGRAD = fa_has(VARIANT, FA_AMSGRAD);
    constexpr int64_t B = 256;
    alignas(64) float bp[B], bg[B], bm[B], bv[B], bvmax[B];
    const uint16_t *p = (const uint16_t *)it.param, *m = (const uint16_t *)it.exp_avg;
    const uint16_t *v = (const uint16_t *)it.exp_avg_sq, *vmax = (const uint16_t *)it.max_exp_avg_sq;
    fa_item block = it;
    block.param = bp, block.exp_avg = bm, block.exp_avg_sq = bv, block.max_exp_avg_sq = bvmax;
    for (int64_t b0 = start; b0 < stop; b0 += B) {
        const int64_t n = stop - b0 < B ? stop - b0 : B;
        fa_f16_to_f32<ISA>(p + b0, bp, n);
        fa_f16_to_f32<ISA>(m + b0, bm, n);
        fa_f16_to_f32<ISA>(v + b0, bv, n);
        if (AMSGRAD) fa_f16_to_f32<ISA>(vmax + b0, bvmax, n);
        if constexpr (std::is_same<G, fa_f16>::value) {
            fa_f16_to_f32<ISA>((const uint16_t *)it.grad + b0, bg, n);
            block.grad = bg;
        } else {
            block.grad = (const float *)it.grad + b0;
        }
        fa_adam_loop<fa_param_torch_f32, fa_f32, VARIANT, FA_STORAGE_NATIVE, ISA>(block, 0, n);
        fa_f32_to_f16<ISA>(bp, (uint16_t *)it.param + b0, n);
        fa_f32_to_f16<ISA>(bm, (uint16_t *)it.exp_avg + b0, n);
        fa_f32_to_f16<ISA>(bv, (uint16_t *)it.exp_avg_sq + b0, n);
        if (AMSGRAD) fa_f32_to_f16<ISA>(bvmax, (uint16_t *)it.max_exp_avg_sq + b0, n);
    }
}
#endif

// The loop over [start, stop) of one tensor, for one variant: parameter policy
// P, gradient format G, state storage STORAGE.
template <typename P, typename G, int VARIANT, int STORAGE, int ISA>
static inline __attribute__((always_inline)) void
fa_adam_loop(const fa_item &it, int64_t start, int64_t stop) {
    constexpr bool AMSGRAD = fa_has(VARIANT, FA_AMSGRAD);
    if constexpr (STORAGE == FA_STORAGE_INT8) {
        fa_adam_int8_loop<P, G, VARIANT, ISA>(it, start, stop);
#if FA_X86_VARIANTS
    } else if constexpr (ISA != FA_ISA_BASELINE && std::is_same<P, fa_param_plain<fa_f16>>::value) {
        fa_adam_f16_staged<G, VARIANT, ISA>(it, start, stop);
#endif
    } else {
    typedef typename P::value T;
    // Low-precision parameters updated in place keep the state in their own
    // format, rounded to nearest (torch's semantics).
    typedef typename std::conditional<P::torch_order, fa_storage_in<typename P::format>,
                                      fa_storage<T, STORAGE>>::type S;
    const fa_scalars<T> s(it);
    P p(it);
    const typename G::held *__restrict__ g = (const typename G::held *)it.grad;
    typename S::stored *__restrict__ m = (typename S::stored *)it.exp_avg;
    typename S::stored *__restrict__ v = (typename S::stored *)it.exp_avg_sq;
    typename S::stored *__restrict__ vmax = (typename S::stored *)it.max_exp_avg_sq;
    // Chunks of 2^32 elements, so that the index's high half enters the rounding
    // keys once per chunk (one chunk for any tensor under 4G elements).
    for (int64_t chunk = start; chunk < stop;) {
    const int64_t chunk_stop = ((chunk >> 32) + 1) << 32 < stop ? ((chunk >> 32) + 1) << 32 : stop;
    const uint32_t hi = (uint32_t)((uint64_t)chunk >> 32) * FA_INDEX_HI_MULTIPLIER;
    const uint32_t key_mv = it.keys[0] ^ hi, key_vmax = it.keys[2] ^ hi, key_p = it.keys[3] ^ hi;
    int64_t i = chunk;
#if FA_X86_VARIANTS
    if constexpr (ISA == FA_ISA_AVX512 && STORAGE == FA_STORAGE_BF16 && fa_plain_float32<P, G>::value) {
        const int64_t whole = chunk + (chunk_stop - chunk) / 32 * 32;
        fa_bf16_range_avx512<VARIANT>(it, s, chunk, whole, key_mv, key_vmax);
        i = whole;
    }
#endif
    for (; i < chunk_stop; ++i) {
        const uint32_t r = STORAGE == FA_STORAGE_BF16 && !P::torch_order
                               ? ((uint32_t)i ^ key_mv) * FA_ROUNDING_MULTIPLIER : 0u;
        const uint32_t rp = P::stochastic ? (((uint32_t)i ^ key_p) * FA_ROUNDING_MULTIPLIER) & 0xffffu : 0u;
        T gi, pi, mi, vi, term;
        fa_rule::gradient<VARIANT>(s, (T)G::load(g, i), p.load(i), gi, pi);
        if constexpr (P::torch_order) fa_rule::moments_lerp<VARIANT>(s, S::load(m, i), S::load(v, i), gi, mi, vi);
        else fa_rule::moments<VARIANT>(s, S::load(m, i), S::load(v, i), gi, mi, vi);
        S::store(m, i, mi, r & 0xffffu);
        S::store(v, i, vi, r >> 16);
        T vd = vi;
        if (AMSGRAD) {
            // Stored as it is, a subnormal old value would survive: flush it (DAZ
            // makes the compare see it as zero, so the select picks the zero).
            // A tie takes v: +0 over a flushed -0, the one tie whose bits differ.
            const T stored = S::load(vmax, i);
            const T old = fa_abs(stored) < fa_min_normal<T>::value ? fa_signed_zero(stored) : stored;
            vd = fa_amsgrad_max(old, vi);
            S::store(vmax, i, vd,
                     STORAGE == FA_STORAGE_BF16 && !P::torch_order
                         ? (((uint32_t)i ^ key_vmax) * FA_ROUNDING_MULTIPLIER) & 0xffffu : 0u);
        }
        if constexpr (P::torch_order) fa_rule::adam_term_div<VARIANT>(s, gi, mi, vd, term);
        else fa_rule::adam_term<VARIANT>(s, gi, mi, vd, term);
        p.store(i, pi - term, rp);
    }
    chunk = chunk_stop;
    }
    }
}

#include "fa_gradients.hpp"
#include "fa_dispatch.hpp"
#include "fa_partition.hpp"
