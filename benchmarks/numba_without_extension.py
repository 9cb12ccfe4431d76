"""The Numba backend's step where the compiled extension is not built, beside the textbook
NumPy update, one process.

    python benchmarks/numba_without_extension.py [--rounds 7]

Without the extension (an install with no C++ compiler) the Numba backend verifies
its steps in Python (fastadam/_checks.py), with the Numba kernel doing the math.  This imitates that install in a
process that has the extension by making ``fastadam._backends.compiled_or_none``
return None before the optimizers are made.  Medians of ``--rounds`` rounds, the two
implementations alternating, 1 and all threads as the thread policy allows.
"""
import argparse
import statistics
import time
import warnings

import numpy as np

from fastadam import _backends


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    _backends.compiled_or_none = lambda: None  # as if the extension were not built
    import fastadam
    from fastadam.bench import LABELS, TextbookAdam
    rng = np.random.default_rng(0)
    print("params   Numba without the extension   textbook NumPy   (us per step, medians)")
    for n in (4096, 65536, 1 << 20):
        steps = {}
        for label, make in (("numba", lambda p: fastadam.Adam([p], backend="numba")),
                            ("textbook", lambda p: TextbookAdam([p]))):
            p = rng.standard_normal(n).astype(np.float32)
            g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = make(p)
            for _ in range(20):
                opt.step([g])
            steps[label] = (opt, [g])
        reps = max(1, 200_000 // n)
        times = {label: [] for label in steps}
        for _ in range(args.rounds):
            for label, (opt, grads) in steps.items():
                started = time.perf_counter()
                for _ in range(reps):
                    opt.step(grads)
                times[label].append((time.perf_counter() - started) / reps * 1e6)
        print(f"{LABELS[n]:>6s}   {statistics.median(times['numba']):12.1f}"
              f"                 {statistics.median(times['textbook']):12.1f}")


if __name__ == "__main__":
    main()
