"""fastadam.keras on Keras's JAX backend: a step is fastadam.jax's FFI call over all of
the variables, inside Keras's (stateless, jitted) apply, its results assigned back.

Keras's Adam rule is the kernel's eps_hat; the decoupled decay where Keras applies it
(``_use_weight_decay``); ``global_clipnorm`` fused; the learning rate (a variable or a
schedule's value) and the step count are operands of the call, the betas, epsilon and
weight decay (Python numbers in Keras's Adam) its attributes, as doubles.
"""
import jax
import keras
import numpy as np

from fastadam import _jax_call

_DTYPES = ("float32", "float64", "bfloat16", "float16")


def refuse_unfit_platform(name):
    """The kernel runs on the CPU: a JAX whose default device is another is refused."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        raise ValueError(f"fastadam.keras.{name} runs fastadam's CPU kernel; Keras's JAX backend "
                         f"here computes on {device} (use keras.optimizers.{name} there)")


def refuse_unfit(v, name):
    if v.dtype not in _DTYPES:
        raise TypeError(f"{name}: dtype {v.dtype}; fastadam updates float32, float64, bfloat16 "
                        "and float16 variables")


def _value(x):
    return x.value if isinstance(x, keras.Variable) else x


def _static(x):
    """A hyperparameter as the call's double, or None where it is traced (an operand)."""
    x = _value(x)
    if isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool):
        return float(x)
    return None


def update_step(opt, grads, variables, learning_rate):
    weight_decay = opt.weight_decay or 0.0
    hypers = [learning_rate, opt.beta_1, opt.beta_2, opt.epsilon, weight_decay, 0.0]
    static = tuple(_static(h) for h in hypers)
    dynamic = [_value(h) for h, s in zip(hypers, static) if s is None]
    on = dict(amsgrad=opt.amsgrad, eps_hat=True)  # Keras's rule: epsilon added to sqrt(v)
    flags = sum(bit for name, bit in _jax_call.FLAG_BITS.items() if on.get(name))
    clip = opt._fused_clipnorm()
    layout = _jax_call.Layout(
        static=static, modes=(_jax_call.PARAM_MODES["nearest"],) * len(variables),
        storages=(_jax_call.STORAGES["native"],) * len(variables),
        decayed=tuple(bool(weight_decay) and opt._use_weight_decay(v) for v in variables),
        decoupled=True, flags=flags, seed=0, skip_if_nonfinite=False,
        max_grad_norm=-1.0 if clip is None else float(clip), num_threads=opt.num_threads or 0,
        xla_pool=True)
    state = []
    for v in variables:
        index = opt._get_variable_index(v)
        state.append([opt._momentums[index], opt._velocities[index]]
                     + ([opt._velocity_hats[index]] if opt.amsgrad else []))
    tensors = [(v.value, _value(g), *(s.value for s in st))
               for v, g, st in zip(variables, grads, state)]
    written, _, _ = _jax_call.call(layout, _value(opt.iterations).astype(np.int32), dynamic, tensors)
    for v, st, out in zip(variables, state, written):
        v.assign(out[0])
        for s, new in zip(st, out[1:]):
            s.assign(new)
