"""The pure-NumPy reference: the oracle of the tests and the baseline of the benchmarks.

Kingma & Ba's Algorithm 1 in PyTorch's arrangement (``torch.optim.Adam`` with
``foreach=False``), written the textbook way, one NumPy operation at a time
with its temporaries.  For a step ``t`` (1-based) and gradient ``g``::

    g   <- 0 where |g| < the dtype's smallest normal number (no subnormal arithmetic)
    g   <- -g                                   if maximize
    g   <- g + wd * p                           Adam: L2 weight decay
    p   <- p * (1 - lr * wd)                    AdamW: decoupled weight decay
    m   <- beta1 * m + (1 - beta1) * g
    m   <- 0 where |m| < the dtype's smallest normal number (no subnormal crawl)
    v   <- beta2 * v + (1 - beta2) * g^2
    v^  <- max(v^, v)                           AMSGrad (the denominator uses v^)
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The compiled kernels perform the same float operations in the same order, so
their results are bitwise equal to this one's.
"""
import math
from typing import NamedTuple

import numpy as np

WD_NONE, WD_L2, WD_DECOUPLED = 0, 1, 2


class StepScalars(NamedTuple):
    """The per-step scalars of one tensor, computed once in double."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    weight_decay: float
    decay: float         # 1 - lr * weight_decay (AdamW)
    step_size: float     # lr / (1 - beta1^step)
    inv_sqrt_bc2: float  # 1 / sqrt(1 - beta2^step)


def step_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """The scalars for ``step`` (the step being taken, counting from 1)."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return StepScalars(
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
        1.0 - lr * weight_decay, lr / bias_correction1, 1.0 / math.sqrt(bias_correction2),
    )


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode,
                amsgrad, maximize, num_threads=None):
    """One in-place step of one tensor; ``s`` is a :class:`StepScalars`.

    Every scalar is rounded to the array's dtype once, as the compiled kernel
    does.  ``num_threads`` is ignored: NumPy's elementwise operations use one thread.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        # Overflow to inf and NaN are documented results (README), as in the compiled kernels.
        _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode, amsgrad,
                maximize)


def _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, weight_decay_mode, amsgrad,
            maximize):
    t = param.dtype.type
    tiny = np.finfo(param.dtype).smallest_normal
    grad = np.where(np.abs(grad) < tiny, t(0), grad)
    if maximize:
        grad = -grad
    if weight_decay_mode == WD_L2:
        grad = grad + t(s.weight_decay) * param
    elif weight_decay_mode == WD_DECOUPLED:
        param *= t(s.decay)
    exp_avg *= t(s.beta1)
    exp_avg += t(s.one_minus_beta1) * grad
    exp_avg[np.abs(exp_avg) < np.finfo(param.dtype).smallest_normal] = 0
    exp_avg_sq *= t(s.beta2)
    exp_avg_sq += t(s.one_minus_beta2) * (grad * grad)
    if amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = np.sqrt(second_moment) * t(s.inv_sqrt_bc2) + t(s.eps)
    param -= t(s.step_size) * (exp_avg / denom)
