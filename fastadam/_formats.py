"""Storage formats and the arithmetic rule that fastadam's code and its oracle share.

One production home for what the compiled kernel, the Numba kernel, the
checkpoints, ``fastadam.torch`` and the NumPy reference (``_reference``, the
tests' oracle) must all agree on bit for bit: the bfloat16 state format and its
rounding streams, the blockwise 8-bit formats, and the flush-to-zero rule
(``FlushToZero``).  The kernel's C++ constants are checked against these at
import (``_backends._load_cython``).

The flush-to-zero rule.  Every operation of a step is rounded in the arrays'
dtype T (the scalars are computed once per step in double and rounded to T
once), under one rule for subnormal numbers, **flush to zero**, which is what
x86's FTZ and DAZ modes do (and ``torch.set_flush_denormal(True)``):

- every operand whose magnitude is below T's smallest normal number is read as
  a zero of its sign (DAZ), scalars included;
- every result whose magnitude, rounded to T's precision with an unbounded
  exponent, is below the smallest normal number is a zero of its sign (FTZ).
  (x86 detects this "tininess" after rounding: a result just below the
  smallest normal that rounds up to it is kept.  aarch64's FPCR.FZ detects it
  before rounding, and flushes that result: the rule follows the machine's CPU,
  ``TININESS_BEFORE_ROUNDING``, so that the compiled kernel's bits are the
  reference's on both.)

So no subnormal number is ever stored in p, m, v or v^, and no operation ever
works on one (each costs a ~100-cycle microcode assist).  The compiled kernel
sets FTZ and DAZ around its loops; IEEE arithmetic, which NumPy does, rounds
into the subnormal range instead, so ``FlushToZero`` follows every operation
with the flush, and recomputes a result IEEE rounds to exactly the smallest
normal with its operands scaled by a power of two (exact) to see where the
unbounded rounding lands.
"""
import functools
import platform

import numpy as np

# -- parameter formats -------------------------------------------------------------
#
# Parameters are float32, float64, float16 (IEEE binary16) or bfloat16
# (ml_dtypes.bfloat16 in NumPy: the upper half of a float32).  A low-precision
# parameter is updated in float32 in one of three modes (``master_weights``):
#
#   None (torch's semantics): the state (m, v, v^) is kept in the parameter's
#     dtype; each step reads p, g and the state, computes in float32 in the order
#     of torch's fused CPU kernel (fa_rule.hpp, _reference.adam_update_torch_order)
#     and rounds p and the state to nearest even.  With param_rounding=
#     "stochastic" (bfloat16) the new p is rounded stochastically instead: 16
#     random bits of stream 3 (rounding_key(seed, tensor, step, 3), the low half)
#     are added below the kept bits, as the bfloat16 state's rounding does.
#   "split" (bfloat16): the state keeps the trailing 16 bits of a float32 master
#     (MASTER_KEYS["split"], uint16); the parameter is its top 16 bits.  A step
#     rebuilds the master, updates it exactly as a float32 parameter, and writes
#     both halves back: the master is bit for bit a float32 run's parameter.
#   "float32": the state keeps the whole float32 master; a step updates it as a
#     float32 parameter and writes p from it, rounded to nearest even.
#
# Gradients are the parameter's dtype, or float32 for a low-precision parameter
# updated in place (None above), or bfloat16 for a float32 parameter; each is
# converted to the compute dtype exactly as it is read.


@functools.cache
def _ml_dtypes_bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def bfloat16(import_it=True):
    """ml_dtypes' bfloat16 NumPy dtype, or None without ml_dtypes
    (``import_it=False``: None unless ml_dtypes is imported already)."""
    import sys
    if not import_it and "ml_dtypes" not in sys.modules:
        return None
    return _ml_dtypes_bfloat16()


def numpy_dtype(name):
    """The NumPy dtype of one of the kernel's dtype names (src/fa_step.hpp, FA_DTYPES), or
    None for ml_dtypes' bfloat16 while ml_dtypes is not imported."""
    return bfloat16(import_it=False) if name == "bfloat16" else np.dtype(name)


