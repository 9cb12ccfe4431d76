"""state_dict / load_state_dict and the .npz checkpoint file.

Loading checks everything first and changes the optimizer only when all of it
fits, so a bad state dict or file leaves the optimizer exactly as it was.

Reading a file is bounded before anything large is allocated: the small
``meta`` member is read first (its declared size capped) and checked against
the optimizer (format, version, optimizer kind, the model's shapes and dtypes);
then every array member's .npy header is checked against what that model needs
(dtype, shape, the member's byte count) before its data is read.  A crafted
file therefore costs at most the model's own state in memory.

The file is a ZIP archive as ``numpy.savez`` writes it: ``meta.npy`` (a JSON
string) and ``state/{index}/{buffer}.npy`` per parameter.
"""
import json
import os
import zipfile

import numpy as np

from . import _flat, _formats, _paths, _rules

FORMAT = "fastadam-optimizer-state"
VERSION = 1
# The largest meta member read (a JSON string: ~40 bytes per parameter tensor).
MAX_META_BYTES = 64 << 20
_NPY_HEADER_LIMIT = 10000  # numpy's own default limit for a .npy header


def optimizer_kind(opt):
    """"AdamW" for decoupled weight decay, else "Adam": what a checkpoint records."""
    return "AdamW" if opt._decoupled else "Adam"


def state_dict(opt):
    """A snapshot in torch's structure (arrays copied, groups list parameter indices).
    The caller holds the optimizer's lock."""
    groups, k = [], 0
    for group in opt.param_groups:
        saved = {key: value for key, value in group.items() if key != "params"}
        saved["betas"] = tuple(saved["betas"])
        saved["decoupled_weight_decay"] = opt._decoupled  # torch's key: Adam or AdamW
        saved["params"] = list(range(k, k + len(group["params"])))
        k += len(group["params"])
        groups.append(saved)
    state = {
        index: {key: (value.copy() if isinstance(value, np.ndarray) else value)
                for key, value in entry.items()}
        for index, entry in sorted(opt.state.items())
    }
    return {"state": state, "param_groups": groups}


def check_state_dict(opt, sd, source="state_dict"):
    """Check ``sd`` against ``opt`` completely; return (groups, state) to commit.
    ``source`` names where it came from in messages (a file's path)."""
    prefix = "" if source == "state_dict" else f"{source}: "
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError(f"{prefix}state_dict must be a dict with 'state' and 'param_groups'")
    saved_groups, saved_state = sd["param_groups"], sd["state"]
    if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, dict) for g in saved_groups):
        raise TypeError(f"{prefix}state_dict['param_groups'] must be a list of dicts")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"{prefix}loaded state dict has a different number of parameter groups "
                         f"({len(saved_groups)}) than the optimizer ({len(opt.param_groups)})")
    params = opt._parameters()
    new_groups = []
    for i, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        decoupled = saved.get("decoupled_weight_decay", opt._decoupled)
        if decoupled is not opt._decoupled:
            raise ValueError(f"{prefix}param_groups[{i}] was saved by "
                             f"{'AdamW' if decoupled else 'Adam'}; this optimizer is "
                             f"{optimizer_kind(opt)} (its weight decay would change meaning)")
        if len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(f"{prefix}loaded state dict's param_groups[{i}] has "
                             f"{len(saved.get('params', ()))} parameters, the optimizer's has "
                             f"{len(group['params'])}")
        merged = dict(group)
        merged.update({key: value for key, value in saved.items()
                       if key not in ("params", "decoupled_weight_decay")})
        _rules.hyperparameters(merged, f" ({source} param_groups[{i}])")
        new_groups.append(merged)
    if not isinstance(saved_state, dict):
        raise TypeError(f"{prefix}state_dict['state'] must be a dict")
    new_state = {}
    for index, entry in saved_state.items():
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not (
                0 <= index < len(params)):
            raise ValueError(f"{prefix}state_dict['state'] has key {index!r}; expected parameter "
                             f"indices 0..{len(params) - 1}")
        where = f"{prefix}state_dict['state'][{index}]"
        step = _rules.state_entry(entry, params[index], where,
                                  amsgrad=isinstance(entry, dict) and "max_exp_avg_sq" in entry,
                                  live=False)
        p = params[index]
        converted = {key: value for key, value in entry.items()
                     if key not in _rules.STATE_BUFFERS and key not in _rules.ABSMAX_KEYS.values()
                     and key not in _rules.MASTER_KEYS.values()}
        master = _rules.master_key(p, opt.master_weights)
        for key in _rules.STATE_BUFFERS:
            if key in entry:
                converted.update(_convert_state(entry, key, p, where, opt.state_dtype, master))
        if master:
            converted.update(_convert_master(entry, p, where, master))
        converted["step"] = step
        new_state[int(index)] = converted
    return new_groups, new_state


