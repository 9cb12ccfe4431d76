# fastadam.torch's planned path (included by _kernel.pyx): the checks a step
# repeats, made once (see fastadam/torch.py).
#
# A ``TorchPlan`` is built by ``fastadam.torch`` once its checked path has
# validated every parameter, gradient and state tensor, and is kept until
# anything it relies on changes.  Its first step goes through the inner fastadam
# optimizer (over NumPy views of the same memory), which builds its own ``Plan``;
# every later step is checked here only, once, in torch's terms, and runs that
# ``Plan``'s kernel directly: the same param_group dicts, parameters, state dicts
# and state tensors at the same memory, plain float or int hyperparameters in
# range (or tensors and the like, through fastadam's rules), and each gradient a
# dense, contiguous CPU tensor of its parameter's dtype and shape that meets no
# memory the kernel writes.  Anything else returns False and fastadam.torch takes
# its checked path, whose rules name what is wrong.
#
# torch is not imported here: the torch objects compared against (the tensor
# type, ``torch.strided``, the hook registries) are handed in by fastadam.torch.
from cpython.ref cimport Py_INCREF

from fastadam import _step

# The option flags copied from a group as they are; amsgrad changes the state.
cdef tuple _COPIED_FLAGS = tuple(name for name in _step.FLAGS if name != "amsgrad")
# What the planned path treats as "the plan does not hold" rather than an error.
cdef tuple _NOT_HOLDING = (LookupError, TypeError, ValueError, RuntimeError, AttributeError)


cdef class _Planned:
    """One parameter of the plan, in group order."""
    cdef object param, st                      # the parameter; its state dict (None: no gradient)
    cdef object step, exp_avg, exp_avg_sq, max_exp_avg_sq  # its state tensors (the last may be None)
    cdef object master_key, master             # its master weights' key and tensor (or None)
    cdef intptr_t param_at, exp_avg_at, exp_avg_sq_at, max_exp_avg_sq_at, master_at  # their memory
    cdef object dtype, shape                   # the parameter's torch dtype and shape
    cdef int typenum, ndim, itemsize
    cdef cnp.npy_intp *dims

    def __dealloc__(self):
        free(self.dims)


cdef inline intptr_t address(object t) except? -1:
    return <intptr_t>t.data_ptr()


cdef inline bint held_by(dict st, object key, object t) noexcept:
    """Whether state dict ``st`` holds ``t`` at ``key`` (None: holds nothing there)."""
    cdef PyObject *ptr = PyDict_GetItem(st, key)
    return ptr == <PyObject *>t if ptr != NULL else t is None


