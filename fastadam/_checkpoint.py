"""state_dict / load_state_dict and the .npz checkpoint file.

Loading checks everything first and changes the optimizer only when all of it
fits, so a bad state dict or file leaves the optimizer exactly as it was.
"""
import json
import numbers
import os
import tempfile
import zipfile

import numpy as np

from . import _optimizer

FORMAT = "fastadam-optimizer-state"
VERSION = 1
_BUFFERS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_state_entry(entry, param, where, amsgrad, live=True):
    """Check one parameter's state against the parameter; ``where`` names it."""
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
    step = entry.get("step")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"{where}['step'] must be a non-negative int, got {step!r}")
    for key in _BUFFERS[:3 if amsgrad else 2]:
        if key not in entry:
            raise ValueError(f"{where} has no {key!r}")
        a = entry[key]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{where}[{key!r}] must be a numpy.ndarray, got {type(a).__name__}")
        if a.dtype != param.dtype:
            raise TypeError(f"{where}[{key!r}]: dtype {a.dtype} does not match the parameter's "
                            f"dtype {param.dtype}")
        if a.shape != param.shape:
            raise ValueError(f"{where}[{key!r}]: shape {a.shape} does not match the parameter's "
                             f"shape {param.shape}")
        if live and not (a.flags.c_contiguous and a.flags.aligned and a.flags.writeable
                         and a.dtype.isnative):
            raise ValueError(f"{where}[{key!r}] must be a writeable, C-contiguous, native array")


def state_dict(opt):
    """A snapshot in torch's structure (arrays copied, groups list parameter indices)."""
    groups, k = [], 0
    for group in opt.param_groups:
        saved = {key: value for key, value in group.items() if key != "params"}
        saved["betas"] = tuple(saved["betas"])
        saved["params"] = list(range(k, k + len(group["params"])))
        k += len(group["params"])
        groups.append(saved)
    state = {
        index: {key: (value.copy() if isinstance(value, np.ndarray) else value)
                for key, value in entry.items()}
        for index, entry in sorted(opt.state.items())
    }
    return {"state": state, "param_groups": groups}


def load_state_dict(opt, sd):
    """Check ``sd`` against ``opt`` completely, then restore it (arrays copied in)."""
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
    saved_groups, saved_state = sd["param_groups"], sd["state"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups "
                         f"({len(saved_groups)}) than the optimizer ({len(opt.param_groups)})")
    params = opt._parameters()
    new_groups = []
    for i, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(f"loaded state dict's param_groups[{i}] has "
                             f"{len(saved.get('params', ()))} parameters, the optimizer's has "
                             f"{len(group['params'])}")
        merged = dict(group)
        merged.update({key: value for key, value in saved.items() if key != "params"})
        _optimizer.check_hyperparameters(merged, f" (state_dict param_groups[{i}])")
        new_groups.append(merged)
    if not isinstance(saved_state, dict):
        raise TypeError("state_dict['state'] must be a dict")
    new_state = {}
    for index, entry in saved_state.items():
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not (
                0 <= index < len(params)):
            raise ValueError(f"state_dict['state'] has key {index!r}; expected parameter "
                             f"indices 0..{len(params) - 1}")
        where = f"state_dict['state'][{index}]"
        check_state_entry(entry, params[index], where, amsgrad="max_exp_avg_sq" in entry,
                          live=False)
        new_state[int(index)] = {
            key: (np.array(value, order="C", copy=True) if key in _BUFFERS else value)
            for key, value in entry.items()
        }
        new_state[int(index)]["step"] = int(entry["step"])
    # All checked: commit.
    for group, merged in zip(opt.param_groups, new_groups):
        group.update(merged)
    opt.state.clear()
    opt.state.update(new_state)


def _model_signature(opt):
    return [[list(p.shape), p.dtype.str] for p in opt._parameters()]


def save(opt, path):
    """Write ``opt``'s state to ``path`` as .npz: a temporary file, fsync, rename."""
    sd = state_dict(opt)
    arrays = {}
    steps = {}
    for index, entry in sd["state"].items():
        steps[str(index)] = entry["step"]
        for key in _BUFFERS:
            if key in entry:
                arrays[f"state/{index}/{key}"] = entry[key]
    meta = {
        "format": FORMAT, "version": VERSION, "optimizer": type(opt).__name__,
        "model": _model_signature(opt), "steps": steps,
        "param_groups": [{k: v for k, v in g.items()} for g in sd["param_groups"]],
    }
    arrays["meta"] = np.array(json.dumps(meta))
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastadam-", suffix=".npz.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
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


def load(opt, path):
    """Read a file written by :func:`save` into ``opt``; refuse anything else."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            contents = {name: f[name] for name in f.files}
        meta = json.loads(str(contents.pop("meta")[()]))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable fastadam state file "
                         f"(corrupt or truncated?): {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fastadam optimizer state file")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: state file version {meta.get('version')} is not supported "
                         f"(this fastadam reads version {VERSION})")
    mine = _model_signature(opt)
    if meta.get("model") != mine:
        theirs = meta.get("model") or []
        detail = f"{len(theirs)} parameters saved, {len(mine)} here"
        for k, (a, b) in enumerate(zip(theirs, mine)):
            if a != b:
                detail = f"params[{k}] was saved as shape {tuple(a[0])} {a[1]}, is {tuple(b[0])} {b[1]} here"
                break
        raise ValueError(f"{path}: saved for a different model ({detail})")
    state = {}
    for index, step in meta["steps"].items():
        entry = {"step": step}
        for key in _BUFFERS:
            name = f"state/{index}/{key}"
            if name in contents:
                entry[key] = contents[name]
        state[int(index)] = entry
    groups = [dict(g, betas=tuple(g["betas"])) for g in meta["param_groups"]]
    load_state_dict(opt, {"state": state, "param_groups": groups})
