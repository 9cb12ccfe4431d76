"""The speed report: ``python -m fastadam.bench``.

Runs every implementation in one process, interleaved (each round visits the
implementations in a new random order, so machine drift hits all alike), and
prints per size: the median time per step, ns per parameter, effective GB/s
(an Adam step moves 28 bytes per float32 parameter: reads p, g, m, v; writes
p, m, v), percent of the roofline (the "roofline" row: Adam's memory traffic
with trivial arithmetic, built from benchmarks/roofline.c of a source
checkout), and the speed-up over the textbook NumPy update and over each peer.
Writes a JSON and a PNG.  "numpy-textbook" is the NumPy baseline: Adam as a
NumPy user writes it (TextbookAdam), not the tests' oracle.

Repeating a step on the same buffers measures the same cost every time: the
work is elementwise and independent of the values (they stay normal numbers).

The implementations (``IMPLEMENTATIONS``) are shared with benchmarks/ (pytest-benchmark).
"""
import argparse
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
import time

import numpy as np

import fastadam

BYTES_PER_PARAM = 28  # float32: read p, g, m, v (16 B); write p, m, v (12 B)
SIZES = (4096, 65536, 1 << 20, 1 << 24, 1 << 26)
LABELS = {4096: "4K", 65536: "64K", 1 << 20: "1M", 1 << 24: "16M", 1 << 26: "64M"}


def all_threads():
    from ._threads import cpu_limit
    return cpu_limit()


# -- implementations --------------------------------------------------------------------
# Each maker takes (size, threads) and returns a callable doing one step over
# float32 buffers of that size, or raises Unavailable with the reason.

class Unavailable(Exception):
    pass


def _buffers(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)


class TextbookAdam:
    """Adam as a NumPy user writes it: torch's arrangement, one NumPy operation at a
    time with its temporaries, IEEE arithmetic.  The speed baseline of the benchmarks
    (the thing fastadam replaces); not the tests' oracle, fastadam._reference, which
    also applies the flush-to-zero rule and so runs slower."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, (self.beta1, self.beta2), self.eps = params, lr, betas, eps
        self.exp_avgs = [np.zeros_like(p) for p in params]
        self.exp_avg_sqs = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        step_size = self.lr / (1 - b1 ** self.t)
        inv_sqrt_bc2 = 1 / math.sqrt(1 - b2 ** self.t)
        for p, g, m, v in zip(self.params, grads, self.exp_avgs, self.exp_avg_sqs):
            t = p.dtype.type
            m *= t(b1)
            m += t(1 - b1) * g
            v *= t(b2)
            v += t(1 - b2) * (g * g)
            p -= t(step_size) * (m / (np.sqrt(v) * t(inv_sqrt_bc2) + t(self.eps)))
        return True


def _numpy_textbook(n, threads):
    p, g = _buffers(n)
    opt = TextbookAdam([p])
    return lambda: opt.step([g])


def _fastadam(backend, **options):
    def make(n, threads):
        status = fastadam._backends.available()[backend]
        if status is not None:
            raise Unavailable(status)
        p, g = _buffers(n)
        opt = fastadam.Adam([p], backend=backend, num_threads=threads, **options)
        opt.step([g])  # creates the state and, for numba, compiles

        def step():
            opt.step([g])
        return step
    return make


@functools.cache
def _roofline_module():
    """benchmarks/roofline.py of the source checkout this package is in, or None."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "roofline.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("fastadam_roofline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _roofline(n, threads):
    """The roofline row: built from benchmarks/roofline.c (not part of the package)."""
    module = _roofline_module()
    if module is None:
        raise Unavailable("the roofline is built from benchmarks/roofline.c of a source checkout")
    try:
        return module.make(n, threads, _buffers)
    except OSError as e:
        raise Unavailable(str(e))


def _torch_stepper(torch, opt, threads):
    """A step of a torch optimizer on ``threads`` threads, after one warm-up step."""
    torch.set_num_threads(threads)
    opt.step()

    def step():
        torch.set_num_threads(threads)
        opt.step()
    return step


def _torch_params(torch, arrays, grads):
    """torch Parameters sharing the arrays' memory, with the gradients set."""
    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in arrays]
    for param, g in zip(params, grads):
        param.grad = torch.from_numpy(g)
    return params


