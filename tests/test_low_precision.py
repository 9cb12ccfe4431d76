"""bfloat16 and float16 parameters (fastadam.Adam over NumPy arrays): the compiled kernel
against the NumPy reference bit for bit, master weights against a float32 run, stochastic
rounding against stagnation, and what is refused."""
import numpy as np
import pytest

import fastadam
from fastadam import _backends, _formats, _reference

from conftest import on_every_isa

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
KERNEL = _backends.compiled_or_none()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the compiled extension is not built")


def mixed_scale(rng, n, dtype):
    """Gradients from 1e-4 to 1e2: within float16's range, with some squares beyond it."""
    return (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 2, n)).astype(np.float32).astype(dtype)


def bits(a):
    """An array's bytes, NaNs made one pattern (rounding keeps a NaN a NaN, not its payload)."""
    a = np.asarray(a)
    out = a.view(np.uint8).reshape(a.size, -1).copy() if a.size else a.view(np.uint8)
    if a.dtype.kind in "fV" or a.dtype == BF16:
        nan = np.isnan(a.astype(np.float32)).reshape(-1)
        out[nan] = 0xFF
    return out


def run(backend, dtype, steps=4, n=3000, grad_dtype=None, num_threads=1, seed=7, **options):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(np.float32).astype(dtype),
              rng.standard_normal((7, 9)).astype(np.float32).astype(dtype)]
    opt = fastadam.Adam(params, lr=3e-3, backend=backend, num_threads=num_threads, **options)
    for _ in range(steps):
        opt.step([mixed_scale(rng, p.size, grad_dtype or dtype).reshape(p.shape) for p in params])
    return params, opt


MODES = [
    pytest.param(BF16, {}, id="bf16"),
    pytest.param(F16, {}, id="f16"),
    pytest.param(BF16, dict(param_rounding="stochastic", seed=3), id="bf16-stochastic"),
    pytest.param(BF16, dict(master_weights="split"), id="bf16-split"),
    pytest.param(BF16, dict(master_weights="split", state_dtype="bfloat16"), id="bf16-split-bf16state"),
    pytest.param(BF16, dict(master_weights="float32"), id="bf16-master"),
    pytest.param(F16, dict(master_weights="float32"), id="f16-master"),
    pytest.param(F16, dict(master_weights="float32", state_dtype="bfloat16"), id="f16-master-bf16state"),
    pytest.param(BF16, dict(grad_dtype=np.float32), id="bf16-f32grads"),
    pytest.param(F16, dict(grad_dtype=np.float32), id="f16-f32grads"),
    pytest.param(np.dtype(np.float32), dict(grad_dtype=BF16), id="f32-bf16grads"),
    pytest.param(np.dtype(np.float32), dict(grad_dtype=BF16, state_dtype="int8", ), id="f32-bf16grads-int8"),
]
VARIANTS = [dict(), dict(amsgrad=True), dict(maximize=True), dict(weight_decay=0.1),
            dict(weight_decay=0.1, amsgrad=True, maximize=True)]


def assert_same_run(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(bits(x), bits(y))
    for k in oa.state:
        assert oa.state[k].keys() == ob.state[k].keys()
        for key, value in oa.state[k].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(bits(value), bits(ob.state[k][key]), err_msg=key)


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype, options", MODES)
def test_the_kernel_is_the_reference_bit_for_bit(dtype, options, variant):
    options = dict(options, **variant)
    if options.get("state_dtype") == "int8":
        options.update(n=5000)
    assert_same_run(run("cython", dtype, **options), run("numpy", dtype, **options))


@needs_kernel
@pytest.mark.parametrize("dtype, options", [MODES[0], MODES[1], MODES[2], MODES[3], MODES[6]])
def test_every_instruction_set_and_thread_count_gives_the_same_bits(dtype, options):
    """The baseline converts float16 in software (libgcc), AVX2 and AVX-512 with F16C;
    threads split the tensors at other places."""
    expected = run("numpy", dtype, n=70000, **options)
    for threads in (1, 2):
        for result in on_every_isa(KERNEL, lambda: run("cython", dtype, n=70000, num_threads=threads,
                                                       **options)).values():
            assert_same_run(result, expected)


def test_the_float16_rounding_is_ieee_round_to_nearest_even():
    """The reference's conversions are exact NumPy/ml_dtypes ones, checked on the edges."""
    x = np.array([65504.0, 65520.0, 1e-8, 2.0 ** -25, 2.0 ** -24 * 1.5, 1 + 2.0 ** -11], np.float32)
    np.testing.assert_array_equal(_formats.round_nearest(x, F16),
                                  np.array([65504, np.inf, 0, 0, 2.0 ** -23, 1], np.float16))
    y = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -0.0], np.float32)
    np.testing.assert_array_equal(_formats.round_nearest(y, BF16).astype(np.float32),
                                  np.array([1, 1 + 2.0 ** -6, -0.0], np.float32))


