"""The pure-NumPy reference: the oracle of the tests.

Kingma & Ba's Algorithm 1 in PyTorch's arrangement (``torch.optim.Adam`` with
``foreach=False``), one NumPy operation at a time.  For a step ``t`` (1-based)
and gradient ``g``::

    g   <- c * g                                gradient clipping (c = 1 when off; see below)
    g   <- -g                                   if maximize
    g   <- g + wd * p                           Adam: L2 weight decay
    p   <- p * (1 - lr * wd)                    AdamW: decoupled weight decay
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * (g * g)
    v^  <- max(v^, v)                           AMSGrad (the denominator uses v^; np.maximum:
                                                a NaN wins, a tie takes v)
    p   <- p - lr / (1 - beta1^t) * (m / (sqrt(v) * (1 / sqrt(1 - beta2^t)) + eps))

every operation rounded in the arrays' dtype T (the scalars are computed once
per step in double and rounded to T once; ``fastadam._step.step_scalars``),
under the flush-to-zero rule that ``fastadam._formats`` states and implements
(``FlushToZero``: no subnormal is read or produced; x86's FTZ and DAZ modes).
With ``eps=0`` the rule shows: a gradient whose square underflows (|g| < ~3e-18
in float32 with beta2 = 0.999) leaves v = 0 beside a nonzero m, and m / 0 moves
p to +-inf, as torch does under ``set_flush_denormal(True)``; where m and v are
both 0 the update is 0/0 = NaN, as in torch.  The default eps = 1e-8 has neither.

Gradient clipping (``max_grad_norm``), torch's ``clip_grad_norm_`` folded into
the step: the global L2 norm of all the step's gradients (``grad_norm``, in
IEEE double, in an order fixed by element indices alone, so the same bits for
every thread count), then ``c = clip_coefficient(max_grad_norm, norm)``.

The state formats (bfloat16, blockwise 8-bit) and the rounding streams are those
of ``fastadam._formats``; the per-step scalars and the norm's order those of
``fastadam._step``.  This module writes the update once, one NumPy operation at
a time, and is imported by the tests and by ``backend="numpy"`` alone.  The
compiled kernel, the Numba backend and this reference are bitwise equal.
"""
import numpy as np

from ._formats import (  # noqa: F401  (re-exported: the oracle's whole vocabulary)
    ABSMAX_LIMIT, INT8_BLOCK, INT8_FRACTION_BITS, INT8_MAX_UPDATE, INT8_MIN_NUMEL,
    INT8_SIGNED_EXPONENT_OFFSET, INT8_UNSIGNED_EXPONENT_OFFSET, SCALE_EXP, SIGNED_MAP,
    SIGNED_MAGNITUDES, SIGNED_TOP_CODE, UNSIGNED_MAP, UNSIGNED_TOP_CODE, FlushToZero,
    bf16_decode, bf16_round_nearest, bf16_round_stochastic, int8_blocks, int8_decode,
    int8_encode, int8_nearest_codes, mix32, round_nearest, rounding_bits, rounding_key,
    split_halves, split_master, to_float32)
from ._step import (  # noqa: F401
    NORM_BLOCK, NORM_LANES, WD_DECOUPLED, WD_L2, WD_NONE, StepScalars, clip_coefficient,
    grad_norm, step_scalars)


def adam_update_bf16(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode,
                     amsgrad, maximize, keys):
    """One in-place step of one float32 tensor whose state is bfloat16 bits; ``keys``
    are rounding_key(seed, tensor, step, moment) for moments 0, 1, 2 (1 is unused:
    m and v share stream 0)."""
    m = bf16_decode(exp_avg)
    v = bf16_decode(exp_avg_sq)
    vmax = bf16_decode(max_exp_avg_sq) if amsgrad else None
    adam_update(param, grad, m, v, vmax, s, weight_decay_mode, amsgrad, maximize)
    n = param.size
    r = rounding_bits(keys[0], n)
    low, high = r & np.uint32(0xFFFF), r >> np.uint32(16)
    exp_avg[...] = bf16_round_stochastic(m, low).reshape(exp_avg.shape)
    exp_avg_sq[...] = bf16_round_stochastic(v, high).reshape(exp_avg_sq.shape)
    if amsgrad:
        low2 = rounding_bits(keys[2], n) & np.uint32(0xFFFF)
        max_exp_avg_sq[...] = bf16_round_stochastic(vmax, low2).reshape(max_exp_avg_sq.shape)


def adam_update_int8(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, absmaxes, s,
                     weight_decay_mode, amsgrad, maximize, lr):
    """One in-place step of one float32 tensor whose state is 8-bit codes (uint8)
    with per-block absmax arrays ``absmaxes`` (m's, v's, v^'s or None)."""
    m = int8_decode(exp_avg, absmaxes[0], signed=True)
    v = int8_decode(exp_avg_sq, absmaxes[1], signed=False)
    vmax = int8_decode(max_exp_avg_sq, absmaxes[2], signed=False) if amsgrad else None
    adam_update(param, grad, m, v, vmax, s, weight_decay_mode, amsgrad, maximize,
                max_update=INT8_MAX_UPDATE * lr)
    for codes, absmax, values, signed in ((exp_avg, absmaxes[0], m, True),
                                          (exp_avg_sq, absmaxes[1], v, False),
                                          (max_exp_avg_sq, absmaxes[2], vmax, False)):
        if values is not None:
            codes[...], absmax[...] = int8_encode(values, signed)


