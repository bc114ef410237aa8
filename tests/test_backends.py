"""The library on every Keras backend (`make test-backends` runs this on JAX and torch).

Only `keras.ops` and NumPy here: no TensorFlow tensors, no `.numpy()` on
backend tensors. Numbers are checked against the float64 reference.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import keras_isomax as ki
from keras_isomax import testing as reference

BACKEND = keras.backend.backend()


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _classifier(rng, features=6, classes=5):
    keras.utils.set_random_seed(int(rng.integers(2**31)))
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(8),
            ki.IsoMaxPlusLayer(classes),
        ]
    )


def test_layer_matches_reference(rng):
    layer = ki.IsoMaxPlusLayer(7)
    x = rng.normal(size=(33, 10)).astype("float32")
    logits = _np(layer(x))
    expected = reference.logits(x, _np(layer.prototypes))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=2e-6)


def test_inference_snapshot_matches_reference(rng):
    layer = ki.IsoMaxPlusLayer(7)
    x = rng.normal(size=(33, 10)).astype("float32")
    layer(x)
    p = rng.normal(size=(7, 10)) * rng.uniform(0.1, 10, size=(7, 1))
    layer.prototypes.assign(p)
    x[:2] = p[[3, 5]] * 2.0 + 1e-4 * rng.normal(size=(2, 10))  # near prototypes
    with layer.inference_snapshot() as (kernel, _):
        assert tuple(kernel.shape) == (10, 7)
        logits = _np(layer(x))
    np.testing.assert_allclose(logits, reference.logits(x, p), rtol=1e-5, atol=2e-6)


def test_loss_matches_reference_and_fit_step(rng):
    z = rng.normal(size=(12, 5)).astype("float32") - 2.0
    y = rng.integers(0, 5, size=12)
    loss = _np(ki.isomax_plus_loss(y, z))
    np.testing.assert_allclose(loss, reference.isomax_loss(y, z), rtol=1e-5, atol=1e-6)
    model = _classifier(rng)
    model.compile(optimizer="sgd", loss=ki.IsoMaxPlusLoss(), metrics=[ki.OODScore()])
    x = rng.normal(size=(32, 6)).astype("float32")
    history = model.fit(x, rng.integers(0, 5, size=32), epochs=2, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][1] < history.history["loss"][0]


def test_scores_and_metric(rng):
    z = rng.normal(size=(20, 4)).astype("float32") - 2.0
    np.testing.assert_allclose(_np(ki.scores.minimum_distance_score(z)), z.max(-1), rtol=1e-6)
    metric = ki.OODScore()
    metric.update_state(None, z[:7])
    metric.update_state(None, z[7:])
    np.testing.assert_allclose(float(_np(metric.result())), z.max(-1).mean(), rtol=1e-5)


def test_calibration_prediction_and_evaluation(rng):
    model = _classifier(rng)
    x_in = rng.normal(size=(200, 6)).astype("float32")
    x_out = rng.normal(loc=2.5, size=(150, 6)).astype("float32")
    threshold = ki.calibrate_threshold(model, x_in, tpr=0.9)
    out = ki.predict_ood(model, x_in)
    assert abs(np.mean(~out["is_ood"]) - 0.9) <= 1 / 200 + 1e-9
    assert threshold == pytest.approx(float(_np(model.layers[-1].ood_threshold)))
    y = out["class"]  # labels the model agrees with: temperature must fall
    fitted = ki.calibrate_temperature(model, (x_in, y))
    assert 0 < fitted.temperature < 1
    assert fitted.nll_after < fitted.nll_before
    assert float(_np(model.layers[-1].temperature)) == pytest.approx(fitted.temperature)
    result = ki.evaluate_ood(model, (x_in, y), {"shifted": x_out})
    scores_in = ki.predict_ood(model, x_in)["score"]
    scores_out = ki.predict_ood(model, x_out)["score"]
    labels = np.r_[np.ones(len(x_in)), np.zeros(len(x_out))]
    expected = 100 * roc_auc_score(labels, np.r_[scores_in, scores_out])
    auroc = result[0]["auroc"]
    assert auroc == pytest.approx(expected, abs=1e-6) or auroc == pytest.approx(
        expected / 100, abs=1e-8
    )


def test_replace_head_keeps_backbone(rng):
    keras.utils.set_random_seed(1)
    softmax = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(4)]
    )
    model = ki.replace_head(softmax, prototype_init="dense")
    layer = ki.find_isomax_layer(model)
    x = rng.normal(size=(9, 6)).astype("float32")
    features = _np(softmax.layers[0](x))
    np.testing.assert_allclose(
        _np(model(x)), reference.logits(features, _np(layer.prototypes)), rtol=1e-5, atol=2e-6
    )


def test_keras_round_trip(rng, tmp_path):
    model = _classifier(rng)
    x = rng.normal(size=(20, 6)).astype("float32")
    ki.calibrate_threshold(model, x)
    model.compile(loss=ki.IsoMaxPlusLoss(), metrics=[ki.OODScore()])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(_np(loaded(x)), _np(model(x)))
    assert ki.find_isomax_layer(loaded).is_calibrated


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np, keras, keras_isomax as ki
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), ki.IsoMaxPlusLayer(5)])
    x = np.random.default_rng(3).normal(size=(16, 6)).astype("float32")
    ki.calibrate_threshold(model, x)
    model.save(sys.argv[1] + "/m.keras")
    np.savez(sys.argv[1] + "/ref.npz", x=x, logits=keras.ops.convert_to_numpy(model(x)))
    """
)


@pytest.mark.slow
def test_keras_file_crosses_backends(tmp_path):
    """A .keras file written on another backend loads here with the same logits."""
    other = "jax" if BACKEND == "tensorflow" else "tensorflow"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "KERAS_BACKEND": other, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path)], env=env, check=True, timeout=300)
    ref = np.load(tmp_path / "ref.npz")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(_np(loaded(ref["x"])), ref["logits"], rtol=1e-5, atol=1e-6)
    assert ki.find_isomax_layer(loaded).is_calibrated


@pytest.mark.skipif(BACKEND == "tensorflow", reason="checks the errors on other backends")
def test_tf_only_features_say_what_to_use(rng, tmp_path):
    with pytest.raises(ValueError, match="export_onnx"):
        ki.export_saved_model(_classifier(rng), tmp_path / "sm", threshold=-1.0)
    with pytest.raises(ImportError, match="keras.distribution"):
        import keras_isomax.distribute  # noqa: F401