@pytest.mark.parametrize("backend", ["cython", "numpy"] if KERNEL else ["numpy"])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_split_master_weights_are_a_float32_run_bit_for_bit(backend, state_dtype, variant):
    """The float32 master rebuilt from the bfloat16 parameter and the state's trailing
    bits equals, bit for bit, the parameter of a float32 run fed the same gradients."""
    rng = np.random.default_rng(5)
    start = rng.standard_normal(4000).astype(np.float32).astype(BF16)
    p16, p32 = start.copy(), start.astype(np.float32)
    split = fastadam.Adam([p16], lr=1e-3, backend=backend, master_weights="split",
                          state_dtype=state_dtype, **variant)
    plain = fastadam.Adam([p32], lr=1e-3, backend=backend, state_dtype=state_dtype, **variant)
    for _ in range(20):
        g = mixed_scale(rng, 4000, BF16)
        split.step([g])
        plain.step([g.astype(np.float32)])
    master = _formats.split_master(p16, split.state[0]["master_low"])
    np.testing.assert_array_equal(master.view(np.uint32), p32.view(np.uint32))
    np.testing.assert_array_equal(p16.view(np.uint16), (p32.view(np.uint32) >> 16).astype(np.uint16))
    for key in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(split.state[0][key], plain.state[0][key])
    assert split.state_nbytes() == plain.state_nbytes() + 2 * 4000


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_float32_master_weights_are_a_float32_run_and_the_parameter_its_rounding(dtype):
    rng = np.random.default_rng(6)
    start = rng.standard_normal(3000).astype(np.float32).astype(dtype)
    p, p32 = start.copy(), start.astype(np.float32)
    opt = fastadam.Adam([p], lr=1e-3, master_weights="float32", weight_decay=0.01)
    ref = fastadam.Adam([p32], lr=1e-3, weight_decay=0.01)
    for _ in range(10):
        g = mixed_scale(rng, 3000, dtype)
        opt.step([g])
        ref.step([g.astype(np.float32)])
    np.testing.assert_array_equal(opt.state[0]["master"].view(np.uint32), p32.view(np.uint32))
    np.testing.assert_array_equal(bits(p), bits(_formats.round_nearest(p32, dtype)))


def drift(dtype, rounding, steps=400, n=20000, seed=1):
    """Weights near 1, a constant gradient and a small lr: each step moves p by ~lr,
    a tenth of bfloat16's spacing at 1 (2^-7)."""
    p = np.ones(n, np.float32).astype(dtype)
    opt = fastadam.Adam([p], lr=1e-3 / 1.5, betas=(0.0, 0.0), eps=0.0, param_rounding=rounding,
                        seed=seed)
    g = np.full(n, -1.0, np.float32).astype(dtype)  # Adam's step is lr * sign(g)
    for _ in range(steps):
        opt.step([g])
    return p.astype(np.float32)


