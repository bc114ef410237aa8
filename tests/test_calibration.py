"""Threshold and temperature calibration, `predict_ood` and `find_isomax_layer`."""

import dataclasses
import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import minimize_scalar

from keras_isomax import IsoMaxPlusLayer, find_isomax_layer
from keras_isomax.calibration import (
    TemperatureCalibration,
    calibrate_temperature,
    calibrate_threshold,
    predict_ood,
)
from keras_isomax.detection_metrics import expected_calibration_error
from keras_isomax.testing import log_softmax
from keras_isomax.testing import logits as ref_logits

NUM_CLASSES, FEATURES = 4, 8


def _blobs(rng, n, means, noise=0.6):
    y = rng.integers(0, len(means), n)
    x = means[y] + noise * rng.normal(size=(n, means.shape[1]))
    return x.astype("float32"), y


def _blob_model(rng, scale=3.0):
    """Input -> IsoMaxPlusLayer with prototypes on the class means (no training)."""
    means = rng.normal(size=(NUM_CLASSES, FEATURES))
    model = keras.Sequential(
        [keras.Input((FEATURES,)), IsoMaxPlusLayer(NUM_CLASSES, name="isomax")],
        name="blob_model",
    )
    layer = model.layers[-1]
    layer.prototypes.assign(means)
    layer.distance_scale.assign(scale)
    return model, means


def _mlp(rng, num_classes=3, features=6, name="mlp"):
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(16, activation="tanh"),
            IsoMaxPlusLayer(num_classes, name="head"),
        ],
        name=name,
    )
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    find_isomax_layer(model).temperature.assign(1.0)
    find_isomax_layer(model).ood_threshold.assign(math.nan)
    return model


# ----------------------------------------------------------- find the layer


def test_find_isomax_layer_in_sequential_functional_and_nested():
    head = IsoMaxPlusLayer(3, name="head")
    seq = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), head])
    assert find_isomax_layer(seq) is head
    inputs = keras.Input((4,))
    functional = keras.Model(inputs, seq(inputs), name="outer")
    assert find_isomax_layer(functional) is head
    double = keras.Sequential([keras.Input((4,)), functional], name="double")
    assert find_isomax_layer(double) is head
    assert find_isomax_layer(head) is head


def test_find_isomax_layer_errors_name_the_model():
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="plain")
    with pytest.raises(ValueError, match="'plain' has no `IsoMaxPlusLayer`"):
        find_isomax_layer(plain)
    inputs = keras.Input((4,))
    two = keras.Model(
        inputs,
        [IsoMaxPlusLayer(3, name="a")(inputs), IsoMaxPlusLayer(3, name="b")(inputs)],
        name="two_heads",
    )
    with pytest.raises(ValueError, match=r"'two_heads' has 2 .*\['a', 'b'\]"):
        find_isomax_layer(two)
    with pytest.raises(TypeError, match="Received: model=ndarray"):
        find_isomax_layer(np.zeros(3))


def test_shared_layer_counts_once():
    head = IsoMaxPlusLayer(3)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, [head(inputs), head(inputs * 2.0)])
    assert find_isomax_layer(model) is head


# ---------------------------------------------------------------- threshold


@pytest.mark.parametrize("tpr", [0.95, 0.8])
def test_threshold_accepts_tpr_on_held_out_data(rng, tpr):
    model = _mlp(rng)
    x_val = rng.normal(size=(20_000, 6)).astype("float32")
    x_test = rng.normal(size=(20_000, 6)).astype("float32")
    threshold = calibrate_threshold(model, x_val, tpr=tpr)
    layer = find_isomax_layer(model)
    assert layer.is_calibrated
    assert threshold == float(layer.ood_threshold.numpy())
    # Independent float64 scores: the largest reference logit.
    dense_w, dense_b, prototypes = (w.numpy() for w in model.weights[:3])

    def scores(x):
        features = np.tanh(x.astype(np.float64) @ dense_w + dense_b)
        return ref_logits(features, prototypes, scale=layer.distance_scale.numpy()).max(-1)

    # On the calibration data itself the model's own scores hit tpr exactly.
    assert np.mean(~predict_ood(model, x_val)["is_ood"]) == tpr
    assert abs(np.mean(scores(x_val) >= threshold) - tpr) <= 1e-3
    assert abs(np.mean(scores(x_test) >= threshold) - tpr) <= 0.01
    accepted = ~predict_ood(model, x_test)["is_ood"]
    assert abs(accepted.mean() - tpr) <= 0.01


