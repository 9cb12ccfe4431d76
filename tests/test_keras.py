"""fastadam.keras against Keras's own Adam and AdamW (the oracle: the same model, data,
seed and options trained with each), against fastadam's NumPy API bit for bit, through
Keras's saving, and on bad input.  On Keras's PyTorch backend here (KERAS_BACKEND=torch,
the default of this module); tests/test_keras_jax.py runs this module again on JAX."""
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
BACKEND = keras.backend.backend()
if BACKEND not in ("torch", "jax"):
    pytest.skip(f"Keras runs on {BACKEND!r} here; these tests are for its PyTorch and JAX "
                "backends", allow_module_level=True)
if BACKEND == "torch":
    pytest.importorskip("torch")
else:
    pytest.importorskip("fastadam.jax", reason="fastadam.jax: no XLA FFI handler in this build",
                        exc_type=ImportError)
fk = pytest.importorskip("fastadam.keras")  # noqa: E402

import fastadam  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((192, 12)).astype(np.float32)
Y = RNG.integers(0, 3, 192)


def model(dtype=None):
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu", dtype=dtype),
                             keras.layers.Dense(3, dtype=dtype)])


def train(opt, epochs=2, dtype=None, batch_size=32):
    m = model(dtype)
    m.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = m.fit(X, Y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False)
    return m, history.history["loss"]


def numbers(variables):
    return [keras.ops.convert_to_numpy(v.value).astype(np.float32) for v in variables]


CASES = {
    "adam": ("Adam", {}),
    "amsgrad": ("Adam", dict(amsgrad=True, epsilon=1e-3)),
    "adam-weight-decay": ("Adam", dict(weight_decay=0.05)),
    "adamw": ("AdamW", dict(weight_decay=0.1, beta_1=0.8, beta_2=0.99)),
    "global-clipnorm": ("Adam", dict(global_clipnorm=0.05)),
    "clipnorm": ("Adam", dict(clipnorm=0.02)),
    "clipvalue": ("AdamW", dict(clipvalue=0.001)),
    "schedule": ("Adam", dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(0.02, 3, 0.5))),
    "callable-lr": ("Adam", dict(learning_rate=lambda: 0.004)),
    "accumulation": ("Adam", dict(gradient_accumulation_steps=3)),
    "loss-scale": ("Adam", dict(loss_scale_factor=256.0)),
    "ema": ("AdamW", dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=4)),
}


