"""fastadam for PyTorch: ``fastadam.torch.Adam`` and ``AdamW``, drop-in for
``torch.optim.Adam``/``AdamW`` on the CPU (``pip install "fastadam[torch]"``).

They are ``torch.optim.Optimizer`` subclasses: param groups, ``zero_grad``,
``add_param_group``, ``state_dict``/``load_state_dict`` in torch's exact format
(a checkpoint moves between ``torch.optim.Adam`` and ``fastadam.torch.Adam``
both ways) and the ``torch.optim.lr_scheduler`` schedulers work unchanged.  A
step updates the parameters in place, all tensors in one call of fastadam's
kernel on their own memory (the update rule is :class:`fastadam.Adam`'s), or
with ``step_in_backward=True`` during the backward pass; the state tensors (``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``, ``step``) are the kernel's buffers.

``state_dtype="bfloat16"`` keeps m and v as bfloat16 state tensors (fastadam's
stochastic rounding, see docs/compressed-state.md); their checkpoints load into
``torch.optim.Adam`` as float32 state, and float32 checkpoints load into it
rounded to nearest.

bfloat16 and float16 parameters are updated as ``torch.optim.Adam(fused=True)``
updates them (state in the parameter's dtype, float32 math, rounded to nearest;
docs/low-precision.md), or with ``param_rounding="stochastic"`` or
``master_weights="split"``/``"float32"`` as :class:`fastadam.Adam` has them.  Only
what the kernel can update in place is accepted: CPU, dense, contiguous
parameters and gradients of those dtypes.  Anything else is refused with an error
that names the parameter and says what to do.  This module and its helper
``_torch_tensors`` are the only ones that import torch.
"""
import itertools

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer

from . import _fork, _formats, _optimizer, _rules, _step, _torch_backward
from ._torch_tensors import TrackedState as _TrackedState
from ._torch_tensors import numpy_dtype as _numpy_dtype
from ._torch_tensors import refuse_unfit as _refuse_unfit
from ._torch_tensors import view as _view
from ._torch_tensors import zeros_like as _zeros_like
from ._variants import with_defaults

try:
    from . import _kernel
except ImportError as e:  # a source tree whose extensions are not built
    raise ImportError("fastadam.torch needs fastadam's compiled extension, which is not built "
                      "(pip install fastadam, or pip install -e . in a source tree)") from e

__all__ = ["Adam", "AdamW"]

_BUFFERS = _rules.STATE_BUFFERS
# The dtype torch.optim.Adam gives its step tensors (float64 under a float64 default dtype).
_scalar_dtype = getattr(_torch_optimizer, "_get_scalar_dtype", lambda: torch.float32)


# torch's registries of global step hooks (module-level dicts that registration fills);
# where a torch version lacks one, a non-empty stand-in sends every step through torch's wrapper.
_GLOBAL_PRE_HOOKS = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", {None: None})
_GLOBAL_POST_HOOKS = getattr(_torch_optimizer, "_global_optimizer_post_hooks", {None: None})
_PROFILER = torch.autograd.profiler
if not hasattr(_PROFILER, "_is_profiler_enabled"):  # not this torch's flag: always the wrapper
    _GLOBAL_PRE_HOOKS = {None: None}



