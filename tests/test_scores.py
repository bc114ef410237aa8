import keras
import numpy as np
import pytest

from keras_isomax import scores
from keras_isomax.testing import log_softmax


def _ref(name, z):
    z = np.asarray(z, np.float64)
    lp = log_softmax(z)
    return {
        "minimum_distance": z.max(-1),
        "max_logit": z.max(-1),
        "max_probability": np.exp(lp).max(-1),
        "entropic": np.sum(np.exp(lp) * lp, axis=-1),
        "energy": z.max(-1) + np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)),
    }[name]


@pytest.mark.parametrize("name", sorted(scores.SCORES))
def test_scores_match_reference(rng, name):
    z = rng.normal(scale=3.0, size=(11, 7)).astype("float32")
    fn = scores.get(name)
    assert scores.get(name + "_score") is fn
    np.testing.assert_allclose(fn(z), _ref(name, z), rtol=1e-5, atol=1e-6)
    assert fn.__doc__ and "in-distribution" in fn.__doc__


def test_minimum_distance_is_negative_nearest_distance(rng):
    distances = rng.uniform(0, 2, size=(5, 4))
    np.testing.assert_allclose(
        scores.minimum_distance_score(-1.7 * distances),
        -1.7 * distances.min(-1),
        rtol=1e-6,
    )


def test_entropic_score_finite_when_probabilities_underflow():
    z = np.array([[0.0, -1e4, -2e4], [5.0, 5.0, 5.0]], "float32")
    s = keras.ops.convert_to_numpy(scores.entropic_score(z))
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s, [0.0, -np.log(3.0)], atol=1e-6)


def test_sign_convention_confident_beats_uniform():
    confident = np.array([[0.0, -5.0, -5.0]], "float32")
    uniform = np.array([[-2.5, -2.5, -2.5]], "float32")
    for name, fn in scores.SCORES.items():
        assert float(fn(confident)[0]) > float(fn(uniform)[0]), name


def test_unknown_score_lists_choices():
    with pytest.raises(ValueError, match=r"'entropic'.*Received: score='mahalanobis'"):
        scores.get("mahalanobis")
