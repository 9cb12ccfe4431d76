"""Exercise every compiled path once, for a memory checker (valgrind; see README).

Each variant, both dtypes, odd lengths and views at odd offsets, several tensors in one
step, the parallel path, and skip_if_nonfinite; every variant the
CPU offers.  Exits non-zero if a result differs from the NumPy reference.
"""
import numpy as np

import fastadam
from fastadam import _kernel


def check(cls, kw, dtype, sizes, threads, rng):
    buffers = [rng.standard_normal(n + 3).astype(dtype) for n in sizes]
    params = [b[1:1 + n] for b, n in zip(buffers, sizes)]  # odd offsets
    ref = [p.copy() for p in params]
    opt = cls(params, backend="cython", num_threads=threads, **kw)
    ref_opt = cls(ref, backend="numpy", **kw)
    for _ in range(3):
        grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
        opt.step(grads)
        ref_opt.step(grads)
    for a, b in zip(params, ref):
        if not np.array_equal(a, b):
            raise SystemExit(f"mismatch: {cls.__name__} {kw} {dtype} {sizes}")


def main():
    rng = np.random.default_rng(0)
    variants = [(fastadam.Adam, {}), (fastadam.Adam, dict(weight_decay=0.1, amsgrad=True)),
                (fastadam.AdamW, dict(maximize=True)), (fastadam.AdamW, dict(amsgrad=True, maximize=True))]
    for isa in _kernel.ISA_NAMES:
        if not _kernel.isa_supported(isa):
            continue
        _kernel.select_isa(isa)
        for cls, kw in variants:
            for dtype in (np.float32, np.float64):
                check(cls, kw, dtype, [1, 7, 17, 1000], 1, rng)
        check(fastadam.Adam, {}, np.float32, [70_001, 5, 40_003], 2, rng)  # the parallel path
        for cls, kw in variants:  # bfloat16 state, serial and parallel, clipping
            check(cls, dict(kw, state_dtype="bfloat16"), np.float32, [1, 7, 17, 1000], 1, rng)
        check(fastadam.Adam, dict(state_dtype="bfloat16", max_grad_norm=1.0), np.float32,
              [70_001, 5, 40_003], 2, rng)
        print("checked", isa, flush=True)
    p = np.zeros(50_000, np.float32)
    opt = fastadam.Adam([p], skip_if_nonfinite=True, num_threads=2)
    g = np.ones_like(p)
    g[-1] = np.nan
    assert opt.step([g]) is False and not p.any()
    print("ok")


if __name__ == "__main__":
    main()
