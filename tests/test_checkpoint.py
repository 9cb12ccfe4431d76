"""state_dict / load_state_dict / save / load: bitwise resume, and refusal of what does not fit."""
import os
import stat

import numpy as np
import pytest

import fastadam
from conftest import backend_params
from test_errors import assert_unchanged, snapshot

BACKENDS = backend_params()


def model(rng):
    return [rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(9).astype(np.float32),
            rng.standard_normal(5)]


def make(ps, backend, cls=fastadam.AdamW):
    return cls([{"params": ps[:2], "amsgrad": True}, {"params": ps[2:], "lr": 0.01}],
               backend=backend)


def gradient_stream(rng, ps, n):
    return [[rng.standard_normal(p.shape).astype(p.dtype) for p in ps] for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_resume_is_bitwise_identical(backend, via, rng, tmp_path):
    ps = model(rng)
    grads = gradient_stream(rng, ps, 60)
    straight = [p.copy() for p in ps]
    opt = make(straight, backend)
    for g in grads:
        opt.step(g)

    first = [p.copy() for p in ps]
    opt1 = make(first, backend)
    for g in grads[:25]:
        opt1.step(g)
    if via == "file":
        opt1.save(tmp_path / "opt.npz")
    else:
        sd = opt1.state_dict()
    resumed = [p.copy() for p in first]
    for g in grads[25:30]:  # the first run goes on; the snapshot must not move with it
        opt1.step(g)
    opt2 = make(resumed, backend)
    opt2.param_groups[1]["lr"] = 123.0  # overwritten by the load
    if via == "file":
        opt2.load(tmp_path / "opt.npz")
    else:
        opt2.load_state_dict(sd)
    assert opt2.param_groups[1]["lr"] == 0.01
    for g in grads[25:]:
        opt2.step(g)
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a, b)
    assert opt2.state[0]["step"] == 60


def test_state_dict_structure(rng):
    ps = model(rng)
    opt = make(ps, "numpy")
    assert opt.state_dict()["state"] == {}  # state is created lazily
    opt.step([np.ones_like(p) for p in ps])
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2]
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert set(sd["state"][2]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][1]["step"] == 1
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    assert sd["param_groups"][0]["lr"] == 1e-3 and sd["param_groups"][1]["lr"] == 0.01
    assert sd["state"][0]["exp_avg"] is not opt.state[0]["exp_avg"]  # a snapshot


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, exc, match", [
    ("groups", ValueError, "different number of parameter groups"),
    ("group_size", ValueError, r"param_groups\[0\] has 1 parameters, the optimizer's has 2"),
    ("shape", ValueError, r"state_dict\['state'\]\[1\]\['exp_avg'\]: shape \(10,\) does not match"),
    ("dtype", TypeError, r"state_dict\['state'\]\[2\]\['exp_avg_sq'\]: dtype float32 does not match"),
    ("step", ValueError, r"state_dict\['state'\]\[0\]\['step'\] must be an int from 0 to 2\*\*53 - 1"),
    ("missing", ValueError, r"state_dict\['state'\]\[0\] has no 'exp_avg_sq'"),
    ("index", ValueError, r"state_dict\['state'\] has key 7"),
    ("lr", ValueError, "Invalid learning rate: -0.5"),
    ("not_a_dict", ValueError, "must be a dict with 'state' and 'param_groups'"),
])
def test_load_state_dict_refuses_and_changes_nothing(backend, case, exc, match, rng):
    ps = model(rng)
    opt = make(ps, backend)
    opt.step([np.ones_like(p) for p in ps])
    sd = opt.state_dict()
    if case == "groups":
        sd["param_groups"] = sd["param_groups"][:1]
    elif case == "group_size":
        sd["param_groups"][0]["params"] = [0]
    elif case == "shape":
        sd["state"][1]["exp_avg"] = np.zeros(10, np.float32)
    elif case == "dtype":
        sd["state"][2]["exp_avg_sq"] = sd["state"][2]["exp_avg_sq"].astype(np.float32)
    elif case == "step":
        sd["state"][0]["step"] = -3
    elif case == "missing":
        del sd["state"][0]["exp_avg_sq"]
    elif case == "index":
        sd["state"][7] = sd["state"][0]
    elif case == "lr":
        sd["param_groups"][1]["lr"] = -0.5
    elif case == "not_a_dict":
        sd = [sd]
    for g in sd["param_groups"] if isinstance(sd, dict) else []:
        g.setdefault("lr", 1e-3)
    # Make the valid part of the dict differ from the optimizer, to see that none of it lands.
    if isinstance(sd, dict) and case != "step":
        sd["state"][0]["step"] = 99
    snap = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "empty"])
