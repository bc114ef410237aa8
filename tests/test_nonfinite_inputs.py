"""A NaN/Inf input is OOD by the library's own check, whatever the backbone does.

The backbone here swallows NaN/Inf on purpose (`where(isfinite(x), x, 0)`), as
oneDNN's ReLU does on some CPUs, so every test holds on every CPU: the model
itself gives such an example a finite, ordinary score.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer
from keras_isomax.calibration import calibrate_threshold, predict_ood
from keras_isomax.evaluation import evaluate_ood
from keras_isomax.export import export_saved_model, serving_function

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


class _Features(keras.layers.Layer):
    """Any input -> finite float32 features in [-1, 1], shape (B, F): hides NaN/Inf."""

    def call(self, x):
        x = keras.ops.cast(x, "float32")
        x = keras.ops.where(keras.ops.isfinite(x), keras.ops.tanh(x), keras.ops.zeros_like(x))
        return keras.ops.reshape(x, (-1, int(np.prod(x.shape[1:]))))


# IsoMax+ scores are >= -2 (distance scale 1, temperature 1): every finite
# input is in-distribution, so `is_ood` is exactly the non-finite rule.
BELOW_EVERY_SCORE = -3.0


def _flagged(x, dtype):
    """(is_ood, class_id, score) served for `x` by a model taking `x`'s shape and dtype."""
    inputs = keras.Input(x.shape[1:], dtype=dtype)
    model = keras.Model(inputs, IsoMaxPlusLayer(CLASSES)(_Features()(inputs)))
    out = serving_function(model, BELOW_EVERY_SCORE)(x)
    return tuple(keras.ops.convert_to_numpy(out[key]) for key in ("is_ood", "class_id", "score"))


@pytest.mark.parametrize(
    "x, expected",
    [
        (np.array([[1.0, np.nan], [2.0, 3.0], [np.inf, 0.0]], "float32"), [True, False, True]),
        (np.zeros((2, 3, 4, 1), "float16"), [False, False]),
        (np.array([[[0.0, -np.inf]], [[1.0, 2.0]]], "float64"), [True, False]),
        (np.array([1.0, np.nan, 3.0], "float32"), [False, True, False]),
        (np.array([[1, 2], [3, 4]], "int32"), [False, False]),
    ],
    ids=["rank2", "rank4-fp16", "rank3-f64", "rank1", "int"],
)
def test_nonfinite_rows_of_any_rank_and_dtype(x, expected):
    is_ood, class_id, score = _flagged(x, x.dtype.name)
    expected = np.array(expected, bool).reshape(-1)
    np.testing.assert_array_equal(is_ood, expected)
    np.testing.assert_array_equal(class_id == -1, expected)
    np.testing.assert_array_equal(np.isnan(score), expected)


def test_string_inputs_are_never_nonfinite():
    inputs = keras.Input((1,), dtype="string")
    ids = keras.layers.StringLookup(vocabulary=["a", "nan"])(inputs)
    model = keras.Model(inputs, IsoMaxPlusLayer(CLASSES)(keras.layers.Embedding(3, 4)(ids)[:, 0]))
    out = serving_function(model, BELOW_EVERY_SCORE)(tf.constant([["a"], ["nan"], ["inf"]]))
    np.testing.assert_array_equal(out["is_ood"].numpy(), [False, False, False])
    assert np.all(out["class_id"].numpy() >= 0)


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


def test_serving_function_and_saved_model(rng, tmp_path):
    model = _model(rng)
    x = _batch(rng)
    logits = keras.ops.convert_to_numpy(model(x)).astype(np.float64)
    # A threshold inside the finite rows' scores (so both decisions occur).
    threshold = float(np.median(logits.max(-1)))
    serve = serving_function(model, threshold)
    out = serve(x)
    _check_rule({k: v.numpy() for k, v in out.items()}, logits, threshold, "class_id")
    assert np.isnan(out["probabilities"].numpy()[BAD]).all()
    assert out["class_id"].dtype == tf.int64
    # The finite rows are untouched, to the bit, by the broken rows beside them.
    good = [i for i in range(len(x)) if i not in BAD]
    clean = x.copy()
    clean[BAD] = 0.0
    beside = serve(clean)
    for key in ("score", "probabilities", "logits"):
        np.testing.assert_array_equal(out[key].numpy()[good], beside[key].numpy()[good], key)

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


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_the_largest_finite_value_is_finite(rng, dtype):
    """The rule judges each input in its own dtype: its largest value is finite."""
    x = rng.normal(size=(5, 3)).astype(dtype)
    x[0, 0] = np.finfo(dtype).max  # Finite, at the edge of the range.
    x[4, 1] = -np.finfo(dtype).max
    x[2, 1], x[3, 2] = np.nan, -np.inf
    is_ood, class_id, score = _flagged(x, dtype)
    np.testing.assert_array_equal(is_ood, [False, False, True, True, False])
    np.testing.assert_array_equal(class_id == -1, [False, False, True, True, False])
    assert np.isfinite(score[[0, 1, 4]]).all()


def test_a_score_equal_to_the_threshold_is_in_distribution(rng):
    """The rule is `score >= threshold` -> in-distribution: equality accepts."""
    model = _model(rng)
    x = _batch(rng)
    good = [i for i in range(len(x)) if i not in BAD]
    scores = serving_function(model, 0.0)(x)["score"].numpy()
    at = good[len(good) // 2]
    out = serving_function(model, float(scores[at]))(x)
    assert out["score"].numpy()[at] == scores[at]  # The same float32 score, exactly.
    assert not out["is_ood"].numpy()[at]
    expected = ~(scores[good] >= scores[at])
    np.testing.assert_array_equal(out["is_ood"].numpy()[good], expected)