@pytest.mark.parametrize("case", CASES)
def test_training_follows_kerass_own_optimizer(case):
    name, options = CASES[case]
    options = dict(options)
    options.setdefault("learning_rate", 1e-2)
    theirs, their_loss = train(getattr(keras.optimizers, name)(**options))
    ours, our_loss = train(getattr(fk, name)(**options))
    np.testing.assert_allclose(our_loss, their_loss, rtol=2e-5)
    for a, b in zip(numbers(ours.weights), numbers(theirs.weights)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    for a, b in zip(numbers(ours.optimizer.variables), numbers(theirs.optimizer.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(ours.optimizer.iterations) == int(theirs.optimizer.iterations) > 0


def test_hyperparameters_set_between_steps_take_effect_as_in_keras():
    results = []
    for cls in (keras.optimizers.AdamW, fk.AdamW):
        m, _ = train(cls(learning_rate=0.01, weight_decay=0.1), epochs=1)
        m.optimizer.learning_rate = 0.002
        m.optimizer.beta_1, m.optimizer.epsilon, m.optimizer.weight_decay = 0.5, 1e-3, 0.3
        m.optimizer.global_clipnorm = 0.01
        m.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
        results.append(numbers(m.weights) + numbers(m.optimizer.variables))
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5)


def test_exclude_from_weight_decay_is_honoured():
    losses = {}
    for cls in (keras.optimizers.AdamW, fk.AdamW):
        opt = cls(learning_rate=0.05, weight_decay=0.5)
        opt.exclude_from_weight_decay(var_names=["bias"])
        m, _ = train(opt, epochs=1)
        losses[cls] = numbers(m.weights)
    for a, b in zip(losses[fk.AdamW], losses[keras.optimizers.AdamW]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def jax_x64():
    import jax
    return jax.config.jax_enable_x64


def steps_through_keras(opt, params, grads_per_step):
    variables = [keras.Variable(p.copy(), dtype=str(p.dtype)) for p in params]
    for grads in grads_per_step:
        opt.apply([keras.ops.convert_to_tensor(g, dtype=str(g.dtype)) for g in grads], variables)
    assert all(v.dtype == str(p.dtype) for v, p in zip(variables, params))
    return [keras.ops.convert_to_numpy(v.value) for v in variables]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [{}, dict(amsgrad=True), dict(weight_decay=0.01)])
def test_a_step_is_fastadams_kernel_bit_for_bit(options, dtype):
    if BACKEND == "jax" and dtype == np.float64 and not jax_x64():
        pytest.skip("JAX without jax_enable_x64 has no float64 variables")
    params = [RNG.standard_normal(s).astype(dtype) for s in ((7, 5), (5,), (300,))]
    grads = [[RNG.standard_normal(p.shape).astype(dtype) for p in params] for _ in range(5)]
    got = steps_through_keras(fk.AdamW(learning_rate=0.01, **{"weight_decay": 0.0, **options}), params, grads)
    mine = [p.copy() for p in params]
    # Keras keeps the learning rate in a float32 variable: 0.01 is read as float32(0.01)
    ref = fastadam.AdamW(mine, lr=float(np.float32(0.01)), betas=(0.9, 0.999), eps=1e-7, eps_hat=True,
                         backend="numpy", amsgrad=options.get("amsgrad", False),
                         weight_decay=options.get("weight_decay", 0.0))
    for g in grads:
        ref.step(g)
    for a, b in zip(got, mine):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_variables_are_updated_as_fastadam_updates_bfloat16_parameters():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    params = [RNG.standard_normal(s).astype(bf16) for s in ((9, 4), (33,))]
    grads = [[RNG.standard_normal(p.shape).astype(bf16) for p in params] for _ in range(4)]
    variables = [keras.Variable(p.astype(np.float32), dtype="bfloat16") for p in params]
    opt = fk.Adam(learning_rate=0.01)
    for gs in grads:
        opt.apply([keras.ops.convert_to_tensor(g.astype(np.float32), dtype="bfloat16") for g in gs], variables)
    mine = [p.copy() for p in params]
    ref = fastadam.Adam(mine, lr=0.01, eps=1e-7, eps_hat=True, backend="numpy")
    for gs in grads:
        ref.step(gs)
    for v, b in zip(variables, mine):
        assert v.dtype == "bfloat16"
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v.value).astype(np.float32), b.astype(np.float32))
    state = [v for v in opt.variables if v.path.endswith(("_momentum", "_velocity"))]
    assert len(state) == 4 and all(v.dtype == "bfloat16" for v in state)  # fastadam's: the parameters' dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_low_precision_policy_model_learns_as_the_float32_model_does(dtype):
    """bfloat16 or float16 variables, the math in float32 rounded once (Keras's own Adam
    computes in the variables' dtype: benchmarks/keras_low_precision.py)."""
    _, float32_loss = train(keras.optimizers.Adam(1e-2), epochs=3)
    ours, our_loss = train(fk.Adam(1e-2), epochs=3, dtype=dtype)
    assert all(w.dtype == dtype for w in ours.weights)
    assert our_loss[0] > our_loss[1] > our_loss[2]
    if BACKEND == "jax":  # JAX computes the forward pass and the loss in the variables' dtype:
        # untrained, the bfloat16 and float16 models' losses are 7% and 21% above float32's here
        np.testing.assert_allclose(our_loss[-1], float32_loss[-1], rtol=0.10)
    else:
        np.testing.assert_allclose(our_loss, float32_loss, rtol=0.05)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_policies_follow_kerass_adam(policy):
    """float32 variables; under mixed_float16 Keras wraps the optimizer in its LossScaleOptimizer."""
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        theirs, their_loss = train(keras.optimizers.Adam(1e-2))
        ours, our_loss = train(fk.Adam(1e-2))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert all(w.dtype == "float32" for w in ours.weights)
    np.testing.assert_allclose(our_loss, their_loss, rtol=1e-3)


