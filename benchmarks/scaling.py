"""How the step scales with threads: 1, 2, 4, ... up to every usable CPU.

    python benchmarks/scaling.py [--sizes 1M,16M,64M,256M] [--rounds 5] [--impls ...] [--json F]

Per size: for each implementation and thread count, ns per parameter and GB/s
from the bytes that mode moves (a float32 step reads p, g, m, v and writes p, m,
v: 28 bytes; benchmarks/low_precision.py and fastadam.bench have the others),
one interleaved run (fastadam.bench.measure) per size and count; then the thread
count fastadam's planner settles on for that size with num_threads=None.  torch
fused and DeepSpeedCPUAdam are measured where installed.  docs/speed.md holds the
cost model these points are read against.
"""
import argparse
import json
import sys

import low_precision
from fastadam import bench

BYTES = dict(low_precision.BYTES, **{"f32-fastadam-bf16state": 16, "f32-fastadam-int8": 12,
                                     "f32-deepspeed-cpu-adam": 28})
MAKERS = {
    "f32-fastadam": low_precision.MAKERS["f32-fastadam"],
    "f32-fastadam-bf16state": bench.IMPLEMENTATIONS["fastadam-bf16"],
    "f32-fastadam-int8": bench.IMPLEMENTATIONS["fastadam-int8"],
    "bf16-fastadam": low_precision.MAKERS["bf16-fastadam"],
    "bf16-fastadam-split": low_precision.MAKERS["bf16-fastadam-split"],
    "f32-torch-fused": low_precision.MAKERS["f32-torch-fused"],
    "bf16-torch-fused": low_precision.MAKERS["bf16-torch-fused"],
    "f32-deepspeed-cpu-adam": bench.IMPLEMENTATIONS["deepspeed-cpu-adam"],
}
SIZES = {"1M": 1 << 20, "16M": 1 << 24, "64M": 1 << 26, "256M": 1 << 28}
ALONE_FROM = 1 << 28


def thread_counts():
    most, counts, c = bench.all_threads(), [], 1
    while c < most:
        counts.append(c)
        c *= 2
    return counts + [most]


def planned(n, steps=60):
    """The count the planner settles on for a float32 step of n parameters."""
    import fastadam
    p, g = bench._buffers(n)
    opt = fastadam.Adam([p], backend="cython")
    for _ in range(steps):
        opt.step([g])
    return opt._plan.chosen_threads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--impls", default=",".join(MAKERS))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    impls, counts = args.impls.split(","), thread_counts()
    info = bench.machine()
    print(json.dumps(info))
    out = []
    for label in args.sizes.split(","):
        n = SIZES[label]
        # One size at a time, so that only its buffers are held; from 256M up, one
        # implementation at a time too (all of them at once would need over 20 GB).
        groups = [impls] if n < ALONE_FROM else [[name] for name in impls]
        results = [r for group in groups
                   for r in bench.measure([n], group, counts, args.rounds, makers=MAKERS,
                                          log=lambda s: print(s, file=sys.stderr))]
        choice = planned(n)
        out += results
        rows = {(r["impl"], r["threads"]): r for r in results}
        alone = " (one implementation at a time)" if n >= ALONE_FROM else ""
        print(f"\n{label} parameters ({n}){alone}; the planner chose {choice} thread(s)")
        print(f"  {'implementation':26s}" + "".join(f"{f'{t} thr ns/p':>13s}{'GB/s':>7s}" for t in counts))
        for name in impls:
            cells = []
            for t in counts:
                r = rows[(name, t)]
                if "skipped" in r:
                    cells.append(f"{'-':>13s}{'':>7s}")
                else:
                    s = r["median_s"]
                    cells.append(f"{s / n * 1e9:13.3f}{BYTES[name] * n / s / 1e9:7.1f}")
            skipped = next((rows[(name, t)]["skipped"] for t in counts if "skipped" in rows[(name, t)]), "")
            print(f"  {name:26s}" + "".join(cells) + (f"  skipped: {skipped[:60]}" if skipped else ""))
        out.append({"size": n, "planner_threads": choice})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "thread_counts": counts, "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
