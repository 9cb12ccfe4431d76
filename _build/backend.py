"""setuptools' build backend, with jaxlib among the build's requirements when
FASTADAM_JAX=1: fastadam.jax's XLA FFI handler compiles against jaxlib's headers
(jax.ffi.include_dir()), and an isolated build sees only what it requires."""
import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook setuptools has)

_JAXLIB = "jaxlib>=0.10"  # the FFI API the handler is written against (fastadam._jax_call.MIN_JAX)


def _jax():
    return [_JAXLIB] if os.environ.get("FASTADAM_JAX") == "1" else []


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _jax()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _jax()
