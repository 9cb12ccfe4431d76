/* The roofline of an Adam step: its memory traffic (read p, g, m, v; write p, m, v)
 * with trivial arithmetic, split between threads as fastadam's kernel splits one
 * tensor (boundaries on multiples of `align` elements).  Its speed marks the memory
 * wall for this access pattern: a plain streaming loop, not a proven bound
 * (docs/speed.md).  Built and loaded by benchmarks/roofline.py; not part of the
 * installed package. */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static void traffic(float *restrict p, const float *restrict g, float *restrict m,
                    float *restrict v, int64_t start, int64_t stop) {
    for (int64_t i = start; i < stop; ++i) {
        const float gi = g[i];
        p[i] = p[i] + gi;
        m[i] = m[i] + gi;
        v[i] = v[i] + gi;
    }
}

static int64_t boundary(int64_t n, int64_t t, int64_t n_threads, int64_t align) {
    if (t >= n_threads) return n;
    const int64_t pos = (n / n_threads) * t + ((n % n_threads) * t) / n_threads;
    return pos - pos % align;
}

void roofline_step(float *p, const float *g, float *m, float *v, int64_t n, int n_threads,
                   int64_t align) {
    if (n_threads <= 1) {
        traffic(p, g, m, v, 0, n);
        return;
    }
#pragma omp parallel num_threads(n_threads)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int t = 0, nt = 1;
#endif
        traffic(p, g, m, v, boundary(n, t, nt, align), boundary(n, t + 1, nt, align));
    }
}