def test_detector_threshold_is_the_midpoint_below_the_accepted_scores(rng):
    """With `detector=`, as without: ceil(tpr * N) inputs accepted, the threshold halfway
    between the lowest accepted score and the next lower one (float64 reference)."""
    from keras_isomax import detectors

    model = _mlp(rng)
    x = rng.normal(size=(30, 6)).astype("float32")
    dense_w, dense_b, prototypes = (w.numpy() for w in model.weights[:3])
    features = np.tanh(x.astype(np.float64) @ dense_w + dense_b)
    scale = find_isomax_layer(model).distance_scale.numpy()
    score = np.sort(ref_logits(features, prototypes, scale=scale).max(-1))[::-1]
    accepted = math.ceil(0.9 * 30)  # 27
    assert score[accepted - 1] - score[accepted] > 1e-4  # Unambiguous in float32.
    det = detectors.MaxLogit()
    threshold = calibrate_threshold(model, x, tpr=0.9, detector=det, verbose=0)
    expected = 0.5 * (score[accepted - 1] + score[accepted])
    np.testing.assert_allclose(threshold, expected, rtol=0, atol=2e-6)
    assert int(np.sum(~predict_ood(model, x, detector=det, verbose=0)["is_ood"])) == accepted


def test_threshold_from_dataset_equals_threshold_from_arrays(rng):
    model = _mlp(rng)
    x = rng.normal(size=(1000, 6)).astype("float32")
    y = rng.integers(0, 3, 1000)
    from_arrays = calibrate_threshold(model, x)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(1000, seed=1).batch(77)
    assert calibrate_threshold(model, dataset) == from_arrays
    assert calibrate_threshold(model, (x, y)) == from_arrays


def test_threshold_uses_logits_when_softmax_follows(rng):
    inputs = keras.Input((6,))
    logits = IsoMaxPlusLayer(3, name="head")(keras.layers.Dense(8)(inputs))
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    x = rng.normal(size=(500, 6)).astype("float32")
    threshold = calibrate_threshold(model, x)
    assert threshold < 0  # A logit (a negative distance), not a probability.
    logits_model = keras.Model(inputs, logits)
    md = logits_model.predict(x, verbose=0).max(-1)
    assert abs(np.mean(md >= threshold) - 0.95) < 2e-3


def test_nested_layer_followed_by_softmax_is_an_error(rng):
    inner = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3, name="head")], name="inner")
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Softmax()], name="outer")
    with pytest.raises(ValueError, match="not an output of model 'outer'"):
        calibrate_threshold(outer, rng.normal(size=(10, 4)).astype("float32"))


@pytest.mark.parametrize("tpr", [0, 1.01, -1, "a", None, True])
def test_threshold_bad_tpr(rng, tpr):
    with pytest.raises(ValueError, match="Received: tpr="):
        calibrate_threshold(_mlp(rng), np.zeros((4, 6), "float32"), tpr=tpr)


def test_threshold_bad_data(rng):
    model = _mlp(rng)
    with pytest.raises(ValueError, match="no examples"):
        calibrate_threshold(model, np.zeros((0, 6), "float32"))
    with pytest.raises(ValueError, match="in_val_data.*NaN"):
        calibrate_threshold(model, np.full((5, 6), np.nan, "float32"))
    with pytest.raises(ValueError, match="4 inputs but 3 labels"):
        calibrate_threshold(model, (np.zeros((4, 6), "float32"), np.zeros(3)))
    unbatched = tf.data.Dataset.from_tensor_slices(np.zeros((4, 6), "float32"))
    with pytest.raises(ValueError, match=r"batch\(\.\.\.\)"):
        calibrate_threshold(model, unbatched)
    with pytest.raises(TypeError, match="in_val_data"):
        calibrate_threshold(model, 3.5)


