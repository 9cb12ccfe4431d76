"""The tensors of fastadam.torch: which it accepts, the NumPy views the kernel works
on, the state tensors it makes, and the state mapping it tracks."""
import collections

import numpy as np
import torch

from . import _flat, _formats, _rules

# The parameter dtypes fastadam.torch updates, and their NumPy dtypes (bfloat16's is
# ml_dtypes', imported when a bfloat16 parameter is first seen).
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def numpy_dtype(dtype):
    """The NumPy dtype of a parameter of torch ``dtype`` (one of DTYPES)."""
    if dtype == torch.bfloat16:
        bfloat16 = _formats.bfloat16()
        if bfloat16 is None:
            raise RuntimeError("bfloat16 parameters need ml_dtypes, NumPy's bfloat16 "
                               '(pip install "fastadam[bf16]")')
        return bfloat16
    return np.dtype({torch.float32: np.float32, torch.float64: np.float64,
                     torch.float16: np.float16}[dtype])


def refuse_unfit(t, what):
    """Refuse a tensor the kernel cannot update (or read) in place, saying what to do."""
    if t.is_sparse or t.layout != torch.strided:
        raise RuntimeError(f"{what} is sparse ({t.layout}); fastadam.torch supports dense "
                           "tensors only (use torch.optim.SparseAdam for sparse gradients)")
    if t.device.type != "cpu":
        raise RuntimeError(f"{what} is on {t.device}; fastadam.torch runs on the CPU "
                           "(move the model with .cpu(), or use torch.optim.Adam on the device)")
    if t.is_complex():
        raise RuntimeError(f"{what} is complex ({t.dtype}); fastadam.torch supports float32, "
                           "float64, bfloat16 and float16 (view it as real with "
                           "torch.view_as_real, or use torch.optim.Adam)")
    if t.dtype not in DTYPES:
        raise RuntimeError(f"{what} has dtype {t.dtype}; fastadam.torch supports float32, "
                           "float64, bfloat16 and float16 (or use torch.optim.Adam)")
    if t.is_neg():
        raise RuntimeError(f"{what} is a lazily negated view (its negative bit is set); "
                           "fastadam.torch reads memory as it is (pass it through .resolve_neg())")
    if not t.is_contiguous():
        raise RuntimeError(f"{what} is not contiguous; the update is in place (make the "
                           "parameter contiguous once, before creating the optimizer)")


class TrackedState(collections.defaultdict):
    """torch's optimizer state (a ``defaultdict(dict)`` keyed by parameter) that counts
    the changes of which dict a parameter has, so that a step need not look each up."""

    changes = 0

    def _changed(self):
        self.changes += 1

    def __setitem__(self, key, value):
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._changed()
        super().__delitem__(key)

    def __ior__(self, other):
        self._changed()
        return super().__ior__(other)

    def _counted(name):
        method = getattr(collections.defaultdict, name)

        def counted(self, *args, **kwargs):
            self._changed()
            return method(self, *args, **kwargs)
        counted.__name__ = name
        return counted

    clear, pop, popitem, setdefault, update = map(
        _counted, ("clear", "pop", "popitem", "setdefault", "update"))
    del _counted


def zeros_like(p, key, state_dtype, master=None):
    """State tensor ``key`` for ``p`` (contiguous, as the kernel needs): zeros in
    NumPy's memory, which asks the kernel for huge pages on large buffers (torch's
    allocator does not), making the step up to 1.2x faster where TLB misses count
    (1M parameters), placed beside p as fastadam places state (_flat.state_zeros).
    bfloat16 state (its bits in uint16) is a bfloat16 tensor; ``master`` is p's
    master key (_rules.master_key): its float32 master starts as p, split master
    weights' trailing bits (an int16 tensor) as zeros."""
    shape = tuple(p.shape)
    if key == _rules.MASTER_KEYS["float32"]:
        a = _flat.state_zeros(shape, np.float32, key, p.data_ptr())
        t = torch.from_numpy(a)
        t.copy_(p.detach())
        return t
    if key == _rules.MASTER_KEYS["split"]:
        return torch.from_numpy(_flat.state_zeros(shape, np.int16, key, p.data_ptr()))
    dtype = _rules.state_storage(numpy_dtype(p.dtype), state_dtype, master)
    a = _flat.state_zeros(shape, dtype, key, p.data_ptr())
    if a.dtype == np.uint16 or _formats.is_bfloat16(a.dtype):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def view(t, bits=False):
    """A NumPy array sharing ``t``'s memory.  A bfloat16 tensor's is ml_dtypes.bfloat16,
    or with ``bits`` its bits in uint16 (bfloat16 state); an int16 tensor's (split
    master weights' trailing bits) is uint16."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        a = t.view(torch.int16).numpy().view(np.uint16)
        return a if bits else a.view(numpy_dtype(torch.bfloat16))
    if t.dtype == torch.int16:
        return t.numpy().view(np.uint16)
    return t.numpy()
