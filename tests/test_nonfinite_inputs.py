"""A NaN/Inf input is OOD by the library's own check, whatever the backbone does.

The backbone here swallows NaN/Inf on purpose (`where(isfinite(x), x, 0)`), as
oneDNN's ReLU does on some CPUs, so every test holds on every CPU: the model
itself gives such an example a finite, ordinary score.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer, _serving
from keras_isomax.calibration import calibrate_threshold, predict_ood
from keras_isomax.evaluation import evaluate_ood
from keras_isomax.export import _serving_functions, export_saved_model

FEATURES, CLASSES = 6, 3


class SwallowNonFinite(keras.layers.Layer):
    """Replaces NaN/Inf by 0: a backbone that hides a broken input."""

    def call(self, x):
        return keras.ops.where(keras.ops.isfinite(x), x, keras.ops.zeros_like(x))


def _model(rng, head="isomax"):
    inputs = keras.Input((FEATURES,))
    x = SwallowNonFinite()(inputs)
    x = keras.layers.Dense(8, activation="tanh")(x)
    if head == "isomax":
        out = IsoMaxPlusLayer(CLASSES, name="head")(x)
    else:
        out = keras.layers.Dense(CLASSES, name="logits")(x)
    model = keras.Model(inputs, out)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def _batch(rng, n=8):
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    x[1, 2] = np.nan
    x[4, 0] = np.inf
    x[6, 5] = -np.inf
    return x


BAD = [1, 4, 6]


def test_the_backbone_really_swallows_nan(rng):
    """Precondition: without the library's check these rows would look ordinary."""
    model = _model(rng)
    logits = keras.ops.convert_to_numpy(model(_batch(rng)))
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize(
    "x, expected",
    [
        (np.array([[1.0, np.nan], [2.0, 3.0], [np.inf, 0.0]], "float32"), [True, False, True]),
        (np.zeros((2, 3, 4, 1), "float16"), [False, False]),
        (np.array([[[0.0, -np.inf]], [[1.0, 2.0]]], "float64"), [True, False]),
        (np.array([1.0, np.nan, 3.0], "float32"), [False, True, False]),
        (np.array([[1, 2], [3, 4]], "int32"), [False, False]),
        (np.zeros((0, 5), "float32"), []),
    ],
    ids=["rank2", "rank4-fp16", "rank3-f64", "rank1", "int", "empty"],
)
def test_nonfinite_rows(x, expected):
    got = keras.ops.convert_to_numpy(_serving.nonfinite_rows(x))
    np.testing.assert_array_equal(got, np.array(expected, bool).reshape(-1))


def test_nonfinite_rows_of_strings_are_false():
    got = _serving.nonfinite_rows(tf.constant([["a"], ["nan"]]))
    np.testing.assert_array_equal(got.numpy(), [False, False])


def test_apply_nonfinite_rule():
    bad = np.array([False, True, False])
    out = _serving.apply_nonfinite_rule(
        bad,
        score=np.array([-1.0, -2.0, -3.0], "float32"),
        is_ood=np.array([False, False, True]),
        class_id=np.array([2, 1, 0], "int64"),
    )
    out = {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}
    assert out["score"][0] == -1.0 and math.isnan(out["score"][1]) and out["score"][2] == -3.0
    np.testing.assert_array_equal(out["is_ood"], [False, True, True])
    np.testing.assert_array_equal(out["class_id"], [2, -1, 0])
    assert out["class_id"].dtype == np.int64


def _check_rule(out, logits, threshold, class_key):
    good = [i for i in range(len(logits)) if i not in BAD]
    score = np.asarray(out["score"])
    assert np.all(np.isnan(score[BAD]))
    np.testing.assert_allclose(score[good], logits[good].max(-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["is_ood"])[BAD], True)
    np.testing.assert_array_equal(
        np.asarray(out["is_ood"])[good], ~(logits[good].max(-1) >= threshold)
    )
    np.testing.assert_array_equal(np.asarray(out[class_key])[BAD], -1)
    np.testing.assert_array_equal(np.asarray(out[class_key])[good], logits[good].argmax(-1))


def test_serving_functions_and_saved_model(rng, tmp_path):
    model = _model(rng)
    x = _batch(rng)
    logits = keras.ops.convert_to_numpy(model(x)).astype(np.float64)
    # A threshold inside the finite rows' scores (so both decisions occur).
    threshold = float(np.median(logits.max(-1)))
    fns = _serving_functions(model, threshold=threshold)
    _check_rule(fns["score"](tf.constant(x)), logits, threshold, "class_id")
    default = fns["serving_default"](tf.constant(x))
    np.testing.assert_array_equal(default["class_id"].numpy()[BAD], -1)

    path = export_saved_model(model, tmp_path / "m", threshold=threshold, version=1)
    loaded = tf.saved_model.load(path)
    out = {k: v.numpy() for k, v in loaded.signatures["score"](inputs=tf.constant(x)).items()}
    _check_rule(out, logits, threshold, "class_id")
    served = loaded.signatures["serving_default"](inputs=tf.constant(x))
    np.testing.assert_array_equal(served["class_id"].numpy()[BAD], -1)


