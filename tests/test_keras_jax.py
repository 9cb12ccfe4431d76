"""fastadam.keras on Keras's JAX backend: tests/test_keras.py again, in a process whose
Keras runs on JAX (a process's Keras backend is fixed when Keras is imported), against
the same oracles: Keras's own Adam/AdamW on JAX, and fastadam's NumPy API bit for bit."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

if importlib.util.find_spec("keras") is None:  # (not imported here: its backend is chosen at import)
    pytest.skip("keras is not installed", allow_module_level=True)
pytest.importorskip("fastadam.jax", reason="fastadam.jax: no XLA FFI handler in this build",
                    exc_type=ImportError)


def test_the_keras_tests_pass_on_the_jax_backend(request):
    """tests/test_keras.py and tests/test_mnist_keras.py (its slow tier with --slow)."""
    here = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("JAX_ENABLE_X64", None)
    slow = ["--slow"] if request.config.getoption("--slow") else []
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *slow,
                          str(here / "test_keras.py"), str(here / "test_mnist_keras.py")],
                         env=env, capture_output=True, text=True,
                         timeout=1200, cwd=here.parent if (here.parent / "pyproject.toml").exists()
                         else here)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
    skipped = [line for line in out.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("always contiguous" in line or "no float64" in line for line in skipped), skipped
