"""One set of rules for every step: the compiled fast path accepts exactly what the
checked path accepts, computes the same bits, and a refused call changes nothing.

A hypothesis state machine mutates two optimizers identically between steps
(hyperparameters, step counts, state arrays, the arrays' flags, dtype and shape),
one on the compiled backend, whose plan re-verifies cached buffers, and one on
the NumPy reference, which checks everything every step; they must agree on
accept or refuse (the same exception and message), and on every bit.
"""
import copy
import os
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import fastadam
from fastadam import _backends
from conftest import backend_params

FAST = [b for b in backend_params(("cython",))]

SHAPES = [((4, 5), np.float32), ((7,), np.float32), ((3,), np.float64)]

HYPER_VALUES = {
    "lr": [1e-3, 0.05, 0, 2, True, "0.01", None, -1.0, math.nan, math.inf, 10 ** 400,
           np.float64(0.002), np.float32(0.003), np.int64(1)],
    "eps": [1e-8, 0.0, 1e-3, -1e-8, "x", np.float64(1e-6)],
    "weight_decay": [0.0, 0.1, 0, 1, -0.5, False, np.float64(0.01)],
    "betas": [(0.9, 0.999), [0.8, 0.99], (0.0, 0.0), (1.0, 0.9), (0.9,), (0.9, 0.99, 0.9),
              "ab", (np.float64(0.85), 0.95), (0.9, True), None],
    "amsgrad": [False, True, "no", 1, 0, np.bool_(True), None],
    "maximize": [False, True, "no", 1, np.bool_(False)],
}


def outcome(fn):
    """(result, None) or (None, (type, message)): what a call did."""
    try:
        return fn(), None
    except Exception as e:  # the comparison is the point: any exception must match
        return None, (type(e), str(e))


def buffers(opt):
    """Every array of the optimizer, by name, copied."""
    out = {}
    for k, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        out[f"p{k}"] = np.array(p, copy=True)
    for k, entry in opt.state.items():
        for key, value in entry.items():
            out[f"s{k}.{key}"] = copy.deepcopy(value)
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape, key
            assert x.tobytes() == y.tobytes(), key
        else:
            assert type(x) is type(y) and repr(x) == repr(y), key


