"""fastadam for JAX: the fused kernel as one XLA FFI call on the CPU.

``adam`` and ``adamw`` are optax ``GradientTransformation``\\ s with optax's
signatures (plus fastadam's options, keyword-only), usable in ``optax.chain``,
``optax.MultiSteps``, ``optax.inject_hyperparams`` and with
``optax.apply_updates``.  ``step(tx, params, grads, state)`` is the fused
update itself: one pass that writes parameters and state, in place under
``jax.jit(..., donate_argnums=...)``, bit for bit what ``fastadam.Adam`` gives
on the same inputs; low-precision parameters, master weights and compressed
state work there.  ``state_dict``/``load_state_dict`` convert the state to and
from ``fastadam.Adam``'s.

    tx = fastadam.jax.adamw(1e-3, weight_decay=1e-2)
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 2))
    def train_step(params, batch, state):
        grads = jax.grad(loss)(params, batch)
        return fastadam.jax.step(tx, params, grads, state)

The rules and their messages are fastadam._rules'; the call is
fastadam._jax_call's; the math is the kernel's (docs/jax.md).
"""
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastadam import _formats, _rules, _step
from fastadam._jax_call import FLAG_BITS, HYPERS, PARAM_MODES, STORAGES, Layout, call
from fastadam._jax_state import load_state_dict, state_dict
from fastadam._jax_tree import leaves as _leaves, on_one_cpu as _on_one_cpu, options_of
from fastadam._jax_tree import scalars as _scalars, up_to as _up_to

__all__ = ["FusedAdamState", "adam", "adamw", "step", "state_dict", "load_state_dict"]

THREAD_POOLS = ("openmp", "xla")
STATE_FIELDS = ("mu", "nu", "nu_max", "master", "absmax")  # FusedAdamState's per-leaf buffers


class FusedAdamState(NamedTuple):
    """The state of ``adam``/``adamw``.  ``mu``, ``nu`` (and ``nu_max``, amsgrad's
    running max) have the parameters' structure; ``master`` per leaf the float32
    master, split's trailing halves (uint16) or None; ``absmax`` per leaf the 8-bit
    state's absmax arrays or None (``fastadam.Adam``'s formats)."""
    count: Any       # int32: the steps taken (skipped ones not counted)
    mu: Any
    nu: Any
    nu_max: Any
    master: Any
    absmax: Any
    grad_norm: Any   # float32: the last step's gradient norm before clipping (NaN: not clipping)
    skipped: Any     # int32: steps skipped for a non-finite gradient


def _hyper(value, name, below=None):
    if isinstance(value, jax.Array):
        return value  # traced, or an array (optax.inject_hyperparams): checked by the kernel
    if callable(value) and name == "learning_rate":
        return value  # a schedule of the step count
    return _rules.bounded(value, name, below)