def adam_update_torch_order(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s,
                            weight_decay_mode, amsgrad, maximize, param_key=None):
    """One in-place step of a bfloat16 or float16 parameter with torch's semantics:
    the state in the parameter's dtype, the math in float32 in the order of
    torch's fused CPU kernel, each result rounded to nearest even; with
    ``param_key`` (bfloat16) p is rounded stochastically with the low half of that
    stream's bits.  Per element, under the flush-to-zero rule::

        g  <- c * g;  g <- -g (maximize);  g <- g + wd * p (L2);  p <- p * (1 - lr*wd) (AdamW)
        m  <- fma(1 - beta1, g - m, m)          if 1 - beta1 < 1/2
              fma((1 - beta1) - 1, g - m, g)    otherwise (torch's lerp)
        v  <- v * beta2 + ((1 - beta2) * g) * g
        v^ <- max(v^, v)                        (AMSGrad)
        p  <- p - ((lr / bc1) * m) / (sqrt(v) / sqrt(bc2) + eps)
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        dtype = param.dtype
        f = FlushToZero(np.dtype(np.float32))
        s = StepScalars(*(f.scalar(x) for x in s))
        g = f.mul(f.operand(to_float32(grad)), s.grad_scale)
        if maximize:
            g = -g
        p = f.operand(to_float32(param))
        if weight_decay_mode == WD_L2:
            g = f.add(g, f.mul(s.weight_decay, p))
        elif weight_decay_mode == WD_DECOUPLED:
            p = f.mul(p, s.decay)
        m0 = f.operand(to_float32(exp_avg))
        small = s.one_minus_beta1 < np.float32(0.5)
        coefficient = s.one_minus_beta1 if small else f.sub(s.one_minus_beta1, np.float32(1))
        m = f.fma(coefficient, f.sub(g, m0), m0 if small else g)
        v = f.add(f.mul(f.operand(to_float32(exp_avg_sq)), s.beta2),
                  f.mul(f.mul(s.one_minus_beta2, g), g))
        exp_avg[...] = round_nearest(m, dtype)
        exp_avg_sq[...] = round_nearest(v, dtype)
        if amsgrad:
            v = np.maximum(f.operand(to_float32(max_exp_avg_sq)), v)
            max_exp_avg_sq[...] = round_nearest(v, dtype)
        denom = f.add(f.div(np.sqrt(v), s.sqrt_bc2), s.eps)
        p = f.sub(p, f.div(f.mul(s.step_size, m), denom))
        if param_key is None:
            param[...] = round_nearest(p, dtype)
        else:
            random16 = rounding_bits(param_key, p.size) & np.uint32(0xFFFF)
            param[...] = bf16_round_stochastic(p, random16).view(dtype).reshape(param.shape)


def adam_update_mastered(update, param, master, split, *args, **kwargs):
    """One in-place step of a low-precision parameter with master weights: the
    float32 master (``master`` itself, or with ``split`` rebuilt from bfloat16
    ``param`` and its trailing bits ``master``) is updated by ``update`` (one of the
    float32 updates here, called with ``*args, **kwargs``) exactly as a float32
    parameter would be, then written back: both halves, or p rounded to nearest."""
    weights = split_master(param, master) if split else master
    update(weights, *args, **kwargs)
    if split:
        high, low = split_halves(weights)
        param.view(np.uint16)[...] = high
        master[...] = low
    else:
        param[...] = round_nearest(weights, param.dtype)


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode,
                amsgrad, maximize, num_threads=None, max_update=None):
    """One in-place step of one tensor; ``s`` is a :class:`StepScalars`.

    ``max_update``: clamp the Adam term of the update to +-max_update (the 8-bit
    state's guard, above); None: no clamp.  ``num_threads`` is ignored: NumPy's
    elementwise operations use one thread.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        # Overflow to inf and NaN are documented results (README), as in the compiled kernels.
        _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode, amsgrad,
                maximize, max_update)


def _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode, amsgrad,
            maximize, max_update=None):
    f = FlushToZero(param.dtype)
    s = StepScalars(*(f.scalar(x) for x in s))  # each rounded to T once
    g = f.mul(f.operand(grad), s.grad_scale)
    if maximize:
        g = -g
    p = f.operand(param)
    if weight_decay_mode == WD_L2:
        g = f.add(g, f.mul(s.weight_decay, p))
    elif weight_decay_mode == WD_DECOUPLED:
        p = f.mul(p, s.decay)
    m = f.add(f.mul(s.beta1, f.operand(exp_avg)), f.mul(s.one_minus_beta1, g))
    v = f.add(f.mul(s.beta2, f.operand(exp_avg_sq)), f.mul(s.one_minus_beta2, f.mul(g, g)))
    exp_avg[...] = m
    exp_avg_sq[...] = v
    if amsgrad:
        v = np.maximum(f.operand(max_exp_avg_sq), v)
        max_exp_avg_sq[...] = v
    # sqrt of a normal or zero v is never tiny: no flush needed after it.
    denom = f.add(f.mul(np.sqrt(v), s.inv_sqrt_bc2), s.eps)
    update = f.mul(s.step_size, f.div(m, denom))
    if max_update is not None:  # NaN passes through, as in the kernel's selects
        bound = f.scalar(max_update)
        update = np.where(update > bound, bound, np.where(update < -bound, -bound, update))
    param[...] = f.sub(p, update)
