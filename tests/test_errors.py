"""Bad input: a clear error naming the argument, and nothing changed."""
import copy
import math

import numpy as np
import pytest

import fastadam
from conftest import backend_params

BACKENDS = backend_params()


def snapshot(opt):
    params = [p.copy() for g in opt.param_groups for p in g["params"]]
    return params, copy.deepcopy(opt.state), copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def assert_unchanged(opt, snap):
    params, state, groups = snap
    now = [p for g in opt.param_groups for p in g["params"]]
    assert len(now) == len(params)
    for a, b in zip(now, params):
        np.testing.assert_array_equal(a, b)
    assert state.keys() == opt.state.keys()
    for k in state:
        assert state[k].keys() == opt.state[k].keys()
        for key, value in state[k].items():
            np.testing.assert_array_equal(opt.state[k][key], value)
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def trained(backend, rng, **kw):
    """An optimizer over three arrays with two steps of state."""
    ps = [rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal(7).astype(np.float32),
          rng.standard_normal(3)]
    opt = fastadam.Adam(ps, backend=backend, **kw)
    for _ in range(2):
        opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in ps])
    return opt, ps


def good_grads(ps):
    return [np.ones_like(p) for p in ps]


# -- hyperparameters: torch's messages ----------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(lr=math.nan), "Invalid learning rate: nan"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0: -0.1"),
    (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (dict(betas=(0.9, math.nan)), "Invalid beta parameter at index 1: nan"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
])
@pytest.mark.parametrize("cls", [fastadam.Adam, fastadam.AdamW])
def test_invalid_hyperparameters_use_torch_messages(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls([np.zeros(3)], backend="numpy", **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr="0.1"), "lr must be a real number"),
    (dict(betas=0.9), "betas must be a pair"),
    (dict(betas=(0.9, 0.99, 0.999)), "betas must be a pair"),
    (dict(amsgrad=1), "amsgrad must be True or False"),
    (dict(maximize=None), "maximize must be True or False"),
    (dict(num_threads=0), "num_threads must be None or a positive int"),
    (dict(num_threads=2.0), "num_threads must be None or a positive int"),
    (dict(backend="fortran"), "backend must be one of"),
])
def test_invalid_argument_types(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fastadam.Adam([np.zeros(3)], **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key, value, message", [
    ("lr", -1.0, r"Invalid learning rate: -1.0 \(param_groups\[1\]\)"),
    ("eps", math.nan, r"Invalid epsilon value: nan \(param_groups\[1\]\)"),
    ("betas", (0.9, 1.5), r"Invalid beta parameter at index 1: 1.5 \(param_groups\[1\]\)"),
    ("weight_decay", -1, r"Invalid weight_decay value: -1.0 \(param_groups\[1\]\)"),
    ("amsgrad", "yes", r"amsgrad must be True or False, got 'yes' \(param_groups\[1\]\)"),
    ("lr", None, r"lr must be a real number, got None \(param_groups\[1\]\)"),
])
def test_invalid_hyperparameter_set_between_steps(backend, key, value, message, rng):
    ps = [rng.standard_normal(5), rng.standard_normal(6)]
    opt = fastadam.Adam([{"params": ps[:1]}, {"params": ps[1:]}], backend=backend)
    opt.step(good_grads(ps))
    snap = snapshot(opt)
    opt.param_groups[1][key] = value
    with pytest.raises((ValueError, TypeError), match=message):
        opt.step(good_grads(ps))
    opt.param_groups[1][key] = snap[2][1][key]
    assert_unchanged(opt, snap)


# -- parameters ---------------------------------------------------------------

@pytest.mark.parametrize("params, exc, match", [
    ([np.zeros(3, np.complex64)], TypeError, r"param_groups\[0\]\['params'\]\[0\]: dtype complex64 is not supported"),
    ([np.zeros(3, np.int64)], TypeError, "dtype int64 is not supported"),
    ([np.zeros(3, ">f4")], TypeError, "is not supported"),
    ([np.zeros((4, 4))[:, 1]], ValueError, r"\['params'\]\[0\] is not C-contiguous"),
    ([np.zeros((4, 4)).T], ValueError, "is not C-contiguous"),
    ([[0.0, 1.0]], TypeError, "expected a numpy.ndarray, got builtins.list"),
    ([np.zeros(3), 5.0], TypeError, r"\['params'\]\[1\]: expected a numpy.ndarray"),
    ([], ValueError, "optimizer got an empty parameter list"),
])
def test_bad_parameters(params, exc, match):
    with pytest.raises(exc, match=match):
        fastadam.Adam(params, backend="numpy")


