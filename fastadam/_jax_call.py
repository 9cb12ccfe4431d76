"""The kernel as one XLA FFI call (src/jax_ffi.cpp): its registration, and the
call over a whole pytree's flat leaves, with every written buffer aliased
input to output so that XLA updates donated buffers in place.

fastadam.jax decides what to step and how; this module only lays out the
operands and the attributes the handler reads, and keeps JAX's transformations
(differentiation, vmap) from doing what an optimizer step cannot mean.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

MIN_JAX = (0, 10, 0)  # the oldest jax and jaxlib fastadam.jax is tested with
TARGET = "fastadam_step"
HYPERS = ("learning_rate", "b1", "b2", "eps", "weight_decay", "eps_root")  # the handler's order


def _version(text):
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:3])


def require(name, version):
    """An ImportError naming the minimum version where ``version`` of ``name`` is older."""
    if _version(version) < MIN_JAX:
        raise ImportError(f"fastadam.jax needs {name} {'.'.join(map(str, MIN_JAX))} or later "
                          f"(its XLA FFI); this is {name} {version}: pip install -U jax jaxlib")


def _load():
    """Registers the handler once; the reason fastadam.jax cannot run, as an ImportError."""
    import jaxlib
    require("jax", jax.__version__)
    require("jaxlib", jaxlib.__version__)
    try:
        from fastadam import _jax_ffi, _kernel
    except ImportError as e:
        raise ImportError("fastadam.jax needs fastadam's XLA FFI handler, which this build of "
                          "fastadam lacks: install a wheel, or build from source with "
                          f"FASTADAM_JAX=1 ({e})") from e
    _jax_ffi.bind(_kernel.KERNEL_API)
    jax.ffi.register_ffi_target(TARGET, _jax_ffi.handler(), platform="cpu")
    return _kernel


_kernel = _load()
FLAG_BITS = dict(_kernel.VARIANT_BITS[1:])
PARAM_MODES = {name: code for code, name in enumerate(_kernel.PARAM_MODES)}
STORAGES = {name: code for code, name in enumerate(_kernel.STORAGE_KINDS)}


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the handler is told of a call (hashable: a jit's static part).

    ``static``: each hyperparameter's double where it is a Python number, else
    None (traced: an operand).  Per tensor: its parameter mode, its state's
    storage and whether weight decay applies to it."""
    static: tuple
    modes: tuple
    storages: tuple
    decayed: tuple
    decoupled: bool
    flags: int
    seed: int
    skip_if_nonfinite: bool
    max_grad_norm: float  # < 0: no clipping
    num_threads: int      # 0: the kernel's policy
    xla_pool: bool        # run on XLA's intra-op pool, not the kernel's OpenMP team

    def written(self, k):
        """How many buffers tensor k's step writes: param, m, v, [v^], [master], [absmaxes]."""
        amsgrad = bool(self.flags & FLAG_BITS["amsgrad"])
        mastered = self.modes[k] in (PARAM_MODES["split"], PARAM_MODES["master"])
        int8 = self.storages[k] == STORAGES["int8"]
        return 3 + amsgrad + mastered + (2 + amsgrad if int8 else 0)


def call(layout, count, dynamic, tensors):
    """One step of every tensor.  ``tensors``: per tensor (param, grad, *rest), rest
    being its other written buffers in Layout.written's order; ``dynamic``: the
    traced hyperparameters' values, in HYPERS order of the None slots.  Returns
    (per tensor its written buffers, applied (int32: 0 where the step was skipped),
    the gradients' global norm (float32; NaN without clipping))."""
    flat = [buf for t in tensors for buf in t]
    # the traced scalars in float64 where one is (x64 enabled), else float32
    values = [jnp.asarray(d) for d in dynamic]
    dtype = jnp.float64 if any(v.dtype == jnp.float64 for v in values) else jnp.float32
    dyn = jnp.stack([v.astype(dtype) for v in values]) if values else jnp.zeros((0,), dtype)
    written = _step(layout, jnp.asarray(count, jnp.int32), dyn, *flat)
    out, i = [], 0
    for k in range(len(tensors)):
        n = layout.written(k)
        out.append(tuple(written[i:i + n]))
        i += n
    return out, written[i], written[i + 1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _step(layout, count, dyn, *flat):
    results, aliases, j = [], {}, 2  # operands 0 and 1: count and the traced scalars
    for k, n in enumerate(map(layout.written, range(len(layout.modes)))):
        # param (then the gradient, read only), then the state buffers
        for w, pos in enumerate([j] + list(range(j + 2, j + n + 1))):
            aliases[pos] = len(results)
            results.append(jax.ShapeDtypeStruct(flat[pos - 2].shape, flat[pos - 2].dtype))
        j += n + 1
    results += [jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)]
    slots = [i for i, v in enumerate(layout.static) if v is None]
    return jax.ffi.ffi_call(TARGET, results, input_output_aliases=aliases,
                            vmap_method="sequential")(
        count, dyn, *flat,
        hypers=np.array([0.0 if v is None else v for v in layout.static], np.float64),
        dyn_slots=np.array(slots, np.int64),
        modes=np.array(layout.modes, np.int64),
        storages=np.array(layout.storages, np.int64),
        decayed=np.array(layout.decayed, np.int64),
        decoupled=np.int64(layout.decoupled),
        flags=np.int64(layout.flags),
        seed=np.uint64(layout.seed),
        skip_if_nonfinite=np.int64(layout.skip_if_nonfinite),
        max_grad_norm=np.float64(layout.max_grad_norm),
        num_threads=np.int64(layout.num_threads),
        xla_pool=np.int64(layout.xla_pool))


@_step.defjvp
def _no_derivative(layout, primals, tangents):
    raise TypeError("fastadam.jax: an optimizer step is not differentiable; take jax.grad of the "
                    "loss, then step outside the differentiated function")
