"""fastadam for Keras 3: ``fastadam.keras.Adam`` and ``AdamW``, drop-in for
``keras.optimizers.Adam``/``AdamW`` on Keras's PyTorch and JAX backends
(``KERAS_BACKEND=torch`` or ``jax``; ``pip install "fastadam[keras]"``, and
``"fastadam[jax]"`` for JAX).

They are subclasses of Keras's own: the same arguments, defaults, variables
(``momentum``, ``velocity``, ``velocity_hat``), configuration and checkpoints, so a
``model.save("m.keras")`` loads with either class, and ``keras.models.load_model``
brings the optimizer and its state back.  Keras's update rule is kept (``epsilon``
added to sqrt(v) before the bias correction: fastadam's ``eps_hat``); a step is one
call of fastadam's kernel over all of a model's variables, with the weight decay (Keras's
``p * (1 - lr * wd)``, ``exclude_from_weight_decay`` honoured) and
``global_clipnorm`` fused into it.  Keras's base optimizer does the rest as it
does for its own Adam: ``clipnorm``, ``clipvalue``, ``loss_scale_factor``,
``gradient_accumulation_steps``, ``use_ema`` and learning-rate schedules.

On PyTorch the kernel updates the variables' tensors in place through zero-copy
NumPy views; on JAX it is fastadam.jax's XLA FFI call inside Keras's jitted train
step, the variables' buffers aliased to its results (Keras donates them), with the
learning rate an operand, so a schedule does not recompile.

Variables are updated where they are: CPU tensors of float32, float64, bfloat16 or
float16 (Keras's ``bfloat16`` policy: bfloat16 variables, updated as fastadam
updates bfloat16 parameters, state in bfloat16).  Anything else is refused when the
optimizer is built, naming the variable.  ``num_threads`` is fastadam's.
"""
import keras

from . import _optimizer, _rules

__all__ = ["Adam", "AdamW"]

# What this module overrides or reads of Keras's optimizers (tested with Keras 3.15): a Keras
# without them gets this error, not a wrong step.
_KERAS_HOOKS = ("_backend_update_step", "_apply_weight_decay", "_clip_gradients", "_use_weight_decay",
                "_get_variable_index", "build", "iterations")
_missing = [name for name in _KERAS_HOOKS if not hasattr(keras.optimizers.Adam, name)]
if _missing:
    raise ImportError(f"fastadam.keras needs Keras 3.15 or later (this Keras {keras.__version__} "
                      f"lacks {', '.join(_missing)} in keras.optimizers.Adam)")


def _torch_tensors():
    """fastadam's torch views (imported once Keras's backend is known to be torch)."""
    from . import _torch_tensors
    return _torch_tensors


