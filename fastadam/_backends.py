"""The kernels behind ``backend=``: "cython" (compiled), "numba" (JIT), "numpy" (reference).

Every backend offers one thing to the optimizer: ``new_plan(buffers)``, a plan
over an optimizer's validated buffers with the same operations whatever the
backend (see ``_kernel.Plan``, the compiled one):

    step(lock, groups, grads, state, num_threads, skip_if_nonfinite, max_grad_norm)
        the fast path, holding the optimizer's lock (see new_lock): APPLIED,
        SKIPPED or UNVERIFIED (nothing changed; the optimizer's checked path
        decides); max_grad_norm < 0 means no clipping
    load(hypers, remembered, grads, entries, steps)   a step from checked values
    inspect_gradients(num_threads, want_norm) -> (all finite, norm or None)
    scale_gradients_by(c), run(num_threads), commit_steps(), release()
    last_grad_norm                                    the last norm computed

so the optimizer never branches on a backend's name.  ``take_step`` is the
sequence of a step over those operations, written once for the checked path and
the Numba backend; the compiled ``Plan.step`` is the same sequence fused in C
(the tests hold the two to the same bits and outcomes).
"""
import functools
import threading
import time
import warnings
from typing import NamedTuple

import numpy as np

from . import _formats, _interrupts, _threads
from ._rules import plain
from ._formats import rounding_key
from ._step import (FLAGS, clip_coefficient, flag_bits, flag_values, grad_norm, rule_flag_values,
                    step_scalars, weight_decay_mode)

BACKENDS = ("cython", "numba", "numpy")
_PREFERENCE = BACKENDS  # what "auto" tries, in order

# What a plan's step reports (the compiled kernel has the same values).
SKIPPED, APPLIED, UNVERIFIED = 0, 1, 2


def take_step(plan, num_threads, skip_if_nonfinite, max_grad_norm, grad_scale,
              on_norm=None, before_run=None):
    """A step on a plan that holds it (after ``verify`` or ``load``): the gradients'
    pre-pass if asked (finiteness, clipping's norm), skip, scale, run, commit.
    Returns APPLIED or SKIPPED.  ``max_grad_norm`` None: no clipping;
    ``on_norm()`` is called once the norm is known (applied or skipped),
    ``before_run()`` just before the update, inside the deferral of interrupts."""
    clip = max_grad_norm is not None
    norm = None
    if skip_if_nonfinite or clip:
        finite, norm = plan.inspect_gradients(num_threads, clip)
        if clip and on_norm is not None:
            on_norm()
        if skip_if_nonfinite and not finite:
            return SKIPPED
    scale = grad_scale * (clip_coefficient(max_grad_norm, norm) if clip else 1.0)
    if scale != 1.0:
        plan.scale_gradients_by(scale)
    with _interrupts.deferred():  # the tensors may be updated one call at a time
        if before_run is not None:
            before_run()
        plan.run(num_threads)
        plan.commit_steps()
    return APPLIED


class Buffers(NamedTuple):
    """An optimizer's validated buffers in tensor order (the arguments of a Plan)."""

    params: list
    exp_avgs: list
    exp_avg_sqs: list
    max_exp_avg_sqs: list   # an array or None per tensor
    group_sizes: list       # tensors per parameter group
    decoupled: bool         # AdamW's weight decay
    state_dtype: str = "float32"  # how m and v are stored (fastadam._rules.STATE_DTYPES)
    seed: int = 0           # the stochastic rounding's seed (compressed state)
    absmaxes: list = None   # per tensor: None, or its 8-bit state's (m, v, v^ or None) absmax
    param_rounding: str = "nearest"  # low-precision parameters updated in place
    master_weights: str = None       # None, "split" or "float32" (fastadam._rules.MASTER_KEYS)
    masters: list = None    # per tensor: None, or its master weights' array
    unsupported_flags: int = 0  # option bits the backend lacks: a step that sets one is not verified
    tensor_keys: list = None  # per tensor: the index its stochastic rounding draws with (None: its own)


