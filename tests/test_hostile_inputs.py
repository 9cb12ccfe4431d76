"""Hostile inputs, by class, over every entry point: NumPy scalars as arguments, paths
that are not regular files, ndarray subclasses, copies, and degenerate datasets for the
trainer.  Each input is either handled as its plain equivalent (checked against an
optimizer given the plain value) or refused with an error naming it, with nothing
changed; none hangs or ends in a traceback.
"""
import contextlib
import copy
import os
import pickle
import signal
import stat
import struct

import numpy as np
import pytest

import fastadam
from fastadam.mnist import main

from conftest import backend_params
from hostile_arrays import Contrary

SCALARS = {
    "float16": np.float16, "float32": np.float32, "float64": np.float64,
    "longdouble": np.longdouble, "int64": np.int64, "uint64": np.uint64, "uint8": np.uint8,
    "bool_": np.bool_, "0-d array": np.array,
}
# Each argument, a value for it, and how to build the optimizer from it.
ARGUMENTS = {
    "lr": (0.01, lambda v: dict(lr=v)),
    "eps": (1e-6, lambda v: dict(eps=v)),
    "weight_decay": (0.1, lambda v: dict(weight_decay=v)),
    "betas[0]": (0.8, lambda v: dict(betas=(v, 0.99))),
    "betas[1]": (0.9, lambda v: dict(betas=(0.9, v))),
    "max_grad_norm": (0.5, lambda v: dict(max_grad_norm=v)),
    "num_threads": (1, lambda v: dict(num_threads=v)),
    "seed": (7, lambda v: dict(seed=v, state_dtype="bfloat16")),
}


