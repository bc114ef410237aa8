"""`evaluate_ood`: one call from models and data sets to a metrics table."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer
from keras_isomax.detection_metrics import ood_metrics
from keras_isomax.evaluation import ROW_KEYS, OODEvaluation, evaluate_ood
from keras_isomax.testing import log_softmax

FEATURES, CLASSES = 6, 3


def _models(rng):
    isomax = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(12, activation="tanh"),
            IsoMaxPlusLayer(CLASSES),
        ],
        name="isomax",
    )
    softmax = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(12, activation="tanh"),
            keras.layers.Dense(CLASSES),
        ],
        name="softmax",
    )
    for model in (isomax, softmax):
        model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    layer = isomax.layers[-1]
    layer.temperature.assign(1.0)
    layer.distance_scale.assign(2.0)
    return isomax, softmax


def _data(rng):
    x = rng.normal(size=(400, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, 400)
    ood = {
        "uniform": rng.uniform(-3, 3, size=(150, FEATURES)).astype("float32"),
        "shifted": (rng.normal(size=(90, FEATURES)) + 1.5).astype("float32"),
    }
    return x, y, ood


def _reference_scores(logits):
    """Float64 NumPy versions of every score (independent of keras_isomax)."""
    z = np.asarray(logits, np.float64)
    log_p = log_softmax(z)
    m = z.max(-1)
    return {
        "minimum_distance": m,
        "max_logit": m,
        "max_probability": np.exp(log_p).max(-1),
        "energy": m + np.log(np.exp(z - m[:, None]).sum(-1)),
        "entropic": (np.exp(log_p) * log_p).sum(-1),
    }


def _check_row(row, in_logits, out_logits, score, accuracy):
    ref_in = _reference_scores(in_logits)[score]
    ref_out = _reference_scores(out_logits)[score]
    expected = ood_metrics(ref_in, ref_out)
    assert row["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    for key, value in expected.items():
        # The model computes in float32: allow a rank swap of near-ties.
        assert row[key] == pytest.approx(value, abs=2e-3), key
    assert row["n_in"] == len(ref_in) and row["n_ood"] == len(ref_out)


def test_isomax_model_rows_match_reference(rng):
    isomax, _ = _models(rng)
    x, y, ood = _data(rng)
    result = evaluate_ood(isomax, (x, y), ood, score=["minimum_distance", "entropic"])
    assert isinstance(result, OODEvaluation)
    assert len(result) == 4
    assert all(tuple(row) == ROW_KEYS for row in result)
    in_logits = isomax.predict(x, verbose=0)
    accuracy = np.mean(in_logits.argmax(-1) == y)
    assert result.accuracy == {"isomax": pytest.approx(accuracy)}
    for row in result:
        assert row["model"] == "isomax"
        out_logits = isomax.predict(ood[row["ood"]], verbose=0)
        _check_row(row, in_logits, out_logits, row["score"], accuracy)
    in_scores, ood_scores = result.scores(score="entropic")
    np.testing.assert_allclose(in_scores, _reference_scores(in_logits)["entropic"], atol=1e-5)
    assert sorted(ood_scores) == ["shifted", "uniform"]


def test_compare_softmax_and_isomax_in_one_call(rng):
    isomax, softmax = _models(rng)
    x, y, ood = _data(rng)
    softmax_scores = ["max_probability", "max_logit", "energy", "entropic"]
    result = evaluate_ood(
        {"SoftMax": softmax, "IsoMax+": isomax},
        (x, y),
        ood,
        score={"SoftMax": softmax_scores, "IsoMax+": ["minimum_distance", "entropic"]},
    )
    assert len(result) == (4 + 2) * 2
    assert result.model_names == ["SoftMax", "IsoMax+"]
    for name, model in (("SoftMax", softmax), ("IsoMax+", isomax)):
        in_logits = model.predict(x, verbose=0)
        accuracy = np.mean(in_logits.argmax(-1) == y)
        for row in result.filter(model=name):
            out_logits = model.predict(ood[row["ood"]], verbose=0)
            _check_row(row, in_logits, out_logits, row["score"], accuracy)
    text = str(result)
    assert "AUROC" in text and "TNR@TPR95" in text and "SoftMax" in text
    assert len(text.splitlines()) == 2 + len(result)
    markdown = result.to_markdown(columns=["model", "score", "ood", "auroc"])
    assert markdown.splitlines()[0] == "| model | score | OOD set | AUROC |"
    assert len(markdown.splitlines()) == 2 + len(result)


def test_shuffled_dataset_keeps_labels_aligned(rng):
    isomax, _ = _models(rng)
    x, y, ood = _data(rng)
    expected = evaluate_ood(isomax, (x, y), ood)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(400, seed=3).batch(64)
    ood_datasets = {
        name: tf.data.Dataset.from_tensor_slices(v).batch(50) for name, v in ood.items()
    }
    got = evaluate_ood(isomax, dataset, ood_datasets)
    for a, b in zip(expected, got, strict=True):
        for key in ROW_KEYS:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-6), key
            else:
                assert a[key] == b[key]


def test_without_labels_accuracy_is_nan(rng):
    isomax, _ = _models(rng)
    x, _, ood = _data(rng)
    result = evaluate_ood(isomax, x, ood)
    assert all(math.isnan(row["accuracy"]) for row in result)
    assert "n/a" in str(result)


def _softmax_variants(softmax):
    """The same classifier three ways: logits, Dense(softmax), Dense + Softmax layer."""
    dense = softmax.layers[-1]
    hidden = softmax.layers[0]
    variants = {"logits": softmax}
    for name, layers in (
        ("dense_softmax", [keras.layers.Dense(CLASSES, activation="softmax")]),
        ("softmax_layer", [keras.layers.Dense(CLASSES), keras.layers.Softmax()]),
    ):
        model = keras.Sequential(
            [keras.Input((FEATURES,)), keras.layers.Dense(12, activation="tanh"), *layers],
            name=name,
        )
        model.layers[0].set_weights(hidden.get_weights())
        model.layers[1].set_weights(dense.get_weights())
        variants[name] = model
    return variants


def test_softmax_output_models_are_scored_on_their_pre_softmax_logits(rng):
    import warnings

    from keras_isomax import detectors

    _, softmax = _models(rng)
    x, y, ood = _data(rng)
    names = ["max_probability", "max_logit", "energy", "entropic"]
    logits = {k: softmax.predict(v, verbose=0) for k, v in {"in": x, **ood}.items()}
    for name, model in _softmax_variants(softmax).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # No "probabilities" or "retrain" warning.
            # NumPy 2 on Keras' PyTorch outputs (as in setup.cfg): not this library's.
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            result = evaluate_ood(model, (x, y), ood, score=names, verbose=0)
            as_detectors = evaluate_ood(
                model,
                (x, y),
                ood,
                score=[detectors.get(n, name=f"{n}_det") for n in names],
                verbose=0,
            )
        for row in result:
            _check_row(row, logits["in"], logits[row["ood"]], row["score"], row["accuracy"])
            twin = as_detectors.filter(score=f"{row['score']}_det", ood=row["ood"])[0]
            assert twin["auroc"] == pytest.approx(row["auroc"], abs=1e-9), (name, row["score"])


def test_models_without_a_readable_head_warn_when_they_output_probabilities(rng):
    _, softmax = _models(rng)

    class Wrapped(keras.Model):  # Subclassed: no graph to find the head in.
        def __init__(self):
            super().__init__(name="wrapped")
            self.inner = softmax

        def call(self, inputs):
            return keras.ops.softmax(self.inner(inputs))

    x, y, ood = _data(rng)
    with pytest.warns(UserWarning, match="seems to output probabilities"):
        evaluate_ood(Wrapped(), (x, y), ood, score="max_probability", verbose=0)


def test_verbose(rng, capsys):
    isomax, _ = _models(rng)
    x, y, ood = _data(rng)
    evaluate_ood(isomax, (x, y), ood, verbose=0)
    assert capsys.readouterr().out == ""
    evaluate_ood(isomax, (x, y), ood, verbose=2)  # One line per stage.
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(ood)
    assert lines[0].startswith("evaluate_ood: isomax, in_data: 400 examples")
    assert lines[1].startswith("evaluate_ood: isomax, uniform: 150 examples")
    evaluate_ood(isomax, (x, y), ood, verbose=1)  # A progress bar per stage.
    out = capsys.readouterr().out
    assert out.count("evaluate_ood: isomax") == 1 + len(ood) and "━" in out
    with pytest.raises(ValueError, match="Received: verbose='loud'"):
        evaluate_ood(isomax, (x, y), ood, verbose="loud")


def test_repeated_calls_do_not_retrace(rng, caplog):
    from keras_isomax import calibrate_threshold, detectors

    isomax, softmax = _models(rng)
    x, y, ood = _data(rng)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    with caplog.at_level("WARNING"):
        for _ in range(4):
            det = detectors.KNN(k=5).fit(softmax, dataset, verbose=0)
            det.score(x, verbose=0)
            detectors.Mahalanobis().fit(softmax, (x, y), verbose=0)
            calibrate_threshold(isomax, dataset, verbose=0)
            evaluate_ood(isomax, dataset, ood, verbose=0)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]


def test_errors(rng):
    isomax, _ = _models(rng)
    x, y, ood = _data(rng)
    with pytest.raises(TypeError, match="ood_data"):
        evaluate_ood(isomax, (x, y), ood["uniform"])
    with pytest.raises(ValueError, match="Unknown OOD score"):
        evaluate_ood(isomax, (x, y), ood, score="nope")
    with pytest.raises(ValueError, match="no entry for models"):
        evaluate_ood({"a": isomax}, (x, y), ood, score={"b": "entropic"})
    with pytest.raises(TypeError, match="model"):
        evaluate_ood("model", (x, y), ood)
    bad = dict(ood, broken=np.full((5, FEATURES), np.nan, "float32"))
    with pytest.raises(ValueError, match="OOD set 'broken'.*NaN"):
        evaluate_ood(isomax, (x, y), bad)
    with pytest.raises(ValueError, match="no examples"):
        evaluate_ood(isomax, (x, y), {"empty": np.zeros((0, FEATURES), "float32")})