class _CheckedOnlyPlan:
    """A plan for a kernel without compiled checks: every step goes through the
    optimizer's checked path, which then runs it through ``load`` and ``run``.

    ``kernel`` is a module with the update functions of :mod:`fastadam._reference`
    (``adam_update``, and ``adam_update_bf16``/``adam_update_int8`` where the
    backend offers compressed state)."""

    def __init__(self, buffers, kernel):
        self._buffers = buffers
        self._kernel = kernel
        self._work = None
        self.last_grad_norm = None

    def step(self, lock, groups, grads, state, num_threads, skip_if_nonfinite, max_grad_norm,
             grad_scale):
        return UNVERIFIED

    def load(self, hypers, remembered, grads, entries, steps):
        work = []
        k = 0
        for (lr, beta1, beta2, eps, weight_decay, flags), size in zip(
                hypers, self._buffers.group_sizes):
            wd_mode = weight_decay_mode(weight_decay, self._buffers.decoupled)
            options = rule_flag_values(flags)  # the update functions' keywords, shared by the group
            for _ in range(size):
                work.append([plain(grads[k]), step_scalars(lr, beta1, beta2, eps, weight_decay,
                                                    steps[k] + 1, flags), wd_mode, options, lr])
                k += 1
        self._work = (work, list(entries), [s + 1 for s in steps])

    def inspect_gradients(self, num_threads, want_norm):
        grads = [item[0] for item in self._work[0]]
        with np.errstate(over="ignore", invalid="ignore"):
            finite = all(np.isfinite(grad).all() for grad in grads)
            norm = grad_norm(grads) if want_norm else None
        if want_norm:
            self.last_grad_norm = norm
        return finite, norm

    def scale_gradients_by(self, c):
        for item in self._work[0]:
            item[1] = item[1]._replace(grad_scale=c)

    def run(self, num_threads):
        L, kernel = self._buffers, self._kernel
        threads = num_threads or 1
        steps = self._work[2]
        for k, (grad, scalars, wd_mode, flags, lr) in enumerate(self._work[0]):
            p, m, v, vmax = plain(L.params[k]), L.exp_avgs[k], L.exp_avg_sqs[k], L.max_exp_avg_sqs[k]
            master = L.masters[k] if L.masters is not None else None
            if _formats.is_low_precision(p.dtype) and master is None:  # torch's semantics
                key = (rounding_key(L.seed, k, steps[k], 3) if L.param_rounding == "stochastic"
                       else None)
                kernel.adam_update_torch_order(p, grad, m, v, vmax, scalars, wd_mode, param_key=key,
                                               **flags)
                continue
            # A float32 update: of p, or of its float32 master.
            if L.absmaxes is not None and L.absmaxes[k] is not None:
                update = functools.partial(kernel.adam_update_int8, exp_avg=m, exp_avg_sq=v,
                                           max_exp_avg_sq=vmax, absmaxes=L.absmaxes[k], lr=lr)
            elif L.state_dtype == "bfloat16":
                keys = [rounding_key(L.seed, k, steps[k], moment) for moment in range(3)]
                update = functools.partial(kernel.adam_update_bf16, exp_avg=m, exp_avg_sq=v,
                                           max_exp_avg_sq=vmax, keys=keys)
            else:
                update = functools.partial(kernel.adam_update, exp_avg=m, exp_avg_sq=v,
                                           max_exp_avg_sq=vmax, num_threads=threads)
            options = dict(grad=grad if grad.dtype in (np.float32, np.float64) else _formats.to_float32(grad),
                           s=scalars, weight_decay_mode=wd_mode, **flags)
            if master is None:
                update(p, **options)
            else:
                kernel.adam_update_mastered(update, p, master, L.master_weights == "split", **options)

    def commit_steps(self):
        _, entries, new_steps = self._work
        for entry, step in zip(entries, new_steps):
            entry["step"] = step

    def release(self):
        self._work = None


