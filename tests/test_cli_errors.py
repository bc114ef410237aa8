"""Every user mistake on the command line: one line on stderr, exit 2, no traceback."""

import os
import zipfile

import keras
import numpy as np
import pytest

from keras_isomax import IsoMaxPlusLayer
from keras_isomax.app import data as data_lib
from keras_isomax.app.cli import ModelFileError, main


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny calibrated IsoMax+ model on 28x28x1 images (no training needed)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), IsoMaxPlusLayer(10, name="head")]
    )
    model.get_layer("head").ood_threshold.assign(-1.0)
    path = tmp_path_factory.mktemp("cli") / "model.keras"
    model.save(path)
    return str(path)


def _fails_in_one_line(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("keras-isomax")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["demo", "--epochs", "0"], "--epochs: must be >= 1"),
        (["demo", "--epochs", "two"], "--epochs: expected an integer"),
        (["demo", "--train-size", "-5"], "--train-size: must be >= 0"),
        (["evaluate", "m.keras", "--in", "a", "--ood", "b", "--tpr", "0"], "--tpr: must be in"),
        (["evaluate", "m.keras", "--in", "a", "--ood", "b", "--tpr", "1.5"], "--tpr"),
        (["evaluate", "m.keras", "--in", "a", "--ood", "b", "--tpr", "nan"], "--tpr"),
        (["evaluate", "m.keras", "--in", "a", "--ood", "b", "--n", "0"], "--n: must be >= 1"),
        (["export", "m.keras", "d", "--calibrate-n", "0"], "--calibrate-n"),
        (["export", "m.keras", "d", "--version", "-1"], "--version: must be >= 0"),
        (["export", "m.keras", "d", "--threshold", "nan"], "--threshold: must be a finite"),
        (["export", "m.keras", "d", "--calibrate-on", "fashion_mnist"], "--calibrate-split"),
        (["export", "m.keras", "d", "--calibrate-split", "test"], "--calibrate-on"),
    ],
)
def test_argparse_refuses_nonsense(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_help_names_the_calibration_split(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--calibrate-split" in out and "not trained on" in out and "--debug" in out


def test_export_into_an_existing_export(model_file, tmp_path, capsys):
    target = str(tmp_path / "served")
    assert main(["export", model_file, target]) == 0
    capsys.readouterr()
    _fails_in_one_line(capsys, ["export", model_file, target], "FileExistsError", "overwrite=True")
    assert main(["export", model_file, target, "--overwrite"]) == 0


def test_export_prints_the_calibration_split_and_size(model_file, tmp_path, capsys):
    argv = ["export", model_file, str(tmp_path / "s"), "--calibrate-on", "fashion_mnist"]
    argv += ["--calibrate-split", "test", "--calibrate-n", "300", "--tpr", "0.9"]
    assert main(argv) == 0
    assert "fashion_mnist split 'test' (300 examples)" in capsys.readouterr().out


def test_demo_output_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    _fails_in_one_line(capsys, ["demo", "--output", str(tmp_path / "out")], "not a directory")
    assert (tmp_path / "out").read_text() == "mine"


def test_corrupted_keras_file(tmp_path, capsys):
    path = tmp_path / "broken.keras"
    path.write_bytes(np.random.default_rng(0).bytes(500))
    _fails_in_one_line(
        capsys, ["evaluate", str(path), "--in", "a", "--ood", "b"], "not a Keras model file"
    )


def test_truncated_keras_file(model_file, tmp_path, capsys):
    path = tmp_path / "truncated.keras"
    blob = open(model_file, "rb").read()
    path.write_bytes(blob[: len(blob) // 2])
    _fails_in_one_line(capsys, ["export", str(path), str(tmp_path / "s")], "truncated.keras")


def test_truncated_weights_inside_the_archive(model_file, tmp_path, capsys):
    path = tmp_path / "bad_weights.keras"
    with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            content = src.read(item)
            if item.filename.endswith(".h5"):
                content = content[: len(content) // 3]
            dst.writestr(item, content)
    _fails_in_one_line(
        capsys, ["export", str(path), str(tmp_path / "s")], "Could not load the Keras model"
    )
    assert not os.path.exists(tmp_path / "s")


def test_zip_that_is_not_a_keras_model(tmp_path, capsys):
    path = tmp_path / "notes.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    _fails_in_one_line(capsys, ["evaluate", str(path), "--in", "a", "--ood", "b"], "Could not load")


def test_directory_as_model(tmp_path, capsys):
    _fails_in_one_line(
        capsys, ["evaluate", str(tmp_path), "--in", "a", "--ood", "b"], "is a directory"
    )


def test_unexpected_error_is_one_line(model_file, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution\n(more detail)")

    monkeypatch.setattr(data_lib, "load_dataset", offline)
    line = _fails_in_one_line(
        capsys, ["evaluate", model_file, "--in", "cifar10", "--ood", "svhn_cropped"], "OSError"
    )
    assert "name resolution (more detail)" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    argv = ["evaluate", str(tmp_path / "missing.keras"), "--in", "a", "--ood", "b"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ModelFileError, match="missing.keras"):
        main(argv)
