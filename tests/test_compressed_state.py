"""Compressed optimizer state: state_dtype="bfloat16" (stochastic rounding)."""
import numpy as np
import pytest

import fastadam
from fastadam import _reference
from conftest import backend_params, on_every_isa
from test_errors import assert_unchanged, snapshot

BF16_BACKENDS = backend_params(("cython", "numba", "numpy"))


def grads_for(rng, shape, n):
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("kernel", backend_params(("cython", "numba")))
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad, maximize, wd", [(False, False, 0.0), (True, False, 0.1),
                                                    (False, True, 0.1), (True, True, 0.0)])
def test_kernel_equals_the_reference_for_every_thread_count(kernel, cls, amsgrad, maximize, wd, rng):
    shapes = [(70_001,), (33, 7), (5,)]
    p0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    stream = [grads_for(rng, s, 1)[0] for _ in range(6) for s in shapes]
    stream = [stream[i:i + 3] for i in range(0, len(stream), 3)]
    results = []
    for backend, threads in [("numpy", None), (kernel, 1), (kernel, 2), (kernel, 3)]:
        ps = [p.copy() for p in p0]
        opt = getattr(fastadam, cls)(ps, backend=backend, num_threads=threads, amsgrad=amsgrad,
                                     maximize=maximize, weight_decay=wd, state_dtype="bfloat16",
                                     seed=11)
        for grads in stream:
            opt.step(grads)
        results.append(b"".join(p.tobytes() for p in ps) + b"".join(
            a.tobytes() for e in opt.state.values() for k, a in sorted(e.items()) if k != "step"))
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("state_dtype, backend", [
    pytest.param(state_dtype, b.values[0], marks=b.marks)
    for state_dtype, names in [("float32", ("cython", "numba")), ("bfloat16", ("cython", "numba"))]
    for b in backend_params(names)])
def test_maximize_negates_a_nan_gradient_as_the_reference_does(state_dtype, backend, rng):
    """-g flips a NaN's sign bit too: the state's bytes (bfloat16 keeps the sign) equal the
    reference's, whatever the compiler makes of -(g * c)."""
    n = 5000
    p0 = rng.standard_normal(n).astype(np.float32)
    stream = grads_for(rng, n, 3)
    stream[0][[3, 4000]] = [np.nan, -np.nan]
    stream[1][77] = np.nan
    results = []
    for name in ("numpy", backend):
        p = p0.copy()
        opt = fastadam.Adam([p], maximize=True, amsgrad=True, state_dtype=state_dtype, backend=name)
        for g in stream:
            opt.step([g])
        results.append(b"".join(a.tobytes() for k, a in sorted(opt.state[0].items()) if k != "step"))
    assert results[1] == results[0]


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad, maximize, wd", [(False, False, 0.0), (True, False, 0.1),
                                                    (False, True, 0.1), (True, True, 0.0)])
def test_every_isa_variant_equals_the_reference_on_edge_values(state_dtype, cls, amsgrad, maximize,
                                                                wd, rng):
    """Every instruction set against the reference (the AVX-512 variant's bfloat16 loop is
    written apart from the rest): NaN and infinite gradients, signed zeros, subnormal
    gradients, and subnormal, negative-subnormal and NaN values in v^ (a checkpoint can hold
    them), some where v is 0: max(v^, v) of a flushed -0 and v's +0 is +0, as np.maximum's."""
    kernel = fastadam._backends.compiled_or_none()
    if kernel is None:
        pytest.skip("the compiled kernel is not built")
    n = 70_001
    p0 = rng.standard_normal(n).astype(np.float32)
    p0[100:200:2] = -0.0
    stream = grads_for(rng, n, 4)
    stream[1][[7, 500, 4000, n - 3]] = [np.nan, np.inf, -np.inf, np.nan]
    stream[2][1000:2000] = -0.0
    stream[3][3000:3100] = 1e-39    # subnormal float32
    for g in stream:
        g[5000:5200] = 0.0          # v stays 0 there, so v^'s old value is the max

    def run(backend):
        p = p0.copy()
        opt = getattr(fastadam, cls)([p], weight_decay=wd, amsgrad=amsgrad, maximize=maximize,
                                     state_dtype=state_dtype, seed=5, backend=backend)
        for k, g in enumerate(stream):
            opt.step([g])
            if k == 0 and amsgrad:
                vmax = opt.state[0]["max_exp_avg_sq"]
                subnormal, negative, nan, negative_where_v_is_0 = (
                    (0x0005, 0x8005, 0x7fc1, 0x8003) if state_dtype == "bfloat16"   # bits
                    else (1e-40, -1e-40, np.nan, -1e-41))
                vmax[::101] = subnormal
                vmax[50::202] = negative
                vmax[7::997] = nan
                vmax[5000:5200:3] = negative_where_v_is_0
        return p.tobytes() + b"".join(a.tobytes() for k, a in sorted(opt.state[0].items()) if k != "step")

    expected = run("numpy")
    for isa, got in on_every_isa(kernel, lambda: run("cython")).items():
        assert got == expected, isa


