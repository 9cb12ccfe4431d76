"""The thread policy of every backend: how many threads a step uses by default,
and the planner that picks a step's count among them by timing.

The most threads a step may use is the smallest of: the CPUs this process may
run on (its affinity mask), the cgroup CPU quota (containers, CI runners), each
divided among the ranks of an MPI job on this node, and ``omp_get_max_threads()``,
which honours ``OMP_NUM_THREADS`` and limits set with threadpoolctl.  An
explicit ``num_threads`` (validated by ``_rules.num_threads``) overrides it.
Steps below ``PARALLEL_THRESHOLD`` elements use one thread; above it, with
``num_threads`` None, a plan's ``ThreadPlanner`` chooses.
"""
import contextlib
import functools
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


@functools.cache
def _cpu_limit_at_start():
    return cpu_limit()  # as the compiled kernel reads it: once


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
    n = _cpu_limit_at_start()
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


# The planner's constants: steps timed per candidate in a trial (after one warm-up
# step); steps from one trial to the next, the first interval after a trial that
# changed the choice, doubling up to the last while trials confirm it; the window of
# steps watched between trials; the most candidates (1, the powers of two below the
# maximum, the maximum); and how much slower than the best so far a candidate's
# first sample may be before the trial stops trying fewer threads.
TRIAL_SAMPLES = 5
FIRST_INTERVAL = 100
LAST_INTERVAL = 1600
WATCH = 32
MAX_CANDIDATES = 24
GIVE_UP = 2


class ThreadPlanner:
    """The thread count of a plan's steps (``decide``) from their timings (``observe``).

    With num_threads None, the thread count of a step is chosen by measuring
    in the context the step actually runs in: inside a NumPy training loop the
    step follows matrix products whose BLAS threads keep spinning on the other
    cores, and a second OpenMP thread then only competes with them (measured on
    two), while alone the same step is twice as fast on two threads.  A trial
    times a block of TRIAL_SAMPLES steps (after a warm-up step) at each candidate
    count, from the policy's maximum down through the powers of two to 1, and
    keeps the one with the lowest median.  On a machine with many cores a
    memory-bound step stops gaining long before all are used, so the candidates
    between matter; going down, a block whose first sample is GIVE_UP times
    slower than the best median so far ends the trial, so a trial does not spend
    whole blocks on counts far too small.  A moment of load during a trial can
    make it choose wrongly, so the trial is repeated: FIRST_INTERVAL steps after
    a trial that changed the choice, twice as long after each that confirmed it
    (up to LAST_INTERVAL), at once when the maximum changes, and early when most
    steps of a window of WATCH are slower than the best other candidate measured.
    Results are bitwise the same for every thread count, so switching is free.

    What a sample times is the step's period where the plan says when each step
    ended: from the previous step's end to this one's, so that a count whose threads
    collide with the BLAS threads that spin after a training loop's matrix products,
    and so slow that loop's forward and backward pass too, is seen to lose.

    Every backend's plan asks it only for steps that may run in parallel (at
    least PARALLEL_THRESHOLD elements, num_threads None, more than one thread
    allowed), so its cost, a few hundred nanoseconds, falls on steps of tens of
    microseconds or more.
    """

    __slots__ = ("chosen_threads", "_planned_max", "_candidates", "_medians", "_samples",
                 "_block", "_block_step", "_in_trial", "_steps_since_trial", "_interval",
                 "_other_median", "_watched", "_slower", "_trials", "_last_end")

    def __init__(self):
        self.chosen_threads = 1  # the choice for steps outside a trial
        self._planned_max = 0
        self._candidates, self._medians, self._samples = [], [], []
        self._block = self._block_step = 0
        self._in_trial = False
        self._steps_since_trial = 0
        self._interval = FIRST_INTERVAL
        self._other_median = 0.0  # the best candidate not chosen, as its trial measured it
        self._watched = self._slower = 0  # steps of the watch window, those slower than it
        self._trials = 0
        self._last_end = None  # when the last observed step ended

    def decide(self, most):
        """The count for a step when the policy allows up to ``most`` threads."""
        if most <= 1:
            return 1
        if most != self._planned_max or (not self._in_trial
                                         and self._steps_since_trial >= self._interval):
            self._planned_max = most
            c = 1
            while 2 * c < most:
                c *= 2
            self._candidates = [most]
            while c >= 1 and len(self._candidates) < MAX_CANDIDATES:
                self._candidates.append(c)
                c //= 2
            self._medians = [0.0] * len(self._candidates)
            self._samples = []
            self._in_trial = True
            self._block = self._block_step = 0
        if self._in_trial:
            # Block after block, each at one count: in turn, a parallel step would pay
            # for waking workers that slept through a smaller one, which steps taken
            # back to back do not.
            return self._candidates[self._block]
        return self.chosen_threads

    def observe(self, threads, seconds, ended=None):
        """The duration of a step taken with ``threads`` (as ``decide`` gave it), and
        when it ended (seconds on any one clock), if known: the planner then weighs each
        count by the time from the previous step's end to this one's, the work between
        steps included.  Inside a training loop that is what a thread count costs: one
        that collides with the BLAS threads still spinning after the matrix products
        slows the step and the forward and backward pass after it, which the step's
        own duration does not show."""
        if ended is not None:
            previous, self._last_end = self._last_end, ended
            if previous is not None and ended > previous:
                seconds = ended - previous
        if not self._in_trial:
            self._steps_since_trial += 1
            # Between trials: if most steps of a window were slower than the best other
            # candidate measured, the next trial is now, not at the end of the interval.
            self._slower += seconds > self._other_median
            self._watched += 1
            if self._watched == WATCH:
                if 4 * self._slower >= 3 * WATCH:
                    self._steps_since_trial = self._interval
                self._watched = self._slower = 0
            return
        if self._block_step > 0:  # the first step of a block warms up (threads, caches)
            self._samples.append(seconds)
        self._block_step += 1
        measured = 0
        if self._block_step == 2 and self._block > 0 and seconds > GIVE_UP * min(
                self._medians[:self._block]):
            self._medians[self._block] = seconds
            measured = self._block + 1
        if measured == 0 and self._block_step == TRIAL_SAMPLES + 1:
            # the median (the upper middle for an even count)
            self._medians[self._block] = sorted(self._samples)[len(self._samples) // 2]
            self._samples = []
            self._block += 1
            self._block_step = 0
            if self._block == len(self._candidates):
                measured = self._block
        if measured == 0:
            return
        medians = self._medians[:measured]
        best = medians.index(min(medians))
        self._other_median = min((m for i, m in enumerate(medians) if i != best), default=1e300)
        # A trial that confirms the choice doubles the interval to the next; one that
        # changes it (a load came or went) starts again from the first.
        self._interval = (min(2 * self._interval, LAST_INTERVAL)
                          if self._candidates[best] == self.chosen_threads and self._trials > 0
                          else FIRST_INTERVAL)
        self._trials += 1
        self.chosen_threads = self._candidates[best]
        self._in_trial = False
        self._steps_since_trial = self._watched = self._slower = 0