# -------------------------------------------------------------- predict_ood


def test_predict_ood_outputs(rng):
    model = _mlp(rng)
    x = rng.normal(size=(300, 6)).astype("float32")
    threshold = calibrate_threshold(model, x, tpr=0.9)
    x_new = rng.normal(size=(50, 6)).astype("float32")
    x_new[0] = np.nan
    out = predict_ood(model, x_new, batch_size=16)
    logits = model.predict(x_new, verbose=0)
    assert sorted(out) == ["class", "is_ood", "score"]
    assert out["score"].shape == out["is_ood"].shape == out["class"].shape == (50,)
    assert out["is_ood"].dtype == bool and out["class"].dtype == np.int64
    np.testing.assert_allclose(out["score"][1:], logits[1:].max(-1), rtol=1e-6)
    np.testing.assert_array_equal(out["class"][1:], logits[1:].argmax(-1))
    np.testing.assert_array_equal(out["is_ood"][1:], ~(logits[1:].max(-1) >= threshold))
    assert out["is_ood"][0]  # A NaN score counts as OOD.


def test_a_score_equal_to_the_threshold_is_in_distribution(rng):
    """`is_ood = not (score >= threshold)`, on the layer path and the detector path."""
    from keras_isomax import detectors

    model = _mlp(rng)
    x = rng.normal(size=(64, 6)).astype("float32")
    scores = predict_ood(model, x, threshold=0.0, verbose=0)["score"]
    at = predict_ood(model, x, threshold=float(scores[5]), verbose=0)
    assert not at["is_ood"][5]
    np.testing.assert_array_equal(at["is_ood"], scores < scores[5])
    det = detectors.MaxLogit()
    values = predict_ood(model, x, threshold=0.0, detector=det, verbose=0)["score"]
    at = predict_ood(model, x, threshold=float(values[9]), detector=det, verbose=0)
    assert not at["is_ood"][9]
    np.testing.assert_array_equal(at["is_ood"], values < values[9])


def test_predict_ood_errors_and_explicit_threshold(rng):
    model = _mlp(rng)
    x = rng.normal(size=(20, 6)).astype("float32")
    with pytest.raises(ValueError, match="no calibrated `ood_threshold`"):
        predict_ood(model, x)
    calibrate_threshold(model, x)
    with pytest.raises(ValueError, match="pass `threshold=`"):
        predict_ood(model, x, score="entropic")
    with pytest.raises(ValueError, match="Received: threshold=nan"):
        predict_ood(model, x, threshold=float("nan"))
    entropic = predict_ood(model, x, score="entropic", threshold=-0.5)
    assert np.all(entropic["score"] <= 0)
    np.testing.assert_array_equal(entropic["is_ood"], ~(entropic["score"] >= -0.5))
    softmax_model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    out = predict_ood(softmax_model, x, score="max_probability", threshold=0.5)
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(softmax_model(x)))
    np.testing.assert_allclose(out["score"], probs.max(-1), rtol=1e-6)


# -------------------------------------------------------------- temperature


def _reference_temperature(base_logits, labels):
    def nll(log_t):
        return -np.mean(
            np.take_along_axis(log_softmax(base_logits / np.exp(log_t)), labels[:, None], 1)
        )

    result = minimize_scalar(nll, bounds=(-8, 8), method="bounded", options={"xatol": 1e-10})
    return float(np.exp(result.x)), float(result.fun)


