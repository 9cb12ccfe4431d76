"""fastadam.torch: drop-in for torch.optim.Adam/AdamW on the CPU, checked against torch itself."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastadam  # noqa: E402
import fastadam.torch as ft  # noqa: E402

if fastadam._backends.available()["cython"]:
    pytest.skip("the compiled kernel is not built", allow_module_level=True)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(256, 20, generator=g), torch.randint(0, 10, (256,), generator=g)


def train(cls, steps, model=None, opt_state=None, **kw):
    """Losses of a real loop: an MLP, two parameter groups, AMSGrad, a StepLR schedule."""
    model = model or mlp()
    X, y = data()
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.05},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "lr": 3e-3}]
    opt = cls(groups, lr=1e-2, amsgrad=True, **kw)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    return np.array(losses), model, opt


@pytest.mark.parametrize("ours, theirs", [(ft.AdamW, torch.optim.AdamW), (ft.Adam, torch.optim.Adam)])
def test_a_real_loop_follows_torch(ours, theirs):
    expected, _, _ = train(theirs, 150, foreach=False)
    got, _, _ = train(ours, 150)
    np.testing.assert_allclose(got, expected, rtol=1e-3)
    assert got[-1] < 0.9 * got[0]   # and it trains


def test_the_step_is_fastadams_step_on_the_same_memory(rng):
    p0 = rng.standard_normal((50, 40)).astype(np.float32)
    grads = [rng.standard_normal((50, 40)).astype(np.float32) for _ in range(5)]
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = ft.Adam([param], lr=0.01, weight_decay=0.1, maximize=True)
    ref = p0.copy()
    ref_opt = fastadam.Adam([ref], lr=0.01, weight_decay=0.1, maximize=True, backend="numpy")
    for g in grads:
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        ref_opt.step([g])
    np.testing.assert_array_equal(param.detach().numpy(), ref)
    state = opt.state[param]
    np.testing.assert_array_equal(state["exp_avg"].numpy(), ref_opt.state[0]["exp_avg"])
    assert state["step"].dtype == torch.float32 and state["step"].item() == 5.0


@pytest.mark.parametrize("first, second", [(torch.optim.AdamW, ft.AdamW), (ft.AdamW, torch.optim.AdamW)])
def test_checkpoints_move_between_torch_and_fastadam(first, second):
    expected, _, _ = train(torch.optim.AdamW, 60, foreach=False)
    head, model, opt = train(first, 25)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["param_groups"][0]["decoupled_weight_decay"] is True
    # the schedule's position travels in the group's lr; continue from where it was
    tail, _, _ = train(second, 35, model=model, opt_state=sd)
    np.testing.assert_allclose(np.concatenate([head, tail])[:26], expected[:26], rtol=1e-3)
    assert tail[-1] < head[0]


def test_parameters_without_a_gradient_are_left_alone():
    a, b = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(10))
    opt = ft.Adam([a, b], lr=0.1)
    a.grad = torch.ones(10)
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(10))
    assert torch.all(a.detach() < 1)
    b.grad = torch.ones(10)     # a parameter that gets a gradient later joins the step
    opt.step()
    assert opt.state[b]["step"].item() == 1.0 and opt.state[a]["step"].item() == 2.0


@pytest.mark.parametrize("make, match", [
    (lambda: torch.nn.Parameter(torch.randn(4, 4).t()), "is not contiguous"),
    (lambda: torch.nn.Parameter(torch.randn(4).to(torch.float8_e4m3fn)),
     "float8_e4m3fn; fastadam.torch supports float32, float64, bfloat16 and float16"),
    (lambda: torch.nn.Parameter(torch.randn(4, dtype=torch.complex64)), "is complex"),
    (lambda: torch.nn.Parameter(torch.empty(4, device="meta")), "is on meta.*runs on the CPU"),
])
def test_unfit_parameters_are_refused_saying_what_to_do(make, match):
    with pytest.raises(RuntimeError, match=match):
        ft.Adam([make()])


def test_a_sparse_gradient_is_refused_and_nothing_changes():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = ft.Adam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse.*SparseAdam"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before) and not opt.state


def test_bad_hyperparameters_get_torchs_messages():
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        ft.Adam([torch.nn.Parameter(torch.ones(2))], lr=-1)
    with pytest.raises(ValueError, match="use fastadam.torch.AdamW"):
        ft.Adam([torch.nn.Parameter(torch.ones(2))], decoupled_weight_decay=True)


def test_import_fastadam_does_not_import_torch():
    code = "import sys, fastadam; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import fastadam imported {out.stdout}"


@pytest.mark.slow  # a training run
def test_the_docs_example_trains_mnist():
    script = Path(__file__).resolve().parents[1] / "docs" / "examples" / "torch_mnist.py"
    if not script.exists():
        pytest.skip("the docs are not beside these tests (an installed wheel's test run)")
    out = subprocess.run([sys.executable, script, "--epochs", "1"], check=True, capture_output=True,
                         text=True).stdout
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy > 94.0, out


# -- the planned step follows whatever changed between steps, as torch's own step does --

def _replace_param_memory(p, opt):
    p.data = p.data.clone()


def _replace_exp_avg(p, opt):
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].clone() * 0.5


def _swap_exp_avg_sq_memory(p, opt):
    opt.state[p]["exp_avg_sq"].data = opt.state[p]["exp_avg_sq"].data.clone() * 2.0


def _restart_step(p, opt):
    opt.state[p]["step"] = torch.tensor(1.0)


def _reset_state_of_p(p, opt):
    opt.state[p] = {}


def _pop_state_of_p(p, opt):
    opt.state.pop(p)


def _reset_all_state(p, opt):
    import collections
    opt.state = collections.defaultdict(dict)


def _drop_gradient(p, opt):
    p.grad = None


def _replace_group_dict(p, opt):
    opt.param_groups[0] = dict(opt.param_groups[0], lr=0.003, betas=(0.8, 0.99))


def _gradient_of_a_subclass(p, opt):
    class Marked(torch.Tensor):
        pass
    p.grad = p.grad.as_subclass(Marked)


def _gradient_that_requires_grad(p, opt):
    p.grad = p.grad.clone().requires_grad_()


def _gradient_with_a_storage_offset(p, opt):
    p.grad = torch.cat([torch.zeros(7), p.grad.flatten()])[7:].view(p.shape)


@pytest.mark.parametrize("change", [_replace_param_memory, _replace_exp_avg, _swap_exp_avg_sq_memory,
                                    _restart_step, _reset_state_of_p, _pop_state_of_p, _reset_all_state,
                                    _drop_gradient, _replace_group_dict, _gradient_of_a_subclass,
                                    _gradient_that_requires_grad, _gradient_with_a_storage_offset])
def test_a_change_between_steps_is_followed_as_torch_follows_it(change, rng):
    """torch.optim.Adam reads its state and parameters afresh every step; after any of
    these changes fastadam.torch must step what torch steps (oracle: torch itself)."""
    p0 = rng.standard_normal((3, 300)).astype(np.float32)
    grads = rng.standard_normal((8, 3, 300)).astype(np.float32)
    runs = []
    for cls in (torch.optim.Adam, ft.Adam):
        params = [torch.nn.Parameter(torch.from_numpy(row.copy())) for row in p0]
        opt = cls(params, lr=0.01, **({"foreach": False} if cls is torch.optim.Adam else {}))
        for k, g in enumerate(grads):
            for p, row in zip(params, g):
                p.grad = torch.from_numpy(row.copy())
            if k == 4:
                change(params[1], opt)
            opt.step()
        runs.append((torch.stack([p.detach() for p in params]).numpy(),
                     [opt.state[p]["step"].item() if "step" in opt.state[p] else None for p in params]))
    (expected, expected_steps), (got, got_steps) = runs
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got_steps == expected_steps


def test_switching_amsgrad_on_creates_its_running_max_as_a_state_tensor(rng):
    p0, grads = rng.standard_normal(500).astype(np.float32), rng.standard_normal((6, 500)).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = ft.Adam([param], lr=0.01)
    ref = p0.copy()
    ref_opt = fastadam.Adam([ref], lr=0.01, backend="numpy")
    for k, g in enumerate(grads):
        if k == 3:
            opt.param_groups[0]["amsgrad"] = ref_opt.param_groups[0]["amsgrad"] = True
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        ref_opt.step([g])
    np.testing.assert_array_equal(param.detach().numpy(), ref)
    np.testing.assert_array_equal(opt.state[param]["max_exp_avg_sq"].numpy(),
                                  ref_opt.state[0]["max_exp_avg_sq"])


def test_a_gradient_of_another_dtype_met_on_the_planned_path_is_refused_and_nothing_changes():
    param = torch.nn.Parameter(torch.ones(10))
    opt = ft.Adam([param], lr=0.1)
    param.grad = torch.ones(10)
    opt.step()
    before = (param.detach().clone(), {k: v.clone() for k, v in opt.state[param].items()})
    param.grad.data = torch.ones(10, dtype=torch.float64)  # past torch's own setter check
    with pytest.raises(RuntimeError, match=r"gradient of param_groups\[0\]\['params'\]\[0\] has dtype torch.float64"):
        opt.step()
    assert torch.equal(param.detach(), before[0])
    assert all(torch.equal(opt.state[param][k], v) for k, v in before[1].items())


def test_steps_from_two_threads_are_each_whole(rng):
    """Two threads step one new optimizer (both may build its plan at once): every
    step is counted once and the result equals 2 x 200 steps taken one after
    another (the gradients are the same every step)."""
    import threading
    p0 = rng.standard_normal((4, 1000)).astype(np.float32)
    params = [torch.nn.Parameter(torch.from_numpy(row.copy())) for row in p0]
    for p in params:
        p.grad = torch.ones(1000) * 1e-2
    opt = ft.Adam(params, lr=1e-3)

    def work():
        for _ in range(200):
            opt.step()
    threads = [threading.Thread(target=work) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    serial = [torch.nn.Parameter(torch.from_numpy(row.copy())) for row in p0]
    for p in serial:
        p.grad = torch.ones(1000) * 1e-2
    serial_opt = ft.Adam(serial, lr=1e-3)
    for _ in range(400):
        serial_opt.step()
    assert [opt.state[p]["step"].item() for p in params] == [400.0] * 4
    for p, q in zip(params, serial):
        assert torch.equal(p.detach(), q.detach())


def test_malformed_betas_set_between_steps_get_a_named_error_and_nothing_changes():
    param = torch.nn.Parameter(torch.ones(10))
    opt = ft.Adam([param], lr=0.1)
    param.grad = torch.ones(10)
    opt.step()
    before = param.detach().clone()
    opt.param_groups[0]["betas"] = (0.9, 0.999, 0.5)
    with pytest.raises((ValueError, TypeError), match=r"param_groups\[0\]|betas"):
        opt.step()
    assert torch.equal(param.detach(), before) and opt.state[param]["step"].item() == 1.0


@pytest.mark.parametrize("bad_gradient, match", [
    (lambda p: torch.randn(2 * p.numel())[::2], "gradient of param_groups.0..'params'..0. is not contiguous"),
    (lambda p: torch._neg_view(torch.randn(p.numel())), "gradient of .* negative bit.*resolve_neg"),
    (lambda p: torch.randn(5, 2), r"gradient of param_groups\[0\]\['params'\]\[0\] has shape \(5, 2\); "
                                 r"its parameter has \(10,\)"),
])
def test_an_unfit_gradient_met_on_the_planned_path_is_refused_and_nothing_changes(bad_gradient, match):
    param = torch.nn.Parameter(torch.ones(10))
    opt = ft.Adam([param], lr=0.1)
    param.grad = torch.ones(10)
    opt.step()   # the plan is built
    before = (param.detach().clone(), {k: v.clone() for k, v in opt.state[param].items()})
    param.grad.data = bad_gradient(param)  # .data: past torch's own setter check
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(param.detach(), before[0])
    assert all(torch.equal(opt.state[param][k], v) for k, v in before[1].items())
    param.grad = torch.ones(10)  # and it goes on
    opt.step()
    assert opt.state[param]["step"].item() == 2.0


def test_a_second_order_gradient_loop_follows_torch(rng):
    """Gradients made with create_graph=True require grad themselves; torch's Adam reads them."""
    runs = []
    for cls in (torch.optim.Adam, ft.Adam):
        model = mlp(3)
        X, y = data()
        opt = cls(model.parameters(), lr=1e-2, **({"foreach": False} if cls is torch.optim.Adam else {}))
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(X), y)
            grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            assert all(p.grad.requires_grad for p in model.parameters())
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for got, expected in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_float64_parameters_and_step_tensors_follow_torch(rng):
    """Under a float64 default dtype torch keeps float64 parameters and float64 step tensors;
    a checkpoint moves both ways and the steps go on as torch's."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        p0 = rng.standard_normal((4, 25))
        grads = rng.standard_normal((9, 4, 25))
        runs = []
        for first, second in ((torch.optim.Adam, torch.optim.Adam), (ft.Adam, torch.optim.Adam),
                              (torch.optim.Adam, ft.Adam)):
            param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
            opt = first([param], lr=0.01, amsgrad=True)
            for k, g in enumerate(grads):
                if k == 5:
                    state = opt.state_dict()
                    opt = second([param], lr=0.01, amsgrad=True)
                    opt.load_state_dict(state)
                param.grad = torch.from_numpy(g.copy())
                opt.step()
                step = opt.state[param]["step"]
                assert step.dtype == torch.float64 and step.item() == k + 1
            runs.append(param.detach().numpy().copy())
        np.testing.assert_allclose(runs[1], runs[0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(runs[2], runs[0], rtol=1e-12, atol=1e-15)
    finally:
        torch.set_default_dtype(previous)


def test_the_plan_is_kept_from_step_to_step_with_fresh_gradients(monkeypatch):
    """The planned path, not a rebuild, takes a step whose gradients are new tensors
    (zero_grad(set_to_none=True)), and reads them where they are."""
    model = mlp()
    X, y = data()
    opt = ft.AdamW(model.parameters(), lr=1e-3)
    builds = []
    build = ft.Adam._build
    monkeypatch.setattr(ft.Adam, "_build", lambda self, params: (builds.append(1), build(self, params)))
    seen = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(X), y).backward()
        grads = opt._plan.gradients(opt.param_groups, opt.state) if opt._plan is not None else None
        if grads is not None:
            seen.append(all(np.shares_memory(a, p.grad.numpy()) for a, p in zip(grads, model.parameters())))
        opt.step()
    assert builds == [1] and seen == [True] * 3


def test_ctrl_c_inside_a_planned_step_changes_nothing_and_frees_the_lock(rng):
    """A KeyboardInterrupt raised while the compiled plan reads the gradients (here from a
    gradient's detach(), which the plan calls for a Tensor subclass) propagates, leaves the
    parameters and state as they were, releases the optimizer's lock, and the next step is
    the step torch.optim.Adam takes (oracle: torch, which never saw the interrupted step)."""
    class Interrupting(torch.Tensor):
        def detach(self):
            raise KeyboardInterrupt

    p0 = rng.standard_normal((2, 64)).astype(np.float32)
    grads = rng.standard_normal((4, 2, 64)).astype(np.float32)
    mine = [torch.nn.Parameter(torch.from_numpy(row.copy())) for row in p0]
    theirs = [torch.nn.Parameter(torch.from_numpy(row.copy())) for row in p0]
    opt, oracle = ft.Adam(mine, lr=0.01), torch.optim.Adam(theirs, lr=0.01, foreach=False)
    for k in (0, 1):
        for params, o in ((mine, opt), (theirs, oracle)):
            for p, row in zip(params, grads[k]):
                p.grad = torch.from_numpy(row.copy())
            o.step()
    plan = opt._plan
    before = ([p.detach().clone() for p in mine],
              {i: {key: t.clone() for key, t in opt.state[p].items()} for i, p in enumerate(mine)})
    mine[0].grad = torch.from_numpy(grads[2][0].copy())
    mine[1].grad = torch.from_numpy(grads[2][1].copy()).as_subclass(Interrupting)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert opt._plan is plan  # it was the planned path that was interrupted
    assert opt._lock.acquire(blocking=False)
    opt._lock.release()
    for p, old in zip(mine, before[0]):
        assert torch.equal(p.detach(), old)
    for i, p in enumerate(mine):
        for key, old in before[1][i].items():
            assert torch.equal(opt.state[p][key], old), key
    for params, o in ((mine, opt), (theirs, oracle)):
        for p, row in zip(params, grads[3]):
            p.grad = torch.from_numpy(row.copy())
        o.step()
    for p, q in zip(mine, theirs):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-6, atol=1e-7)
        assert opt.state[p]["step"].item() == oracle.state[q]["step"].item()


@pytest.mark.parametrize("group, match", [
    ({"params": [torch.nn.Parameter(torch.zeros(4).to(torch.float8_e5m2))]}, "float8_e5m2"),
    ({"params": [torch.zeros(4, requires_grad=True)], "lr": -1.0}, "learning rate"),
])
def test_a_refused_param_group_is_not_added(group, match, rng):
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(8).astype(np.float32)))
    opt = ft.Adam([p], lr=0.1)
    ref = torch.optim.Adam([torch.nn.Parameter(p.detach().clone())], lr=0.1, foreach=False)
    with pytest.raises((RuntimeError, ValueError), match=match):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1
    g = torch.from_numpy(rng.standard_normal(8).astype(np.float32))
    p.grad, ref.param_groups[0]["params"][0].grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    torch.testing.assert_close(p.detach(), ref.param_groups[0]["params"][0].detach(), rtol=1e-6, atol=0)
