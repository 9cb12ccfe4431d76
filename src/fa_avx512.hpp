// The AVX-512 paths of compressed state, written with intrinsics.
#pragma once

#if FA_X86_VARIANTS
// GCC 12's AVX-512 intrinsics start some results from _mm512_undefined_*, which
// -Wmaybe-uninitialized reports at every use (GCC bug 105593).
#pragma GCC diagnostic push
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define FA_AVX512_INLINE FA_AVX512_TARGET static inline __attribute__((always_inline))

// 16 floats: __m512 without its may_alias attribute, which a template argument drops.
typedef float fa_floats16 __attribute__((vector_size(64)));

// fa_scalars<float>, in all 16 lanes.
FA_AVX512_INLINE void fa_broadcast(const fa_scalars<float> &s, fa_scalars<fa_floats16> &c) {
#define FA_SPLAT(name) c.name = _mm512_set1_ps(s.name);
    FA_STEP_SCALARS(FA_SPLAT)
#undef FA_SPLAT
    c.variant = s.variant;
    c.maximize = s.maximize;
}

// The rule's own operations on 16 floats (the scalar ones are in adam_kernel.hpp).
// x with the bits of `mask` flipped in every lane (maximize's sign at run time).
FA_AVX512_INLINE __m512 fa_xor_bits(__m512 x, uint32_t mask) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int32_t)mask)));
}
FA_AVX512_INLINE __m512 fa_sqrt(__m512 x) { return _mm512_sqrt_ps(x); }
// old > v || old != old ? old : v (a NaN wins, a tie takes v).
FA_AVX512_INLINE __m512 fa_amsgrad_max(__m512 old, __m512 vi) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(old, vi, _CMP_GT_OQ) | _mm512_cmp_ps_mask(old, old, _CMP_UNORD_Q),
                                vi, old);
}

namespace fa_rule_avx512 {
#define FA_RULE_INLINE FA_AVX512_INLINE
#include "fa_rule.hpp"
#undef FA_RULE_INLINE
}  // namespace fa_rule_avx512

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
template <int VARIANT>
FA_AVX512_TARGET static void fa_int8_blocks_avx512(const fa_item &it, const fa_scalars<float> &s, int64_t start,
                                                   int64_t stop) {
    constexpr bool AMSGRAD = fa_has(VARIANT, FA_AMSGRAD);
    fa_scalars<fa_floats16> c;
    fa_broadcast(s, c);
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
                fa_rule_avx512::gradient<VARIANT>(c, _mm512_loadu_ps(g + i), _mm512_loadu_ps(p + i), gi, pi);
                fa_rule_avx512::moments<VARIANT>(c, _mm512_mul_ps(_mm512_castsi512_ps(fa_int8_decode16_signed(m + i)), scale_m),
                             _mm512_mul_ps(_mm512_castsi512_ps(fa_int8_decode16_unsigned(v + i)), scale_v), gi, mi, vi);
                __m512 vd = vi;
                if (AMSGRAD) {
                    vd = fa_amsgrad_max(
                        _mm512_mul_ps(_mm512_castsi512_ps(fa_int8_decode16_unsigned(vmax + i)), scale_vmax), vi);
                    _mm512_store_ps(bvmax + j, vd);
                    largest_vmax = _mm512_max_epu32(largest_vmax, _mm512_castps_si512(vd));  // NON_NEGATIVE
                }
                __m512 update;
                fa_rule_avx512::adam_term<VARIANT>(c, gi, mi, vd, update);
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

// fa_storage<float, FA_STORAGE_BF16>::load of 16 values.
FA_AVX512_INLINE __m512 fa_bf16_load16(const uint16_t *a) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)a)), 16));
}

// fa_storage<float, FA_STORAGE_BF16>::store of 16 values, in the top words: the
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
template <int VARIANT>
FA_AVX512_TARGET static void fa_bf16_range_avx512(const fa_item &it, const fa_scalars<float> &s, int64_t start,
                                                  int64_t stop, uint32_t key_mv, uint32_t key_vmax) {
    constexpr bool AMSGRAD = fa_has(VARIANT, FA_AMSGRAD);
    fa_scalars<fa_floats16> c;
    fa_broadcast(s, c);
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
            fa_rule_avx512::gradient<VARIANT>(c, _mm512_loadu_ps(g + j), _mm512_loadu_ps(p + j), gi, pi);
            fa_rule_avx512::moments<VARIANT>(c, fa_bf16_load16(m + j), fa_bf16_load16(v + j), gi, mi, vi);
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
                vd = fa_amsgrad_max(old, vi);
                new_vmax[h] = fa_bf16_round16(
                    vd, _mm512_and_si512(_mm512_mullo_epi32(_mm512_xor_si512(index, vmax_key), multiplier), low_half));
            }
            __m512 term;
            fa_rule_avx512::adam_term<VARIANT>(c, gi, mi, vd, term);
            _mm512_storeu_ps(p + j, _mm512_sub_ps(pi, term));
            index = _mm512_add_epi32(index, sixteen);
        }
        _mm512_storeu_si512(m + i, fa_top_words(new_m[0], new_m[1]));
        _mm512_storeu_si512(v + i, fa_top_words(new_v[0], new_v[1]));
        if (AMSGRAD) _mm512_storeu_si512(vmax + i, fa_top_words(new_vmax[0], new_vmax[1]));
    }
}
#pragma GCC diagnostic pop
#endif
