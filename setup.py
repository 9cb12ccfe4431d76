"""Builds the compiled kernel, fastadam._kernel (with fastadam.torch's compiled
planned path, which runs it), and fastadam.jax's XLA FFI handler from src/.

They are optional: where no C++ compiler works, the install goes on without them
(setuptools says so in a warning) and fastadam runs on the Numba backend if numba
is installed, else on the NumPy reference (``python -m fastadam --info`` says
which, and why).  FASTADAM_REQUIRE_EXTENSIONS=1 makes a failed build an error
(the wheel's CI build sets it).

Build-time switches (environment variables):
  FASTADAM_OPENMP=0       build without OpenMP (the kernel then runs serially); unset,
                          OpenMP is used where the compiler builds and links an OpenMP
                          program (GCC; clang with libomp), and the build goes on
                          serially with a warning where it does not (Apple's clang);
                          FASTADAM_OPENMP=1 makes a compiler without it an error
  FASTADAM_OPENMP_RUNTIME=/path/libgomp.so.1
                          link that OpenMP runtime (libgomp's ABI) instead of the
                          compiler's own: the wheels link Debian 11's libgomp,
                          which needs only glibc 2.17 (docs/building.md)
  FASTADAM_JAX=0          do not build fastadam.jax's XLA FFI handler, which is
                          built by default where jaxlib (its headers) is installed;
                          FASTADAM_JAX=1 makes a missing jaxlib an error
  FASTADAM_CYTHON_DEBUG=1 bounds checks on, -O0 -g: for debugging and sanitizers
  FASTADAM_LIMITED_API=1  build against CPython's stable ABI (the limited API of
                          3.11): one build, a cp311-abi3 wheel, serves CPython 3.11
                          and every later version.  Without it the extensions are
                          built for this CPython, whose full API makes a step's
                          call a little cheaper (docs/building.md)

Flags: -O3 vectorises the loop; -fno-math-errno lets GCC use the sqrt
instruction instead of a libm call; -ffp-contract=off keeps multiply and add
separately rounded, so the compiled kernel rounds exactly as the NumPy
reference does.  No -ffast-math (it would change the floating-point state of
the whole process) and no -march=native (the AVX2 and AVX-512 variants are
compiled per function and chosen at run time; see src/adam_kernel.hpp).
"""
import glob
import os
import sys

import tempfile
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

openmp_wanted = os.environ.get("FASTADAM_OPENMP", "")  # "": where the compiler has it
openmp = openmp_wanted != "0"
optional = os.environ.get("FASTADAM_REQUIRE_EXTENSIONS", "0") != "1"
debug = os.environ.get("FASTADAM_CYTHON_DEBUG", "0") == "1"
limited = os.environ.get("FASTADAM_LIMITED_API", "0") == "1"
if limited and sys.version_info < (3, 11):  # the buffer protocol joined the stable ABI in 3.11
    sys.exit("FASTADAM_LIMITED_API=1 needs CPython 3.11 or later to build")
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if limited:
    macros.append(("Py_LIMITED_API", "0x030B0000"))

compile_args = ["-std=c++17", "-fno-math-errno", "-ffp-contract=off"]
compile_args += ["-O0", "-g"] if debug else ["-O3"]
link_args = []
runtime = os.environ.get("FASTADAM_OPENMP_RUNTIME", "")
if openmp:
    compile_args.append("-fopenmp")
    if runtime:  # the compiler's code calls libgomp's ABI (GOMP_4.0), which older libgomp has
        link_args += ["-L" + os.path.dirname(os.path.abspath(runtime)),
                      "-l:" + os.path.basename(runtime)]
    else:
        link_args.append("-fopenmp")

kernel = Extension(
    "fastadam._kernel",
    sources=["src/_kernel.pyx"],
    depends=sorted(glob.glob("src/*.hpp") + glob.glob("src/*.h") + glob.glob("src/*.pxi")),  # rebuilt when a header changes
    include_dirs=["src", numpy.get_include()],
    define_macros=macros,
    py_limited_api=limited,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    language="c++",
)

def jaxlib_include():
    """jaxlib's headers (jax.ffi.include_dir(), found without importing jax), or None."""
    import importlib.util
    spec = importlib.util.find_spec("jaxlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        include = os.path.join(root, "include")
        if os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
            return include
    return None


jax_wanted = os.environ.get("FASTADAM_JAX", "")
jax_include = jaxlib_include() if jax_wanted != "0" else None
if jax_wanted == "1" and jax_include is None:
    sys.exit("FASTADAM_JAX=1: jaxlib's XLA FFI headers were not found; pip install jax")
# fastadam.jax's XLA FFI handler: calls the kernel above through its capsule
# (src/fa_kernel_api.h), so it is small and compiles no kernel of its own.
jax_ffi = [Extension(
    "fastadam._jax_ffi",
    sources=["src/jax_ffi.cpp"],
    depends=["src/fa_kernel_api.h", "src/fa_step.hpp"],
    include_dirs=["src"],
    define_macros=macros,
    py_limited_api=limited,
    # no C++ runtime: the handler uses C's library only (src/jax_ffi.cpp), as the wheels need
    extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", "-fno-exceptions", "-fno-rtti",
                        "-fno-threadsafe-statics", "-isystem", jax_include],
    extra_link_args=["-Wl,--as-needed"],
    language="c++",
)] if jax_include else []

extensions = cythonize(
    [kernel],
    compiler_directives={
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": not debug,
    },
    compile_time_env={},
)
extensions += jax_ffi
for extension in extensions:  # after cythonize, which makes new Extension objects
    extension.optional = optional

OPENMP_PROBE = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def compiler_has_openmp(compiler):
    """Whether `compiler` compiles and links an OpenMP program with -fopenmp."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(OPENMP_PROBE)
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=["-fopenmp"])
        except Exception:  # distutils' CompileError or LinkError, or no compiler at all
            return False
    return True


class BuildExt(build_ext):
    """build_ext, with OpenMP left out (and said so) where the compiler has none."""

    def build_extensions(self):
        if openmp and not compiler_has_openmp(self.compiler):
            if openmp_wanted == "1":
                sys.exit("FASTADAM_OPENMP=1: this compiler does not build OpenMP programs (-fopenmp)")
            warnings.warn("the C++ compiler does not build OpenMP programs (-fopenmp): fastadam's kernel "
                          "is built without OpenMP and runs on one thread (python -m fastadam --info says so)")
            for extension in self.extensions:
                extension.extra_compile_args = [a for a in extension.extra_compile_args if a != "-fopenmp"]
                extension.extra_link_args = [a for a in extension.extra_link_args
                                             if a != "-fopenmp" and not a.startswith(("-L", "-l:"))]
        super().build_extensions()


setup(ext_modules=extensions,
      cmdclass={"build_ext": BuildExt},
      options={"bdist_wheel": {"py_limited_api": "cp311"}} if limited else {})
