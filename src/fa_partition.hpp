// How a step's elements are split between threads, and the per-thread runs
// (the update under flush-to-zero, the gradients' pre-pass).
#pragma once

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

static inline void fa_run_share(const fa_item *items, const int64_t *offsets, int64_t n_items,
                                int64_t t, int64_t n_threads) {
    // Set here, on the thread that runs the loops, and restored after them; the
    // loops are behind an indirect call (fa_adam_range), so no floating-point
    // operation can be moved across the two.
    const fa_fp_mode saved = fa_flush_to_zero(1);
    fa_for_share(items, offsets, n_items, t, n_threads,
                 [](const fa_item &it, int64_t a, int64_t b) { fa_adam_range(it, a, b); });
    fa_set_fp_mode(saved);
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
    // IEEE arithmetic here whatever the caller's mode (the reference's norm is IEEE).
    const fa_fp_mode saved = fa_flush_to_zero(0);
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
    fa_set_fp_mode(saved);
    return ok;
}

static inline int64_t fa_prepass_blocks(const int64_t *offsets, int64_t n_items) {
    return (offsets[n_items] + FA_NORM_BLOCK - 1) / FA_NORM_BLOCK;
}
