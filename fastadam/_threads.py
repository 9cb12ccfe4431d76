"""The thread policy of every backend: how many threads a step uses by default.

The smallest of: the CPUs this process may run on (its affinity mask), the
cgroup CPU quota (containers, CI runners), each divided among the ranks of an
MPI job on this node, and ``omp_get_max_threads()``,
which honours ``OMP_NUM_THREADS`` and limits set with threadpoolctl.  An
explicit ``num_threads`` (validated by ``_rules.num_threads``) overrides it.
"""
import contextlib
import math
import os

# Below this many elements in a step, one thread does all the work: the
# fork/join of a parallel region costs more than it saves (docs/speed.md,
# "Threads").  Every backend uses it; the compiled kernel is given it at load.
PARALLEL_THRESHOLD = 1 << 15


def cgroup_cpu_quota(root="/sys/fs/cgroup"):
    """The CPU quota of this process's cgroup, in CPUs, or None if unlimited."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


# Set by MPI launchers in each rank: how many ranks share this node (Open MPI, MPICH's Hydra).
MPI_LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def mpi_local_ranks():
    """Ranks of this MPI job on this node (1 outside mpiexec)."""
    for name in MPI_LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cpu_limit():
    """CPUs available to this process: affinity mask and cgroup quota, shared
    with the other ranks of an MPI job on this node (the spinning threads of
    oversubscribed ranks take the cores from each other)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n // mpi_local_ranks())


def default_num_threads(kernel=None):
    """The threads a step uses when ``num_threads`` is None, for every backend.

    ``kernel``: the compiled extension, if built; its OpenMP runtime's
    ``omp_get_max_threads()`` honours OMP_NUM_THREADS and limits set with
    threadpoolctl, and ``_kernel.default_num_threads`` is this same rule in C
    (asked at every compiled step).  Without it, OMP_NUM_THREADS is read here.
    A forked child uses one thread (see ``_kernel``).
    """
    if kernel is not None:
        return kernel.default_num_threads()
    n = cpu_limit()
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return max(1, n)


# libgomp keeps idle workers spinning for up to GOMP_SPINCOUNT (default 300000)
# pause instructions, milliseconds, after each parallel region.  In a NumPy
# training loop the optimizer step alternates with OpenBLAS, whose threads spin
# too, and the spinning threads take the cores from each other: on 2 cores an
# MLP epoch took 6.2 to 8.2 s with libgomp's default and 1.9 to 2.0 s with a spin count of
# 3000 (README, "Threads").  A short spin still catches back-to-back steps.
GOMP_SPINCOUNT = "3000"


@contextlib.contextmanager
def kernel_openmp_environment():
    """While the compiled kernel loads (and with it its OpenMP runtime, which
    reads its settings once, then): a short spin count, unless the user chose
    OMP_WAIT_POLICY or GOMP_SPINCOUNT.  The environment is restored afterwards,
    so nothing else in the process sees the change."""
    chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    if not chosen:
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    try:
        yield
    finally:
        if not chosen:
            os.environ.pop("GOMP_SPINCOUNT", None)
