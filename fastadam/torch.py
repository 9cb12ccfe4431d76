"""fastadam for PyTorch: ``fastadam.torch.Adam`` and ``AdamW``, drop-in for
``torch.optim.Adam``/``AdamW`` on the CPU (``pip install "fastadam[torch]"``).

They are ``torch.optim.Optimizer`` subclasses: param groups, ``zero_grad``,
``add_param_group``, ``state_dict``/``load_state_dict`` in torch's exact format
(a checkpoint moves between ``torch.optim.Adam`` and ``fastadam.torch.Adam``
both ways) and the ``torch.optim.lr_scheduler`` schedulers work unchanged.  A
step updates the parameters in place through zero-copy NumPy views of the same
memory, all tensors in one call of fastadam's kernel (the update rule is
:class:`fastadam.Adam`'s); the state tensors (``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``, ``step``) are the kernel's buffers.

Only what the kernel can update in place is accepted: CPU, dense, contiguous
float32 or float64 parameters and gradients.  Anything else is refused with an
error that names the parameter and says what to do.  This module is the only
one that imports torch.
"""
import torch
import torch.optim.optimizer as _torch_optimizer

from . import _optimizer, _rules

__all__ = ["Adam", "AdamW"]

_BUFFERS = _rules.STATE_BUFFERS


def _refuse_unfit(t, what):
    """Refuse a tensor the kernel cannot update (or read) in place, saying what to do."""
    if t.is_sparse or t.layout != torch.strided:
        raise RuntimeError(f"{what} is sparse ({t.layout}); fastadam.torch supports dense "
                           "tensors only (use torch.optim.SparseAdam for sparse gradients)")
    if t.device.type != "cpu":
        raise RuntimeError(f"{what} is on {t.device}; fastadam.torch runs on the CPU "
                           "(move the model with .cpu(), or use torch.optim.Adam on the device)")
    if t.is_complex():
        raise RuntimeError(f"{what} is complex ({t.dtype}); fastadam.torch supports float32 and "
                           "float64 (view it as real with torch.view_as_real, or use torch.optim.Adam)")
    if t.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{what} has dtype {t.dtype}; fastadam.torch supports float32 and "
                           "float64 (keep float32 master weights, or use torch.optim.Adam)")
    if not t.is_contiguous():
        raise RuntimeError(f"{what} is not contiguous; the update is in place (make the "
                           "parameter contiguous once, before creating the optimizer)")


def _view(t):
    """A NumPy array sharing ``t``'s memory."""
    return t.detach().numpy()