class _NumbaPlan:
    """The Numba backend's plan: ``checks`` verify a step and hold it (the compiled
    ``_kernel.Plan`` where the extension is built, else ``_checks.Checks``, the same
    checks in Python); the Numba kernel does the math.

    The plan's buffers are flattened once; a step is ``verify``, the scalars
    written into one float64 array (``scalars_into``), and one Numba call per
    tensor (``kernel.update``)."""

    def __init__(self, checks, buffers, kernel):
        self._checks = checks
        self._kernel = kernel
        flat = [[plain(a).reshape(-1) for a in arrays] for arrays in
                (buffers.params, buffers.exp_avgs, buffers.exp_avg_sqs)]
        vmax = [v.reshape(-1) if v is not None else flat[2][k]
                for k, v in enumerate(buffers.max_exp_avg_sqs)]
        self._tensors = [(k, p, m, v, w, kernel.constants(p.dtype))
                         for k, (p, m, v, w) in enumerate(zip(*flat, vmax))]
        self._bf16 = buffers.state_dtype == "bfloat16"
        # Per tensor: its scalars, variant and rounding keys (Plan.scalars_into).
        self._variant_column = kernel.N_SCALARS
        self._rows = np.zeros((len(self._tensors), kernel.N_SCALARS + 4))

    @property
    def last_grad_norm(self):
        return self._checks.last_grad_norm

    @property
    def chosen_threads(self):
        """The thread planner's choice for steps outside a trial."""
        return self._checks.chosen_threads

    def step(self, lock, groups, grads, state, num_threads, skip_if_nonfinite, max_grad_norm,
             grad_scale):
        checks = self._checks
        with lock:
            if not checks.verify(groups, grads, state):
                return UNVERIFIED
            try:
                return take_step(self, num_threads, skip_if_nonfinite,
                                 max_grad_norm if max_grad_norm >= 0 else None, grad_scale)
            finally:
                checks.release()

    def load(self, hypers, remembered, grads, entries, steps):
        self._checks.load(hypers, remembered, grads, entries, steps)

    def inspect_gradients(self, num_threads, want_norm):
        return self._checks.inspect_gradients(num_threads, want_norm)

    def scale_gradients_by(self, c):
        self._checks.scale_gradients_by(c)

    def run(self, num_threads):
        checks, rows, update = self._checks, self._rows, self._kernel.update
        checks.scalars_into(rows)
        threads = checks.threads_for_step(num_threads)  # the thread policy's planner
        started = time.perf_counter()
        bf16 = self._bf16
        for (k, p, m, v, vmax, rule), g, code in zip(self._tensors, checks.gradients(),
                                                    rows[:, self._variant_column].tolist()):
            g = g if type(g) is np.ndarray else plain(g)  # an ndarray subclass: its memory alone
            update(p, g if g.ndim == 1 else g.reshape(-1), m, v, vmax, rows, k, code, rule,
                   threads, bf16)
        ended = time.perf_counter()
        checks.record_step(threads, ended - started, ended)

    def commit_steps(self):
        self._checks.commit_steps()

    def release(self):
        self._checks.release()


# What a backend offers, besides new_plan: ``state_dtypes``; ``low_precision``
# (bfloat16 and float16 parameters and gradients); ``flags``, the option flags
# (fastadam._step.FLAGS) it implements, the others refused by the optimizer's
# checked path and never verified by its plans.

class CompiledBackend:
    name = "cython"
    state_dtypes = ("float32", "bfloat16", "int8")
    low_precision = True
    flags = FLAGS  # the kernel is built with FA_FLAGS, compared with FLAGS at import

    def __init__(self, kernel):
        self.kernel = kernel

    def new_plan(self, buffers):
        return self.kernel.Plan(*buffers)


class NumbaBackend:
    """The Numba kernel, with the compiled plan's checks where the extension is built,
    else the same checks in Python (``_checks``)."""

    name = "numba"
    state_dtypes = ("float32", "bfloat16")
    low_precision = False

    def __init__(self, module, compiled):
        self.module = module
        self.flags = module.FLAGS  # those its rule takes
        self._compiled = compiled

    def default_num_threads(self):
        return _threads.default_num_threads(self._compiled)

    def new_plan(self, buffers):
        _refuse_tensor_keys(buffers, self.name)
        buffers = buffers._replace(unsupported_flags=flag_bits(FLAGS) & ~flag_bits(self.flags))
        if self._compiled is None:
            from ._checks import Checks
            checks = Checks(buffers, self.module, forked=self.module.in_forked_child)
        else:
            checks = self._compiled.Plan(*buffers)
        return _NumbaPlan(checks, buffers, self.module)


class ReferenceBackend:
    name = "numpy"
    state_dtypes = ("float32", "bfloat16", "int8")
    low_precision = True
    flags = FLAGS  # the oracle states every flag's math

    def __init__(self, module):
        self.module = module

    def new_plan(self, buffers):
        _refuse_tensor_keys(buffers, self.name)
        return _CheckedOnlyPlan(buffers, self.module)


