"""fastadam.torch's planned path, compiled: the checks a step repeats (see fastadam/torch.py).

A ``TorchPlan`` is built by ``fastadam.torch`` once its checked path has
validated every parameter, gradient and state tensor, and is kept until
anything it relies on changes.  Each step ``gradients`` verifies that nothing
has: the same param_group dicts, parameters, state dicts and state tensors, at
the same memory; it copies the groups' hyperparameters (schedulers change them)
into the inner fastadam optimizer's groups and returns this step's gradients as
NumPy views of their memory.  The inner optimizer then checks those views
exactly (dtype, shape, contiguity, overlap) as it checks any gradient.  Anything
else returns None and fastadam.torch takes its checked path.

torch is not imported here: the torch objects compared against (the tensor
type, ``torch.strided``, the dtypes) are handed in by fastadam.torch.
"""
cimport numpy as cnp
from cpython.ref cimport Py_INCREF
from libc.stdint cimport intptr_t
from libc.stdlib cimport free, malloc

from fastadam import _step

cnp.import_array()

# The option flags copied from a group as they are; amsgrad changes the state.
cdef tuple _COPIED_FLAGS = tuple(name for name in _step.FLAGS if name != "amsgrad")


cdef class _Planned:
    """One parameter of the plan, in group order."""
    cdef object param, st                      # the parameter; its state dict (None: no gradient)
    cdef object step, exp_avg, exp_avg_sq, max_exp_avg_sq  # its state tensors (the last may be None)
    cdef object master_key, master             # its master weights' key and tensor (or None)
    cdef intptr_t param_at, exp_avg_at, exp_avg_sq_at, max_exp_avg_sq_at, master_at  # their memory
    cdef object dtype, shape                   # the parameter's torch dtype and shape
    cdef int typenum, ndim
    cdef cnp.npy_intp *dims

    def __dealloc__(self):
        free(self.dims)


cdef inline intptr_t address(object t) except? -1:
    return <intptr_t>t.data_ptr()


cdef class TorchPlan:
    cdef list groups            # the torch param_group dicts, in order
    cdef object state           # the optimizer's state mapping (a _TrackedState) ...
    cdef object changes         # ... and its count of changes, when planned
    cdef list hyper_pairs       # (inner fastadam group, torch group), groups with a gradient
    cdef object hyperparameters # fastadam.torch._hyperparameters
    cdef list entries           # _Planned per parameter, in group order
    cdef list step_views        # (inner state entry, float32 NumPy view of the step tensor)
    cdef object tensor_type, strided
    cdef object fallback_view   # fastadam.torch's view of a tensor the plan does not view itself
    cdef readonly object inner  # the inner fastadam optimizer, over views of the same memory

    def __init__(self, object inner, list groups, object state, set stepped, list hyper_pairs,
                 list step_views, object hyperparameters, object tensor_type, object strided,
                 dict typenums, object fallback_view, list master_keys):
        """``stepped``: the ids of the parameters with a gradient; ``typenums``:
        NumPy's type number for each torch dtype a parameter has; ``fallback_view``
        makes the NumPy view of a gradient ``view`` does not make itself;
        ``master_keys``: per stepped parameter, its master weights' key or None."""
        cdef _Planned e
        cdef int j
        self.inner = inner
        self.groups, self.state, self.changes = list(groups), state, state.changes
        self.hyper_pairs, self.step_views = list(hyper_pairs), list(step_views)
        self.hyperparameters, self.tensor_type, self.strided = hyperparameters, tensor_type, strided
        self.fallback_view = fallback_view
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
                e.dims = <cnp.npy_intp *>malloc(max(e.ndim, 1) * sizeof(cnp.npy_intp))
                if e.dims == NULL:
                    raise MemoryError()
                for j in range(e.ndim):
                    e.dims[j] = e.shape[j]

    def step(self, list groups, object state):
        """The step on the plan: False if the plan does not hold (nothing changed), else
        the inner optimizer's step on this step's gradients and the step counts set.
        Raises what the inner step raises (having changed nothing).  The caller holds
        the optimizer's lock."""
        return self.run(groups, state)

    def step_under(self, object optimizer):
        """``step`` under ``optimizer._lock``, if this is still ``optimizer._plan``."""
        lock = optimizer._lock
        lock.acquire()
        try:
            return optimizer._plan is self and self.run(optimizer.param_groups, optimizer.state)
        finally:
            lock.release()

    cdef bint run(self, list groups, object state) except -1:
        grads = self.planned_gradients(groups, state)
        if grads is None:
            return False
        self.inner.step(grads)
        self.commit_steps()
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
        except (LookupError, TypeError, ValueError, RuntimeError, AttributeError):
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
        cdef dict st
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
                if e.st is None or address(p) != e.param_at:
                    return None
                st = e.st
                if (st.get("step") is not e.step
                        or st.get("exp_avg") is not e.exp_avg or address(e.exp_avg) != e.exp_avg_at
                        or st.get("exp_avg_sq") is not e.exp_avg_sq
                        or address(e.exp_avg_sq) != e.exp_avg_sq_at
                        or st.get("max_exp_avg_sq") is not e.max_exp_avg_sq
                        or (e.max_exp_avg_sq is not None
                            and address(e.max_exp_avg_sq) != e.max_exp_avg_sq_at)
                        or (e.master_key is not None and (st.get(e.master_key) is not e.master
                                                          or address(e.master) != e.master_at))):
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

    def commit_steps(self):
        """Set the torch step tensors to the inner optimizer's step counts, through
        views made when the plan was (float32 or float64, as torch makes them)."""
        cdef cnp.ndarray a
        cdef double step
        for entry, view in self.step_views:
            a, step = <cnp.ndarray?>view, entry["step"]
            if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
                (<float *>cnp.PyArray_DATA(a))[0] = <float>step
            elif cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64:
                (<double *>cnp.PyArray_DATA(a))[0] = step
            else:
                view[0] = step
