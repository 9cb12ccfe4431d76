"""ZeroAdam's step against one process, and a model of a step at scale.

    python benchmarks/zero_step.py                      # 1 process x all its threads: fastadam.Adam
    mpiexec -n 2 python benchmarks/zero_step.py         # 2 ranks (threads shared): ZeroAdam

Prints per size the median step time over interleaved rounds, the bytes each rank
sends per step (reduce-scatter plus all-gather: 2 (N-1)/N x 4 bytes x parameters), and
the optimizer-state bytes per rank.  With --model, also the cost of a step of a
1B-parameter model on M machines, from a measured kernel rate (ns per parameter on one
machine) and the standard collective cost at a given link speed.
"""
import argparse
import time

import numpy as np

SIZES = {"1M": 1 << 20, "16M": 1 << 24}


def measure(n, rounds, steps):
    import fastadam
    try:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None
    except ImportError:
        comm = None
    if comm is None:
        flat = fastadam.FlatParameters({"w": (n,)})
        opt = fastadam.Adam([flat.data])
        size, barrier = 1, (lambda: None)
    else:
        from fastadam.distributed import ZeroAdam, flat_parameters
        flat = flat_parameters({"w": (n,)}, comm)
        opt = ZeroAdam([flat.data], comm=comm)
        size, barrier = comm.Get_size(), comm.Barrier
    flat.data[...] = np.random.default_rng(0).standard_normal(flat.numel)
    flat.grad[...] = np.random.default_rng(1).standard_normal(flat.numel)
    opt.step([flat.grad])
    times = []
    for _ in range(rounds):
        barrier()
        t = time.perf_counter()
        for _ in range(steps):
            opt.step([flat.grad])
        times.append((time.perf_counter() - t) / steps)
    state = opt.state_nbytes()
    sent = 2 * (size - 1) / size * 4 * flat.numel
    return size, float(np.median(times)), sent, state


def model(ns_per_param, params=1e9):
    print(f"\nA step of a {params:.0e}-parameter float32 model, ZeRO-1 on M machines; kernel "
          f"{ns_per_param} ns/param on one machine; collectives 2 (M-1)/M x 4 B x params per link")
    print("  machines  link      kernel (ms)  communication (ms)  step (ms)  communication share")
    for machines in (8, 64):
        kernel = params / machines * ns_per_param * 1e-6
        for gbits in (10, 100):
            comm = 2 * (machines - 1) / machines * 4 * params / (gbits * 1e9 / 8) * 1e3
            print(f"  {machines:8d}  {gbits:3d} Gb/s  {kernel:11.1f}  {comm:18.1f}  "
                  f"{kernel + comm:9.1f}  {comm / (kernel + comm):.0%}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M,16M")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--model", type=float, metavar="NS_PER_PARAM",
                   help="print the at-scale model with this kernel rate")
    args = p.parse_args()
    rank = 0
    try:
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
    except ImportError:
        pass
    for name in args.sizes.split(","):
        n = SIZES[name]
        size, seconds, sent, state = measure(n, args.rounds, max(3, (1 << 24) // n // 4))
        if rank == 0:
            print(f"{name:>4} params, {size} process(es): step {seconds * 1e3:8.3f} ms "
                  f"({seconds / n * 1e9:.3f} ns/param), sent per rank {sent / 2**20:7.1f} MiB, "
                  f"state per rank {state / 2**20:6.1f} MiB")
    if args.model and rank == 0:
        model(args.model)


if __name__ == "__main__":
    main()
