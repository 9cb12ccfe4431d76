"""fastadam.torch with state_dtype="bfloat16": fastadam's bfloat16 step on torch's memory,
checked against the NumPy reference, and checkpoints checked against torch's own conversions."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastadam  # noqa: E402
import fastadam.torch as ft  # noqa: E402

if fastadam._backends.available()["cython"]:
    pytest.skip("the compiled kernel is not built", allow_module_level=True)

SHAPES = [(300, 70), (70,), (5000,)]  # tensors on and off the 32-element vector boundary


def parameters(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def gradients(steps, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


def groups(params):
    """Two groups: AMSGrad in the first, its own weight decay in the second."""
    return [{"params": params[:2], "amsgrad": True}, {"params": params[2:], "weight_decay": 0.1}]


def torch_params(arrays):
    return [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()


def bits(t):
    """A bfloat16 tensor's bits, as fastadam stores bfloat16 state."""
    assert t.dtype == torch.bfloat16
    return t.view(torch.int16).numpy().view(np.uint16)


def state_keys(k):
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if k < 2 else ())


def assert_same_as_reference(params, opt, ref_params, ref):
    """Parameters and state bits of fastadam.torch equal to the NumPy reference's."""
    for k, p in enumerate(params):
        np.testing.assert_array_equal(p.detach().numpy(), ref_params[k])
        for key in state_keys(k):
            np.testing.assert_array_equal(bits(opt.state[p][key]), ref.state[k][key])


def test_the_step_is_fastadams_bfloat16_step_on_the_same_memory():
    params = torch_params(parameters())
    opt = ft.AdamW(groups(params), lr=1e-2, state_dtype="bfloat16", seed=7)
    ref_params = parameters()
    ref = fastadam.AdamW(groups(ref_params), lr=1e-2, state_dtype="bfloat16", seed=7, backend="numpy")
    grads = gradients(6)
    run(opt, params, grads)
    for step_grads in grads:
        ref.step(step_grads)
    assert_same_as_reference(params, opt, ref_params, ref)
    assert all(opt.state[p]["step"].item() == 6.0 for p in params)


def test_state_is_half_the_bytes_of_float32_state():
    params = torch_params(parameters())
    opt = ft.Adam(params, state_dtype="bfloat16")
    run(opt, params, gradients(1))
    for p in params:
        st = opt.state[p]
        assert st["exp_avg"].element_size() == 2 and st["exp_avg"].shape == p.shape
        assert st["exp_avg_sq"].dtype == torch.bfloat16


def test_a_bfloat16_checkpoint_loads_into_torch_as_exact_float32_state():
    params = torch_params(parameters())
    opt = ft.AdamW(groups(params), lr=1e-2, state_dtype="bfloat16")
    run(opt, params, gradients(3))
    theirs_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(groups(theirs_params), lr=1e-2, foreach=False)
    theirs.load_state_dict(opt.state_dict())
    for k, (p, q) in enumerate(zip(params, theirs_params)):
        for key in state_keys(k):
            loaded = theirs.state[q][key]
            assert loaded.dtype == torch.float32
            np.testing.assert_array_equal(loaded.numpy(), opt.state[p][key].float().numpy())
    run(theirs, theirs_params, gradients(1, seed=2))  # torch goes on from it
    assert all(torch.isfinite(q).all() for q in theirs_params)


