"""The compiled kernel under valgrind memcheck: no error from fastadam's own code.

valgrind reports false positives in CPython and the dynamic loader (uninitialised
small-int reads, SSE2 strncmp over-reads); an error counts here if its stack passes
through fastadam's extension.  valgrind's virtual CPU has no AVX-512, so the baseline
and AVX2 variants are the ones checked.  Run by hand:

    PYTHONMALLOC=malloc valgrind --tool=memcheck python tests/memcheck/exercise_kernel.py
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # valgrind

pytest.importorskip("fastadam._kernel")
SCRIPT = Path(__file__).parent / "memcheck" / "exercise_kernel.py"
OURS = re.compile(r"_kernel\.cpython|adam_kernel|fa_adam|fa_run_share|fa_finite|fa_traffic|__pyx_")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_kernel_has_no_memcheck_errors(tmp_path):
    log = tmp_path / "memcheck.log"
    run = subprocess.run(
        ["valgrind", "--tool=memcheck", "--leak-check=no", f"--log-file={log}",
         sys.executable, str(SCRIPT)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONMALLOC": "malloc"})
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "checked baseline" in run.stdout and run.stdout.strip().endswith("ok")
    blocks = re.split(r"\n==\d+== \n", log.read_text())
    ours = [b for b in blocks if re.search(r"== (Invalid|Conditional|Use of uninit|Syscall param|Mismatched|Source and destination)", b)
            and OURS.search(b)]
    assert not ours, "memcheck errors in fastadam:\n" + "\n\n".join(ours[:3])
