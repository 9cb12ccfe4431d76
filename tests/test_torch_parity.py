"""fastadam against torch.optim.Adam / AdamW (foreach=False), when torch is installed.

torch rounds a few operations differently (lerp for m, a division by
sqrt(bc2) where we multiply by its reciprocal), so the comparison allows a few
ulps per step; the NumPy reference is the bitwise oracle (test_parity.py)."""
import math

import numpy as np
import pytest

import fastadam
from conftest import backend_params

torch = pytest.importorskip("torch")

CASES = {
    "adam": dict(),
    "adam-l2-amsgrad": dict(weight_decay=0.1, amsgrad=True),
    "maximize": dict(maximize=True, betas=(0.8, 0.99), eps=1e-6),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch(backend, cls_name, case, dtype, rng):
    kw = dict(CASES[case], lr=1e-2)
    n, steps = 1001, 100
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    p = p0.copy()
    ours = getattr(fastadam, cls_name)([p], backend=backend, **kw)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    theirs = getattr(torch.optim, cls_name)([tp], foreach=False, **kw)
    for g in grads:
        ours.step([g])
        tp.grad = torch.from_numpy(g.copy())
        theirs.step()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(p, tp.detach().numpy(), **tol)
    tstate = theirs.state[tp]
    np.testing.assert_allclose(ours.state[0]["exp_avg"], tstate["exp_avg"].numpy(), **tol)
    np.testing.assert_allclose(ours.state[0]["exp_avg_sq"], tstate["exp_avg_sq"].numpy(), **tol)
    assert ours.state[0]["step"] == int(tstate["step"])


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(lr=math.nan), dict(eps=-1.0),
                                    dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.5)),
                                    dict(weight_decay=-2.0)])
def test_same_validation_messages_as_torch(kwargs):
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    with pytest.raises(ValueError) as ours:
        fastadam.Adam([np.zeros(3)], **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_defaults_match_torch():
    for name in ("Adam", "AdamW"):
        theirs = getattr(torch.optim, name)([torch.nn.Parameter(torch.zeros(3))]).defaults
        ours = getattr(fastadam, name)([np.zeros(3)]).defaults
        for key, value in ours.items():
            if key == "eps_hat":  # fastadam's own flag (Keras's epsilon), off as torch is
                assert key not in theirs and value is False
            else:
                assert theirs[key] == value, (name, key)