def is_bfloat16(dtype):
    """Whether ``dtype`` is ml_dtypes.bfloat16 (without importing ml_dtypes)."""
    return dtype.name == "bfloat16" and dtype.itemsize == 2 and dtype == bfloat16()


def is_low_precision(dtype):
    """float16 or bfloat16."""
    return dtype == np.float16 or is_bfloat16(dtype)


def round_nearest(x, dtype):
    """float32 values rounded to nearest even into low-precision ``dtype`` (a new array)."""
    if dtype == np.float16:
        with np.errstate(over="ignore"):
            return np.asarray(x, np.float32).astype(np.float16)
    return bf16_round_nearest(x).view(dtype)


def to_float32(a):
    """An array of any parameter format as float32 (exactly: a new array for
    16-bit formats, ``a`` itself for float32)."""
    if is_bfloat16(a.dtype):
        return bf16_decode(a.view(np.uint16))
    return a.astype(np.float32) if a.dtype != np.float32 else a


def npy_storable(a):
    """``a``, or its bits where .npy cannot describe its dtype (bfloat16: uint16)."""
    return a.view(np.uint16) if isinstance(a, np.ndarray) and is_bfloat16(a.dtype) else a


def split_master(high, low):
    """The float32 master of split master weights: bfloat16 ``high`` (the
    parameter), uint16 ``low`` (its trailing bits)."""
    bits = (high.view(np.uint16).astype(np.uint32) << np.uint32(16)) | low.astype(np.uint32)
    return bits.view(np.float32)


def split_halves(master):
    """(top 16 bits, trailing 16 bits) of a float32 master, as uint16 arrays."""
    bits = np.ascontiguousarray(master, np.float32).view(np.uint32)
    return (bits >> np.uint32(16)).astype(np.uint16), (bits & np.uint32(0xFFFF)).astype(np.uint16)


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


# -- blockwise 8-bit optimizer state (state_dtype="int8") -------------------------
#
# Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (2022): each
# tensor of at least INT8_MIN_NUMEL elements is cut into blocks of INT8_BLOCK;
# a block of a moment is stored as one float32 absmax (its largest magnitude)
# and one 8-bit code per element, the index of the nearest value of a "dynamic"
# map applied to x / absmax.  The dynamic maps are the paper's dynamic tree
# quantization: magnitudes in the decades [0.1, 1] * 10^-e for e = 6..0, the
# decade 10^-e split linearly into 2^(F-e) bins and represented by their
# midpoints (F fraction bits), plus 0 and exactly 1.0 (so the block's largest
# element is stored without error):
#
#   m (signed, SIGNED_MAP): bit 7 is the sign, bits 0-6 index 128 magnitudes
#     (F = 6: 127 midpoints and 0, the largest midpoint replaced by 1.0);
#   v and v^ (unsigned, UNSIGNED_MAP): 256 magnitudes (F = 7: 254 midpoints,
#     0 and 1.0).
#
# A step, per block, in one pass: decode (code value * absmax, rounded in
# float32), update in float32 as in the float32 rule above, update p from the
# new, unquantized m and v, then take the block's new absmax (the largest
# magnitude, NaN ignored, at most ABSMAX_LIMIT) and store the nearest code of
# x * (1 / absmax) (a NaN or an infinity is stored as +-1.0, the block's
# absmax; m's sign bit is y's, so -0 is stored as -0).  Tensors below
# INT8_MIN_NUMEL elements keep float32 state: their state is small and
# blockwise error is largest there.
#
# The maps.  Both are small floating-point formats of y = x / absmax in [-1, 1]
# with 3 fraction bits, so that a code is found from y's float32 bits and
# decoded into float32 bits with a few integer operations and no table (table
# lookups cost more than the bytes they save).  A code's magnitude bits k mean
#
#     k = 0:  0
#     k > 0:  2^((k >> 3) - E) * (1 + (k & 7) / 8)
#
#   m (signed): bit 7 is the sign, k is bits 0-6, E = INT8_SIGNED_EXPONENT_OFFSET
#     (15): 1.0 is k = 120, the smallest magnitude 2^-15 * 1.125 (~3.4e-5);
#   v and v^ (unsigned): k is the whole code, E = INT8_UNSIGNED_EXPONENT_OFFSET
#     (31): 1.0 is k = 248, the smallest magnitude 2^-31 * 1.125 (~5.2e-10).
#
# Like the paper's dynamic maps they are dense near 1 and reach far below it
# (v, which spans the square of the gradients' range, reaches twice as far);
# the relative gap between neighbours is at most 12.5%.  Codes above 1.0 (m:
# k = 121-127; v: 249-255) are never written and refused in a loaded state.
#
# The nearest code of |y| <= 1: k = ((bits(|y|) + 2^19) >> 20) - ((127 - E) << 3)
# rounds the exponent and top 3 fraction bits to nearest (ties to the larger
# magnitude); where k < 1, y is below the smallest magnitude s and the code is
# 1 if |y| >= s / 2, else 0.  Decoding is the same in reverse: the float32
# bits of k's magnitude are (k + ((127 - E) << 3)) << 20.
#
# The guard.  Quantizing v to a code of its block's absmax loses an element
# whose v is below ~2.6e-10 of the block's largest: it is stored as 0.  If its
# m survives (m's map reaches ~1.7e-5 of its own absmax) and its gradient then
# falls silent, the next update is m / eps, thousands of times lr.  So where
# the state is 8-bit, the Adam term of each element's update is clamped:
#
#     p <- p - clamp(lr / bc1 * (m / d), -INT8_MAX_UPDATE * lr, +INT8_MAX_UPDATE * lr)
#
# so no element moves more than 10 lr in a step (plus the final rounding of
# the subtraction, and the decoupled weight decay, which is a separate factor).
# With exact state Adam's update is bounded by lr * (1 - beta1) / sqrt(1 - beta2)
# (Kingma & Ba, section 2.1: 3.16 lr with the default betas), so the clamp
# only acts where the 8-bit state has lost v.

