"""Fused global-norm gradient clipping (max_grad_norm): torch's clip_grad_norm_ followed by
the step, in one pass; the norm deterministic for any thread count."""
import numpy as np
import pytest

import fastadam
from fastadam import _reference
from conftest import backend_params, on_every_isa

BACKENDS = backend_params()
SHAPES = [(30, 20), (20,), (70_000,), (3,), (5000,)]


def mixed_scale_grads(rng, n_steps):
    """Gradients whose scale varies over six decades between steps and tensors."""
    for _ in range(n_steps):
        scale = 10.0 ** rng.uniform(-3, 3)
        yield [(rng.standard_normal(s) * scale * 10.0 ** (i - 2)).astype(np.float32)
               for i, s in enumerate(SHAPES)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_matches_torch_clip_grad_norm_then_step(backend, cls, rng):
    torch = pytest.importorskip("torch")
    ps = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    mine = [p.copy() for p in ps]
    opt = getattr(fastadam, cls)(mine, lr=1e-2, backend=backend, max_grad_norm=100.0)
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in ps]
    topt = getattr(torch.optim, cls)(tp, lr=1e-2, foreach=False)
    clipped = 0
    for grads in mixed_scale_grads(rng, 60):
        before = [g.copy() for g in grads]
        opt.step(grads)
        for a, b in zip(grads, before):  # the caller's gradients are not modified
            np.testing.assert_array_equal(a, b)
        for t, g in zip(tp, grads):
            t.grad = torch.from_numpy(g.copy())
        norm = float(torch.nn.utils.clip_grad_norm_(tp, 100.0))
        topt.step()
        clipped += norm > 100.0
        assert opt.last_grad_norm == pytest.approx(norm, rel=1e-5)
    assert 10 < clipped < 60  # both regimes were exercised
    for a, t in zip(mine, tp):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_the_reference_for_every_thread_count(backend, rng):
    ps = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    stream = list(mixed_scale_grads(rng, 8))
    results = []
    for name, threads in [("numpy", None)] + [(backend, t) for t in (1, 2, 3, 8)]:
        mine = [p.copy() for p in ps]
        opt = fastadam.AdamW(mine, amsgrad=True, backend=name, num_threads=threads, max_grad_norm=0.5)
        norms = []
        for grads in stream:
            opt.step(grads)
            norms.append(opt.last_grad_norm)
        results.append((b"".join(p.tobytes() for p in mine), norms))
    for other in results[1:]:
        assert other == results[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_norm_is_the_reference_norm_bit_for_bit(backend, threads, rng):
    """Tensors of odd sizes crossing the 4096-element blocks, float32 and float64."""
    for dtype in (np.float32, np.float64):
        shapes = [(1,), (4095,), (17,), (9000,), (40_000,), (0,), (33,)]
        ps = [np.zeros(s, dtype) for s in shapes]
        grads = [(rng.standard_normal(s) * 10.0 ** rng.uniform(-20, 20)).astype(dtype) for s in shapes]
        opt = fastadam.Adam(ps, backend=backend, num_threads=threads, max_grad_norm=1e30)
        opt.step(grads)
        assert opt.last_grad_norm == _reference.grad_norm(grads)
        # and it is the L2 norm (to float64 rounding)
        exact = np.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads))
        assert opt.last_grad_norm == pytest.approx(exact, rel=1e-12)


def test_norm_is_the_reference_norm_on_every_isa(rng):
    """The compiled sum of squares (vectorised lanes, a scalar head and tail where a tensor
    starts or ends off a 16-lane boundary) on every instruction set, against the reference."""
    kernel = pytest.importorskip("fastadam._kernel")
    for dtype in (np.float32, np.float64):
        # the first tensor starts on lane 0; the others start and end off it; one scale, so
        # that every element's square shows in the sum's bits
        shapes = [(32,), (3,), (4093,), (17,), (9000,), (40_001,), (0,), (48,)]
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]

        def run():
            opt = fastadam.Adam([np.zeros(s, dtype) for s in shapes], backend="cython",
                                num_threads=2, max_grad_norm=1e30)
            opt.step(grads)
            return opt.last_grad_norm

        expected = _reference.grad_norm(grads)
        for isa, got in on_every_isa(kernel, run).items():
            assert got == expected, (isa, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_skip_if_nonfinite_one_pass_decides_both(backend, rng):
    ps = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    opt = fastadam.Adam(ps, backend=backend, max_grad_norm=1.0, skip_if_nonfinite=True)
    grads = next(mixed_scale_grads(rng, 1))
    assert opt.step(grads) is True
    before = [p.copy() for p in ps]
    grads[2][123] = np.inf
    assert opt.step(grads) is False
    assert opt.last_grad_norm == np.inf and opt.skipped_steps == 1
    for a, b in zip(ps, before):
        np.testing.assert_array_equal(a, b)
    assert opt.state[0]["step"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradient_without_skip_propagates_as_torch(backend):
    """A NaN norm gives a NaN coefficient, as in torch (error_if_nonfinite=False)."""
    torch = pytest.importorskip("torch")
    g = np.array([1.0, np.nan, 2.0], np.float32)
    p = np.ones(3, np.float32)
    fastadam.Adam([p], backend=backend, max_grad_norm=1.0).step([g])
    t = torch.nn.Parameter(torch.ones(3))
    t.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_norm_([t], 1.0)
    torch.optim.Adam([t], foreach=False).step()
    np.testing.assert_array_equal(np.isnan(p), np.isnan(t.detach().numpy()))


@pytest.mark.parametrize("value, exc", [(-1.0, ValueError), (float("inf"), ValueError),
                                        (float("nan"), ValueError), ("1", TypeError), (True, TypeError)])
def test_max_grad_norm_is_validated(value, exc):
    with pytest.raises(exc, match="max_grad_norm"):
        fastadam.Adam([np.zeros(3)], max_grad_norm=value)
    opt = fastadam.Adam([np.zeros(3)], max_grad_norm=2.0)
    with pytest.raises(exc, match="max_grad_norm"):
        opt.max_grad_norm = value
    assert opt.max_grad_norm == 2.0


def test_last_grad_norm_is_none_until_a_clipping_step():
    p = np.zeros(3)
    opt = fastadam.Adam([p])
    opt.step([np.ones(3)])
    assert opt.last_grad_norm is None
    opt.max_grad_norm = 10.0
    opt.step([np.full(3, 2.0)])
    assert opt.last_grad_norm == pytest.approx(np.sqrt(12.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_grad_norm_outlives_clipping_switched_off_and_rebuilt_plans(backend):
    """The norm of the last step that clipped, whichever steps and checkpoint loads came
    after it (the compiled backend keeps its plan where the NumPy one builds a new one)."""
    p = np.zeros(3)
    opt = fastadam.Adam([p], max_grad_norm=1.0, backend=backend)
    opt.step([np.full(3, 2.0)])
    clipped = _reference.grad_norm([np.full(3, 2.0)])
    opt.max_grad_norm = None
    opt.step([np.ones(3)])
    assert opt.last_grad_norm == clipped
    opt.load_state_dict(opt.state_dict())
    opt.step([np.ones(3)])
    assert opt.last_grad_norm == clipped
    opt.max_grad_norm = 1.0
    opt.step([np.full(3, 3.0)])
    assert opt.last_grad_norm == _reference.grad_norm([np.full(3, 3.0)])
