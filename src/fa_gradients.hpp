// The read-only passes over the gradients: finiteness and the clipping norm.
#pragma once

#include <stdint.h>
#include <string.h>
#include <type_traits>

#include "fa_params.hpp"

// Whether every value in g[a, b) is finite.  NaN and +-Inf are the values whose
// magnitude bits are at least those of +Inf, so an integer max over the
// magnitude bits decides it: a reduction that vectorises without -ffast-math.
// G is the gradient's format (fa_params.hpp).
template <typename G>
static inline __attribute__((always_inline)) int fa_all_finite_loop(const typename G::held *__restrict__ g,
                                                                    int64_t a, int64_t b) {
    typedef typename G::bits Bits;
    Bits largest = 0;
    for (int64_t i = a; i < b; ++i) {
        Bits bits;
        memcpy(&bits, &g[i], sizeof bits);
        bits &= G::magnitude;
        largest = bits > largest ? bits : largest;
    }
    return largest < G::inf;
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
template <typename G>
static inline __attribute__((always_inline)) void fa_load_lanes8(const typename G::held *g, fa_lanes8 &x) {
    if constexpr (std::is_same<G, fa_f64>::value) {
        memcpy(&x, g, sizeof x);
    } else if constexpr (std::is_same<G, fa_f32>::value) {
        fa_floats8 f;
        memcpy(&f, g, sizeof f);
        x = __builtin_convertvector(f, fa_lanes8);
    } else {
        fa_floats8 f;
        for (int j = 0; j < 8; ++j) f[j] = G::load(g, j);
        x = __builtin_convertvector(f, fa_lanes8);
    }
}

template <typename G>
static inline __attribute__((always_inline)) void
fa_sumsq_loop(const typename G::held *__restrict__ g, int64_t lane0, int64_t a, int64_t b, double *__restrict__ acc) {
    int64_t i = a;
    for (; i < b && ((lane0 + i - a) % FA_NORM_LANES) != 0; ++i) {
        const double x = (double)G::load(g, i);
        acc[(lane0 + i - a) % FA_NORM_LANES] += x * x;
    }
    if (i + FA_NORM_LANES <= b) {  // now i's lane is 0
        fa_lanes8 low, high;
        memcpy(&low, acc, sizeof low);
        memcpy(&high, acc + 8, sizeof high);
        for (; i + FA_NORM_LANES <= b; i += FA_NORM_LANES) {
            fa_lanes8 x, y;
            fa_load_lanes8<G>(g + i, x);
            fa_load_lanes8<G>(g + i + 8, y);
            low += x * x;
            high += y * y;
        }
        memcpy(acc, &low, sizeof low);
        memcpy(acc + 8, &high, sizeof high);
    }
    for (; i < b; ++i) {
        const double x = (double)G::load(g, i);
        acc[(lane0 + i - a) % FA_NORM_LANES] += x * x;
    }
}