def _convert_master(entry, p, where, target):
    """A state entry's master weights as parameter p keeps them (``target``, its
    master key): copied; a float32 master from split halves (p and the trailing
    bits); split trailing bits from a float32 master where p is its top half (0
    elsewhere: the master starts from p there).  {} where the entry has none (the
    next step makes the master from p)."""
    split, whole = _rules.MASTER_KEYS["split"], _rules.MASTER_KEYS["float32"]
    found = {}
    for key, dtype in ((split, np.uint16), (whole, np.float32)):
        a = entry.get(key)
        if a is None:
            continue
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != p.shape:
            raise TypeError(f"{where}[{key!r}] must be a {np.dtype(dtype)} array of the "
                            f"parameter's shape {p.shape}")
        found[key] = a
    if not found:
        return {}
    out = _flat.state_zeros(p.shape, np.uint16 if target == split else np.float32, target,
                            p.ctypes.data)
    if target in found:
        out[...] = found[target]
    elif target == whole:
        out[...] = _formats.split_master(p, found[split])
    else:
        high, low = _formats.split_halves(found[whole])
        out[...] = np.where(high == p.view(np.uint16), low, np.uint16(0))
    return {target: out}


def _convert_state(entry, key, p, where, kind, master=None):
    """State buffer ``key`` of ``entry`` (and its absmax, for 8-bit state) as new
    C-contiguous arrays in the storage parameter p's state has under state_dtype
    ``kind``: {key: array} or {key: codes, absmax key: absmax}.  Storage kinds
    convert into each other through float32: bfloat16 (uint16 bits, or
    ml_dtypes.bfloat16) decodes exactly and is stored rounded to nearest; 8-bit
    codes decode with their absmax and are stored by _formats.int8_encode.
    The same storage is copied bit for bit.  The buffers are placed as the
    optimizer places new state (_flat.state_zeros)."""
    a, name = entry[key], f"{where}[{key!r}]"
    absmax_key = _rules.ABSMAX_KEYS[key]
    target_kind = _rules.tensor_state_dtype(p, kind)
    target = _rules.state_storage(p.dtype, target_kind, master)
    if a.dtype.name == "bfloat16" and a.dtype.itemsize == 2:  # ml_dtypes.bfloat16
        a = a.view(np.uint16)
    compute = np.float32 if target != np.float64 else np.float64  # what values decode to
    if absmax_key in entry:  # 8-bit codes
        if a.dtype != np.uint8:
            raise TypeError(f"{name}: dtype {a.dtype}; 8-bit state (with {absmax_key!r}) is uint8 codes")
        absmax = entry[absmax_key]
        _rules.absmax_array(absmax, f"{where}[{absmax_key!r}]", p.size, live=False)
        _rules.int8_codes(a, name, signed=key == "exp_avg")
        if target_kind == "int8":
            codes, absmax = a, absmax
        else:
            values = _formats.int8_decode(a, absmax, signed=key == "exp_avg")
    elif a.dtype == np.uint8:
        raise ValueError(f"{where} has no {absmax_key!r}: 8-bit codes need their absmax")
    elif a.dtype == target:
        values = a
    elif a.dtype == np.uint16 and compute == np.float32:
        values = _formats.bf16_decode(a).reshape(a.shape)
    elif a.dtype in (np.float16, np.float32) and compute == np.float32:
        values = a.astype(np.float32)
    else:
        raise TypeError(f"{name}: dtype {a.dtype} does not match the state's dtype {target} and "
                        "does not convert to it (float32, bfloat16, float16 and 8-bit state "
                        "convert into each other)")
    if target_kind == "int8":
        if absmax_key not in entry:
            codes, absmax = _formats.int8_encode(values, signed=key == "exp_avg")
        out = _flat.state_zeros(a.shape, target, key, p.ctypes.data)
        out[...] = codes
        return {key: out, absmax_key: np.array(absmax, np.float32, order="C", copy=True)}
    if target_kind == "bfloat16" and values.dtype != np.uint16:
        values = _formats.bf16_round_nearest(values).reshape(a.shape)
    elif _formats.is_low_precision(target) and values.dtype != target:
        values = _formats.round_nearest(values, target).reshape(a.shape)
    out = _flat.state_zeros(a.shape, target, key, p.ctypes.data)
    out[...] = values
    return {key: out}


