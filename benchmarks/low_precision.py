"""bfloat16 and float16 parameters: fastadam's step in each mode against torch's fused
CPU step on the same dtype, in one interleaved run (fastadam.bench.measure).

    python benchmarks/low_precision.py [--sizes 4K,64K,1M,16M,64M] [--threads 1,all] [--rounds 15]

Per size: ns per parameter, GB/s from the bytes each mode moves, and the time of
torch fused (bfloat16 or float16 parameters) over each row's.  The float32 rows
(fastadam, torch fused) are the reference point.
"""
import argparse
import json
import sys

import numpy as np

from fastadam import bench

# Bytes a step moves per parameter: read p, g, m, v and write p, m, v, plus the master.
BYTES = {"f32-fastadam": 28, "f32-torch-fused": 28,
         "bf16-fastadam": 14, "bf16-fastadam-stochastic": 14, "bf16-torch-fused": 14,
         "bf16-fastadam-split": 26, "bf16-fastadam-split-bf16state": 18, "bf16-fastadam-master": 28,
         "f16-fastadam": 14, "f16-fastadam-master": 28, "f16-torch-fused": 14}


def _arrays(n, dtype):
    p, g = bench._buffers(n)
    return p.astype(dtype), g.astype(dtype)


def _fastadam(dtype_name, **options):
    def make(n, threads):
        import fastadam
        if fastadam._backends.available()["cython"] is not None:
            raise bench.Unavailable("the compiled kernel is not built")
        dtype = np.float32 if dtype_name == "f32" else np.float16 if dtype_name == "f16" else _bf16()
        p, g = _arrays(n, dtype)
        opt = fastadam.Adam([p], num_threads=threads, **options)
        opt.step([g])
        return lambda: opt.step([g])
    return make


def _bf16():
    try:
        import ml_dtypes
    except ImportError:
        raise bench.Unavailable("ml_dtypes is not installed (pip install ml-dtypes)")
    return ml_dtypes.bfloat16


def _torch_fused(dtype_name):
    def make(n, threads):
        try:
            import torch
        except ImportError:
            raise bench.Unavailable("torch is not installed")
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype_name]
        p, g = bench._buffers(n)
        param = torch.nn.Parameter(torch.from_numpy(p).to(dtype))
        param.grad = torch.from_numpy(g).to(dtype)
        return bench._torch_stepper(torch, torch.optim.Adam([param], lr=1e-3, fused=True), threads)
    return make


MAKERS = {
    "f32-fastadam": _fastadam("f32"),
    "f32-torch-fused": _torch_fused("f32"),
    "bf16-fastadam": _fastadam("bf16"),
    "bf16-fastadam-stochastic": _fastadam("bf16", param_rounding="stochastic"),
    "bf16-fastadam-split": _fastadam("bf16", master_weights="split"),
    "bf16-fastadam-split-bf16state": _fastadam("bf16", master_weights="split", state_dtype="bfloat16"),
    "bf16-fastadam-master": _fastadam("bf16", master_weights="float32"),
    "bf16-torch-fused": _torch_fused("bf16"),
    "f16-fastadam": _fastadam("f16"),
    "f16-fastadam-master": _fastadam("f16", master_weights="float32"),
    "f16-torch-fused": _torch_fused("f16"),
}


def report(results, log=print):
    by_key = {}
    for r in results:
        by_key.setdefault((r["size"], r["threads"]), {})[r["impl"]] = r
    for (n, threads), rows in by_key.items():
        log(f"\n{bench.LABELS.get(n, n)} parameters ({n}), {threads} thread(s)")
        log(f"  {'implementation':30s} {'us/step':>10s} {'ns/param':>9s} {'GB/s':>7s} {'torch fused (same dtype) / this':>32s}")
        for name, r in rows.items():
            if "skipped" in r:
                log(f"  {name:30s} skipped: {r['skipped'][:80]}")
                continue
            t = r["median_s"]
            peer = name.split("-")[0] + "-torch-fused"
            ratio = rows.get(peer, {}).get("median_s")
            log(f"  {name:30s} {t * 1e6:10.2f} {t / n * 1e9:9.3f} {BYTES[name] * n / t / 1e9:7.1f} "
                + (f"{ratio / t:32.2f}" if ratio else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4K,64K,1M,16M,64M")
    p.add_argument("--threads", default="all", help="comma-separated thread counts ('all': every usable CPU)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--impls", default=",".join(MAKERS))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sizes = [{v: k for k, v in bench.LABELS.items()}[s] for s in args.sizes.split(",")]
    threads = [bench.all_threads() if t == "all" else int(t) for t in args.threads.split(",")]
    results = bench.measure(sizes, args.impls.split(","), threads, args.rounds, makers=MAKERS,
                            log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(bench.machine()))
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": bench.machine(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
