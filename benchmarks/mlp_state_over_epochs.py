"""The MNIST MLP's optimizer step, timed alone on the state reached after each epoch,
with the number of subnormal entries in m, v, the gradient and p.

    python benchmarks/mlp_state_over_epochs.py [EPOCHS]

Shows whether the step slows as training goes on (it did, 4x by epoch 5, before m was
flushed below the smallest normal number; README, "The update").
"""
import sys
import time

import numpy as np

import fastadam
from fastadam.mnist import data, train
from fastadam.mnist.model import MLP


def subnormal(a):
    return int(np.count_nonzero((a != 0) & (np.abs(a) < np.finfo(a.dtype).smallest_normal)))


def timed_steps(opt, grads, steps=100):
    """Time `steps` steps, then put parameters and state back as they were."""
    params = [p.copy() for g in opt.param_groups for p in g["params"]]
    state = opt.state_dict()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step(grads)
    seconds = (time.perf_counter() - start) / steps
    for p, saved in zip((p for g in opt.param_groups for p in g["params"]), params):
        p[...] = saved
    opt.load_state_dict(state)
    return seconds


def main(epochs=6):
    x_train, y_train, x_test, y_test = data.load_dataset(data.locate())
    model = MLP([784, 512, 256, 10], np.random.default_rng(0))
    opt = fastadam.Adam([model.flat.data])
    for epoch in range(1, epochs + 1):
        train(model, opt, x_train, y_train, x_test, y_test, 1, 128, epoch, progress=False,
              log=lambda s: None)
        st = opt.state[0]
        print(f"after epoch {epoch}: subnormal entries m {subnormal(st['exp_avg'])} "
              f"v {subnormal(st['exp_avg_sq'])} grad {subnormal(model.flat.grad)} "
              f"p {subnormal(model.flat.data)}; step alone "
              f"{timed_steps(opt, [model.flat.grad]) * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
