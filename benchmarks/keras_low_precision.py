"""Keras's Adam and fastadam.keras.Adam on a model whose variables are bfloat16 or float16
(Keras's "bfloat16"/"float16" dtype policies), against the float32 model: the loss per epoch.

    python benchmarks/keras_low_precision.py [--epochs 5]

A two-layer classifier (12 -> 16 -> 3) on 192 fixed random examples, batch 32, lr 0.01, the
same seed for every run.  Keras's Adam computes its update in the variables' dtype;
fastadam's computes in float32 and rounds each result once (docs/low-precision.md).
"""
import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fastadam.keras  # noqa: E402


def losses(make_optimizer, dtype, epochs):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((192, 12)).astype(np.float32)
    y = rng.integers(0, 3, 192)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu", dtype=dtype),
                              keras.layers.Dense(3, dtype=dtype)])
    model.compile(optimizer=make_optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, shuffle=False).history["loss"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    print(f"Keras {keras.__version__} ({keras.backend.backend()}); loss per epoch")
    for dtype in ("float32", "bfloat16", "float16"):
        for name, make in (("keras Adam", lambda: keras.optimizers.Adam(1e-2)),
                           ("fastadam.keras.Adam", lambda: fastadam.keras.Adam(1e-2))):
            print(f"  {dtype:8s} {name:20s} " + " ".join(f"{v:8.4f}" for v in losses(make, dtype, args.epochs)))


if __name__ == "__main__":
    main()