def test_saved_model_resumes_bit_for_bit(tmp_path):
    straight, _ = train(fk.AdamW(learning_rate=0.01, weight_decay=0.02, amsgrad=True), epochs=2)
    first, _ = train(fk.AdamW(learning_rate=0.01, weight_decay=0.02, amsgrad=True), epochs=1)
    first.save(tmp_path / "m.keras")
    resumed = keras.models.load_model(tmp_path / "m.keras")
    assert type(resumed.optimizer) is fk.AdamW and resumed.optimizer.amsgrad
    resumed.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(numbers(resumed.weights), numbers(straight.weights)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(numbers(resumed.optimizer.variables), numbers(straight.optimizer.variables)):
        np.testing.assert_array_equal(a, b)


def test_checkpoints_move_between_keras_adam_and_fastadams(tmp_path):
    theirs, _ = train(keras.optimizers.Adam(0.01), epochs=1)
    theirs.save(tmp_path / "k.keras")
    ours = keras.models.load_model(tmp_path / "k.keras", custom_objects={"Adam": fk.Adam}, compile=False)
    ours.compile(optimizer=fk.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ours.optimizer.build(ours.trainable_variables)
    for mine, saved in zip(ours.optimizer.variables, theirs.optimizer.variables, strict=True):
        kind = [v.path.split("/")[-1].rsplit("_", 1)[-1] for v in (mine, saved)]  # momentum, ...
        assert kind[0] == kind[1] and mine.shape == saved.shape
        mine.assign(keras.ops.convert_to_numpy(saved.value))  # a copy: JAX donates saved's buffer
    theirs.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    ours.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(numbers(ours.weights), numbers(theirs.weights)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_config_and_serialization_round_trip():
    opt = fk.AdamW(learning_rate=0.003, weight_decay=0.02, beta_1=0.85, epsilon=1e-6, amsgrad=True,
                   num_threads=1, global_clipnorm=2.0)
    config = opt.get_config()
    assert config["num_threads"] == 1 and config["epsilon"] == 1e-6 and config["weight_decay"] == 0.02
    again = fk.AdamW.from_config(config)
    assert again.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is fk.AdamW and restored.get_config() == config
    assert isinstance(opt, keras.optimizers.AdamW) and isinstance(fk.Adam(), keras.optimizers.Adam)


@pytest.mark.parametrize("options, names", [
    (dict(beta_1=1.5), "beta_1"), (dict(beta_2=-0.1), "beta_2"), (dict(epsilon=-1.0), "epsilon"),
    (dict(epsilon="small"), "epsilon"), (dict(num_threads=0), "num_threads"),
])
def test_bad_arguments_are_refused_naming_them(options, names):
    with pytest.raises((TypeError, ValueError), match=names):
        fk.Adam(**options)


def test_a_variable_without_a_gradient_keeps_its_value_and_state():
    rng = np.random.default_rng(7)  # its own: the shared RNG's state depends on the test order
    params = [rng.standard_normal(s).astype(np.float32) for s in ((5, 3), (3,), (4,))]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params] for _ in range(3)]
    results = []
    for cls in (keras.optimizers.Adam, fk.Adam):
        variables = [keras.Variable(p.copy()) for p in params]
        opt = cls(0.01)
        for i, gs in enumerate(grads):
            gs = [keras.ops.convert_to_tensor(g) for g in gs]
            if i == 1:  # the second variable has no gradient this step, as Keras warns
                gs[1] = None
                with pytest.warns(UserWarning, match="Gradients do not exist"):
                    opt.apply(gs, variables)
            else:
                opt.apply(gs, variables)
        results.append(numbers(variables) + numbers(opt.variables))
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(BACKEND != "torch", reason="a JAX array is always contiguous")
def test_a_refused_step_changes_nothing():
    params = [RNG.standard_normal((6, 4)).astype(np.float32), RNG.standard_normal(4).astype(np.float32)]
    variables = [keras.Variable(p.copy()) for p in params]
    opt = fk.Adam(0.01)
    good = [keras.ops.convert_to_tensor(np.ones(p.shape, np.float32)) for p in params]
    opt.apply(good, variables)
    before = numbers(variables) + numbers(opt.variables)
    strided = keras.ops.convert_to_tensor(np.ones((4, 6), np.float32)).T  # not contiguous
    with pytest.raises(RuntimeError, match="gradient of variable .* is not contiguous"):
        opt.apply([strided, good[1]], variables)
    after = numbers(variables) + numbers(opt.variables)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    opt.apply(good, variables)  # and it steps on
    assert int(opt.iterations) == 2


@pytest.mark.parametrize("backend", ["tensorflow", "numpy", "openvino"])
def test_other_backends_are_refused_naming_the_ones_that_work(monkeypatch, backend):
    monkeypatch.setattr(keras.backend, "backend", lambda: backend)
    for cls in (fk.Adam, fk.AdamW):
        with pytest.raises(ValueError, match=rf"runs on Keras's PyTorch and JAX backends "
                                             rf"\(KERAS_BACKEND=torch or jax\); this Keras runs on "
                                             rf"'{backend}'"):
            cls()