def test_load_refuses_damaged_file(damage, rng, tmp_path):
    ps = model(rng)
    opt = make(ps, "numpy")
    opt.step([np.ones_like(p) for p in ps])
    path = tmp_path / "opt.npz"
    opt.save(path)
    data = path.read_bytes()
    if damage == "garbage":
        data = bytes(rng.integers(0, 256, 500, dtype=np.uint8))
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":  # a byte inside the first array's data: the CRC catches it
        i = data.index(b"\x93NUMPY") + 200
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    elif damage == "empty":
        data = b""
    path.write_bytes(data)
    opt.step([np.ones_like(p) for p in ps])
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="not a readable fastadam state file"):
        opt.load(path)
    assert_unchanged(opt, snap)


def test_load_refuses_another_models_file(rng, tmp_path):
    ps = model(rng)
    opt = make(ps, "numpy")
    opt.step([np.ones_like(p) for p in ps])
    opt.save(tmp_path / "a.npz")
    other = [np.zeros((6, 4), np.float32), np.zeros(10, np.float32), np.zeros(5)]
    opt_other = make(other, "numpy")
    snap = snapshot(opt_other)
    with pytest.raises(ValueError, match=r"saved for a different model \(params\[1\] was saved as shape \(9,\)"):
        opt_other.load(tmp_path / "a.npz")
    assert_unchanged(opt_other, snap)


def test_load_refuses_plain_npz(tmp_path, rng):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    opt = make(model(rng), "numpy")
    with pytest.raises(ValueError, match=r"x.npz: not a fastadam optimizer state file \(no 'meta'"):
        opt.load(tmp_path / "x.npz")


def test_save_replaces_atomically_and_leaves_no_temporary(rng, tmp_path):
    ps = model(rng)
    opt = make(ps, "numpy")
    path = tmp_path / "opt.npz"
    opt.save(path)
    opt.step([np.ones_like(p) for p in ps])
    opt.save(path)
    assert [f.name for f in tmp_path.iterdir()] == ["opt.npz"]
    fresh = make([p.copy() for p in ps], "numpy")
    fresh.load(path)
    assert fresh.state[0]["step"] == 1


# -- crafted files: checked before anything large is read -------------------------

def _rewrite_member(path, name, payload):
    """Replace one member of the .npz at ``path`` with raw ``payload`` bytes."""
    import zipfile
    with zipfile.ZipFile(path) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    members[name] = payload
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)