INT8_BLOCK = 256
INT8_MIN_NUMEL = 4096
INT8_MAX_UPDATE = 10.0  # in units of lr
ABSMAX_LIMIT = np.float32(2.0 ** 126)  # so that 1 / absmax is a normal number
INT8_FRACTION_BITS = 3
INT8_SIGNED_EXPONENT_OFFSET = 15
INT8_UNSIGNED_EXPONENT_OFFSET = 31
SIGNED_TOP_CODE = INT8_SIGNED_EXPONENT_OFFSET << INT8_FRACTION_BITS  # the code of 1.0
UNSIGNED_TOP_CODE = INT8_UNSIGNED_EXPONENT_OFFSET << INT8_FRACTION_BITS


def _exponent_offset(signed):
    return INT8_SIGNED_EXPONENT_OFFSET if signed else INT8_UNSIGNED_EXPONENT_OFFSET


def _code_magnitudes(signed):
    """The values of the magnitude bits k = 0 .. 127 (signed) or 0 .. 255."""
    k = np.arange(128 if signed else 256, dtype=np.uint32)
    bits = (k + np.uint32((127 - _exponent_offset(signed)) << INT8_FRACTION_BITS)) << np.uint32(
        23 - INT8_FRACTION_BITS)
    return np.where(k == 0, np.float32(0), bits.view(np.float32))


SIGNED_MAGNITUDES = _code_magnitudes(signed=True)
# Decoding tables (code -> value): m's sign-magnitude codes, and v's.
SIGNED_MAP = np.concatenate([SIGNED_MAGNITUDES, -SIGNED_MAGNITUDES])
UNSIGNED_MAP = _code_magnitudes(signed=False)