def _torch_optimizer(kind, threads, arrays, grads):
    """A step of the torch-side optimizer ``kind`` over torch views of the arrays."""
    try:
        import torch
    except ImportError:
        raise Unavailable("torch is not installed (pip install torch)")
    params = _torch_params(torch, arrays, grads)
    if kind in ("fastadam-torch", "fastadam-torch-bf16"):  # threads: fastadam's (num_threads)
        from . import torch as fastadam_torch
        opt = fastadam_torch.Adam(params, lr=1e-3, num_threads=threads,
                                  state_dtype="bfloat16" if kind.endswith("bf16") else "float32")
        opt.step()
        return opt.step
    if kind == "deepspeed-cpu-adam":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            opt = DeepSpeedCPUAdam(params, lr=1e-3, adamw_mode=False)
            return _torch_stepper(torch, opt, threads)
        except Exception as e:  # ImportError, or its build failing
            raise Unavailable(f"deepspeed is not usable ({type(e).__name__}: {e}); "
                              "pip install deepspeed")
    mode = kind.split("-", 1)[1]  # torch-foreach, torch-fused
    return _torch_stepper(torch, torch.optim.Adam(params, lr=1e-3, **{mode: True}), threads)


def _torch_side(kind):
    def make(n, threads):
        p, g = _buffers(n)
        return _torch_optimizer(kind, threads, [p], [g])
    return make


def _bitsandbytes_adam8bit(n, threads):
    """bitsandbytes' blockwise 8-bit Adam on the CPU (pip install bitsandbytes; needs torch)."""
    try:
        import torch
        import bitsandbytes
    except Exception as e:  # ImportError, or its native library failing to load
        raise Unavailable(f"bitsandbytes is not usable ({type(e).__name__}: {e}); "
                          "pip install bitsandbytes")
    p, g = _buffers(n)
    param = torch.nn.Parameter(torch.from_numpy(p))
    param.grad = torch.from_numpy(g)
    return _torch_stepper(torch, bitsandbytes.optim.Adam8bit([param], lr=1e-3, min_8bit_size=4096),
                          threads)


IMPLEMENTATIONS = {
    "numpy-textbook": _numpy_textbook,
    "fastadam-cython": _fastadam("cython"),
    "fastadam-numba": _fastadam("numba"),
    "fastadam-skip-nonfinite": _fastadam("cython", skip_if_nonfinite=True),
    "fastadam-clip": _fastadam("cython", max_grad_norm=1.0),
    "fastadam-bf16": _fastadam("cython", state_dtype="bfloat16"),
    "fastadam-int8": _fastadam("cython", state_dtype="int8"),
    "fastadam-numba-bf16": _fastadam("numba", state_dtype="bfloat16"),
    "bitsandbytes-adam8bit": _bitsandbytes_adam8bit,
    "fastadam-clip-skip-nonfinite": _fastadam("cython", max_grad_norm=1.0, skip_if_nonfinite=True),
    "fastadam-torch": _torch_side("fastadam-torch"),
    "fastadam-torch-bf16": _torch_side("fastadam-torch-bf16"),
    "torch-foreach": _torch_side("torch-foreach"),
    "torch-fused": _torch_side("torch-fused"),
    "deepspeed-cpu-adam": _torch_side("deepspeed-cpu-adam"),
    "roofline": _roofline,
}
PEERS = ("torch-foreach", "torch-fused", "deepspeed-cpu-adam")


# -- the model-shaped step: many tensors of mixed sizes ---------------------------------

def model_like_shapes(layers=50):
    """200 tensors, 6.6M parameters: blocks of (128, 512) and (512, 128) weights with biases."""
    shapes = []
    for _ in range(layers):
        shapes += [(128, 512), (512,), (512, 128), (128,)]
    return shapes


def _model_shaped(kind):
    def make(n, threads):
        rng = np.random.default_rng(0)
        shapes = model_like_shapes()
        if kind == "fastadam-flat":
            flat = fastadam.FlatParameters({str(i): s for i, s in enumerate(shapes)})
            flat.data[...] = rng.standard_normal(flat.data.shape)
            flat.grad[...] = rng.standard_normal(flat.grad.shape)
            opt, grads = fastadam.Adam([flat.data], num_threads=threads), [flat.grad]
        else:
            params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
            grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
            if kind not in ("fastadam-list", "numpy-textbook-list"):
                return _torch_optimizer(kind, threads, params, grads)
            opt = (TextbookAdam(params) if kind == "numpy-textbook-list"
                   else fastadam.Adam(params, num_threads=threads))
        opt.step(grads)
        return lambda: opt.step(grads)
    return make


MODEL_SHAPED_PARAMS = sum(math.prod(s) for s in model_like_shapes())
MODEL_SHAPED = {kind: _model_shaped(kind) for kind in (
    "numpy-textbook-list", "fastadam-list", "fastadam-flat", "fastadam-torch", "torch-foreach",
    "torch-fused", "deepspeed-cpu-adam")}


