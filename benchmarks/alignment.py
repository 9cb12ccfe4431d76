"""What misaligned parameters and gradients cost: fastadam.Adam's step on buffers that start on a
64-byte line against buffers 16 bytes past one (where glibc's malloc puts NumPy's large arrays),
interleaved in one process, medians of 21 rounds, 1 and 2 threads.

    python benchmarks/alignment.py
"""
import statistics
import time

import numpy as np

import fastadam


def buffer(n, offset_bytes):
    raw = np.empty(n + 64, np.float32)
    start = (-raw.ctypes.data % 64) // 4 + offset_bytes // 4
    a = raw[start:start + n]
    a[...] = np.random.default_rng(0).standard_normal(n)
    return a


for n in (4096, 65536, 1 << 20):
    for threads in (1, 2):
        optimizers = {}
        for offset in (0, 16):
            p, g = buffer(n, offset), buffer(n, offset)
            g *= np.float32(1e-3)
            opt = fastadam.Adam([p], lr=1e-5, num_threads=threads)
            opt.step([g])
            optimizers[offset] = (opt, g)
        reps = max(1, 4_000_000 // n)
        times = {offset: [] for offset in optimizers}
        for _ in range(21):
            for offset, (opt, g) in optimizers.items():
                start = time.perf_counter()
                for _ in range(reps):
                    opt.step([g])
                times[offset].append((time.perf_counter() - start) / reps * 1e6)
        aligned, off = statistics.median(times[0]), statistics.median(times[16])
        print(f"{n:8d} elements, {threads} thread(s): on a line {aligned:8.2f} us, "
              f"16 bytes off {off:8.2f} us ({off / aligned:.2f}x)")
