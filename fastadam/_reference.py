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
    v^  <- max(v^, v)                           AMSGrad (the denominator uses v^)
    p   <- p - lr / (1 - beta1^t) * (m / (sqrt(v) * (1 / sqrt(1 - beta2^t)) + eps))

every operation rounded in the arrays' dtype T (the scalars are computed once
per step in double and rounded to T once), under one rule for subnormal
numbers, **flush to zero**, which is what x86's FTZ and DAZ modes do (and
``torch.set_flush_denormal(True)``):

- every operand whose magnitude is below T's smallest normal number is read as
  a zero of its sign (DAZ), scalars included;
- every result whose magnitude, rounded to T's precision with an unbounded
  exponent, is below the smallest normal number is a zero of its sign (FTZ).
  (x86 detects this "tininess" after rounding: a result just below the
  smallest normal that rounds up to it is kept.)

So no subnormal number is ever stored in p, m, v or v^, and no operation ever
works on one (each costs a ~100-cycle microcode assist).  With ``eps=0`` the
rule shows: a gradient whose square underflows (|g| < ~3e-18 in float32 with
beta2 = 0.999) leaves v = 0 beside a nonzero m, and m / 0 moves p to +-inf, as
torch does under ``set_flush_denormal(True)``; where m and v are both 0 the
update is 0/0 = NaN, as in torch.  The default eps = 1e-8 has neither.

Gradient clipping (``max_grad_norm``), torch's ``clip_grad_norm_`` folded into
the step: the global L2 norm of all the step's gradients (``grad_norm``, in
IEEE double, in an order fixed by element indices alone, so the same bits for
every thread count), then ``c = clip_coefficient(max_grad_norm, norm)``.

The compiled kernel sets FTZ and DAZ around its loops; IEEE arithmetic, which
NumPy does, rounds into the subnormal range instead, so here every operation
is followed by the flush, and a result IEEE rounds to exactly the smallest
normal is recomputed with its operands scaled by a power of two (exact) to see
where the unbounded rounding lands.  The compiled kernel, the Numba backend and
this reference are bitwise equal.
"""
import math
from typing import NamedTuple

import numpy as np

WD_NONE, WD_L2, WD_DECOUPLED = 0, 1, 2


class StepScalars(NamedTuple):
    """The per-step scalars of one tensor, computed once in double."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    weight_decay: float
    decay: float         # 1 - lr * weight_decay (AdamW)
    step_size: float     # lr / (1 - beta1^step)
    inv_sqrt_bc2: float  # 1 / sqrt(1 - beta2^step)
    grad_scale: float = 1.0  # gradient clipping's coefficient (clip_coefficient)


def step_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """The scalars for ``step`` (the step being taken, counting from 1)."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return StepScalars(
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
        1.0 - lr * weight_decay, lr / bias_correction1, 1.0 / math.sqrt(bias_correction2),
    )


# -- bfloat16 optimizer state (state_dtype="bfloat16") ----------------------------
#
# m, v (and v^) are stored as the upper 16 bits of their float32 value (bfloat16,
# in uint16 arrays).  A step decodes them exactly (a shift), updates in float32
# as above, updates p from the new float32 m and v, then stores them rounded to
# bfloat16 *stochastically*: the 16 bits cut off are compared with a random
# 16-bit number, i.e. r is added below the kept bits before truncating, so a
# value rounds up with probability equal to its distance from the lower
# neighbour.  Round-to-nearest would make v stagnate: with beta2 = 0.999,
# beta2 * v differs from v by 0.1%, below bfloat16's half-spacing (~0.4%), so
# v would never decay.  The random bits come from a counter-based hash of (seed,
# tensor index, step, element index): the same for every thread count and run.
# The per-step key is a full hash (rounding_key); per element it is combined
# with the index and multiplied by an odd constant (a bijection, so uniform for
# each element, and independent from step to step as the keys are).  The 32
# bits serve m (low half) and v (high half); AMSGrad's v^ takes the low half
# of a second stream (moment 2).


def mix32(x):
    """A 32-bit integer hash (the "lowbias32" mixer: xor-shift, multiply, twice)."""
    x = np.asarray(x, np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def rounding_key(seed, tensor, step, moment):
    """The per-(seed, tensor, step, moment) key of the stochastic rounding stream."""
    with np.errstate(over="ignore"):
        key = mix32(np.uint32(seed & 0xFFFFFFFF) ^ mix32(np.uint32((seed >> 32) & 0xFFFFFFFF)))
        key = mix32(key ^ np.uint32(tensor & 0xFFFFFFFF))
        key = mix32(key ^ np.uint32(step & 0xFFFFFFFF) ^ mix32(np.uint32(step >> 32)))
        return int(mix32(key ^ np.uint32(moment)))


def rounding_bits(key, n):
    """32 random bits per element 0..n-1 of one stream: (lo(i) ^ hi(i) * C ^ key) * K."""
    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint64)
        lo = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        hi = (i >> np.uint64(32)).astype(np.uint32) * np.uint32(0x9E3779B9)
        return (lo ^ hi ^ np.uint32(key)) * np.uint32(0x9E3779B1)


def bf16_decode(bits):
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def bf16_round_stochastic(x, random16):
    """float32 -> bfloat16 bits (flat), adding ``random16`` below the kept bits; NaN stays NaN."""
    b = np.ascontiguousarray(x, np.float32).reshape(-1).view(np.uint32)
    out = ((b + random16.astype(np.uint32)) >> np.uint32(16)).astype(np.uint16)
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        out[nan] = ((b[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def bf16_round_nearest(x):
    """float32 -> bfloat16 bits, round to nearest even (checkpoint conversion)."""
    b = np.asarray(x, np.float32).view(np.uint32)
    with np.errstate(over="ignore"):
        out = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        out[nan] = ((b[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


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


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode,
                amsgrad, maximize, num_threads=None):
    """One in-place step of one tensor; ``s`` is a :class:`StepScalars`.

    ``num_threads`` is ignored: NumPy's elementwise operations use one thread.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        # Overflow to inf and NaN are documented results (README), as in the compiled kernels.
        _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode, amsgrad,
                maximize)


