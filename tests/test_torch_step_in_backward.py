"""fastadam.torch with step_in_backward=True: each parameter updated as its gradient is
accumulated, the gradient released.  Oracle: the ordinary mode (step() after backward), bit
for bit, which tests/test_torch_planned_step.py ties to fastadam.Adam and the other torch
tests to torch.optim.Adam; and torch.optim.AdamW for checkpoints."""
import copy
import pickle

import pytest

torch = pytest.importorskip("torch")
import fastadam  # noqa: E402
import fastadam.torch as ft  # noqa: E402
from fastadam import _torch_backward  # noqa: E402

if fastadam._backends.available()["cython"]:
    pytest.skip("the compiled kernel is not built", allow_module_level=True)

CONFIGS = {
    "float32": (torch.float32, {}),
    "flags": (torch.float32, dict(amsgrad=True, maximize=True, eps=1e-6)),
    "bf16-state": (torch.float32, dict(state_dtype="bfloat16", seed=3)),
    "bf16-nearest": (torch.bfloat16, {}),
    "bf16-stochastic": (torch.bfloat16, dict(param_rounding="stochastic", seed=4)),
    "bf16-split": (torch.bfloat16, dict(master_weights="split")),
    "bf16-master-bf16-state": (torch.bfloat16, dict(master_weights="float32", state_dtype="bfloat16")),
    "f16-master": (torch.float16, dict(master_weights="float32")),
}


