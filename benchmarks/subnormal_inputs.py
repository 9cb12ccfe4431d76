"""One step over 1M float32 parameters with normal, tiny (1e-30) and subnormal (1e-40)
gradients, one thread, best of 5 x 20 steps: a subnormal input must not be a slowdown cliff.

    python benchmarks/subnormal_inputs.py
"""
import time

import numpy as np

import fastadam


def main(n=1 << 20):
    for label, scale in (("normal (1.0)", 1.0), ("tiny (1e-30)", 1e-30), ("subnormal (1e-40)", 1e-40)):
        rng = np.random.default_rng(0)
        p = rng.standard_normal(n).astype(np.float32)
        g = (rng.standard_normal(n) * scale).astype(np.float32)
        opt = fastadam.Adam([p], num_threads=1)
        opt.step([g])
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(20):
                opt.step([g])
            best = min(best, (time.perf_counter() - start) / 20)
        print(f"{label:18s} {best * 1e3:.3f} ms/step")


if __name__ == "__main__":
    main()
