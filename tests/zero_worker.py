"""Scenarios for tests/test_distributed.py, run under mpiexec: ``python -m mpi4py
tests/zero_worker.py SCENARIO [ARGS]``.  Each rank checks ZeroAdam against
single-process fastadam.Adam stepped with the averaged gradient (every rank
computes the reference itself from the same seeds); rank 0 prints "OK" last."""
import os
import sys
import warnings

import numpy as np
from mpi4py import MPI

import fastadam
from fastadam.distributed import ZeroAdam, ZeroAdamW, flat_parameters
from hostile_arrays import Contrary

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
SHAPES = [(37,), (5, 7), (1000,), (3,), (64, 33)]


def model(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def local_grads(step, r, shapes=SHAPES):
    rng = np.random.default_rng(1000 * step + r + 1)
    return [rng.standard_normal(s).astype(np.float32) * (1 + r) for s in shapes]


def mean_grads(step, shapes=SHAPES):
    per_rank = [local_grads(step, r, shapes) for r in range(size)]
    return [np.mean(np.stack([g[k] for g in per_rank]), axis=0, dtype=np.float64).astype(np.float32)
            for k in range(len(shapes))]


def groups(params, **extra):
    return [dict(params=params[:2], **extra),
            dict(params=params[2:], lr=3e-3, weight_decay=0.1)]


def close(a, b, what):
    for k, (x, y) in enumerate(zip(a, b)):
        scale = max(1.0, float(np.abs(y).max()))
        err = float(np.abs(x.astype(np.float64) - y).max()) / scale
        assert err <= 1e-6, f"{what}[{k}]: {err:.3g} relative"


def run_pair(cls, ref_cls, steps=25, **kwargs):
    ours, theirs = model(), model()
    zero = cls(groups(ours), comm=comm, **kwargs)
    ref = ref_cls(groups(theirs), **kwargs)
    for t in range(steps):
        assert zero.step(local_grads(t, rank)) is True
        ref.step(mean_grads(t))
    close(ours, theirs, f"{cls.__name__} {kwargs} params")
    return zero, ref, ours


def scenario_equal():
    for cls, ref_cls in [(ZeroAdam, fastadam.Adam), (ZeroAdamW, fastadam.AdamW)]:
        for kwargs in [{}, dict(amsgrad=True), dict(maximize=True, lr=1e-2),
                       dict(max_grad_norm=5.0), dict(state_dtype="bfloat16")]:
            if kwargs.get("state_dtype") == "bfloat16":   # stochastic rounding keys differ
                continue
            zero, ref, ours = run_pair(cls, ref_cls, **kwargs)
            if "max_grad_norm" in kwargs:
                assert abs(zero.last_grad_norm - ref.last_grad_norm) <= 1e-6 * ref.last_grad_norm
    # every rank holds the same parameters, bitwise
    zero, _, ours = run_pair(ZeroAdam, fastadam.Adam)
    blob = b"".join(p.tobytes() for p in ours)
    assert all(b == blob for b in comm.allgather(blob))
    # bitwise the same run to run
    again, _, ours2 = run_pair(ZeroAdam, fastadam.Adam)
    assert b"".join(p.tobytes() for p in ours2) == blob
    # state is sharded: this rank holds about 1/size of it
    whole = sum(p.size for p in ours) * 8
    held = comm.allgather(zero.state_nbytes())
    assert sum(held) == whole and max(held) <= whole // size + 16 * 8 * len(SHAPES), held


def scenario_flat():
    shapes = {"W": (784, 33), "b": (33,), "V": (33, 10), "c": (10,)}
    flat = flat_parameters(shapes, comm)
    assert flat.numel % (size * 16) == 0
    flat.data[...] = np.random.default_rng(0).standard_normal(flat.numel)
    theirs = [flat.data.copy()]
    zero = ZeroAdam([flat.data], comm=comm, lr=1e-2)
    assert zero._flat_params is not None   # the copy-free path
    ref = fastadam.Adam(theirs, lr=1e-2)
    for t in range(25):
        g = local_grads(t, rank, [(flat.numel,)])[0]
        flat.grad[...] = g
        zero.step([flat.grad])
        ref.step(mean_grads(t, [(flat.numel,)]))
    close([flat.data], theirs, "flat")
    assert np.shares_memory(flat.params["W"], flat.data)


def scenario_subclasses():
    """np.matrix parameters and Contrary gradients: sharded, reduced and gathered as the
    plain arrays over their memory (oracle: Adam on plain arrays and the mean gradient)."""
    shapes = [(5, 7), (64, 33), (3, 4)]
    warnings.filterwarnings("ignore", "the matrix subclass", PendingDeprecationWarning)
    ours = [np.matrix(p) for p in model(shapes=shapes)]
    theirs = model(shapes=shapes)
    zero = ZeroAdam(groups(ours), comm=comm, amsgrad=True)
    ref = fastadam.Adam(groups(theirs), amsgrad=True)
    for t in range(10):
        assert zero.step([g.view(Contrary) for g in local_grads(t, rank, shapes)]) is True
        ref.step(mean_grads(t, shapes))
    close([np.asarray(p) for p in ours], theirs, "subclasses")
    assert all(type(p) is np.matrix for p in ours)


def scenario_tiny():
    """More ranks than work: 10 elements, 16-element shards; ranks past the first own nothing."""
    shapes = [(7,), (3,)]
    ours, theirs = model(0, shapes), model(0, shapes)
    zero = ZeroAdam(ours, comm=comm)
    ref = fastadam.Adam(theirs)
    assert (zero._shard is None) == (rank > 0)
    for t in range(5):
        zero.step(local_grads(t, rank, shapes))
        ref.step(mean_grads(t, shapes))
    close(ours, theirs, "tiny")


def snapshot(zero, params):
    return [p.copy() for p in params], zero.state_dict()


def same_state(a, b):
    if a is None or b is None:
        return a is b
    for k in a["state"]:
        for key, value in a["state"][k].items():
            other = b["state"][k][key]
            assert np.array_equal(value, other) if isinstance(value, np.ndarray) else value == other
    return a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()


def scenario_bad_rank():
    ours = model()
    zero = ZeroAdam(ours, comm=comm, skip_if_nonfinite=True)
    zero.step(local_grads(0, rank))
    before, state = snapshot(zero, ours)
    bad = local_grads(1, rank)
    if rank == size - 1:
        bad[2] = bad[2][:-1]          # the wrong shape, on one rank only
    try:
        zero.step(bad)
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError("no error")
    assert "grads[2]" in message, message
    if rank != size - 1:
        assert message.startswith(f"rank {size - 1}: "), message
    messages = comm.allgather(message.split(": ", 1)[-1] if rank != size - 1 else message)
    assert len(set(messages)) == 1, messages
    assert all(np.array_equal(p, q) for p, q in zip(ours, before))
    assert same_state(zero.state_dict(), state)
    # a NaN on one rank: every rank skips the step alike
    g = local_grads(1, rank)
    if rank == 0:
        g[1][2, 3] = np.nan
    assert zero.step(g) is False and zero.skipped_steps == 1
    assert all(np.array_equal(p, q) for p, q in zip(ours, before))
    if size > 1:   # hyperparameters changed on one rank only
        if rank == 0:
            zero.param_groups[0]["lr"] = 0.5
        try:
            zero.step(local_grads(2, rank))
        except ValueError as e:
            assert "hyperparameters differ" in str(e)
        else:
            raise AssertionError("no error")
        zero.param_groups[0]["lr"] = 1e-3
    # a parameter replaced, or one added, on one rank: refused on every rank, nothing changed
    # (the shards are cut from the arrays it was built with; it stepped the old array before)
    group = zero.param_groups[0]["params"]
    for change, undo, words in (
            (lambda: group.__setitem__(1, group[1].copy()), lambda: group.__setitem__(1, ours[1]),
             "param_groups[0]['params'][1] is not the array"),
            (lambda: group.append(np.zeros(3)), group.pop, "parameters per group"),
            (lambda: setattr(group[2].flags, "writeable", False),
             lambda: setattr(group[2].flags, "writeable", True), "param_groups[0]['params'][2] is read-only")):
        if rank == size - 1:
            change()
        try:
            zero.step(local_grads(2, rank))
        except ValueError as e:
            assert words in str(e), str(e)
            assert rank == size - 1 or str(e).startswith(f"rank {size - 1}: "), str(e)
        else:
            raise AssertionError("no error")
        if rank == size - 1:
            undo()
        assert all(np.array_equal(p, q) for p, q in zip(ours, before))
        assert same_state(zero.state_dict(), state)
    # and the collectives still line up: a good step goes through on all
    assert zero.step(local_grads(2, rank)) is True


def scenario_unimplemented_flag():
    """A flag the shards' backend lacks (the Numba kernel made to lack maximize): refused
    on every rank when built and on a later step, nothing changed, and the job goes on."""
    from fastadam import _numba_kernel
    _numba_kernel.FLAGS = tuple(f for f in _numba_kernel.FLAGS if f != "maximize")
    ours = model()
    words = "backend 'numba' does not implement maximize=True (param_groups[0])"
    try:
        ZeroAdam(ours, comm=comm, backend="numba", maximize=True)
    except ValueError as e:
        assert words in str(e), str(e)
    else:
        raise AssertionError("no error")
    zero = ZeroAdam(ours, comm=comm, backend="numba")
    zero.step(local_grads(0, rank))
    before, state = snapshot(zero, ours)
    zero.param_groups[0]["maximize"] = True
    try:
        zero.step(local_grads(1, rank))
    except ValueError as e:
        assert words in str(e), str(e)
    else:
        raise AssertionError("no error")
    zero.param_groups[0]["maximize"] = False
    assert all(np.array_equal(p, q) for p, q in zip(ours, before))
    assert same_state(zero.state_dict(), state)
    assert zero.step(local_grads(1, rank)) is True


def scenario_save(path):
    ours = model()
    zero = ZeroAdamW(groups(ours), comm=comm, amsgrad=True)
    for t in range(10):
        zero.step(local_grads(t, rank))
    zero.save(path)
    np.save(path + f".params-{rank}.npy", np.concatenate([p.reshape(-1) for p in ours]))
    sd = zero.state_dict()   # collective: the whole state on rank 0
    if rank == 0:   # single-process AdamW reads the file, and holds the same state
        ref = fastadam.AdamW(groups([p.copy() for p in ours]), amsgrad=True)
        ref.load(path)
        assert ref.state[0]["step"] == 10
        assert same_state(sd, ref.state_dict())
    else:
        assert sd is None


def scenario_load(path):
    """Resume a checkpoint written at another world size: the next 10 steps equal
    single-process AdamW resumed from the same file."""
    flat_saved = np.load(path + ".params-0.npy")
    ours, theirs = model(), model()
    for params in (ours, theirs):
        start = 0
        for p in params:
            p.reshape(-1)[...] = flat_saved[start:start + p.size]
            start += p.size
    zero = ZeroAdamW(groups(ours), comm=comm, amsgrad=True)
    zero.load(path)
    ref = fastadam.AdamW(groups(theirs), amsgrad=True)
    ref.load(path)
    for t in range(10, 20):
        zero.step(local_grads(t, rank))
        ref.step(mean_grads(t))
    # the reference averages this world size's gradients: the same as ZeroAdam's
    close(ours, theirs, "resumed")
    # a missing file: every rank raises, nothing changes
    try:
        zero.load(path + ".missing")
    except OSError as e:
        assert "missing" in str(e)
    else:
        raise AssertionError("no error")


def scenario_die():
    """Rank 1 dies before the step: mpiexec must end the job, not hang."""
    ours = model()
    zero = ZeroAdam(ours, comm=comm)
    comm.Barrier()
    if rank == 1:
        os._exit(3)
    zero.step(local_grads(0, rank))
    print("rank", rank, "finished a step without rank 1", flush=True)


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    globals()["scenario_" + name](*args)
    comm.Barrier()
    if rank == 0:
        print("OK", flush=True)