class Adam(torch.optim.Optimizer):
    """``torch.optim.Adam`` with fastadam's kernel doing the step.

    Arguments as ``torch.optim.Adam`` (``foreach``, ``capturable``, ``differentiable``
    and ``fused`` are accepted for compatibility and must keep their defaults),
    plus ``num_threads`` (as :class:`fastadam.Adam`).
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=None, num_threads=None):
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled
        if decoupled_weight_decay is not self._decoupled:
            raise ValueError(f"decoupled_weight_decay={decoupled_weight_decay} is "
                             f"{'AdamW' if decoupled_weight_decay else 'Adam'}; use "
                             f"fastadam.torch.{'AdamW' if decoupled_weight_decay else 'Adam'}")
        if capturable or differentiable or fused:
            raise ValueError("capturable, differentiable and fused are torch's own step "
                             "implementations; fastadam.torch has one (leave them unset)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=False,
                        differentiable=False, fused=None,
                        decoupled_weight_decay=self._decoupled)
        self._num_threads = num_threads
        self._inner = None
        self._key = ()
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        i = len(self.param_groups) - 1
        for j, p in enumerate(self.param_groups[i]["params"]):
            _refuse_unfit(p, f"param_groups[{i}]['params'][{j}]")
        _rules.hyperparameters(_hyperparameters(self.param_groups[i]), f" (param_groups[{i}])")
        self._inner = None

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._inner = None

    # -- the step -------------------------------------------------------------

    def _gradients(self):
        """This step's parameters (those with a gradient), their gradients as NumPy
        views, and a key that changes when the kernel's buffers would."""
        params, grads, key = [], [], []
        for i, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.layout is not torch.strided or g.dtype != p.dtype or not g.is_contiguous():
                    where = f"the gradient of param_groups[{i}]['params'][{j}]"
                    _refuse_unfit(g, where)
                    raise RuntimeError(f"{where} has dtype {g.dtype}; its parameter has {p.dtype}")
                st = self.state.get(p, {})
                key.append((i, p, p.data_ptr(), st.get("exp_avg"), st.get("max_exp_avg_sq"),
                            group["amsgrad"]))
                params.append(p)
                grads.append(g.numpy())
        return params, grads, key

    def _build(self, params):
        """A fastadam optimizer over views of ``params``, grouped as here, whose
        state is views of this optimizer's state tensors (created as torch does)."""
        index = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}
        self._order = params  # in group order, as _gradients lists them
        self._group_of = sorted({index[id(p)] for p in params})
        groups = [dict(params=[_view(p) for p in self._order if index[id(p)] == i],
                       **_hyperparameters(self.param_groups[i])) for i in self._group_of]
        for k, p in enumerate(self._order):
            _refuse_unfit(p, f"the parameter {k} of this step")
        inner = (_optimizer.AdamW if self._decoupled else _optimizer.Adam)(
            groups, num_threads=self._num_threads)
        for k, p in enumerate(self._order):
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)  # torch's scalar step
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.param_groups[index[id(p)]]["amsgrad"] and "max_exp_avg_sq" not in st:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for key in _BUFFERS:
                if key in st:
                    _refuse_unfit(st[key], f"state[p][{key!r}] of the parameter {k} of this step")
            entry = {key: _view(st[key]) for key in _BUFFERS if key in st}
            entry["step"] = int(st["step"].item())
            inner.state[k] = entry
        self._inner = inner
        # float32 views of the step tensors: a step sets them without a torch call.
        self._step_views = [self.state[p]["step"].detach().view(1).numpy() for p in self._order]

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, key = self._gradients()
        if not grads:
            return loss
        if self._inner is None or not _same_buffers(key, self._key):
            with torch.no_grad():
                self._build(params)
            self._key = self._gradients()[2]
        inner = self._inner
        for inner_group, i in zip(inner.param_groups, self._group_of):
            group = self.param_groups[i]  # schedulers change them
            for name in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
                inner_group[name] = group[name]
            if isinstance(group["lr"], torch.Tensor) or not isinstance(group["betas"], tuple):
                inner_group.update(_hyperparameters(group))
        inner.step(grads)
        for k, view in enumerate(self._step_views):
            view[0] = inner.state[k]["step"]
        return loss


def _hooks_or_profiler(opt):
    """Whether a step must go through torch's step wrapper: an optimizer step hook is
    registered, or the autograd profiler records (torch's wrapper costs ~10 us a step)."""
    return bool(opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
                or getattr(_torch_optimizer, "_global_optimizer_pre_hooks", True)
                or getattr(_torch_optimizer, "_global_optimizer_post_hooks", True)
                or getattr(torch.autograd.profiler, "_is_profiler_enabled", True))


def _step(self, closure=None):
    """One step over every parameter with a gradient; returns the closure's loss.

    Optimizer step hooks and the autograd profiler's record apply as for any
    torch optimizer (through torch's own wrapper, taken only when one is active)."""
    if _hooks_or_profiler(self):
        return _hooked_step(self, closure)
    return self._step(closure)


_hooked_step = torch.optim.Optimizer.profile_hook_step(Adam._step)
_step.hooked = True  # torch's Optimizer must not wrap it again
Adam.step = _step


def _same_buffers(key, planned):
    """Whether a step's key (see Adam._gradients) is the planned one: the same groups,
    parameter objects at the same memory, state tensors and amsgrad flags."""
    return len(key) == len(planned) and all(
        a[0] == b[0] and a[1] is b[1] and a[2] == b[2] and a[3] is b[3] and a[4] is b[4]
        and a[5] == b[5] for a, b in zip(key, planned))


def _hyperparameters(group):
    """A torch group's hyperparameters as fastadam takes them (tensors read as floats)."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    return dict(lr=float(lr) if isinstance(lr, torch.Tensor) else lr,
                betas=(float(beta1) if isinstance(beta1, torch.Tensor) else beta1,
                       float(beta2) if isinstance(beta2, torch.Tensor) else beta2),
                eps=group["eps"], weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"], maximize=group["maximize"])


class AdamW(Adam):
    """``torch.optim.AdamW`` with fastadam's kernel doing the step (default weight_decay=1e-2)."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, num_threads=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         num_threads=num_threads)
