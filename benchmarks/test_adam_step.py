"""pytest-benchmark: one Adam step, implementation x size x threads, with the roofline.

Run: ``python -m pytest benchmarks/`` (``--benchmark-save=NAME`` / ``--benchmark-compare``
work as pytest-benchmark documents).  Each size and thread count is one group
(one comparison table).  Steps repeat on the same buffers: the work is
elementwise and does not depend on the values, so every repetition costs the
same; pedantic mode with a warm-up round and explicit rounds.

Unavailable peers (torch, fastadam.torch, deepspeed, bitsandbytes, numba) are skipped with
the reason.
``python -m fastadam.bench`` runs the same implementations interleaved in one
process and prints the speed-up table (README, "Speed").
"""
import numpy as np
import pytest

import fastadam
from fastadam import bench
from fastadam.bench import TextbookAdam
from fastadam.mnist.model import MLP

import low_precision  # benchmarks/low_precision.py
import planner_recovery  # benchmarks/planner_recovery.py

SIZES = [4096, 65536, 1 << 20, 1 << 24, 1 << 26]


def rounds_for(n):
    return 200 if n <= 65536 else 30 if n <= 1 << 20 else 5


@pytest.mark.parametrize("impl", list(bench.IMPLEMENTATIONS))
@pytest.mark.parametrize("n", SIZES, ids=[bench.LABELS[s] for s in SIZES])
def test_step(benchmark, impl, n, threads):
    try:
        step = bench.IMPLEMENTATIONS[impl](n, threads)
    except bench.Unavailable as e:
        pytest.skip(f"{impl}: {e}")
    benchmark.group = f"step {bench.LABELS[n]} float32, {threads} thread(s)"
    benchmark.extra_info.update(params=n, bytes_per_step=bench.BYTES_PER_PARAM * n)
    iterations = max(1, 65536 // n * 4)
    benchmark.pedantic(step, rounds=rounds_for(n), iterations=iterations, warmup_rounds=1)
    benchmark.extra_info["gb_per_s"] = bench.BYTES_PER_PARAM * n / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("impl", list(low_precision.MAKERS))
@pytest.mark.parametrize("n", SIZES[:4], ids=[bench.LABELS[s] for s in SIZES[:4]])
def test_low_precision_step(benchmark, impl, n, threads):
    """bfloat16 and float16 parameters in each mode, and torch fused on the same dtype
    (benchmarks/low_precision.py)."""
    try:
        step = low_precision.MAKERS[impl](n, threads)
    except bench.Unavailable as e:
        pytest.skip(f"{impl}: {e}")
    benchmark.group = f"low-precision parameters {bench.LABELS[n]}, {threads} thread(s)"
    benchmark.extra_info.update(params=n, bytes_per_step=low_precision.BYTES[impl] * n)
    benchmark.pedantic(step, rounds=rounds_for(n), iterations=max(1, 65536 // n * 4), warmup_rounds=1)


@pytest.mark.parametrize("kind", list(bench.MODEL_SHAPED))
def test_model_shaped_step(benchmark, kind, threads):
    """A step over 200 tensors of a model's shapes (6.6M parameters): fastadam over a
    list and over one flat buffer, fastadam.torch, torch's foreach and fused Adam,
    DeepSpeedCPUAdam, the textbook NumPy update (fastadam.bench.MODEL_SHAPED)."""
    try:
        step = bench.MODEL_SHAPED[kind](bench.MODEL_SHAPED_PARAMS, threads)
    except bench.Unavailable as e:
        pytest.skip(f"{kind}: {e}")
    benchmark.group = f"model-shaped: 200 tensors, 6.6M params, {threads} thread(s)"
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def mnist():
    from fastadam.mnist import data
    return data.load_dataset(data.bundled_dir())


@pytest.mark.parametrize("optimizer", ["fastadam", "numpy-textbook"])
def test_mnist_mlp_step(benchmark, optimizer):
    """The optimizer step of the README's MNIST MLP (784-512-256-10, 535,818 parameters)."""
    model = MLP([784, 512, 256, 10], np.random.default_rng(0))
    opt = TextbookAdam([model.flat.data]) if optimizer == "numpy-textbook" else fastadam.Adam([model.flat.data])
    grads = [model.flat.grad]
    benchmark.group = "MNIST MLP optimizer step"
    benchmark.pedantic(lambda: opt.step(grads), rounds=50, iterations=5, warmup_rounds=1)


@pytest.mark.parametrize("optimizer", ["fastadam", "numpy-textbook"])
def test_mnist_epoch(benchmark, mnist, optimizer):
    """One training epoch of the MNIST MLP, forward and backward included."""
    from fastadam.mnist import train
    x_train, y_train, x_test, y_test = mnist

    def epoch():
        model = MLP([784, 512, 256, 10], np.random.default_rng(0))
        opt = TextbookAdam([model.flat.data]) if optimizer == "numpy-textbook" else fastadam.Adam([model.flat.data])
        train(model, opt, x_train, y_train, x_test[:10], y_test[:10], 1, 128, 0, progress=False,
              log=lambda s: None)
    benchmark.group = "MNIST MLP epoch"
    benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("context", ["alone", "cache-cold", "in-the-loop"])
@pytest.mark.parametrize("policy", ["policy", "1-thread", "all-threads"])
def test_mnist_mlp_step_in_context(benchmark, mnist, context, policy):
    """The MLP 784-256-128-10 optimizer step alone, cache-cold (40 MB touched before it)
    and right after a forward/backward pass (the training loop), per thread setting:
    the loop, not the kernel, sets what a step costs (fastadam.bench.step_in_context)."""
    x_train, y_train, _, _ = mnist
    threads = {"policy": None, "1-thread": 1, "all-threads": bench.all_threads()}[policy]
    model = MLP([784, 256, 128, 10], np.random.default_rng(0))
    opt = fastadam.Adam([model.flat.data], num_threads=threads)
    rng = np.random.default_rng(1)
    model.flat.grad[...] = rng.standard_normal(model.flat.grad.size) * 1e-2
    junk = np.ones(10_000_000, np.float32)

    def setup():
        if context == "in-the-loop":
            batch = rng.integers(0, len(x_train), 128)
            model.loss_and_backward(x_train[batch], y_train[batch])
        elif context == "cache-cold":
            junk[...] += 1.0

    for _ in range(20):  # the planner's trial, in the context it plans for
        setup()
        opt.step([model.flat.grad])

    benchmark.group = f"MNIST MLP step in context: {context}"
    benchmark.pedantic(lambda: opt.step([model.flat.grad]), setup=setup, rounds=200, iterations=1,
                       warmup_rounds=5)


@pytest.mark.parametrize("start", ["quiet", "noisy"])
def test_step_after_a_noisy_start(benchmark, start):
    """A 1M-parameter step on the planner's thread count, after its first 30 steps ran
    with the machine as it is (quiet) or beside one busy process per CPU (noisy):
    a planner that recovers gives the two the same times once its next trial is done
    (benchmarks/planner_recovery.py reports the choices step by step)."""
    n = 1 << 20
    step, chosen = planner_recovery.new_step(n)
    if start == "noisy":
        with planner_recovery.BusyProcesses(bench.all_threads()):
            for _ in range(30):
                step()
    else:
        for _ in range(30):
            step()
    benchmark.extra_info["threads_after_the_start"] = chosen()
    benchmark.group = "1M step after a quiet or a noisy start (num_threads=None)"
    benchmark.pedantic(step, rounds=300, iterations=1, warmup_rounds=0)
    benchmark.extra_info["threads_at_the_end"] = chosen()
