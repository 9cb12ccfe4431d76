"""setuptools' build backend, with jaxlib among the build's requirements when
FASTADAM_JAX=1: fastadam.jax's XLA FFI handler compiles against jaxlib's headers
(jax.ffi.include_dir()), and an isolated build sees only what it requires."""
import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook setuptools has)

_JAXLIB = "jaxlib>=0.10"  # the FFI API the handler is written against (fastadam._jax_call.MIN_JAX)


def _with_jax(hook, config_settings):
    """The hook's requirements, and jaxlib with FASTADAM_JAX=1.  setuptools' hook runs
    setup.py, which with FASTADAM_JAX=1 refuses to go on without jaxlib: jaxlib is
    what this asks for, so setup.py runs here without the switch."""
    wanted = os.environ.pop("FASTADAM_JAX", None)
    try:
        requires = hook(config_settings)
    finally:
        if wanted is not None:
            os.environ["FASTADAM_JAX"] = wanted
    return requires + ([_JAXLIB] if wanted == "1" else [])


def get_requires_for_build_wheel(config_settings=None):
    return _with_jax(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _with_jax(_setuptools.get_requires_for_build_editable, config_settings)
