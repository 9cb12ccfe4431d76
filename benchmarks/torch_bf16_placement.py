"""One large bfloat16 step (16M parameters, 2 threads): torch.optim.AdamW(fused=True) against
fastadam.torch.AdamW with the parameter and its gradient in torch's memory and in NumPy's
(whose large allocations ask for huge pages), interleaved, medians of 15 steps each.

    python benchmarks/torch_bf16_placement.py [--rounds 2] [--numel 16777216]
"""
import argparse
import statistics
import time

import numpy as np
import torch

import fastadam.torch as ft


def median_ms(step, steps=15):
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bf16(n, memory):
    if memory == "torch":
        return torch.randn(n).to(torch.bfloat16)
    t = torch.from_numpy(np.zeros(n, np.int16)).view(torch.bfloat16)
    t.copy_(torch.randn(n))
    return t


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--numel", type=int, default=16 << 20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for _ in range(args.rounds):
        for name, memory in (("torch fused", "torch"), ("fastadam.torch", "torch"),
                             ("fastadam.torch", "numpy")):
            p = torch.nn.Parameter(bf16(args.numel, memory))
            p.grad = bf16(args.numel, memory)
            opt = (torch.optim.AdamW([p], lr=1e-4, fused=True) if name == "torch fused"
                   else ft.AdamW([p], lr=1e-4, num_threads=2))
            print(f"{name:15s} parameter and gradient in {memory}'s memory: "
                  f"{median_ms(opt.step):6.2f} ms", flush=True)


if __name__ == "__main__":
    main()
