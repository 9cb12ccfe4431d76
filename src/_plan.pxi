# The compiled plan (included by _kernel.pyx): an optimizer's validated buffers
# and the operations of a step.

cdef class Plan:
    """An optimizer's validated buffers in its tensor order, and the operations of a step.

    Built by the checked path (fastadam/_optimizer.py) from buffers it has
    validated: ``params``, ``exp_avgs``, ``exp_avg_sqs`` (one array each per
    tensor), ``max_exp_avg_sqs`` (an array or None per tensor), ``group_sizes``
    (tensors per parameter group) and ``decoupled`` (AdamW).  The plan holds a
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
    cdef fa_item *items
    cdef int64_t *offsets
    cdef int64_t *written      # sorted pairs (start, end) of the memory the kernel writes
    cdef Py_ssize_t n_written
    cdef Py_ssize_t n, n_groups
    cdef int *typenums         # per tensor: the parameter's dtype
    cdef int *state_typenums   # per tensor: the state's dtype (the parameter's, or uint16 for bfloat16)
    cdef int state_kind        # enum fa_state
    cdef uint64_t seed
    cdef int *ndims            # per tensor
    cdef Py_ssize_t *dims_at   # per tensor: where its shape starts in dims
    cdef cnp.npy_intp *dims
    cdef Py_ssize_t *group_sizes
    cdef double *remembered_values  # N_SLOTS per group
    cdef list params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, remembered
    cdef list absmaxes         # per tensor: None, or (m's, v's, v^'s or None) for 8-bit state
    cdef int wd_mode_if_nonzero
    # Held from verify/load until release: the gradients (another thread cannot free
    # memory the kernel reads), the state entries a commit sets, and the new counts.
    cdef tuple held_grads
    cdef list held_entries, new_steps
    cdef double *partial       # one double per pre-pass block
    cdef ThreadPlanner planner  # the thread count of steps with num_threads None
    cdef public object last_grad_norm  # of the last pre-pass that computed it (None before)

    def __cinit__(self, list params, list exp_avgs, list exp_avg_sqs, list max_exp_avg_sqs,
                  list group_sizes, bint decoupled, str state_dtype="float32", uint64_t seed=0,
                  list absmaxes=None):
        cdef Py_ssize_t k, j, n_dims = 0
        cdef cnp.ndarray buf, p
        self.n = len(params)
        self.n_groups = len(group_sizes)
        if not (len(exp_avgs) == len(exp_avg_sqs) == len(max_exp_avg_sqs) == self.n):
            raise ValueError("Plan: one state entry per parameter is needed")
        if sum(group_sizes) != self.n:
            raise ValueError("Plan: group_sizes must add up to the number of parameters")
        for k in range(self.n):
            n_dims += (<cnp.ndarray?>params[k]).ndim
        self.params, self.exp_avgs, self.exp_avg_sqs = list(params), list(exp_avgs), list(exp_avg_sqs)
        self.max_exp_avg_sqs = list(max_exp_avg_sqs)
        self.remembered = [_NOTHING] * (N_SLOTS * self.n_groups)
        self.held_entries = [None] * self.n
        self.new_steps = [None] * self.n
        self.wd_mode_if_nonzero = FA_WD_DECOUPLED if decoupled else FA_WD_L2
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"Plan: state_dtype {state_dtype!r}")
        self.absmaxes = list(absmaxes) if absmaxes is not None else [None] * self.n
        if len(self.absmaxes) != self.n or (state_dtype != "int8" and any(
                a is not None for a in self.absmaxes)):
            raise ValueError("Plan: absmaxes must hold one entry per parameter (None but for int8)")
        self.state_kind = FA_STATE_BF16 if state_dtype == "bfloat16" else FA_STATE_NATIVE
        self.seed = seed
        self.items = <fa_item *>zeroed(max(self.n, 1), sizeof(fa_item))
        self.offsets = <int64_t *>zeroed(self.n + 1, sizeof(int64_t))
        self.written = <int64_t *>zeroed(max(14 * self.n, 2), sizeof(int64_t))
        self.typenums = <int *>zeroed(max(self.n, 1), sizeof(int))
        self.state_typenums = <int *>zeroed(max(self.n, 1), sizeof(int))
        self.ndims = <int *>zeroed(max(self.n, 1), sizeof(int))
        self.dims_at = <Py_ssize_t *>zeroed(max(self.n, 1), sizeof(Py_ssize_t))
        self.dims = <cnp.npy_intp *>zeroed(max(n_dims, 1), sizeof(cnp.npy_intp))
        self.group_sizes = <Py_ssize_t *>zeroed(max(self.n_groups, 1), sizeof(Py_ssize_t))
        self.remembered_values = <double *>zeroed(max(N_SLOTS * self.n_groups, 1), sizeof(double))
        self.last_grad_norm = None
        self.planner = ThreadPlanner()
        for j in range(self.n_groups):
            self.group_sizes[j] = group_sizes[j]
        n_dims = 0
        self.n_written = 0
        for k in range(self.n):
            p = <cnp.ndarray>self.params[k]
            self.typenums[k] = cnp.PyArray_TYPE(p)
            self.ndims[k] = cnp.PyArray_NDIM(p)
            self.dims_at[k] = n_dims
            for j in range(self.ndims[k]):
                self.dims[n_dims] = cnp.PyArray_DIM(p, j)
                n_dims += 1
            if dtype_code(self.typenums[k]) < 0:
                raise ValueError("Plan: parameters must be float32 or float64")
            if self.state_kind == FA_STATE_BF16 and self.typenums[k] != cnp.NPY_FLOAT32:
                raise ValueError("Plan: bfloat16 state needs float32 parameters")
            self.items[k].state = (FA_STATE_INT8 if self.absmaxes[k] is not None
                                   else self.state_kind)
            if self.items[k].state == FA_STATE_INT8 and self.typenums[k] != cnp.NPY_FLOAT32:
                raise ValueError("Plan: 8-bit state needs float32 parameters")
            self.state_typenums[k] = (cnp.NPY_UINT16 if self.items[k].state == FA_STATE_BF16
                                      else cnp.NPY_UINT8 if self.items[k].state == FA_STATE_INT8
                                      else self.typenums[k])
            buffers = (p, self.exp_avgs[k], self.exp_avg_sqs[k], self.max_exp_avg_sqs[k])
            for j, obj in enumerate(buffers):
                if obj is None and j == 3:
                    continue
                buf = <cnp.ndarray?>obj
                if not self.same_memory(buf, cnp.PyArray_DATA(buf), k,
                                        self.typenums[k] if j == 0 else self.state_typenums[k]):
                    raise ValueError("Plan: state buffers must be writeable, C-contiguous, "
                                     "and match their parameter's dtype and shape")
                self.add_written(buf)
            if self.absmaxes[k] is not None:
                for j in range(3):
                    obj = self.absmaxes[k][j]
                    if obj is None and j == 2 and self.max_exp_avg_sqs[k] is None:
                        continue
                    buf = <cnp.ndarray?>obj
                    if not is_absmax_of(buf, cnp.PyArray_DATA(buf), cnp.PyArray_SIZE(p)):
                        raise ValueError("Plan: absmax buffers must be writeable, C-contiguous "
                                         "float32 arrays of one value per block")
                    self.items[k].absmax[j] = <float *>cnp.PyArray_DATA(buf)
                    self.add_written(buf)
            self.items[k].param = cnp.PyArray_DATA(p)
            self.items[k].numel = cnp.PyArray_SIZE(p)
            self.items[k].dtype = dtype_code(self.typenums[k])
            self.items[k].exp_avg = cnp.PyArray_DATA(<cnp.ndarray>self.exp_avgs[k])
            self.items[k].exp_avg_sq = cnp.PyArray_DATA(<cnp.ndarray>self.exp_avg_sqs[k])
            self.items[k].max_exp_avg_sq = (
                NULL if self.max_exp_avg_sqs[k] is None
                else cnp.PyArray_DATA(<cnp.ndarray>self.max_exp_avg_sqs[k]))
            self.offsets[k + 1] = self.offsets[k] + self.items[k].numel
        self.partial = <double *>zeroed(max(fa_prepass_blocks(self.offsets, self.n), 1), sizeof(double))
        qsort(self.written, self.n_written, 2 * sizeof(int64_t), compare_int64)
        for j in range(1, self.n_written):
            if self.written[2 * j] < self.written[2 * j - 1]:
                raise ValueError("Plan: buffers overlap")

    def __dealloc__(self):
        free(self.items)
        free(self.offsets)
        free(self.written)
        free(self.typenums)
        free(self.state_typenums)
        free(self.ndims)
        free(self.dims_at)
        free(self.dims)
        free(self.group_sizes)
        free(self.remembered_values)
        free(self.partial)

    cdef void add_written(self, cnp.ndarray buf) noexcept:
        if cnp.PyArray_NBYTES(buf) > 0:
            self.written[2 * self.n_written] = <int64_t><intptr_t>cnp.PyArray_DATA(buf)
            self.written[2 * self.n_written + 1] = (
                self.written[2 * self.n_written] + cnp.PyArray_NBYTES(buf))
            self.n_written += 1

    # -- what verify compares ------------------------------------------------

    cdef inline bint same_shape(self, cnp.ndarray a, Py_ssize_t k) noexcept:
        cdef int d
        cdef cnp.npy_intp *dims = &self.dims[self.dims_at[k]]
        if cnp.PyArray_NDIM(a) != self.ndims[k]:
            return False
        for d in range(self.ndims[k]):
            if cnp.PyArray_DIM(a, d) != dims[d]:
                return False
        return True

    cdef inline bint same_memory(self, cnp.ndarray a, void *data, Py_ssize_t k,
                                 int typenum) noexcept:
        """Whether the planned array ``a`` is still the memory the kernel was given:
        the same data pointer, C-contiguous, aligned and writeable, dtype
        ``typenum`` in native byte order, and tensor k's shape."""
        return (cnp.PyArray_DATA(a) == data and cnp.PyArray_ISCARRAY(a)
                and cnp.PyArray_TYPE(a) == typenum and cnp.PyArray_ISNOTSWAPPED(a)
                and self.same_shape(a, k))

    cdef bint absmax_unchanged(self, dict st, Py_ssize_t k, bint amsgrad) noexcept:
        """Whether state entry ``st`` holds tensor k's planned absmax arrays, unchanged."""
        cdef tuple planned = <tuple>self.absmaxes[k]
        cdef int j
        for j, key in enumerate(ABSMAX_KEYS):
            if j == 2 and not amsgrad:
                break
            if PyDict_GetItem(st, key) != <PyObject *>planned[j]:
                return False
            if not is_absmax_of(<cnp.ndarray>planned[j], self.items[k].absmax[j],
                                           self.items[k].numel):
                return False
        return True

    cdef inline bint fits_as_gradient(self, object obj, Py_ssize_t k) noexcept:
        cdef cnp.ndarray g
        if not is_unmasked_array(obj):
            return False
        g = <cnp.ndarray>obj
        return (cnp.PyArray_ISCARRAY_RO(g) and cnp.PyArray_TYPE(g) == self.typenums[k]
                and cnp.PyArray_ISNOTSWAPPED(g) and self.same_shape(g, k)
                and not meets_spans(g, self.written, self.n_written))

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
        cdef fa_item *it = &self.items[k]
        it.variant = variant
        fa_set_step(it, lr, beta1, beta2, eps, weight_decay, step, _int8_max_update)
        if self.state_kind == FA_STATE_BF16:
            it.keys[0] = rounding_key(self.seed, k, step, 0)
            it.keys[1] = rounding_key(self.seed, k, step, 1)
            it.keys[2] = rounding_key(self.seed, k, step, 2)

    def threads_for_step(self, int requested):
        """The thread count for the next step (``requested`` > 0 is taken as it is)."""
        return self.planner.threads_for(requested, self.offsets[self.n])

    def record_step(self, int threads, double seconds):
        """Report how long a step took with ``threads``, for the planner."""
        self.planner.record(threads, seconds)

    @property
    def chosen_threads(self):
        """The planner's choice for steps outside a trial."""
        return self.planner.chosen_threads

    # -- the operations --------------------------------------------------------

    cdef bint verify_c(self, object groups, object grads, object state) except -1:
        cdef Py_ssize_t gi, j, k, n_in_group, slot
        cdef double lr, beta1, beta2, eps, weight_decay
        cdef int variant, st_type
        cdef bint amsgrad, maximize
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
        if PyTuple_GET_SIZE(held) != self.n or PyList_GET_SIZE(groups) != self.n_groups:
            return False
        entries, new_steps = self.held_entries, self.new_steps
        k = 0
        for gi in range(self.n_groups):
            group = <object>PyList_GET_ITEM(groups, gi)
            if type(group) is not dict:
                return False
            slot = gi * N_SLOTS
            ptr = PyDict_GetItem(<dict>group, "betas")
            if ptr == NULL:
                return False
            betas = <object>ptr
            if type(betas) is tuple:
                if PyTuple_GET_SIZE(betas) != 2:
                    return False
                ok_betas = (self.read_real(PyTuple_GET_ITEM(betas, 0), slot + SLOT_BETA1, &beta1)
                            and self.read_real(PyTuple_GET_ITEM(betas, 1), slot + SLOT_BETA2, &beta2))
            elif type(betas) is list:
                if PyList_GET_SIZE(betas) != 2:
                    return False
                ok_betas = (self.read_real(PyList_GET_ITEM(betas, 0), slot + SLOT_BETA1, &beta1)
                            and self.read_real(PyList_GET_ITEM(betas, 1), slot + SLOT_BETA2, &beta2))
            else:
                return False
            if not (ok_betas
                    and self.read_real(PyDict_GetItem(<dict>group, "lr"), slot + SLOT_LR, &lr)
                    and self.read_real(PyDict_GetItem(<dict>group, "eps"), slot + SLOT_EPS, &eps)
                    and self.read_real(PyDict_GetItem(<dict>group, "weight_decay"),
                                       slot + SLOT_WEIGHT_DECAY, &weight_decay)):
                return False
            if not (0.0 <= lr and 0.0 <= eps and 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0
                    and 0.0 <= weight_decay):
                return False
            ptr = PyDict_GetItem(<dict>group, "amsgrad")
            if ptr == NULL or (<object>ptr is not True and <object>ptr is not False):
                return False
            amsgrad = <object>ptr is True
            ptr = PyDict_GetItem(<dict>group, "maximize")
            if ptr == NULL or (<object>ptr is not True and <object>ptr is not False):
                return False
            maximize = <object>ptr is True
            variant = fa_variant(0 if weight_decay == 0.0 else self.wd_mode_if_nonzero,
                                 amsgrad, maximize)
            ptr = PyDict_GetItem(<dict>group, "params")
            if ptr == NULL or type(<object>ptr) is not list:
                return False
            group_params = <list>ptr
            n_in_group = self.group_sizes[gi]
            if PyList_GET_SIZE(group_params) != n_in_group:
                return False
            for j in range(n_in_group):
                it = &self.items[k]
                if <object>PyList_GET_ITEM(group_params, j) is not self.params[k]:
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
                if it.state == FA_STATE_INT8 and not self.absmax_unchanged(st, k, amsgrad):
                    return False
                gobj = <object>PyTuple_GET_ITEM(held, k)
                if not self.fits_as_gradient(gobj, k):
                    return False
                it.grad = cnp.PyArray_DATA(<cnp.ndarray>gobj)
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
        cdef double started
        lock.take()
        try:
            if not self.verify_c(groups, grads, state):
                return _UNVERIFIED
            threads = self.planner.threads_for(num_threads, self.offsets[self.n])
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
            self.planner.record(threads, monotonic_seconds() - started)
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
        eps, weight_decay, amsgrad, maximize); ``remembered``, N_SLOTS objects per
        group that the fast path may later accept by identity (None: none);
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
            lr, beta1, beta2, eps, weight_decay, amsgrad, maximize = hypers[gi]
            for j in range(N_SLOTS):
                if remembered[gi * N_SLOTS + j] is not None:
                    self.remembered_values[gi * N_SLOTS + j] = (lr, beta1, beta2, eps, weight_decay)[j]
            variant = fa_variant(0 if weight_decay == 0.0 else self.wd_mode_if_nonzero,
                                 bool(amsgrad), bool(maximize))
            for j in range(self.group_sizes[gi]):
                g = <cnp.ndarray?>held[k]
                if cnp.PyArray_NBYTES(g) != cnp.PyArray_NBYTES(<cnp.ndarray>self.params[k]):
                    raise ValueError("Plan.load: a gradient does not fit its parameter")
                self.items[k].grad = cnp.PyArray_DATA(g)
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
