"""Train the NumPy trainer's MLP recipe in plain JAX with fastadam.jax.step, on the bundled MNIST.

The recipe of ``python -m fastadam.mnist --hidden 512,256 --epochs 15 --lr-decay 0.8``
(benchmarks/results/mnist-mlp.txt): 784-512-256-10, the same He-initialised
weights (the trainer's model, same seed), batch 128, Adam lr 1e-3 times 0.8
after each epoch.  The step is one XLA FFI call inside the jitted training
step, with the parameters and the optimizer state donated: updated in place.

    pip install "fastadam[jax]" && python docs/examples/jax_mnist.py [--epochs 15] [--thread-pool xla]
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fastadam.jax
from fastadam.mnist import data
from fastadam.mnist.model import MLP

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--thread-pool", choices=("xla", "openmp"), default="xla",
                    help="where the step's threads come from (fastadam.jax.adam's thread_pool)")
args = parser.parse_args()

x_train, y_train, x_test, y_test = data.load_dataset(data.locate(download=False))
rng = np.random.default_rng(args.seed)
sizes = [x_train.shape[1], 512, 256, 10]
params = {name: jnp.asarray(value) for name, value in MLP(sizes, rng).params.items()}
batch_size, n_layers = 128, len(sizes) - 1
steps_per_epoch = -(-len(x_train) // batch_size)
tx = fastadam.jax.adam(optax.exponential_decay(1e-3, steps_per_epoch, 0.8, staircase=True),
                       thread_pool=args.thread_pool)
state = tx.init(params)


def logits(params, x):
    for i in range(n_layers):
        x = x @ params[f"W{i}"] + params[f"b{i}"]
        if i < n_layers - 1:
            x = jax.nn.relu(x)
    return x


def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


@functools.partial(jax.jit, donate_argnums=(0, 1))
def train_step(params, state, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    params, state = fastadam.jax.step(tx, params, grads, state)
    return params, state, value


accuracy = jax.jit(lambda params, x, y: (logits(params, x).argmax(1) == y).mean())
for epoch in range(args.epochs):
    started = time.perf_counter()
    order = rng.permutation(len(x_train))
    for start in range(0, len(x_train), batch_size):
        batch = order[start:start + batch_size]
        params, state, value = train_step(params, state, x_train[batch], y_train[batch])
    test = float(accuracy(params, x_test, y_test))
    print(f"epoch {epoch + 1}: train loss (last batch) {float(value):.4f}  test accuracy "
          f"{100 * test:.2f}%  ({time.perf_counter() - started:.1f} s)", flush=True)