def test_a_float32_checkpoint_is_rounded_to_nearest_and_training_goes_on_as_fastadams():
    theirs_params = torch_params(parameters())
    theirs = torch.optim.AdamW(groups(theirs_params), lr=1e-2, foreach=False)
    run(theirs, theirs_params, gradients(3))
    sd = theirs.state_dict()

    params = [torch.nn.Parameter(q.detach().clone()) for q in theirs_params]
    opt = ft.AdamW(groups(params), lr=1e-2, state_dtype="bfloat16", seed=3)
    opt.load_state_dict(sd)
    for k, (p, q) in enumerate(zip(params, theirs_params)):
        for key in state_keys(k):  # torch's own float32 -> bfloat16 rounds to nearest even
            np.testing.assert_array_equal(bits(opt.state[p][key]),
                                          bits(theirs.state[q][key].to(torch.bfloat16)))

    ref_params = [q.detach().numpy().copy() for q in theirs_params]
    ref = fastadam.AdamW(groups(ref_params), lr=1e-2, state_dtype="bfloat16", seed=3, backend="numpy")
    ref.load_state_dict({
        "state": {k: {"step": int(theirs.state[q]["step"].item()),
                      **{key: theirs.state[q][key].numpy().copy() for key in state_keys(k)}}
                  for k, q in enumerate(theirs_params)},
        "param_groups": ref.state_dict()["param_groups"]})
    more = gradients(3, seed=4)
    run(opt, params, more)
    for step_grads in more:
        ref.step(step_grads)
    assert_same_as_reference(params, opt, ref_params, ref)


def test_a_resumed_run_is_the_uninterrupted_run_bit_for_bit():
    grads = gradients(5)
    params = torch_params(parameters())
    opt = ft.AdamW(groups(params), lr=1e-2, state_dtype="bfloat16", seed=11)
    run(opt, params, grads)

    resumed_params = torch_params(parameters())
    first = ft.AdamW(groups(resumed_params), lr=1e-2, state_dtype="bfloat16", seed=11)
    run(first, resumed_params, grads[:2])
    sd = copy.deepcopy(first.state_dict())
    second = ft.AdamW(groups(resumed_params), lr=1e-2, state_dtype="bfloat16", seed=11)
    second.load_state_dict(sd)
    run(second, resumed_params, grads[2:])
    for k, (p, q) in enumerate(zip(params, resumed_params)):
        np.testing.assert_array_equal(q.detach().numpy(), p.detach().numpy())
        for key in state_keys(k):
            np.testing.assert_array_equal(bits(second.state[q][key]), bits(opt.state[p][key]))


@pytest.mark.parametrize("state_dtype, match", [("int8", "8-bit codes are not moments"),
                                                ("float16", "state_dtype must be one of")])
def test_other_state_dtypes_are_refused_saying_why(state_dtype, match):
    with pytest.raises(ValueError, match=match):
        ft.Adam(torch_params(parameters()), state_dtype=state_dtype)


def test_float64_parameters_are_refused_with_bfloat16_state():
    p = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"params'\]\[0\]: state_dtype='bfloat16' needs float32 "
                                           r"parameters, got float64"):
        ft.Adam([p], state_dtype="bfloat16")


@pytest.mark.parametrize("replacement, match", [
    (lambda t: t.float(), r"has dtype torch.float32; with state_dtype='bfloat16' it must be torch.bfloat16"),
    (lambda t: t[:-1].clone(), r"has shape"),
    (lambda t: torch.zeros(t.shape[::-1], dtype=torch.bfloat16).t(), r"must be a dense, contiguous CPU tensor"),
    (lambda t: torch._neg_view(t.clone()), r"must be a dense, contiguous CPU tensor \(not a lazily negated"),
])
def test_an_unfit_state_tensor_is_refused_and_nothing_changes(replacement, match):
    params = torch_params(parameters())
    opt = ft.Adam(params, state_dtype="bfloat16")
    run(opt, params, gradients(2))
    p = params[0]
    opt.state[p]["exp_avg"] = replacement(opt.state[p]["exp_avg"])
    before = [q.detach().clone() for q in params]
    state_before = copy.deepcopy({id(q): dict(opt.state[q]) for q in params})
    for q, g in zip(params, gradients(1, seed=5)[0]):
        q.grad = torch.from_numpy(g)
    with pytest.raises(RuntimeError, match=r"state\[p\]\['exp_avg'\] of param_groups\[0\]\['params'\]\[0\] "
                                           + match):
        opt.step()
    for q, b in zip(params, before):
        assert torch.equal(q.detach(), b)
    for q in params:
        for key, t in state_before[id(q)].items():
            assert torch.equal(opt.state[q][key], t)
