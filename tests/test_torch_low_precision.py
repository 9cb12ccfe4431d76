"""fastadam.torch with bfloat16 and float16 parameters against torch.optim.Adam(fused=True)
(the oracle: torch's own CPU kernel), checkpoints both ways, master weights, stochastic
rounding and refusals."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
import fastadam  # noqa: E402
import fastadam.torch as ft  # noqa: E402
from fastadam import _formats  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]
VARIANTS = [dict(), dict(amsgrad=True), dict(maximize=True), dict(weight_decay=0.1),
            dict(weight_decay=0.1, amsgrad=True, maximize=True)]
N = 1 << 15


def gradients(n, dtype, steps, seed=1):
    """Mixed-scale gradients, 1e-4 to 1e2 (float16's squares overflow at the top)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * 10 ** (torch.rand(n, generator=g) * 6 - 4)).to(dtype)
            for _ in range(steps)]


def ordered(t):
    """A 16-bit float tensor's bits as integers in the order of the values (+0 and -0 alike)."""
    u = t.detach().view(torch.int16).numpy().view(np.uint16).astype(np.int64)
    return np.where(u & 0x8000, 0x8000 - (u & 0x7FFF), 0x8000 + u)


def assert_matches_torch(mine, theirs, fraction=0.999):
    """At least ``fraction`` of the elements bit-equal, the rest one ulp apart (NaN alike)."""
    a, b = ordered(mine), ordered(theirs)
    nan = torch.isnan(mine.float()).numpy() & torch.isnan(theirs.float()).numpy()
    equal = (a == b) | nan
    assert equal.mean() >= fraction, f"{equal.mean():.5f} of the elements bit-equal"
    assert (np.abs(a - b)[~equal] <= 1).all(), "a difference above one ulp"


