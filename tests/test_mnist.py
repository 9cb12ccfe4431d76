"""The MNIST trainer: the IDX loader against the dataset's known facts, corrupt files,
the backward pass against finite differences, and short real training runs."""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import fastadam
from fastadam.mnist import data as mnist_data, main, train
from fastadam.mnist.model import MLP, softmax_cross_entropy

BUNDLED = mnist_data.bundled_dir()
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def mnist():
    return mnist_data.load_dataset(BUNDLED)


def test_bundled_files_are_the_canonical_ones():
    for stem, digest in mnist_data.SHA256.items():
        assert mnist_data.sha256_of(BUNDLED / (stem + ".gz")) == digest


def test_loader_matches_the_dataset_facts(mnist):
    x_train, y_train, x_test, y_test = mnist
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() == 1.0
    assert np.bincount(y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert round(float(x_train.mean(dtype=np.float64)), 4) == 0.1307
    assert round(float(x_train.std(dtype=np.float64)), 4) == 0.3081


def idx_bytes(array, dtype_code=0x08):
    array = np.asarray(array, np.uint8)
    return bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_dataset(directory, n_train=20, n_test=10, rows=4, cols=4, compress=True):
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    content = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, rows, cols)),
               "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
               "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, rows, cols)),
               "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for stem, array in content.items():
        raw = idx_bytes(array)
        if compress:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return content


@pytest.mark.parametrize("compress", [True, False])
def test_loads_gzip_and_raw(tmp_path, compress):
    content = write_dataset(tmp_path, compress=compress)
    x_train, y_train, x_test, y_test = mnist_data.load_dataset(tmp_path)
    np.testing.assert_array_equal(
        x_train, content["train-images-idx3-ubyte"].reshape(20, 16).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y_test, content["t10k-labels-idx1-ubyte"])


@pytest.mark.parametrize("damage, match", [
    ("magic", r"train-labels-idx1-ubyte.gz: bad magic number 0x00000901"),
    ("dtype_code", r"bad magic number 0x00000d01"),
    ("truncated", r"t10k-images-idx3-ubyte.gz: truncated \(105 of 160 bytes\)"),
    ("trailing", r"t10k-labels-idx1-ubyte.gz: trailing data after the 10 bytes"),
    ("short", r"too short for an IDX header"),
    ("gzip", r"train-images-idx3-ubyte.gz: corrupt or truncated gzip data"),
    ("ndim", r"t10k-labels-idx1-ubyte.gz: 3 dimensions, expected 1"),
    ("count", r"has 20 images but .*train-labels-idx1-ubyte.gz has 19 labels"),
    ("label", r"label 12 is not a digit class"),
])
def test_corrupt_files_are_named(tmp_path, damage, match):
    write_dataset(tmp_path)
    def put(stem, raw):
        (tmp_path / (stem + ".gz")).write_bytes(gzip.compress(raw))
    if damage == "magic":
        put("train-labels-idx1-ubyte", b"\x00\x00\x09\x01" + struct.pack(">I", 20) + bytes(20))
    elif damage == "dtype_code":
        put("train-labels-idx1-ubyte", b"\x00\x00\x0d\x01" + struct.pack(">I", 20) + bytes(80))
    elif damage == "truncated":
        put("t10k-images-idx3-ubyte", idx_bytes(np.zeros((10, 4, 4)))[:121])
    elif damage == "trailing":
        put("t10k-labels-idx1-ubyte", idx_bytes(np.zeros(10)) + b"\x00")
    elif damage == "short":
        put("t10k-labels-idx1-ubyte", b"\x00\x00")
    elif damage == "gzip":
        path = tmp_path / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:30])
    elif damage == "ndim":
        put("t10k-labels-idx1-ubyte", idx_bytes(np.zeros((10, 4, 4))))
    elif damage == "count":
        put("train-labels-idx1-ubyte", idx_bytes(np.zeros(19)))
    elif damage == "label":
        put("train-labels-idx1-ubyte", idx_bytes(np.full(20, 12)))
    with pytest.raises(mnist_data.IDXError, match=match):
        mnist_data.load_dataset(tmp_path)


