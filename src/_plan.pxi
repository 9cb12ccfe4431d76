# The compiled plan (included by _kernel.pyx): an optimizer's validated buffers
# and the operations of a step.

cdef class Plan(PlanBuffers):
    """An optimizer's validated buffers in its tensor order, and the operations of a step.

    Built by the checked path (fastadam/_optimizer.py) from buffers it has
    validated: ``params``, ``exp_avgs``, ``exp_avg_sqs`` (one array each per
    tensor), ``max_exp_avg_sqs`` (an array or None per tensor), ``group_sizes``
    (tensors per parameter group), ``decoupled`` (AdamW), and the rest of
    ``fastadam._backends.Buffers``' fields (``unsupported_flags``: option bits its
    backend lacks, so a step whose groups set one is not verified).  The plan holds a
    reference to every array, so none can be freed while it lives, and records
    each one's data pointer, dtype and shape.

    Operations:
      ``step(...)``: the fast path, one call: ``verify``, then the finiteness
          check if asked, the kernel and the step counts.  Returns APPLIED,
          SKIPPED or UNVERIFIED (nothing changed).
      ``verify(groups, grads, state)``: whether this step can run on the plan as
          it is: the same parameter and state objects, still the same memory
          (data pointer, dtype, shape, C-contiguous, aligned, writeable), step
          counts and hyperparameters of exact types (or the very objects the
          checked path validated) in range, and gradients that fit.  On True the
          step's scalars are set and the gradients are held until ``release``.
      ``load(hypers, remembered, grads, entries, steps)``: the same, from values
          the checked path has validated: it cannot refuse.
      ``inspect_gradients``, ``scale_gradients_by``, ``run``, ``commit_steps``,
          ``release``, ``scalars``: the parts of a step (``_backends.take_step``).
    """
    cdef inline bint read_real(self, PyObject *ptr, Py_ssize_t slot, double *out) noexcept:
        """A hyperparameter read exactly: a float or an int object, or the very
        object the checked path validated last (a NumPy scalar, immutable)."""
        if ptr == NULL:
            return False
        if read_exact_real(ptr, out):
            return True
        if <object>ptr is self.remembered[slot]:
            out[0] = self.remembered_values[slot]
            return True
        return False

    cdef inline void set_scalars(self, Py_ssize_t k, double lr, double beta1, double beta2,
                                 double eps, double weight_decay, int variant,
                                 long long step) noexcept:
        """Tensor k's scalars for taking step number ``step`` (counting from 1), in double."""
        set_item_step(&self.items[k], lr, beta1, beta2, eps, weight_decay, variant, step,
                      self.seed, self.tensor_keys[k])

    cdef int threads_for(self, int requested) except -1:
        """The thread count for a step (``requested`` > 0 is taken as it is); sets
        ``planned``: whether the planner chose it (and so is told how long it took)."""
        cdef int most
        self.planned = False
        if requested > 0 or not fa_openmp_enabled or _in_forked_child:
            return resolve_num_threads(requested)  # the request, or 1 where only 1 can run
        if self.offsets[self.n] < _parallel_threshold:
            return 1
        most = resolve_num_threads(0)
        if most <= 1:
            return 1
        self.planned = True
        return self.planner_decide(most)

    def threads_for_step(self, int requested):
        """The thread count for the next step (``requested`` > 0 is taken as it is)."""
        return self.threads_for(requested)

    def record_step(self, int threads, double seconds, ended=None):
        """Report how long the step took with ``threads`` (from threads_for_step), and
        when it ended (time.perf_counter()), for the planner if it chose the count."""
        if self.planned:
            self.planner_observe(threads, seconds, ended)

    @property
    def chosen_threads(self):
        """The planner's choice for steps outside a trial."""
        return self.planner.chosen_threads

    # -- the operations --------------------------------------------------------

    cdef bint verify_c(self, object groups, object grads, object state) except -1:
        cdef Py_ssize_t gi, j, k, n_in_group, slot
        cdef double lr, beta1, beta2, eps, weight_decay
        cdef int variant, st_type, grad_code
        cdef bint amsgrad
        cdef long long step
        cdef PyObject *ptr
        cdef fa_item *it
        cdef tuple held
        cdef list entries, new_steps
        if type(groups) is not list or type(state) is not dict:
            return False
        if type(grads) is tuple:
            held = <tuple>grads
        elif type(grads) is list:
            held = tuple(<list>grads)
        else:
            return False
        if fa_tuple_size(held) != self.n or fa_list_size(groups) != self.n_groups:
            return False
        entries, new_steps = self.held_entries, self.new_steps
        k = 0
        for gi in range(self.n_groups):
            group = <object>fa_list_item(groups, gi)
            if type(group) is not dict:
                return False
            slot = gi * N_SLOTS
            ptr = PyDict_GetItem(<dict>group, "betas")
            if ptr == NULL:
                return False
            betas = <object>ptr
            if type(betas) is tuple:
                if fa_tuple_size(betas) != 2:
                    return False
                ok_betas = (self.read_real(fa_tuple_item(betas, 0), slot + SLOT_BETA1, &beta1)
                            and self.read_real(fa_tuple_item(betas, 1), slot + SLOT_BETA2, &beta2))
            elif type(betas) is list:
                if fa_list_size(betas) != 2:
                    return False
                ok_betas = (self.read_real(fa_list_item(betas, 0), slot + SLOT_BETA1, &beta1)
                            and self.read_real(fa_list_item(betas, 1), slot + SLOT_BETA2, &beta2))
            else:
                return False
            if not (ok_betas
                    and self.read_real(PyDict_GetItem(<dict>group, "lr"), slot + SLOT_LR, &lr)
                    and self.read_real(PyDict_GetItem(<dict>group, "eps"), slot + SLOT_EPS, &eps)
                    and self.read_real(PyDict_GetItem(<dict>group, "weight_decay"),
                                       slot + SLOT_WEIGHT_DECAY, &weight_decay)):
                return False
            if not hyperparameters_in_range(lr, beta1, beta2, eps, weight_decay):
                return False
            variant = 0 if weight_decay == 0.0 else self.wd_mode_if_nonzero
            for j in range(FA_N_FLAGS):  # the option flags: True or False, each its bit
                ptr = PyDict_GetItem(<dict>group, <object>fa_tuple_item(_FLAG_KEYS, j))
                if ptr == NULL or (<object>ptr is not True and <object>ptr is not False):
                    return False
                if <object>ptr is True:
                    variant |= fa_flag_bits[j]
            if variant & self.unsupported_flags:
                return False
            amsgrad = (variant & FA_AMSGRAD) != 0
            ptr = PyDict_GetItem(<dict>group, "params")
            if ptr == NULL or type(<object>ptr) is not list:
                return False
            group_params = <list>ptr
            n_in_group = self.group_sizes[gi]
            if fa_list_size(group_params) != n_in_group:
                return False
            for j in range(n_in_group):
                it = &self.items[k]
                if <object>fa_list_item(group_params, j) is not self.params[k]:
                    return False
                if amsgrad != (self.max_exp_avg_sqs[k] is not None):
                    return False
                ptr = PyDict_GetItem(<dict>state, k)
                if ptr == NULL or type(<object>ptr) is not dict:
                    return False
                st = <dict>ptr
                ptr = PyDict_GetItem(st, "step")
                if ptr == NULL or type(<object>ptr) is not int:
                    return False
                step = exact_long_long(<object>ptr)
                if step == -1 and PyErr_Occurred() != NULL:  # beyond long long
                    PyErr_Clear()
                    return False
                if not (0 <= step < _max_step):
                    return False
                step += 1
                if not (PyDict_GetItem(st, "exp_avg") == <PyObject *>self.exp_avgs[k]
                        and PyDict_GetItem(st, "exp_avg_sq") == <PyObject *>self.exp_avg_sqs[k]
                        and (not amsgrad or PyDict_GetItem(st, "max_exp_avg_sq")
                             == <PyObject *>self.max_exp_avg_sqs[k])):
                    return False
                st_type = self.state_typenums[k]
                if not (self.same_memory(<cnp.ndarray>self.params[k], it.param, k, self.typenums[k])
                        and self.same_memory(<cnp.ndarray>self.exp_avgs[k], it.exp_avg, k, st_type)
                        and self.same_memory(<cnp.ndarray>self.exp_avg_sqs[k], it.exp_avg_sq, k,
                                             st_type)
                        and (not amsgrad or self.same_memory(
                            <cnp.ndarray>self.max_exp_avg_sqs[k], it.max_exp_avg_sq, k, st_type))):
                    return False
                if it.storage == FA_STORAGE_INT8 and not self.absmax_unchanged(st, k, amsgrad):
                    return False
                if it.master != NULL and not (
                        PyDict_GetItem(st, self.master_key) == <PyObject *>self.masters[k]
                        and self.same_memory(<cnp.ndarray>self.masters[k], it.master, k,
                                             cnp.PyArray_TYPE(<cnp.ndarray>self.masters[k]))):
                    return False
                gobj = <object>fa_tuple_item(held, k)
                grad_code = self.gradient_code(gobj, k)
                if grad_code < 0:
                    return False
                it.grad = cnp.PyArray_DATA(<cnp.ndarray>gobj)
                it.grad_dtype = grad_code
                self.set_scalars(k, lr, beta1, beta2, eps, weight_decay, variant, step)
                entries[k] = st
                new_steps[k] = step
                k += 1
        self.held_grads = held
        return True

    cpdef int step(self, Lock lock, object groups, object grads, object state, int num_threads,
                   bint skip_if_nonfinite, double max_grad_norm, double grad_scale):
        """The whole fast path in one call, holding the optimizer's ``lock``:
        APPLIED, SKIPPED or UNVERIFIED.  ``max_grad_norm`` < 0: no clipping.
        ``grad_scale`` multiplies the gradients as they are read (after the
        norm is taken): ZeroAdam's 1/N averaging."""
        cdef int threads
        cdef bint finite = True
        cdef bint clip = max_grad_norm >= 0.0
        cdef double norm = 0.0
        cdef double started, ended
        lock.take()
        try:
            if not self.verify_c(groups, grads, state):
                return _UNVERIFIED
            threads = self.threads_for(num_threads)
            started = monotonic_seconds()
            with nogil:
                if skip_if_nonfinite or clip:
                    finite = prepass(self.items, self.offsets, self.n, threads, clip,
                                     self.partial, &norm)
                if clip:
                    self.scale_gradients(grad_scale * clip_coefficient(max_grad_norm, norm))
                elif grad_scale != 1.0:
                    self.scale_gradients(grad_scale)
                if finite or not skip_if_nonfinite:
                    run_items(self.items, self.offsets, self.n, threads)
            if self.planned:
                ended = monotonic_seconds()
                self.planner_observe(threads, ended - started, ended)
            if clip:
                self.last_grad_norm = norm
            if skip_if_nonfinite and not finite:
                return _SKIPPED
            self.commit_steps_c()
            return _APPLIED
        finally:
            self.held_grads = None
            lock.give()

    cdef void scale_gradients(self, double c) noexcept nogil:
        cdef Py_ssize_t k
        for k in range(self.n):
            self.items[k].grad_scale = c

    def verify(self, groups, grads, state):
        """See the class docstring; True means the plan holds this step's gradients."""
        return self.verify_c(groups, grads, state)

    def load(self, list hypers, list remembered, grads, list entries, list steps):
        """Set this step from checked values: ``hypers`` per group (lr, beta1, beta2,
        eps, weight_decay, flags), as ``_rules.hyperparameters`` gives them;
        ``remembered``, N_SLOTS objects per group that the fast path may later
        accept by identity (None: none);
        ``grads``, ``entries`` (the state dicts) and ``steps`` (counts before this
        step) per tensor."""
        cdef Py_ssize_t gi, j, k = 0
        cdef int variant
        if (len(hypers) != self.n_groups or len(remembered) != N_SLOTS * self.n_groups
                or len(grads) != self.n or len(entries) != self.n or len(steps) != self.n):
            raise ValueError("Plan.load: one entry per group and per tensor is needed")
        held = tuple(grads)
        for j in range(N_SLOTS * self.n_groups):
            obj = remembered[j]
            self.remembered[j] = _NOTHING if obj is None else obj
        for gi in range(self.n_groups):
            lr, beta1, beta2, eps, weight_decay, flags = hypers[gi]
            for j in range(N_SLOTS):
                if remembered[gi * N_SLOTS + j] is not None:
                    self.remembered_values[gi * N_SLOTS + j] = (lr, beta1, beta2, eps, weight_decay)[j]
            variant = (0 if weight_decay == 0.0 else self.wd_mode_if_nonzero) | flags
            for j in range(self.group_sizes[gi]):
                g = <cnp.ndarray?>held[k]
                if self.gradient_code(g, k) < 0:
                    raise ValueError("Plan.load: a gradient does not fit its parameter")
                self.items[k].grad = cnp.PyArray_DATA(g)
                self.items[k].grad_dtype = dtype_code(cnp.PyArray_TYPE(g))
                self.set_scalars(k, lr, beta1, beta2, eps, weight_decay, variant, steps[k] + 1)
                k += 1
        self.held_grads = held
        self.held_entries[:] = entries
        self.new_steps[:] = [s + 1 for s in steps]

    def inspect_gradients(self, int num_threads, bint want_norm):
        """The read-only pre-pass over the held gradients: (all finite, global L2
        norm or None)."""
        cdef int threads = resolve_num_threads(num_threads)
        cdef bint finite
        cdef double norm = 0.0
        with nogil:
            finite = prepass(self.items, self.offsets, self.n, threads, want_norm, self.partial,
                             &norm)
        if want_norm:
            self.last_grad_norm = norm
        return finite, (norm if want_norm else None)

    def scale_gradients_by(self, double c):
        """Gradient clipping's coefficient for this step (see clip_coefficient)."""
        self.scale_gradients(c)

    def run(self, int num_threads):
        """The kernel over every tensor, with the GIL released."""
        cdef int threads = resolve_num_threads(num_threads)
        with nogil:
            run_items(self.items, self.offsets, self.n, threads)

    cdef void commit_steps_c(self) noexcept:
        cdef Py_ssize_t k
        for k in range(self.n):
            PyDict_SetItem(<dict>self.held_entries[k], "step", self.new_steps[k])

    def commit_steps(self):
        """Set each held state entry's step count to the step just taken."""
        self.commit_steps_c()

    def gradients(self):
        """The gradients held by ``verify`` or ``load`` (a tuple), for another kernel."""
        return self.held_grads

    def release(self):
        """Drop the held gradients (the caller's arrays are not kept alive between steps)."""
        self.held_grads = None

    def scalars_into(self, cnp.ndarray rows not None):
        """Write the verified or loaded step into ``rows``, one row per tensor: its
        scalars in the order of STEP_SCALAR_NAMES, its variant, then its three
        rounding keys of bfloat16 state (a writeable, aligned, C-contiguous float64
        array of shape (tensors, FA_N_STEP_SCALARS + 4)): what another kernel needs."""
        cdef Py_ssize_t k, width = FA_N_STEP_SCALARS + 4
        cdef double *out
        if (cnp.PyArray_TYPE(rows) != cnp.NPY_FLOAT64 or cnp.PyArray_NDIM(rows) != 2
                or cnp.PyArray_DIM(rows, 0) != self.n or cnp.PyArray_DIM(rows, 1) != width
                or not cnp.PyArray_IS_C_CONTIGUOUS(rows) or not cnp.PyArray_ISALIGNED(rows)
                or not cnp.PyArray_ISWRITEABLE(rows)):
            raise ValueError(f"Plan.scalars_into: rows must be a writeable, aligned, C-contiguous "
                             f"float64 array of shape ({self.n}, {width})")
        out = <double *>cnp.PyArray_DATA(rows)
        for k in range(self.n):
            fa_get_step(&self.items[k], out + k * width)
            out[k * width + FA_N_STEP_SCALARS] = self.items[k].variant
            out[k * width + FA_N_STEP_SCALARS + 1] = self.items[k].keys[0]
            out[k * width + FA_N_STEP_SCALARS + 2] = self.items[k].keys[1]
            out[k * width + FA_N_STEP_SCALARS + 3] = self.items[k].keys[2]

    def scalars(self):
        """Per tensor: (variant, *scalars) of the verified or loaded step, the scalars
        in the order of STEP_SCALAR_NAMES (fastadam._step.StepScalars)."""
        cdef double values[FA_N_STEP_SCALARS]
        cdef Py_ssize_t k
        out = []
        for k in range(self.n):
            fa_get_step(&self.items[k], values)
            out.append((self.items[k].variant, *[values[j] for j in range(FA_N_STEP_SCALARS)]))
        return out
