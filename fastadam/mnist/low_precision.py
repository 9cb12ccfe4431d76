"""A low-precision model for the trainer (``--param-dtype bfloat16`` or ``float16``).

The optimizer updates the model's parameters in the low-precision dtype (one flat
array); the forward and backward passes run in float32 on their exact values, as a
CPU's bfloat16 matmul accumulates in float32, and the gradients are rounded to the
parameters' dtype, as a low-precision backward would hand them over.
"""
import numpy as np

import fastadam
from .. import _formats


def dtype(name):
    """The NumPy dtype of ``--param-dtype`` (bfloat16 needs ml_dtypes)."""
    if name == "bfloat16":
        bfloat16 = _formats.bfloat16()
        if bfloat16 is None:
            raise ValueError('--param-dtype bfloat16 needs ml_dtypes (pip install "fastadam[bf16]")')
        return bfloat16
    return np.dtype({"float16": np.float16, "float32": np.float32}[name])


def to_float16(x):
    """float32 -> float16, rounded to nearest even, as ``x.astype(np.float16)`` rounds but
    in integer operations: NumPy's conversion takes ~150 ns an element where the result
    is subnormal, which small gradients are (a NaN becomes the quiet NaN of its sign)."""
    f = np.ascontiguousarray(x, np.float32).view(np.uint32)
    sign = f & np.uint32(0x80000000)
    f = f ^ sign
    big = np.where(f > np.uint32(0x7F800000), np.uint32(0x7E00), np.uint32(0x7C00))
    with np.errstate(over="ignore"):
        small = (f.view(np.float32) + np.float32(0.5)).view(np.uint32) - np.uint32(0x3F000000)
        normal = (f + np.uint32((2 ** 32 + (15 - 127) * 2 ** 23) % 2 ** 32) + np.uint32(0xFFF)
                  + ((f >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    h = np.where(f >= np.uint32(0x47800000), big, np.where(f < np.uint32(113 << 23), small, normal))
    return (h | (sign >> np.uint32(16))).astype(np.uint16).view(np.float16).reshape(np.shape(x))


def _round(x, dtype):
    return to_float16(x) if dtype == np.float16 else _formats.round_nearest(x, dtype)


class LowPrecisionParameters:
    """``fastadam.Adam`` over a low-precision copy of ``model.flat.data``, which it
    owns: each step rounds the float32 gradients to its dtype, steps, and writes the
    parameters' exact float32 values back for the next forward pass."""

    def __init__(self, model, param_dtype, **options):
        self._model = model
        self._weights = _round(model.flat.data, param_dtype)
        model.flat.data[...] = _formats.to_float32(self._weights)
        self._inner = fastadam.Adam([self._weights], **options)
        self.param_groups = self._inner.param_groups
        self.backend = self._inner.backend

    def step(self, grads):
        (grad,) = grads
        applied = self._inner.step([_round(grad, self._weights.dtype)])
        self._model.flat.data[...] = _formats.to_float32(self._weights)
        return applied

    def state_nbytes(self):
        return self._inner.state_nbytes()
