"""Pytrees for fastadam.jax: their array leaves and names, where they live, the
hyperparameters a step reads, and the options a transformation carries (shared by the
step, fastadam/jax.py, and the state dicts, fastadam/_jax_state.py)."""
import jax

from fastadam import _rules
from fastadam._jax_call import HYPERS


def options_of(tx):
    """The options fastadam.jax.adam or adamw gave ``tx``."""
    opts = getattr(getattr(tx, "update", None), "fastadam_options", None)
    if opts is None:
        raise TypeError("tx must be made by fastadam.jax.adam or fastadam.jax.adamw, "
                        f"got {_rules.describe(tx)}")
    return opts


def leaves(tree, name):
    """The array leaves of a pytree (None leaves dropped), their names and structure."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [name + jax.tree_util.keystr(path) for path, _ in with_path]
    leaves = [leaf for _, leaf in with_path]
    for leaf, leaf_name in zip(leaves, names):
        if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
            raise TypeError(f"{leaf_name}: expected an array, got {_rules.describe(leaf)}")
        on_one_cpu(leaf, leaf_name)
    return leaves, names, treedef


def on_one_cpu(leaf, name):
    """A concrete array must live on one CPU device (the kernel runs there)."""
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
        devices = leaf.sharding.device_set
        if len(devices) > 1:
            raise ValueError(f"{name} is sharded over {len(devices)} devices; fastadam.jax steps "
                             "arrays on one CPU device (step each shard inside jax.shard_map)")
        device = next(iter(devices))
        if device.platform != "cpu":
            raise ValueError(f"{name} is on {device}; fastadam.jax runs on the CPU "
                             "(jax.device_put the parameters, gradients and state there)")


def up_to(treedef, tree, name, what):
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must have the structure of {what}: {e}") from None


def scalars(opts, count):
    """The hyperparameters by name (a float, or traced), and the call's form of them:
    a float each (static) or None, and the traced values in order."""
    values = {name: getattr(opts, name) for name in HYPERS}
    if callable(values["learning_rate"]):
        values["learning_rate"] = values["learning_rate"](count)
    static = tuple(v if isinstance(v, float) else None for v in values.values())
    dynamic = [v for v in values.values() if not isinstance(v, float)]
    return values, static, dynamic