@contextlib.contextmanager
def deadline(seconds=10):
    """Fail, rather than hang the suite, if the block blocks."""
    def fail(*_):
        raise TimeoutError(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def grads(n=2):
    return [np.linspace(-1, 1, 10, dtype=np.float32) * (k + 1) for k in range(n)]


def through_every_path(opt, tmp_path):
    """Step, state_dict/load_state_dict, save/load, repr, deepcopy, pickle: the
    optimizer's parameters after the steps, and the copies'."""
    tmp_path.mkdir()
    opt.step(grads())
    opt.load_state_dict(opt.state_dict())
    opt.save(tmp_path / "opt.npz")
    opt.load(tmp_path / "opt.npz")
    repr(opt)
    twins = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for o in [opt] + twins:
        o.step(grads())
    return [[p.copy() for g in o.param_groups for p in g["params"]] for o in [opt] + twins]


@pytest.mark.parametrize("scalar", sorted(SCALARS))
@pytest.mark.parametrize("argument", sorted(ARGUMENTS))
def test_numpy_scalars_as_arguments(argument, scalar, tmp_path):
    plain, build = ARGUMENTS[argument]
    value = SCALARS[scalar](plain)
    params = [np.ones(10, np.float32), np.full(10, 2.0, np.float32)]
    try:
        opt = fastadam.Adam(params, **build(value))
    except (TypeError, ValueError) as e:  # refused: by name, with nothing made
        assert argument.split("[")[0] in str(e)
        return
    reference = fastadam.Adam([np.ones(10, np.float32), np.full(10, 2.0, np.float32)],
                              **build(type(plain)(value)))
    ours = through_every_path(opt, tmp_path / "a")
    theirs = through_every_path(reference, tmp_path / "b")
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("scalar", ["float32", "float64", "int64"])
def test_numpy_scalars_set_in_a_group_after_construction(scalar, tmp_path):
    """A NumPy scalar set as lr after construction steps, saves, loads and copies as the
    Python number it holds (oracle: the same steps with that number)."""
    def run(lr):
        p = np.ones(10, np.float32)
        opt = fastadam.Adam([p])
        opt.step(grads(1))
        opt.param_groups[0]["lr"] = lr
        opt.step(grads(1))
        opt.save(tmp_path / "opt.npz")
        opt.load(tmp_path / "opt.npz")
        twin = copy.deepcopy(opt)
        twin.step(grads(1))
        return p, twin
    value = SCALARS[scalar](1)
    p, twin = run(value)
    q, oracle = run(value.item() if hasattr(value, "item") else value)
    np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(twin.param_groups[0]["params"][0], oracle.param_groups[0]["params"][0])
    np.testing.assert_array_equal(twin.state[0]["exp_avg"], oracle.state[0]["exp_avg"])
    assert twin.state[0]["step"] == oracle.state[0]["step"] == 3


def test_numpy_scalars_through_the_other_entry_points(tmp_path):
    """load_state_dict, add_param_group, FlatParameters, ZeroAdam and fastadam.torch take
    NumPy scalars as the numbers they hold, and save, copy and pickle them."""
    values = dict(lr=np.float32(0.01), eps=np.float64(1e-6), weight_decay=np.int64(0),
                  betas=(np.float32(0.8), np.float64(0.9)))
    plain = {k: (tuple(float(x) for x in v) if k == "betas" else float(v)) for k, v in values.items()}

    def run(group_values, path):
        opt = fastadam.Adam([np.ones(10, np.float32)])
        opt.step(grads(1))
        sd = opt.state_dict()
        sd["param_groups"][0].update(group_values)
        opt.load_state_dict(sd)
        opt.add_param_group(dict(params=[np.ones(5, np.float32)], **group_values))
        opt.step(grads(1) + [np.ones(5, np.float32)])
        opt.save(path)
        opt.load(path)
        twin = pickle.loads(pickle.dumps(copy.deepcopy(opt)))
        twin.step(grads(1) + [np.ones(5, np.float32)])
        return [p for g in twin.param_groups for p in g["params"]]

    for a, b in zip(run(values, tmp_path / "a.npz"), run(plain, tmp_path / "b.npz")):
        np.testing.assert_array_equal(a, b)
    shapes = {"w": (np.int64(3), np.int64(4)), "b": np.int64(4)}
    flat = fastadam.FlatParameters(shapes, dtype=np.float32, align=np.int64(64))
    same = fastadam.FlatParameters({"w": (3, 4), "b": 4}, dtype=np.float32, align=64)
    assert flat.data.shape == same.data.shape


def special_paths(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "directory").mkdir()
    os.symlink(tmp_path / "nothing", tmp_path / "dangling")
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    os.symlink(tmp_path / "fifo", tmp_path / "to-fifo")
    return {name: tmp_path / name for name in ("fifo", "directory", "dangling", "loop-a", "to-fifo")} | {
        "/dev/null": "/dev/null", "/dev/zero": "/dev/zero"}


@pytest.mark.parametrize("operation", ["load", "save"])
def test_paths_that_are_not_regular_files(operation, tmp_path):
    opt = fastadam.Adam([np.ones(10, np.float32)])
    opt.step(grads(1))
    before = copy.deepcopy(opt.state_dict())
    for name, path in special_paths(tmp_path).items():
        mode = os.lstat(path).st_mode
        with deadline():
            with pytest.raises((ValueError, FileNotFoundError)) as caught:
                getattr(opt, operation)(path)
        assert str(path) in str(caught.value), name
        assert os.lstat(path).st_mode == mode, f"{name} was replaced"
        assert opt.state_dict()["state"][0]["step"] == before["state"][0]["step"]
        np.testing.assert_array_equal(opt.state[0]["exp_avg"], before["state"][0]["exp_avg"])
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def subclasses(tmp_path):
    mm = np.memmap(tmp_path / "m", np.float32, "w+", shape=(12,))
    mm[:] = 1
    return {
        "matrix": np.matrix(np.ones((3, 4), np.float32)),  # * is a matrix product; reshape(-1) stays 2-D
        "contrary": np.ones((3, 4), np.float32).view(Contrary),
        "memmap": mm,
        "recarray": np.ones(12, np.float32).view(np.recarray),
        "structured view": np.zeros(12, dtype=[("a", np.float32)]).view(np.float32) + 1,
    }


SUBCLASS_OPTIONS = [dict(), dict(amsgrad=True, weight_decay=0.1, maximize=True),
                    dict(state_dtype="bfloat16", weight_decay=0.1)]


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("role", ["parameter", "gradient"])
def test_ndarray_subclasses_step_as_plain_arrays(role, backend, tmp_path):
    """On every backend (the NumPy reference's arithmetic included), a subclass is
    stepped as the plain array over its memory: the parameters and state are those of
    the reference stepped with plain arrays."""
    for options in SUBCLASS_OPTIONS:
        for name, a in subclasses(tmp_path).items():
            a = a.copy() if name != "memmap" else a
            a[...] = np.asarray(np.linspace(-1, 1, a.size, dtype=np.float32).reshape(a.shape))
            plain = np.asarray(a).copy()
            g_plain = np.asarray(np.linspace(0.5, -0.25, a.size, dtype=np.float32).reshape(a.shape))
            if role == "parameter":
                ours, grad = a, g_plain
            else:
                ours, grad = plain.copy(), np.asarray(g_plain).copy().view(type(a)) if name != "memmap" else a
                if name == "memmap":
                    grad[...] = g_plain
            theirs = plain.copy()
            mine = fastadam.Adam([ours], backend=backend, **options)
            ref = fastadam.Adam([theirs], backend="numpy", **options)
            for _ in range(3):
                assert mine.step([grad]) is True
                ref.step([g_plain.copy()])
            where = f"{name} as {role}, {options}"
            np.testing.assert_array_equal(np.asarray(ours), theirs, err_msg=where)
            for key, value in ref.state[0].items():
                if isinstance(value, np.ndarray):
                    assert type(mine.state[0][key]) is np.ndarray, where  # a subclass's is p's own business
                    np.testing.assert_array_equal(mine.state[0][key], value, err_msg=f"{key}: {where}")


def test_masked_and_read_only_arrays_are_refused_with_nothing_changed(tmp_path):
    p = np.ones(12, np.float32)
    opt = fastadam.Adam([p])
    opt.step([np.ones(12, np.float32)])  # the next step takes the compiled fast path
    before, m_before = p.copy(), opt.state[0]["exp_avg"].copy()
    masked = np.ma.masked_array(np.ones(12, np.float32), mask=[0] * 11 + [1])
    with pytest.raises(TypeError, match=r"grads\[0\] is a numpy.ma.MaskedArray"):
        opt.step([masked])
    np.testing.assert_array_equal(p, before)
    np.testing.assert_array_equal(opt.state[0]["exp_avg"], m_before)
    assert opt.state[0]["step"] == 1
    with pytest.raises(TypeError, match="MaskedArray"):
        fastadam.Adam([np.ma.masked_array(np.ones(3, np.float32))])
    mm = np.memmap(tmp_path / "r", np.float32, "w+", shape=(4,))
    mm.flush()
    with pytest.raises(ValueError, match="read-only"):
        fastadam.Adam([np.memmap(tmp_path / "r", np.float32, "r", shape=(4,))])


# -- the trainer ---------------------------------------------------------------

def idx(dims, data=b""):
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data


def dataset(directory, train=(6, 3, 3), test=(4, 3, 3), train_labels=None, test_labels=None,
            cut=0, shapes_only=False):
    """Plain IDX files; ``shapes_only`` writes headers whose data would not fit in memory."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    for stem, dims, n_labels in (("train", train, train_labels), ("t10k", test, test_labels)):
        size = 0 if shapes_only else int(np.prod(dims))
        images = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        (directory / f"{stem}-images-idx3-ubyte").write_bytes(idx(dims, images[:len(images) - cut]))
        n = dims[0] if n_labels is None else n_labels
        n = min(n, 100)
        labels = (np.arange(n) % 10).astype(np.uint8).tobytes()
        (directory / f"{stem}-labels-idx1-ubyte").write_bytes(idx((n,), labels))
    return directory


DEGENERATE = {
    "empty train split": dict(train=(0, 3, 3)),
    "empty test split": dict(test=(0, 3, 3)),
    "zero rows": dict(train=(6, 0, 3), test=(4, 0, 3)),
    "zero columns": dict(train=(6, 3, 0), test=(4, 3, 0)),
    "a product beyond memory": dict(train=(65536, 65536, 65536), shapes_only=True),
    "a product that wraps int64": dict(train=(2 ** 21, 2 ** 21, 2 ** 22), shapes_only=True),
    "fewer labels than images": dict(train_labels=5),
    "more test labels than images": dict(test_labels=5),
    "truncated images": dict(cut=7),
    "train and test images of other sizes": dict(test=(4, 2, 2)),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_datasets_end_with_one_line_and_status_2(case, tmp_path, capsys):
    directory = dataset(tmp_path / "data", **DEGENERATE[case])
    with deadline(60):
        assert main(["--data", str(directory), "--epochs", "1", "--no-download", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastadam-mnist: "), err


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_trainer_outputs_that_are_not_regular_files(option, tmp_path, capsys):
    directory = dataset(tmp_path / "data")
    for name, path in special_paths(tmp_path).items():
        mode = os.lstat(path).st_mode
        with deadline():
            assert main(["--data", str(directory), "--epochs", "1", "--no-download",
                         "--no-progress", option, str(path)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fastadam-mnist: {option}: "), (name, err)
        assert os.lstat(path).st_mode == mode


def test_trainer_data_files_that_are_not_regular(tmp_path, capsys):
    directory = dataset(tmp_path / "data")
    target = directory / "train-images-idx3-ubyte"
    target.unlink()
    os.symlink("/dev/zero", target)
    with deadline():
        assert main(["--data", str(directory), "--epochs", "1", "--no-download", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastadam-mnist: ")


# -- fork ----------------------------------------------------------------------

FORK_WHILE_STEPPING = """
import os, sys, threading, time, numpy as np
make, forks = sys.argv[1], 12
if make == "torch":
    import torch, fastadam.torch as ft
    w = torch.nn.Parameter(torch.zeros(1_000_000)); w.grad = torch.ones_like(w)
    opt = ft.Adam([w]); step = opt.step
    v = torch.nn.Parameter(torch.zeros(10)); v.grad = torch.ones_like(v)
    idle = ft.Adam([v]); idle_step = idle.step
else:
    import fastadam
    p = np.zeros(1_000_000, np.float32); g = np.ones_like(p)
    opt = fastadam.Adam([p], backend=make, num_threads=2); step = lambda: opt.step([g])
    idle = fastadam.Adam([np.zeros(10, np.float32)], backend=make)
    idle_step = lambda: idle.step([np.ones(10, np.float32)])
step()
stop = False
def stepper():
    while not stop:
        step()
thread = threading.Thread(target=stepper); thread.start()
outcomes = []
for i in range(forks):
    time.sleep(0.002 * (i % 4))
    pid = os.fork()
    if pid == 0:
        try:
            step(); code = 10   # the optimizer was free at the fork: it steps
        except RuntimeError as e:
            code = 11 if "forked while another thread" in str(e) else 12
        idle_step()             # one nobody was using steps in any case
        os._exit(code)
    deadline = time.time() + 30
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.time() > deadline:
            os.kill(pid, 9); os.waitpid(pid, 0); outcomes.append("hung"); break
        time.sleep(0.005)
    else:
        continue
stop = True; thread.join()
print("ok" if not outcomes else outcomes)
"""


@pytest.mark.parametrize("make", ["cython", "numpy", "torch"])
def test_fork_while_another_thread_steps_never_hangs_the_child(make, tmp_path):
    """Forks while a thread steps in a loop: each child either steps (the optimizer was
    free at the fork) or is refused with a message (it was mid-step), and always can step
    an optimizer nobody was using; none waits forever on a lock held by a thread that
    does not exist there."""
    import subprocess
    import sys
    if make == "torch":
        pytest.importorskip("torch")
    script = tmp_path / "fork.py"
    script.write_text(FORK_WHILE_STEPPING.replace("os._exit(code)",
                                                  "open(os.environ['OUT'] + str(os.getpid()), 'w')"
                                                  ".write(str(code)); os._exit(0)"))
    out = subprocess.run([sys.executable, str(script), make], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OUT=str(tmp_path / "child-")))
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.stdout, out.stderr[-2000:])
    codes = [int(f.read_text()) for f in tmp_path.glob("child-*")]
    assert len(codes) == 12 and set(codes) <= {10, 11}, codes
