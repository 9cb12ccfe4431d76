"""One contiguous buffer for all of a model's parameters, and one for its gradients.

With ``FlatParameters`` a whole model's step is one kernel call over one
buffer: give the optimizer ``[flat.data]`` and step it with ``[flat.grad]``;
the model reads and writes its parameters and gradients through the views.
"""
import numpy as np

from . import _rules


class FlatParameters:
    """Named parameters as views into one contiguous ``data`` buffer.

    >>> flat = FlatParameters({"W": (784, 10), "b": (10,)})
    >>> np.shares_memory(flat.params["W"], flat.data)
    True
    >>> opt = Adam([flat.data]); opt.step([flat.grad])   # doctest: +SKIP

    Args:
        shapes: {name: shape}, in the order the buffer holds them.
        dtype: float32 (default) or float64.
        align: each view starts at a multiple of this many bytes (a cache line),
            so threads splitting the buffer do not share lines between views.
        numel_multiple: the buffers' length is padded (with zeros) to a multiple
            of this many elements (fastadam.distributed.flat_parameters uses it).
    """

    def __init__(self, shapes, dtype=np.float32, align=64, numel_multiple=1):
        self.dtype = _rules.flat_dtype(dtype)
        step = _rules.flat_align(align, self.dtype.itemsize) // self.dtype.itemsize
        if not isinstance(shapes, dict):
            raise TypeError(f"shapes must be a dict {{name: shape}}, got {_rules.describe(shapes)}")
        self.offsets, offset = {}, 0
        for name, shape in shapes.items():
            shape = _rules.flat_shape(name, shape)
            size = int(np.prod(shape, dtype=np.int64))
            self.offsets[name] = (offset, shape)
            offset += -(-size // step) * step
        if not isinstance(numel_multiple, int) or numel_multiple < 1:
            raise ValueError(f"numel_multiple must be a positive int, got {numel_multiple!r}")
        self.numel = -(-offset // numel_multiple) * numel_multiple
        self.data = _aligned_zeros(self.numel, self.dtype, align)
        self.grad = _aligned_zeros(self.numel, self.dtype, align)
        self.params = self._views(self.data)
        self.grads = self._views(self.grad)

    def _views(self, buffer):
        return {name: buffer[start:start + int(np.prod(shape, dtype=np.int64))].reshape(shape)
                for name, (start, shape) in self.offsets.items()}

    def __repr__(self):
        return f"FlatParameters({len(self.offsets)} arrays, {self.numel} elements, {self.dtype})"


def _aligned_zeros(n, dtype, align):
    """Zeros of length n whose data starts on an ``align``-byte boundary."""
    raw = np.zeros(n * dtype.itemsize + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + n * dtype.itemsize].view(dtype)


# Where in a page each state buffer starts, past its parameter's cache line in
# the page.  Large NumPy (and torch) arrays all start at the same page offset, and
# a step's streams at one page offset collide in the caches (4K aliasing); a
# parameter 16 bytes past a cache line, as NumPy's large arrays are, makes it
# worse, since every vector access then splits two lines.  bfloat16 m and v are
# read at half the stride of p and g, so their addresses also drift through
# p's and g's.  Measured on AMD EPYC (Zen 4): see docs/speed.md, "Where the
# state is placed".
STATE_PAGE_OFFSETS = {"exp_avg": 17 * 64, "exp_avg_sq": 41 * 64, "max_exp_avg_sq": 59 * 64,
                      "master": 29 * 64, "master_low": 29 * 64}  # a parameter has one of the two
# Smaller buffers are plain zeros: the placement costs up to 4 KiB of padding each.
STATE_PLACEMENT_MIN_BYTES = 1 << 16


def state_zeros(shape, dtype, key, beside):
    """Zeros for state buffer ``key`` of the parameter at address ``beside``: one of
    at least STATE_PLACEMENT_MIN_BYTES starts on a cache line, STATE_PAGE_OFFSETS[key]
    bytes past the parameter's line within a page."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < STATE_PLACEMENT_MIN_BYTES:
        return np.zeros(shape, dtype)
    raw = np.zeros(nbytes + 4096, dtype=np.uint8)
    target = (beside // 64 * 64 + STATE_PAGE_OFFSETS[key]) % 4096
    start = (target - raw.ctypes.data) % 4096
    return raw[start:start + nbytes].view(dtype).reshape(shape)
