import keras
import numpy as np
import pytest

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, OODScore, scores


@pytest.mark.parametrize("score", sorted(scores.SCORES))
def test_streaming_mean_matches_numpy(rng, score):
    metric = OODScore(score)
    batches = [rng.normal(size=(n, 4)).astype("float32") for n in (3, 5, 1)]
    weights = [rng.uniform(0, 1, size=len(b)) for b in batches]
    for b, w in zip(batches, weights):
        metric.update_state(None, b, sample_weight=w)
    values = np.concatenate([np.asarray(scores.get(score)(b)) for b in batches])
    w = np.concatenate(weights)
    np.testing.assert_allclose(float(metric.result()), np.sum(values * w) / np.sum(w), rtol=1e-5)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_name_and_config_round_trip():
    metric = OODScore("entropic_score")
    assert metric.name == "entropic_score" and metric.score == "entropic"
    config = metric.get_config()
    clone = OODScore.from_config(config)
    assert clone.get_config() == config
    clone = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(clone, OODScore) and clone.score == "entropic"


def test_bad_score():
    with pytest.raises(ValueError, match="Received: score='nope'"):
        OODScore("nope")
    with pytest.raises(TypeError, match="score"):
        OODScore(len)


def test_in_compile_and_evaluate(rng):
    x = rng.normal(size=(20, 4)).astype("float32")
    y = rng.integers(0, 3, size=20)
    model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    model.compile(
        optimizer="sgd",
        loss=IsoMaxPlusLoss(),
        metrics=[OODScore(), OODScore("entropic")],
    )
    results = model.evaluate(x, y, batch_size=7, return_dict=True, verbose=0)
    logits = model.predict(x, verbose=0)
    np.testing.assert_allclose(
        results["minimum_distance_score"], np.mean(logits.max(-1)), rtol=1e-5
    )
    assert "entropic_score" in results
