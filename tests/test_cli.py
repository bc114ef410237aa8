import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss
from keras_isomax.app.cli import main
from keras_isomax.app.demo import build_classifier, run_demo


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


def test_evaluate_prints_table(saved_models, capsys):
    code = main(
        [
            "evaluate",
            saved_models["isomax"],
            "--in",
            "fashion_mnist",
            "--ood",
            "digits,gaussian_noise",
            "--n",
            "300",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "minimum_distance" in out and "digits" in out and "gaussian_noise" in out


def test_evaluate_softmax_model_with_scores(saved_models, capsys):
    code = main(
        [
            "evaluate",
            saved_models["softmax"],
            "--in",
            "fashion_mnist",
            "--ood",
            "uniform_noise",
            "--score",
            "max_probability,energy",
            "--n",
            "200",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "max_probability" in out and "energy" in out


def test_unknown_dataset_lists_choices(saved_models, capsys):
    code = main(["evaluate", saved_models["isomax"], "--in", "fashion_mnist", "--ood", "nope"])
    err = capsys.readouterr().err
    assert code == 2
    assert "nope" in err and "digits" in err and "gaussian_noise" in err


def test_missing_model_file(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "x.keras"), "--in", "a", "--ood", "b"]) == 2
    assert "x.keras" in capsys.readouterr().err


def test_export_with_calibration(saved_models, tmp_path, capsys):
    code = main(
        [
            "export",
            saved_models["isomax"],
            str(tmp_path / "served"),
            "--calibrate-on",
            "fashion_mnist",
            "--calibrate-split",
            "test",
            "--calibrate-n",
            "500",
            "--tpr",
            "0.9",
        ]
    )
    assert code == 0
    assert "Calibrated threshold" in capsys.readouterr().out
    loaded = tf.saved_model.load(str(tmp_path / "served" / "1"))
    assert set(loaded.signatures) >= {"serving_default", "score"}


def test_export_uncalibrated_without_threshold_fails_clearly(saved_models, tmp_path, capsys):
    assert main(["export", saved_models["isomax"], str(tmp_path / "s")]) == 2
    assert "threshold" in capsys.readouterr().err


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "keras_isomax", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "demo" in result.stdout and "evaluate" in result.stdout and "export" in result.stdout


def test_demo_end_to_end(tmp_path):
    """The main job on a small budget: every artefact it promises is written."""
    result = run_demo(output_dir=tmp_path, epochs=1, train_size=2000, verbose=0)
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


def test_evaluate_with_detector(saved_models, capsys):
    code = main(
        [
            "evaluate",
            saved_models["softmax"],
            "--in",
            "fashion_mnist",
            "--ood",
            "uniform_noise",
            "--score",
            "energy",
            "--detector",
            "knn:5,mahalanobis",
            "--fit-n",
            "400",
            "--n",
            "200",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "energy" in out and "knn" in out and "mahalanobis" in out


def test_export_with_detector(saved_models, tmp_path, capsys):
    from keras_isomax.app import data

    code = main(
        [
            "export",
            saved_models["softmax"],
            str(tmp_path / "served"),
            "--detector",
            "knn:5",
            "--fit-on",
            "fashion_mnist",
            "--fit-n",
            "400",
            "--calibrate-n",
            "300",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "Calibrated threshold" in capsys.readouterr().out
    loaded = tf.saved_model.load(str(tmp_path / "served" / "1"))
    x, _ = data.load_dataset("fashion_mnist", "test", image_shape=(28, 28, 1), n=300)
    out = loaded.signatures["score"](inputs=tf.constant(x))
    # Calibrated at TPR 0.95 on these 300 test images (same seeded subset): 95% accepted.
    assert np.mean(~out["is_ood"].numpy()) == pytest.approx(0.95, abs=0.01)


def test_vim_detector_needs_its_dimension(saved_models, tmp_path, capsys):
    args = ["export", saved_models["softmax"], str(tmp_path / "s"), "--detector", "vim"]
    assert main([*args, "--fit-on", "fashion_mnist", "--fit-n", "100"]) == 2
    assert "vim:64" in capsys.readouterr().err
