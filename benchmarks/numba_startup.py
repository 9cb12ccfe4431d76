"""The Numba backend's first step in a new process, with its on-disk cache empty (cold)
and filled (warm).

    python benchmarks/numba_startup.py [--runs 3]

Each run uses a fresh NUMBA_CACHE_DIR: a first process compiles and caches the serial
kernel (float32 and float64, one variant) and, for a tensor above the parallel
threshold, the parallel one; a second process loads them.  Prints the seconds from
the start of ``opt.step`` to its return, and the whole process's wall time.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys, time, numpy as np, fastadam
n = int(sys.argv[1])
p = np.zeros(n, np.float32); g = np.ones_like(p)
opt = fastadam.Adam([p], backend="numba", num_threads=2)
t = time.perf_counter(); opt.step([g]); first = time.perf_counter() - t
t = time.perf_counter(); opt.step([g]); second = time.perf_counter() - t
print(f"{first:.3f} {second:.5f}")
"""


def run(n, cache):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True,
                         env=env, check=True)
    first, second = out.stdout.split()
    return float(first), float(second), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for label, n in (("4K (serial kernel)", 4096), ("1M (parallel kernel)", 1 << 20)):
        for i in range(args.runs):
            with tempfile.TemporaryDirectory() as cache:
                cold = run(n, cache)
                warm = run(n, cache)
            print(f"{label}: cold first step {cold[0]:.2f} s (process {cold[2]:.2f} s), "
                  f"warm first step {warm[0]:.3f} s (process {warm[2]:.2f} s), "
                  f"second step {warm[1] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