def test_predict_ood_arrays_and_datasets(rng):
    model = _model(rng)
    calibrate_threshold(model, rng.normal(size=(100, FEATURES)).astype("float32"), tpr=0.5)
    threshold = float(model.get_layer("head").ood_threshold.numpy())
    x = _batch(rng)
    logits = keras.ops.convert_to_numpy(model(x)).astype(np.float64)
    _check_rule(predict_ood(model, x), logits, threshold, "class")
    _check_rule(predict_ood(model, (x, np.zeros(len(x)))), logits, threshold, "class")
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(3)
    _check_rule(predict_ood(model, dataset, batch_size=3), logits, threshold, "class")


def test_predict_ood_softmax_model_explicit_threshold(rng):
    model = _model(rng, head="softmax")
    x = _batch(rng)
    logits = keras.ops.convert_to_numpy(model(x)).astype(np.float64)
    out = predict_ood(model, x, score="max_logit", threshold=0.0)
    _check_rule(out, logits, 0.0, "class")


def test_calibrate_threshold_refuses_nonfinite_inputs(rng):
    model = _model(rng)
    with pytest.raises(ValueError, match=r"in_val_data.*NaN.*\[1, 4, 6\]"):
        calibrate_threshold(model, _batch(rng))
    with pytest.raises(ValueError, match="in_val_data.*NaN"):
        calibrate_threshold(model, tf.data.Dataset.from_tensor_slices(_batch(rng)).batch(4))


def test_evaluate_ood_names_the_nonfinite_set(rng):
    model = _model(rng)
    x = rng.normal(size=(20, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, 20)
    ood = {"fine": rng.uniform(size=(10, FEATURES)).astype("float32"), "broken": _batch(rng)}
    with pytest.raises(ValueError, match="OOD set 'broken'.*NaN"):
        evaluate_ood(model, (x, y), ood)


def _fitted_detector(rng, model, name):
    from keras_isomax import detectors

    x = rng.normal(size=(60, FEATURES)).astype("float32")
    y = np.arange(60) % CLASSES
    det = detectors.get(name).fit(model, (x, y))
    calibrate_threshold(model, x, tpr=0.5, detector=det)
    return det


def _check_detector_rule(out, det, x, class_key):
    """Non-finite rows: NaN, OOD, -1; the finite rows as `det.score` has them."""
    good = [i for i in range(len(x)) if i not in BAD]
    score = np.asarray(out["score"], np.float64)
    assert np.all(np.isnan(score[BAD]))
    np.testing.assert_array_equal(np.asarray(out["is_ood"])[BAD], True)
    np.testing.assert_array_equal(np.asarray(out[class_key])[BAD], -1)
    expected = det.score(x[good])
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(score[good], expected, rtol=1e-5, atol=1e-5)
    threshold = float(keras.ops.convert_to_numpy(det.threshold))
    np.testing.assert_array_equal(np.asarray(out["is_ood"])[good], ~(expected >= threshold))


@pytest.mark.parametrize("name", ["mahalanobis", "energy"])
def test_detector_paths_apply_the_rule(rng, tmp_path, name):
    """A feature detector and a logit detector, on a backbone that swallows NaN."""
    model = _model(rng)
    det = _fitted_detector(rng, model, name)
    x = _batch(rng)
    # Precondition: the model itself gives the broken rows finite outputs.
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(model(x))))
    _check_detector_rule(predict_ood(model, x, detector=det), det, x, "class")
    assert np.all(np.isnan(det.score(x)[BAD]))

    path = export_saved_model(model, tmp_path / "m", detector=det, version=1)
    loaded = tf.saved_model.load(path)
    out = {k: v.numpy() for k, v in loaded.signatures["score"](inputs=tf.constant(x)).items()}
    _check_detector_rule(out, det, x, "class_id")
    assert np.all(np.isnan(out["probabilities"][BAD]))


def test_rule_is_converter_friendly_and_exact(rng):
    """The shared helpers: exact finite rows, NaN rows, NaN scores OOD, any float dtype."""
    for dtype in ("float16", "float32", "float64"):
        x = rng.normal(size=(5, 3)).astype(dtype)
        x[0, 0] = np.finfo(dtype).max  # Finite, at the edge of the range.
        x[2, 1], x[3, 2] = np.nan, -np.inf
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(_serving.finite_rows(x)), [1, 1, 0, 0, 1]
        )
    values = rng.normal(size=(4, 3)).astype("float32")
    got = keras.ops.convert_to_numpy(_serving.nan_where(np.array([0, 1, 0, 1], bool), values))
    np.testing.assert_array_equal(got[[0, 2]], values[[0, 2]])  # Bit-exact, not rounded.
    assert np.isnan(got[[1, 3]]).all()
    decided = _serving.decide(np.array([1.0, np.nan, -1.0, 0.5], "float32"), 0.5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(decided), [False, True, True, False])