def test_stochastic_rounding_moves_weights_that_nearest_rounding_leaves_stuck():
    nearest = drift(BF16, "nearest")
    stochastic = drift(BF16, "stochastic")
    exact = 1.0 + 400 * 1e-3 / 1.5  # the float32 run's drift: every element moves the same
    assert (nearest == 1.0).all()  # each update is below half an ulp: swallowed
    assert abs((stochastic.mean() - 1.0) / (exact - 1.0) - 1.0) < 0.02
    assert stochastic.std() > 0  # elements round independently
    np.testing.assert_array_equal(stochastic, drift(BF16, "stochastic"))  # the seed fixes it
    assert not np.array_equal(stochastic, drift(BF16, "stochastic", seed=2))


@needs_kernel
def test_stochastic_rounding_is_the_same_for_every_thread_count():
    one = run("cython", BF16, n=100000, num_threads=1, param_rounding="stochastic", seed=9)
    two = run("cython", BF16, n=100000, num_threads=2, param_rounding="stochastic", seed=9)
    assert_same_run(one, two)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_clipping_and_skipping_read_low_precision_gradients(dtype):
    rng = np.random.default_rng(3)
    p = rng.standard_normal(5000).astype(np.float32).astype(dtype)
    opt = fastadam.Adam([p], lr=1e-3, max_grad_norm=1.0, skip_if_nonfinite=True)
    g = mixed_scale(rng, 5000, dtype)
    ref = _reference.grad_norm([g.astype(np.float64)])
    assert opt.step([g])
    assert opt.last_grad_norm == ref
    before = p.copy()
    g[17] = np.inf
    assert not opt.step([g])
    np.testing.assert_array_equal(bits(p), bits(before))


@pytest.mark.parametrize("options", [dict(), dict(master_weights="split"),
                                     dict(master_weights="float32")])
def test_a_checkpoint_round_trips_through_a_file(options, tmp_path):
    params, opt = run("auto", BF16, **options)
    opt.save(tmp_path / "opt.npz")
    again = fastadam.Adam([p.copy() for p in params], lr=3e-3, **options)
    again.load(tmp_path / "opt.npz")
    for k in opt.state:
        for key, value in opt.state[k].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(bits(value), bits(again.state[k][key]))


def test_master_weights_convert_between_split_and_float32_and_start_from_the_parameter():
    params, split = run("auto", BF16, master_weights="split")
    whole = fastadam.Adam(params, lr=3e-3, master_weights="float32")
    whole.load_state_dict(split.state_dict())
    np.testing.assert_array_equal(whole.state[0]["master"],
                                  _formats.split_master(params[0], split.state[0]["master_low"]))
    back = fastadam.Adam(params, lr=3e-3, master_weights="split")
    back.load_state_dict(whole.state_dict())
    np.testing.assert_array_equal(back.state[0]["master_low"], split.state[0]["master_low"])
    plain = fastadam.Adam(params, lr=3e-3)  # drops the master; its state is bfloat16
    plain.load_state_dict(split.state_dict())
    assert "master_low" not in plain.state[0] and plain.state[0]["exp_avg"].dtype == BF16
    np.testing.assert_array_equal(plain.state[0]["exp_avg"],
                                  _formats.round_nearest(split.state[0]["exp_avg"], BF16))
    later = fastadam.Adam(params, lr=0.0, master_weights="float32")
    later.load_state_dict(dict(plain.state_dict(), param_groups=[dict(
        plain.state_dict()["param_groups"][0], lr=0.0)]))
    before = params[0].astype(np.float32)
    later.step([np.zeros_like(p) for p in params])  # lr 0: the master is the parameter
    np.testing.assert_array_equal(later.state[0]["master"], before)


