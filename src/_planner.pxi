# The thread planner of the compiled plan (included by _kernel.pyx): the thread
# count of each step whose num_threads is None, within the policy of
# fastadam._threads.

# The thread planner (Plan.threads_for_step): steps timed per candidate in a
# trial (median5 takes the median of five); steps from one trial to the next, the
# first interval after a trial that changed the choice, doubling up to the last
# while trials confirm it; and the window of steps watched between trials.
cdef enum:
    PLANNER_SAMPLES = 5
    PLANNER_FIRST_INTERVAL = 100
    PLANNER_LAST_INTERVAL = 1600
    PLANNER_WATCH = 32
TRIAL_SAMPLES, REPLAN_EVERY = PLANNER_SAMPLES, PLANNER_FIRST_INTERVAL

cdef inline double median5(double *x) noexcept nogil:
    """The median of x[0:5] (sorts a copy)."""
    cdef double a[5]
    cdef double t
    cdef int i, j
    for i in range(5):
        a[i] = x[i]
    for i in range(1, 5):
        t = a[i]
        j = i - 1
        while j >= 0 and a[j] > t:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = t
    return a[2]


cdef class ThreadPlanner:
    """The thread count of a plan's steps (threads_for) from their timings (record).

    With num_threads None, the thread count of a step is chosen by measuring
    in the context the step actually runs in: inside a NumPy training loop the
    step follows matrix products whose BLAS threads keep spinning on the other
    cores, and a second OpenMP thread then only competes with them (measured on
    two), while alone the same step is twice as fast on two threads.  So the
    planner times PLANNER_SAMPLES steps at the policy's maximum and as many at
    1 thread (each block after one warm-up step) and keeps the lower median.  A
    moment of load during a trial can make it choose wrongly, so the trial is
    repeated: PLANNER_FIRST_INTERVAL steps after a trial that changed the choice,
    twice as long after each that confirmed it (up to PLANNER_LAST_INTERVAL), at
    once when the maximum changes, and early when most steps of a window of
    PLANNER_WATCH are slower than the other candidate measured.  Results are
    bitwise the same for every thread count, so switching is free.
    """
    cdef int planned_max, trial_left, trial_index
    cdef public int chosen_threads
    cdef int64_t steps_since_trial, interval
    cdef double samples[2][PLANNER_SAMPLES]
    cdef int n_samples[2]
    cdef double other_median  # the candidate not chosen, as its trial measured it
    cdef int watched, slower  # steps of the watch window, and those slower than other_median
    cdef int64_t trials

    def __cinit__(self):
        self.chosen_threads = 1
        self.interval = PLANNER_FIRST_INTERVAL

    cdef int threads_for(self, int requested, int64_t numel) noexcept:
        cdef int most
        if requested > 0 or not fa_openmp_enabled or _in_forked_child:
            return resolve_num_threads(requested)  # the request, or 1 where only 1 can run
        most = resolve_num_threads(0)
        if most <= 1 or numel < _parallel_threshold:
            return 1
        if most != self.planned_max or (self.trial_left == 0
                                        and self.steps_since_trial >= self.interval):
            self.planned_max = most
            self.trial_left = 2 * (PLANNER_SAMPLES + 1)
            self.n_samples[0] = self.n_samples[1] = 0
        if self.trial_left > 0:
            # A block of steps at the maximum, then a block at 1 thread: in turn, a
            # parallel step would pay for waking workers that slept through the
            # serial one, which steps taken back to back do not.
            self.trial_index = 0 if self.trial_left <= PLANNER_SAMPLES + 1 else 1
            return 1 if self.trial_index == 0 else most
        return self.chosen_threads

    cdef void record(self, int threads, double seconds) noexcept:
        """The duration of a step taken with ``threads`` (from threads_for)."""
        cdef int i, chosen
        cdef double serial, parallel
        if self.trial_left == 0:
            self.steps_since_trial += 1
            # Between trials: if most steps of a window were slower than the other
            # candidate measured, the next trial is now, not at the end of the interval.
            self.slower += seconds > self.other_median
            self.watched += 1
            if self.watched == PLANNER_WATCH:
                if 4 * self.slower >= 3 * PLANNER_WATCH:
                    self.steps_since_trial = self.interval
                self.watched = self.slower = 0
            return
        i = self.trial_index
        # The first step of a block warms up (threads, caches): not a sample.
        if self.trial_left != PLANNER_SAMPLES + 1 and self.trial_left != 2 * (PLANNER_SAMPLES + 1):
            if self.n_samples[i] < PLANNER_SAMPLES:
                self.samples[i][self.n_samples[i]] = seconds
                self.n_samples[i] += 1
        self.trial_left -= 1
        if self.trial_left == 0:
            serial, parallel = median5(self.samples[0]), median5(self.samples[1])
            chosen = 1 if serial < parallel else self.planned_max
            # A trial that confirms the choice doubles the interval to the next; one that
            # changes it (a load came or went) starts again from the first.
            self.interval = (min(2 * self.interval, PLANNER_LAST_INTERVAL)
                             if chosen == self.chosen_threads and self.trials > 0
                             else PLANNER_FIRST_INTERVAL)
            self.trials += 1
            self.chosen_threads = chosen
            self.other_median = parallel if chosen == 1 else serial
            self.steps_since_trial = self.watched = self.slower = 0