def test_temperature_minimises_nll(rng):
    model, means = _blob_model(rng)
    x, y = _blobs(rng, 3000, means)
    layer = find_isomax_layer(model)
    base = ref_logits(x, means, scale=3.0)  # Float64 logits at T = 1.
    expected_t, expected_nll = _reference_temperature(base, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Inside the range: no warning.
        result = calibrate_temperature(model, (x, y))
    assert isinstance(result, TemperatureCalibration)
    assert result.threshold_rescaled is False  # The layer had no threshold.
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.temperature = 2.0  # A result, not a handle on the layer.
    assert math.isclose(result.temperature, expected_t, rel_tol=1e-4)
    assert math.isclose(float(layer.temperature.numpy()), expected_t, rel_tol=1e-4)
    assert result.previous_temperature == 1.0
    assert math.isclose(result.nll_after, expected_nll, rel_tol=1e-5)
    nll_before = -np.mean(np.take_along_axis(log_softmax(base), y[:, None], 1))
    assert math.isclose(result.nll_before, nll_before, rel_tol=1e-5)
    assert result.nll_after < result.nll_before
    # ECE before/after, from the independent float64 probabilities.
    for t, ece in ((1.0, result.ece_before), (expected_t, result.ece_after)):
        probs = np.exp(log_softmax(base / t))
        assert math.isclose(ece, expected_calibration_error(probs, y), abs_tol=1e-4)
    assert result.ece_after < result.ece_before  # IsoMax+ logits are too soft.
    assert result.num_examples == 3000
    assert math.isclose(result.accuracy, np.mean(base.argmax(-1) == y))
    assert "NLL" in str(result) and "ECE" in str(result)


def test_temperature_keeps_ranking_decisions_and_threshold(rng):
    model, means = _blob_model(rng)
    x_val, y_val = _blobs(rng, 2000, means)
    x_test, _ = _blobs(rng, 2000, means, noise=1.5)
    calibrate_threshold(model, x_val)
    before = predict_ood(model, x_test)
    old_threshold = float(find_isomax_layer(model).ood_threshold.numpy())
    result = calibrate_temperature(model, (x_val, y_val))
    assert result.threshold_rescaled
    after = predict_ood(model, x_test)
    new_t = result.temperature
    np.testing.assert_array_equal(np.argsort(after["score"]), np.argsort(before["score"]))
    np.testing.assert_allclose(after["score"] * new_t, before["score"], rtol=1e-5)
    np.testing.assert_array_equal(after["class"], before["class"])
    np.testing.assert_array_equal(after["is_ood"], before["is_ood"])
    new_threshold = float(find_isomax_layer(model).ood_threshold.numpy())
    assert math.isclose(new_threshold * new_t, old_threshold, rel_tol=1e-6)
    # Calibrating again from the new temperature finds the same temperature.
    again = calibrate_temperature(model, (x_val, y_val))
    assert math.isclose(again.temperature, new_t, rel_tol=1e-4)
    assert math.isclose(again.nll_before, result.nll_after, rel_tol=1e-5)
    assert math.isclose(again.ece_before, result.ece_after, rel_tol=1e-5, abs_tol=1e-9)


def test_recalibrating_the_temperature_keeps_the_decisions_from_any_temperature(rng):
    """Threshold calibrated at T1 != 1, temperature refitted on other data (T2): the
    threshold becomes threshold * T1 / T2 and every decision stays the same."""
    model, means = _blob_model(rng)
    x_a, y_a = _blobs(rng, 2000, means, noise=0.4)
    x_b, y_b = _blobs(rng, 2000, means, noise=1.2)
    x_test, _ = _blobs(rng, 2000, means, noise=1.5)
    t1 = calibrate_temperature(model, (x_a, y_a)).temperature
    threshold = calibrate_threshold(model, x_a)
    before = predict_ood(model, x_test)
    result = calibrate_temperature(model, (x_b, y_b))
    t2 = result.temperature
    assert result.previous_temperature == pytest.approx(t1, rel=1e-6)
    assert abs(math.log(t2 / t1)) > 0.2  # Really a different temperature.
    assert result.threshold_rescaled
    new_threshold = float(find_isomax_layer(model).ood_threshold.numpy())
    assert new_threshold == pytest.approx(threshold * t1 / t2, rel=1e-6)
    after = predict_ood(model, x_test)
    np.testing.assert_array_equal(after["is_ood"], before["is_ood"])
    np.testing.assert_allclose(after["score"] * t2, before["score"] * t1, rtol=1e-5)


def test_temperature_from_dataset_with_one_hot_labels(rng):
    model, means = _blob_model(rng)
    x, y = _blobs(rng, 1000, means)
    from_arrays = calibrate_temperature(model, (x, y)).temperature
    find_isomax_layer(model).temperature.assign(1.0)
    one_hot = np.eye(NUM_CLASSES, dtype="float32")[y]
    dataset = tf.data.Dataset.from_tensor_slices((x, one_hot)).shuffle(1000).batch(64)
    assert math.isclose(
        calibrate_temperature(model, dataset).temperature, from_arrays, rel_tol=1e-6
    )


def test_temperature_errors(rng):
    model, means = _blob_model(rng)
    x, y = _blobs(rng, 100, means)
    with pytest.raises(ValueError, match="must hold labels"):
        calibrate_temperature(model, x)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        calibrate_temperature(model, (x, y + 1))
    plain = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="has none .*replace_head") as error:
        calibrate_temperature(plain, (x, y))
    assert "detector=" not in str(error.value)  # It takes no detector: no such advice.


