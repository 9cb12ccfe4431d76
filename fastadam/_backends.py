"""The kernels behind ``backend=``: "cython" (compiled), "numba" (JIT), "numpy" (reference).

A backend is a module with a ``name``.  The compiled one provides ``Plan``
(a whole step in one call); the others provide ``adam_update`` with the
signature of :func:`fastadam._reference.adam_update`.
"""
import functools
import warnings

from ._threads import cpu_limit, kernel_openmp_environment

BACKENDS = ("cython", "numba", "numpy")
_PREFERENCE = BACKENDS  # what "auto" tries, in order


@functools.cache
def _load_cython():
    with kernel_openmp_environment():
        from . import _kernel
    _kernel.set_cpu_limit(cpu_limit())
    return _kernel


def _load_numba():
    from . import _numba_kernel
    return _numba_kernel


def _load_numpy():
    from . import _reference
    return _reference


_LOADERS = {"cython": _load_cython, "numba": _load_numba, "numpy": _load_numpy}


def compiled_or_none():
    """The compiled extension if it is built, else None."""
    try:
        return _load_cython()
    except ImportError:
        return None


def available():
    """{backend: None if usable, else the reason it is not}."""
    status = {}
    for name in BACKENDS:
        try:
            _LOADERS[name]()
            status[name] = None
        except ImportError as e:
            status[name] = str(e)
    return status


def load(name):
    """Return (name, module) for ``backend=name``; "auto" picks the best available."""
    if name == "auto":
        reasons = []
        for candidate in _PREFERENCE:
            try:
                module = _LOADERS[candidate]()
            except ImportError as e:
                reasons.append(f"{candidate}: {e}")
                continue
            if candidate != _PREFERENCE[0]:
                warnings.warn(f"fastadam: the compiled kernel is not available ({'; '.join(reasons)});"
                              f" using backend={candidate!r}", RuntimeWarning, stacklevel=4)
            return candidate, module
        raise ImportError("no fastadam backend is available")  # numpy always is
    if name not in _LOADERS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; "
                         f"got {name!r}")
    try:
        return name, _LOADERS[name]()
    except ImportError as e:
        raise ImportError(f"fastadam backend {name!r} is not available: {e}") from e
