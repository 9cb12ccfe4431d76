"""The optimizer's step on the Adam tutorial's Keras CNN (Keras's PyTorch backend): Keras's
Adam, fastadam.keras.Adam and Keras's SGD, each ``optimizer.apply(grads, variables)`` on
the model's variables with fixed gradients, interleaved in random order each round.

    python benchmarks/keras_step.py [--rounds 31] [--steps 20] [--threads N]
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastadam.keras  # noqa: E402
from fastadam.mnist.keras import cnn  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--steps", type=int, default=20, help="steps timed together in a round")
    parser.add_argument("--threads", type=int, default=None, help="torch's and fastadam's threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    makers = {
        "keras Adam": lambda: keras.optimizers.Adam(1e-3),
        "fastadam.keras.Adam": lambda: fastadam.keras.Adam(1e-3, num_threads=args.threads),
        "keras SGD": lambda: keras.optimizers.SGD(1e-3),
    }
    runs = {}
    for name, make in makers.items():
        keras.utils.set_random_seed(0)
        variables = cnn(keras, (28, 28, 1)).trainable_variables
        grads = [keras.ops.convert_to_tensor(rng.standard_normal(v.shape).astype(np.float32) * 1e-3)
                 for v in variables]
        opt = make()
        opt.apply(grads, variables)  # builds it
        runs[name] = (opt, grads, variables)
    n = sum(int(np.prod(v.shape)) for v in runs["keras Adam"][2])
    times = {name: [] for name in makers}
    for _ in range(args.rounds):
        for name in rng.permutation(list(makers)):
            opt, grads, variables = runs[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.apply(grads, variables)
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"the tutorial's CNN: {len(runs['keras Adam'][2])} variables, {n} parameters; "
          f"Keras {keras.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"{args.rounds} rounds of {args.steps} steps")
    base = statistics.median(times["keras Adam"])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"  {name:22s} {median * 1e3:8.3f} ms a step   keras Adam / this: {base / median:6.2f}")


if __name__ == "__main__":
    main()