def test_temperature_at_range_end_warns(rng):
    model, means = _blob_model(rng, scale=50.0)
    x = means.astype("float32")  # Every example on its prototype: NLL -> 0.
    with pytest.warns(UserWarning, match="end of the search range"):
        result = calibrate_temperature(model, (x, np.arange(NUM_CLASSES)))
    assert result.temperature == pytest.approx(1e-4)
    # Every label on the farthest prototype: the NLL falls as T grows, up to 1e4.
    find_isomax_layer(model).temperature.assign(1.0)
    farthest = ref_logits(x, means, scale=50.0).argmin(-1)
    with pytest.warns(UserWarning, match="end of the search range"):
        result = calibrate_temperature(model, (x, farthest))
    assert result.temperature == pytest.approx(1e4)


@pytest.mark.parametrize("target", [1.5e-4, 7e3])
def test_temperature_just_inside_the_range_is_fitted_without_warning(rng, target):
    """The NLL depends on scale / T only, so scaling the distance scale moves the best
    temperature to `target`, near an end of [1e-4, 1e4] but inside it."""
    model, means = _blob_model(rng, scale=1.0)
    x, y = _blobs(rng, 2000, means)
    base = ref_logits(x, means, scale=1.0)
    t_at_scale_1, _ = _reference_temperature(base, y)
    find_isomax_layer(model).distance_scale.assign(target / t_at_scale_1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = calibrate_temperature(model, (x, y))
    assert result.temperature == pytest.approx(target, rel=1e-3)
    # The NLL before, at T = 1: logits up to ~1e5 apart at the upper target.
    scaled = base * (target / t_at_scale_1)
    nll = -np.mean(np.take_along_axis(log_softmax(scaled), y[:, None], 1))
    assert result.nll_before == pytest.approx(nll, rel=1e-4)


def test_non_finite_inputs_are_refused_even_when_the_backbone_hides_them(rng):
    """A backbone that maps NaN and Inf to 0 (as oneDNN's ReLU does on some CPUs) still gives
    an error naming the row, and the temperature keeps its value."""
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Lambda(lambda t: keras.ops.where(keras.ops.isfinite(t), t, 0.0)),
            IsoMaxPlusLayer(NUM_CLASSES, name="isomax"),
        ]
    )
    means = find_isomax_layer(model).prototypes.numpy().astype(np.float64)
    x, y = _blobs(rng, 50, means)
    x[[3, 31], 1] = [np.nan, np.inf]
    assert np.all(np.isfinite(model.predict(x, verbose=0)))  # The backbone hides them.
    with pytest.raises(ValueError, match=r"non-finite logits on 2 of 50 .*val_data.*\[3, 31\]"):
        calibrate_temperature(model, (x, y), verbose=0)
    assert float(find_isomax_layer(model).temperature.numpy()) == 1.0
    # A diverged prototype: one NaN logit column on finite inputs is refused too.
    prototypes = means.copy()
    prototypes[2, 0] = np.nan
    find_isomax_layer(model).prototypes.assign(prototypes)
    with pytest.raises(ValueError, match=r"non-finite logits on 50 of 50 "):
        calibrate_temperature(model, (np.nan_to_num(x), y), verbose=0)