class Net(torch.nn.Module):
    """Small and large tensors (buckets of several and of one), a tied weight (used twice in
    one graph), and a branch that gets no gradient when ``skip`` is set."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(20, 400)
        self.b = torch.nn.Linear(400, 200)
        self.tied = torch.nn.Linear(200, 200)
        self.branch = torch.nn.Linear(200, 10)
        self.out = torch.nn.Linear(200, 10)
        self.to(dtype)

    def forward(self, x, skip=False):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        h = self.tied(torch.relu(self.tied(h)))
        y = self.out(h)
        return y if skip else y + self.branch(h)


def batches(dtype, n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 20, generator=g).to(dtype), torch.randint(0, 10, (32,), generator=g))
            for _ in range(n)]


def train(in_backward, dtype, options, cls=ft.AdamW, steps=6, net=None, opt=None):
    net = net or Net(dtype)
    if opt is None:
        params = list(net.parameters())
        opt = cls([{"params": params[::2]}, {"params": params[1::2], "lr": 3e-3, "weight_decay": 0.0}],
                  lr=1e-2, step_in_backward=in_backward, **options)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for k, (x, y) in enumerate(batches(dtype, steps)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x, skip=k % 3 == 2).float(), y).backward()
        if in_backward:
            assert all(p.grad is None for p in net.parameters())  # applied and released
        opt.step()
        schedule.step()
    return net, opt


def assert_same(net_a, opt_a, net_b, opt_b):
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(a.view(torch.int16) if a.element_size() == 2 else a,
                           b.view(torch.int16) if b.element_size() == 2 else b), name
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sorted(sa) == sorted(sb), name
        for key in sa:
            assert torch.equal(sa[key].view(torch.int16) if sa[key].element_size() == 2 else sa[key],
                               sb[key].view(torch.int16) if sb[key].element_size() == 2 else sb[key]), (name, key)


@pytest.mark.parametrize("bucket_numel", [_torch_backward.BUCKET_NUMEL, 1])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_step_in_backward_is_the_ordinary_step_bit_for_bit(config, bucket_numel, monkeypatch):
    monkeypatch.setattr(_torch_backward, "BUCKET_NUMEL", bucket_numel)
    dtype, options = CONFIGS[config]
    assert_same(*train(False, dtype, options), *train(True, dtype, options))


def test_checkpoints_move_between_the_modes_and_torch():
    net, opt = train(True, torch.float32, {}, steps=3)
    ordinary_net, ordinary = train(False, torch.float32, {}, steps=3)
    saved = opt.state_dict()
    params = list(copy.deepcopy(net).parameters())
    torch_twin = torch.optim.AdamW([{"params": params[::2]}, {"params": params[1::2]}], lr=1e-2)
    torch_twin.load_state_dict(copy.deepcopy(saved))  # the format is torch's
    for k, st in torch_twin.state_dict()["state"].items():
        assert all(torch.equal(t, saved["state"][k][key]) for key, t in st.items())
    for k, st in ordinary.state_dict()["state"].items():
        for key, t in st.items():
            assert torch.equal(saved["state"][k][key], t)
    # an ordinary checkpoint continues in backward and the other way, as the ordinary run
    for first, second in ((False, True), (True, False)):
        a_net, a = train(first, torch.float32, {}, steps=3)
        b_net = copy.deepcopy(a_net)
        params = list(b_net.parameters())
        b = ft.AdamW([{"params": params[::2]}, {"params": params[1::2]}], lr=1e-2,
                     step_in_backward=second)
        b.load_state_dict(copy.deepcopy(a.state_dict()))  # torch's load shares tensors of a dtype
        train(first, torch.float32, {}, net=a_net, opt=a, steps=3)
        train(second, torch.float32, {}, net=b_net, opt=b, steps=3)
        assert_same(a_net, a, b_net, b)


def test_a_second_backward_before_step_is_refused_and_changes_nothing():
    net = Net(torch.float32)
    opt = ft.Adam(net.parameters(), lr=1e-2, step_in_backward=True)
    x, y = batches(torch.float32, 1)[0]
    torch.nn.functional.cross_entropy(net(x), y).backward()
    after_first = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="accumulat"):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), after_first))
    assert all(p.grad is None for p in net.parameters())  # the refused pass left no gradient
    assert all(opt.state[p]["step"].item() == 1 for p in net.parameters())
    opt.step()  # acknowledged: the next backward is the next step
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    assert all(opt.state[p]["step"].item() == 2 for p in net.parameters())


def test_a_closure_and_gradients_set_by_hand_are_stepped_as_the_ordinary_mode():
    nets = [Net(torch.float32) for _ in range(2)]
    opts = [ft.Adam(n.parameters(), lr=1e-2, step_in_backward=mode) for n, mode in zip(nets, (False, True))]
    x, y = batches(torch.float32, 1)[0]
    for net, opt in zip(nets, opts):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss
        assert opt.step(closure) is not None
        opt.zero_grad()
        net.out.bias.grad = torch.ones_like(net.out.bias)  # no backward: step() takes it
        opt.step()
    assert_same(nets[0], opts[0], nets[1], opts[1])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_groups_added_and_copies_step_in_backward(how):
    """A group added later is stepped in backward too; a copy of the model with its
    optimizer (one deepcopy or pickle) hooks its own parameters and goes on as the original."""
    dtype, options = CONFIGS["bf16-stochastic"]
    runs = []
    for mode in (False, True):
        net = Net(dtype)
        opt = ft.Adam(net.a.parameters(), lr=1e-2, step_in_backward=mode, **options)
        opt.add_param_group({"params": [p for m in (net.b, net.tied, net.branch, net.out)
                                        for p in m.parameters()], "lr": 5e-3})
        train(mode, dtype, options, net=net, opt=opt, steps=2)
        twin_net, twin = (copy.deepcopy((net, opt)) if how == "deepcopy"
                          else pickle.loads(pickle.dumps((net, opt))))
        assert twin._step_in_backward is mode
        train(mode, dtype, options, net=twin_net, opt=twin, steps=3)
        train(mode, dtype, options, net=net, opt=opt, steps=3)
        assert_same(net, opt, twin_net, twin)
        runs.append((twin_net, twin))
    assert_same(*runs[0], *runs[1])


def test_step_in_backward_must_be_a_bool():
    with pytest.raises(TypeError, match="step_in_backward"):
        ft.Adam(Net(torch.float32).parameters(), step_in_backward="yes")


def test_a_dropped_optimizer_is_freed_and_no_longer_steps():
    """The hooks hold the optimizer weakly: the model outlives it, its state is freed, and
    the model's gradients are then accumulated as without it."""
    import gc
    import weakref
    net = Net(torch.float32)
    opt = ft.Adam(net.parameters(), lr=1e-2, step_in_backward=True)
    x, y = batches(torch.float32, 1)[0]
    torch.nn.functional.cross_entropy(net(x), y).backward()
    gone = weakref.ref(opt)
    before = [p.detach().clone() for p in net.parameters()]
    del opt
    gc.collect()
    assert gone() is None
    torch.nn.functional.cross_entropy(net(x), y).backward()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert all(p.grad is not None for p in net.parameters())
