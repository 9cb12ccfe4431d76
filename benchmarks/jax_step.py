"""One Adam step in JAX on the CPU, interleaved: optax.adam (update and apply_updates,
jitted, everything donated), fastadam.jax.step on the kernel's OpenMP team and on
XLA's intra-op pool (jitted, donated), and fastadam.Adam (the NumPy API) for scale.

    python benchmarks/jax_step.py [--sizes 4096,65536,1048576,16777216] [--rounds 15]

Medians of --rounds rounds; each round times --calls calls of every candidate in
turn, so a noisy machine slows all of them alike.  The parameters are one float32
tensor of each size (a model-shaped mix is --tensors N tensors of size/N).
"""
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fastadam
import fastadam.jax


def candidates(n, tensors):
    rng = np.random.default_rng(0)
    shapes = [(n // tensors,)] * tensors
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads_host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [jnp.asarray(g) for g in grads_host]
    out = {}

    ox = optax.adam(1e-3)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def optax_step(params, state, grads):
        updates, state = ox.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for name, make in (("optax.adam", None),
                       ("fastadam.jax (openmp)", dict(thread_pool="openmp")),
                       ("fastadam.jax (xla pool)", dict(thread_pool="xla"))):
        params = [jnp.asarray(p) for p in host]
        if make is None:
            box = [params, ox.init(params)]

            def run(box=box):
                box[0], box[1] = optax_step(box[0], box[1], grads)
        else:
            tx = fastadam.jax.adam(1e-3, **make)
            step = jax.jit(functools.partial(fastadam.jax.step, tx), donate_argnums=(0, 2))
            box = [params, tx.init(params)]

            def run(box=box, step=step):
                box[0], box[1] = step(box[0], grads, box[1])
        run()
        jax.block_until_ready(box[0])
        out[name] = (run, box)
    numpy_params = [p.copy() for p in host]
    opt = fastadam.Adam(numpy_params, lr=1e-3)
    out["fastadam.Adam (NumPy API)"] = (lambda: opt.step(grads_host), None)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4096,65536,1048576,16777216")
    parser.add_argument("--tensors", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=0, help="calls a round (0: by size)")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"kernel threads {fastadam._kernel.default_num_threads()}")
    for n in map(int, args.sizes.split(",")):
        runs = candidates(n, args.tensors)
        calls = args.calls or max(3, min(2000, 20_000_000 // max(n, 1) // 10))
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, (run, box) in runs.items():
                started = time.perf_counter()
                for _ in range(calls):
                    run()
                if box is not None:
                    jax.block_until_ready(box[0])
                times[name].append((time.perf_counter() - started) / calls)
        base = statistics.median(times["optax.adam"])
        print(f"\n{n:,} float32 parameters in {args.tensors} tensor(s), {args.rounds} rounds of "
              f"{calls} calls: median us a step (optax.adam / it)")
        for name, t in times.items():
            m = statistics.median(t)
            print(f"  {name:28s} {m * 1e6:10.1f} us   {base / m:5.2f}x")


if __name__ == "__main__":
    main()
