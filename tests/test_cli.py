import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss
from keras_isomax.app.demo import build_classifier, run_demo
from keras_isomax_cli import main


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny IsoMax+ CNN and a softmax one, briefly trained on Fashion-MNIST."""
    from keras_isomax.app import data

    x, y = data.load_fashion_mnist("train")
    x, y = x[:1024], y[:1024]
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for head in ("isomax", "softmax"):
        keras.utils.set_random_seed(0)
        model = build_classifier(head, width=8)
        loss = (
            IsoMaxPlusLoss()
            if head == "isomax"
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        model.compile(optimizer="adam", loss=loss)
        model.fit(x, y, epochs=1, batch_size=128, verbose=0)
        paths[head] = str(root / f"{head}.keras")
        model.save(paths[head])
    return paths


@pytest.fixture
def run_cli(capsys):
    """Runs `keras-isomax ARGS...` in-process; returns (exit status, stdout, stderr)."""

    def run(*argv):
        code = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_evaluate_prints_table(saved_models, run_cli):
    code, out, _ = run_cli(
        "evaluate",
        saved_models["isomax"],
        *("--in", "fashion_mnist", "--ood", "digits,gaussian_noise", "--n", 300),
    )
    assert code == 0
    assert "minimum_distance" in out and "digits" in out and "gaussian_noise" in out


def test_evaluate_softmax_model_with_scores(saved_models, run_cli):
    code, out, _ = run_cli(
        "evaluate",
        saved_models["softmax"],
        *("--in", "fashion_mnist", "--ood", "uniform_noise", "--n", 200),
        *("--score", "max_probability,energy"),
    )
    assert code == 0 and "max_probability" in out and "energy" in out


def test_unknown_dataset_lists_choices(saved_models, run_cli):
    code, _, err = run_cli(
        "evaluate", saved_models["isomax"], "--in", "fashion_mnist", "--ood", "nope"
    )
    assert code == 2
    assert "nope" in err and "digits" in err and "gaussian_noise" in err


def test_missing_model_file(tmp_path, run_cli):
    code, _, err = run_cli("evaluate", tmp_path / "x.keras", "--in", "a", "--ood", "b")
    assert code == 2 and "x.keras" in err


def test_export_with_calibration(saved_models, tmp_path, run_cli):
    code, out, _ = run_cli(
        "export",
        saved_models["isomax"],
        tmp_path / "served",
        *("--calibrate-on", "fashion_mnist", "--calibrate-split", "test"),
        *("--calibrate-n", 500, "--tpr", 0.9),
    )
    assert code == 0
    assert "Calibrated threshold" in out
    loaded = tf.saved_model.load(str(tmp_path / "served" / "1"))
    assert set(loaded.signatures) >= {"serving_default", "score"}


def test_export_uncalibrated_without_threshold_fails_clearly(saved_models, tmp_path, run_cli):
    code, _, err = run_cli("export", saved_models["isomax"], tmp_path / "s")
    assert code == 2 and "threshold" in err


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "keras_isomax", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "demo" in result.stdout and "evaluate" in result.stdout and "export" in result.stdout


_NO_KERAS_CHECK = """
import sys
import keras_isomax_cli

for argv in (["--help"], ["--version"], ["export", "--help"], ["demo", "--epochs", "0"]):
    try:
        keras_isomax_cli.main(argv)
    except SystemExit as exit_info:
        print("exit", argv[-1], exit_info.code)
heavy = sorted(m for m in ("keras", "tensorflow", "keras_isomax") if m in sys.modules)
print("heavy", heavy)
"""


def test_help_version_and_errors_import_no_keras():
    """The console script's parser answers without importing Keras or TensorFlow."""
    from importlib import metadata

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", _NO_KERAS_CHECK], capture_output=True, text=True, cwd=root
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "usage: keras-isomax" in out and "demo" in out and "--calibrate-on" in out
    assert f"keras-isomax {metadata.version('keras-isomax')}" in out
    assert "exit --help 0" in out and "exit --version 0" in out and "exit 0 2" in out
    assert "--epochs: must be >= 1" in result.stderr
    assert "heavy []" in out


