"""What every entry point of fastadam accepts: one definition of the rules and their messages.

The constructor, ``step``, ``add_param_group``, ``state_dict``/``load_state_dict``,
``save``/``load`` and ``FlatParameters`` all validate through these functions;
no other module states a rule of its own.  The compiled fast path
(``_kernel.Plan.verify``) accepts only a subset that it can verify exactly and
cheaply (exact ``float``/``int``/``bool`` objects, the very arrays already
checked here, unchanged) and hands anything else back to the checked path,
which applies these rules in full.

Hyperparameters follow ``torch.optim.Adam``: the same ranges and, where torch
has one, the same message.
"""
import numbers

import numpy as np

from . import _step
from ._formats import (INT8_BLOCK, INT8_MIN_NUMEL, SIGNED_TOP_CODE, UNSIGNED_TOP_CODE,
                       int8_blocks, is_bfloat16, is_low_precision)

HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", *_step.FLAGS)
STATE_BUFFERS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# master_weights: how a low-precision parameter's float32 master is kept, and its
# state key: "split", the trailing 16 bits of each float32 master (uint16; the
# bfloat16 parameter is its top half), or "float32", the whole master.
MASTER_WEIGHTS = ("split", "float32")
MASTER_KEYS = {"split": "master_low", "float32": "master"}
PARAM_ROUNDINGS = ("nearest", "stochastic")
# An 8-bit state buffer's per-block absmax (float32, one per INT8_BLOCK elements).
ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax",
               "max_exp_avg_sq": "max_exp_avg_sq_absmax"}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # and the low-precision ones
PARAM_DTYPE_NAMES = "float32, float64, float16 or bfloat16 (ml_dtypes)"

# A step count must stay exactly representable in the double that computes
# beta ** step: 2**53 steps is ~285 years at one step a microsecond.
MAX_STEP = 2 ** 53 - 1
# More threads than this is a mistake, not a plan: each is an OS thread with
# its own stack, and the OpenMP runtime aborts the process when it cannot
# create one (10**6 threads segfaulted).  Oversubscription below it is allowed.
MAX_THREADS = 1024


def describe(obj):
    """``module.Type`` of an object, for messages."""
    return f"{type(obj).__module__}.{type(obj).__name__}"


# -- scalars ------------------------------------------------------------------

def real(value, name, where=""):
    """A real number (not a bool) as a Python float."""
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}{where}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large for a float: {value!r}{where}") from None


def flag(value, name, where=""):
    """True or False exactly (1, 'no' and numpy.bool_ are refused, as a typo would be)."""
    if value is not True and value is not False:
        raise TypeError(f"{name} must be True or False, got {value!r}{where}")
    return value


def is_immutable_number(value):
    """Whether a validated hyperparameter object can be remembered by identity: its
    value can never change (a NumPy scalar); a user's class might."""
    return isinstance(value, np.generic)


def hyperparameters(group, where=""):
    """A group's hyperparameters, validated with torch's messages, as plain Python
    values: ``(lr, beta1, beta2, eps, weight_decay, flags)``, ``flags`` the bits of
    the option flags (``_step.FLAGS``) that are on."""
    for key in HYPERPARAMETERS:
        if key not in group:
            raise KeyError(f"parameter group has no {key!r}{where}")
    lr = real(group["lr"], "lr", where)
    betas = group["betas"]
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")
    beta1, beta2 = real(betas[0], "betas[0]", where), real(betas[1], "betas[1]", where)
    eps = real(group["eps"], "eps", where)
    weight_decay = real(group["weight_decay"], "weight_decay", where)
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
    flags = 0
    for name, bit in _FLAG_BITS:
        value = group[name]
        if value is True:
            flags |= bit
        elif value is not False:
            flag(value, name, where)  # raises
    return lr, beta1, beta2, eps, weight_decay, flags


_FLAG_BITS = tuple(zip(_step.FLAGS, _step.FLAG_BITS))  # each flag's group key and bit


