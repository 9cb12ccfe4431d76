"""The compiled plan's checks, in Python: the Numba backend's where no compiler was found.

The Numba backend's plan (``_backends._NumbaPlan``) runs the Numba kernel over an
optimizer's buffers; a step is first verified by the compiled plan
(``_kernel.Plan``) where the extension is built, else by ``Checks`` here, so
that the backend stands on its own.  Either way a step that cannot be verified
changes nothing and goes to the optimizer's checked path.

``Checks`` holds what the checked path validated when it built the plan (every
parameter and state array, with its dtype, shape and data address) and, at each
step, verifies that the step may run on them as they are: the same objects in
the parameter groups and the state, the same memory (address, dtype, shape,
C-contiguous, aligned, writeable), step counts that can be counted, the
hyperparameters by ``_rules.hyperparameters`` and each gradient by
``_rules.gradient`` and ``_rules.gradient_not_written``.  The addresses are read
by one Numba call per tensor (``_numba_kernel.addresses``), for the cost of a
fraction of NumPy's ``__array_interface__``.
"""
import time

import numpy as np

from . import _formats, _rules, _threads
from ._step import AMSGRAD, grad_norm, step_scalars, weight_decay_mode


def _fits(a, dtype, shape):
    """Whether planned array ``a`` is still writeable, C-contiguous and aligned memory
    of ``dtype`` (native) and ``shape`` (its address is compared apart)."""
    d = a.dtype
    return (d is dtype or (d == dtype and d.isnative)) and a.flags.carray and a.shape == shape