def pair(dtype, cls, torch_cls, steps=100, **kw):
    p0 = torch.randn(N, generator=torch.Generator().manual_seed(0)).to(dtype)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    mine, theirs = cls([a], lr=1e-3, **kw), torch_cls([b], lr=1e-3, fused=True, **kw)
    for g in gradients(N, dtype, steps):
        a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        theirs.step()
    return (a, mine), (b, theirs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("classes", [(ft.Adam, torch.optim.Adam), (ft.AdamW, torch.optim.AdamW)],
                         ids=["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_follows_torch_fused_over_100_steps(dtype, classes, variant):
    (a, mine), (b, theirs) = pair(dtype, *classes, **variant)
    assert_matches_torch(a, b)
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if variant.get("amsgrad") else ()):
        assert mine.state[a][key].dtype == dtype  # kept in the parameter's dtype, as torch does
        assert_matches_torch(mine.state[a][key], theirs.state[b][key])


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_numpy_api_follows_torch_fused_too(dtype):
    p0 = torch.randn(N, generator=torch.Generator().manual_seed(0)).to(dtype)
    b = torch.nn.Parameter(p0.clone())
    theirs = torch.optim.AdamW([b], lr=1e-3, fused=True)
    np_dtype = ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float16
    p = p0.float().numpy().astype(np_dtype)
    mine = fastadam.AdamW([p], lr=1e-3)
    for g in gradients(N, dtype, 100):
        b.grad = g.clone()
        theirs.step()
        mine.step([g.float().numpy().astype(np_dtype)])
    assert_matches_torch(torch.from_numpy(p.view(np.int16)).view(dtype), b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_checkpoints_move_between_torch_fused_and_fastadam_both_ways(dtype):
    (a, mine), (b, theirs) = pair(dtype, ft.AdamW, torch.optim.AdamW, steps=30)
    # each continues from the other's checkpoint, on copies of the other's parameters
    a2, b2 = torch.nn.Parameter(b.detach().clone()), torch.nn.Parameter(a.detach().clone())
    mine2, theirs2 = ft.AdamW([a2], lr=1e-3), torch.optim.AdamW([b2], lr=1e-3, fused=True)
    mine2.load_state_dict(copy.deepcopy(theirs.state_dict()))  # as from a file: its own tensors
    theirs2.load_state_dict(copy.deepcopy(mine.state_dict()))
    theirs2.param_groups[0]["fused"] = True  # the loaded group says fastadam's fused=None
    assert mine2.state[a2]["exp_avg"].dtype == dtype and theirs2.state[b2]["exp_avg"].dtype == dtype
    for g in gradients(N, dtype, 30, seed=2):
        for p, opt in ((a, mine), (b, theirs), (a2, mine2), (b2, theirs2)):
            p.grad = g.clone()
            opt.step()
    assert_matches_torch(a2, b)
    assert_matches_torch(b2, a)


@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_split_master_weights_are_fastadams_float32_run(variant):
    p0 = torch.randn(N, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    a, f = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.float())
    split = ft.AdamW([a], lr=1e-3, master_weights="split", **variant)
    plain = ft.AdamW([f], lr=1e-3, **variant)
    for g in gradients(N, torch.bfloat16, 20):
        a.grad, f.grad = g.clone(), g.float()
        split.step()
        plain.step()
    low = split.state[a]["master_low"]
    assert low.dtype == torch.int16 and split.state[a]["exp_avg"].dtype == torch.float32
    master = _formats.split_master(a.detach().view(torch.int16).numpy().view(np.uint16),
                                   low.numpy().view(np.uint16))
    np.testing.assert_array_equal(master.view(np.uint32), f.detach().numpy().view(np.uint32))


@pytest.mark.parametrize("master_weights", ["split", "float32"])
def test_master_weights_survive_torchs_cast_on_load(master_weights):
    """torch's load_state_dict casts every state tensor to the parameter's dtype;
    fastadam.torch keeps its float32 moments and master (and split's int16 bits)."""
    p0 = torch.randn(N, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    a = torch.nn.Parameter(p0.clone())
    opt = ft.AdamW([a], lr=1e-3, master_weights=master_weights)
    for g in gradients(N, torch.bfloat16, 5):
        a.grad = g
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    b = torch.nn.Parameter(a.detach().clone())
    again = ft.AdamW([b], lr=1e-3, master_weights=master_weights)
    again.load_state_dict(saved)
    for key, value in opt.state[a].items():
        assert torch.equal(again.state[b][key], value), key
        assert again.state[b][key].dtype == value.dtype
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(a.detach().clone())], lr=1e-3, fused=True)
    torch_opt.load_state_dict(copy.deepcopy(saved))  # torch takes it (its moments rounded to bfloat16)
    for g in gradients(N, torch.bfloat16, 3, seed=4):
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        again.step()
    assert torch.equal(a, b)


def test_stochastic_rounding_moves_bfloat16_weights():
    p = torch.nn.Parameter(torch.ones(N, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.ones(N, dtype=torch.bfloat16))
    nearest = ft.Adam([p], lr=1e-3 / 1.5, betas=(0.0, 0.0), eps=0.0)
    stochastic = ft.Adam([q], lr=1e-3 / 1.5, betas=(0.0, 0.0), eps=0.0, param_rounding="stochastic")
    for _ in range(300):
        p.grad = torch.full_like(p, -1.0)
        q.grad = torch.full_like(q, -1.0)
        nearest.step()
        stochastic.step()
    assert (p.float() == 1).all()
    assert abs((q.float().mean().item() - 1) / (300 * 1e-3 / 1.5) - 1) < 0.02


@pytest.mark.parametrize("dtype, options, match", [
    (torch.float16, dict(master_weights="split"), r"param_groups\[0\]\['params'\]\[0\]: master_weights='split'"),
    (torch.float16, dict(param_rounding="stochastic"), "param_rounding='stochastic' is for bfloat16"),
    (torch.bfloat16, dict(state_dtype="bfloat16"), "needs float32 parameters or master weights"),
])
def test_options_that_do_not_fit_are_refused_naming_the_parameter(dtype, options, match):
    with pytest.raises(RuntimeError, match=match):
        ft.Adam([torch.nn.Parameter(torch.zeros(4, dtype=dtype))], **options)


def test_bfloat16_state_with_master_weights_is_compressed_float32_state():
    a = torch.nn.Parameter(torch.randn(N).to(torch.bfloat16))
    f = torch.nn.Parameter(a.detach().float())
    opt = ft.Adam([a], lr=1e-3, master_weights="float32", state_dtype="bfloat16", seed=3)
    ref = ft.Adam([f], lr=1e-3, state_dtype="bfloat16", seed=3)
    for g in gradients(N, torch.bfloat16, 10):
        a.grad, f.grad = g.clone(), g.float()
        opt.step()
        ref.step()
    assert torch.equal(opt.state[a]["master"], f.detach())
    assert torch.equal(a.detach(), f.detach().to(torch.bfloat16))
