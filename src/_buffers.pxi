# The compiled plan's buffers (included by _kernel.pyx before _plan.pxi): what a
# Plan holds of an optimizer, and the comparisons its verification makes.

cdef class PlanBuffers:
    """An optimizer's validated buffers in tensor order as the kernel reads them (one
    fa_item per tensor), with what verifying a step compares them against: data
    pointers, dtypes and shapes, the memory the kernel writes.  ``Plan`` adds the
    step's operations; its docstring describes the arguments."""
    cdef fa_item *items
    cdef int64_t *offsets
    cdef int64_t *written      # sorted pairs (start, end) of the memory the kernel writes
    cdef Py_ssize_t n_written
    cdef Py_ssize_t n, n_groups
    cdef int *typenums         # per tensor: the parameter's dtype
    cdef int *other_grad_typenums  # per tensor: a gradient dtype accepted besides the parameter's (-1: none)
    cdef int *state_typenums   # per tensor: the state's dtype (the parameter's, or uint16 for bfloat16)
    cdef int storage           # enum fa_storage_kind: the plan's (8-bit falls back per tensor)
    cdef uint64_t seed
    cdef int *ndims            # per tensor
    cdef Py_ssize_t *dims_at   # per tensor: where its shape starts in dims
    cdef cnp.npy_intp *dims
    cdef Py_ssize_t *group_sizes
    cdef double *remembered_values  # N_SLOTS per group
    cdef int64_t *tensor_keys  # per tensor: the index its stochastic rounding draws with
    cdef list params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, remembered
    cdef list absmaxes         # per tensor: None, or (m's, v's, v^'s or None) for 8-bit state
    cdef list masters          # per tensor: None, or its master weights' array in the state
    cdef str master_key        # their key in a state entry (fastadam._rules.MASTER_KEYS)
    cdef int wd_mode_if_nonzero
    cdef int unsupported_flags  # option bits its backend lacks: a step setting one is not verified
    # Held from verify/load until release: the gradients (another thread cannot free
    # memory the kernel reads), the state entries a commit sets, and the new counts.
    cdef tuple held_grads
    cdef list held_entries, new_steps
    cdef double *partial       # one double per pre-pass block
    # The thread count of steps with num_threads None (fastadam._threads.ThreadPlanner),
    # and its two methods, bound once: it is asked only for steps that may run in parallel.
    cdef object planner, planner_decide, planner_observe
    cdef bint planned  # whether it chose the count of the step under way
    cdef public object last_grad_norm  # of the last pre-pass that computed it (None before)

    def __cinit__(self, list params, list exp_avgs, list exp_avg_sqs, list max_exp_avg_sqs,
                  list group_sizes, bint decoupled, str state_dtype="float32", uint64_t seed=0,
                  list absmaxes=None, str param_rounding="nearest", object master_weights=None,
                  list masters=None, int unsupported_flags=0, list tensor_keys=None):
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
        self.unsupported_flags = unsupported_flags
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"Plan: state_dtype {state_dtype!r}")
        self.absmaxes = list(absmaxes) if absmaxes is not None else [None] * self.n
        if len(self.absmaxes) != self.n or (state_dtype != "int8" and any(
                a is not None for a in self.absmaxes)):
            raise ValueError("Plan: absmaxes must hold one entry per parameter (None but for int8)")
        self.masters = list(masters) if masters is not None else [None] * self.n
        if len(self.masters) != self.n:
            raise ValueError("Plan: masters must hold one entry per parameter")
        self.master_key = _rules.MASTER_KEYS.get(master_weights)
        note_dtypes()
        self.storage = FA_STORAGE_BF16 if state_dtype == "bfloat16" else FA_STORAGE_NATIVE
        self.seed = seed
        self.items = <fa_item *>zeroed(max(self.n, 1), sizeof(fa_item))
        self.offsets = <int64_t *>zeroed(self.n + 1, sizeof(int64_t))
        self.written = <int64_t *>zeroed(max(16 * self.n, 2), sizeof(int64_t))
        self.typenums = <int *>zeroed(max(self.n, 1), sizeof(int))
        self.other_grad_typenums = <int *>zeroed(max(self.n, 1), sizeof(int))
        self.state_typenums = <int *>zeroed(max(self.n, 1), sizeof(int))
        self.ndims = <int *>zeroed(max(self.n, 1), sizeof(int))
        self.dims_at = <Py_ssize_t *>zeroed(max(self.n, 1), sizeof(Py_ssize_t))
        self.dims = <cnp.npy_intp *>zeroed(max(n_dims, 1), sizeof(cnp.npy_intp))
        self.group_sizes = <Py_ssize_t *>zeroed(max(self.n_groups, 1), sizeof(Py_ssize_t))
        self.remembered_values = <double *>zeroed(max(N_SLOTS * self.n_groups, 1), sizeof(double))
        self.tensor_keys = <int64_t *>zeroed(max(self.n, 1), sizeof(int64_t))
        if tensor_keys is not None and len(tensor_keys) != self.n:
            raise ValueError("Plan: tensor_keys must hold one index per parameter")
        for k in range(self.n):
            self.tensor_keys[k] = k if tensor_keys is None else tensor_keys[k]
        self.last_grad_norm = None
        self.planner = _policy.ThreadPlanner()
        self.planner_decide, self.planner_observe = self.planner.decide, self.planner.observe
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
            code = dtype_code(self.typenums[k])
            if code < 0:
                raise ValueError(f"Plan: parameters must be of a dtype in {DTYPE_NAMES}")
            self.items[k].param_mode = param_mode(code, param_rounding, master_weights)
            mastered = (self.items[k].param_mode == FA_PARAM_SPLIT
                        or self.items[k].param_mode == FA_PARAM_MASTER)
            if (self.items[k].param_mode == FA_PARAM_SPLIT or
                    self.items[k].param_mode == FA_PARAM_STOCHASTIC) and code != FA_BFLOAT16:
                raise ValueError("Plan: split master weights and stochastic rounding are for "
                                 "bfloat16 parameters")
            if mastered != (self.masters[k] is not None):
                raise ValueError("Plan: master weights are needed exactly where the mode keeps them")
            # Compressed state is float32 state compressed: float32 parameters or masters.
            computes_in_float32 = code == FA_FLOAT32 or mastered
            if self.storage == FA_STORAGE_BF16 and not computes_in_float32:
                raise ValueError("Plan: bfloat16 state needs float32 parameters or master weights")
            self.items[k].storage = (FA_STORAGE_INT8 if self.absmaxes[k] is not None
                                     else self.storage)
            if self.items[k].storage == FA_STORAGE_INT8 and not computes_in_float32:
                raise ValueError("Plan: 8-bit state needs float32 parameters or master weights")
            self.state_typenums[k] = (cnp.NPY_UINT16 if self.items[k].storage == FA_STORAGE_BF16
                                      else cnp.NPY_UINT8 if self.items[k].storage == FA_STORAGE_INT8
                                      else cnp.NPY_FLOAT32 if mastered
                                      else self.typenums[k])
            # Gradients from a low-precision backward for float32 parameters, and
            # float32 gradients for low-precision parameters.
            self.other_grad_typenums[k] = (
                _typenums[FA_BFLOAT16] if code == FA_FLOAT32
                else cnp.NPY_FLOAT32 if fa_is_low_precision(code) else -1)
            if mastered:
                buf = <cnp.ndarray?>self.masters[k]
                if not self.same_memory(buf, cnp.PyArray_DATA(buf), k,
                                        cnp.NPY_UINT16 if self.items[k].param_mode == FA_PARAM_SPLIT
                                        else cnp.NPY_FLOAT32):
                    raise ValueError("Plan: master weights must be writeable, C-contiguous, "
                                     "and of their parameter's shape")
                self.items[k].master = cnp.PyArray_DATA(buf)
                self.add_written(buf)
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
            self.items[k].dtype = code
            self.items[k].grad_dtype = code
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
        free(self.other_grad_typenums)
        free(self.state_typenums)
        free(self.ndims)
        free(self.dims_at)
        free(self.dims)
        free(self.group_sizes)
        free(self.remembered_values)
        free(self.tensor_keys)
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

    cdef inline int gradient_code(self, object obj, Py_ssize_t k) noexcept:
        """The dtype code of ``obj`` as tensor k's gradient, or -1 if it does not fit."""
        cdef cnp.ndarray g
        cdef int typenum
        if not is_unmasked_array(obj):
            return -1
        g = <cnp.ndarray>obj
        typenum = cnp.PyArray_TYPE(g)
        if typenum != self.typenums[k] and (typenum != self.other_grad_typenums[k] or typenum < 0):
            return -1
        if not (cnp.PyArray_ISCARRAY_RO(g) and cnp.PyArray_ISNOTSWAPPED(g) and self.same_shape(g, k)
                and not meets_spans(g, self.written, self.n_written)):
            return -1
        return dtype_code(typenum)