def test_missing_data_fails_fast_and_says_where(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_data, "bundled_dir", lambda: tmp_path / "none")
    monkeypatch.setattr(mnist_data, "cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="MNIST was not found. Put the four files"):
        mnist_data.locate(None, download=False)
    with pytest.raises(FileNotFoundError, match=r"--data .*: expected the four MNIST-format files"):
        mnist_data.locate(tmp_path)
    assert main(["--no-download", "--epochs", "1"]) == 2


def test_download_verifies_checksums(tmp_path):
    """The download path, against a local mirror (a file:// URL): the real files pass,
    a file with other content is refused and not kept."""
    mirror = BUNDLED.resolve().as_uri() + "/"
    target = tmp_path / "cache"
    mnist_data.download_mnist(target, progress=False, mirrors=(mirror,))
    assert mnist_data.load_dataset(target)[0].shape == (60000, 784)
    bad = tmp_path / "bad"
    write_dataset(bad)
    with pytest.raises(FileNotFoundError, match="does not match the canonical"):
        mnist_data.download_mnist(tmp_path / "cache2", progress=False, mirrors=(bad.as_uri() + "/",))
    assert not list((tmp_path / "cache2").glob("*.gz")) and not list((tmp_path / "cache2").glob("*.part"))


@pytest.mark.parametrize("hidden", [[], [7, 5]])
def test_backward_matches_finite_differences(hidden):
    rng = np.random.default_rng(1)
    model = MLP([6, *hidden, 4], rng, dtype=np.float64)
    for name, value in model.params.items():  # non-zero biases, so their gradients matter
        if name.startswith("b"):
            value[...] = rng.standard_normal(value.shape) * 0.1
    x = rng.standard_normal((9, 6))
    y = rng.integers(0, 4, 9)
    model.loss_and_backward(x, y)
    analytic = model.flat.grad.copy()
    numeric = np.zeros_like(analytic)
    h = 1e-6
    for i in range(model.flat.data.size):
        saved = model.flat.data[i]
        model.flat.data[i] = saved + h
        plus = softmax_cross_entropy(model.forward(x), y)[1]
        model.flat.data[i] = saved - h
        minus = softmax_cross_entropy(model.forward(x), y)[1]
        model.flat.data[i] = saved
        numeric[i] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)
    assert np.abs(analytic).max() > 1e-3


def test_softmax_cross_entropy_is_stable():
    logits = np.array([[1000.0, 0.0, -1000.0], [-1e4, -1e4, -1e4]], np.float32)
    probs, loss = softmax_cross_entropy(logits, np.array([0, 2]))
    assert np.isfinite(probs).all() and np.isfinite(loss)
    assert loss == pytest.approx(np.log(3) / 2, rel=1e-5)


def test_short_real_training_reaches_90_percent(mnist):
    x_train, y_train, x_test, y_test = mnist
    model = MLP([784, 10], np.random.default_rng(0))
    opt = fastadam.Adam([model.flat.data], lr=1e-3)
    history = train(model, opt, x_train, y_train, x_test, y_test, epochs=2, batch_size=128, seed=0,
                    progress=False, log=lambda s: None)
    assert history[-1]["test_acc"] > 0.905
    assert history[1]["train_loss"] < history[0]["train_loss"]


def test_fastadam_and_reference_give_the_same_curve(mnist):
    x_train, y_train, x_test, y_test = (a[:12000] for a in mnist)
    histories = []
    for backend in ("auto", "numpy"):
        model = MLP([784, 32, 10], np.random.default_rng(3))
        opt = fastadam.Adam([model.flat.data], lr=2e-3, backend=backend)
        history = train(model, opt, x_train, y_train, x_test, y_test, epochs=2, batch_size=100,
                        seed=3, progress=False, log=lambda s: None)
        histories.append([(r["train_loss"], r["test_loss"], r["test_acc"]) for r in history])
    assert histories[0] == histories[1]


def test_cli_writes_json_and_plot(tmp_path, capsys):
    json_path, png_path = tmp_path / "run.json", tmp_path / "run.png"
    assert main(["--epochs", "1", "--hidden", "16", "--json", str(json_path), "--plot", str(png_path),
                 "--compare", "--no-progress"]) == 0
    result = json.loads(json_path.read_text())
    assert result["config"]["sizes"] == [784, 16, 10] and result["config"]["epochs"] == 1
    (record,) = result["epochs"]
    assert set(record) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds",
                           "optimizer_seconds"}
    assert 0.8 < record["test_acc"] <= 1.0 and record["seconds"] > record["optimizer_seconds"] > 0
    assert result["comparison"]["epochs"][0]["test_loss"] == record["test_loss"]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "largest difference in any curve 0" in out


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--hidden", "a,b"], ["--epochs", "0"], ["--lr", "-1"], ["--optimizer", "sgd"]):
        with pytest.raises(SystemExit):
            main(argv)


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_trains_unchanged(tmp_path):
    json_path = tmp_path / "f.json"
    assert main(["--data", str(FASHION), "--epochs", "1", "--json", str(json_path), "--no-progress"]) == 0
    assert json.loads(json_path.read_text())["epochs"][0]["test_acc"] > 0.75


