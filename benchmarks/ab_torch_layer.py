"""A/B helper: what two versions of fastadam.torch add per step over their inner
fastadam.Adam, in one process, interleaved (the machine's drift hits all alike).

BEFORE is another version's fastadam/torch.py, loaded as a module of this checkout's
package (same compiled kernel), e.g. from a worktree of an older commit:

    python benchmarks/ab_torch_layer.py /path/to/old/fastadam/torch.py [--tensors N] [--rounds 101]

One 4096-element float32 tensor (or N), fresh gradient tensors each step from 8 sets; each
layer's own inner optimizer steps the same memory with the same gradients as NumPy
views.  Medians of every step.
"""
import argparse
import importlib.util
import time

import numpy as np
import torch

import fastadam.torch as after

parser = argparse.ArgumentParser()
parser.add_argument("before")
parser.add_argument("--tensors", type=int, default=1)
parser.add_argument("--rounds", type=int, default=101)
args = parser.parse_args()
spec = importlib.util.spec_from_file_location("fastadam._ab_before", args.before)
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)

torch.set_num_threads(1)
N, BATCH = 4096, 200
grads = [[torch.randn(N) for _ in range(args.tensors)] for _ in range(8)]
views = [[g.numpy() for g in grad_set] for grad_set in grads]


def inner_of(opt):
    plan = getattr(opt, "_plan", None)
    return plan.inner if plan is not None else opt._inner


def make(module):
    params = [torch.nn.Parameter(torch.randn(N)) for _ in range(args.tensors)]
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt = module.Adam(params)
    opt.step()
    return params, opt


def layer_batch(params, opt, out):
    for k in range(BATCH):
        for p, g in zip(params, grads[k % 8]):
            p.grad = g
        t = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t)


def inner_batch(opt, out):
    inner = inner_of(opt)
    for k in range(BATCH):
        gs = views[k % 8]
        t = time.perf_counter()
        inner.step(gs)
        out.append(time.perf_counter() - t)


times = {name: [] for name in ("before", "before's inner", "after", "after's inner")}
(pb, b), (pa, a) = make(before), make(after)
jobs = [lambda: layer_batch(pb, b, times["before"]), lambda: inner_batch(b, times["before's inner"]),
        lambda: layer_batch(pa, a, times["after"]), lambda: inner_batch(a, times["after's inner"])]
for job in jobs:  # warm-up
    job()
for v in times.values():
    v.clear()
for r in range(args.rounds):
    for job in (jobs if r % 2 else jobs[::-1]):
        job()
m = {k: np.median(v) * 1e6 for k, v in times.items()}
print("  ".join(f"{k} {v:.2f} us" for k, v in m.items()))
added_before = m["before"] - m["before's inner"]
added_after = m["after"] - m["after's inner"]
print(f"added over the inner step: before {added_before:.2f} us, after {added_after:.2f} us")
