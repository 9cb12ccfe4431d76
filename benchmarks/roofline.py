"""The roofline row of the speed report (``python -m fastadam.bench --impls roofline``).

``roofline.c`` beside this file is compiled on first use with the C compiler that
builds Python extensions here (``CC``, else Python's own, else ``cc``), with OpenMP,
into a temporary folder, and called through ctypes.  It lives with the benchmarks,
not in the installed extension: it measures the machine, not fastadam.
"""
import ctypes
import os
import shlex
import subprocess
import sysconfig
import tempfile

from fastadam import _flat, _formats, _threads

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "roofline.c")
_library = None


def _compiler():
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def library():
    """The compiled roofline, built once per process."""
    global _library
    if _library is None:
        folder = tempfile.mkdtemp(prefix="fastadam-roofline-")
        target = os.path.join(folder, "roofline.so")
        command = _compiler() + ["-O3", "-fopenmp", "-fPIC", "-shared", SOURCE, "-o", target]
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode != 0:
            raise OSError(f"{shlex.join(command)} failed: {built.stderr.strip()}")
        lib = ctypes.CDLL(target)
        lib.roofline_step.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int,
                                                              ctypes.c_int64]
        lib.roofline_step.restype = None
        os.unlink(target)
        os.rmdir(folder)
        _library = lib
    return _library


def step_over(p, g, m, v, threads):
    """A function that runs one roofline step over four float32 arrays of one length on
    ``threads`` threads (one below fastadam's parallel threshold, as its kernel does)."""
    if not all(a.dtype == "float32" and a.flags.c_contiguous and a.size == p.size
               for a in (p, g, m, v)):
        raise ValueError("roofline: four C-contiguous float32 arrays of one length")
    step = library().roofline_step
    n = p.size
    threads = 1 if n < _threads.PARALLEL_THRESHOLD else max(1, int(threads))
    args = (p.ctypes.data, g.ctypes.data, m.ctypes.data, v.ctypes.data, n, threads,
            _formats.INT8_BLOCK)

    def run():
        step(*args)
    run.arrays = (p, g, m, v)  # the memory it writes lives as long as the function
    return run


def make(n, threads, buffers):
    """The speed report's maker: ``buffers(n)`` gives p and g; m and v are placed as
    fastadam places state, at the page offset of p and g (otherwise every stream
    would collide in the caches, 4K aliasing, and the row would be a slow
    placement's limit, not the machine's)."""
    p, g = buffers(n)
    m, v = (_flat.state_zeros(p.shape, p.dtype, key, p.ctypes.data)
            for key in ("exp_avg", "exp_avg_sq"))
    return step_over(p, g, m, v, threads)