def num_threads(value):
    """The ``num_threads`` argument: None (the thread policy decides) or 1..MAX_THREADS."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_threads must be None or a positive int, got {value!r}")
    if not 1 <= value <= MAX_THREADS:
        raise ValueError(f"num_threads must be None or a positive int up to {MAX_THREADS}, "
                         f"got {value}")
    return int(value)


def max_grad_norm(value):
    """The ``max_grad_norm`` argument: None (no clipping) or a finite real >= 0."""
    if value is None:
        return None
    value = real(value, "max_grad_norm")
    if not 0.0 <= value < float("inf"):
        raise ValueError(f"max_grad_norm must be None or a finite number >= 0, got {value}")
    return value


STATE_DTYPES = ("float32", "bfloat16", "int8")
# How a compressed state is stored: bfloat16 bits, or 8-bit codes (with ABSMAX_KEYS).
STATE_STORAGE = {"bfloat16": np.dtype(np.uint16), "int8": np.dtype(np.uint8)}


def state_dtype(value):
    """The ``state_dtype`` argument: how m and v are stored."""
    if not isinstance(value, str) or value not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {', '.join(map(repr, STATE_DTYPES))}, "
                         f"got {value!r}")
    return value


def seed(value):
    """The ``seed`` argument (stochastic rounding of compressed state): an int 0..2**64-1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            0 <= value < 2 ** 64):
        raise ValueError(f"seed must be an int from 0 to 2**64 - 1, got {value!r}")
    return int(value)


def tensor_state_dtype(p, kind):
    """How parameter p's state is stored under state_dtype ``kind``: 8-bit state
    is for tensors of at least INT8_MIN_NUMEL elements; smaller ones keep float32."""
    return "float32" if kind == "int8" and p.size < INT8_MIN_NUMEL else kind


def state_storage(param_dtype, kind, master=None):
    """The dtype a state buffer of a parameter of ``param_dtype`` has with state ``kind``
    (a tensor's: see tensor_state_dtype): its own dtype, or float32 where ``master`` (the
    parameter's master key, master_key) says the state updates a float32 master."""
    return STATE_STORAGE.get(kind, np.dtype(np.float32) if master else param_dtype)


def param_rounding(value):
    """The ``param_rounding`` argument: how a low-precision parameter updated in place
    is rounded."""
    if not isinstance(value, str) or value not in PARAM_ROUNDINGS:
        raise ValueError(f"param_rounding must be 'nearest' or 'stochastic', got {value!r}")
    return value


def master_weights(value):
    """The ``master_weights`` argument: None, "split" or "float32"."""
    if value is not None and (not isinstance(value, str) or value not in MASTER_WEIGHTS):
        raise ValueError(f"master_weights must be None, 'split' or 'float32', got {value!r}")
    return value


def master_key(p, master_weights):
    """The state key of parameter p's master weights, or None (not low precision, or
    no master weights)."""
    return MASTER_KEYS[master_weights] if master_weights and is_low_precision(p.dtype) else None


def int8_codes(a, where, signed):
    """Loaded 8-bit codes: none above the code of 1.0 (the quantizer never writes one)."""
    magnitude = a & np.uint8(0x7F) if signed else a
    top = SIGNED_TOP_CODE if signed else UNSIGNED_TOP_CODE
    if (magnitude > top).any():
        i = int(np.argmax(magnitude.reshape(-1) > top))
        raise ValueError(f"{where}: code {int(a.reshape(-1)[i])} at flat index {i} means more "
                         f"than its block's absmax; no code's magnitude exceeds {top} "
                         "(the state is corrupt)")


def absmax_array(a, where, numel, live):
    """An 8-bit state buffer's absmax: float32, one finite value >= 0 per block
    (checked for values when it is loaded; the kernel keeps them so)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{where}: dtype {a.dtype} is not float32")
    if a.shape != (int8_blocks(numel),):
        raise ValueError(f"{where}: shape {a.shape} is not ({int8_blocks(numel)},), one absmax per "
                         f"block of {INT8_BLOCK} elements of a {numel}-element parameter")
    if live:
        if not (a.flags.c_contiguous and a.flags.aligned and a.flags.writeable and a.dtype.isnative):
            raise ValueError(f"{where} must be a writeable, C-contiguous, native array")
    else:
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(a) & (a >= 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{where}[{i}] is {a[i]}: an absmax must be finite and >= 0 "
                             "(the state is corrupt)")


def parameter_for_options(p, name, kind, rounding="nearest", master=None):
    """What the options need of parameter p: compressed state compresses float32 state
    (float32 parameters, or low-precision ones with master weights; 8-bit state,
    float32 parameters only); stochastic rounding and split master weights are for
    bfloat16 parameters.  The options of low-precision parameters do not apply to
    float32 and float64 ones."""
    low = is_low_precision(p.dtype)
    if low and master == "split" and not is_bfloat16(p.dtype):
        raise TypeError(f"{name}: master_weights='split' keeps the trailing half of a float32 "
                        f"master, for bfloat16 parameters; {p.dtype} parameters can use "
                        "master_weights='float32'")
    if low and master is None and rounding == "stochastic" and not is_bfloat16(p.dtype):
        raise TypeError(f"{name}: param_rounding='stochastic' is for bfloat16 parameters; "
                        f"{p.dtype} parameters can use master_weights='float32'")
    if low and master is not None and rounding == "stochastic":
        raise ValueError(f"{name}: param_rounding='stochastic' rounds a parameter updated in "
                         f"place; with master_weights={master!r} the master keeps the precision "
                         "(use one or the other)")
    if kind == "int8" and p.dtype != np.float32:
        raise TypeError(f"{name}: state_dtype='int8' needs float32 parameters, got {p.dtype}")
    if kind != "float32" and p.dtype != np.float32 and not (low and master):
        raise TypeError(f"{name}: state_dtype={kind!r} needs float32 parameters"
                        + (" or master weights (master_weights='split' or 'float32')" if low else "")
                        + f", got {p.dtype}")


def step_count(value, where):
    """A stored step count: an int from 0 to MAX_STEP (numpy integers accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            0 <= value <= MAX_STEP):
        raise ValueError(f"{where}['step'] must be an int from 0 to 2**53 - 1, got {value!r}")
    return int(value)


