"""``fastadam.Adam`` and ``fastadam.AdamW``: torch.optim's API over NumPy arrays.

A step has two paths with one meaning.  The compiled fast path
(``_kernel.Plan.step``) re-checks the cached, already validated buffers and
runs the kernel; on anything it does not expect it changes nothing and
returns False.  The slow path here then validates everything, raises the
precise error (naming the argument and its index) or, if all is well, creates
missing state and applies the step.  Either way a step that raises leaves
parameters and state exactly as they were.
"""
import bisect
import numbers
import threading

import numpy as np

from . import _backends, _checkpoint
from ._reference import WD_DECOUPLED, WD_L2, WD_NONE, step_scalars
from ._threads import check_num_threads

_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def _real(value, name, where):
    if type(value) is float or type(value) is int:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}{where}")
    return float(value)


def check_hyperparameters(group, where=""):
    """Validate a group's hyperparameters with torch's messages; return them as
    plain Python floats and bools: (lr, beta1, beta2, eps, weight_decay, amsgrad, maximize)."""
    lr = _real(group["lr"], "lr", where)
    betas = group["betas"]
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")
    beta1, beta2 = _real(betas[0], "betas[0]", where), _real(betas[1], "betas[1]", where)
    eps = _real(group["eps"], "eps", where)
    weight_decay = _real(group["weight_decay"], "weight_decay", where)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}{where}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}{where}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}{where}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}{where}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}{where}")
    for flag in ("amsgrad", "maximize"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be True or False, got {group[flag]!r}{where}")
    return lr, beta1, beta2, eps, weight_decay, group["amsgrad"], group["maximize"]


def _describe(array):
    return f"{type(array).__module__}.{type(array).__name__}"


def check_parameter(p, name):
    """A parameter must be updatable in place: never silently copied."""
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {_describe(p)} "
                        "(parameters are updated in place, so they cannot be converted)")
    if p.dtype not in (np.float32, np.float64) or not p.dtype.isnative:
        raise TypeError(f"{name}: dtype {p.dtype} is not supported (float32 or float64)")
    if not p.flags.c_contiguous:
        raise ValueError(f"{name} is not C-contiguous; an in-place update needs a contiguous "
                         "array (np.ascontiguousarray would update a copy)")
    if not p.flags.aligned:
        raise ValueError(f"{name} is not aligned to its dtype")
    if not p.flags.writeable:
        raise ValueError(f"{name} is read-only")


def _interval(a):
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def check_no_overlap(named_arrays):
    """Raise if any two of the (name, array) pairs share memory (all are C-contiguous).
    Returns the sorted (start, end) memory spans."""
    spans = sorted((*_interval(a), name) for name, a in named_arrays if a.nbytes)
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{n0} and {n1} share memory; each must be its own buffer")
    return [(start, end) for start, end, _ in spans]


def _overlaps(spans, interval):
    """Whether ``interval`` meets any of the sorted, disjoint (start, end) ``spans``."""
    lo, hi = interval
    i = bisect.bisect_left(spans, (hi,))
    return i > 0 and spans[i - 1][1] > lo