NORM_BLOCK, NORM_LANES = 4096, 16  # src/adam_kernel.hpp: FA_NORM_BLOCK, FA_NORM_LANES


def grad_norm(grads):
    """The global L2 norm of ``grads`` in float64, summed in the kernel's fixed order:
    the concatenated gradients in blocks of NORM_BLOCK elements; within a block,
    element i adds g*g to lane i mod NORM_LANES, one after another; a block's sum
    is its lanes added in order; the norm is the square root of the blocks' sums
    added in order.  (np.cumsum adds in sequence, unlike np.sum.)"""
    flat = np.concatenate([np.asarray(g, np.float64).reshape(-1) for g in grads] or [np.zeros(0)])
    if flat.size == 0:
        return 0.0
    n_blocks = -(-flat.size // NORM_BLOCK)
    squares = np.zeros(n_blocks * NORM_BLOCK)
    squares[:flat.size] = flat * flat
    lanes = np.cumsum(squares.reshape(n_blocks, NORM_BLOCK // NORM_LANES, NORM_LANES), axis=1)[:, -1]
    blocks = np.cumsum(lanes, axis=1)[:, -1]
    return float(np.sqrt(np.cumsum(blocks)[-1]))


def clip_coefficient(max_norm, norm):
    """torch's clip_grad_norm_: max_norm / (norm + 1e-6), at most 1 (a NaN norm gives NaN)."""
    c = max_norm / (norm + 1e-6)
    return 1.0 if c > 1.0 else c


# Scaling by 2**SCALE_EXP lifts a result near the smallest normal into the normal
# range without rounding (the operands of such a result are at most ~4 in magnitude).
SCALE_EXP = {np.dtype(np.float32): 64, np.dtype(np.float64): 512}


class FlushToZero:
    """The arithmetic of the rule above, in dtype ``t``, on arrays or T scalars."""

    def __init__(self, dtype):
        self.t = dtype.type
        self.tiny = self.t(np.finfo(dtype).smallest_normal)
        self.scale = self.t(2.0 ** SCALE_EXP[dtype])
        self.scaled_tiny = self.tiny * self.scale
        self.zero = self.t(0)

    def scalar(self, x):
        """A double rounded to T, as the kernel converts it (under FTZ)."""
        r = np.array(self.t(x))
        return self._result(r, lambda e: self.t(x * 2.0 ** SCALE_EXP[np.dtype(self.t)]))[()]

    def operand(self, x):
        """DAZ: below the smallest normal, a zero of its sign."""
        magnitude = np.abs(x)
        if not (magnitude < self.tiny).any():  # the usual case: nothing to flush
            return x
        return np.where(magnitude < self.tiny, np.copysign(self.zero, x), x).astype(self.t)

    def _result(self, r, scaled):
        """FTZ for r = op(...); ``scaled(mask)`` recomputes op with scaled operands at mask."""
        magnitude = np.abs(r)
        if not (magnitude <= self.tiny).any():  # the usual case: nothing near the edge
            return r
        out = np.where(magnitude < self.tiny, np.copysign(self.zero, r), r).astype(self.t)
        edge = magnitude == self.tiny
        if edge.any():
            tiny_before = np.abs(scaled(edge)) < self.scaled_tiny
            out[edge] = np.where(tiny_before, np.copysign(self.zero, r[edge]), r[edge])
        return out

    @staticmethod
    def _at(x, mask):
        return np.broadcast_to(x, mask.shape)[mask]

    def mul(self, a, b):
        return self._result(a * b, lambda e: (self._at(a, e) * self.scale) * self._at(b, e))

    def add(self, a, b):
        return self._result(a + b, lambda e: self._at(a, e) * self.scale + self._at(b, e) * self.scale)

    def sub(self, a, b):
        return self._result(a - b, lambda e: self._at(a, e) * self.scale - self._at(b, e) * self.scale)

    def div(self, a, b):
        return self._result(a / b, lambda e: (self._at(a, e) * self.scale) / self._at(b, e))


def _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode, amsgrad,
            maximize):
    f = FlushToZero(param.dtype)
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, \
        inv_sqrt_bc2, grad_scale = (f.scalar(x) for x in s)
    g = f.mul(f.operand(grad), grad_scale)
    if maximize:
        g = -g
    p = f.operand(param)
    if weight_decay_mode == WD_L2:
        g = f.add(g, f.mul(weight_decay, p))
    elif weight_decay_mode == WD_DECOUPLED:
        p = f.mul(p, decay)
    m = f.add(f.mul(beta1, f.operand(exp_avg)), f.mul(one_minus_beta1, g))
    v = f.add(f.mul(beta2, f.operand(exp_avg_sq)), f.mul(one_minus_beta2, f.mul(g, g)))
    exp_avg[...] = m
    exp_avg_sq[...] = v
    if amsgrad:
        v = np.maximum(f.operand(max_exp_avg_sq), v)
        max_exp_avg_sq[...] = v
    # sqrt of a normal or zero v is never tiny: no flush needed after it.
    denom = f.add(f.mul(np.sqrt(v), inv_sqrt_bc2), eps)
    param[...] = f.sub(p, f.mul(step_size, f.div(m, denom)))