def int8_blocks(numel):
    """The number of absmax blocks of a tensor of ``numel`` elements."""
    return -(-numel // INT8_BLOCK)


def int8_nearest_codes(y, signed):
    """The nearest code of each float32 y (the rounding above); |y| is capped at 1."""
    y = np.asarray(y, np.float32)
    exponent_offset = _exponent_offset(signed)
    half_smallest = np.float32(2.0 ** -exponent_offset * 0.5625)
    with np.errstate(invalid="ignore"):
        magnitude = np.abs(y)
        magnitude = np.where(magnitude <= 1, magnitude, np.float32(1))  # NaN, inf -> 1
        shift = 23 - INT8_FRACTION_BITS
        k = (((magnitude.view(np.uint32).astype(np.int64) + (1 << (shift - 1))) >> shift)
             - ((127 - exponent_offset) << INT8_FRACTION_BITS))
        codes = np.where(k >= 1, k, magnitude >= half_smallest).astype(np.uint32)
        if signed:
            codes |= np.signbit(y).astype(np.uint32) << np.uint32(7)
    return codes.astype(np.uint8)


def int8_decode(codes, absmax, signed):
    """Codes and per-block absmax -> float32 values (code value * absmax, under the rule)."""
    f = FlushToZero(np.dtype(np.float32))
    flat = np.asarray(codes, np.uint8).reshape(-1)
    scale = np.repeat(f.operand(np.asarray(absmax, np.float32)), INT8_BLOCK)[:flat.size]
    table = SIGNED_MAP if signed else UNSIGNED_MAP
    return f.mul(table[flat], scale).reshape(np.shape(codes))


def int8_encode(x, signed):
    """float32 values -> (codes, absmax): per block the largest magnitude (NaN
    ignored, at most ABSMAX_LIMIT), and the nearest code of x * (1 / absmax)."""
    f = FlushToZero(np.dtype(np.float32))
    flat = f.operand(np.asarray(x, np.float32).reshape(-1))
    n_blocks = int8_blocks(flat.size)
    blocks = np.zeros((n_blocks, INT8_BLOCK), np.float32)
    blocks.reshape(-1)[:flat.size] = flat
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        absmax = np.minimum(np.fmax.reduce(np.abs(blocks), axis=1, initial=np.float32(0)),
                            ABSMAX_LIMIT).astype(np.float32)
        inverse = np.where(absmax > 0, np.float32(1) / absmax, np.float32(0)).astype(np.float32)
        codes = int8_nearest_codes(f.mul(blocks, inverse[:, None]), signed)
    return codes.reshape(-1)[:flat.size].reshape(np.shape(x)), absmax


# Scaling by 2**SCALE_EXP lifts a result near the smallest normal into the normal
# range without rounding (the operands of such a result are at most ~4 in magnitude).
SCALE_EXP = {np.dtype(np.float32): 64, np.dtype(np.float64): 512}


# Whether this machine's flush-to-zero mode decides tininess before rounding (aarch64).
TININESS_BEFORE_ROUNDING = platform.machine().lower() in ("aarch64", "arm64")
# Where it does, the exact result is compared with the smallest normal: computed in a type
# wide enough to hold it (float32 products in float64; float64 ones in binary128, which is
# NumPy's longdouble on Linux/aarch64).
WIDE = {np.dtype(np.float32): np.float64, np.dtype(np.float64): np.longdouble}


class FlushToZero:
    """The arithmetic of the rule above, in dtype ``t``, on arrays or T scalars; tininess is
    decided as this machine's CPU does unless ``before_rounding`` says otherwise."""

    def __init__(self, dtype, before_rounding=None):
        self.before_rounding = TININESS_BEFORE_ROUNDING if before_rounding is None else before_rounding
        self.wide = WIDE[np.dtype(dtype)]
        if self.before_rounding and np.finfo(self.wide).nmant < 2 * np.finfo(dtype).nmant + 2:
            raise RuntimeError(f"no type here holds a {np.dtype(dtype)} product exactly "
                               "(tininess before rounding needs one)")
        self.t = dtype.type
        self.tiny = self.t(np.finfo(dtype).smallest_normal)
        self.scale = self.t(2.0 ** SCALE_EXP[dtype])
        self.scaled_tiny = self.tiny * self.scale
        self.zero = self.t(0)

    def scalar(self, x):
        """A double rounded to T, as the kernel converts it (under FTZ)."""
        r = np.array(self.t(x))
        return self._result(r, lambda e: self.t(x * 2.0 ** SCALE_EXP[np.dtype(self.t)]),
                            lambda e: self.wide(x))[()]

    def operand(self, x):
        """DAZ: below the smallest normal, a zero of its sign."""
        magnitude = np.abs(x)
        if not (magnitude < self.tiny).any():  # the usual case: nothing to flush
            return x
        return np.where(magnitude < self.tiny, np.copysign(self.zero, x), x).astype(self.t)

    def _result(self, r, scaled, exact):
        """FTZ for r = op(...); ``scaled(mask)`` recomputes op with scaled operands at mask,
        ``exact(mask)`` computes it exactly in the wide type."""
        magnitude = np.abs(r)
        if not (magnitude <= self.tiny).any():  # the usual case: nothing near the edge
            return r
        out = np.where(magnitude < self.tiny, np.copysign(self.zero, r), r).astype(self.t)
        edge = magnitude == self.tiny
        if edge.any():
            if self.before_rounding:
                tiny_before = np.abs(exact(edge)) < self.wide(self.tiny)
            else:
                tiny_before = np.abs(scaled(edge)) < self.scaled_tiny
            out[edge] = np.where(tiny_before, np.copysign(self.zero, r[edge]), r[edge])
        return out

    @staticmethod
    def _at(x, mask):
        return np.broadcast_to(x, mask.shape)[mask]

    def _wide_at(self, x, mask):
        return self._at(x, mask).astype(self.wide)

    def mul(self, a, b):
        return self._result(a * b, lambda e: (self._at(a, e) * self.scale) * self._at(b, e),
                            lambda e: self._wide_at(a, e) * self._wide_at(b, e))

    def add(self, a, b):
        return self._result(a + b, lambda e: self._at(a, e) * self.scale + self._at(b, e) * self.scale,
                            lambda e: self._wide_at(a, e) + self._wide_at(b, e))

    def sub(self, a, b):
        return self._result(a - b, lambda e: self._at(a, e) * self.scale - self._at(b, e) * self.scale,
                            lambda e: self._wide_at(a, e) - self._wide_at(b, e))

    def div(self, a, b):
        # a / b below the smallest normal exactly when |a| < tiny * |b| (b nonzero at the edge)
        def exact(e):  # not the quotient: zero where it is below the smallest normal, else that
            below = np.abs(self._wide_at(a, e)) < self.wide(self.tiny) * np.abs(self._wide_at(b, e))
            return np.where(below, self.wide(0), self.wide(self.tiny))
        return self._result(a / b, lambda e: (self._at(a, e) * self.scale) / self._at(b, e), exact)

    def fma(self, a, b, c):
        """a * b + c rounded once (float32 only: torch's lerp, fa_rule.hpp)."""
        if self.t is not np.float32:
            raise TypeError("FlushToZero.fma is float32's")
        scale = np.float64(self.scale)
        return self._result(_fma32(a, b, c),
                            lambda e: _fma32(self._at(a, e), self._at(b, e) * scale,
                                             self._at(c, e) * scale),
                            lambda e: self._wide_at(a, e) * self._wide_at(b, e) + self._wide_at(c, e))


def _fma32(a, b, c):
    """float32 fma(a, b, c), correctly rounded: a * b is exact in float64 (for
    float32 operands, or FlushToZero's operands scaled by a power of two); the sum
    is rounded to odd in float64 (nearest, then the odd neighbour where inexact),
    which rounds correctly to float32 (53 >= 2 * 24 + 2 bits)."""
    a, b, c = (np.asarray(x, np.float64) for x in (a, b, c))
    product = a * b
    with np.errstate(invalid="ignore", over="ignore"):
        s = product + c
        back = s - product
        err = (product - (s - back)) + (c - back)  # s + err == product + c exactly (TwoSum)
        bits = s.view(np.uint64) if s.ndim else np.array(s).view(np.uint64)
        inexact = (err != 0) & np.isfinite(err) & np.isfinite(s)
        even = (bits & np.uint64(1)) == 0
        toward = np.where(err > 0, np.inf, -np.inf)
        s = np.where(inexact & even, np.nextafter(s, toward), s)
        return s.astype(np.float32)
