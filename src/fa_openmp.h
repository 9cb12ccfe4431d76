// OpenMP is optional at build time: without it the kernel runs serially and
// these report a single thread.
#pragma once
#ifdef _OPENMP
#include <omp.h>
static const int fa_openmp_enabled = 1;
static inline int fa_omp_max_threads(void) { return omp_get_max_threads(); }
#else
static const int fa_openmp_enabled = 0;
static inline int fa_omp_max_threads(void) { return 1; }
#endif