# -- timing ----------------------------------------------------------------------------

def _calibrate(step, target_seconds):
    """Steps per timed batch so that a batch lasts about target_seconds."""
    step()
    t0 = time.perf_counter()
    step()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(target_seconds / one))


def measure(sizes, impls, threads_list, rounds, target_seconds=0.05, log=print,
            makers=IMPLEMENTATIONS):
    """[{size, impl, threads, median_s, ...}]; implementations interleaved per round."""
    results = []
    for n in sizes:
        for threads in threads_list:
            steps, skipped = {}, {}
            for name in impls:
                try:
                    steps[name] = makers[name](n, threads)
                except Unavailable as e:
                    skipped[name] = str(e)
            counts = {name: _calibrate(step, target_seconds) for name, step in steps.items()}
            times = {name: [] for name in steps}
            order = list(steps)
            for _ in range(rounds):
                random.shuffle(order)
                for name in order:
                    step, k = steps[name], counts[name]
                    t0 = time.perf_counter()
                    for _ in range(k):
                        step()
                    times[name].append((time.perf_counter() - t0) / k)
            for name in impls:
                if name in skipped:
                    results.append({"size": n, "impl": name, "threads": threads, "skipped": skipped[name]})
                    continue
                median = statistics.median(times[name])
                results.append({"size": n, "impl": name, "threads": threads, "median_s": median,
                                "min_s": min(times[name]), "rounds": rounds,
                                "steps_per_round": counts[name],
                                "ns_per_param": median / n * 1e9,
                                "gb_per_s": BYTES_PER_PARAM * n / median / 1e9})
            del steps
            gc.collect()
            log(f"  measured {LABELS.get(n, n)} x {threads} thread(s)")
    return results


def machine():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "fastadam": fastadam.__version__, "cpus_usable": all_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        from . import _kernel
        info["kernel_isa"] = _kernel.isa_in_use()
        info["openmp"] = _kernel.OPENMP_ENABLED
    except ImportError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def table(results, log=print, title="{label} float32 parameters ({n})", baseline="numpy-textbook"):
    """Per size and thread count: the comparison table."""
    by_key = {}
    for r in results:
        by_key.setdefault((r["size"], r["threads"]), {})[r["impl"]] = r
    for (n, threads), rows in by_key.items():
        log("\n" + title.format(label=LABELS.get(n, n), n=n) + f", {threads} thread(s)")
        roof = rows.get("roofline", {}).get("median_s")
        ref = rows.get(baseline, {}).get("median_s")
        peers = [p for p in PEERS if rows.get(p, {}).get("median_s")]
        header = (f"  {'implementation':20s} {'us/step':>10s} {'ns/param':>9s} {'GB/s':>7s} "
                  f"{'%roof':>6s} {'x numpy':>8s}" + "".join(f" {'x ' + p:>20s}" for p in peers))
        log(header)
        for name, r in rows.items():
            if "skipped" in r:
                log(f"  {name:20s} skipped: {r['skipped'][:90]}")
                continue
            t = r["median_s"]
            cells = [f"  {name:20s} {t * 1e6:10.2f} {r['ns_per_param']:9.3f} {r['gb_per_s']:7.1f}",
                     f"{100 * roof / t:6.0f}" if roof else f"{'':6s}",
                     f"{ref / t:8.1f}" if ref else f"{'':8s}"]
            cells += [f"{rows[p]['median_s'] / t:20.2f}" for p in peers]
            log(" ".join(cells))