def test_read_only_parameter():
    p = np.zeros(3)
    p.setflags(write=False)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] is read-only"):
        fastadam.Adam([p])


def test_single_array_instead_of_list():
    with pytest.raises(TypeError, match="should be a list of arrays or dicts, but got numpy.ndarray"):
        fastadam.Adam(np.zeros(3))


def test_same_array_twice():
    p = np.zeros(3)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        fastadam.Adam([p, p])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        fastadam.Adam([{"params": [p]}, {"params": [p]}])


def test_overlapping_views():
    base = np.zeros(100)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        fastadam.Adam([base[:60], base[50:]])
    fastadam.Adam([base[:50], base[50:]])  # disjoint views of one buffer are fine


def test_add_param_group_overlapping_is_refused_and_nothing_added():
    base = np.zeros(100)
    opt = fastadam.Adam([base[:60]])
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [base[59:]]})
    assert len(opt.param_groups) == 1


# -- gradients ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, exc, match", [
    ("too_few", ValueError, "grads has 2 arrays but the optimizer has 3 parameters"),
    ("too_many", ValueError, "grads has 4 arrays but the optimizer has 3 parameters"),
    ("shape", ValueError, r"grads\[1\]: shape \(8,\) does not match params\[1\] shape \(7,\)"),
    ("dtype", TypeError, r"grads\[2\]: dtype float32 does not match params\[2\] dtype float64"),
    ("noncontiguous", ValueError, r"grads\[0\] is not C-contiguous"),
    ("list", TypeError, r"grads\[1\]: expected a numpy.ndarray, got builtins.list"),
    ("ndarray", TypeError, "grads must be a list or tuple of arrays"),
    ("generator", TypeError, "grads must be a list or tuple of arrays"),
    ("aliases_param", ValueError, r"grads\[0\] shares memory with a parameter"),
    ("aliases_state", ValueError, r"grads\[1\] shares memory with a parameter or the optimizer state"),
])
def test_bad_gradients_change_nothing(backend, case, exc, match, rng):
    opt, ps = trained(backend, rng)
    grads = good_grads(ps)
    if case == "too_few":
        grads = grads[:2]
    elif case == "too_many":
        grads = grads + [np.ones(3)]
    elif case == "shape":
        grads[1] = np.ones(8, np.float32)
    elif case == "dtype":
        grads[2] = np.ones(3, np.float32)
    elif case == "noncontiguous":
        grads[0] = np.ones((5, 4), np.float32).T
    elif case == "list":
        grads[1] = [1.0] * 7
    elif case == "ndarray":
        grads = np.ones(3)
    elif case == "generator":
        grads = (g for g in grads)
    elif case == "aliases_param":
        grads[0] = ps[0]
    elif case == "aliases_state":
        grads[1] = opt.state[1]["exp_avg"]
    snap = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.step(grads)
    assert_unchanged(opt, snap)
    opt.step(good_grads(ps))  # still usable afterwards
    assert opt.state[0]["step"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_replaced_with_wrong_shape_is_refused(backend, rng):
    opt, ps = trained(backend, rng)
    opt.state[1]["exp_avg_sq"] = np.zeros(9, np.float32)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg_sq'\]: shape \(9,\) does not match"):
        opt.step(good_grads(ps))
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_appended_to_group_is_checked(backend, rng):
    opt, ps = trained(backend, rng)
    other = np.zeros(4, np.int32)
    opt.param_groups[0]["params"].append(other)
    snap_params = [p.copy() for p in ps]
    with pytest.raises(TypeError, match=r"params\[3\]: dtype int32 is not supported"):
        opt.step(good_grads(ps) + [np.zeros(4, np.int32)])
    for a, b in zip(ps, snap_params):
        np.testing.assert_array_equal(a, b)
