"""The 8-bit state's step at 16M parameters, 2 threads, on the AVX-512 and the AVX2 variant of
the kernel (the AVX2 one is GCC's vectorisation, with more instructions), beside float32 state:
whether its arithmetic still counts where memory bounds the step.  One process, 7 interleaved
rounds of 5 steps, medians in ns per parameter (needs a CPU with AVX-512).

    python benchmarks/int8_isa.py
"""
import statistics
import time

import numpy as np

import fastadam
from fastadam import _kernel

N = 16 * 1024 * 1024
rng = np.random.default_rng(0)


def optimizer(state_dtype):
    p = rng.standard_normal(N, dtype=np.float32)
    g = rng.standard_normal(N, dtype=np.float32) * np.float32(1e-3)
    opt = fastadam.Adam([p], lr=1e-4, state_dtype=state_dtype, num_threads=2)
    opt.step([g])
    return opt, g


optimizers = {dtype: optimizer(dtype) for dtype in ("float32", "int8")}
times = {}
before = _kernel.isa_in_use()
try:
    for _ in range(7):
        for isa in ("avx512", "avx2"):
            _kernel.select_isa(isa)
            for dtype, (opt, g) in optimizers.items():
                start = time.perf_counter()
                for _ in range(5):
                    opt.step([g])
                times.setdefault((isa, dtype), []).append((time.perf_counter() - start) / 5 / N * 1e9)
finally:
    _kernel.select_isa(before)
for (isa, dtype), t in times.items():
    print(f"{isa:6s} {dtype:7s} {statistics.median(t):.3f} ns/param")
