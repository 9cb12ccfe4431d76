"""What one step is, for every backend: its option bits, its scalars, its gradient norm.

The record of the per-step scalars is ``StepScalars``: its fields, in order,
are the kernel's (src/adam_kernel.hpp, ``FA_STEP_SCALARS``) and the Numba
kernel's one scalars array; ``_backends`` checks the compiled kernel's list
against it at import.  A variant's code (its weight-decay mode and option
``FLAGS``) is packed by ``variant`` alone; the kernel's ``FA_FLAGS`` is
checked against it at import too.
"""
import math
from typing import NamedTuple

import numpy as np

# Weight-decay modes, and a variant's code: bits 0-1 the mode, then one bit per
# option flag, in the order of FLAGS.  FLAGS are the parameter groups' keys of
# the flags (each True or False, False by default): the rules, the checkpoints
# and the compiled plan read a group's flags by these names, and the kernel's
# FA_FLAGS is checked against them at import.
WD_NONE, WD_L2, WD_DECOUPLED = 0, 1, 2
WD_MASK = 3
FLAGS = ("amsgrad", "maximize", "eps_hat")
FLAG_BITS = tuple(4 << j for j in range(len(FLAGS)))
AMSGRAD = FLAG_BITS[FLAGS.index("amsgrad")]    # its state (max_exp_avg_sq) is checked by name
EPS_HAT = FLAG_BITS[FLAGS.index("eps_hat")]
# The flags whose whole effect is in the step's scalars (step_scalars here, fa_set_step in
# src/fa_step.hpp): every rule has them, as it takes its scalars from there.
SCALAR_FLAGS = ("eps_hat",)


def flag_values(flags):
    """Each flag's name and bool in ``flags`` (its bits)."""
    return {name: bool(flags & bit) for name, bit in zip(FLAGS, FLAG_BITS)}


def rule_flag_values(flags):
    """The keyword arguments of the backends' update functions: flag_values but the
    SCALAR_FLAGS, which are in the scalars they are given."""
    return {name: on for name, on in flag_values(flags).items() if name not in SCALAR_FLAGS}


def flag_bits(names):
    """The bits of the flags named in ``names``."""
    return sum(bit for name, bit in zip(FLAGS, FLAG_BITS) if name in names)


def variant(weight_decay_mode, *flags):
    """The variant code of a weight-decay mode and the flags' bools, in FLAGS' order."""
    return weight_decay_mode | sum(bit for bit, on in zip(FLAG_BITS, flags) if on)


def variant_options(code):
    """(weight-decay mode, *the flags' bools in FLAGS' order) of a variant code."""
    return (code & WD_MASK, *(bool(code & bit) for bit in FLAG_BITS))


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


def step_scalars(lr, beta1, beta2, eps, weight_decay, step, flags=0):
    """The scalars for ``step`` (the step being taken, counting from 1) of a group whose
    option flags are ``flags`` (its bits).  With eps_hat, eps is the paper's epsilon-hat
    (Kingma & Ba, end of section 2; Keras's and TensorFlow's Adam): added to sqrt(v)
    itself, the bias correction of v moved into the step size,
    lr * sqrt(1 - beta2^t) / (1 - beta1^t), so the rules' divisions by it become exact
    divisions by 1."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    if flags & EPS_HAT:
        step_size, inv_sqrt_bc2, sqrt_bc2 = lr * math.sqrt(bias_correction2) / bias_correction1, 1.0, 1.0
    else:
        step_size = lr / bias_correction1
        inv_sqrt_bc2, sqrt_bc2 = 1.0 / math.sqrt(bias_correction2), math.sqrt(bias_correction2)
    return StepScalars(
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
        1.0 - lr * weight_decay, step_size, inv_sqrt_bc2, sqrt_bc2,
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
