"""What fastadam.torch adds per step over fastadam.Adam: one 4096-element float32 tensor,
fresh gradient tensors each step as after zero_grad(set_to_none=True); medians of 5 rounds.

    python benchmarks/torch_layer_overhead.py
"""
import time

import numpy as np
import torch

import fastadam
import fastadam.torch

N, STEPS = 4096, 5000
param = torch.nn.Parameter(torch.randn(N))
opt = fastadam.torch.Adam([param])
grads = [torch.randn(N) for _ in range(8)]
p, g = np.random.default_rng(0).standard_normal((2, N)).astype(np.float32)
plain = fastadam.Adam([p])
layer, direct = [], []
for _ in range(5):
    t = time.perf_counter()
    for k in range(STEPS):
        param.grad = grads[k % 8]
        opt.step()
    layer.append((time.perf_counter() - t) / STEPS)
    t = time.perf_counter()
    for k in range(STEPS):
        plain.step([g])
    direct.append((time.perf_counter() - t) / STEPS)
a, b = np.median(layer) * 1e6, np.median(direct) * 1e6
print(f"fastadam.torch.Adam {a:.2f} us  fastadam.Adam {b:.2f} us  added {a - b:.2f} us")
