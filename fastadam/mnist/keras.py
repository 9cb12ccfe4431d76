"""The Adam tutorial's Keras experiment: a small CNN on MNIST trained with Keras's Adagrad,
Adam and SGD, and with fastadam.keras.Adam, from the same seed and initial weights.

    python -m fastadam.mnist.keras [--optimizers adagrad,adam,sgd,fastadam] [--epochs 10]
                                   [--json PATH] [--plot PATH]

The model: Conv2D(32, 3x3, relu), MaxPooling2D(2x2), Dropout(0.25), Flatten,
Dense(128, relu), Dropout(0.5), Dense(10, softmax); categorical cross-entropy, batch 60.
Each optimizer has Keras's defaults, as ``model.compile(optimizer="Adam")`` gives them
(fastadam.keras.Adam has Keras Adam's).  The images are the bundled MNIST files (or
``--data DIR``), read by fastadam.mnist.data; Keras's own loader would download them.
Runs on Keras's PyTorch backend (``KERAS_BACKEND=torch``, the default here) or its JAX
backend (``KERAS_BACKEND=jax``).
"""
import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

from . import _positive, finish_figure, unwritable_output  # noqa: E402
from .data import IDXError, load_dataset, locate  # noqa: E402

OPTIMIZERS = ("adagrad", "adam", "sgd", "fastadam")
LABELS = {"adagrad": "Keras Adagrad", "adam": "Keras Adam", "sgd": "Keras SGD",
          "fastadam": "fastadam.keras.Adam"}


def _optimizer_list(text):
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(OPTIMIZERS)} "
                                         "(comma-separated)")
    return list(dict.fromkeys(names))


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastadam.mnist.keras", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", type=_optimizer_list, default=list(OPTIMIZERS),
                   help=f"comma-separated, from {','.join(OPTIMIZERS)} (default: all)")
    p.add_argument("--epochs", type=_positive(int), default=10)
    p.add_argument("--batch-size", type=_positive(int), default=60)
    p.add_argument("--train-size", type=_positive(int), default=None, metavar="N",
                   help="train on the first N training images (default: all 60000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", metavar="DIR", help="a directory with the four MNIST-format files "
                   "(default: the bundled data/mnist, else the download cache)")
    p.add_argument("--json", metavar="PATH", help="write the configuration and per-epoch results")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the curves side by side")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                   help="Keras's progress output (default: 1 on a terminal, else 2)")
    return p


def cnn(keras, shape):
    return keras.Sequential([
        keras.Input(shape),
        keras.layers.Conv2D(32, (3, 3), activation="relu"),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Dropout(0.25),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ])


def make_optimizer(keras, name):
    if name == "fastadam":
        import fastadam.keras
        return fastadam.keras.Adam()
    return {"adagrad": "Adagrad", "adam": "Adam", "sgd": "SGD"}[name]  # Keras's defaults, by name


def run(args, log=print):
    """{optimizer: [one dict per epoch]} (train and test loss and accuracy)."""
    import keras
    if keras.backend.backend() not in ("torch", "jax") and "fastadam" in args.optimizers:
        raise SystemExit(f"fastadam.keras runs on Keras's PyTorch and JAX backends; this Keras "
                         f"runs on {keras.backend.backend()!r} (set KERAS_BACKEND=torch or jax)")
    x_train, y_train, x_test, y_test = load_dataset(locate(args.data, download=False))
    side = int(round(np.sqrt(x_train.shape[1])))
    if side * side != x_train.shape[1]:
        raise SystemExit(f"the images have {x_train.shape[1]} pixels: not square")
    if args.train_size is not None:
        x_train, y_train = x_train[:args.train_size], y_train[:args.train_size]
    x_train, x_test = (a.reshape(-1, side, side, 1) for a in (x_train, x_test))
    y_train, y_test = (keras.utils.to_categorical(y, 10) for y in (y_train, y_test))
    keras.utils.set_random_seed(args.seed)
    initial = cnn(keras, (side, side, 1)).get_weights()
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    histories = {}
    for name in args.optimizers:
        log(f"\n{LABELS[name]}: {args.epochs} epochs of {len(x_train)} images, batch {args.batch_size}")
        keras.utils.set_random_seed(args.seed)  # the same dropout masks and shuffles for each
        model = cnn(keras, (side, side, 1))
        model.set_weights(initial)
        model.compile(optimizer=make_optimizer(keras, name), loss="categorical_crossentropy",
                      metrics=["accuracy"])
        h = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                      validation_data=(x_test, y_test), verbose=verbose).history
        histories[name] = [dict(epoch=e + 1, train_loss=h["loss"][e], train_acc=h["accuracy"][e],
                                test_loss=h["val_loss"][e], test_acc=h["val_accuracy"][e])
                           for e in range(args.epochs)]
    return histories, dict(train=len(x_train), test=len(x_test), keras=keras.__version__,
                           backend=keras.backend.backend())


def table(histories, log=print):
    names = list(histories)
    log("\nepoch  " + "  ".join(f"{LABELS[n]:>34s}" for n in names))
    log("       " + "  ".join(f"{'loss':>8s} {'acc':>7s} {'test loss':>9s} {'test acc':>7s}" for _ in names))
    for e in range(len(histories[names[0]])):
        cells = [f"{h[e]['train_loss']:8.4f} {100 * h[e]['train_acc']:6.2f}% {h[e]['test_loss']:9.4f} "
                 f"{100 * h[e]['test_acc']:6.2f}%" for h in (histories[n] for n in names)]
        log(f"{e + 1:5d}  " + "  ".join(cells))


def plot(histories, path, title=""):
    """Loss and accuracy per epoch side by side: one colour per optimizer, training
    solid, test dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, history), color in zip(histories.items(), ("tab:green", "tab:blue", "tab:red", "k")):
        epochs = [r["epoch"] for r in history]
        for ax, key, scale in ((axes[0], "loss", 1), (axes[1], "acc", 100)):
            for split, style in (("train", "-"), ("test", "--")):
                wide = dict(linewidth=4, alpha=0.35) if name == "adam" else {}  # fastadam's lies on it
                ax.plot(epochs, [scale * r[f"{split}_{key}"] for r in history], style, color=color,
                        marker="o" if name == "fastadam" else None, markersize=3,
                        label=f"{LABELS[name]} ({split})", **wide)
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    finish_figure(fig, axes, path, title, "categorical cross-entropy", legend_size=7)


def main(argv=None):
    args = build_parser().parse_args(argv)
    refused = unwritable_output(("--json", args.json), ("--plot", args.plot))
    if refused:
        print(f"python -m fastadam.mnist.keras: {refused}", file=sys.stderr)
        return 2
    try:
        histories, facts = run(args)
    except (FileNotFoundError, IDXError) as e:  # the data: said before any training
        print(f"python -m fastadam.mnist.keras: {e}", file=sys.stderr)
        return 2
    table(histories)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m fastadam.mnist.keras " + " ".join(sys.argv[1:] if argv is None
                                                                            else argv),
                       "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
                       "data": facts, "results": histories}, f, indent=1)
    if args.plot:
        plot(histories, args.plot, title=f"MNIST CNN, Keras {facts['keras']} ({facts['backend']} backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