class Checks:
    """The compiled plan's checks and step state, in Python, for the Numba kernel:
    float32 and float64 parameters with gradients of their dtype, and float32 or
    bfloat16 state (what the Numba backend offers).  ``kernel``:
    ``fastadam._numba_kernel`` (for ``addresses``); ``forked()``: whether this is a
    forked child, where steps run serially."""

    def __init__(self, buffers, kernel, forked=lambda: False):
        if buffers.state_dtype not in ("float32", "bfloat16") or buffers.masters and any(
                m is not None for m in buffers.masters) or buffers.absmaxes and any(
                a is not None for a in buffers.absmaxes):
            raise ValueError("Checks: float32 or bfloat16 state, without master weights")
        self._addresses = kernel.addresses
        self._forked = forked
        self._decoupled = buffers.decoupled
        self._unsupported_flags = buffers.unsupported_flags
        self._bf16 = buffers.state_dtype == "bfloat16"
        self._seed = buffers.seed
        self._group_sizes = list(buffers.group_sizes)
        # per tensor: (p, m, v, v^ or None, p's dtype, the storage dtype of its state, the
        # shape, the addresses of p, m, v and v^ (or m) as addresses() reads them)
        self._tensors = []
        written = []
        for k, (p, m, v, w) in enumerate(zip(buffers.params, buffers.exp_avgs, buffers.exp_avg_sqs,
                              buffers.max_exp_avg_sqs)):
            if p.dtype not in _rules.FLOAT_DTYPES or not p.dtype.isnative:
                raise ValueError("Checks: float32 or float64 parameters")
            storage = np.dtype(np.uint16) if self._bf16 else p.dtype
            for a in (p, m, v) + ((w,) if w is not None else ()):
                if not (a.flags.carray and a.shape == p.shape and a.dtype == (
                        p.dtype if a is p else storage) and a.dtype.isnative):
                    raise ValueError("Checks: buffers must be writeable, C-contiguous, of their "
                                     "parameter's shape and of the planned dtype")
            planned = self._addresses(p, m, v, m if w is None else w, p)[:4]
            self._tensors.append((p, m, v, w, p.dtype, storage, p.shape, planned))
            written += [(f"params[{k}]", p), (f"state[{k}]['exp_avg']", m),
                        (f"state[{k}]['exp_avg_sq']", v)]
            if w is not None:
                written.append((f"state[{k}]['max_exp_avg_sq']", w))
        self._spans = _rules.no_overlap(written)
        self._numel = sum(p.size for p in buffers.params)
        self._planner = _threads.ThreadPlanner()
        self._timed = False  # whether the planner chose the count of the step under way
        self._held = None    # from verify or load to release: (grads, entries, new steps, scalars)
        self._scale = 1.0
        self.last_grad_norm = None

    # -- verifying a step ----------------------------------------------------

    def verify(self, groups, grads, state):
        """Whether this step can run on the plan as it is; if so the step is held
        (its gradients, state entries, counts and scalars) until ``release``."""
        try:
            return self._verify(groups, grads, state)
        except Exception:  # anything the rules raise: the checked path says it precisely
            return False

    def _verify(self, groups, grads, state):
        if type(groups) is not list or type(state) is not dict or type(grads) not in (list, tuple):
            return False
        grads = tuple(grads)
        if len(grads) != len(self._tensors) or len(groups) != len(self._group_sizes):
            return False
        entries, steps, scalars = [], [], []
        addresses, tensors, spans = self._addresses, self._tensors, self._spans
        k = 0
        for group, size in zip(groups, self._group_sizes):
            if type(group) is not dict:
                return False
            lr, beta1, beta2, eps, weight_decay, flags = _rules.hyperparameters(group)
            if flags & self._unsupported_flags:
                return False
            code = weight_decay_mode(weight_decay, self._decoupled) | flags
            amsgrad = bool(flags & AMSGRAD)
            params = group["params"]
            if type(params) is not list or len(params) != size:
                return False
            by_step = {}  # a group's tensors usually share their step count
            for p in params:
                planned_p, m, v, w, dtype, storage, shape, planned = tensors[k]
                entry = state.get(k)
                if p is not planned_p or type(entry) is not dict or amsgrad != (w is not None):
                    return False
                step = entry.get("step")
                if type(step) is not int or not 0 <= step < _rules.MAX_STEP:
                    return False
                if (entry.get("exp_avg") is not m or entry.get("exp_avg_sq") is not v
                        or (amsgrad and entry.get("max_exp_avg_sq") is not w)):
                    return False
                if not (_fits(p, dtype, shape) and _fits(m, storage, shape)
                        and _fits(v, storage, shape)
                        and (w is None or _fits(w, storage, shape))):
                    return False
                g = grads[k]
                if type(g) is not np.ndarray or not (g.dtype is dtype or g.dtype == dtype):
                    return False
                _rules.gradient(g, p, k)
                found = addresses(p, m, v, m if w is None else w, g)
                if found[:4] != planned:
                    return False
                _rules.gradient_not_written(g, k, spans, start=found[4])
                s = by_step.get(step)
                if s is None:
                    s = by_step[step] = step_scalars(lr, beta1, beta2, eps, weight_decay, step + 1, flags)
                scalars.append((s, code))
                entries.append(entry)
                steps.append(step + 1)
                k += 1
        self._held = (grads, entries, steps, scalars)
        self._scale = 1.0
        return True

    def load(self, hypers, remembered, grads, entries, steps):
        """The step from values the checked path has validated (``remembered`` is the
        compiled plan's; every value is read again at the next verify here)."""
        scalars = []
        k = 0
        for (lr, beta1, beta2, eps, weight_decay, flags), size in zip(hypers, self._group_sizes):
            code = weight_decay_mode(weight_decay, self._decoupled) | flags
            for _ in range(size):
                scalars.append((step_scalars(lr, beta1, beta2, eps, weight_decay, steps[k] + 1,
                                             flags), code))
                k += 1
        # np.asarray: an ndarray subclass the rules accept is read through its base class
        self._held = (tuple(np.asarray(g) for g in grads), list(entries),
                      [s + 1 for s in steps], scalars)
        self._scale = 1.0

    # -- the parts of a step -------------------------------------------------

    def gradients(self):
        """The held step's gradients (a tuple)."""
        return self._held[0]

    def inspect_gradients(self, num_threads, want_norm):
        """(all finite, global L2 norm or None) of the held gradients."""
        grads = self._held[0]
        with np.errstate(over="ignore", invalid="ignore"):
            finite = all(bool(np.isfinite(g).all()) for g in grads)
            norm = grad_norm(grads) if want_norm else None
        if want_norm:
            self.last_grad_norm = norm
        return finite, norm

    def scale_gradients_by(self, c):
        self._scale = c

    def scalars_into(self, rows):
        """The held step into ``rows``, a row per tensor as the compiled plan's
        ``scalars_into`` writes it: the scalars, the variant, the 3 rounding keys."""
        scale = self._scale
        for k, ((s, code), step) in enumerate(zip(self._held[3], self._held[2])):
            if scale != 1.0:
                s = s._replace(grad_scale=scale)
            keys = ([_formats.rounding_key(self._seed, k, step, moment) for moment in range(3)]
                    if self._bf16 else (0, 0, 0))
            rows[k] = (*s, code, *keys)

    def threads_for_step(self, requested):
        """The thread count for the step (``requested`` > 0 is taken as it is)."""
        self._timed = False
        if requested > 0:
            return requested
        if self._numel < _threads.PARALLEL_THRESHOLD or self._forked():
            return 1
        most = _threads.default_num_threads()
        if most <= 1:
            return 1
        self._timed = True
        return self._planner.decide(most)

    def record_step(self, threads, seconds, ended=None):
        if self._timed:
            self._planner.observe(threads, seconds, ended)

    @property
    def chosen_threads(self):
        return self._planner.chosen_threads

    def commit_steps(self):
        _, entries, steps, _ = self._held
        for entry, step in zip(entries, steps):
            entry["step"] = step

    def release(self):
        self._held = None
