"""eps_hat: epsilon placed as Keras's and TensorFlow's Adam place it (the paper's epsilon-hat),
against that rule written out in float64 and against Keras's own Adam where Keras is installed.
(tests/test_every_row.py holds every kernel row to the reference with the flag on and off.)"""
import numpy as np
import pytest

import fastadam
from fastadam import _backends
from conftest import backend_params

LR, B1, B2 = 1e-2, 0.9, 0.999
EPS = 1e-3  # large beside sqrt(v), so where it is added shows in the result


def keras_rule(p0, grads, lr=LR, b1=B1, b2=B2, eps=EPS, amsgrad=False, weight_decay=0.0):
    """Keras's Adam (keras/src/optimizers/adam.py, with the base optimizer's decoupled weight
    decay applied first), in float64: the oracle, written from Keras's description."""
    p = p0.astype(np.float64)
    m, v, vhat = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        p = p - p * weight_decay * lr
        alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        if amsgrad:
            vhat = np.maximum(vhat, v)
        p = p - m * alpha / (np.sqrt(vhat if amsgrad else v) + eps)
    return p


def problem(n=1000, steps=30, seed=0):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n)).astype(np.float32) for _ in range(steps)]
    return p0, grads


def run(backend, p0, grads, eps_hat, cls=fastadam.Adam, **options):
    p = p0.copy()
    opt = cls([p], lr=LR, betas=(B1, B2), eps=EPS, eps_hat=eps_hat, backend=backend, **options)
    for g in grads:
        opt.step([g])
    return p


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"weight_decay": 0.1}],
                         ids=["adam", "amsgrad", "decoupled-wd"])
def test_eps_hat_is_kerass_rule_and_the_default_is_not(backend, options):
    p0, grads = problem()
    cls = fastadam.AdamW if "weight_decay" in options else fastadam.Adam
    want = keras_rule(p0, grads, **options)
    got = run(backend, p0, grads, True, cls, **options)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    torch_placement = run(backend, p0, grads, False, cls, **options)
    assert np.abs(torch_placement - want).max() > 100 * np.abs(got - want).max()


def test_eps_hat_is_a_group_key_carried_by_checkpoints():
    p0, grads = problem(n=64, steps=4)
    a, b = p0.copy(), p0.copy()
    opt = fastadam.Adam([{"params": [a], "eps_hat": True}], lr=LR, eps=EPS)
    ref = fastadam.Adam([b], lr=LR, eps=EPS, eps_hat=True, backend="numpy")
    for g in grads[:2]:
        opt.step([g])
        ref.step([g])
    sd = opt.state_dict()
    assert sd["param_groups"][0]["eps_hat"] is True
    c = a.copy()
    resumed = fastadam.Adam([c], lr=LR, eps=EPS)  # eps_hat comes from the checkpoint
    resumed.load_state_dict(sd)
    for g in grads[2:]:
        resumed.step([g])
        ref.step([g])
    np.testing.assert_array_equal(c, b)
    with pytest.raises((TypeError, ValueError), match="eps_hat"):
        fastadam.Adam([p0.copy()], eps_hat="yes")


def test_eps_hat_is_kerass_own_adam(monkeypatch):
    """Keras's Adam on its PyTorch backend (float32 variables, its own order of operations)."""
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was imported earlier with the {keras.backend.backend()} backend")
    p0, grads = problem(n=257, steps=20)
    for amsgrad in (False, True):
        var = keras.Variable(p0.copy())
        opt = keras.optimizers.Adam(learning_rate=LR, beta_1=B1, beta_2=B2, epsilon=EPS, amsgrad=amsgrad)
        for g in grads:
            opt.apply([keras.ops.convert_to_tensor(g)], [var])
        want = keras.ops.convert_to_numpy(var.value)
        got = run("cython" if _backends.compiled_or_none() else "numpy", p0, grads, True,
                  amsgrad=amsgrad)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
