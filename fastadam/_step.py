"""What one step is, for every backend: its option bits, its scalars, its gradient norm.

The record of the per-step scalars is ``StepScalars``: its fields, in order,
are the kernel's (src/adam_kernel.hpp, ``FA_STEP_SCALARS``) and the Numba
kernel's one scalars array; ``_backends`` checks the compiled kernel's list
against it at import.  The option bits of a variant (weight-decay mode,
AMSGrad, maximize) are packed by ``variant`` alone; the kernel's
``FA_VARIANT`` is checked against it at import too.
"""
import math
from typing import NamedTuple

import numpy as np

# Weight-decay modes, and a variant's option bits: bits 0-1 the mode, then one
# bit per flag.
WD_NONE, WD_L2, WD_DECOUPLED = 0, 1, 2
WD_MASK = 3
AMSGRAD = 4
MAXIMIZE = 8


def variant(weight_decay_mode, amsgrad, maximize):
    """The variant code of (weight-decay mode, amsgrad, maximize)."""
    return weight_decay_mode | (AMSGRAD if amsgrad else 0) | (MAXIMIZE if maximize else 0)


def variant_options(code):
    """(weight-decay mode, amsgrad, maximize) of a variant code."""
    return code & WD_MASK, bool(code & AMSGRAD), bool(code & MAXIMIZE)


def weight_decay_mode(weight_decay, decoupled):
    """WD_NONE where weight_decay is 0, else AdamW's decoupled or Adam's L2 mode."""
    return WD_NONE if weight_decay == 0 else (WD_DECOUPLED if decoupled else WD_L2)


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
    sqrt_bc2: float      # sqrt(1 - beta2^step) (torch's order, low-precision parameters)
    grad_scale: float = 1.0  # gradient clipping's coefficient (clip_coefficient)


def step_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """The scalars for ``step`` (the step being taken, counting from 1)."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return StepScalars(
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
        1.0 - lr * weight_decay, lr / bias_correction1, 1.0 / math.sqrt(bias_correction2),
        math.sqrt(bias_correction2),
    )


NORM_BLOCK, NORM_LANES = 4096, 16  # src/adam_kernel.hpp: FA_NORM_BLOCK, FA_NORM_LANES


def grad_norm(grads):
    """The global L2 norm of ``grads`` in float64, summed in the kernel's fixed order:
    the concatenated gradients in blocks of NORM_BLOCK elements; within a block,
    element i adds g*g to lane i mod NORM_LANES, one after another; a block's sum
    is its lanes added in order; the norm is the square root of the blocks' sums
    added in order.  (np.cumsum adds in sequence, unlike np.sum.)"""
    flat = np.concatenate([np.asarray(g, np.float64).reshape(-1) for g in grads] or [np.zeros(0)])
    if flat.size == 0:
        return 0.0
    n_blocks = -(-flat.size // NORM_BLOCK)
    squares = np.zeros(n_blocks * NORM_BLOCK)
    squares[:flat.size] = flat * flat
    lanes = np.cumsum(squares.reshape(n_blocks, NORM_BLOCK // NORM_LANES, NORM_LANES), axis=1)[:, -1]
    blocks = np.cumsum(lanes, axis=1)[:, -1]
    return float(np.sqrt(np.cumsum(blocks)[-1]))


def clip_coefficient(max_norm, norm):
    """torch's clip_grad_norm_: max_norm / (norm + 1e-6), at most 1 (a NaN norm gives NaN)."""
    c = max_norm / (norm + 1e-6)
    return 1.0 if c > 1.0 else c
