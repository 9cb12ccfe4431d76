"""The MNIST MLP's optimizer step (784-256-128-10, 235,152 parameters) alone, back to back
(hot), and with 40 MB touched before each step (cache-cold), for num_threads None (the
policy: the planner's choice is printed), 1 and 2; medians in us.

    python benchmarks/mlp_step_hot_cold.py
"""
import time

import numpy as np

import fastadam
from fastadam.mnist.model import MLP


def main():
    model = MLP([784, 256, 128, 10], np.random.default_rng(0))
    model.flat.grad[...] = np.random.default_rng(1).standard_normal(model.flat.grad.size) * 1e-2
    junk = np.ones(10_000_000, np.float32)  # 40 MB
    for threads in (None, 1, 2, None, 1, 2):
        opt = fastadam.Adam([model.flat.data], num_threads=threads)
        for _ in range(20):  # the planner's trial
            opt.step([model.flat.grad])
        hot, cold = [], []
        for _ in range(200):
            start = time.perf_counter()
            opt.step([model.flat.grad])
            hot.append(time.perf_counter() - start)
        for _ in range(100):
            junk += 1.0
            start = time.perf_counter()
            opt.step([model.flat.grad])
            cold.append(time.perf_counter() - start)
        chosen = f" (planner chose {opt._plan.chosen_threads})" if threads is None else ""
        print(f"threads {threads}{chosen}: hot median {np.median(hot) * 1e6:.0f} us, "
              f"cache-cold median {np.median(cold) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