def _npy_header(descr, shape):
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("case, match", [
    ("huge_member", r"state/0/exp_avg.npy: holds float32 of shape \(1000000000000,\)"),
    ("short_member", r"state/0/exp_avg.npy: declares .* bytes, but its header describes"),
    ("wrong_dtype", r"state/2/exp_avg_sq.npy: holds float32"),
    ("huge_meta", r"meta.npy: declares 400000000 bytes of data, more than the 67108864"),
    ("object_member", r"state/1/exp_avg.npy: holds"),
    ("extra_member", r"holds members this optimizer does not read: state/9/exp_avg.npy"),
    ("unknown_index", r"state for parameter '9', which this model does not have"),
])
def test_crafted_checkpoint_is_refused_without_allocating(case, match, rng, tmp_path):
    """A file whose members declare sizes or types the model does not need is refused,
    naming the file, before any large allocation (no MemoryError for 10**12 elements)."""
    import json
    import tracemalloc
    import zipfile
    ps = model(rng)
    opt = make(ps, "numpy")
    opt.step([np.ones_like(p) for p in ps])
    path = tmp_path / "crafted.npz"
    opt.save(path)
    if case == "huge_member":
        _rewrite_member(path, "state/0/exp_avg.npy", _npy_header("<f4", (10 ** 12,)) + bytes(64))
    elif case == "short_member":
        _rewrite_member(path, "state/0/exp_avg.npy", _npy_header("<f4", (6, 4)) + bytes(10))
    elif case == "wrong_dtype":
        _rewrite_member(path, "state/2/exp_avg_sq.npy", _npy_header("<f4", (5,)) + bytes(20))
    elif case == "huge_meta":
        _rewrite_member(path, "meta.npy", _npy_header("<U100000000", ()) + bytes(100))
    elif case == "object_member":
        _rewrite_member(path, "state/1/exp_avg.npy", _npy_header("|O", (9,)) + bytes(72))
    elif case == "extra_member":
        _rewrite_member(path, "state/9/exp_avg.npy", _npy_header("<f4", (3,)) + bytes(12))
    elif case == "unknown_index":
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(str(np.load(zf.open("meta.npy"))[()]))
        meta["steps"]["9"] = 1
        import io
        buf = io.BytesIO()
        np.save(buf, np.array(json.dumps(meta)))
        _rewrite_member(path, "meta.npy", buf.getvalue())
    snap = snapshot(opt)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match) as info:
            opt.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert peak < 8 << 20, f"{peak} bytes allocated while refusing"
    assert_unchanged(opt, snap)


def test_adamw_checkpoint_is_refused_by_adam_and_back(rng, tmp_path):
    ps = model(rng)
    adamw = make(ps, "numpy", cls=fastadam.AdamW)
    adamw.step([np.ones_like(p) for p in ps])
    adamw.save(tmp_path / "w.npz")
    adam = make([p.copy() for p in ps], "numpy", cls=fastadam.Adam)
    snap = snapshot(adam)
    with pytest.raises(ValueError, match=r"w.npz: saved by 'AdamW'; this optimizer is 'Adam'"):
        adam.load(tmp_path / "w.npz")
    assert_unchanged(adam, snap)
    with pytest.raises(ValueError, match=r"param_groups\[0\] was saved by AdamW; this optimizer is Adam"):
        adam.load_state_dict(adamw.state_dict())
    assert_unchanged(adam, snap)
    adam.save(tmp_path / "a.npz")
    with pytest.raises(ValueError, match=r"a.npz: saved by 'Adam'; this optimizer is 'AdamW'"):
        adamw.load(tmp_path / "a.npz")


def test_torch_state_dict_marks_the_optimizer_kind(rng):
    """state_dict's groups carry torch's decoupled_weight_decay key; loading strips it."""
    ps = model(rng)
    opt = make(ps, "numpy", cls=fastadam.AdamW)
    sd = opt.state_dict()
    assert all(g["decoupled_weight_decay"] is True for g in sd["param_groups"])
    opt.load_state_dict(sd)
    assert all("decoupled_weight_decay" not in g for g in opt.param_groups)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_saved_checkpoint_gets_the_permissions_the_umask_gives(tmp_path, umask):
    """As every file open() creates, and as np.save's (the oracle): mode 0o666 less the umask,
    whether the file is new or replaces one."""
    opt = fastadam.Adam([np.ones(5, np.float32)])
    opt.step([np.ones(5, np.float32)])
    previous = os.umask(umask)
    try:
        np.save(tmp_path / "oracle.npy", np.ones(3))
        opt.save(tmp_path / "opt.npz")
        new_mode = stat.S_IMODE(os.stat(tmp_path / "opt.npz").st_mode)
        opt.save(tmp_path / "opt.npz")  # replacing it
        replaced_mode = stat.S_IMODE(os.stat(tmp_path / "opt.npz").st_mode)
    finally:
        os.umask(previous)
    expected = stat.S_IMODE(os.stat(tmp_path / "oracle.npy").st_mode)
    assert expected == 0o666 & ~umask
    assert new_mode == replaced_mode == expected, (oct(new_mode), oct(replaced_mode), oct(expected))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
