"""This checkout's speed report beside another build's, in one interleaved run.

    python benchmarks/ab_builds.py OTHER [python -m fastadam.bench's options]

OTHER is another checkout of fastadam, built in place (``python setup.py
build_ext --inplace``), say the commit before a refactor.  Its package is
loaded beside this one as ``fastadam_before`` and adds the implementations
"before-cython", "before-bf16" and "before-int8" (fastadam.Adam as built there),
"policy" and "before-policy" (num_threads=None in each: the thread policy and its
planner, whatever ``--threads`` says), "last-variant" and "before-last-variant" (AdamW
with amsgrad and maximize: the highest variant code), "before-numba" (beside
"fastadam-numba"), and "before-list" to the model-shaped table, so each round of the report
visits both builds in random order and machine drift hits both alike.
"""
import os
import shutil
import sys
import tempfile

import numpy as np

import fastadam
from fastadam import bench


def load_other(checkout):
    folder = tempfile.mkdtemp(prefix="fastadam-before-")
    shutil.copytree(os.path.join(checkout, "fastadam"), os.path.join(folder, "fastadam_before"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, folder)
    import fastadam_before
    return fastadam_before


def single(package, cls="Adam", backend="cython", **options):
    def make(n, threads):
        p, g = bench._buffers(n)
        opt = getattr(package, cls)([p], backend=backend, **{"num_threads": threads, **options})
        opt.step([g])
        return lambda: opt.step([g])
    return make


def model_list(package):
    def make(n, threads):
        rng = np.random.default_rng(0)
        shapes = bench.model_like_shapes()
        params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        opt = package.Adam(params, backend="cython", num_threads=threads)
        opt.step(grads)
        return lambda: opt.step(grads)
    return make


def main(argv):
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    before = load_other(argv[0])
    bench.IMPLEMENTATIONS.update({
        "before-cython": single(before),
        "before-bf16": single(before, state_dtype="bfloat16"),
        "before-int8": single(before, state_dtype="int8"),
        "policy": single(fastadam, num_threads=None),
        "before-policy": single(before, num_threads=None),
        "last-variant": single(fastadam, "AdamW", amsgrad=True, maximize=True),
        "before-last-variant": single(before, "AdamW", amsgrad=True, maximize=True),
        "before-numba": single(before, backend="numba"),
    })
    bench.MODEL_SHAPED["before-list"] = model_list(before)
    return bench.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