class Twins(RuleBasedStateMachine):
    """A compiled-backend optimizer and a NumPy-reference one, mutated alike."""

    backend = "cython"
    state_dtype = "float32"
    shapes = SHAPES
    checked = 0  # invariant checks made (a subclass's count: run_twins asserts there were some)

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(7)
        init = [rng.standard_normal(shape).astype(dtype) for shape, dtype in self.shapes]
        self.params = {name: [a.copy() for a in init] for name in ("fast", "ref")}
        self.opts = {
            name: fastadam.Adam([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01}],
                                backend=self.backend if name == "fast" else "numpy",
                                state_dtype=self.state_dtype)
            for name, ps in self.params.items()}
        self.rng = rng

    def both(self, fn):
        """fn(opt, params) on both; the outcomes must agree."""
        results = {name: outcome(lambda: fn(opt, self.params[name])) for name, opt in self.opts.items()}
        assert results["fast"] == results["ref"], results
        return results["fast"]

    @invariant()
    def same_bits(self):
        type(self).checked += 1
        assert_same(buffers(self.opts["fast"]), buffers(self.opts["ref"]))
        assert self.opts["fast"].skipped_steps == self.opts["ref"].skipped_steps
        assert repr(self.opts["fast"].last_grad_norm) == repr(self.opts["ref"].last_grad_norm)

    @rule(seed=st.integers(0, 2 ** 16), kind=st.sampled_from(
        ["good", "good", "good", "tuple", "readonly", "nan", "shape", "dtype", "noncontiguous",
         "list", "alias_param", "alias_state", "too_few", "none"]))
    def step(self, seed, kind):
        rng = np.random.default_rng(seed)
        shapes = [(p.shape, p.dtype) for p in self.params["ref"]]
        made = [rng.standard_normal(s).astype(d if d in (np.float32, np.float64) else np.float32)
                for s, d in shapes]

        def grads_for(opt, ps):
            grads = [g.copy() for g in made]
            if kind == "tuple":
                return tuple(grads)
            if kind == "readonly":
                for g in grads:
                    g.setflags(write=False)
            elif kind == "nan":
                grads[1][0] = np.nan
            elif kind == "shape":
                grads[1] = np.zeros(8, np.float32)
            elif kind == "dtype":
                grads[2] = grads[2].astype(np.float32)
            elif kind == "noncontiguous":
                grads[0] = np.asfortranarray(grads[0]) if grads[0].ndim == 2 else grads[0][::1]
            elif kind == "list":
                grads[1] = grads[1].tolist()
            elif kind == "alias_param":
                grads[0] = ps[0]
            elif kind == "alias_state" and 1 in opt.state:
                grads[1] = opt.state[1]["exp_avg"]
            elif kind == "too_few":
                grads = grads[:2]
            elif kind == "none":
                grads[2] = None
            return grads

        before = {name: buffers(opt) for name, opt in self.opts.items()}
        result, error = self.both(lambda opt, ps: opt.step(grads_for(opt, ps)))
        if error is not None:  # a refused step changed nothing
            for name, opt in self.opts.items():
                assert_same(buffers(opt), before[name])

    @rule(group=st.integers(0, 1), key=st.sampled_from(sorted(HYPER_VALUES)), data=st.data())
    def set_hyperparameter(self, group, key, data):
        value = data.draw(st.sampled_from(HYPER_VALUES[key]))
        self.both(lambda opt, ps: opt.param_groups[group].__setitem__(key, copy.copy(value)))

    @rule(group=st.integers(0, 1))
    def restore_hyperparameters(self, group):
        good = dict(lr=1e-3 if group == 0 else 0.01, betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, amsgrad=False, maximize=False)
        self.both(lambda opt, ps: opt.param_groups[group].update(good))

    @rule(k=st.integers(0, 2), value=st.sampled_from(
        [0, 3, 10 ** 6, np.int64(5), np.uint8(2), -1, 2 ** 53 - 1, 2 ** 53, 2 ** 70, True, 5.0, "7"]))
    def set_step_count(self, k, value):
        self.both(lambda opt, ps: opt.state[k].__setitem__("step", value) if k in opt.state else None)

    @rule(k=st.integers(0, 2), key=st.sampled_from(["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
          kind=st.sampled_from(["copy", "zeros", "shape", "dtype", "readonly", "fortran", "list",
                                "delete"]))
    def replace_state_array(self, k, key, kind):
        def change(opt, ps):
            entry = opt.state.get(k)
            if entry is None:
                return
            p = ps[k]
            old = entry.get(key, np.zeros_like(p))
            if kind == "copy":
                entry[key] = old.copy()
            elif kind == "zeros":
                entry[key] = np.zeros_like(p)
            elif kind == "shape":
                entry[key] = np.zeros(p.size + 1, p.dtype)
            elif kind == "dtype":
                entry[key] = old.astype(np.float64 if p.dtype == np.float32 else np.float32)
            elif kind == "readonly":
                entry[key] = old.copy()
                entry[key].setflags(write=False)
            elif kind == "fortran":
                entry[key] = np.asfortranarray(old) if old.ndim == 2 else old[::-1].copy()[::-1]
            elif kind == "list":
                entry[key] = old.tolist()
            elif kind == "delete":
                entry.pop(key, None)
        self.both(change)

    @rule(k=st.integers(0, 2))
    def forget_state(self, k):
        self.both(lambda opt, ps: opt.state.pop(k, None) and None)

    @rule(k=st.integers(0, 2), writeable=st.booleans())
    def set_writeable(self, k, writeable):
        self.both(lambda opt, ps: ps[k].setflags(write=writeable))

    @rule(k=st.integers(0, 2), which=st.sampled_from(["param", "exp_avg"]),
          view=st.sampled_from(["int", "swapped", "flat", "back"]))
    def change_array_in_place(self, k, which, view):
        """The same array object, its dtype or shape changed in place."""
        def change(opt, ps):
            a = ps[k] if which == "param" else opt.state.get(k, {}).get("exp_avg")
            if a is None:
                return
            native = self.shapes[k][1]
            if view == "int":
                a.dtype = np.int32 if native == np.float32 else np.int64
            elif view == "swapped":
                a.dtype = np.dtype(native).newbyteorder()
            elif view == "flat":
                a.shape = (a.size,)
            else:  # back to what it was
                a.dtype = native
                a.shape = self.shapes[k][0]
        self.both(change)

    @rule(value=st.sampled_from([None, 1.0, 0.05, 1e-9, 0, -1.0, float("nan"), "2", np.float32(3)]))
    def set_max_grad_norm(self, value):
        self.both(lambda opt, ps: setattr(opt, "max_grad_norm", value))

    @rule(value=st.sampled_from([False, True, 1, "yes"]))
    def set_skip_if_nonfinite(self, value):
        self.both(lambda opt, ps: setattr(opt, "skip_if_nonfinite", value))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_compiled_and_reference_agree_under_mutation(backend, state_dtype):
    run_twins(backend, state_dtype)


@pytest.mark.slow  # the Numba backend's JIT compiles
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_numba_without_the_extension_and_reference_agree_under_mutation(state_dtype, monkeypatch):
    """The same for the Numba backend's checks in Python (fastadam/_checks.py), as an
    install without a compiler has them."""
    pytest.importorskip("numba")
    monkeypatch.setattr(_backends, "compiled_or_none", lambda: None)
    run_twins("numba", state_dtype)


def run_twins(backend, state_dtype):
    shapes = SHAPES if state_dtype == "float32" else [(s, np.float32) for s, _ in SHAPES]
    machine = type(f"Twins_{backend}_{state_dtype}", (Twins,),
                   {"backend": backend, "state_dtype": state_dtype, "shapes": shapes})
    runner = machine.TestCase
    runner.settings = settings(max_examples=int(os.environ.get("FASTADAM_STATEFUL_EXAMPLES", 80)), stateful_step_count=30, deadline=None,
                               suppress_health_check=list(HealthCheck))
    runner().runTest()
    assert machine.checked > 0, "the state machine compared nothing"
