"""fastadam.torch's planned step (src/_torch_plan.pxi): after the first step it checks the
step's tensors once, in torch's terms, and runs the kernel on their memory.  Oracle:
fastadam.Adam (the NumPy API) over copies of the same values, bit for bit."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastadam  # noqa: E402
import fastadam.torch as ft  # noqa: E402

if fastadam._backends.available()["cython"]:
    pytest.skip("the compiled kernel is not built", allow_module_level=True)

ml_dtypes = pytest.importorskip("ml_dtypes")

CONFIGS = {
    "float32": (torch.float32, {}),
    "flags-l2": (torch.float32, dict(weight_decay=0.1, amsgrad=True, maximize=True)),
    "bf16-state": (torch.float32, dict(state_dtype="bfloat16", seed=5)),
    "bf16-nearest": (torch.bfloat16, {}),
    "bf16-stochastic": (torch.bfloat16, dict(param_rounding="stochastic", seed=2)),
    "bf16-split": (torch.bfloat16, dict(master_weights="split")),
    "f16-master": (torch.float16, dict(master_weights="float32")),
    "float64": (torch.float64, {}),
}
NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
         torch.bfloat16: ml_dtypes.bfloat16}
SHAPES = [(33, 7), (130,), (5, 2, 3)]


def bits(t):
    """A tensor's or array's bits, for exact comparison."""
    a = t.detach().view(torch.int16 if t.element_size() == 2 else t.dtype).numpy() \
        if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(a).view(np.uint8)


def pair(dtype, options, rng, cls=("AdamW", "AdamW")):
    """fastadam.torch and fastadam.Adam over copies of the same values: two groups."""
    values = [rng.standard_normal(s).astype(np.float32).astype(NUMPY[dtype]) for s in SHAPES]
    params = [torch.nn.Parameter(torch.from_numpy(v.copy()).view(dtype) if dtype != torch.bfloat16
                                 else torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16))
              for v in values]
    arrays = [v.copy() for v in values]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.02}]  # noqa: E731
    kw = dict(lr=1e-2, **options)
    ours = getattr(ft, cls[0])(groups(params), **kw)
    oracle = getattr(fastadam, cls[1])(groups(arrays), **kw)
    return params, ours, arrays, oracle


def set_gradients(params, arrays, rng):
    grads = []
    for p, a in zip(params, arrays):
        g = rng.standard_normal(a.shape).astype(np.float32).astype(a.dtype)
        p.grad = (torch.from_numpy(g.view(np.int16).copy()).view(torch.bfloat16)
                  if p.dtype == torch.bfloat16 else torch.from_numpy(g.copy()))
        grads.append(g)
    return grads


def assert_same(params, ours, arrays, oracle):
    for k, (p, a) in enumerate(zip(params, arrays)):
        assert np.array_equal(bits(p), bits(a)), f"parameter {k}"
        mine, theirs = ours.state[p], oracle.state[k]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master", "master_low"):
            if key in theirs:
                assert np.array_equal(bits(mine[key]), bits(theirs[key])), f"{key} of {k}"
        assert mine["step"].item() == theirs["step"]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_planned_steps_give_the_numpy_apis_bits_without_the_inner_optimizers_step(config, rng):
    dtype, options = CONFIGS[config]
    params, ours, arrays, oracle = pair(dtype, options, rng)
    oracle.step(set_gradients(params, arrays, rng))
    ours.step()  # the first: through the inner fastadam.Adam, which builds its plan
    inner_steps = []
    inner = ours._plan.inner
    step = inner.step
    inner.step = lambda grads: (inner_steps.append(1), step(grads))[1]
    for _ in range(6):
        oracle.step(set_gradients(params, arrays, rng))
        ours.step()
    assert inner_steps == []  # each later step checked once, by the plan, and run on its kernel
    assert_same(params, ours, arrays, oracle)


@pytest.mark.parametrize("make_bad", [
    lambda p, opt: opt.state[p]["exp_avg"],  # the gradient is the state the kernel writes
    lambda p, opt: p.detach(),               # the gradient is the parameter itself
    lambda p, opt: torch.frombuffer(memoryview(bytearray(p.numel() * 4 + 4))[1:p.numel() * 4 + 1],
                                    dtype=torch.float32).view(p.shape),  # misaligned
], ids=["aliases-state", "aliases-param", "misaligned"])
def test_a_gradient_the_kernel_cannot_read_safely_is_refused_and_nothing_changes(make_bad, rng):
    params, ours, arrays, oracle = pair(torch.float32, {}, rng)
    for _ in range(3):
        oracle.step(set_gradients(params, arrays, rng))
        ours.step()
    grads = set_gradients(params, arrays, rng)
    params[1].grad = make_bad(params[1], ours)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        ours.step()
    assert_same(params, ours, arrays, oracle)  # as the oracle, which never saw the bad step
    params[1].grad = torch.from_numpy(grads[1].copy())
    oracle.step(grads)
    ours.step()
    assert_same(params, ours, arrays, oracle)


def test_hyperparameters_changed_between_planned_steps_are_read_each_step(rng):
    """Floats set by a schedule, a tensor lr changed in place, betas as a list and eps as an
    int: each planned step takes this step's values (the oracle is told the same floats)."""
    params, ours, arrays, oracle = pair(torch.float32, {}, rng, cls=("Adam", "Adam"))
    lr = torch.tensor(0.02)
    for k in range(8):
        if k == 3:
            ours.param_groups[0]["lr"] = lr
        if k >= 3:
            lr.mul_(0.5)
            oracle.param_groups[0]["lr"] = float(lr)
        if k == 5:
            for opt in (ours, oracle):
                opt.param_groups[1]["betas"] = [0.8, 0.95]
                opt.param_groups[1]["eps"] = 0
                opt.param_groups[1]["maximize"] = True
        oracle.step(set_gradients(params, arrays, rng))
        ours.step()
        assert_same(params, ours, arrays, oracle)


@pytest.mark.parametrize("key, value, match", [
    ("lr", float("nan"), "Invalid learning rate: nan"),
    ("lr", -1e-3, "Invalid learning rate"),
    ("betas", (0.9, 1.0), "Invalid beta parameter at index 1"),
    ("weight_decay", -0.5, "Invalid weight_decay value"),
    ("maximize", 1, "maximize"),
])
def test_a_bad_hyperparameter_set_after_the_plan_is_named_and_nothing_changes(key, value, match, rng):
    params, ours, arrays, oracle = pair(torch.float32, {}, rng)
    for _ in range(2):
        oracle.step(set_gradients(params, arrays, rng))
        ours.step()
    set_gradients(params, arrays, rng)
    ours.param_groups[1][key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        ours.step()
    assert_same(params, ours, arrays, oracle)
