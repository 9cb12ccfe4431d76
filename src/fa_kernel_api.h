// The compiled kernel's entry points, offered to other extensions (the JAX FFI
// handler, src/jax_ffi.cpp) by a capsule, fastadam._kernel.KERNEL_API, so the
// kernel is compiled once and its ISA choice, thread policy and per-step
// scalars stay those of fastadam._kernel.  The items are fa_step.hpp's fa_item;
// a user checks abi_version and item_size before calling anything.
#pragma once

#include <stdint.h>

#include "fa_step.hpp"

#define FA_KERNEL_API_VERSION 1
#define FA_KERNEL_API_CAPSULE "fastadam._kernel.KERNEL_API"

typedef struct {
    int abi_version;           // FA_KERNEL_API_VERSION
    int item_size;             // sizeof(fa_item)
    int64_t int8_block;        // elements per absmax value of the 8-bit state
    // Item k's scalars for step number `step` (from 1) with its variant and its
    // stochastic-rounding keys from the seed, as the NumPy API's plan sets them.
    void (*set_step)(fa_item *it, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int variant, int64_t step, uint64_t seed, int64_t k);
    // The threads a step of `numel` elements uses when `requested` (0: the default policy).
    int (*threads_for)(int requested, int64_t numel);
    // Every item, on `threads` threads of the kernel's OpenMP team (1: the caller's).
    void (*run)(const fa_item *items, const int64_t *offsets, int64_t n_items, int threads);
    // Share t of n_threads of the items' work, on the calling thread (any thread pool's).
    void (*run_share)(const fa_item *items, const int64_t *offsets, int64_t n_items,
                      int64_t t, int64_t n_threads);
    // The read-only pass: whether every gradient is finite, and with want_norm their
    // global L2 norm (float64, the same for any thread count); partial holds
    // prepass_blocks(offsets, n_items) doubles.
    int (*prepass)(const fa_item *items, const int64_t *offsets, int64_t n_items, int threads,
                   int want_norm, double *partial, double *norm);
    int64_t (*prepass_blocks)(const int64_t *offsets, int64_t n_items);
    // The clipping coefficient for max_norm and the gradients' norm.
    double (*clip_coefficient)(double max_norm, double norm);
} fa_kernel_api;
