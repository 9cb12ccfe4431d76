"""What the built extensions ask of the system: the wheels' manylinux tag rests on it.

The symbol versions each extension needs, read from its ELF file (pyelftools, the
library auditwheel reads them with): nothing newer than glibc 2.17, and nothing
from the OpenMP runtime that the Debian 11 libgomp the wheels bundle lacks
(docs/building.md).  A new libm call that binds a newer version (exp and log have
GLIBC_2.29 versions too) fails here, in the main suite, before any wheel is built.
"""
import importlib
import re

import pytest

elftools = pytest.importorskip("elftools.elf.elffile", reason="pyelftools is not installed")

GLIBC_FLOOR = (2, 17)
# The libgomp symbol versions GCC 10's libgomp (Debian 11's, in the wheels) defines and
# the kernel may use; later GCCs add GOMP_5.0 and beyond.
OPENMP_VERSIONS = {"OMP_1.0", "GOMP_1.0", "GOMP_4.0"}


def needed_versions(path):
    """{library: {version names}} from the file's version-needs section."""
    with open(path, "rb") as f:
        elf = elftools.ELFFile(f)
        section = elf.get_section_by_name(".gnu.version_r")
        if section is None:
            return {}
        return {need.name: {aux.name for aux in auxes} for need, auxes in section.iter_versions()}


@pytest.fixture(params=["fastadam._kernel", "fastadam._torch_plan"])
def extension(request):
    try:
        return importlib.import_module(request.param)
    except ImportError:
        pytest.skip(f"{request.param} is not built")


def test_extensions_need_nothing_newer_than_glibc_2_17(extension):
    needs = needed_versions(extension.__file__)
    glibc = {(lib, v) for lib, versions in needs.items() for v in versions if v.startswith("GLIBC_")}
    assert glibc, needs  # every extension needs libc: a file read wrong must not pass
    newer = sorted((lib, v) for lib, v in glibc
                   if tuple(int(x) for x in re.findall(r"\d+", v)[:2]) > GLIBC_FLOOR)
    assert not newer, f"{extension.__name__} needs {newer}: the wheels' manylinux_2_17 tag would not hold"
    if extension.__name__ == "fastadam._kernel":  # pow, bound at its original version (src/fa_step.hpp)
        assert needs.get("libm.so.6") == {"GLIBC_2.2.5"}, needs


def test_kernel_needs_only_openmp_versions_the_bundled_libgomp_has():
    kernel = pytest.importorskip("fastadam._kernel")
    if not kernel.OPENMP_ENABLED:
        pytest.skip("built without OpenMP")
    needs = needed_versions(kernel.__file__)
    gomp = [versions for lib, versions in needs.items() if lib.startswith("libgomp")]
    assert len(gomp) == 1, needs
    assert gomp[0] and gomp[0] <= OPENMP_VERSIONS, gomp[0]