def _has_matplotlib():
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = max(r["threads"] for r in results)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in IMPLEMENTATIONS:
        rows = [r for r in results if r["impl"] == name and r["threads"] == threads and "median_s" in r]
        if not rows:
            continue
        style = dict(color="black", linestyle="--") if name == "roofline" else dict(marker="o")
        ax.plot([r["size"] for r in rows], [r["ns_per_param"] for r in rows], label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("float32 parameters per step")
    ax.set_ylabel("ns per parameter (median)")
    ax.set_title(f"Adam step, {threads} thread(s): lower is better")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the step in context: alone, cache-cold, inside a training loop -----------

def step_in_context(rounds=200, hidden=(256, 128), batch_size=128, log=print):
    """The MNIST MLP's optimizer step (784-256-128-10 by default, 235,152 parameters)
    in three contexts, per thread setting (None: the thread policy, which plans in
    context; 1; every usable CPU), medians in us:

    - alone: back to back, buffers hot in cache;
    - cache-cold: 40 MB touched before each step;
    - in the loop: right after the forward and backward pass of a batch (NumPy's
      BLAS threads have just run), as in ``python -m fastadam.mnist``.
    The step costs what the loop makes it cost; this keeps the gap visible."""
    from .mnist import data
    from .mnist.model import MLP

    x_train, y_train, _, _ = data.load_dataset(data.locate(download=False))
    junk = np.ones(10_000_000, np.float32)
    rows = []
    for threads in (None, 1, all_threads()):
        row = {"threads": "policy" if threads is None else threads}
        for context in ("alone", "cache-cold", "in the loop"):
            model = MLP([784, *hidden, 10], np.random.default_rng(0))
            opt = fastadam.Adam([model.flat.data], num_threads=threads)
            rng = np.random.default_rng(1)
            times = []
            if context == "alone":
                time.sleep(0.5)  # let BLAS threads that spin after a matrix product go to sleep
            for i in range(rounds + 20):
                if context == "in the loop":
                    batch = rng.integers(0, len(x_train), batch_size)
                    model.loss_and_backward(x_train[batch], y_train[batch])
                elif context == "cache-cold":
                    junk += 1.0
                elif i == 0:  # alone: no BLAS call anywhere near the steps
                    model.flat.grad[...] = rng.standard_normal(model.flat.grad.size) * 1e-2
                start = time.perf_counter()
                opt.step([model.flat.grad])
                times.append(time.perf_counter() - start)
            row[context] = float(np.median(times[20:])) * 1e6  # after the planner's trial
        rows.append(row)
    log(f"\nMNIST MLP step in context ({784}-{'-'.join(map(str, hidden))}-10, median us)")
    log(f"  {'threads':>8s} {'alone':>10s} {'cache-cold':>11s} {'in the loop':>12s}")
    for row in rows:
        log(f"  {str(row['threads']):>8s} {row['alone']:10.0f} {row['cache-cold']:11.0f} "
            f"{row['in the loop']:12.0f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastadam.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(LABELS[s] for s in SIZES),
                   help="comma-separated sizes (4K, 64K, 1M, 16M, 64M or numbers)")
    p.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="comma-separated implementations")
    p.add_argument("--threads", default="1,all", help="comma-separated thread counts ('all' = every usable CPU)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--model-rounds", type=int, default=7,
                   help="rounds of the model-shaped step's table (0: leave it out)")
    p.add_argument("--context-rounds", type=int, default=200,
                   help="steps per cell of the step-in-context table (0: leave it out)")
    p.add_argument("--json", default="bench.json")
    p.add_argument("--plot", default=None,
                   help="the PNG to draw (default bench.png where matplotlib is installed)")
    args = p.parse_args(argv)
    if not _has_matplotlib():  # said before the measuring, not after it
        if args.plot is not None:
            p.error('--plot needs matplotlib (pip install "fastadam[bench]")')
        print('no plot: matplotlib is not installed (pip install "fastadam[bench]")', file=sys.stderr)
    elif args.plot is None:
        args.plot = "bench.png"
    inverse = {v: k for k, v in LABELS.items()}
    sizes = [inverse[s] if s in inverse else int(s) for s in args.sizes.split(",")]
    impls = [s for s in args.impls.split(",") if s]
    unknown = [s for s in impls if s not in IMPLEMENTATIONS]
    if unknown:
        p.error(f"unknown implementations {unknown}; choose from {list(IMPLEMENTATIONS)}")
    threads_list = sorted({all_threads() if t == "all" else int(t) for t in args.threads.split(",")})
    info = machine()
    print(f"machine: {info}", flush=True)
    results = measure(sizes, impls, threads_list, args.rounds, log=lambda s: print(s, file=sys.stderr))
    table(results)
    model_shaped = []
    if args.model_rounds > 0:
        model_shaped = measure([MODEL_SHAPED_PARAMS], list(MODEL_SHAPED), threads_list,
                               args.model_rounds, log=lambda s: print(s, file=sys.stderr),
                               makers=MODEL_SHAPED)
        table(model_shaped, title="model-shaped step: 200 tensors, {n} float32 parameters",
              baseline="numpy-textbook-list")
    context = step_in_context(args.context_rounds) if args.context_rounds > 0 else []
    with open(args.json, "w") as f:
        json.dump({"machine": info, "command": " ".join(sys.argv), "results": results,
                   "model_shaped": model_shaped, "step_in_context": context}, f, indent=1)
    if args.plot is not None:
        plot(results, args.plot)
    print(f"\nwrote {args.json}" + (f" and {args.plot}" if args.plot is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
