"""``fastadam.Adam`` and ``fastadam.AdamW``: torch.optim's API over NumPy arrays.

A step has two paths with one meaning.  The fast path is the backend's plan
(``_kernel.Plan.step`` for the compiled kernel): it verifies exactly and
cheaply that the step may run on the buffers it holds and runs it, or changes
nothing and says UNVERIFIED.  The checked path here then applies the rules of
``_rules`` in full, as on a first step: it raises the precise error (naming the
argument and its index), or builds a new plan and applies the step.  Either way
a step that raises leaves parameters and state exactly as they were.

One lock per optimizer covers ``step``, ``state_dict``, ``load_state_dict``,
``save`` and ``load``, so each is whole with respect to the others.
"""
import os

import numpy as np

from . import _backends, _checkpoint, _flat, _fork, _formats, _interrupts, _rules, _step
from ._backends import APPLIED, SKIPPED
from ._variants import with_defaults


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
    ``maximize`` negating :math:`g`, and ``eps_hat`` placing :math:`\epsilon` as
    Keras's and TensorFlow's Adam do (the paper's :math:`\hat\epsilon`):
    :math:`p \leftarrow p - \frac{\gamma\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
    \frac{m}{\sqrt{v} + \epsilon}`.  The exact order of operations and rounding
    is that of :mod:`fastadam._reference`.

    Args:
        params: a list of float32/float64 C-contiguous writeable arrays, or a
            list of dicts (parameter groups) with ``"params"`` and any
            hyperparameter to override.  They are updated in place.
        lr, betas, eps, weight_decay, amsgrad, maximize: as in torch.
        eps_hat: ``eps`` added to :math:`\sqrt{v}` before the bias correction (Keras's
            ``epsilon``) rather than after it (torch's ``eps``); a group key.
        backend: ``"cython"``, ``"numba"``, ``"numpy"`` (the reference) or
            ``"auto"`` (the first available of those; a warning below cython).
        num_threads: threads for a step, 1 to 1024; None (the default) honours
            ``OMP_NUM_THREADS``, threadpoolctl, the CPU affinity mask and
            cgroup quotas.
        skip_if_nonfinite: if a gradient holds a NaN or an Inf, skip the whole
            step (parameters and state untouched; ``step`` returns False and
            ``skipped_steps`` counts it).  Off by default, as in torch, where a
            NaN gradient propagates into the parameters.
        max_grad_norm: clip the gradients by their global L2 norm, as
            ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` before the
            step would, fused into it: the norm is computed in the read-only
            pass ``skip_if_nonfinite`` makes (one pass for both), in float64 and
            the same for any thread count; the coefficient scales g as it is
            read, so the caller's gradients are not modified.
            ``last_grad_norm`` holds the norm before clipping.  None: off.
        state_dtype: how m and v are stored: ``"float32"`` (the parameters' dtype)
            or ``"bfloat16"`` (float32 parameters only; the upper 16 bits of each
            float32 value, in uint16 arrays, rounded stochastically: see
            :mod:`fastadam._reference`), which halves the state's memory and the
            step's traffic in it.
        seed: the stochastic rounding's seed: with the same seed, a run is
            reproduced bit for bit, for any thread count.
        param_rounding: how bfloat16 parameters updated in place are rounded:
            ``"nearest"`` (even; torch's semantics) or ``"stochastic"`` (unbiased,
            from the seed's stream, so that updates below half a bfloat16 step
            still move the weights on average).
        master_weights: for bfloat16 and float16 parameters: None (the state is
            kept in the parameter's dtype, as torch does), ``"split"`` (bfloat16:
            the state keeps the trailing 16 bits of a float32 master whose top
            half is the parameter, 2 bytes a parameter) or ``"float32"`` (a float32
            master in the state).  With a master, the step updates it exactly as a
            float32 parameter, and the state may be compressed (``state_dtype``).

    Parameters are float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``,
    ``pip install "fastadam[bf16]"``); gradients are the parameter's dtype, or
    float32 for low-precision parameters without master weights, or bfloat16 for
    float32 parameters.  Low-precision arithmetic is float32 (docs/low-precision.md).
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, *, eps_hat=False, backend="auto", num_threads=None,
                 skip_if_nonfinite=False, max_grad_norm=None, state_dtype="float32", seed=0,
                 param_rounding="nearest", master_weights=None):
        self.defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             amsgrad=amsgrad, maximize=maximize, eps_hat=eps_hat)
        _rules.hyperparameters(self.defaults)
        self.state_dtype = _rules.state_dtype(state_dtype)
        self.seed = _rules.seed(seed)
        self.param_rounding = _rules.param_rounding(param_rounding)
        self.master_weights = _rules.master_weights(master_weights)
        self._lock = _backends.new_lock()
        _fork.register(self)
        self.num_threads = num_threads
        self.skip_if_nonfinite = skip_if_nonfinite
        self.max_grad_norm = max_grad_norm
        self.skipped_steps = 0
        self._grad_scale = 1.0  # multiplies the gradients as read: fastadam.distributed's 1/N
        # Per tensor, the index its stochastic rounding draws with (None: its place here);
        # fastadam.torch sets it to each tensor's place among all of its own parameters.
        self._tensor_keys = None
        self._backend = _backends.load(backend)
        if self.state_dtype not in self._backend.state_dtypes:
            raise ValueError(f"backend {self.backend!r} does not support state_dtype="
                             f"{self.state_dtype!r}; use backend='cython' (or 'numpy')")
        self.param_groups = []
        self.state = {}
        self._plan = None
        self._earlier_grad_norm = None  # last_grad_norm as the plans before this one left it
        if isinstance(params, (np.ndarray, dict)):
            raise TypeError("params argument given to the optimizer should be a list of arrays "
                            f"or dicts, but got {_rules.describe(params)}")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        for group in params:
            self.add_param_group(group)

    # -- copies ---------------------------------------------------------------

    def __getstate__(self):
        """What copy.deepcopy and pickle keep: everything but the lock, the plan and the
        backend's modules (the backend is kept by name)."""
        with self._lock:
            attributes = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_plan", "_backend")}
            attributes["_backend"] = self._backend.name
            attributes["_earlier_grad_norm"] = self.last_grad_norm
        return attributes

    def __setstate__(self, attributes):
        attributes = dict(attributes)
        backend = _backends.load(attributes.pop("_backend"))
        self.__dict__.update(attributes)
        self._backend, self._lock, self._plan = backend, _backends.new_lock(), None
        _fork.register(self)

    @property
    def backend(self):
        """The backend's name: "cython", "numba" or "numpy"."""
        return self._backend.name

    @property
    def num_threads(self):
        """Threads per step (None: the thread policy decides); validated when set."""
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value):
        self._num_threads = _rules.num_threads(value)
        self._threads_arg = self._num_threads or 0  # what the plans take: 0 for the policy

    @property
    def skip_if_nonfinite(self):
        """Skip a step whose gradients hold a NaN or an Inf; validated when set."""
        return self._skip_if_nonfinite

    @skip_if_nonfinite.setter
    def skip_if_nonfinite(self, value):
        self._skip_if_nonfinite = _rules.flag(value, "skip_if_nonfinite")

    @property
    def max_grad_norm(self):
        """Global-norm gradient clipping's threshold (None: off); validated when set."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value):
        self._max_grad_norm = _rules.max_grad_norm(value)
        self._max_grad_norm_arg = -1.0 if value is None else self._max_grad_norm

    @property
    def last_grad_norm(self):
        """The gradients' global L2 norm (before clipping) at the last step that
        clipped; None before the first."""
        norm = None if self._plan is None else self._plan.last_grad_norm
        return self._earlier_grad_norm if norm is None else norm

    def _replace_plan(self, plan):
        """Make ``plan`` (or None) the optimizer's plan, keeping the last clipping
        step's norm: last_grad_norm does not depend on when plans are rebuilt."""
        if self._plan is not None and self._plan.last_grad_norm is not None:
            self._earlier_grad_norm = self._plan.last_grad_norm
        self._plan = plan

    def __repr__(self):
        lines = [f"{type(self).__name__} (backend={self.backend!r})"]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {group.get(k)}" for k in _rules.HYPERPARAMETERS]
        return "\n".join(lines)

    # -- parameters ---------------------------------------------------------

    def _parameters(self):
        """All parameters in the optimizer's order (group by group)."""
        params = []
        for i, group in enumerate(self.param_groups):
            if not isinstance(group, dict) or not isinstance(group.get("params"), (list, tuple)):
                raise TypeError(f"param_groups[{i}] must be a dict whose 'params' is a list")
            params += group["params"]
        return params

    def add_param_group(self, param_group):
        """Add a group of parameters with its own hyperparameters (torch's API)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {_rules.describe(param_group)}")
        if "params" not in param_group:
            raise ValueError("param_group must have a 'params' key")
        params = param_group["params"]
        if isinstance(params, np.ndarray):
            params = [params]
        elif isinstance(params, (set, dict)):
            raise TypeError("optimizer parameters need to be organized in ordered collections")
        else:
            params = list(params)
        with self._lock:
            where = f" (param_groups[{len(self.param_groups)}])"
            group = {"params": params}
            for key in _rules.HYPERPARAMETERS:
                group[key] = param_group.get(key, self.defaults[key])
            group.update({k: v for k, v in param_group.items() if k not in group})
            _backends.refuse_unimplemented_flags(self._backend, _rules.hyperparameters(group, where)[5],
                                                 where)
            existing = self._parameters()
            for j, p in enumerate(params):
                name = f"param_groups[{len(self.param_groups)}]['params'][{j}]"
                _rules.parameter(p, name)
                self._parameter_for_options(p, name)
            if any(p is q for p in params for q in existing) or len({id(p) for p in params}) != len(params):
                raise ValueError("some parameters appear in more than one parameter group")
            _rules.no_overlap((f"params[{k}]", p) for k, p in enumerate(existing + params))
            self.param_groups.append(group)
            self._replace_plan(None)

    # -- the step -----------------------------------------------------------

    def step(self, grads):
        """Apply one Adam step in place, given one gradient per parameter.

        ``grads`` is a list (or tuple) of arrays in the optimizer's parameter
        order, each of its parameter's shape and dtype, C-contiguous.  Returns
        True if the step was applied; False if it was skipped (only with
        ``skip_if_nonfinite``).  Raises (and changes nothing) on any mismatch.
        """
        plan = self._plan
        if plan is not None:  # the fast path; it takes the lock and checks under it
            status = plan.step(self._lock, self.param_groups, grads, self.state, self._threads_arg,
                               self._skip_if_nonfinite, self._max_grad_norm_arg, self._grad_scale)
            if status == APPLIED:
                return True
            if status == SKIPPED:
                with self._lock:
                    self.skipped_steps += 1
                return False
        with self._lock:
            if self._checked_step(grads) == APPLIED:
                return True
            self.skipped_steps += 1
            return False

    def _checked_step(self, grads):
        """Validate everything with the rules, as on a first step; then apply the
        step on a new plan.  Returns APPLIED or SKIPPED, or raises and changes nothing."""
        params = self._parameters()
        _rules.gradient_list(grads, len(params))
        grads = tuple(grads)  # held: another thread may change the caller's list
        hypers, remembered, steps, written = [], [], [], []
        entries, new_state = [], {}
        buffers = _backends.Buffers([], [], [], [], [], self._decoupled, self.state_dtype, self.seed, [],
                                    self.param_rounding, self.master_weights, [],
                                    tensor_keys=getattr(self, "_tensor_keys", None))
        zeros = self._new_state_buffers
        k = 0
        for i, group in enumerate(self.param_groups):
            hyper = _rules.hyperparameters(group, f" (param_groups[{i}])")
            _backends.refuse_unimplemented_flags(self._backend, hyper[5], f" (param_groups[{i}])")
            hypers.append(hyper)
            raw = (group["lr"], group["betas"][0], group["betas"][1], group["eps"],
                   group["weight_decay"])
            remembered += [x if _rules.is_immutable_number(x) else None for x in raw]
            amsgrad = bool(hyper[5] & _step.AMSGRAD)
            for p in group["params"]:
                _rules.parameter(p, f"params[{k}]")
                self._parameter_for_options(p, f"params[{k}]")
                master = _rules.master_key(p, self.master_weights)
                _rules.gradient(grads[k], p, k, master)
                self._backend_takes(grads[k].dtype, f"grads[{k}]")
                entry = self.state.get(k)
                if entry is None:
                    entry = new_state[k] = dict(step=0, **zeros(p, "exp_avg"),
                                                **zeros(p, "exp_avg_sq"))
                    if master:
                        entry.update(zeros(p, master))
                    step = 0
                else:
                    if master and master not in entry:
                        # master weights switched on after a step (or loaded state without
                        # them): the master starts as the parameter
                        entry = new_state[k] = dict(entry, **zeros(p, master))
                    step = _rules.state_entry(entry, p, f"state[{k}]",
                                              amsgrad=amsgrad and "max_exp_avg_sq" in entry,
                                              kind=self.state_dtype, master=master)
                    if step >= _rules.MAX_STEP:
                        raise ValueError(f"state[{k}]['step'] is {step}: no further step can be "
                                         "counted exactly (the limit is 2**53 - 1)")
                if amsgrad and "max_exp_avg_sq" not in entry:
                    # AMSGrad switched on after the first step: its running max starts at zero.
                    entry = new_state[k] = dict(entry, **zeros(p, "max_exp_avg_sq"))
                buffers.params.append(p)
                buffers.exp_avgs.append(entry["exp_avg"])
                buffers.exp_avg_sqs.append(entry["exp_avg_sq"])
                buffers.max_exp_avg_sqs.append(entry["max_exp_avg_sq"] if amsgrad else None)
                buffers.masters.append(entry[master] if master else None)
                if master:
                    written.append((f"state[{k}][{master!r}]", entry[master]))
                written += [(f"params[{k}]", p), (f"state[{k}]['exp_avg']", entry["exp_avg"]),
                            (f"state[{k}]['exp_avg_sq']", entry["exp_avg_sq"])]
                if amsgrad:
                    written.append((f"state[{k}]['max_exp_avg_sq']", entry["max_exp_avg_sq"]))
                if _rules.tensor_state_dtype(p, self.state_dtype) == "int8":
                    keys = [_rules.ABSMAX_KEYS[key] for key in _rules.STATE_BUFFERS[:3 if amsgrad else 2]]
                    buffers.absmaxes.append(tuple(entry[key] for key in keys) + (None,) * (3 - len(keys)))
                    written += [(f"state[{k}][{key!r}]", entry[key]) for key in keys]
                else:
                    buffers.absmaxes.append(None)
                entries.append(entry)
                steps.append(step)
                k += 1
            buffers.group_sizes.append(len(group["params"]))
        spans = _rules.no_overlap(written)
        for k, g in enumerate(grads):
            _rules.gradient_not_written(g, k, spans)
        # Everything is checked: from here on nothing can fail.
        plan = self._backend.new_plan(buffers)
        plan.load(hypers, remembered, grads, entries, steps)

        def adopt():  # the new state and plan, with interrupts deferred: nothing can fail now
            self.state.update(new_state)
            self._replace_plan(plan)

        try:
            return _backends.take_step(plan, self._threads_arg, self._skip_if_nonfinite,
                                       self._max_grad_norm, self._grad_scale,
                                       on_norm=lambda: self._replace_plan(plan), before_run=adopt)
        finally:
            plan.release()

    def _parameter_for_options(self, p, name):
        _rules.parameter_for_options(p, name, self.state_dtype, self.param_rounding,
                                     self.master_weights)
        self._backend_takes(p.dtype, name)

    def _backend_takes(self, dtype, name):
        if dtype not in _rules.FLOAT_DTYPES and not self._backend.low_precision:
            raise TypeError(f"{name}: backend {self.backend!r} updates float32 and float64 "
                            f"arrays, not {dtype}; use backend='cython' (or 'numpy')")

    def _new_state_buffers(self, p, key):
        """{key: zeros} for parameter p's state buffer ``key``, with its absmax for
        8-bit state (zero bits are zero in every storage), placed beside p as
        _flat.state_zeros places state; a master key's buffer starts as the
        parameter (its float32 value, or zero trailing bits)."""
        if key == _rules.MASTER_KEYS["float32"]:
            master = _flat.state_zeros(p.shape, np.float32, key, p.ctypes.data)
            master[...] = _formats.to_float32(p)
            return {key: master}
        if key == _rules.MASTER_KEYS["split"]:
            return {key: _flat.state_zeros(p.shape, np.uint16, key, p.ctypes.data)}
        kind = _rules.tensor_state_dtype(p, self.state_dtype)
        dtype = _rules.state_storage(p.dtype, kind, _rules.master_key(p, self.master_weights))
        buffers = {key: _flat.state_zeros(p.shape, dtype, key, p.ctypes.data)}
        if kind == "int8":
            buffers[_rules.ABSMAX_KEYS[key]] = np.zeros(_formats.int8_blocks(p.size), np.float32)
        return buffers

    # -- state --------------------------------------------------------------

    def state_nbytes(self):
        """Bytes held by the optimizer state (m, v and AMSGrad's running max, with
        the 8-bit state's absmax arrays), not counting the up to 4 KiB of padding
        that places each buffer of 64 KiB or more (see _flat.state_zeros)."""
        with self._lock:
            return sum(value.nbytes for entry in self.state.values() for key, value in entry.items()
                       if isinstance(value, np.ndarray) and (
                           key in _rules.STATE_BUFFERS or key in _rules.ABSMAX_KEYS.values()
                           or key in _rules.MASTER_KEYS.values()))

    def state_dict(self):
        """torch's structure: ``{"state": {index: {...}}, "param_groups": [...]}``.

        The arrays are copies, so the dict is a snapshot of one moment between
        steps; ``"params"`` of a group lists the indices of its parameters.
        """
        with self._lock:
            return _checkpoint.state_dict(self)

    def load_state_dict(self, state_dict):
        """Restore a :meth:`state_dict`; checks everything before changing anything."""
        with self._lock, _interrupts.deferred():
            _checkpoint.load_state_dict(self, state_dict)
            self._replace_plan(None)

    def save(self, path):
        """Write the state to ``path`` (.npz), atomically: a temporary file, then a rename."""
        with self._lock:
            snapshot = _checkpoint.state_dict(self)
            meta = _checkpoint.file_meta(self, snapshot)
        _checkpoint.write(path, snapshot, meta)

    def load(self, path):
        """Read a file written by :meth:`save`; refuses a corrupt file, another
        model's, or another optimizer's (naming the file)."""
        snapshot = _checkpoint.read(path, self)
        with self._lock, _interrupts.deferred():
            _checkpoint.load_state_dict(self, snapshot, source=os.fspath(path))
            self._replace_plan(None)


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    Instead of adding :math:`\lambda p` to the gradient, each step first scales
    the parameter: :math:`p \leftarrow p\,(1 - \gamma\lambda)`.  Default
    ``weight_decay=1e-2``.
    """

    _decoupled = True
    __init__ = with_defaults(Adam.__init__, weight_decay=1e-2)