def load_state_dict(opt, sd, source="state_dict"):
    """Check ``sd`` against ``opt`` completely, then restore it (arrays copied in).
    The caller holds the optimizer's lock."""
    new_groups, new_state = check_state_dict(opt, sd, source)
    for group, merged in zip(opt.param_groups, new_groups):
        group.update(merged)
    opt.state.clear()
    opt.state.update(new_state)


# -- the file -------------------------------------------------------------------

def _model_signature(opt):
    return [[list(p.shape), p.dtype.str] for p in opt._parameters()]


def file_meta(opt, snapshot):
    """The ``meta`` member of a file holding ``snapshot`` (a state_dict of ``opt``)."""
    return {
        "format": FORMAT, "version": VERSION, "optimizer": optimizer_kind(opt),
        "state_dtype": opt.state_dtype, "master_weights": opt.master_weights,
        "model": _model_signature(opt),
        "steps": {str(index): entry["step"] for index, entry in snapshot["state"].items()},
        "param_groups": [{k: v for k, v in g.items() if k != "decoupled_weight_decay"}
                         for g in snapshot["param_groups"]],
    }


def _plain(value):
    """A NumPy scalar (a hyperparameter may be one) as the Python number it holds."""
    if isinstance(value, np.generic):
        plain = value.item()  # np.longdouble's item() is itself: its nearest float then
        return float(plain) if isinstance(plain, np.generic) else plain
    raise TypeError(f"{_rules.describe(value)} cannot be written to a checkpoint")


def write(path, snapshot, meta):
    """Write ``snapshot`` to ``path`` as .npz: a temporary file, fsync, rename."""
    # ml_dtypes.bfloat16 is written as its bits (uint16), which .npy can describe.
    arrays = {f"state/{index}/{key}": _formats.npy_storable(entry[key])
              for index, entry in snapshot["state"].items()
              for key in _STATE_MEMBERS if key in entry}
    arrays["meta"] = np.array(json.dumps(meta, default=_plain))
    path = os.fspath(path)
    _paths.check_replaceable(path)
    directory = os.path.dirname(os.path.abspath(path))
    f, tmp = _paths.create_beside(path, ".tmp")
    try:
        with f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


_STATE_MEMBERS = (_rules.STATE_BUFFERS + tuple(_rules.ABSMAX_KEYS.values())
                  + tuple(_rules.MASTER_KEYS.values()))


class _Corrupt(Exception):
    """A member that does not read as it declares (caught and reported with the path)."""


