"""The from-scratch NumPy MNIST trainer: ``python -m fastadam.mnist`` (or ``fastadam-mnist``).

Trains softmax regression (``--hidden 0``, the default: the model of the
Adam-from-scratch study this project starts from) or an MLP, with
``fastadam.Adam`` or the pure-NumPy reference Adam, on the bundled MNIST.
"""
import argparse
import builtins
import json
import platform
import sys
import time

import numpy as np

import fastadam

from .. import _paths
from . import data as mnist_data
from .model import MLP

__all__ = ["main", "train", "plot_runs"]


def parse_hidden(text):
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes comma-separated ints, e.g. 256,128; got {text!r}")
    if any(s < 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"--hidden sizes must be >= 0, got {text!r}")
    return [s for s in sizes if s > 0]


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser():
    p = argparse.ArgumentParser(prog="fastadam-mnist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=parse_hidden, default=[], metavar="SIZES",
                   help="comma-separated hidden layer sizes; 0 for none (softmax regression, default)")
    p.add_argument("--epochs", type=_positive(int), default=10)
    p.add_argument("--batch-size", type=_positive(int), default=128)
    p.add_argument("--lr", type=_positive(float), default=1e-3)
    p.add_argument("--lr-decay", type=_positive(float), default=1.0, metavar="GAMMA",
                   help="multiply the learning rate by GAMMA after each epoch (default 1: constant)")
    p.add_argument("--optimizer", choices=("fastadam", "numpy"), default="fastadam",
                   help="fastadam.Adam, or the pure-NumPy reference Adam")
    p.add_argument("--backend", choices=("auto", "cython", "numba", "numpy"), default="auto",
                   help="fastadam's backend (with --optimizer fastadam)")
    p.add_argument("--compare", action="store_true",
                   help="also train with the NumPy reference from the same seed and overlay both")
    p.add_argument("--max-grad-norm", type=_positive(float), default=None, metavar="NORM",
                   help="clip the gradients by their global L2 norm (fused into the step)")
    p.add_argument("--state-dtype", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="how the optimizer stores m and v (bfloat16: half the memory; "
                        "int8: blockwise 8-bit, about a quarter)")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the parameters' dtype as the optimizer updates them (forward and backward "
                        "in float32 on their values; gradients rounded to it)")
    p.add_argument("--param-rounding", choices=("nearest", "stochastic"), default="nearest",
                   help="how bfloat16 parameters are rounded (without --master-weights)")
    p.add_argument("--master-weights", choices=("none", "split", "float32"), default="none",
                   help="keep a float32 master of low-precision parameters in the state")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI ranks (launch with mpiexec -n N): each global "
                        "batch is split across the ranks and the gradients averaged by "
                        "fastadam.distributed.ZeroAdam (needs mpi4py); rank 0 reports")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", metavar="DIR", help="a directory with the four MNIST-format files "
                   "(default: the bundled data/mnist, else the download cache)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading MNIST")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of loss and accuracy per epoch")
    p.add_argument("--json", metavar="PATH", help="write the configuration and per-epoch results")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar within each epoch (default: when stderr is a terminal)")
    return p


