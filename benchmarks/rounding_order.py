"""Why low-precision parameters use torch's order of operations: 100 steps of mixed-scale
gradients (each element at its own scale) on bfloat16 and float16 parameters, computed in float32 in fastadam's order and in
torch's fused order (each rounded to the parameter's dtype every step, as the state is), against
torch.optim.Adam(fused=True).  Prints the fraction of elements bit-equal to torch's.

    python benchmarks/rounding_order.py
"""
import numpy as np
import torch

from fastadam import _formats


def simulate(p, grads, dtype, order, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    f = np.float32
    p = p.astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g, pf, mf, vf = (x.astype(dtype).astype(f) for x in (g, p, m, v))
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        if order == "fastadam":
            mf = f(b1) * mf + f(1 - b1) * g
            vf = f(b2) * vf + f(1 - b2) * (g * g)
            pf = pf - f(lr / bc1) * (mf / (np.sqrt(vf) * f(1 / np.sqrt(bc2)) + f(eps)))
        else:
            mf = _formats._fma32(f(1 - b1), g - mf, mf)
            vf = vf * f(b2) + f(1 - b2) * g * g
            pf = pf - f(lr / bc1) * mf / (np.sqrt(vf) / f(np.sqrt(bc2)) + f(eps))
        p, m, v = pf.astype(dtype), mf.astype(dtype), vf.astype(dtype)
    return p.astype(np.float32)


def main():
    import ml_dtypes
    rng = np.random.default_rng(0)
    n = 1 << 16
    p0 = rng.standard_normal(n).astype(np.float32)
    scales = 10.0 ** rng.uniform(-4, 2, n).astype(np.float32)  # each element's own, 1e-4 to 1e2
    grads = [rng.standard_normal(n).astype(np.float32) * scales for _ in range(100)]
    for dtype, tdtype in ((ml_dtypes.bfloat16, torch.bfloat16), (np.float16, torch.float16)):
        t = torch.nn.Parameter(torch.from_numpy(p0).to(tdtype))
        opt = torch.optim.Adam([t], lr=1e-3, fused=True)
        for g in grads:
            t.grad = torch.from_numpy(g).to(tdtype)
            opt.step()
        theirs = t.detach().float().numpy()
        for order in ("fastadam", "torch"):
            mine = simulate(p0, grads, dtype, order)
            same = np.mean((mine == theirs) | (np.isnan(mine) & np.isnan(theirs)))
            print(f"{np.dtype(dtype).name:9s} {order:9s} order: {same:.5f} of the elements bit-equal to torch fused")


if __name__ == "__main__":
    main()