# -- arrays -------------------------------------------------------------------

def parameter(p, name):
    """A parameter must be updatable in place: never silently copied."""
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {describe(p)} "
                        "(parameters are updated in place, so they cannot be converted)")
    not_masked(p, name)
    if not (p.dtype in FLOAT_DTYPES or is_low_precision(p.dtype)) or not p.dtype.isnative:
        raise TypeError(f"{name}: dtype {p.dtype} is not supported ({PARAM_DTYPE_NAMES})")
    if not p.flags.c_contiguous:
        raise ValueError(f"{name} is not C-contiguous; an in-place update needs a contiguous "
                         "array (np.ascontiguousarray would update a copy)")
    if not p.flags.aligned:
        raise ValueError(f"{name} is not aligned to its dtype")
    if not p.flags.writeable:
        raise ValueError(f"{name} is read-only")


def plain(a):
    """``a`` as a plain numpy.ndarray over the same memory (no copy).  An ndarray
    subclass keeps its memory and its dtype, but its operators and methods may mean
    something else (np.matrix's ``*`` is a matrix product, and its reshape(-1) stays
    2-D): code that computes with operators or flattens an array works on this view."""
    return a if type(a) is np.ndarray else np.asarray(a)


def not_masked(a, name):
    """A masked array is refused: the kernel reads and writes its data, mask or not."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a numpy.ma.MaskedArray: the step would use its masked "
                        "elements' data too (pass .filled(0) for a gradient, .data for a parameter)")


def gradient_list(grads, n_params):
    """``grads``: a list or tuple with one entry per parameter."""
    if isinstance(grads, np.ndarray) or not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads must be a list or tuple of arrays, one per parameter, "
                        f"got {describe(grads)}")
    if len(grads) != n_params:
        raise ValueError(f"grads has {len(grads)} arrays but the optimizer has "
                         f"{n_params} parameters (one gradient per parameter)")


def gradient_dtype(g_dtype, p_dtype, name, param_name, master=None):
    """A gradient's dtype against its parameter's: the parameter's, or float32 for a
    low-precision parameter updated in place (no ``master``), or bfloat16 for a
    float32 parameter."""
    fits = g_dtype == p_dtype or (
        g_dtype == np.float32 and is_low_precision(p_dtype) and not master) or (
        p_dtype == np.float32 and is_bfloat16(g_dtype))
    if not fits or not g_dtype.isnative:
        also = (" (or float32)" if is_low_precision(p_dtype) and not master
                else " (or bfloat16)" if p_dtype == np.float32 else "")
        raise TypeError(f"{name}: dtype {g_dtype} does not match {param_name} dtype "
                        f"{p_dtype}{also}")


def param_mode(dtype, rounding, master):
    """How a parameter of ``dtype`` is updated under the options: "nearest",
    "stochastic", "split" or "master" (the kernel's enum fa_param_mode, whose
    plan reads the same options in src/_kernel.pyx's param_mode)."""
    if not is_low_precision(dtype):
        return "nearest"
    if master is not None:
        return {"split": "split", "float32": "master"}[master]
    return rounding


def bounded(value, name, below=None):
    """A hyperparameter given as a number (optax's names, fastadam.jax): a finite
    real >= 0, and < ``below`` where given."""
    value = real(value, name)
    if not (0.0 <= value < (below if below is not None else float("inf"))):
        raise ValueError(f"{name} must be a finite number >= 0"
                         + (f" and < {below}" if below is not None else "") + f", got {value}")
    return value


def gradient(g, p, k, master=None):
    """``grads[k]`` against ``params[k]``: read only, so read-only arrays are fine.  Its
    dtype is the parameter's, or float32 for a low-precision parameter updated in
    place (no ``master``), or bfloat16 for a float32 parameter."""
    if not isinstance(g, np.ndarray):
        raise TypeError(f"grads[{k}]: expected a numpy.ndarray, got {describe(g)}")
    not_masked(g, f"grads[{k}]")
    gradient_dtype(g.dtype, p.dtype, f"grads[{k}]", f"params[{k}]", master)
    if g.shape != p.shape:
        raise ValueError(f"grads[{k}]: shape {g.shape} does not match params[{k}] shape {p.shape}")
    if not g.flags.c_contiguous or not g.flags.aligned:
        raise ValueError(f"grads[{k}] is not C-contiguous and aligned")


def state_entry(entry, param, where, amsgrad, live=True, kind="float32", master=None):
    """One parameter's state against the parameter; returns its step count.

    ``kind``: the optimizer's state_dtype, which fixes the buffers' dtype
    (``state_storage``).  ``live``: the buffers will be written by the kernel as
    they are (an optimizer's own state), so they must be writeable,
    C-contiguous, native and aligned; a loaded state dict is copied (and
    converted) in, so only shape matters there and the caller converts dtypes.
    """
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
    step = step_count(entry.get("step"), where)
    kind = tensor_state_dtype(param, kind)
    expected = state_storage(param.dtype, kind, master)
    if live and master:  # a loaded master is converted by the checkpoint code
        a = entry.get(master)
        dtype = np.dtype(np.uint16 if master == MASTER_KEYS["split"] else np.float32)
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != param.shape:
            raise ValueError(f"{where}[{master!r}] must be a {dtype} array of the parameter's "
                             f"shape {param.shape}")
        if not (a.flags.c_contiguous and a.flags.aligned and a.flags.writeable):
            raise ValueError(f"{where}[{master!r}] must be a writeable, C-contiguous array")
    for key in STATE_BUFFERS[:3 if amsgrad else 2]:
        if key not in entry:
            raise ValueError(f"{where} has no {key!r}")
        if live and kind == "int8":
            if ABSMAX_KEYS[key] not in entry:
                raise ValueError(f"{where} has no {ABSMAX_KEYS[key]!r}")
            absmax_array(entry[ABSMAX_KEYS[key]], f"{where}[{ABSMAX_KEYS[key]!r}]", param.size, live)
        a = entry[key]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{where}[{key!r}] must be a numpy.ndarray, got {type(a).__name__}")
        if live and a.dtype != expected:
            raise TypeError(f"{where}[{key!r}]: dtype {a.dtype} does not match the state's "
                            f"dtype {expected}" + (f" (state_dtype={kind!r})" if kind != "float32" else ""))
        if a.shape != param.shape:
            raise ValueError(f"{where}[{key!r}]: shape {a.shape} does not match the parameter's "
                             f"shape {param.shape}")
        if live and not (a.flags.c_contiguous and a.flags.aligned and a.flags.writeable
                         and a.dtype.isnative):
            raise ValueError(f"{where}[{key!r}] must be a writeable, C-contiguous, native array")
    return step


def _span(a):
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def no_overlap(named_arrays):
    """Refuse any two of the (name, array) pairs that share memory (all C-contiguous).
    Returns the sorted (start, end) spans."""
    spans = sorted((*_span(a), name) for name, a in named_arrays if a.nbytes)
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{n0} and {n1} share memory; each must be its own buffer")
    return [(start, end) for start, end, _ in spans]


def gradient_not_written(g, k, spans, start=None):
    """``grads[k]`` must not share memory with anything the step writes (sorted
    ``spans``); ``start``: g's data address, where the caller has read it."""
    if not g.nbytes:
        return
    lo, hi = _span(g) if start is None else (start, start + g.nbytes)
    a, b = 0, len(spans)
    while a < b:  # the last span starting before hi
        mid = (a + b) // 2
        if spans[mid][0] < hi:
            a = mid + 1
        else:
            b = mid
    if a > 0 and spans[a - 1][1] > lo:
        raise ValueError(f"grads[{k}] shares memory with a parameter or the optimizer "
                         "state; pass a separate gradient buffer")


# -- FlatParameters -----------------------------------------------------------

def flat_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def flat_align(align, itemsize):
    if (isinstance(align, (bool, np.bool_)) or not isinstance(align, numbers.Integral)
            or align < itemsize or align % itemsize):
        raise ValueError(f"align must be a positive multiple of the item size ({itemsize}), "
                         f"got {align!r}")
    return int(align)


def flat_shape(name, shape):
    shape = (shape,) if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool) else shape
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"shapes[{name!r}] must be a tuple of non-negative ints, got {shape!r}") from None
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        raise ValueError(f"shapes[{name!r}] must be a tuple of non-negative ints, got {shape}")
    return tuple(int(d) for d in shape)