class Adam:
    r"""Adam (Kingma & Ba, 2015) with the semantics of ``torch.optim.Adam``.

    Per element, at step :math:`t` with gradient :math:`g`:

    .. math::
        g &\leftarrow g + \lambda p \quad\text{(weight\_decay } \lambda\text{, L2)} \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        p &\leftarrow p - \frac{\gamma}{1 - \beta_1^t}\,
             \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

    with ``amsgrad`` using :math:`\hat v = \max(\hat v, v)` in the denominator and
    ``maximize`` negating :math:`g`.

    Args:
        params: a list of float32/float64 C-contiguous writeable arrays, or a
            list of dicts (parameter groups) with ``"params"`` and any
            hyperparameter to override.  They are updated in place.
        lr, betas, eps, weight_decay, amsgrad, maximize: as in torch.
        backend: ``"cython"``, ``"numba"``, ``"numpy"`` (the reference) or
            ``"auto"`` (the first available of those; a warning below cython).
        num_threads: threads for a step; None honours ``OMP_NUM_THREADS``,
            threadpoolctl, the CPU affinity mask and cgroup quotas.
        skip_if_nonfinite: if a gradient holds a NaN or an Inf, skip the whole
            step (parameters and state untouched; ``step`` returns False and
            ``skipped_steps`` counts it).  Off by default, as in torch, where a
            NaN gradient propagates into the parameters.
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, *, backend="auto", num_threads=None,
                 skip_if_nonfinite=False):
        self.defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             amsgrad=amsgrad, maximize=maximize)
        check_hyperparameters(self.defaults)
        self.num_threads = check_num_threads(num_threads)
        if not isinstance(skip_if_nonfinite, bool):
            raise TypeError(f"skip_if_nonfinite must be True or False, got {skip_if_nonfinite!r}")
        self.skip_if_nonfinite = skip_if_nonfinite
        self.skipped_steps = 0
        self.backend, self._backend = _backends.load(backend)
        # The compiled checks (Plan) serve the compiled kernel, and the Numba kernel
        # when the extension is there; the NumPy reference stays pure Python.
        self._checker = (self._backend if self.backend == "cython" else
                         _backends.compiled_or_none() if self.backend == "numba" else None)
        self.param_groups = []
        self.state = {}
        self._plan = None
        self._written_cache = None
        self._step_lock = threading.Lock()  # one step at a time: see _step_checked
        self._guard = None                   # the compiled kernel's StepGuard, made with the first Plan
        if isinstance(params, (np.ndarray, dict)):
            raise TypeError("params argument given to the optimizer should be a list of arrays "
                            f"or dicts, but got {_describe(params)}")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        for group in params:
            self.add_param_group(group)

    def __repr__(self):
        lines = [f"{type(self).__name__} (backend={self.backend!r})"]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {group[k]}" for k in _HYPERPARAMETERS]
        return "\n".join(lines)

    # -- parameters ---------------------------------------------------------

    def _parameters(self):
        """All parameters in the optimizer's order (group by group)."""
        return [p for group in self.param_groups for p in group["params"]]

    def add_param_group(self, param_group):
        """Add a group of parameters with its own hyperparameters (torch's API)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {_describe(param_group)}")
        if "params" not in param_group:
            raise ValueError("param_group must have a 'params' key")
        params = param_group["params"]
        if isinstance(params, np.ndarray):
            params = [params]
        elif isinstance(params, (set, dict)):
            raise TypeError("optimizer parameters need to be organized in ordered collections")
        else:
            params = list(params)
        where = f" (param_groups[{len(self.param_groups)}])"
        group = {"params": params}
        for key in _HYPERPARAMETERS:
            group[key] = param_group.get(key, self.defaults[key])
        group.update({k: v for k, v in param_group.items() if k not in group})
        check_hyperparameters(group, where)
        existing = self._parameters()
        for j, p in enumerate(params):
            check_parameter(p, f"param_groups[{len(self.param_groups)}]['params'][{j}]")
        if any(p is q for p in params for q in existing) or len({id(p) for p in params}) != len(params):
            raise ValueError("some parameters appear in more than one parameter group")
        all_params = existing + params
        check_no_overlap((f"params[{k}]", p) for k, p in enumerate(all_params))
        self.param_groups.append(group)
        self._plan = None

    # -- the step -----------------------------------------------------------

    def step(self, grads):
        """Apply one Adam step in place, given one gradient per parameter.

        ``grads`` is a list (or tuple) of arrays in the optimizer's parameter
        order, each of its parameter's shape and dtype, C-contiguous.  Returns
        True if the step was applied; False if it was skipped (only with
        ``skip_if_nonfinite``).  Raises (and changes nothing) on any mismatch.
        """
        plan = self._plan
        if plan is not None:
            if self.backend == "cython":
                applied = plan.step(self.param_groups, grads, self.state, self.num_threads or 0,
                                    self.skip_if_nonfinite)
            else:
                applied = self._step_numba(plan, self.param_groups, grads)
            if applied is not None:
                self.skipped_steps += not applied
                return applied
        applied = self._step_checked(grads)
        self.skipped_steps += not applied
        return applied

    def _step_checked(self, grads):
        # Two threads stepping one optimizer would race on its buffers: refuse the
        # second.  The compiled path's guard covers its kernel (Plan.step) too.
        if (self._guard is not None and self._guard.busy) or not self._step_lock.acquire(blocking=False):
            raise RuntimeError("Adam.step() called from two threads at once on the same "
                               "optimizer; its buffers can take one step at a time")
        try:
            return self._step_checked_locked(grads)
        finally:
            self._step_lock.release()

    def _step_checked_locked(self, grads):
        params = self._parameters()
        if isinstance(grads, np.ndarray) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list or tuple of arrays, one per parameter, "
                            f"got {_describe(grads)}")
        if len(grads) != len(params):
            raise ValueError(f"grads has {len(grads)} arrays but the optimizer has "
                             f"{len(params)} parameters (one gradient per parameter)")
        groups, new_state, written = [], {}, []
        k = 0
        for i, group in enumerate(self.param_groups):
            hyper = check_hyperparameters(group, f" (param_groups[{i}])")
            groups.append(dict(zip(("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad",
                                    "maximize"), hyper), params=group["params"]))
            amsgrad = hyper[5]
            for p in group["params"]:
                check_parameter(p, f"params[{k}]")
                self._check_grad(grads[k], p, k)
                st = self.state.get(k)
                if st is None:
                    st = new_state[k] = {"step": 0, "exp_avg": np.zeros_like(p),
                                         "exp_avg_sq": np.zeros_like(p)}
                else:
                    _checkpoint.check_state_entry(st, p, f"state[{k}]",
                                                  amsgrad=amsgrad and "max_exp_avg_sq" in st)
                if amsgrad and "max_exp_avg_sq" not in st:
                    # AMSGrad switched on after the first step: its running max starts at zero.
                    new_state.setdefault(k, dict(st))["max_exp_avg_sq"] = np.zeros_like(p)
                entry = new_state.get(k, st)
                written.append((f"params[{k}]", p))
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if key in entry:
                        written.append((f"state[{k}][{key!r}]", entry[key]))
                k += 1
        spans = self._written_spans(written)
        for k, g in enumerate(grads):
            if g.nbytes and _overlaps(spans, _interval(g)):
                raise ValueError(f"grads[{k}] shares memory with a parameter or the optimizer "
                                 "state; pass a separate gradient buffer")
        if self.skip_if_nonfinite and not all(np.isfinite(g).all() for g in grads):
            return False
        # Everything is checked: from here on nothing can fail.
        self.state.update(new_state)
        if self._checker is not None:
            self._apply_compiled(groups, grads)
        else:
            self._apply_python(groups, grads)
        return True

    def _written_spans(self, written):
        """check_no_overlap over the buffers a step writes, remembered while they
        are the same objects (the usual case: every step after the first).  An
        array's memory cannot move without its shape changing, which is checked."""
        arrays = [a for _, a in written]
        cached = self._written_cache
        if cached is not None and len(cached[0]) == len(arrays) and all(
                a is b for a, b in zip(cached[0], arrays)):
            return cached[1]
        spans = check_no_overlap(written)
        self._written_cache = (arrays, spans)
        return spans

    @staticmethod
    def _check_grad(g, p, k):
        if not isinstance(g, np.ndarray):
            raise TypeError(f"grads[{k}]: expected a numpy.ndarray, got {_describe(g)}")
        if g.dtype != p.dtype or not g.dtype.isnative:
            raise TypeError(f"grads[{k}]: dtype {g.dtype} does not match params[{k}] dtype {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{k}]: shape {g.shape} does not match params[{k}] shape {p.shape}")
        if not g.flags.c_contiguous or not g.flags.aligned:
            raise ValueError(f"grads[{k}] is not C-contiguous and aligned")

    def _apply_compiled(self, groups, grads):
        if self._guard is None:
            self._guard = self._checker.StepGuard()
        params = [p for g in groups for p in g["params"]]
        amsgrads = [g["amsgrad"] for g in groups for _ in g["params"]]
        entries = [self.state[k] for k in range(len(params))]
        self._plan = self._checker.Plan(
            params, [e["exp_avg"] for e in entries], [e["exp_avg_sq"] for e in entries],
            [e["max_exp_avg_sq"] if a else None for e, a in zip(entries, amsgrads)],
            [len(g["params"]) for g in groups], self._decoupled, self._guard)
        plain = [{"params": g["params"], "lr": g["lr"], "betas": (g["beta1"], g["beta2"]),
                  "eps": g["eps"], "weight_decay": g["weight_decay"], "amsgrad": g["amsgrad"],
                  "maximize": g["maximize"]} for g in groups]
        if self.backend == "cython":
            applied = self._plan.step(plain, list(grads), self.state, self.num_threads or 0)
        else:
            applied = self._step_numba(self._plan, plain, list(grads))
        if applied is not True:
            raise RuntimeError("fastadam internal error: the compiled step refused checked input")

    def _step_numba(self, plan, groups, grads):
        """The compiled checks and scalars (Plan), then the Numba kernel per tensor."""
        work = plan.step(groups, grads, self.state, self.num_threads or 0,
                         self.skip_if_nonfinite, False)
        if work is None or work is False:
            return work
        try:  # the guard is held from the checks until the last tensor is updated
            k = 0
            for group in groups:
                for p in group["params"]:
                    variant, *scalars = work[k]
                    st = self.state[k]
                    self._backend.adam_update(
                        p, grads[k], st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq"),
                        scalars, variant & 3, bool(variant & 4), bool(variant & 8),
                        num_threads=self.num_threads)
                    k += 1
        finally:
            self._guard.busy = False
        return True

    def _apply_python(self, groups, grads):
        k = 0
        for g in groups:
            wd_mode = WD_NONE if g["weight_decay"] == 0 else (
                WD_DECOUPLED if self._decoupled else WD_L2)
            for p in g["params"]:
                st = self.state[k]
                st["step"] += 1
                s = step_scalars(g["lr"], g["beta1"], g["beta2"], g["eps"], g["weight_decay"],
                                 st["step"])
                self._backend.adam_update(p, grads[k], st["exp_avg"], st["exp_avg_sq"],
                                          st.get("max_exp_avg_sq"), s, wd_mode, g["amsgrad"],
                                          g["maximize"], num_threads=self.num_threads)
                k += 1

    # -- state --------------------------------------------------------------

    def state_dict(self):
        """torch's structure: ``{"state": {index: {...}}, "param_groups": [...]}``.

        The arrays are copies, so the dict is a snapshot; ``"params"`` of a group
        lists the indices of its parameters.
        """
        return _checkpoint.state_dict(self)

    def load_state_dict(self, state_dict):
        """Restore a :meth:`state_dict`; checks everything before changing anything."""
        _checkpoint.load_state_dict(self, state_dict)
        self._plan = None

    def save(self, path):
        """Write the state to ``path`` (.npz), atomically: a temporary file, then a rename."""
        _checkpoint.save(self, path)

    def load(self, path):
        """Read a file written by :meth:`save`; refuses a corrupt file or another model's."""
        _checkpoint.load(self, path)
        self._plan = None


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    Instead of adding :math:`\lambda p` to the gradient, each step first scales
    the parameter: :math:`p \leftarrow p\,(1 - \gamma\lambda)`.  Default
    ``weight_decay=1e-2``.
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, *, backend="auto", num_threads=None,
                 skip_if_nonfinite=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, backend=backend,
                         num_threads=num_threads, skip_if_nonfinite=skip_if_nonfinite)