def _refuse_tensor_keys(buffers, name):
    # Only fastadam.torch sets them (its rounding draws follow a tensor's place among all
    # of its parameters), and only on the compiled kernel's plan.
    if buffers.tensor_keys is not None:
        raise ValueError(f"backend {name!r} draws stochastic rounding by tensor order only")


def refuse_unimplemented_flags(backend, flags, where=""):
    """Raise, naming it, for the first option flag on in ``flags`` (bits) that ``backend``
    does not implement."""
    for name, on in flag_values(flags).items():
        if on and name not in backend.flags:
            raise ValueError(f"backend {backend.name!r} does not implement {name}=True{where}; "
                             "use backend='cython' (or 'numpy')")


@functools.cache
def _load_cython():
    try:
        with _threads.kernel_openmp_environment():
            from . import _kernel
    except ImportError as e:
        raise ImportError(f"the compiled extension fastadam._kernel cannot be imported ({e}); "
                          "it is not built where fastadam was installed without a working C++ "
                          "compiler") from e
    _check_built_with(_kernel)
    return _kernel


def _check_built_with(kernel):
    """The compiled kernel's copies of the package's definitions: the step's scalar
    record and option bits, the step-count limit, the 8-bit formats and guard."""
    from . import _rules, _step
    stated = {
        "STEP_SCALAR_NAMES": _step.StepScalars._fields,
        "VARIANT_BITS": (_step.WD_MASK, *zip(_step.FLAGS, _step.FLAG_BITS)),
        "MAX_STEP": _rules.MAX_STEP,
        "INT8_FORMAT": (_formats.INT8_BLOCK, _formats.INT8_FRACTION_BITS,
                        _formats.INT8_SIGNED_EXPONENT_OFFSET, _formats.INT8_UNSIGNED_EXPONENT_OFFSET),
        "INT8_MAX_UPDATE": _formats.INT8_MAX_UPDATE,
    }
    for name, value in stated.items():
        built = getattr(kernel, name, None)
        if built != value:
            raise ImportError(f"fastadam._kernel was built with {name} = {built!r}, the package "
                              f"states {value!r}: rebuild the extension")


def compiled_or_none():
    """The compiled extension if it is built, else None."""
    try:
        return _load_cython()
    except ImportError:
        return None


def new_lock():
    """An optimizer's lock: the compiled kernel's (its fast path takes it from C)
    when the extension is built, else a ``threading.Lock``."""
    kernel = compiled_or_none()
    return kernel.Lock() if kernel is not None else threading.Lock()


def _make_cython():
    return CompiledBackend(_load_cython())


def _make_numba():
    from . import _numba_kernel
    return NumbaBackend(_numba_kernel, compiled_or_none())


def _make_numpy():
    from . import _reference  # backend="numpy" is the oracle itself, by design
    return ReferenceBackend(_reference)


_MAKERS = {"cython": _make_cython, "numba": _make_numba, "numpy": _make_numpy}


def available():
    """{backend: None if usable, else the reason it is not}."""
    status = {}
    for name in BACKENDS:
        try:
            _MAKERS[name]()
            status[name] = None
        except ImportError as e:
            status[name] = str(e)
    return status


def load(name):
    """The backend object for ``backend=name``; "auto" picks the best available."""
    if name == "auto":
        reasons = []
        for candidate in _PREFERENCE:
            try:
                backend = _MAKERS[candidate]()
            except ImportError as e:
                reasons.append(f"{candidate}: {e}")
                continue
            if candidate != _PREFERENCE[0]:
                warnings.warn(f"fastadam: the compiled kernel is not available ({'; '.join(reasons)});"
                              f" using backend={candidate!r}, which is slower.  To build the kernel,"
                              " install a C++ compiler (g++) and reinstall fastadam from source, or"
                              " install a fastadam wheel",
                              RuntimeWarning, stacklevel=4)
            return backend
        raise ImportError("no fastadam backend is available")  # numpy always is
    if not isinstance(name, str) or name not in _MAKERS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; "
                         f"got {name!r}")
    try:
        return _MAKERS[name]()
    except ImportError as e:
        raise ImportError(f"fastadam backend {name!r} is not available: {e}") from e
