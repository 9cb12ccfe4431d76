"""Arrays that misbehave, shared by tests/test_hostile_inputs.py and the MPI worker
(tests/zero_worker.py, run as a script beside it)."""
import numpy as np


class Contrary(np.ndarray):
    """An ndarray subclass whose arithmetic means something else: every ufunc's result
    comes back negated, and reshape reverses the elements.  Code that computes with a
    parameter's or gradient's own operators gets wrong numbers from it."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = [np.asarray(x) if isinstance(x, Contrary) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(x) if isinstance(x, Contrary) else x for x in kwargs["out"])
        result = getattr(ufunc, method)(*inputs, **kwargs)
        return np.negative(result) if isinstance(result, np.ndarray) and result.dtype.kind == "f" else result

    def reshape(self, *shape, **kwargs):
        return np.asarray(self).reshape(*shape, **kwargs)[::-1]