def test_state_is_bfloat16_bits_and_half_the_memory(rng):
    p = rng.standard_normal(1000).astype(np.float32)
    full = fastadam.Adam([p.copy()])
    half = fastadam.Adam([p.copy()], state_dtype="bfloat16")
    g = rng.standard_normal(1000).astype(np.float32)
    full.step([g])
    half.step([g])
    assert half.state[0]["exp_avg"].dtype == np.uint16
    assert half.state_nbytes() * 2 == full.state_nbytes() == 8 * 1000
    # the bits are m rounded to one of its two bfloat16 neighbours
    m = full.state[0]["exp_avg"]
    decoded = _reference.bf16_decode(half.state[0]["exp_avg"])
    assert np.all(np.abs(decoded - m) <= np.abs(m) * 2.0 ** -7)


def test_stochastic_rounding_avoids_the_stagnation_of_round_to_nearest(rng):
    """With beta2 = 0.999, beta2 * v moves v by 0.1%, under bfloat16's half-spacing: rounded
    to nearest, v never decays.  After the gradient drops from 1 to 0.01, float32 v decays
    towards 1e-4; round-to-nearest stays stuck near 1; stochastic rounding follows float32."""
    n, beta2 = 4096, 0.999
    v32 = np.zeros(n, np.float32)
    v_rn = np.zeros(n, np.uint16)
    p = np.zeros(n, np.float32)
    opt = fastadam.Adam([p], state_dtype="bfloat16", seed=5)
    for t in range(1, 1501):
        g = np.full(n, 1.0 if t <= 100 else 0.01, np.float32)
        opt.step([g])
        v32 = np.float32(beta2) * v32 + np.float32(1 - beta2) * g * g
        v_rn = _reference.bf16_round_nearest(
            np.float32(beta2) * _reference.bf16_decode(v_rn) + np.float32(1 - beta2) * g * g)
        if t == 100:
            rn_at_100 = v_rn.copy()
    v_sr = _reference.bf16_decode(opt.state[0]["exp_avg_sq"])
    assert np.array_equal(v_rn, rn_at_100)                    # round-to-nearest never moved
    assert _reference.bf16_decode(v_rn).mean() > 4 * v32.mean()
    assert abs(v_sr.mean() / v32.mean() - 1) < 0.02          # stochastic: float32's on average


def test_same_seed_same_bits_other_seed_other_bits(rng):
    p0 = rng.standard_normal(3000).astype(np.float32)
    stream = grads_for(rng, 3000, 5)
    out = []
    for seed in (1, 1, 2):
        p = p0.copy()
        opt = fastadam.Adam([p], state_dtype="bfloat16", seed=seed)
        for g in stream:
            opt.step([g])
        out.append(opt.state[0]["exp_avg"].tobytes())
    assert out[0] == out[1] != out[2]