def train(model, optimizer, x_train, y_train, x_test, y_test, epochs, batch_size, seed,
          progress=None, label="", log=print, lr_decay=1.0, comm=None):
    """Mini-batch training with a per-epoch shuffle; returns one dict per epoch.

    ``lr_decay`` multiplies every group's learning rate after each epoch.
    ``comm`` (an mpi4py communicator; ``optimizer`` a ZeroAdam on it): every rank
    draws the same shuffle and takes its contiguous part of each global batch,
    its gradient weighted so that the ranks' average is the global batch's mean
    gradient; the epoch's loss and accuracy are summed over the ranks.

    ``train_loss``/``train_acc`` are averages over the epoch's mini-batches (as
    Keras reports them); ``test_*`` are measured on the whole test set after the
    epoch; ``optimizer_seconds`` is the time spent in ``optimizer.step``.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    n = x_train.shape[0]
    history = []
    grad_buffers = [model.flat.grad]
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        start_time = time.perf_counter()
        optimizer_seconds, loss_sum, correct = 0.0, 0.0, 0
        batches = range(0, n, batch_size)
        with tqdm(batches, desc=f"{label}epoch {epoch}/{epochs}", unit="batch", leave=False,
                  disable=None if progress is None else not progress, file=sys.stderr) as bar:
            for i, start in enumerate(bar):
                idx = order[start:start + batch_size]
                if comm is not None:
                    whole = len(idx)
                    idx = np.array_split(idx, comm.Get_size())[comm.Get_rank()]
                if len(idx):
                    loss, batch_correct = model.loss_and_backward(x_train[idx], y_train[idx])
                else:
                    loss, batch_correct = 0.0, 0
                    model.flat.grad[...] = 0
                if comm is not None and len(idx) * comm.Get_size() != whole:
                    model.flat.grad *= np.float32(len(idx) * comm.Get_size() / whole)
                t0 = time.perf_counter()
                optimizer.step(grad_buffers)
                optimizer_seconds += time.perf_counter() - t0
                loss_sum += loss * len(idx)
                correct += batch_correct
                if i % 50 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}")
        seconds = time.perf_counter() - start_time
        if comm is not None:
            sums = comm.allreduce(np.array([loss_sum, correct], np.float64))
            loss_sum, correct = float(sums[0]), int(sums[1])
        test_loss, test_acc = model.evaluate(x_test, y_test)
        record = {"epoch": epoch, "train_loss": loss_sum / n, "train_acc": correct / n,
                  "test_loss": test_loss, "test_acc": test_acc, "seconds": seconds,
                  "optimizer_seconds": optimizer_seconds}
        history.append(record)
        for group in optimizer.param_groups:
            group["lr"] *= lr_decay
        log(f"{label}epoch {epoch:3d}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {100 * record['train_acc']:.2f}%  test loss {test_loss:.4f} "
            f"acc {100 * test_acc:.2f}%  {seconds:.2f}s (optimizer {optimizer_seconds:.3f}s)")
    return history


def plot_runs(runs, path, title=""):
    """A PNG of loss and accuracy per epoch; ``runs`` = {label: history}, overlaid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = [dict(linestyle="-", marker="o", markersize=4), dict(linestyle="--", marker="x", markersize=6)]
    for (label, history), style in zip(runs.items(), styles * len(runs)):
        epochs = [r["epoch"] for r in history]
        for key, color in (("train", "tab:blue"), ("test", "tab:orange")):
            ax_loss.plot(epochs, [r[f"{key}_loss"] for r in history], color=color,
                         label=f"{label} {key}", **style)
            ax_acc.plot(epochs, [100 * r[f"{key}_acc"] for r in history], color=color,
                        label=f"{label} {key}", **style)
    finish_figure(fig, (ax_loss, ax_acc), path, title, "cross-entropy loss", legend_size=8)