def test_numpy_integer_batch_sizes_are_accepted(rng):
    model, means = _blob_model(rng)
    x, y = _blobs(rng, 300, means)
    expected = calibrate_threshold(model, x, batch_size=64)
    assert calibrate_threshold(model, x, batch_size=np.int64(64)) == expected
    result = calibrate_temperature(model, (x, y), batch_size=np.int32(64))
    out = predict_ood(model, x, batch_size=np.int64(64))
    assert out["score"].shape == (300,) and result.num_examples == 300


# -------------------------------------------------------------- save / load


def test_calibration_survives_keras_save_and_load(rng, tmp_path):
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(FEATURES, kernel_initializer="identity")(inputs)
    model = keras.Model(inputs, IsoMaxPlusLayer(NUM_CLASSES, name="isomax")(hidden))
    means = rng.normal(size=(NUM_CLASSES, FEATURES))
    find_isomax_layer(model).prototypes.assign(means)
    find_isomax_layer(model).distance_scale.assign(3.0)
    x, y = _blobs(rng, 1000, means)
    threshold = calibrate_threshold(model, x)
    result = calibrate_temperature(model, (x, y))
    assert 1e-3 < result.temperature < 1.0
    path = tmp_path / "calibrated.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = find_isomax_layer(loaded)
    assert layer.is_calibrated
    assert float(layer.temperature.numpy()) == pytest.approx(result.temperature, rel=1e-6)
    assert float(layer.ood_threshold.numpy()) == pytest.approx(
        threshold * 1.0 / result.temperature, rel=1e-6
    )
    x_test, _ = _blobs(rng, 200, means, noise=2.0)
    original, restored = predict_ood(model, x_test), predict_ood(loaded, x_test)
    for key in original:
        np.testing.assert_array_equal(original[key], restored[key])


def test_softmax_models_with_a_detector_or_threshold(rng):
    """A SoftMax classifier: predict_ood scores its pre-softmax logits; IsoMax+-only
    calls say what to do instead."""
    from keras_isomax import detectors

    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(4, activation="softmax", name="classifier"),
        ],
        name="softmax_model",
    )
    model.get_layer("classifier").bias.assign(rng.normal(size=4).astype("float32"))
    x = rng.normal(size=(200, FEATURES)).astype("float32")
    features = keras.Model(model.inputs, model.layers[0].output).predict(x, verbose=0)
    dense = model.get_layer("classifier")
    logits = features.astype(np.float64) @ dense.kernel.numpy() + dense.bias.numpy()
    energy = np.log(np.exp(logits).sum(-1))
    out = predict_ood(model, x, threshold=1.0, score="energy", verbose=0)
    np.testing.assert_allclose(out["score"], energy, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["is_ood"], ~(out["score"] >= 1.0))
    np.testing.assert_array_equal(out["class"], logits.argmax(-1))
    det = detectors.Energy()
    t = calibrate_threshold(model, x, tpr=0.9, detector=det, verbose=0)
    assert np.mean(energy >= t) == pytest.approx(0.9)
    out = predict_ood(model, x, detector=det, verbose=0)
    np.testing.assert_array_equal(out["is_ood"], ~(energy >= t))
    for call in (
        lambda: predict_ood(model, x, verbose=0),
        lambda: calibrate_threshold(model, x, verbose=0),
    ):
        with pytest.raises(ValueError, match="has none.*replace_head.*`detector=`"):
            call()


def test_one_nan_row_among_valid_ones_is_refused_on_both_paths(rng):
    """One NaN input among many fails the calibration (layer and detector) and the
    threshold keeps its previous value: a NaN score must never be ranked."""
    from keras_isomax import detectors

    model = _mlp(rng)
    x = rng.normal(size=(40, 6)).astype("float32")
    x[17, 2] = np.nan
    layer = find_isomax_layer(model)
    before = float(layer.ood_threshold.numpy())
    with pytest.raises(ValueError, match=r"NaN scores on 1 of 40 examples.*at \[17\]"):
        calibrate_threshold(model, x, verbose=0)
    assert float(layer.ood_threshold.numpy()) == before or math.isnan(before)
    det = detectors.MaxLogit()
    with pytest.raises(ValueError, match=r"NaN scores on 1 of 40 examples.*at \[17\]"):
        calibrate_threshold(model, x, detector=det, verbose=0)
    assert not det.is_calibrated
