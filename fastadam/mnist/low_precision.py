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


class LowPrecisionParameters:
    """``fastadam.Adam`` over a low-precision copy of ``model.flat.data``, which it
    owns: each step rounds the float32 gradients to its dtype, steps, and writes the
    parameters' exact float32 values back for the next forward pass."""

    def __init__(self, model, param_dtype, **options):
        self._model = model
        self._weights = _formats.round_nearest(model.flat.data, param_dtype)
        model.flat.data[...] = _formats.to_float32(self._weights)
        self._inner = fastadam.Adam([self._weights], **options)
        self.param_groups = self._inner.param_groups
        self.backend = self._inner.backend

    def step(self, grads):
        (grad,) = grads
        applied = self._inner.step([_formats.round_nearest(grad, self._weights.dtype)])
        self._model.flat.data[...] = _formats.to_float32(self._weights)
        return applied

    def state_nbytes(self):
        return self._inner.state_nbytes()