def finish_figure(fig, axes, path, title, loss_label, legend_size):
    """Label the loss and accuracy panels of ``fig``, write it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    axes[0].set(xlabel="epoch", ylabel=loss_label, title="loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _make_optimizer(kind, model, args, comm=None):
    backend = "numpy" if kind == "numpy" else args.backend
    if comm is not None:
        from ..distributed import ZeroAdam
        return ZeroAdam([model.flat.data], lr=args.lr, backend=backend, comm=comm,
                        max_grad_norm=args.max_grad_norm, state_dtype=args.state_dtype)
    options = dict(lr=args.lr, backend=backend, max_grad_norm=args.max_grad_norm,
                   state_dtype=args.state_dtype)
    if args.param_dtype != "float32":
        from .low_precision import LowPrecisionParameters, dtype
        return LowPrecisionParameters(
            model, dtype(args.param_dtype), param_rounding=args.param_rounding, seed=args.seed,
            master_weights=None if args.master_weights == "none" else args.master_weights, **options)
    return fastadam.Adam([model.flat.data], **options)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.distributed:
        return _main(args, None)
    if args.compare or args.optimizer != "fastadam" or args.param_dtype != "float32":
        print("fastadam-mnist: --distributed trains with fastadam only, on float32 parameters "
              "(no --compare, --optimizer numpy, --param-dtype)", file=sys.stderr)
        return 2
    from .. import _threads
    from ..distributed import _mpi
    comm = _mpi().COMM_WORLD
    try:
        # The ranks on this node share its cores: NumPy's BLAS gets the same share
        # as fastadam's kernel (_threads.cpu_limit), or the ranks' spinning BLAS
        # threads take the cores from each other (3 ranks on 2 cores: 31 s an
        # MLP epoch with the default, 0.8 s with one thread each).
        from threadpoolctl import threadpool_limits
        threadpool_limits(_threads.cpu_limit(), user_api="blas")
    except ImportError:
        pass
    try:
        return _main(args, comm)
    except BaseException:
        if comm.Get_size() > 1:  # one rank's failure must not leave the others waiting
            import traceback
            traceback.print_exc()
            comm.Abort(1)
        raise


def unwritable_output(*options):
    """The outputs' paths, checked before any training: "OPTION: why" for the first of the
    (option, path) pairs whose path is not absent or a regular file in an existing
    directory (a FIFO or a directory), else None."""
    for option, path in options:
        if path:
            try:
                _paths.check_replaceable(path)
            except (OSError, ValueError) as e:
                return f"{option}: {e}"
    return None


def _main(args, comm):
    root = comm is None or comm.Get_rank() == 0
    print = builtins.print if root else (lambda *a, **k: None)  # noqa: A001 - rank 0 reports
    refused = unwritable_output(("--json", args.json), ("--plot", args.plot))
    if refused:
        print(f"fastadam-mnist: {refused}", file=sys.stderr)
        return 2
    try:
        directory = mnist_data.locate(args.data, download=not args.no_download, progress=args.progress)
        x_train, y_train, x_test, y_test = mnist_data.load_dataset(directory)
    except (FileNotFoundError, mnist_data.IDXError) as e:
        print(f"fastadam-mnist: {e}", file=sys.stderr)
        return 2
    sizes = [x_train.shape[1], *args.hidden, int(max(y_train.max(), y_test.max())) + 1]
    kinds = ["fastadam", "numpy"] if args.compare else [args.optimizer]
    runs, backends = {}, {}
    model_name = "softmax regression" if not args.hidden else f"MLP {'-'.join(map(str, sizes))}"
    print(f"{model_name} on {directory}: {x_train.shape[0]} train / {x_test.shape[0]} test, "
          f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}"
          + (f" x {args.lr_decay} per epoch" if args.lr_decay != 1 else "") + f", seed {args.seed}")
    if comm is not None:
        from ..distributed import shard_multiple
        print(f"data-parallel on {comm.Get_size()} MPI ranks: global batch {args.batch_size}, "
              "optimizer state sharded (ZeroAdam)")
    for kind in kinds:
        model = MLP(sizes, np.random.default_rng(args.seed),
                    numel_multiple=1 if comm is None else shard_multiple(comm))
        try:
            optimizer = _make_optimizer(kind, model, args, comm)
        except (TypeError, ValueError) as e:  # options that do not fit the parameters
            print(f"fastadam-mnist: {e}", file=sys.stderr)
            return 2
        label = f"{kind} ({optimizer.backend}) " if len(kinds) > 1 else ""
        backends[kind] = optimizer.backend
        runs[kind] = train(model, optimizer, x_train, y_train, x_test, y_test, args.epochs,
                           args.batch_size, args.seed, progress=args.progress and root,
                           label=label, log=print, lr_decay=args.lr_decay, comm=comm)
    if args.compare:
        a, b = runs["fastadam"], runs["numpy"]
        worst = max(abs(ra[k] - rb[k]) for ra, rb in zip(a, b)
                    for k in ("train_loss", "test_loss", "train_acc", "test_acc"))
        speed = sum(r["optimizer_seconds"] for r in b) / max(sum(r["optimizer_seconds"] for r in a), 1e-12)
        print(f"fastadam vs NumPy reference: largest difference in any curve {worst:.3g}; "
              f"optimizer time {speed:.1f}x less")
    config = {"model": model_name, "sizes": sizes, "hidden": args.hidden, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "lr_decay": args.lr_decay,
              "max_grad_norm": args.max_grad_norm, "state_dtype": args.state_dtype,
              "param_dtype": args.param_dtype, "param_rounding": args.param_rounding,
              "master_weights": args.master_weights,
              "optimizer": args.optimizer,
              "backend": backends.get("fastadam", backends.get(args.optimizer)), "seed": args.seed,
              "mpi_ranks": 1 if comm is None else comm.Get_size(),
              "data": str(directory), "n_parameters": int(sum(
                  a * b + b for a, b in zip(sizes, sizes[1:]))),
              "fastadam": fastadam.__version__, "numpy": np.__version__,
              "python": platform.python_version(), "machine": platform.machine()}
    if not root:
        return 0
    if args.json:
        primary = kinds[0]
        out = {"config": dict(config, optimizer=primary), "epochs": runs[primary]}
        if args.compare:
            out["comparison"] = {"optimizer": "numpy", "epochs": runs["numpy"]}
        try:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        except OSError as e:
            print(f"fastadam-mnist: --json: {e}", file=sys.stderr)
            return 2
    if args.plot:
        plot_runs({f"{k} ({backends[k]})" if k == "fastadam" else "NumPy reference": v
                   for k, v in runs.items()}, args.plot,
                  title=f"{model_name} on {directory.name}, Adam lr {args.lr}"
                        + (f" x {args.lr_decay}/epoch" if args.lr_decay != 1 else "")
                        + f", batch {args.batch_size}")
    return 0
