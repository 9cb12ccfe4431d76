import numpy as np
import pytest

from fastadam import _backends

AVAILABLE = [name for name, reason in _backends.available().items() if reason is None]


# Two tiers.  The default run is the tests that guard behaviour, a few minutes on two
# cores; tests marked slow (the exhaustive grids, memcheck, MPI, long fuzzing, whole
# training runs, other interpreters) run with --slow too, as CI does.
def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="run the slow tier too (every test: what CI runs)")
    parser.addoption("--isa", default=None,
                     help="the kernel variants (comma-separated) that the tests over every variant run "
                          "on, instead of every one this CPU has: under emulation, where each is slow")
    parser.addoption("--sve-bits", default=None,
                     help="the SVE vector lengths in bits (comma-separated) those tests run SVE at, "
                          "instead of every one this thread can be given")


_ONLY_ISAS = None
_ONLY_SVE_BITS = None


def pytest_configure(config):
    global _ONLY_ISAS, _ONLY_SVE_BITS
    option = config.getoption("--isa")
    _ONLY_ISAS = None if option is None else option.split(",")
    option = config.getoption("--sve-bits")
    _ONLY_SVE_BITS = None if option is None else [int(bits) for bits in option.split(",")]


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


def backend_params(names=_backends.BACKENDS):
    """Parametrize over backends; one that is not available is skipped with its reason.
    The Numba backend's cases are the slow tier: each variant they meet is a JIT compile
    (5 to 30 s on two cores); its own tests (test_backends.py) keep it in the default run."""
    reasons = _backends.available()
    return [pytest.param(n, marks=[pytest.mark.skipif(reasons[n] is not None, reason=f"{n}: {reasons[n]}")]
                         + ([pytest.mark.slow] if n == "numba" else []))
            for n in names]


def sve_vector_lengths():
    """The SVE vector lengths in bytes that this thread can be given (Linux's prctl
    PR_SVE_SET_VL: shorter than the CPU's own), shortest first; [] without SVE."""
    import ctypes
    import platform
    if platform.machine() != "aarch64":
        return []
    libc = ctypes.CDLL(None, use_errno=True)
    current = libc.prctl(PR_SVE_GET_VL, 0, 0, 0, 0)
    if current < 0:
        return []
    lengths = [vl for vl in (16, 32, 64, 128, 256) if libc.prctl(PR_SVE_SET_VL, vl, 0, 0, 0) & 0xFFFF == vl]
    libc.prctl(PR_SVE_SET_VL, current & 0xFFFF, 0, 0, 0)
    return lengths


PR_SVE_SET_VL, PR_SVE_GET_VL = 50, 51


def on_every_isa(kernel, run):
    """{isa: run()} for every instruction set this CPU supports (or those --isa names); the
    selection is restored.  SVE runs at every vector length this thread can be given
    ("sve128", "sve256", ...), so one process checks them all (the main thread's: a
    thread that OpenMP started earlier keeps its own)."""
    import ctypes
    before = kernel.isa_in_use()
    results = {}
    try:
        for isa in [name for name in kernel.ISA_NAMES if kernel.isa_supported(name)]:
            if _ONLY_ISAS is not None and isa not in _ONLY_ISAS:
                continue
            kernel.select_isa(isa)
            if isa != "sve":
                results[isa] = run()
                continue
            libc = ctypes.CDLL(None, use_errno=True)
            current = libc.prctl(PR_SVE_GET_VL, 0, 0, 0, 0) & 0xFFFF
            try:
                for vl in sve_vector_lengths():
                    if _ONLY_SVE_BITS is not None and vl * 8 not in _ONLY_SVE_BITS:
                        continue
                    libc.prctl(PR_SVE_SET_VL, vl, 0, 0, 0)
                    assert kernel.sve_vector_bits() == vl * 8
                    results[f"sve{vl * 8}"] = run()
            finally:
                libc.prctl(PR_SVE_SET_VL, current, 0, 0, 0)
    finally:
        kernel.select_isa(before)
    assert results, "no kernel variant ran: --isa and --sve-bits name none this CPU has"
    return results


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