cdef class TorchPlan:
    cdef list groups            # the torch param_group dicts, in order
    cdef object state           # the optimizer's state mapping (a _TrackedState) ...
    cdef object changes         # ... and its count of changes, when planned
    cdef dict state_attributes  # the state mapping's __dict__, where a count of changes is kept
    cdef list hyper_pairs       # (inner fastadam group, torch group), groups with a gradient
    cdef object hyperparameters # fastadam.torch._hyperparameters
    cdef list entries           # _Planned per parameter, in group order
    cdef list step_views        # (inner state entry, float32 or float64 NumPy view of the step tensor)
    cdef object tensor_type, strided
    cdef object fallback_view   # fastadam.torch's view of a tensor the plan does not view itself
    cdef tuple global_hooks     # torch's registries of global step hooks
    cdef dict profiler_flags    # the autograd profiler module's namespace
    cdef readonly object inner  # the inner fastadam optimizer, over views of the same memory
    # After the inner optimizer's first step: its compiled plan, whose kernel a step runs.
    # (The inner optimizer is this plan's alone: its lock is not taken.)
    cdef Plan plan
    cdef int num_threads        # its num_threads as its plan takes it (0: the thread policy)
    cdef long long *counts      # per tensor: the steps taken (from then on counted here)
    cdef void **step_at         # per tensor: its torch step tensor's float32 or float64 value
    cdef bint *step_is_double

    def __init__(self, object inner, list groups, object state, set stepped, list hyper_pairs,
                 list step_views, object hyperparameters, object tensor_type, object strided,
                 dict typenums, object fallback_view, list master_keys, tuple global_hooks,
                 object profiler):
        """``stepped``: the ids of the parameters with a gradient; ``typenums``:
        NumPy's type number for each torch dtype a parameter has; ``fallback_view``
        makes the NumPy view of a gradient ``view`` does not make itself;
        ``master_keys``: per stepped parameter, its master weights' key or None;
        ``global_hooks``: torch's registries of global step hooks, and ``profiler``
        the module whose ``_is_profiler_enabled`` says the autograd profiler records
        (then a step goes through torch's wrapper)."""
        cdef _Planned e
        cdef int j
        self.inner = inner
        self.groups, self.state, self.changes = list(groups), state, state.changes
        self.state_attributes = vars(state)
        self.hyper_pairs, self.step_views = list(hyper_pairs), list(step_views)
        self.hyperparameters, self.tensor_type, self.strided = hyperparameters, tensor_type, strided
        self.fallback_view = fallback_view
        self.global_hooks, self.profiler_flags = global_hooks, vars(profiler)
        self.counts = <long long *>zeroed(max(len(step_views), 1), sizeof(long long))
        self.step_at = <void **>zeroed(max(len(step_views), 1), sizeof(void *))
        self.step_is_double = <bint *>zeroed(max(len(step_views), 1), sizeof(bint))
        for j, (_, view) in enumerate(step_views):
            if cnp.PyArray_TYPE(<cnp.ndarray?>view) not in (cnp.NPY_FLOAT32, cnp.NPY_FLOAT64):
                raise ValueError("TorchPlan: step tensors are float32 or float64")
            self.step_at[j] = cnp.PyArray_DATA(<cnp.ndarray>view)
            self.step_is_double[j] = cnp.PyArray_TYPE(<cnp.ndarray>view) == cnp.NPY_FLOAT64
        self.entries = []
        masters = iter(master_keys)
        for group in self.groups:
            for p in group["params"]:
                e = _Planned()
                e.param = p
                self.entries.append(e)
                if id(p) not in stepped:
                    continue
                e.st = state[p]
                e.param_at = address(p)
                e.step, e.exp_avg, e.exp_avg_sq = e.st["step"], e.st["exp_avg"], e.st["exp_avg_sq"]
                e.exp_avg_at, e.exp_avg_sq_at = address(e.exp_avg), address(e.exp_avg_sq)
                e.max_exp_avg_sq = e.st.get("max_exp_avg_sq")
                if e.max_exp_avg_sq is not None:
                    e.max_exp_avg_sq_at = address(e.max_exp_avg_sq)
                e.master_key = next(masters)
                if e.master_key is not None:
                    e.master = e.st[e.master_key]
                    e.master_at = address(e.master)
                e.dtype, e.shape = p.dtype, tuple(p.shape)
                e.typenum, e.ndim = typenums[p.dtype], len(e.shape)
                e.itemsize = p.element_size()
                e.dims = <cnp.npy_intp *>zeroed(max(e.ndim, 1), sizeof(cnp.npy_intp))
                for j in range(e.ndim):
                    e.dims[j] = e.shape[j]

    def __dealloc__(self):
        free(self.counts)
        free(self.step_at)
        free(self.step_is_double)

    def step(self, list groups, object state):
        """The step on the plan: False if the plan does not hold (nothing changed), else
        the step taken and the step counts set.  Raises what the inner optimizer's
        first step raises (having changed nothing).  The caller holds the optimizer's lock."""
        return self.run(groups, state)

    def step_under(self, object optimizer):
        """``step`` under ``optimizer._lock``, if this is still ``optimizer._plan``."""
        cdef Lock lock = <Lock?>optimizer._lock
        lock.take()
        try:
            return optimizer._plan is self and self.run(optimizer.param_groups, optimizer.state)
        finally:
            lock.give()

    cdef bint fast_step(self, object optimizer, dict attributes) except -1:
        """``optimizer.step()`` whole, where no step hook or profiler needs torch's
        wrapper: True if taken; False (nothing changed) for fastadam.torch's other paths.
        ``attributes``: the optimizer's ``__dict__``, where torch's Optimizer keeps
        what is read here (anything missing: False)."""
        cdef PyObject *pre = PyDict_GetItem(attributes, "_optimizer_step_pre_hooks")
        cdef PyObject *post = PyDict_GetItem(attributes, "_optimizer_step_post_hooks")
        cdef PyObject *lock = PyDict_GetItem(attributes, "_lock")
        cdef PyObject *profiling = PyDict_GetItem(self.profiler_flags, "_is_profiler_enabled")
        if (pre == NULL or post == NULL or lock == NULL or type(<object>lock) is not Lock
                or profiling == NULL or <object>profiling is not False
                or <object>pre or <object>post or self.global_hooks[0] or self.global_hooks[1]):
            return False
        cdef PyObject *groups
        cdef PyObject *state
        (<Lock>lock).take()
        try:
            if PyDict_GetItem(attributes, "_plan") != <PyObject *>self:
                return False
            groups = PyDict_GetItem(attributes, "param_groups")
            state = PyDict_GetItem(attributes, "state")
            return (groups != NULL and state != NULL and type(<object>groups) is list
                    and self.run(<list>groups, <object>state))
        finally:
            (<Lock>lock).give()

    cdef bint run(self, list groups, object state) except -1:
        if self.plan is not None:
            try:
                return self.run_planned(groups, state)
            except _NOT_HOLDING:
                return False
        grads = self.planned_gradients(groups, state)
        if grads is None:
            return False
        self.inner.step(grads)  # its checked path: it builds its plan
        self.commit_steps_c()
        self.adopt()
        return True

    cdef void adopt(self) except *:
        """Take the inner optimizer's plan, if it is this kernel's and its step has
        none of the options (clipping, skipping, scaling) fastadam.torch does not set."""
        inner = self.inner
        plan = getattr(inner, "_plan", None)
        if (type(plan) is not Plan
                or (<Plan>plan).n != len(self.step_views) or inner._skip_if_nonfinite
                or inner._max_grad_norm_arg >= 0 or inner._grad_scale != 1.0):
            return
        for k, (entry, _) in enumerate(self.step_views):
            self.counts[k] = entry["step"]
        self.num_threads = inner._threads_arg
        self.plan = <Plan>plan

    cdef bint run_planned(self, list groups, object state) except -1:
        """The step on the inner optimizer's plan, checked here only (see the top)."""
        cdef Plan plan = self.plan
        cdef Py_ssize_t i, k = 0, at = 0, n = len(self.entries)
        cdef double hypers[5]
        cdef int variant = 0, threads
        cdef bint have_scalars
        cdef double started, ended
        cdef _Planned e
        cdef PyObject *ptr
        cdef list held = []  # the gradients the kernel reads, alive until it has
        if state is not self.state or len(groups) != len(self.groups):
            return False
        ptr = PyDict_GetItem(self.state_attributes, "changes")  # state.changes, without getattr
        if (<object>ptr if ptr != NULL else 0) != self.changes:
            return False
        for i in range(len(groups)):
            group = groups[i]
            if group is not self.groups[i]:
                return False
            params = group["params"]
            have_scalars = False
            if at + len(params) > n:
                return False
            for p in params:
                e = <_Planned>self.entries[at]
                at += 1
                if e.param is not p:
                    return False
                g = p.grad
                if g is None:
                    if e.st is not None:
                        return False
                    continue
                if e.st is None or not self.state_unchanged(p, e):
                    return False
                if not have_scalars:  # the group's, read once
                    variant = self.group_scalars(<dict>group, hypers)
                    if variant < 0:
                        return False
                    have_scalars = True
                if ((variant & FA_AMSGRAD) != 0) != (plan.items[k].max_exp_avg_sq != NULL):
                    return False  # AMSGrad switched: its running max is made by a rebuild
                if not self.take_gradient(g, e, k, held):
                    return False
                if self.counts[k] + 1 >= _max_step:
                    return False  # the checked path says why
                plan.set_scalars(k, hypers[0], hypers[1], hypers[2], hypers[3], hypers[4],
                                 variant, self.counts[k] + 1)
                k += 1
        if at != n or k != plan.n:
            return False
        threads = plan.threads_for(self.num_threads)
        if plan.planned:
            started = monotonic_seconds()
        with nogil:
            run_items(plan.items, plan.offsets, plan.n, threads)
        if plan.planned:
            ended = monotonic_seconds()
            plan.planner_observe(threads, ended - started, ended)
        for k in range(plan.n):
            self.counts[k] += 1
            if self.step_is_double[k]:
                (<double *>self.step_at[k])[0] = <double>self.counts[k]
            else:
                (<float *>self.step_at[k])[0] = <float>self.counts[k]
        return True

    cdef bint state_unchanged(self, object p, _Planned e) except -1:
        cdef dict st = e.st
        return (address(p) == e.param_at
                and held_by(st, "step", e.step)
                and held_by(st, "exp_avg", e.exp_avg) and address(e.exp_avg) == e.exp_avg_at
                and held_by(st, "exp_avg_sq", e.exp_avg_sq)
                and address(e.exp_avg_sq) == e.exp_avg_sq_at
                and held_by(st, "max_exp_avg_sq", e.max_exp_avg_sq)
                and (e.max_exp_avg_sq is None or address(e.max_exp_avg_sq) == e.max_exp_avg_sq_at)
                and (e.master_key is None or (held_by(st, e.master_key, e.master)
                                              and address(e.master) == e.master_at)))

    cdef int group_scalars(self, dict group, double *out) except -2:
        """A torch group's lr, beta1, beta2, eps and weight_decay into ``out`` and its
        variant (the kernel's bits), or -1 if they are not what the plan takes: plain
        floats and ints are read here, anything else (tensors) through fastadam's rules."""
        cdef PyObject *ptr
        cdef int j, variant
        betas = group["betas"]
        beta1 = beta2 = None
        if (type(betas) is tuple or type(betas) is list) and len(betas) == 2:
            beta1, beta2 = betas
        if not (beta1 is not None
                and read_exact_real(<PyObject *>beta1, &out[1])
                and read_exact_real(<PyObject *>beta2, &out[2])
                and read_exact_real(PyDict_GetItem(group, "lr"), &out[0])
                and read_exact_real(PyDict_GetItem(group, "eps"), &out[3])
                and read_exact_real(PyDict_GetItem(group, "weight_decay"), &out[4])):
            values = _rules.hyperparameters(self.hyperparameters(group))  # raises: not held
            for j in range(5):
                out[j] = values[j]
        if not hyperparameters_in_range(out[0], out[1], out[2], out[3], out[4]):
            return -1
        variant = 0 if out[4] == 0.0 else self.plan.wd_mode_if_nonzero
        for j in range(FA_N_FLAGS):  # the option flags: True or False, each its bit
            ptr = PyDict_GetItem(group, <object>fa_tuple_item(_FLAG_KEYS, j))
            if ptr == NULL or (<object>ptr is not True and <object>ptr is not False):
                return -1
            if <object>ptr is True:
                variant |= fa_flag_bits[j]
        if variant & self.plan.unsupported_flags:
            return -1
        return variant

    cdef bint take_gradient(self, object g, _Planned e, Py_ssize_t k, list held) except -1:
        """Gradient ``g`` of tensor k into the plan's item, or False if it does not fit:
        a plain dense CPU tensor of the parameter's dtype and shape, contiguous and
        aligned, read where it lies; anything else through its NumPy view, which the
        plan checks as it checks any gradient.  Neither may meet memory the kernel writes."""
        cdef fa_item *it = &self.plan.items[k]
        cdef intptr_t at
        cdef int code
        # Not a strided tensor: torch's setter of .grad allows only sparse ones besides,
        # whose is_contiguous() is False (COO) or raises (compressed layouts).
        if (type(g) is self.tensor_type and g.is_cpu and g.dtype is e.dtype and not g.is_neg()
                and g.is_contiguous() and g.shape == e.shape):
            at = address(g)
            if at != 0:
                if at % e.itemsize != 0 or meets_range(<int64_t>at, <int64_t>at + it.numel * e.itemsize,
                                                       self.plan.written, self.plan.n_written):
                    return False
                held.append(g)
                it.grad, it.grad_dtype = <void *>at, it.dtype
                return True
        a = self.fallback_view(g)  # raises for what NumPy cannot view: not held
        code = self.plan.gradient_code(a, k)
        if code < 0:
            return False
        held.append(a)
        it.grad, it.grad_dtype = cnp.PyArray_DATA(<cnp.ndarray>a), code
        return True

    def gradients(self, list groups, object state):
        """This step's gradients as NumPy views if the plan holds, else None; if it
        holds, the groups' hyperparameters are copied into the inner optimizer's."""
        return self.planned_gradients(groups, state)

    cdef object planned_gradients(self, list groups, object state):
        try:
            if state is not self.state or state.changes != self.changes:
                return None
            grads = self.verified_gradients(groups)  # first: it checks the groups are the planned ones
            if grads is None or not self.copy_hyperparameters():
                return None
            return grads
        except _NOT_HOLDING:
            return None

    cdef bint copy_hyperparameters(self) except -1:
        cdef dict inner, group
        for inner, group in self.hyper_pairs:
            lr, betas = group["lr"], group["betas"]
            if group["amsgrad"] is not inner["amsgrad"]:
                return False  # its running max is created (or dropped) by a rebuild
            if (type(lr) is float and type(betas) is tuple and len(<tuple>betas) == 2
                    and type((<tuple>betas)[0]) is float and type((<tuple>betas)[1]) is float):
                inner["lr"], inner["betas"] = lr, betas
                inner["eps"], inner["weight_decay"] = group["eps"], group["weight_decay"]
                for name in _COPIED_FLAGS:
                    inner[name] = group[name]
            else:  # tensors, lists or something wrong: fastadam's rules name it
                inner.update(self.hyperparameters(group))
        return True

    cdef list verified_gradients(self, list groups):
        cdef list grads = []
        cdef Py_ssize_t k = 0, n = len(self.entries), i
        cdef _Planned e
        if len(groups) != len(self.groups):
            return None
        for i in range(len(groups)):
            if groups[i] is not self.groups[i]:
                return None
            for p in groups[i]["params"]:
                if k == n:
                    return None
                e = <_Planned>self.entries[k]
                k += 1
                if e.param is not p:
                    return None
                g = p.grad
                if g is None:
                    if e.st is not None:
                        return None
                    continue
                if e.st is None or not self.state_unchanged(p, e):
                    return None
                grads.append(self.view(g, e))
        return grads if k == n else None

    cdef object view(self, object g, _Planned e):
        """A NumPy array of gradient ``g``'s memory: made here for a plain dense CPU tensor
        of the parameter's dtype and shape (what ``g.numpy()`` would return, without its
        cost), else fastadam.torch's view, which raises for what NumPy cannot view."""
        cdef cnp.ndarray a
        cdef intptr_t at
        if (type(g) is self.tensor_type and g.layout is self.strided and g.is_cpu
                and g.dtype is e.dtype and not g.is_neg() and g.is_contiguous() and g.shape == e.shape):
            at = address(g)
            if at != 0:
                a = cnp.PyArray_SimpleNewFromData(e.ndim, e.dims, e.typenum, <void *>at)
                Py_INCREF(g)  # the view holds the tensor, as g.numpy()'s does
                cnp.PyArray_SetBaseObject(a, g)
                return a
        return self.fallback_view(g)

    cdef int commit_steps_c(self) except -1:
        """Set the torch step tensors to the inner optimizer's step counts (its first step)."""
        cdef Py_ssize_t k
        for k, (entry, _) in enumerate(self.step_views):
            if self.step_is_double[k]:
                (<double *>self.step_at[k])[0] = <double>entry["step"]
            else:
                (<float *>self.step_at[k])[0] = <float>entry["step"]


def torch_step(self, *args, **kwargs):
    """``step(closure=None)``: one step over every parameter with a gradient;
    returns the closure's loss.

    Optimizer step hooks and the autograd profiler's record apply as for any
    torch optimizer (through torch's own wrapper, taken only when one is active:
    it costs about 10 us a step)."""
    # fastadam.torch.Adam.step: compiled, so that the common step (no closure, hook or
    # profiler, on the plan) costs no Python frame; TorchDynamo does not trace into it.
    cdef dict attributes = <dict?>self.__dict__
    cdef PyObject *plan = PyDict_GetItem(attributes, "_plan")
    if (not args and not kwargs and plan != NULL and type(<object>plan) is TorchPlan
            and (<TorchPlan>plan).fast_step(self, attributes)):
        return None
    return self._wrapped_step(*args, **kwargs)
