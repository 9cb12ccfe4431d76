"""A/B helper: time one fastadam step of N elements on THREADS threads with state STATE,
in the checkout this is run from.

Run from the root of each of two built checkouts in alternating processes, e.g.
  python benchmarks/ab_state.py 1048576 2 bfloat16
(ab_step.py is the float32 case; this one takes the state dtype too.)
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import numpy as np  # noqa: E402

import fastadam  # noqa: E402

assert fastadam.__file__.startswith(os.getcwd())
n, threads = int(sys.argv[1]), int(sys.argv[2])
state = sys.argv[3] if len(sys.argv) > 3 else "float32"
rng = np.random.default_rng(0)
p = rng.standard_normal(n, dtype=np.float32)
g = rng.standard_normal(n, dtype=np.float32)
opt = fastadam.Adam([p], num_threads=threads, state_dtype=state)
opt.step([g])
repeats = max(1, 8_000_000 // n)
times = []
for _ in range(30):
    t = time.perf_counter()
    for _ in range(repeats):
        opt.step([g])
    times.append((time.perf_counter() - t) / repeats)
print(f"{os.path.basename(os.getcwd())} n={n} t={threads} state={state} "
      f"median {statistics.median(times) * 1e6:.2f} us min {min(times) * 1e6:.2f}")