@pytest.mark.parametrize("compress", [True, False])
def test_crafted_idx_header_is_refused_before_allocating(tmp_path, compress):
    """A header declaring far more data than the file can hold is refused from the
    header alone (a 1.5 MB file used to be inflated whole first: 3 GB)."""
    import tracemalloc
    write_dataset(tmp_path, compress=compress)
    header = b"\x00\x00\x08\x03" + struct.pack(">III", 2_000_000_000, 28, 28)
    raw = header + bytes(100_000)
    name = "train-images-idx3-ubyte" + (".gz" if compress else "")
    for stale in tmp_path.glob("train-images-idx3-ubyte*"):
        stale.unlink()
    (tmp_path / name).write_bytes(gzip.compress(raw) if compress else raw)
    tracemalloc.start()
    try:
        with pytest.raises(mnist_data.IDXError, match=name + r": .*(more than a \d+-byte gzip file can hold|truncated)"):
            mnist_data.load_dataset(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_cli_max_grad_norm_clips_and_is_recorded(tmp_path):
    """--max-grad-norm reaches the optimizer: a threshold no gradient reaches gives the
    unclipped run's curves to the bit (the coefficient is exactly 1), a tiny one changes
    them; the JSON records it."""
    results = {}
    for norm in (None, 1e9, 1e-4):
        json_path = tmp_path / f"run-{norm}.json"
        argv = ["--epochs", "1", "--json", str(json_path), "--no-progress"]
        if norm is not None:
            argv += ["--max-grad-norm", str(norm)]
        assert main(argv) == 0
        results[norm] = json.loads(json_path.read_text())

    def curve(r):
        return [(e["train_loss"], e["test_loss"], e["test_acc"]) for e in r["epochs"]]

    assert [r["config"]["max_grad_norm"] for r in results.values()] == [None, 1e9, 1e-4]
    assert curve(results[1e9]) == curve(results[None])
    assert curve(results[1e-4]) != curve(results[None])
    with pytest.raises(SystemExit):
        main(["--max-grad-norm", "-1"])


def test_cli_state_dtype_bfloat16_trains_and_is_recorded(tmp_path):
    json_path = tmp_path / "bf16.json"
    assert main(["--epochs", "1", "--state-dtype", "bfloat16", "--json", str(json_path),
                 "--no-progress"]) == 0
    result = json.loads(json_path.read_text())
    assert result["config"]["state_dtype"] == "bfloat16"
    assert result["epochs"][0]["test_acc"] > 0.88  # softmax regression after one epoch


@pytest.mark.parametrize("flags", [["--param-dtype", "bfloat16"],
                                   ["--param-dtype", "bfloat16", "--param-rounding", "stochastic"],
                                   ["--param-dtype", "bfloat16", "--master-weights", "split"],
                                   ["--param-dtype", "float16", "--master-weights", "float32"]])
def test_cli_low_precision_parameters_train_and_are_recorded(tmp_path, flags):
    pytest.importorskip("ml_dtypes")
    json_path = tmp_path / "low.json"
    assert main(["--epochs", "1", *flags, "--json", str(json_path), "--no-progress"]) == 0
    config = json.loads(json_path.read_text())["config"]
    assert config["param_dtype"] == flags[1]
    assert config["param_rounding"] == (flags[3] if "--param-rounding" in flags else "nearest")
    assert json.loads(json_path.read_text())["epochs"][0]["test_acc"] > 0.88


def test_cli_refuses_low_precision_options_that_do_not_fit(capsys):
    pytest.importorskip("ml_dtypes")
    assert main(["--epochs", "1", "--param-dtype", "float16", "--master-weights", "split",
                 "--no-progress"]) == 2
    assert "master_weights='split'" in capsys.readouterr().err


def test_the_trainers_float16_rounding_is_numpys():
    from fastadam.mnist.low_precision import to_float16
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10 ** 5) * 10.0 ** rng.uniform(-12, 6, 10 ** 5),
                        [65504, 65519.99, 65520, 2.0 ** -25, 2.0 ** -24 * 1.5, -0.0, np.inf, -np.inf]]
                       ).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    np.testing.assert_array_equal(to_float16(x).view(np.uint16), expected.view(np.uint16))
    assert np.isnan(to_float16(np.array([np.nan], np.float32)))[0]
