"""fastadam.torch's layer on the model-shaped step (200 tensors, 6.6M parameters, as in
``python -m fastadam.bench``): the torch optimizer against its own inner fastadam.Adam over the
same memory, interleaved, medians of 25 rounds of 3 steps; then the compiled plan's per-step
checks and gradient views alone (``TorchPlan.gradients``), with warm caches and right after a
step (cold).

    python benchmarks/torch_layer_model.py [--threads T]
"""
import argparse
import statistics
import time

import numpy as np
import torch

import fastadam.torch
from fastadam.bench import model_like_shapes

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)
rng = np.random.default_rng(0)
params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s, dtype=np.float32)))
          for s in model_like_shapes()]
for p in params:
    p.grad = torch.from_numpy(rng.standard_normal(p.shape, dtype=np.float32))
opt = fastadam.torch.Adam(params, num_threads=args.threads)
opt.step()
plan = opt._plan
inner, grads = plan.inner, [p.grad.numpy() for p in params]

steps = {"fastadam.torch": opt.step, "its inner fastadam.Adam": lambda: inner.step(grads)}
times = {name: [] for name in steps}
for _ in range(25):
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(3):
            step()
        times[name].append((time.perf_counter() - start) / 3 * 1e3)
for name, t in times.items():
    print(f"{len(params)} tensors, {args.threads} thread(s): {name} {statistics.median(t):.3f} ms")

warm, cold = [], []
for _ in range(30):
    start = time.perf_counter()
    for _ in range(10):
        plan.gradients(opt.param_groups, opt.state)
    warm.append((time.perf_counter() - start) / 10 * 1e6)
    opt.step()
    start = time.perf_counter()
    plan.gradients(opt.param_groups, opt.state)
    cold.append((time.perf_counter() - start) * 1e6)
print(f"TorchPlan.gradients, {len(params)} tensors: warm {statistics.median(warm):.0f} us, "
      f"right after a step {statistics.median(cold):.0f} us")