def _static(value, name):
    """An option the call is compiled for: a concrete array (optax.inject_hyperparams
    makes every number one) becomes its Python value; a traced one cannot."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} is fixed when the step is compiled and cannot be traced; "
                        f"with optax.inject_hyperparams, name it in static_args")
    if isinstance(value, jax.Array) and value.ndim == 0:
        return value.item()
    return value


def _options(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov, weight_decay, mask,
             decoupled, amsgrad, maximize, eps_hat, skip_if_nonfinite, max_grad_norm, state_dtype,
             param_rounding, master_weights, seed, num_threads, thread_pool):
    if not isinstance(eps_root, jax.Array) and _rules.bounded(eps_root, "eps_root") != 0.0:
        # (traced, as optax.inject_hyperparams makes it, the kernel refuses a nonzero one)
        raise ValueError(f"eps_root must be 0.0: the kernel adds eps after the square root "
                         f"(eps_hat=True adds it before the bias correction), got {eps_root!r}")
    if mu_dtype is not None:
        raise ValueError("mu_dtype must be None: fastadam keeps m in the parameters' dtype, or "
                         f"compressed with state_dtype='bfloat16' or 'int8'; got {mu_dtype!r}")
    if nesterov is not False:
        raise ValueError(f"nesterov must be False: fastadam's kernel has no Nesterov momentum, "
                         f"got {nesterov!r}")
    if thread_pool not in THREAD_POOLS:
        raise ValueError(f"thread_pool must be 'openmp' or 'xla', got {thread_pool!r}")
    if not (mask is None or callable(mask) or isinstance(mask, (dict, list, tuple))
            or jax.tree_util.all_leaves([mask])):
        raise TypeError(f"mask must be None, a pytree of bools or a function of the params, "
                        f"got {_rules.describe(mask)}")
    seed, num_threads = _static(seed, "seed"), _static(num_threads, "num_threads")
    max_grad_norm = _static(max_grad_norm, "max_grad_norm")
    flags = 0
    given = dict(amsgrad=amsgrad, maximize=maximize, eps_hat=eps_hat)
    for name in _step.FLAGS:  # the kernel's option flags, each a keyword here
        if _rules.flag(given[name], name):
            flags |= FLAG_BITS[name]
    return types.SimpleNamespace(  # one transformation's validated arguments
        learning_rate=_hyper(learning_rate, "learning_rate"), b1=_hyper(b1, "b1", 1.0),
        b2=_hyper(b2, "b2", 1.0), eps=_hyper(eps, "eps"),
        weight_decay=_hyper(weight_decay, "weight_decay"),
        eps_root=eps_root if isinstance(eps_root, jax.Array) else 0.0, mask=mask, decoupled=decoupled,
        flags=flags, amsgrad=amsgrad,
        skip_if_nonfinite=_rules.flag(skip_if_nonfinite, "skip_if_nonfinite"),
        max_grad_norm=_rules.max_grad_norm(max_grad_norm),
        state_dtype=_rules.state_dtype(state_dtype),
        param_rounding=_rules.param_rounding(param_rounding),
        master_weights=_rules.master_weights(master_weights),
        seed=0 if seed is None else _rules.seed(seed),
        num_threads=_rules.num_threads(num_threads), xla_pool=thread_pool == "xla")


_FASTADAM_DOC = """
    fastadam's options (keyword-only): ``amsgrad``, ``maximize``, ``eps_hat`` (Keras's
    placement of eps), ``skip_if_nonfinite``, ``max_grad_norm`` (fused global-norm
    clipping), ``state_dtype`` ("float32", "bfloat16", "int8"), ``param_rounding``,
    ``master_weights``, ``seed`` (None: 0) and ``num_threads`` as in ``fastadam.Adam``, and
    ``thread_pool``: "xla" (the default: the step's shares run on XLA's own intra-op
    pool, so it never competes with XLA's threads) or "openmp" (the kernel's team;
    slower inside a jitted step here, benchmarks/results/jax-step.txt).  ``eps_root``
    must be 0, ``mu_dtype`` None and ``nesterov`` False (the kernel has neither)."""


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *,
         nesterov=False, amsgrad=False, maximize=False, eps_hat=False, skip_if_nonfinite=False,
         max_grad_norm=None, state_dtype="float32", param_rounding="nearest",
         master_weights=None, seed=None, num_threads=None, thread_pool="xla"):
    """Adam as ``optax.adam``: ``learning_rate`` a float, an array or a schedule."""
    return _transformation(_options(
        learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov, 0.0, None, False, amsgrad,
        maximize, eps_hat, skip_if_nonfinite, max_grad_norm, state_dtype, param_rounding,
        master_weights, seed, num_threads, thread_pool))


def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None,
          weight_decay=1e-4, mask=None, *, nesterov=False, amsgrad=False, maximize=False,
          eps_hat=False, skip_if_nonfinite=False, max_grad_norm=None, state_dtype="float32",
          param_rounding="nearest", master_weights=None, seed=None, num_threads=None,
          thread_pool="xla"):
    """AdamW as ``optax.adamw``: decoupled weight decay, where ``mask`` (a pytree of
    bools, or a function of the params giving one) is True."""
    return _transformation(_options(
        learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov, weight_decay, mask, True,
        amsgrad, maximize, eps_hat, skip_if_nonfinite, max_grad_norm, state_dtype,
        param_rounding, master_weights, seed, num_threads, thread_pool))


adam.__doc__ += _FASTADAM_DOC
adamw.__doc__ += _FASTADAM_DOC


# -- the parts of a step ----------------------------------------------------------

def _decay_mask(opts, params, treedef, n):
    if opts.mask is None:
        return (True,) * n
    mask = opts.mask(params) if callable(opts.mask) else opts.mask
    flags = _up_to(treedef, mask, "mask", "params")
    for value in flags:
        if value is not True and value is not False:
            raise TypeError(f"mask leaves must be True or False, got {value!r}")
    return tuple(flags)


def _state_specs(opts, p, name):
    """Leaf p's state buffers' shapes and dtypes: (mu, nu, nu_max or None, master or
    None, absmax (a tuple) or None), as fastadam.Adam's state has them."""
    _rules.parameter_for_options(p, name, opts.state_dtype, opts.param_rounding,
                                 opts.master_weights)
    kind = _rules.tensor_state_dtype(p, opts.state_dtype)
    master_key = _rules.master_key(p, opts.master_weights)
    spec = jax.ShapeDtypeStruct(p.shape, _rules.state_storage(p.dtype, kind, master_key))
    master = None
    if master_key is not None:
        master = jax.ShapeDtypeStruct(p.shape, np.float32 if master_key == _rules.MASTER_KEYS[
            "float32"] else np.uint16)
    absmax = None
    if kind == "int8":
        absmax = (jax.ShapeDtypeStruct((_formats.int8_blocks(p.size),), np.float32),) * (
            2 + opts.amsgrad)
    return spec, spec, spec if opts.amsgrad else None, master, absmax


