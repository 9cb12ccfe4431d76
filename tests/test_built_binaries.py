"""What the built extensions ask of the system: the wheels' manylinux tag rests on it.

The symbol versions each extension needs, read from its ELF file (pyelftools, the
library auditwheel reads them with): nothing newer than glibc 2.17, and nothing
from the OpenMP runtime that the manylinux2014 libgomp the wheels bundle lacks
(docs/building.md); in an installed wheel, the bundled runtime itself needs nothing
newer than glibc 2.17 and defines what the kernel needs.  A new libm call that binds
a newer version (exp and log have GLIBC_2.29 versions too) fails here, in the main suite, before any wheel is built.
"""
import importlib
import pathlib
import platform
import re

import pytest

elftools = pytest.importorskip("elftools.elf.elffile", reason="pyelftools is not installed")

GLIBC_FLOOR = (2, 17)
# The libgomp symbol versions the kernel may use: those the runtime in the wheels (the
# libgomp of a manylinux2014 build of GCC) defines, GOMP_4.5 and older; later GCCs add
# GOMP_5.0 and beyond.
OPENMP_VERSIONS = {"OMP_1.0", "GOMP_1.0", "GOMP_4.0"}


def newer_than_the_floor(versions):
    return sorted(v for v in versions if v.startswith("GLIBC_")
                  and tuple(int(x) for x in re.findall(r"\d+", v)[:2]) > GLIBC_FLOOR)


def defined_versions(path):
    """The version names the file defines (.gnu.version_d)."""
    with open(path, "rb") as f:
        section = elftools.ELFFile(f).get_section_by_name(".gnu.version_d")
        return set() if section is None else {aux.name for _, auxes in section.iter_versions() for aux in auxes}


def needed_versions(path):
    """{library: {version names}} from the file's version-needs section."""
    with open(path, "rb") as f:
        elf = elftools.ELFFile(f)
        section = elf.get_section_by_name(".gnu.version_r")
        if section is None:
            return {}
        return {need.name: {aux.name for aux in auxes} for need, auxes in section.iter_versions()}


@pytest.fixture(params=["fastadam._kernel", "fastadam._jax_ffi"])
def extension(request):
    try:
        return importlib.import_module(request.param)
    except ImportError:
        pytest.skip(f"{request.param} is not built")


def test_extensions_need_nothing_newer_than_glibc_2_17(extension):
    needs = needed_versions(extension.__file__)
    glibc = {(lib, v) for lib, versions in needs.items() for v in versions if v.startswith("GLIBC_")}
    assert glibc, needs  # every extension needs libc: a file read wrong must not pass
    newer = newer_than_the_floor(v for _, v in glibc)
    assert not newer, f"{extension.__name__} needs {newer}: the wheels' manylinux_2_17 tag would not hold"
    if extension.__name__ == "fastadam._kernel":  # pow, bound at its original version (src/fa_step.hpp)
        first = {"aarch64": "GLIBC_2.17"}.get(platform.machine(), "GLIBC_2.2.5")  # the architecture's first
        assert needs.get("libm.so.6") == {first}, needs
    if extension.__name__ == "fastadam._jax_ffi":  # C's library only: no C++ runtime (src/jax_ffi.cpp)
        assert set(needs) == {"libc.so.6"}, needs


def test_kernel_needs_only_openmp_versions_the_bundled_libgomp_has():
    kernel = pytest.importorskip("fastadam._kernel")
    if not kernel.OPENMP_ENABLED:
        pytest.skip("built without OpenMP")
    needs = needed_versions(kernel.__file__)
    gomp = [versions for lib, versions in needs.items() if lib.startswith("libgomp")]
    assert len(gomp) == 1, needs
    assert gomp[0] and gomp[0] <= OPENMP_VERSIONS, gomp[0]


def test_the_bundled_openmp_runtime_needs_glibc_2_17_and_has_what_the_kernel_needs():
    """An installed wheel's fastadam.libs/libgomp-*: the runtime the kernel loads there."""
    kernel = pytest.importorskip("fastadam._kernel")
    bundled = sorted((pathlib.Path(kernel.__file__).parents[1] / "fastadam.libs").glob("libgomp*"))
    if not bundled:
        pytest.skip("no bundled OpenMP runtime (a source build uses its compiler's)")
    assert len(bundled) == 1, bundled
    needs = needed_versions(bundled[0])
    assert any(lib == "libc.so.6" for lib in needs), needs
    assert not newer_than_the_floor(v for versions in needs.values() for v in versions), needs
    kernel_needs = next(v for lib, v in needed_versions(kernel.__file__).items() if lib.startswith("libgomp"))
    assert kernel_needs <= defined_versions(bundled[0]), (kernel_needs, defined_versions(bundled[0]))
