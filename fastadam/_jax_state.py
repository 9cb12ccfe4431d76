"""fastadam.jax's state as ``fastadam.Adam``'s state dict, and back: a checkpoint of
either loads into the other, and the steps that follow are the same bits.

Loading goes through ``fastadam.Adam.load_state_dict`` on NumPy copies of the
parameters, so a JAX state is checked and converted by the same rules as the
NumPy API's (fastadam._checkpoint): nothing is read that it would refuse.
"""
import jax
import jax.numpy as jnp
import numpy as np

from fastadam import _optimizer, _rules, _step
from fastadam._jax_call import FLAG_BITS
from fastadam._jax_tree import leaves as tree_leaves, options_of, scalars


def _numpy_optimizer(opts, leaves):
    """A NumPy-API optimizer with tx's options over copies of the parameters."""
    kind = _optimizer.AdamW if opts.decoupled else _optimizer.Adam
    return kind([np.array(p) for p in leaves], amsgrad=opts.amsgrad,
                state_dtype=opts.state_dtype, seed=opts.seed, param_rounding=opts.param_rounding,
                master_weights=opts.master_weights, backend="numpy")


def _float(value, name):
    if isinstance(value, float):
        return value
    try:
        return float(np.asarray(value))
    except Exception:
        raise TypeError(f"state_dict: {name} is traced; call it outside jax.jit") from None


def state_dict(tx, state, params):
    """``fastadam.Adam.state_dict()``'s structure for a FusedAdamState: one group with
    tx's hyperparameters (a schedule's value at the state's count), the tensors in the
    order of the params' leaves, and NumPy copies of every buffer."""
    opts = options_of(tx)
    leaves, names, treedef = tree_leaves(params, "params")
    count = int(_float(state.count, "count"))
    entries = {}
    fields = {f: (treedef.flatten_up_to(getattr(state, f)) if getattr(state, f) is not None
                  else [None] * len(leaves)) for f in ("mu", "nu", "nu_max", "master", "absmax")}
    for k, p in enumerate(leaves):
        entry = {"step": count, "exp_avg": np.array(fields["mu"][k]),
                 "exp_avg_sq": np.array(fields["nu"][k])}
        if opts.amsgrad:
            entry["max_exp_avg_sq"] = np.array(fields["nu_max"][k])
        master_key = _rules.master_key(p, opts.master_weights)
        if master_key is not None:
            entry[master_key] = np.array(fields["master"][k])
        if fields["absmax"][k] is not None:
            for key, absmax in zip(_rules.STATE_BUFFERS, fields["absmax"][k]):
                entry[_rules.ABSMAX_KEYS[key]] = np.array(absmax)
        entries[k] = entry
    values, _, _ = scalars(opts, state.count)
    group = {"lr": _float(values["learning_rate"], "learning_rate"),
             "betas": (_float(values["b1"], "b1"), _float(values["b2"], "b2")),
             "eps": _float(values["eps"], "eps"),
             "weight_decay": _float(values["weight_decay"], "weight_decay"),
             **{name: bool(opts.flags & FLAG_BITS[name]) for name in _step.FLAGS},
             "params": list(range(len(leaves)))}
    if opts.decoupled:
        group["decoupled_weight_decay"] = True
    return {"state": entries, "param_groups": [group]}


def load_state_dict(tx, params, state_dict):
    """A FusedAdamState from ``fastadam.Adam.state_dict()``'s structure (or this module's),
    checked and converted as ``fastadam.Adam.load_state_dict`` does; every tensor must
    have taken the same number of steps (the JAX state has one count).  The
    hyperparameters are tx's; the dict's are not read."""
    opts = options_of(tx)
    leaves, names, treedef = tree_leaves(params, "params")
    opt = _numpy_optimizer(opts, leaves)
    opt.load_state_dict(state_dict)
    steps = {opt.state[k]["step"] for k in range(len(leaves))}
    if len(steps) != 1:
        raise ValueError(f"state_dict: the tensors have taken different numbers of steps "
                         f"({sorted(steps)}); a fastadam.jax state has one count")
    if steps.copy().pop() > np.iinfo(np.int32).max:
        raise ValueError(f"state_dict: step {steps.pop()} is beyond a fastadam.jax count (int32)")
    fresh = tx.init(params)
    fields = {}
    for f, key in (("mu", "exp_avg"), ("nu", "exp_avg_sq"), ("nu_max", "max_exp_avg_sq")):
        if getattr(fresh, f) is not None:
            fields[f] = treedef.unflatten([jnp.asarray(opt.state[k][key])
                                           for k in range(len(leaves))])
    if fresh.master is not None:
        fields["master"] = treedef.unflatten([
            jnp.asarray(opt.state[k][key]) if (key := _rules.master_key(p, opts.master_weights))
            else None for k, p in enumerate(leaves)])
    if fresh.absmax is not None:
        fields["absmax"] = treedef.unflatten([
            tuple(jnp.asarray(opt.state[k][_rules.ABSMAX_KEYS[key]])
                  for key in _rules.STATE_BUFFERS[:2 + opts.amsgrad])
            if _rules.ABSMAX_KEYS["exp_avg"] in opt.state[k] else None
            for k in range(len(leaves))])
    return fresh._replace(count=jnp.asarray(steps.pop(), jnp.int32), **fields)


del jax
