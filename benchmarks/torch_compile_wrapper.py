"""What torch.compiler.disable's wrapper on fastadam.torch.Adam.step costs: a 4K-parameter
step through the wrapped method against the method it wraps, interleaved batches.

    python benchmarks/torch_compile_wrapper.py [--rounds 9] [--steps 20000]
"""
import argparse
import statistics
import time

import torch

import fastadam.torch as ft


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args()
    p = torch.nn.Parameter(torch.randn(4096))
    p.grad = torch.randn(4096)
    opt = ft.Adam([p])
    opt.step()
    wrapped = ft.Adam.step
    bare = getattr(wrapped, "__wrapped__", None)
    if bare is None:
        raise SystemExit("Adam.step is not wrapped in this torch")
    times = {"wrapped": [], "bare": []}
    try:
        for _ in range(args.rounds):
            for name, fn in (("wrapped", wrapped), ("bare", bare)):
                ft.Adam.step = fn
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    opt.step()
                times[name].append((time.perf_counter() - t0) / args.steps * 1e6)
    finally:
        ft.Adam.step = wrapped
    for name, values in times.items():
        print(f"{name:8s} median {statistics.median(values):.3f} us a step")


if __name__ == "__main__":
    main()