class _Fused:
    """What fastadam's Adam and AdamW add to Keras's: the step, the decay and the global
    clipping as one kernel call (a fastadam.AdamW over views of the variables, whose
    state is the views of Keras's own optimizer variables)."""

    def _refuse_other_backends(self):
        """Before anything is built: the kernel runs on torch tensors or in JAX's XLA."""
        if keras.backend.backend() not in ("torch", "jax"):
            raise ValueError(f"fastadam.keras.{type(self).__name__} runs on Keras's PyTorch and JAX "
                             f"backends (KERAS_BACKEND=torch or jax); this Keras runs on "
                             f"{keras.backend.backend()!r} (use keras.optimizers.{type(self).__name__} "
                             "there)")
        if keras.backend.backend() == "jax":
            from . import _keras_jax
            _keras_jax.refuse_unfit_platform(type(self).__name__)

    def _fastadam_init(self, num_threads):
        try:
            _rules.hyperparameters(dict(lr=1.0, betas=(self.beta_1, self.beta_2), eps=self.epsilon,
                                        weight_decay=self.weight_decay or 0.0, amsgrad=self.amsgrad,
                                        maximize=False, eps_hat=True))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{type(self).__name__}(beta_1={self.beta_1!r}, beta_2={self.beta_2!r}, "
                          f"epsilon={self.epsilon!r}, weight_decay={self.weight_decay!r}, "
                          f"amsgrad={self.amsgrad!r}): {e}") from None
        self.num_threads = _rules.num_threads(num_threads)
        self._cores = {}

    def get_config(self):
        config = super().get_config()
        config["num_threads"] = self.num_threads
        return config

    def build(self, variables):
        if self.built:
            return
        for v in variables:
            if keras.backend.backend() == "jax":
                from . import _keras_jax
                _keras_jax.refuse_unfit(v, f"variable {v.path!r}")
            else:
                _torch_tensors().refuse_unfit(v.value, f"variable {v.path!r}")
        super().build(variables)

    def _apply_weight_decay(self, variables):
        """Fused into the step (the kernel's decoupled weight decay, Keras's rule)."""

    def _fused_clipnorm(self):
        """global_clipnorm where Keras applies it (a positive number; Keras allows one kind of
        clipping), else None."""
        return self.global_clipnorm if self.global_clipnorm and self.global_clipnorm > 0 else None

    def _clip_gradients(self, grads):
        if self._fused_clipnorm() is not None:
            return grads  # fused into the step (the kernel's max_grad_norm)
        return super()._clip_gradients(grads)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if keras.backend.backend() == "jax":
            from . import _keras_jax
            return _keras_jax.update_step(self, grads, trainable_variables, learning_rate)
        tt = _torch_tensors()
        lr = float(_number(learning_rate))
        step = int(_number(self.iterations))
        core, decays, order = self._core(trainable_variables)
        views = []
        for v, g in zip(trainable_variables, grads):
            g = g.value if isinstance(g, keras.Variable) else g
            tt.refuse_unfit(g, f"the gradient of variable {v.path!r}")
            views.append(tt.view(g))
        # Read each step, as Keras's Adam reads them (a schedule's rate; attributes set since)
        betas, eps = (_number(self.beta_1), _number(self.beta_2)), _number(self.epsilon)
        for group in core.param_groups:
            group.update(lr=lr, betas=betas, eps=eps)
        if decays:  # the first group
            core.param_groups[0]["weight_decay"] = _number(self.weight_decay)
        core.max_grad_norm = self._fused_clipnorm()
        for entry in core.state.values():
            entry["step"] = step
        core.step([views[i] for i in order])

    def _core(self, variables):
        """(the fastadam.AdamW stepping ``variables``, whether its first group is the decayed
        variables', the variables' order in it): made again where a variable's tensor, or one
        of its state variables', is no longer the memory it views."""
        tt = _torch_tensors()
        key = (bool(self.weight_decay), *(self._get_variable_index(v) for v in variables))
        tensors = [self._tensors(v) for v in variables]
        memory = [tuple(_memory(t) for t in ts) for ts in tensors]
        found = self._cores.get(key)
        if found is not None and found[1] == memory:
            return found[0], found[2], found[3]
        decay = self.weight_decay or 0.0
        decayed = [i for i, v in enumerate(variables) if decay and self._use_weight_decay(v)]
        order = decayed + [i for i in range(len(variables)) if i not in set(decayed)]
        groups = [{"params": [tt.view(tensors[i][0]) for i in members], "weight_decay": wd}
                  for members, wd in ((order[:len(decayed)], decay), (order[len(decayed):], 0.0))
                  if members]
        core = _optimizer.AdamW(groups, lr=0.0, betas=(self.beta_1, self.beta_2), eps=self.epsilon,
                                amsgrad=self.amsgrad, eps_hat=True, num_threads=self.num_threads,
                                max_grad_norm=self._fused_clipnorm())
        for k, i in enumerate(order):
            _, m, s, h = tensors[i]
            core.state[k] = {"step": 0, "exp_avg": tt.view(m), "exp_avg_sq": tt.view(s)}
            if h is not None:
                core.state[k]["max_exp_avg_sq"] = tt.view(h)
        self._cores[key] = (core, memory, bool(decayed), order)  # decayed variables first
        return core, bool(decayed), order

    def _tensors(self, v):
        """(the variable's tensor, its m, v and v^ tensors (v^ None without amsgrad))."""
        index = self._get_variable_index(v)
        hat = self._velocity_hats[index].value if self.amsgrad else None
        return v.value, self._momentums[index].value, self._velocities[index].value, hat


def _number(x):
    """A Keras variable's or a scalar tensor's value, as a Python number."""
    x = x.value if isinstance(x, keras.Variable) else x
    return x.item() if hasattr(x, "item") else x


def _memory(t):
    """What a view of tensor ``t`` was made from: the tensor, its address, layout and dtype."""
    if t is None:
        return None
    return (id(t), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


@keras.saving.register_keras_serializable(package="fastadam")
class Adam(_Fused, keras.optimizers.Adam):
    """``keras.optimizers.Adam`` with fastadam's kernel doing the step; ``num_threads``
    as in :class:`fastadam.Adam`."""

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                 *, num_threads=None, **kwargs):
        self._refuse_other_backends()
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         amsgrad=amsgrad, **kwargs)
        self._fastadam_init(num_threads)


@keras.saving.register_keras_serializable(package="fastadam")
class AdamW(_Fused, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` with fastadam's kernel doing the step; ``num_threads``
    as in :class:`fastadam.Adam`."""

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, amsgrad=False, *, num_threads=None, **kwargs):
        self._refuse_other_backends()
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, beta_1=beta_1,
                         beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad, **kwargs)
        self._fastadam_init(num_threads)