def test_demo_end_to_end(tmp_path, capsys):
    """The main job on a small budget: every artefact it promises is written."""
    result = run_demo(output_dir=tmp_path, epochs=2, train_size=2000)
    out = capsys.readouterr().out
    # stdout is not a terminal here: one line per epoch, no progress-bar frames.
    assert "\r" not in out and "\u2501" not in out and "Epoch 1/2" not in out
    for label in ("SoftMax", "IsoMax+"):
        lines = [line for line in out.splitlines() if line.strip().startswith(f"{label} epoch")]
        assert [line.split(":")[0].strip() for line in lines] == [
            f"{label} epoch 1/2",
            f"{label} epoch 2/2",
        ]
        assert "loss" in lines[0] and "accuracy" in lines[0]
    for name in (
        "report.md",
        "histogram_isomax.png",
        "roc_isomax.png",
        "histogram_softmax.png",
        "roc_softmax.png",
        "isomax.keras",
        "softmax.keras",
    ):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "report.md").read_text()
    assert "IsoMax+" in report and "SoftMax" in report and "histogram_isomax.png" in report
    assert abs(result["accepted_test"] - 0.95) < 0.03
    assert result["response"]["outputs"]["is_ood"][2] in (True, False)
    json.dumps(result["response"])
    restored = keras.saving.load_model(tmp_path / "isomax.keras")
    head = [layer for layer in restored.layers if isinstance(layer, IsoMaxPlusLayer)][0]
    np.testing.assert_allclose(float(head.ood_threshold.numpy()), result["threshold"], rtol=1e-6)


def test_evaluate_with_detector(saved_models, run_cli):
    code, out, _ = run_cli(
        "evaluate",
        saved_models["softmax"],
        *("--in", "fashion_mnist", "--ood", "uniform_noise", "--n", 200, "--score", "energy"),
        *("--detector", "knn:5,mahalanobis", "--fit-n", 400),
    )
    assert code == 0 and "energy" in out and "knn" in out and "mahalanobis" in out
    # No --fit-on: the output says what the detectors were fitted on.
    for name in ("knn", "mahalanobis"):
        assert (
            f"Fitted detector {name} on 400 examples of the train split of fashion_mnist "
            "(the --in data set; choose another with --fit-on)"
        ) in out


def test_evaluate_with_detector_fit_on(saved_models, run_cli):
    code, out, _ = run_cli(
        "evaluate",
        saved_models["softmax"],
        *("--in", "fashion_mnist", "--ood", "uniform_noise", "--n", 200),
        *("--detector", "knn:5,knn:3", "--fit-on", "fashion_mnist_0_5", "--fit-n", 300),
    )
    assert code == 0
    for name in ("knn_5", "knn_3"):
        line = f"Fitted detector {name} on 300 examples of the train split of fashion_mnist_0_5\n"
        assert line in out
        assert f" {name} " in out  # Its row in the table.


def test_warnings_are_one_line_without_source(saved_models, run_cli):
    """A library warning (here: --n larger than the 1,797 digits) is one line of ours."""
    code, out, err = run_cli(
        "evaluate",
        saved_models["isomax"],
        *("--in", "fashion_mnist", "--ood", "digits", "--n", 2000),
    )
    assert code == 0 and "digits" in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-isomax evaluate: warning: "), err
    assert "UserWarning" not in err and ".py:" not in err


def test_export_with_detector(saved_models, tmp_path, run_cli):
    from keras_isomax.app import data

    code, out, err = run_cli(
        "export",
        saved_models["softmax"],
        tmp_path / "served",
        *("--detector", "knn:5", "--fit-on", "fashion_mnist", "--fit-n", 400),
        *("--calibrate-n", 300),
    )
    assert code == 0, err
    assert "Calibrated threshold" in out
    loaded = tf.saved_model.load(str(tmp_path / "served" / "1"))
    x, _ = data.load_dataset("fashion_mnist", "test", image_shape=(28, 28, 1), n=300)
    out = loaded.signatures["score"](inputs=tf.constant(x))
    # Calibrated at TPR 0.95 on these 300 test images (same seeded subset): 95% accepted.
    assert np.mean(~out["is_ood"].numpy()) == pytest.approx(0.95, abs=0.01)


def test_vim_detector_needs_its_dimension(saved_models, tmp_path, run_cli):
    code, _, err = run_cli(
        "export",
        saved_models["softmax"],
        tmp_path / "s",
        *("--detector", "vim", "--fit-on", "fashion_mnist", "--fit-n", 100),
    )
    assert code == 2 and "vim:64" in err
