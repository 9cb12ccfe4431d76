"""Every option flag on every row of the kernel, against the reference, generated.

The configurations are not listed here: every combination of parameter dtype,
gradient dtype, ``param_rounding``, ``master_weights`` and ``state_dtype`` is
offered to the NumPy reference, and each one it accepts is run on the compiled
kernel, on every instruction set this CPU has, with every weight-decay mode and
every combination of the option flags of ``fastadam._step.FLAGS``, and must give
the reference's bits.  So a new flag whose math is missing from one of the
kernel's rows (the torch-order rule of low-precision parameters, say), or a row
missing from the kernel's table (``FA_KERNELS`` in src/fa_dispatch.hpp, where a
step with no row changes nothing), fails here without anyone listing it; and the
rows the configurations reach must be exactly the kernel's table
(``_kernel.KERNEL_ROWS``), so a row no configuration reaches fails too.
"""
import itertools

import numpy as np
import pytest

import fastadam
from fastadam import _backends, _formats, _rules, _step

from conftest import on_every_isa

KERNEL = _backends.compiled_or_none()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="the compiled extension is not built")
ml_dtypes = pytest.importorskip("ml_dtypes")

# 4500 elements: past the 8-bit state's smallest tensor (INT8_MIN_NUMEL) and its blocks,
# with a ragged tail; 37: a tensor shorter than one vector of every instruction set.
SIZES = (4500, 37)
STEPS = 3


def dtypes():
    names = KERNEL.DTYPE_NAMES if KERNEL is not None else ()
    return list(dict.fromkeys([*_rules.FLOAT_DTYPES, *(_formats.numpy_dtype(n) for n in names)]))


def configurations():
    """(parameter dtype, gradient dtype, options) of every combination of the options."""
    for p, g, rounding, master, state in itertools.product(
            dtypes(), dtypes(), _rules.PARAM_ROUNDINGS, (None, *_rules.MASTER_WEIGHTS), _rules.STATE_DTYPES):
        yield p, g, dict(param_rounding=rounding, master_weights=master, state_dtype=state)


def variants():
    """Each weight-decay mode (none, Adam's L2, AdamW's decoupled) with each combination of flags."""
    for cls, wd in (("Adam", 0.0), ("Adam", 0.1), ("AdamW", 0.1)):
        for on in itertools.product((False, True), repeat=len(_step.FLAGS)):
            yield cls, wd, dict(zip(_step.FLAGS, on))


def run(backend, p_dtype, g_dtype, options, cls="Adam", wd=0.0, flags=None):
    """The parameters and state after STEPS steps; the optimizer too."""
    rng = np.random.default_rng(11)
    params = [(rng.standard_normal(n) * 2).astype(np.float32).astype(p_dtype) for n in SIZES]
    group = dict(params=params, weight_decay=wd, **(flags or {}))
    opt = getattr(fastadam, cls)([group], lr=3e-3, backend=backend, num_threads=1, seed=5, **options)
    for k in range(STEPS):
        grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(np.float32).astype(g_dtype)
                 for n in SIZES]
        if k == 1:
            grads[0][:3] = np.array([0.0, -0.0, np.inf]).astype(g_dtype)  # signed zeros, an infinity
        opt.step(grads)
    return params, opt


def bits(a):
    """An array's bytes, every NaN one pattern (rounding keeps a NaN a NaN, not its payload)."""
    a = np.asarray(a)
    out = a.view(np.uint8).reshape(a.size, -1).copy()
    if a.dtype.kind == "f" or a.dtype == np.dtype(ml_dtypes.bfloat16):
        out[np.isnan(a.astype(np.float32))] = 0xFF
    return out


def accepted():
    """The configurations the reference accepts, each with the kernel row it must run."""
    found = []
    for p_dtype, g_dtype, options in configurations():
        try:
            run("numpy", p_dtype, g_dtype, options)
        except (TypeError, ValueError):
            continue
        found.append((p_dtype, g_dtype, options))
    return found


def kernel_row(p_dtype, g_dtype, options):
    """The row of _kernel.KERNEL_ROWS that a configuration's large tensor runs, as the
    reference's rules describe it (an independent statement of the table)."""
    low = _formats.is_low_precision(p_dtype)
    master = options["master_weights"] if low else None
    mode = ("split" if master == "split" else "master" if master == "float32"
            else "stochastic" if low and options["param_rounding"] == "stochastic" else "nearest")
    torch_order = low and master is None
    storage = "native" if options["state_dtype"] == "float32" or torch_order else options["state_dtype"]
    return (p_dtype.name, mode, g_dtype.name, storage, torch_order)


ACCEPTED = accepted() if KERNEL is not None else []


def test_the_configurations_reach_exactly_the_kernels_rows():
    reached = {kernel_row(*c) for c in ACCEPTED}
    assert reached == set(KERNEL.KERNEL_ROWS), (
        f"rows no configuration reaches: {set(KERNEL.KERNEL_ROWS) - reached}; "
        f"configurations with no row: {reached - set(KERNEL.KERNEL_ROWS)}")


@pytest.mark.parametrize("configuration", ACCEPTED, ids=[
    f"{p.name}-{g.name}-{o['param_rounding']}-{o['master_weights']}-{o['state_dtype']}" for p, g, o in ACCEPTED])
def test_every_flag_on_every_row_and_isa_gives_the_references_bits(configuration):
    p_dtype, g_dtype, options = configuration
    for cls, wd, flags in variants():
        expected, ref = run("numpy", p_dtype, g_dtype, options, cls, wd, flags)

        def compiled():
            params, opt = run("cython", p_dtype, g_dtype, options, cls, wd, flags)
            assert opt.backend == "cython"
            return params, opt

        for isa, (params, opt) in on_every_isa(KERNEL, compiled).items():
            where = f"{cls}(weight_decay={wd}, {flags}) on {isa}"
            for k, (mine, theirs) in enumerate(zip(params, expected)):
                np.testing.assert_array_equal(bits(mine), bits(theirs), err_msg=f"param {k}: {where}")
                for key, value in ref.state[k].items():
                    if isinstance(value, np.ndarray):
                        np.testing.assert_array_equal(bits(opt.state[k][key]), bits(value),
                                                      err_msg=f"state {key} of param {k}: {where}")
                    else:
                        assert opt.state[k][key] == value, (key, where)