class Adam(torch.optim.Optimizer):
    """``torch.optim.Adam`` with fastadam's kernel doing the step.

    Arguments as ``torch.optim.Adam`` (``foreach``, ``capturable``, ``differentiable``
    and ``fused`` are accepted for compatibility and must keep their defaults),
    plus ``num_threads``, ``state_dtype`` (``"float32"``: the parameters' dtype,
    as torch; or ``"bfloat16"``, for float32 parameters or master weights) with its
    rounding ``seed``, ``param_rounding`` and ``master_weights``, as
    :class:`fastadam.Adam` has them.  8-bit state is fastadam.Adam's only: its
    codes are not moments, and torch.optim.Adam would load them as if they were.

    ``step_in_backward=True`` updates each parameter during ``loss.backward()``, as
    soon as its gradient is accumulated, and releases that gradient (docs/torch.md,
    "Step in backward"); ``step()`` then has nothing left to do, but must still be
    called after each backward pass.
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=None, num_threads=None,
                 state_dtype="float32", seed=0, param_rounding="nearest", master_weights=None,
                 step_in_backward=False):
        self._step_in_backward = _rules.flag(step_in_backward, "step_in_backward")
        self._in_backward = None
        self._state_dtype = _rules.state_dtype(state_dtype)
        if self._state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"state_dtype={state_dtype!r}: fastadam.torch keeps 'float32' or "
                             "'bfloat16' state (8-bit codes are not moments, and torch.optim.Adam "
                             "would load them as if they were; use fastadam.Adam over NumPy views)")
        self._seed = _rules.seed(seed)
        self._param_rounding = _rules.param_rounding(param_rounding)
        self._master_weights = _rules.master_weights(master_weights)
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled
        if decoupled_weight_decay is not self._decoupled:
            raise ValueError(f"decoupled_weight_decay={decoupled_weight_decay} is "
                             f"{'AdamW' if decoupled_weight_decay else 'Adam'}; use "
                             f"fastadam.torch.{'AdamW' if decoupled_weight_decay else 'Adam'}")
        if capturable or differentiable or fused:
            raise ValueError("capturable, differentiable and fused are torch's own step "
                             "implementations; fastadam.torch has one (leave them unset)")
        _refuse_tensor_hyperparameters(lr, betas, foreach)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=False,
                        differentiable=False, fused=None,
                        decoupled_weight_decay=self._decoupled)
        for name in _step.FLAGS:  # every option flag is a group key, False unless set above
            defaults.setdefault(name, False)
        self._num_threads = num_threads
        self._lock = _kernel.Lock()  # a step, add_param_group and load_state_dict are whole
        self._plan = None
        self._places = None  # a parameter's place for its rounding draws, where another optimizer sets it
        _fork.register(self)
        super().__init__(params, defaults)
        if self._step_in_backward:
            self._start_in_backward()

    # What torch's Optimizer pickles (defaults, state, param_groups), and this one's own.
    _OWN = ("_state_dtype", "_seed", "_num_threads", "_param_rounding", "_master_weights",
            "_step_in_backward")

    def __getstate__(self):
        attributes = super().__getstate__()
        attributes.update({name: getattr(self, name) for name in self._OWN})
        return attributes

    def __setstate__(self, attributes):
        """As torch.optim.Adam's (it fills in what older checkpoints lack, and makes
        non-tensor step counts tensors); a copy or an unpickled optimizer gets a lock
        of its own and plans its first step anew."""
        super().__setstate__(attributes)
        self._lock = _kernel.Lock()
        self._plan = None
        self._places = None
        if not hasattr(self, "_step_in_backward"):  # pickled before the option
            self._step_in_backward = False
        _fork.register(self)
        for group in self.param_groups:
            for key, value in (*((name, False) for name in _step.FLAGS), ("foreach", None),
                               ("capturable", False), ("differentiable", False), ("fused", None)):
                group.setdefault(key, value)
            group.setdefault("decoupled_weight_decay", self._decoupled)
            for p in group["params"]:
                st = self.state.get(p, {})
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=_scalar_dtype())
        in_backward = getattr(self, "_in_backward", None)
        if in_backward is not None and in_backward.opt is self:  # load_state_dict: new state
            in_backward.build()
        elif self._step_in_backward:  # a copy: hooks on its own parameters
            self._start_in_backward()
        else:
            self._in_backward = None

    def _start_in_backward(self):
        cls, options = type(self), dict(
            num_threads=self._num_threads, state_dtype=self._state_dtype, seed=self._seed,
            param_rounding=self._param_rounding, master_weights=self._master_weights)
        self._in_backward = _torch_backward.InBackward(
            self, lambda groups: cls(groups, **options), _TrackedState,
            torch.autograd.Variable._execution_engine.queue_callback)

    def add_param_group(self, param_group):
        with self._lock:
            super().add_param_group(param_group)
            i = len(self.param_groups) - 1
            try:
                group = self.param_groups[i]
                _refuse_tensor_hyperparameters(group["lr"], group["betas"], group.get("foreach"),
                                               f" (param_groups[{i}])")
                seen = {}
                for j, p in enumerate(self.param_groups[i]["params"]):
                    if id(p) in seen:
                        raise ValueError(
                            f"param_groups[{i}]['params'][{j}] is the tensor of "
                            f"param_groups[{i}]['params'][{seen[id(p)]}]: each parameter may be "
                            "listed once (torch steps a repeated one twice and warns that this "
                            "will become an error)")
                    seen[id(p)] = j
                    _refuse_unfit(p, f"param_groups[{i}]['params'][{j}]")
                    self._refuse_for_state(p, f"param_groups[{i}]['params'][{j}]")
                _rules.hyperparameters(_hyperparameters(self.param_groups[i]), f" (param_groups[{i}])")
            except BaseException:  # refused: the optimizer is as it was
                self.param_groups.pop()
                raise
            self._plan = None
            if self._in_backward is not None:
                self._in_backward.build()

    def load_state_dict(self, state_dict):
        """As torch's; torch casts the loaded state tensors to their parameters' dtype,
        and with bfloat16 state they are then rounded to nearest into bfloat16.  Where
        this optimizer keeps master weights, the state is float32 (and the trailing
        bits int16): those tensors are taken from ``state_dict`` before torch's cast."""
        with self._lock:
            kept = self._master_state(state_dict)
            super().load_state_dict(state_dict)  # through __setstate__, as torch.optim.Adam's
            self._plan = None
            for p, values in kept:
                self.state[p].update(values)
            if self._state_dtype == "bfloat16":
                self._state_to_bfloat16()

    def _master_state(self, state_dict):
        """[(p, {key: tensor})]: the state tensors of ``state_dict`` that a parameter with
        master weights keeps in float32 (moments and master) or int16 (split's
        trailing bits), as new tensors of that dtype; a saved entry's other keys are
        torch's to load."""
        if self._master_weights is None or not isinstance(state_dict, dict):
            return []
        try:
            saved = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
            mine = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
            pairs = list(zip(saved, mine))
            state = state_dict["state"]
        except (KeyError, TypeError):
            return []  # torch's load names what is wrong
        kept = []
        for saved_id, p in pairs:
            entry = state.get(saved_id) if isinstance(state, dict) else None
            if not isinstance(entry, dict) or not _rules.master_key(np.empty(0, _numpy_dtype(p.dtype)),
                                                                   self._master_weights):
                continue
            values = {}
            for key, dtype in ([(k, torch.float32) for k in _BUFFERS]
                               + [(_rules.MASTER_KEYS["float32"], torch.float32),
                                  (_rules.MASTER_KEYS["split"], torch.int16)]):
                t = entry.get(key)
                if isinstance(t, torch.Tensor) and (t.is_floating_point() or dtype == torch.int16):
                    values[key] = t.detach().to(dtype=dtype, device="cpu", copy=True).contiguous()
            kept.append((p, values))
        return kept

    def _state_to_bfloat16(self):
        """Round float32 state tensors of p's shape to bfloat16, as fastadam.Adam's
        load converts (all computed before any is set); anything else is left for the
        step's checks to name."""
        converted = []
        for p, st in self.state.items():
            for key in _BUFFERS:
                t = st.get(key)
                if (isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16)
                        and t.device.type == "cpu" and t.layout == torch.strided
                        and t.shape == p.shape):
                    values = t.detach().resolve_neg().contiguous().float().numpy()
                    bf16 = _zeros_like(p, key, "bfloat16")
                    _view(bf16, bits=True)[...] = _formats.bf16_round_nearest(values).reshape(values.shape)
                    converted.append((st, key, bf16))
        for st, key, t in converted:
            st[key] = t

    def _master_key(self, p):
        return _rules.master_key(np.empty(0, _numpy_dtype(p.dtype)), self._master_weights)

    def _state_torch_dtype(self, p):
        """The dtype of p's state tensors (m, v, v^)."""
        if self._state_dtype == "bfloat16":
            return torch.bfloat16
        return torch.float32 if self._master_key(p) else p.dtype

    def _refuse_for_state(self, p, what):
        """What the options need of p (fastadam's rules, with torch's names)."""
        try:
            _rules.parameter_for_options(np.empty(0, _numpy_dtype(p.dtype)), what, self._state_dtype,
                                         self._param_rounding, self._master_weights)
        except (TypeError, ValueError) as e:
            raise RuntimeError(str(e)) from None

    # -- the step -------------------------------------------------------------
    #
    # As in fastadam.Adam, a step has two paths with one meaning.  The planned path
    # (a _torch_plan.TorchPlan, compiled) verifies, per parameter in group order, that
    # what the inner optimizer's plan holds is still what this optimizer has: the
    # param_group dicts, the parameter object and its memory, its state dict, state
    # tensors and their memory, whether it has a gradient.  The gradients are read as
    # NumPy views (the inner plan then checks their dtype, shape and contiguity exactly).
    # Anything else, or a gradient NumPy cannot view, goes to the checked path: every
    # rule with torch's names, then a new plan.

    def _checked_gradients(self):
        """Every rule of a step with torch's names: this step's parameters (those with
        a gradient); raises and changes nothing."""
        params = []
        for i, group in enumerate(self.param_groups):
            _rules.hyperparameters(_hyperparameters(group), f" (param_groups[{i}])")
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                where = f"param_groups[{i}]['params'][{j}]"
                _refuse_unfit(p, where)
                self._refuse_for_state(p, where)
                _refuse_unfit(g, f"the gradient of {where}")
                if g.dtype != p.dtype:
                    raise RuntimeError(f"the gradient of {where} has dtype {g.dtype}; "
                                       f"its parameter has {p.dtype}")
                if g.shape != p.shape:
                    raise RuntimeError(f"the gradient of {where} has shape {tuple(g.shape)}; "
                                       f"its parameter has {tuple(p.shape)}")
                for key in _BUFFERS:
                    if key in self.state.get(p, {}):
                        self._refuse_unfit_state(self.state[p][key], p, f"state[p][{key!r}] of {where}")
                master = self._master_key(p)
                if master and master in self.state.get(p, {}):
                    self._refuse_unfit_state(self.state[p][master], p, f"state[p][{master!r}] of {where}",
                                             torch.int16 if master == "master_low" else torch.float32)
                _view(g)  # raises for what NumPy cannot view (a gradient may require grad)
                params.append(p)
        return params

    def _refuse_unfit_state(self, t, p, what, dtype=None):
        """A state tensor the kernel cannot update in place, or not of the dtype and
        shape this optimizer keeps for p."""
        if not isinstance(t, torch.Tensor):
            raise RuntimeError(f"{what} is a {type(t).__name__}, not a tensor")
        dtype = dtype or self._state_torch_dtype(p)
        if t.dtype != dtype:
            raise RuntimeError(f"{what} has dtype {t.dtype}; with state_dtype={self._state_dtype!r} "
                               f"it must be {dtype} (load state with load_state_dict, which converts)")
        if dtype not in (torch.bfloat16, torch.int16):
            _refuse_unfit(t, what)
        elif (t.is_sparse or t.layout != torch.strided or t.device.type != "cpu"
              or not t.is_contiguous() or t.is_neg()):
            raise RuntimeError(f"{what} must be a dense, contiguous CPU tensor (not a lazily "
                               "negated view)")
        if t.shape != p.shape:
            raise RuntimeError(f"{what} has shape {tuple(t.shape)}; its parameter has {tuple(p.shape)}")

    def _build(self, params):
        """A fastadam optimizer over views of ``params`` (checked), grouped as here,
        whose state is views of this optimizer's state tensors (created as torch
        does), and the plan each step verifies (a TorchPlan)."""
        if type(self.state) is not _TrackedState:  # new, loaded, or set by the caller
            self.state = _TrackedState(dict, self.state)
        index = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}
        group_of = sorted({index[id(p)] for p in params})
        groups = [dict(params=[_view(p) for p in params if index[id(p)] == i],
                       **_hyperparameters(self.param_groups[i])) for i in group_of]
        inner = (_optimizer.AdamW if self._decoupled else _optimizer.Adam)(
            groups, num_threads=self._num_threads, state_dtype=self._state_dtype, seed=self._seed,
            param_rounding=self._param_rounding, master_weights=self._master_weights)
        # A tensor's stochastic rounding draws with its place among all the parameters,
        # whichever others have a gradient (so a step in backward draws as a whole step).
        places = self._places or {id(p): n for n, p in enumerate(
            p for group in self.param_groups for p in group["params"])}
        inner._tensor_keys = [places[id(p)] for p in params]
        for k, p in enumerate(params):
            st = self.state[p]
            if "step" in st and not torch.is_tensor(st["step"]):  # set by hand: torch's form
                st["step"] = torch.tensor(float(st["step"]), dtype=_scalar_dtype())
            master = self._master_key(p)
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())  # torch's scalar step
                st["exp_avg"] = _zeros_like(p, "exp_avg", self._state_dtype, master)
                st["exp_avg_sq"] = _zeros_like(p, "exp_avg_sq", self._state_dtype, master)
            if self.param_groups[index[id(p)]]["amsgrad"] and "max_exp_avg_sq" not in st:
                st["max_exp_avg_sq"] = _zeros_like(p, "max_exp_avg_sq", self._state_dtype, master)
            if master and master not in st:  # the master starts as the parameter
                st[master] = _zeros_like(p, master, self._state_dtype, master)
            bits = self._state_dtype == "bfloat16"
            entry = {key: _view(st[key], bits) for key in _BUFFERS if key in st}
            if master:
                entry[master] = _view(st[master])
            entry["step"] = int(st["step"].item())
            inner.state[k] = entry
        self._plan = _kernel.TorchPlan(
            inner, self.param_groups, self.state, {id(p) for p in params},
            [(inner_group, self.param_groups[i]) for inner_group, i in zip(inner.param_groups, group_of)],
            # Views of the step tensors: a step sets them without a torch call.
            [(entry, self.state[p]["step"].detach().view(1).numpy())
             for entry, p in zip(inner.state.values(), params)],
            _hyperparameters, torch.Tensor, torch.strided,
            {p.dtype: _numpy_dtype(p.dtype).num for p in params}, _view,
            [self._master_key(p) for p in params], (_GLOBAL_PRE_HOOKS, _GLOBAL_POST_HOOKS), _PROFILER)

    step = _kernel.torch_step  # the planned step in compiled code, else _wrapped_step
    step.hooked = True  # torch's Optimizer must not wrap it again

    def _wrapped_step(self, *args, **kwargs):
        """The step through torch's wrapper where a hook or the profiler needs it."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _GLOBAL_PRE_HOOKS or _GLOBAL_POST_HOOKS
                or _PROFILER._is_profiler_enabled):
            # The hooks see the call's own arguments, as torch's: (opt,) for opt.step().
            return _hooked_step(self, *args, **kwargs)
        return self._unhooked_step(*args, **kwargs)

    def _unhooked_step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._in_backward is not None:  # the backward pass has stepped (_torch_backward)
            self._in_backward.acknowledge()
            if all(p.grad is None for group in self.param_groups for p in group["params"]):
                return loss
            try:  # gradients set by hand, or of parameters that had no hook: stepped here
                return self._step_gradients(loss)
            finally:
                self._plan = None  # each step() must reach acknowledge()
        return self._step_gradients(loss)

    def _step_gradients(self, loss):
        try:
            if self._plan is not None and self._plan.step_under(self):
                return loss
        except Exception:  # raised having changed nothing
            with self._lock:
                self._checked_gradients()  # the error in torch's names, if it has one
            raise
        with self._lock:  # the plan does not hold: every rule, then a new plan
            params = self._checked_gradients()
            if not params:
                return loss
            with torch.no_grad():
                self._build(params)
            try:
                applied = self._plan.step(self.param_groups, self.state)
            except Exception:
                self._checked_gradients()
                raise
            if not applied:
                raise RuntimeError("fastadam.torch: a new plan does not hold; please report this")
        return loss


_hooked_step = torch.optim.Optimizer.profile_hook_step(Adam._unhooked_step)
# torch.compile runs the step eagerly (a graph break): it is one call into compiled
# code over the tensors' memory, which TorchDynamo cannot trace and need not.  Only the
# path Dynamo can reach is wrapped: the wrapper costs about 0.7 us a call.
if hasattr(torch, "compiler") and hasattr(torch.compiler, "disable"):
    Adam._wrapped_step = torch.compiler.disable(Adam._wrapped_step)


def _refuse_tensor_hyperparameters(lr, betas, foreach, where=""):
    """torch.optim.Adam's rules for tensor hyperparameters, with its messages: a tensor
    lr or beta holds one element, betas are both tensors or neither, and neither is a
    tensor with foreach=True (torch's foreach step needs capturable, which fastadam.torch
    does not have)."""
    if isinstance(lr, torch.Tensor):
        if foreach:
            raise ValueError(f"lr as a Tensor is not supported for capturable=False and "
                             f"foreach=True{where}")
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element{where}")
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        tensors = [isinstance(b, torch.Tensor) for b in betas]
        if tensors[0] != tensors[1]:
            raise ValueError(f"betas must be either both floats or both Tensors{where}")
        for k, b in enumerate(betas):
            if tensors[k] and foreach:
                raise ValueError(f"betas[{k}] as a Tensor is not supported for capturable=False "
                                 f"and foreach=True{where}")
            if tensors[k] and b.numel() != 1:
                raise ValueError(f"Tensor betas[{k}] must be 1-element{where}")


def _hyperparameters(group):
    """A torch group's hyperparameters as fastadam takes them (tensors read as floats;
    anything malformed passed on as it is, for fastadam's rules to name)."""
    def number(x):
        return float(x) if isinstance(x, torch.Tensor) and x.numel() == 1 else x
    betas = group["betas"]
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        betas = (number(betas[0]), number(betas[1]))
    return dict(lr=number(group["lr"]), betas=betas, eps=group["eps"],
                weight_decay=group["weight_decay"], **{name: group[name] for name in _step.FLAGS})


class AdamW(Adam):
    """``torch.optim.AdamW`` with fastadam's kernel doing the step (default weight_decay=1e-2)."""

    _decoupled = True
    # torch.optim.AdamW has no decoupled_weight_decay either
    __init__ = with_defaults(Adam.__init__, without=("decoupled_weight_decay",), weight_decay=1e-2)
