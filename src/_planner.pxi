# The thread planner of the compiled plan (included by _kernel.pyx): the thread
# count of each step whose num_threads is None, within the policy of
# fastadam._threads.

# The thread planner (Plan.threads_for_step): steps timed per candidate in a
# trial (after one warm-up step); steps from one trial to the next, the first
# interval after a trial that changed the choice, doubling up to the last while
# trials confirm it; the window of steps watched between trials; the most
# candidates (1, the powers of two below the maximum, the maximum); and how much
# slower than the best so far a candidate's first sample may be before the trial
# stops trying fewer threads.
cdef enum:
    PLANNER_SAMPLES = 5
    PLANNER_FIRST_INTERVAL = 100
    PLANNER_LAST_INTERVAL = 1600
    PLANNER_WATCH = 32
    PLANNER_MAX_CANDIDATES = 24
    PLANNER_GIVE_UP = 2
TRIAL_SAMPLES, REPLAN_EVERY = PLANNER_SAMPLES, PLANNER_FIRST_INTERVAL

cdef inline double median(double *x, int n) noexcept nogil:
    """The median of x[0:n], 1 <= n <= PLANNER_SAMPLES (sorts a copy; the upper
    middle for even n)."""
    cdef double a[PLANNER_SAMPLES]
    cdef double t
    cdef int i, j
    for i in range(n):
        a[i] = x[i]
    for i in range(1, n):
        t = a[i]
        j = i - 1
        while j >= 0 and a[j] > t:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = t
    return a[n // 2]


cdef class ThreadPlanner:
    """The thread count of a plan's steps (threads_for) from their timings (record).

    With num_threads None, the thread count of a step is chosen by measuring
    in the context the step actually runs in: inside a NumPy training loop the
    step follows matrix products whose BLAS threads keep spinning on the other
    cores, and a second OpenMP thread then only competes with them (measured on
    two), while alone the same step is twice as fast on two threads.  A trial
    times a block of PLANNER_SAMPLES steps (after a warm-up step) at each
    candidate count, from the policy's maximum down through the powers of two to
    1, and keeps the one with the lowest median.  On a machine with many cores a
    memory-bound step stops gaining long before all are used, so the candidates
    between matter; going down, a block whose first sample is PLANNER_GIVE_UP
    times slower than the best median so far ends the trial, so a trial does not
    spend whole blocks on counts far too small.  A moment of load during a trial
    can make it choose wrongly, so the trial is repeated: PLANNER_FIRST_INTERVAL
    steps after a trial that changed the choice, twice as long after each that
    confirmed it (up to PLANNER_LAST_INTERVAL), at once when the maximum
    changes, and early when most steps of a window of PLANNER_WATCH are slower
    than the best other candidate measured.  Results are bitwise the same for
    every thread count, so switching is free.
    """
    cdef int planned_max, n_candidates, block, block_step
    cdef bint in_trial
    cdef public int chosen_threads
    cdef int64_t steps_since_trial, interval
    cdef int candidates[PLANNER_MAX_CANDIDATES]
    cdef double medians[PLANNER_MAX_CANDIDATES]
    cdef double samples[PLANNER_SAMPLES]
    cdef double other_median  # the best candidate not chosen, as its trial measured it
    cdef int watched, slower  # steps of the watch window, and those slower than other_median
    cdef int64_t trials

    def __cinit__(self):
        self.chosen_threads = 1
        self.interval = PLANNER_FIRST_INTERVAL

    cdef int threads_for(self, int requested, int64_t numel) noexcept:
        if requested > 0 or not fa_openmp_enabled or _in_forked_child:
            return resolve_num_threads(requested)  # the request, or 1 where only 1 can run
        if numel < _parallel_threshold:
            return 1
        return self.within(resolve_num_threads(0))

    cdef int within(self, int most) noexcept:
        """The count for a step when the policy allows up to ``most`` threads."""
        cdef int c
        if most <= 1:
            return 1
        if most != self.planned_max or (not self.in_trial and self.steps_since_trial >= self.interval):
            self.planned_max = most
            self.candidates[0] = most
            self.n_candidates = 1
            c = 1
            while 2 * c < most:
                c *= 2
            while c >= 1 and self.n_candidates < PLANNER_MAX_CANDIDATES:
                self.candidates[self.n_candidates] = c
                self.n_candidates += 1
                c //= 2
            self.in_trial = True
            self.block = self.block_step = 0
        if self.in_trial:
            # Block after block, each at one count: in turn, a parallel step would pay
            # for waking workers that slept through a smaller one, which steps taken
            # back to back do not.
            return self.candidates[self.block]
        return self.chosen_threads

    cdef void record(self, int threads, double seconds) noexcept:
        """The duration of a step taken with ``threads`` (from threads_for)."""
        cdef int i, best, measured
        cdef double best_median
        if not self.in_trial:
            self.steps_since_trial += 1
            # Between trials: if most steps of a window were slower than the best other
            # candidate measured, the next trial is now, not at the end of the interval.
            self.slower += seconds > self.other_median
            self.watched += 1
            if self.watched == PLANNER_WATCH:
                if 4 * self.slower >= 3 * PLANNER_WATCH:
                    self.steps_since_trial = self.interval
                self.watched = self.slower = 0
            return
        if self.block_step > 0:  # the first step of a block warms up (threads, caches): not a sample
            self.samples[self.block_step - 1] = seconds
        self.block_step += 1
        measured = 0
        if self.block_step == 2 and self.block > 0:
            best_median = self.medians[0]
            for i in range(1, self.block):
                best_median = min(best_median, self.medians[i])
            if seconds > PLANNER_GIVE_UP * best_median:
                self.medians[self.block] = seconds
                measured = self.block + 1
        if measured == 0 and self.block_step == PLANNER_SAMPLES + 1:
            self.medians[self.block] = median(self.samples, PLANNER_SAMPLES)
            self.block += 1
            self.block_step = 0
            if self.block == self.n_candidates:
                measured = self.n_candidates
        if measured == 0:
            return
        best = 0
        for i in range(1, measured):
            if self.medians[i] < self.medians[best]:
                best = i
        self.other_median = 1e300
        for i in range(measured):
            if i != best:
                self.other_median = min(self.other_median, self.medians[i])
        # A trial that confirms the choice doubles the interval to the next; one that
        # changes it (a load came or went) starts again from the first.
        self.interval = (min(2 * self.interval, PLANNER_LAST_INTERVAL)
                         if self.candidates[best] == self.chosen_threads and self.trials > 0
                         else PLANNER_FIRST_INTERVAL)
        self.trials += 1
        self.chosen_threads = self.candidates[best]
        self.in_trial = False
        self.steps_since_trial = self.watched = self.slower = 0

    def decide(self, int most):
        """within(most), for tests of machines with more CPUs than this one."""
        return self.within(most)

    def observe(self, int threads, double seconds):
        """record(threads, seconds), for the same tests."""
        self.record(threads, seconds)
