"""The flush-to-zero rule (fastadam/_reference.py states it): no subnormal is stored or
computed on, identically in the compiled kernel, the Numba backend and the reference."""
import platform
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastadam
from fastadam import _reference
from conftest import backend_params

BACKENDS = backend_params()
DTYPES = [np.float32, np.float64]


def subnormal_count(a):
    tiny = np.finfo(a.dtype).smallest_normal
    return int(np.count_nonzero((a != 0) & (np.abs(a) < tiny)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_no_subnormal_survives_tiny_gradients(backend, amsgrad, rng):
    """The issue's case: entries that only ever see gradients around 1e-21 (float32).
    IEEE arithmetic leaves about 1,000 of 5,000 entries of v subnormal after 300 steps;
    the rule leaves none in p, m, v or v^, and the backends agree bit for bit."""
    n = 5000
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [np.where(np.arange(n) % 5 == 0, rng.standard_normal(n) * 1e-21,
                      rng.standard_normal(n) * 1e-3).astype(np.float32) for _ in range(300)]
    p, q = p0.copy(), p0.copy()
    opt = fastadam.Adam([p], amsgrad=amsgrad, backend=backend)
    ref = fastadam.Adam([q], amsgrad=amsgrad, backend="numpy")
    for g in grads:
        opt.step([g])
        ref.step([g])
    for a in [p, *(v for k, v in opt.state[0].items() if k != "step")]:
        assert subnormal_count(a) == 0
    np.testing.assert_array_equal(p, q)
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[0][key].tobytes() == ref.state[0][key].tobytes()
    # IEEE arithmetic (what the rule replaces) does leave subnormals here.
    v_ieee = np.zeros(n, np.float32)
    for g in grads:
        v_ieee = np.float32(0.999) * v_ieee + np.float32(0.001) * (g * g)
    assert subnormal_count(v_ieee) > 500


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_inputs_are_read_as_signed_zeros(backend, dtype, rng):
    """Subnormal parameters, state and gradients (a loaded checkpoint, a user's values)
    are read as zeros of their sign and none survives one step."""
    tiny = np.finfo(dtype).smallest_normal
    n = 1000
    sub = (rng.uniform(-0.9, 0.9, n) * tiny).astype(dtype)
    p = sub.copy()
    q = sub.copy()
    opt = fastadam.AdamW([p], amsgrad=True, backend=backend)
    ref = fastadam.AdamW([q], amsgrad=True, backend="numpy")
    for o in (opt, ref):
        o.step([np.zeros(n, dtype)])
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            o.state[0][key][...] = np.abs(sub) if key != "exp_avg" else sub
    for _ in range(2):
        opt.step([sub])
        ref.step([sub])
    assert p.tobytes() == q.tobytes()
    for a in [p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"], opt.state[0]["max_exp_avg_sq"]]:
        assert subnormal_count(a) == 0


def _edge_values(dtype):
    """Two products just below the smallest normal that IEEE arithmetic rounds up to it:
    a1 * b1 = tiny * (1 - 2^-p) exactly (p the precision), which rounds to below tiny
    with an unbounded exponent (flushed); a2 * b2 = tiny * (1 - 2^-2k), which rounds
    to tiny even then (kept)."""
    tiny = np.finfo(dtype).smallest_normal
    p = np.finfo(dtype).nmant + 1
    k = p // 2 + 2
    return [dtype(x) for x in (1 - 2.0 ** -p, tiny, 1 - 2.0 ** -k, tiny * (1 + 2.0 ** -k))]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_flushes_exactly_as_the_hardware_does(dtype):
    """x86 decides tininess after rounding with an unbounded exponent: of two products
    that IEEE arithmetic rounds to the smallest normal, one is flushed, one kept.
    aarch64 decides it before rounding: both are flushed (their exact values are below)."""
    a1, b1, a2, b2 = _edge_values(dtype)
    tiny = np.finfo(dtype).smallest_normal
    assert a1 * b1 == tiny and a2 * b2 == tiny  # IEEE
    assert np.longdouble(a2) * np.longdouble(b2) < tiny or np.finfo(np.longdouble).nmant < 106
    after = _reference.FlushToZero(np.dtype(dtype), before_rounding=False)
    assert after.mul(np.array([a1, -a1]), np.array([b1, b1])).tolist() == [0.0, -0.0]
    assert np.signbit(after.mul(np.array([-a1]), np.array([b1]))[0])
    assert after.mul(np.array([a2]), np.array([b2]))[0] == tiny
    if dtype == np.float32 or np.finfo(np.longdouble).nmant >= 106:  # an exact float64 product
        before = _reference.FlushToZero(np.dtype(dtype), before_rounding=True)
        assert before.mul(np.array([a1, -a1, a2]), np.array([b1, b1, b2])).tolist() == [0.0, -0.0, 0.0]
    machine_rule = _reference.FlushToZero(np.dtype(dtype))
    assert machine_rule.before_rounding == (platform.machine() == "aarch64")


@pytest.mark.parametrize("backend", backend_params(("cython", "numba")))
@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_match_the_reference_on_the_rounding_edge(backend, dtype):
    """beta1 * m with beta1 and m chosen so the product lands on each side of the edge."""
    a1, b1, a2, b2 = _edge_values(dtype)
    for beta1, m0 in ((a1, b1), (a2, b2), (a1, -b1)):
        results = []
        for name in (backend, "numpy"):
            p = np.ones(40, dtype)
            opt = fastadam.Adam([p], betas=(float(beta1), 0.999), backend=name)
            opt.step([np.zeros(40, dtype)])
            opt.state[0]["exp_avg"][...] = m0
            opt.step([np.zeros(40, dtype)])
            results.append(opt.state[0]["exp_avg"].tobytes() + p.tobytes())
        assert results[0] == results[1]


@pytest.mark.parametrize("backend", backend_params(("cython", "numba")))
@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 32 - 1),
       beta1=st.sampled_from([0.0, 0.5, 0.9, 1 - 2 ** -12]), lr=st.sampled_from([1e-3, 1.0, 1e-30]),
       eps=st.sampled_from([0.0, 1e-8]))
def test_values_near_the_smallest_normal_match_the_reference(backend, dtype, seed, beta1, lr, eps):
    """Parameters, state and gradients scattered around the smallest normal number,
    where every operation may cross it: bitwise the reference."""
    tiny = np.finfo(dtype).smallest_normal
    n = 257

    def near():
        return (rng.choice([-1, 1], n) * np.exp2(rng.uniform(-3, 3, n)) * tiny).astype(dtype)

    out = []
    for name in (backend, "numpy"):
        rng = np.random.default_rng(seed)
        p = near()
        grads = [near() for _ in range(3)]
        m0, v0 = near(), np.abs(near())
        opt = fastadam.Adam([p], lr=lr, betas=(beta1, 0.999), eps=eps, backend=name)
        opt.step([grads[0]])
        opt.state[0]["exp_avg"][...] = m0
        opt.state[0]["exp_avg_sq"][...] = v0
        for g in grads[1:]:
            opt.step([g])
        out.append(b"".join(a.tobytes() for a in (p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"])))
    assert out[0] == out[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_matches_torch_under_flush_denormal(backend):
    """With eps=0 the rule shows: a gradient whose square underflows leaves v = 0 beside a
    nonzero m, and m / 0 sends p to -+inf; m = v = 0 gives 0/0 = NaN.  torch gives the
    same with torch.set_flush_denormal(True) (the same FTZ/DAZ modes)."""
    torch = pytest.importorskip("torch")
    g = np.array([1e-20, 0.0, 1e-10, -1e-20, 3.0], np.float32)
    p = np.ones(5, np.float32)
    fastadam.Adam([p], eps=0.0, backend=backend).step([g])
    previous = torch.set_flush_denormal(True)
    try:
        t = torch.nn.Parameter(torch.ones(5))
        opt = torch.optim.Adam([t], eps=0.0, foreach=False)
        t.grad = torch.from_numpy(g.copy())
        opt.step()
    finally:
        torch.set_flush_denormal(False)
    assert previous  # this CPU supports the modes
    np.testing.assert_array_equal(p, t.detach().numpy())
    assert np.isneginf(p[0]) and np.isnan(p[1]) and np.isposinf(p[3])
