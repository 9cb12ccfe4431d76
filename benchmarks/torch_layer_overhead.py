"""What fastadam.torch adds per step over fastadam.Adam: one 4096-element float32 tensor
(and, with --tensors N, N of them), fresh gradient tensors each step as after
zero_grad(set_to_none=True), taken in turn from 8 sets.  The fastadam.Adam compared
is the torch optimizer's own inner one, stepping the same parameter and state memory
with the same 8 gradient sets as NumPy views, so that only the layer differs (two
separate optimizers would also differ by where their buffers lie).  The two run interleaved, in short batches in turn (the machine's
drift hits both alike): medians over the batches.

    python benchmarks/torch_layer_overhead.py [--tensors N]
"""
import argparse
import time

import numpy as np
import torch

import fastadam
import fastadam.torch

parser = argparse.ArgumentParser()
parser.add_argument("--tensors", type=int, default=1)
parser.add_argument("--rounds", type=int, default=301)
args = parser.parse_args()
N, BATCH = 4096, 200
torch.set_num_threads(1)
params = [torch.nn.Parameter(torch.randn(N)) for _ in range(args.tensors)]
opt = fastadam.torch.Adam(params)
grads = [[torch.randn(N) for _ in params] for _ in range(8)]
for p, g in zip(params, grads[0]):
    p.grad = g
opt.step()  # builds the plan and its inner fastadam.Adam
plain = opt._plan.inner
assert isinstance(plain, fastadam.Adam)
plain_grads = [[g.numpy() for g in grad_set] for grad_set in grads]  # the same memory


def layer_batch():
    for k in range(BATCH):
        for p, g in zip(params, grads[k % 8]):
            p.grad = g  # outside the timed step: as backward() would have set it
        t = time.perf_counter()
        opt.step()
        layer.append(time.perf_counter() - t)


def direct_batch():
    for k in range(BATCH):
        step_grads = plain_grads[k % 8]
        t = time.perf_counter()
        plain.step(step_grads)
        direct.append(time.perf_counter() - t)


layer, direct = [], []
layer_batch(), direct_batch()  # warm-up
layer, direct = [], []
for r in range(args.rounds):
    for batch in ((layer_batch, direct_batch) if r % 2 else (direct_batch, layer_batch)):
        batch()
a, b = np.median(layer) * 1e6, np.median(direct) * 1e6
print(f"{args.tensors} x {N} float32: fastadam.torch.Adam {a:.2f} us  fastadam.Adam {b:.2f} us  "
      f"added {a - b:.2f} us (medians of {len(layer)} steps each)")
