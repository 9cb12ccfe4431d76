"""A/B helper: time one fastadam step of N elements on THREADS threads in this checkout.

Run from the root of a built checkout (python setup.py build_ext --inplace), e.g. two
commits side by side in alternating processes:  python benchmarks/ab_step.py 4096 1
"""
import sys, os, time, statistics
sys.path.insert(0, os.getcwd())
import numpy as np, fastadam
assert fastadam.__file__.startswith(os.getcwd())
n = int(sys.argv[1]); threads = int(sys.argv[2])
rng = np.random.default_rng(0)
p = rng.standard_normal(n, dtype=np.float32); g = rng.standard_normal(n, dtype=np.float32)
opt = fastadam.Adam([p], num_threads=threads); opt.step([g])
ts = []
for _ in range(30):
    t = time.perf_counter()
    for _ in range(max(1, 8_000_000 // n)): opt.step([g])
    ts.append((time.perf_counter() - t) / max(1, 8_000_000 // n))
print(f"{os.path.basename(os.getcwd())} n={n} t={threads} median {statistics.median(ts)*1e6:.2f} us min {min(ts)*1e6:.2f}")
