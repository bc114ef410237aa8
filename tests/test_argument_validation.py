"""Nonsense arguments raise clear errors instead of giving wrong numbers.

Also the two mutation-testing holes of issue 10: `calibrate_threshold` must put
the threshold strictly between the smallest accepted and the next lower
validation score, and `evaluate_ood` must use its `tpr=`.
"""

import math

import keras
import numpy as np
import pytest

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, isomax_plus_loss, scores
from keras_isomax.calibration import calibrate_threshold
from keras_isomax.detection_metrics import ood_metrics
from keras_isomax.evaluation import evaluate_ood
from keras_isomax.testing import isomax_loss, log_softmax

FEATURES, CLASSES = 6, 3


def _model(rng):
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, activation="tanh"),
            IsoMaxPlusLayer(CLASSES, name="head"),
        ]
    )
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    model.get_layer("head").distance_scale.assign(3.0)
    return model


# ------------------------------------------------------------------ the loss


@pytest.mark.parametrize("scale", [-10.0, 0.0, math.nan, math.inf, "x", True, None])
def test_loss_function_validates_entropic_scale(rng, scale):
    logits = -rng.uniform(size=(4, CLASSES)).astype("float32")
    with pytest.raises(ValueError, match="Received: entropic_scale="):
        isomax_plus_loss(np.array([0, 1, 2, 0]), logits, entropic_scale=scale)
    with pytest.raises(ValueError, match="Received: entropic_scale="):
        IsoMaxPlusLoss(entropic_scale=scale)


def test_loss_function_accepts_a_valid_scale(rng):
    logits = -rng.uniform(size=(5, CLASSES))
    labels = rng.integers(0, CLASSES, 5)
    got = keras.ops.convert_to_numpy(isomax_plus_loss(labels, logits, entropic_scale=2.5))
    np.testing.assert_allclose(got, isomax_loss(labels, logits, 2.5), rtol=1e-5)


def test_integer_labels_that_are_not_one_hot_raise(rng):
    logits = -rng.uniform(size=(4, CLASSES)).astype("float32")
    with pytest.raises(ValueError, match=r"one-hot.*Received: y_true rows such as \[0, 1, 2\]"):
        isomax_plus_loss(np.array([[0, 1, 2]] * 4), logits)
    with pytest.raises(ValueError, match="one-hot"):
        isomax_plus_loss(np.zeros((4, CLASSES), "int32"), logits)


def test_one_hot_and_soft_targets_still_work(rng):
    logits = -rng.uniform(size=(4, CLASSES))
    labels = rng.integers(0, CLASSES, 4)
    one_hot = np.eye(CLASSES, dtype="int64")[labels]
    got = keras.ops.convert_to_numpy(isomax_plus_loss(one_hot, logits))
    np.testing.assert_allclose(got, isomax_loss(labels, logits), rtol=1e-5)
    soft = rng.dirichlet(np.ones(CLASSES), 4)  # Float targets may be soft.
    got = keras.ops.convert_to_numpy(isomax_plus_loss(soft, logits))
    want = -np.sum(soft * log_softmax(10.0 * logits), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_model_compiled_with_the_loss_function_reloads(rng, tmp_path):
    model = _model(rng)
    model.compile(optimizer="sgd", loss=isomax_plus_loss)
    x = rng.normal(size=(16, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, 16)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    assert restored.loss is isomax_plus_loss
    np.testing.assert_allclose(
        restored.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-6
    )


# ---------------------------------------------------------------- the scores


@pytest.mark.parametrize("name", sorted(scores.SCORES))
def test_scores_refuse_integer_and_empty_logits(name):
    fn = scores.get(name)
    with pytest.raises(TypeError, match=f"{fn.__name__}.*Received: logits.dtype=int"):
        fn(np.array([[1, 2, 3]], "int32"))
    with pytest.raises(ValueError, match=r"Received: logits.shape=\(4, 0\)"):
        fn(np.zeros((4, 0), "float32"))
    with pytest.raises(ValueError, match=r"Received: logits.shape=\(\)"):
        fn(np.float32(1.0))
    assert keras.ops.convert_to_numpy(fn(np.zeros((0, 3), "float32"))).shape == (0,)


# --------------------------------------------------------------- evaluate_ood


@pytest.mark.parametrize(
    "labels",
    [
        lambda rng, n: np.full(n, CLASSES),  # Out of range.
        lambda rng, n: np.full(n, -1),
        lambda rng, n: np.eye(CLASSES + 2)[rng.integers(0, CLASSES + 2, n)],  # Too wide.
        lambda rng, n: np.eye(CLASSES - 1)[rng.integers(0, CLASSES - 1, n)],  # Too narrow.
    ],
    ids=["too-large", "negative", "one-hot-too-wide", "one-hot-too-narrow"],
)
def test_evaluate_ood_checks_labels_against_the_model(rng, labels):
    model = _model(rng)
    x = rng.normal(size=(20, FEATURES)).astype("float32")
    ood = {"noise": rng.uniform(size=(10, FEATURES)).astype("float32")}
    with pytest.raises(ValueError, match="Received: labels"):
        evaluate_ood(model, (x, labels(rng, 20)), ood)


def test_evaluate_ood_uses_its_tpr(rng):
    model = _model(rng)
    x = rng.normal(size=(400, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, 400)
    ood = {"shifted": rng.normal(0.5, 1.5, size=(300, FEATURES)).astype("float32")}
    result = evaluate_ood(model, (x, y), ood, tpr=0.9)
    in_scores, out_scores = result.scores()
    at_90 = ood_metrics(in_scores, out_scores["shifted"], tpr=0.9)
    at_95 = ood_metrics(in_scores, out_scores["shifted"], tpr=0.95)
    assert at_90["tnr_at_tpr95"] != at_95["tnr_at_tpr95"]  # The test can tell them apart.
    for key in ("tnr_at_tpr95", "fpr_at_tpr95"):
        assert result[0][key] == at_90[key]


# ------------------------------------------------------- calibrate_threshold


@pytest.mark.parametrize("tpr", [0.9, 0.95, 0.5])
def test_threshold_is_strictly_between_accepted_and_next_score(rng, tpr):
    model = _model(rng)
    x = rng.normal(size=(200, FEATURES)).astype("float32")
    threshold = calibrate_threshold(model, x, tpr=tpr)
    values = np.sort(model.predict(x, verbose=0).max(axis=-1))[::-1]
    assert len(np.unique(values)) == len(values)  # No ties in this draw.
    k = math.ceil(tpr * len(values) - 1e-9)  # Accepted: the k highest scores.
    accepted, rejected = values[k - 1], values[k]
    assert rejected < threshold < accepted
    np.testing.assert_allclose(threshold, (accepted + rejected) / 2, rtol=1e-6)
    assert np.mean(values >= threshold) == k / len(values)


# ---------------------------------------------------------------- the demo


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "Received: epochs=0"),
        ({"epochs": 1.5}, "Received: epochs=1.5"),
        ({"train_size": -5}, "Received: train_size=-5"),
        ({"train_size": 0}, "Received: train_size=0"),
    ],
)
def test_run_demo_refuses_nonsense_before_any_work(tmp_path, kwargs, match):
    from keras_isomax.app.demo import run_demo

    with pytest.raises(ValueError, match=match):
        run_demo(output_dir=tmp_path / "out", verbose=0, **kwargs)
    assert not (tmp_path / "out").exists()