@pytest.mark.parametrize("backend", BF16_BACKENDS)
@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_resume_is_bitwise(backend, via, rng, tmp_path):
    p0 = rng.standard_normal((40, 30)).astype(np.float32)
    stream = grads_for(rng, (40, 30), 12)
    a = p0.copy()
    opt = fastadam.AdamW([a], amsgrad=True, backend=backend, state_dtype="bfloat16", seed=9)
    for g in stream:
        opt.step([g])
    b = p0.copy()
    first = fastadam.AdamW([b], amsgrad=True, backend=backend, state_dtype="bfloat16", seed=9)
    for g in stream[:5]:
        first.step([g])
    if via == "file":
        first.save(tmp_path / "s.npz")
    sd = first.state_dict()
    second = fastadam.AdamW([b], amsgrad=True, backend=backend, state_dtype="bfloat16", seed=9)
    if via == "file":
        second.load(tmp_path / "s.npz")
    else:
        second.load_state_dict(sd)
    assert second.state[0]["exp_avg"].dtype == np.uint16
    for g in stream[5:]:
        second.step([g])
    np.testing.assert_array_equal(a, b)


def test_float32_checkpoint_loads_into_bfloat16_and_back(rng, tmp_path):
    p = rng.standard_normal(500).astype(np.float32)
    full = fastadam.Adam([p.copy()])
    full.step([rng.standard_normal(500).astype(np.float32)])
    full.save(tmp_path / "f.npz")
    half = fastadam.Adam([p.copy()], state_dtype="bfloat16")
    half.load(tmp_path / "f.npz")
    m = full.state[0]["exp_avg"]
    assert half.state[0]["exp_avg"].dtype == np.uint16
    np.testing.assert_array_equal(half.state[0]["exp_avg"], _reference.bf16_round_nearest(m))
    again = fastadam.Adam([p.copy()])
    again.load_state_dict(half.state_dict())
    assert again.state[0]["exp_avg"].dtype == np.float32
    np.testing.assert_array_equal(again.state[0]["exp_avg"], _reference.bf16_decode(half.state[0]["exp_avg"]))


def test_wrong_state_dtype_is_refused_and_nothing_changes(rng):
    p = rng.standard_normal(50).astype(np.float32)
    opt = fastadam.Adam([p], state_dtype="bfloat16")
    opt.step([np.ones(50, np.float32)])
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = np.zeros(50, np.int16)
    snap = snapshot(opt)
    with pytest.raises(TypeError, match=r"\['exp_avg'\]: dtype int16 does not match the state's dtype uint16"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
    opt.state[0]["exp_avg_sq"] = np.zeros(50, np.float32)   # a live buffer of the wrong dtype
    with pytest.raises(TypeError, match=r"state\[0\]\['exp_avg_sq'\]: dtype float32 does not match"):
        opt.step([np.ones(50, np.float32)])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(state_dtype="float16"), ValueError, "state_dtype must be one of 'float32', 'bfloat16'"),
    (dict(state_dtype="bfloat16", seed=-1), ValueError, "seed must be an int"),
    (dict(state_dtype="bfloat16", seed=1.5), ValueError, "seed must be an int"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastadam.Adam([np.zeros(3, np.float32)], **kwargs)


def test_bfloat16_needs_float32_parameters():
    with pytest.raises(TypeError, match=r"state_dtype='bfloat16' needs float32 parameters, got float64"):
        fastadam.Adam([np.zeros(3)], state_dtype="bfloat16")


def test_numba_with_python_checks_equals_the_reference(rng):
    """bfloat16 state on the Numba kernel without the compiled checks (an install
    without a compiler): the reference's bits, m, v and v^ included."""
    pytest.importorskip("numba")
    p0 = rng.standard_normal(70_001).astype(np.float32)
    stream = grads_for(rng, p0.shape, 4)
    results = []
    for backend in ("numpy", "numba"):
        p = p0.copy()
        opt = fastadam.AdamW([p], amsgrad=True, backend=backend, state_dtype="bfloat16", seed=4,
                             num_threads=2)
        if backend == "numba":  # as when fastadam._kernel is not built
            opt._backend = fastadam._backends.NumbaBackend(opt._backend.module, None)
        for g in stream:
            opt.step([g])
        results.append(p.tobytes() + b"".join(a.tobytes() for k, a in sorted(opt.state[0].items())
                                               if k != "step"))
    assert type(opt._plan._checks).__name__ == "Checks"
    assert results[1] == results[0]