def _new_buffers(opts, p, name):
    """Leaf p's new state: zeros (zero bits are zero in every storage), and a float32
    master that starts as the parameter."""
    mu, nu, nu_max, master, absmax = _state_specs(opts, p, name)
    zeros = lambda spec: jnp.zeros(spec.shape, spec.dtype)  # noqa: E731
    if master is not None:
        master = jnp.asarray(p).astype(jnp.float32) if master.dtype == np.float32 else zeros(master)
    return (zeros(mu), zeros(nu), nu_max and zeros(nu_max), master,
            absmax and tuple(map(zeros, absmax)))


def _layout(opts, params, static, decayed):
    return Layout(
        static=static,
        modes=tuple(PARAM_MODES[_rules.param_mode(p.dtype, opts.param_rounding,
                                                  opts.master_weights)] for p in params),
        storages=tuple(STORAGES[{"float32": "native"}.get(
            _rules.tensor_state_dtype(p, opts.state_dtype), opts.state_dtype)] for p in params),
        decayed=decayed, decoupled=opts.decoupled, flags=opts.flags, seed=opts.seed,
        skip_if_nonfinite=opts.skip_if_nonfinite,
        max_grad_norm=-1.0 if opts.max_grad_norm is None else opts.max_grad_norm,
        num_threads=opts.num_threads or 0, xla_pool=opts.xla_pool)