def _read_member(zf, info, dtype_ok, shape_ok, max_bytes):
    """A .npy member's array, its header checked before its data is read:
    ``dtype_ok(dtype)`` and ``shape_ok(shape)`` must hold and the data must be
    at most ``max_bytes``, exactly what the member's size says."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_NPY_HEADER_LIMIT)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_NPY_HEADER_LIMIT)
        else:
            raise _Corrupt(f"{info.filename}: .npy version {version} is not supported")
        if fortran or dtype.hasobject or not dtype_ok(dtype) or not shape_ok(shape):
            raise _Corrupt(f"{info.filename}: holds {'Fortran-order ' if fortran else ''}"
                           f"{dtype} of shape {shape}, which this model does not need")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > max_bytes:
            raise _Corrupt(f"{info.filename}: declares {nbytes} bytes of data, more than the "
                           f"{max_bytes} it can hold here")
        if info.file_size != f.tell() + nbytes:
            raise _Corrupt(f"{info.filename}: declares {info.file_size} bytes, but its header "
                           f"describes {f.tell() + nbytes}")
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise _Corrupt(f"{info.filename}: truncated")
    return np.frombuffer(data, dtype).reshape(shape).copy()


def read(path, opt):
    """Read a file written by :func:`write` for ``opt`` into a state dict, checked
    against ``opt`` before anything large is read; refuse anything else,
    naming the file."""
    path = os.fspath(path)
    with _paths.open_regular(path) as f:  # a FIFO or a device is refused, not waited on
        try:
            zf = zipfile.ZipFile(f)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable fastadam state file "
                             f"(corrupt or truncated?): {type(e).__name__}: {e}") from None
        try:
            with zf:
                return _read_checked(zf, path, opt)
        except (_Corrupt, OSError, ValueError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            if isinstance(e, FileNotFoundError) or str(e).startswith(f"{path}: "):
                raise
            raise ValueError(f"{path}: not a readable fastadam state file "
                             f"(corrupt or truncated?): {type(e).__name__}: {e}") from None


def _read_checked(zf, path, opt):
    members = {info.filename: info for info in zf.infolist()}
    if "meta.npy" not in members:
        raise ValueError(f"{path}: not a fastadam optimizer state file (no 'meta' member)")
    raw = _read_member(zf, members.pop("meta.npy"), lambda dt: dt.kind == "U",
                       lambda shape: shape == (), MAX_META_BYTES)
    meta = json.loads(str(raw[()]))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fastadam optimizer state file")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: state file version {meta.get('version')!r} is not supported "
                         f"(this fastadam reads version {VERSION})")
    if meta.get("optimizer") != optimizer_kind(opt):
        raise ValueError(f"{path}: saved by {meta.get('optimizer')!r}; this optimizer is "
                         f"{optimizer_kind(opt)!r} (its weight decay would change meaning)")
    mine = _model_signature(opt)
    if meta.get("model") != mine:
        theirs = meta.get("model") if isinstance(meta.get("model"), list) else []
        detail = f"{len(theirs)} parameters saved, {len(mine)} here"
        for k, (a, b) in enumerate(zip(theirs, mine)):
            if a != b:
                detail = (f"params[{k}] was saved as shape {tuple(a[0])} {a[1]}, is "
                          f"{tuple(b[0])} {b[1]} here") if isinstance(a, list) and len(a) == 2 \
                    else f"params[{k}] is described as {a!r}"
                break
        raise ValueError(f"{path}: saved for a different model ({detail})")
    steps, groups = meta.get("steps"), meta.get("param_groups")
    if not isinstance(steps, dict) or not isinstance(groups, list) or not all(
            isinstance(g, dict) for g in groups):
        raise ValueError(f"{path}: its meta has no valid 'steps' and 'param_groups'")
    params = opt._parameters()
    state = {}
    for key, step in steps.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < len(params)):
            raise ValueError(f"{path}: state for parameter {key!r}, which this model does not have")
        index = int(key)
        p = params[index]
        entry = {"step": step}
        for buffer in _rules.STATE_BUFFERS:
            info = members.pop(f"state/{index}/{buffer}.npy", None)
            if info is not None:  # any state storage (converted by load_state_dict)
                entry[buffer] = _read_member(
                    zf, info, lambda dt: dt == p.dtype or (
                        p.dtype != np.float64 and dt in (np.uint16, np.uint8, np.float16, np.float32)),
                    lambda shape: shape == p.shape, max(4, p.itemsize) * p.size)
            info = members.pop(f"state/{index}/{_rules.ABSMAX_KEYS[buffer]}.npy", None)
            if info is not None:
                blocks = _formats.int8_blocks(p.size)
                entry[_rules.ABSMAX_KEYS[buffer]] = _read_member(
                    zf, info, lambda dt: dt == np.float32, lambda shape: shape == (blocks,), 4 * blocks)
        for key, dtype in ((_rules.MASTER_KEYS["split"], np.uint16),
                           (_rules.MASTER_KEYS["float32"], np.float32)):
            info = members.pop(f"state/{index}/{key}.npy", None)
            if info is not None:
                entry[key] = _read_member(zf, info, lambda dt, dtype=dtype: dt == dtype,
                                          lambda shape: shape == p.shape, max(4, p.itemsize) * p.size)
        saved_master = _rules.master_key(p, meta.get("master_weights"))
        if saved_master and saved_master not in entry and len(entry) > 1:
            raise ValueError(f"{path}: state/{index} has no {saved_master!r}: the optimizer that "
                             f"wrote it kept master weights ({meta['master_weights']!r}), so the "
                             "file is incomplete")
        state[index] = entry
    if members:
        raise ValueError(f"{path}: holds members this optimizer does not read: "
                         f"{', '.join(sorted(members)[:5])}")
    groups = [dict(g, betas=tuple(g["betas"]) if isinstance(g.get("betas"), list) else g.get("betas"))
              for g in groups]
    return {"state": state, "param_groups": groups}