@pytest.mark.parametrize("make, exc, match", [
    (lambda: fastadam.Adam([np.zeros(3, np.float16)], master_weights="split"), TypeError,
     r"params'\]\[0\]: master_weights='split' .* bfloat16 parameters; float16 parameters can use "
     "master_weights='float32'"),
    (lambda: fastadam.Adam([np.zeros(3, np.float16)], param_rounding="stochastic"), TypeError,
     "param_rounding='stochastic' is for bfloat16 parameters"),
    (lambda: fastadam.Adam([np.zeros(3, BF16)], param_rounding="stochastic", master_weights="float32"),
     ValueError, "use one or the other"),
    (lambda: fastadam.Adam([np.zeros(3, BF16)], state_dtype="bfloat16"), TypeError,
     r"state_dtype='bfloat16' needs float32 parameters or master weights"),
    (lambda: fastadam.Adam([np.zeros(5000, BF16)], state_dtype="int8", master_weights="float32"),
     TypeError, "state_dtype='int8' needs float32 parameters, got bfloat16"),
    (lambda: fastadam.Adam([np.zeros(3, BF16)], master_weights="fp32"), ValueError,
     "master_weights must be None, 'split' or 'float32'"),
    (lambda: fastadam.Adam([np.zeros(3, BF16)], param_rounding="up"), ValueError,
     "param_rounding must be 'nearest' or 'stochastic'"),
])
def test_options_that_do_not_fit_are_refused(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("param, grad, options, match", [
    (BF16, np.float64, {}, r"grads\[1\]: dtype float64 does not match params\[1\] dtype bfloat16 \(or float32\)"),
    (F16, BF16, {}, r"dtype bfloat16 does not match params\[1\] dtype float16 \(or float32\)"),
    (BF16, np.float32, dict(master_weights="split"), r"dtype float32 does not match params\[1\] dtype bfloat16$"),
    (np.float64, BF16, {}, r"dtype bfloat16 does not match params\[1\] dtype float64$"),
    (np.float32, F16, {}, r"dtype float16 does not match params\[1\] dtype float32 \(or bfloat16\)"),
])
def test_gradients_of_another_dtype_are_refused_and_nothing_changes(param, grad, options, match):
    p = np.ones(8, np.float32).astype(param)
    q = np.ones(8, np.float32).astype(param)
    opt = fastadam.Adam([q, p], **options)
    with pytest.raises(TypeError, match=match):
        opt.step([np.ones(8, np.float32).astype(param), np.ones(8, grad)])
    assert opt.state == {} and (q.astype(np.float32) == 1).all()


def test_numba_refuses_low_precision_clearly():
    pytest.importorskip("numba")
    with pytest.raises(TypeError, match="backend 'numba' updates float32 and float64 arrays, not bfloat16"):
        fastadam.Adam([np.zeros(3, BF16)], backend="numba")
    opt = fastadam.Adam([np.zeros(3, np.float32)], backend="numba")
    with pytest.raises(TypeError, match=r"grads\[0\]: backend 'numba' updates float32"):
        opt.step([np.zeros(3, BF16)])


def test_a_file_that_lacks_its_master_weights_is_refused_and_nothing_changes(tmp_path):
    import zipfile
    params, opt = run("auto", BF16, master_weights="split")
    opt.save(tmp_path / "opt.npz")
    with zipfile.ZipFile(tmp_path / "opt.npz") as src, \
            zipfile.ZipFile(tmp_path / "cut.npz", "w") as dst:
        for info in src.infolist():
            if info.filename != "state/0/master_low.npy":
                dst.writestr(info, src.read(info))
    before = {k: {key: value.copy() for key, value in entry.items() if isinstance(value, np.ndarray)}
              for k, entry in opt.state.items()}
    with pytest.raises(ValueError, match=r"cut.npz: state/0 has no 'master_low'.*incomplete"):
        opt.load(tmp_path / "cut.npz")
    for k, entry in before.items():
        for key, value in entry.items():
            np.testing.assert_array_equal(bits(opt.state[k][key]), bits(value))


@pytest.mark.parametrize("key, value, match", [
    ("master_low", np.zeros(3000, np.float32), r"\['master_low'\] must be a uint16 array"),
    ("master", np.zeros(10, np.float32), r"\['master'\] must be a float32 array of the parameter's shape"),
])
def test_a_state_dict_with_a_malformed_master_is_refused(key, value, match):
    params, opt = run("auto", BF16, master_weights="split")
    sd = opt.state_dict()
    sd["state"][0][key] = value
    before = opt.state[0]["master_low"].copy()
    with pytest.raises(TypeError, match=match):
        opt.load_state_dict(sd)
    np.testing.assert_array_equal(opt.state[0]["master_low"], before)