def _run(opts, params, grads, state, updates_only):
    """The step over pytrees: (new params or, with ``updates_only``, optax's updates,
    new state).  Checks everything a shape or dtype can show before the call."""
    if not isinstance(state, FusedAdamState):
        raise TypeError(f"state must be the FusedAdamState of tx.init, got {_rules.describe(state)}")
    leaves, names, treedef = _leaves(params, "params")
    grad_leaves = _up_to(treedef, grads, "grads", "params")
    for g, name, p in zip(grad_leaves, names, leaves):
        gname = "grads" + name[len("params"):]
        if not hasattr(g, "dtype") or not hasattr(g, "shape"):
            raise TypeError(f"{gname}: expected an array, got {_rules.describe(g)}")
        _on_one_cpu(g, gname)
        _rules.gradient_dtype(np.dtype(g.dtype), np.dtype(p.dtype), gname, name,
                              _rules.master_key(p, opts.master_weights))
        if g.shape != p.shape:
            raise ValueError(f"{gname}: shape {g.shape} does not match {name} shape {p.shape}")
    fields = [[None] * treedef.num_leaves if getattr(state, f) is None
              else _up_to(treedef, getattr(state, f), f"state.{f}", "params")
              for f in STATE_FIELDS]
    tensors = []
    for k, p in enumerate(leaves):
        want = _state_specs(opts, p, names[k])
        rest = []
        for f, have, expected in zip(STATE_FIELDS, (field[k] for field in fields), want):
            if (have is None) != (expected is None) or (
                    f == "absmax" and have is not None and len(have) != len(expected)):
                raise ValueError(f"state.{f} of {names[k]} does not match the options "
                                 "(the state of another transformation?)")
            for h, e in zip(have, expected) if f == "absmax" and have else [(have, expected)]:
                if h is None:
                    continue
                if h.shape != e.shape or h.dtype != e.dtype:
                    raise ValueError(f"state.{f} of {names[k]}: {h.dtype}{list(h.shape)}, "
                                     f"expected {e.dtype}{list(e.shape)}")
                rest.append(h)
        target = jnp.zeros(p.shape, p.dtype) if updates_only else p
        tensors.append((target, grad_leaves[k], *rest))
    values, static, dynamic = _scalars(opts, state.count)
    decayed = _decay_mask(opts, params, treedef, len(leaves))
    # With updates_only the kernel's step from zero is the Adam term; the decay is added below
    layout = _layout(opts, leaves, static, (False,) * len(leaves) if updates_only else decayed)
    written, applied, norm = call(layout, state.count, dynamic, tensors)
    out = [w[0] for w in written]
    if updates_only:  # optax's adamw: the decay joins the update, scaled by the learning rate
        lr, wd = values["learning_rate"], values["weight_decay"]
        if not (isinstance(wd, float) and wd == 0.0):
            out = [u - (applied * lr * wd * p).astype(u.dtype) if d else u
                   for u, p, d in zip(out, leaves, decayed)]
    unflat = treedef.unflatten
    new = {f: [None] * len(leaves) for f in STATE_FIELDS}
    for k, w in enumerate(written):  # after the parameter, the state buffers in _run's order
        rest = iter(w[1:])
        for f, field in zip(STATE_FIELDS, fields):
            if field[k] is not None:
                new[f][k] = tuple(next(rest) for _ in field[k]) if f == "absmax" else next(rest)
    new_state = FusedAdamState(
        count=state.count + applied,
        **{f: None if getattr(state, f) is None else unflat(new[f]) for f in STATE_FIELDS},
        grad_norm=norm, skipped=state.skipped + (1 - applied))
    return unflat(out), new_state


def _transformation(opts):
    def init(params):
        leaves, names, treedef = _leaves(params, "params")
        buffers = [_new_buffers(opts, p, name) for p, name in zip(leaves, names)]
        field = lambda j: treedef.unflatten([b[j] for b in buffers])  # noqa: E731
        return FusedAdamState(
            count=jnp.zeros((), jnp.int32), mu=field(0), nu=field(1),
            nu_max=field(2) if opts.amsgrad else None,
            master=field(3) if any(b[3] is not None for b in buffers) else None,
            absmax=field(4) if any(b[4] is not None for b in buffers) else None,
            grad_norm=jnp.full((), jnp.nan, jnp.float32), skipped=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if opts.master_weights is not None or opts.param_rounding != "nearest":
            raise ValueError("master_weights and param_rounding='stochastic' update the parameters "
                             "themselves: use fastadam.jax.step(tx, params, grads, state)")
        if params is None:
            if opts.decoupled:
                raise ValueError("adamw's update needs params (for the weight decay)")
            params = jax.tree.map(lambda g: jax.ShapeDtypeStruct(g.shape, g.dtype), updates)
        return _run(opts, params, updates, state, updates_only=True)

    update.fastadam_options = opts
    return optax.GradientTransformation(init, update)


def step(tx, params, grads, state):
    """The fused step: ``(new params, new state)``, one pass over every leaf, bit for bit
    ``fastadam.Adam``'s step on the same values.  Under ``jax.jit`` with the params and
    state donated, XLA writes them in place."""
    return _run(options_of(tx), params, grads, state, updates_only=False)

