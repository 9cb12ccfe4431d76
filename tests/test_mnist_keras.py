"""python -m fastadam.mnist.keras: the tutorial's CNN experiment, on a slice of the bundled MNIST."""
import json
import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() not in ("torch", "jax"):
    pytest.skip("fastadam.keras runs on Keras's PyTorch and JAX backends", allow_module_level=True)
if keras.backend.backend() == "torch":
    pytest.importorskip("torch")
else:
    pytest.importorskip("fastadam.jax", reason="fastadam.jax: no XLA FFI handler in this build",
                        exc_type=ImportError)

from fastadam.mnist import keras as experiment  # noqa: E402


@pytest.mark.slow  # a training run
def test_fastadams_curve_is_keras_adams(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert experiment.main(["--optimizers", "adam,fastadam", "--epochs", "2", "--train-size", "600",
                            "--verbose", "0", "--json", str(out), "--plot", str(tmp_path / "r.png")]) == 0
    report = json.loads(out.read_text())
    assert report["data"]["train"] == 600 and report["data"]["test"] == 10000  # MNIST's test set
    keras_adam, ours = report["results"]["adam"], report["results"]["fastadam"]
    assert [r["epoch"] for r in ours] == [1, 2]
    for a, b in zip(ours, keras_adam):
        for key in ("train_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3)
        for key in ("train_acc", "test_acc"):
            assert a[key] == pytest.approx(b[key], abs=0.005)
    assert ours[1]["test_acc"] > 0.5 and ours[1]["train_loss"] < ours[0]["train_loss"]  # it learns
    printed = capsys.readouterr().out
    assert "fastadam.keras.Adam" in printed and "Keras Adam" in printed
    assert (tmp_path / "r.png").stat().st_size > 10000


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", "adam,rmsprop"], "choose from adagrad, adam, sgd, fastadam"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_options_are_refused_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        experiment.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_outputs_and_missing_data_are_refused_before_training(tmp_path, capsys):
    assert experiment.main(["--json", str(tmp_path / "no" / "r.json"), "--epochs", "1"]) == 2
    assert "--json:" in capsys.readouterr().err
    assert experiment.main(["--plot", str(tmp_path), "--epochs", "1"]) == 2  # a directory
    assert "--plot:" in capsys.readouterr().err
    assert experiment.main(["--data", str(tmp_path), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--data {tmp_path}: expected the four MNIST-format files" in err
    assert list(tmp_path.iterdir()) == []  # nothing written
