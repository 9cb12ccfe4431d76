"""A/B helper: the cost of skip_if_nonfinite and max_grad_norm on one N-element step, in this checkout.

Run from the root of a built checkout (python setup.py build_ext --inplace); two commits side by
side in alternating processes:  python benchmarks/ab_clip.py 65536
Prints the median us per step of a plain step, with skip_if_nonfinite, with max_grad_norm and with
both, interleaved in rounds of 200 steps, threads chosen by the policy.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import numpy as np  # noqa: E402

import fastadam  # noqa: E402

assert fastadam.__file__.startswith(os.getcwd())
n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
rng = np.random.default_rng(0)


def make(**options):
    p = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    return fastadam.Adam([p], lr=1e-6, **options), [g]


optimizers = {"plain": make(), "skip": make(skip_if_nonfinite=True),
              "clip": make(max_grad_norm=1.0),
              "clip+skip": make(max_grad_norm=1.0, skip_if_nonfinite=True)}
times = {name: [] for name in optimizers}
for _ in range(51):
    for name, (opt, grads) in optimizers.items():
        start = time.perf_counter()
        for _ in range(200):
            opt.step(grads)
        times[name].append((time.perf_counter() - start) / 200 * 1e6)
print(f"{os.path.basename(os.getcwd())} n={n} " + "  ".join(
    f"{name} {statistics.median(t):.2f}" for name, t in times.items()) + " (median us)")
