"""The MNIST MLP's training loop (784-256-128-10, batch 128, as ``python -m fastadam.mnist``)
with the thread policy choosing the step's threads: the step inside the loop against its
cache-cold time outside it (40 MB touched before each step), and the loop's forward and
backward pass against the same loop with the step on one thread.

Each run is a process of its own and repeats the measurement ``--repeats`` times (fresh
model and optimizer each time, so a fresh planner); medians over ``--steps`` steps.

    python benchmarks/mlp_loop_contention.py [--runs 5] [--repeats 5] [--steps 300]
"""
import argparse
import subprocess
import sys
import time

import numpy as np


def loop(threads, steps, x_train, y_train):
    """(median step us, median forward+backward us, planner's choice) of a loop."""
    import fastadam
    from fastadam.mnist.model import MLP
    model = MLP([784, 256, 128, 10], np.random.default_rng(0))
    opt = fastadam.Adam([model.flat.data], num_threads=threads)
    rng = np.random.default_rng(1)
    step_t, pass_t = [], []
    for _ in range(steps + 20):
        batch = rng.integers(0, len(x_train), 128)
        t0 = time.perf_counter()
        model.loss_and_backward(x_train[batch], y_train[batch])
        t1 = time.perf_counter()
        opt.step([model.flat.grad])
        t2 = time.perf_counter()
        pass_t.append(t1 - t0)
        step_t.append(t2 - t1)
    chosen = opt._plan.chosen_threads if threads is None and hasattr(opt._plan, "chosen_threads") else threads
    return np.median(step_t[20:]) * 1e6, np.median(pass_t[20:]) * 1e6, chosen, opt, model


def cache_cold(opt, model, steps=100):
    junk = np.ones(10_000_000, np.float32)  # 40 MB
    times = []
    for _ in range(steps):
        junk += 1.0
        t0 = time.perf_counter()
        opt.step([model.flat.grad])
        times.append(time.perf_counter() - t0)
    return np.median(times) * 1e6


def one_run(repeats, steps):
    from fastadam.mnist import data
    x_train, y_train, _, _ = data.load_dataset(data.locate(download=False))
    for r in range(repeats):
        step, fb, chosen, opt, model = loop(None, steps, x_train, y_train)
        cold = cache_cold(opt, model)
        step1, fb1, _, _, _ = loop(1, steps, x_train, y_train)
        print(f"  repeat {r + 1}: policy (chose {chosen}): step in the loop {step:5.0f} us, "
              f"cache-cold {cold:5.0f} us ({step / cold:.2f}x); forward+backward {fb:5.0f} us "
              f"against {fb1:5.0f} us with the step on 1 thread ({fb / fb1:.2f}x; that step {step1:4.0f} us)",
              flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one_run(args.repeats, args.steps)
    for run in range(args.runs):
        print(f"run {run + 1} (a process of its own)", flush=True)
        subprocess.run([sys.executable, __file__, "--one", "--repeats", str(args.repeats),
                        "--steps", str(args.steps)], check=True)


if __name__ == "__main__":
    main()
