"""Every user mistake on the command line: one line on stderr, exit 2, no traceback."""

import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from keras_isomax import IsoMaxPlusLayer
from keras_isomax.app import data as data_lib
from keras_isomax_cli import ModelFileError, main


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
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"keras-isomax {argv[0]}: error: "), err
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
    assert len(err.splitlines()) == 1 and err.startswith(f"keras-isomax {argv[0]}: error: "), err
    assert fragment in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--wrongflag"], "unrecognized arguments: --wrongflag"),
        (["--wrongflag", "demo"], "unrecognized arguments: --wrongflag"),
        (["evaluate", "m.keras", "--in", "a", "--ood", "b", "--overwrite"], "--overwrite"),
        ([], "choose a command: demo, evaluate, export"),
        (["evalute"], "invalid choice: 'evalute'"),
    ],
)
def test_unknown_flags_and_commands_are_named(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("keras-isomax: error: "), err
    assert fragment in err


def test_help_names_the_calibration_split(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--calibrate-split" in out and "not trained on" in out and "--debug" in out


def test_export_into_an_existing_export(model_file, tmp_path, capsys):
    target = str(tmp_path / "served")
    assert main(["export", model_file, target]) == 0
    capsys.readouterr()
    line = _fails_in_one_line(
        capsys, ["export", model_file, target], "holds a SavedModel", "pass --overwrite"
    )
    assert "overwrite=" not in line
    assert main(["export", model_file, target, "--overwrite"]) == 0


@pytest.mark.parametrize("fmt", ["saved_model", "onnx"])
def test_library_errors_use_flag_names(model_file, tmp_path, capsys, monkeypatch, fmt):
    """Where the library finds the existing target itself, the line names --overwrite."""
    import keras_isomax_cli

    target = str(tmp_path / ("served" if fmt == "saved_model" else "m.onnx"))
    argv = ["export", model_file, target, "--format", fmt]
    assert main(argv) == 0
    capsys.readouterr()
    monkeypatch.setattr(keras_isomax_cli, "check_export_target", lambda args: None)
    line = _fails_in_one_line(capsys, argv, "FileExistsError", "pass --overwrite")
    assert "overwrite=" not in line


@pytest.mark.parametrize("fmt", ["onnx", "litert"])
def test_export_file_exists(model_file, tmp_path, capsys, fmt):
    target = tmp_path / f"model.{fmt}"
    target.write_text("mine")
    line = _fails_in_one_line(
        capsys, ["export", model_file, str(target), "--format", fmt], "pass --overwrite"
    )
    assert "overwrite=" not in line
    assert target.read_text() == "mine"


def test_export_into_a_foreign_directory(model_file, tmp_path, capsys):
    (tmp_path / "served" / "1").mkdir(parents=True)
    (tmp_path / "served" / "1" / "notes.txt").write_text("mine")
    argv = ["export", model_file, str(tmp_path / "served"), "--overwrite"]
    _fails_in_one_line(capsys, argv, "never replaced, not even with --overwrite")
    assert (tmp_path / "served" / "1" / "notes.txt").read_text() == "mine"


def test_export_of_a_softmax_model_says_what_to_do(tmp_path, capsys):
    model = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    model.save(tmp_path / "softmax.keras")
    line = _fails_in_one_line(
        capsys, ["export", str(tmp_path / "softmax.keras"), str(tmp_path / "s")], "IsoMaxPlusLayer"
    )
    assert "--detector" in line and "replace_head" in line
    assert not os.path.exists(tmp_path / "s")


def test_export_of_an_uncalibrated_model_names_the_flags(tmp_path, capsys):
    model = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), IsoMaxPlusLayer(10)]
    )
    model.save(tmp_path / "m.keras")
    line = _fails_in_one_line(
        capsys, ["export", str(tmp_path / "m.keras"), str(tmp_path / "s")], "no calibrated"
    )
    assert "--calibrate-on" in line and "--threshold" in line


_MISSING_MODEL = """
import sys
import keras_isomax_cli

code = keras_isomax_cli.main(["evaluate", "missing.keras", "--in", "fashion_mnist", "--ood", "digits"])
heavy = sorted(m for m in ("keras", "tensorflow", "keras_isomax") if m in sys.modules)
print("heavy", heavy)
sys.exit(code)
"""


def test_tensorflow_logs_are_silenced_in_a_fresh_process(tmp_path):
    """A model that passes the header check but fails in Keras: TensorFlow has loaded
    (its C++ and absl start-up lines go to stderr unless silenced), then one line."""
    with zipfile.ZipFile(tmp_path / "odd.keras", "w") as archive:
        archive.writestr("config.json", "{}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    argv = ["evaluate", "odd.keras", "--in", "fashion_mnist", "--ood", "digits"]
    code = f"import sys, keras_isomax_cli; sys.exit(keras_isomax_cli.main({argv!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": root, "KERAS_BACKEND": "tensorflow"},
        timeout=600,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("keras-isomax evaluate: error: could not load the Keras model")


def test_missing_model_is_one_line_in_a_fresh_process(tmp_path):
    """As the console script runs it: one line on stderr, exit 2, no Keras imported."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    result = subprocess.run(
        [sys.executable, "-c", _MISSING_MODEL],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": root},
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr == "keras-isomax evaluate: error: model file not found: missing.keras\n"
    assert result.stdout == "heavy []\n"


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
        capsys, ["export", str(path), str(tmp_path / "s")], "could not load the Keras model"
    )
    assert not os.path.exists(tmp_path / "s")


def test_zip_that_is_not_a_keras_model(tmp_path, capsys):
    path = tmp_path / "notes.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    _fails_in_one_line(
        capsys,
        ["evaluate", str(path), "--in", "a", "--ood", "b"],
        "not a Keras model file",
        "no config.json",
    )


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
