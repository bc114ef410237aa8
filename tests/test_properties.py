"""Property-based tests (Hypothesis): detection metrics and threshold calibration.

`ood_metrics` is compared with brute-force references written here from the
definitions (every pair, every threshold, exact fractions), on score sets
with ties, constant scores, infinities and one example per side.
`calibrate_threshold` is checked on a model whose score is its input, so the
scores (and their ties) are known exactly.
"""

import math
from fractions import Fraction

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from keras_isomax import IsoMaxPlusLayer, calibrate_threshold, detectors, ood_metrics, testing
from keras_isomax.detection_metrics import roc_curve, threshold_at_tpr

# Deterministic example sequence per test, no example database on disk, no
# per-example deadline (a loaded 2-core machine stalls at random).
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None)
SLOW = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# ----------------------------------------------------- brute-force references


def _accepted(scores, t):
    return sum(1 for s in scores if s >= t)


def _thresholds(in_scores, out_scores):
    """Every distinct way to split the scores, highest first (+inf: accept none)."""
    return [math.inf] + sorted(set(in_scores) | set(out_scores), reverse=True)


def auroc_pairs(in_scores, out_scores):
    """P(in > out) + P(in = out) / 2, counted over every pair."""
    wins = sum(
        Fraction(1) if a > b else Fraction(1, 2) if a == b else Fraction(0)
        for a in in_scores
        for b in out_scores
    )
    return wins / (len(in_scores) * len(out_scores))


def tnr_at_tpr_sweep(in_scores, out_scores, tpr):
    """1 - FPR at the highest threshold accepting at least `tpr` of `in_scores`."""
    for t in _thresholds(in_scores, out_scores):
        if _accepted(in_scores, t) / len(in_scores) >= tpr:
            return 1 - Fraction(_accepted(out_scores, t), len(out_scores))
    raise AssertionError("the lowest threshold accepts every in-distribution score")


def detection_accuracy_sweep(in_scores, out_scores):
    """max over thresholds of (TPR + TNR) / 2."""
    return max(
        Fraction(1, 2)
        * (
            Fraction(_accepted(in_scores, t), len(in_scores))
            + 1
            - Fraction(_accepted(out_scores, t), len(out_scores))
        )
        for t in _thresholds(in_scores, out_scores)
    )


def average_precision_sweep(positive, negative):
    """sum_k (R_k - R_{k-1}) P_k over the distinct scores, highest first."""
    total, previous_recall = Fraction(0), Fraction(0)
    for t in _thresholds(positive, negative)[1:]:
        tp, fp = _accepted(positive, t), _accepted(negative, t)
        recall = Fraction(tp, len(positive))
        if tp:
            total += (recall - previous_recall) * Fraction(tp, tp + fp)
        previous_recall = recall
    return total


# ------------------------------------------------------------ score strategies

_TIED = st.integers(-3, 3).map(float)  # Few values: ties within and across sets.
_ANY = st.floats(-1e6, 1e6, allow_nan=False)
_INF = st.sampled_from([math.inf, -math.inf])


def _score_lists(dtype):
    if dtype == "int64":
        element = st.integers(-4, 4)
    elif dtype == "float32":
        element = st.one_of(_TIED, st.floats(-1e3, 1e3, allow_nan=False, width=32), _INF)
    else:
        element = st.one_of(_TIED, _ANY, _INF)
    constant = st.builds(lambda v, n: [v] * n, element, st.integers(1, 6))
    return st.one_of(st.lists(element, min_size=1, max_size=25), constant)


@st.composite
def score_pairs(draw):
    dtype = draw(st.sampled_from(["float64", "float32", "int64"]))
    lists = _score_lists(dtype)
    in_scores, out_scores = draw(lists), draw(lists)
    return np.array(in_scores, dtype), np.array(out_scores, dtype)


_TPR = st.one_of(st.sampled_from([0.95, 0.5, 1.0, 0.9, 0.8]), st.floats(0.001, 1.0))


@FAST
@given(pair=score_pairs(), tpr=_TPR)
@example(pair=(np.array([1.0]), np.array([1.0])), tpr=0.95)  # One tie, one per side.
@example(pair=(np.array([2.0]), np.array([1.0])), tpr=0.95)
@example(pair=(np.array([0.0]), np.array([1.0])), tpr=0.95)
@example(pair=(np.full(5, 0.3), np.full(7, 0.3)), tpr=0.95)  # Constant scores.
@example(pair=(np.array([math.inf, 1.0]), np.array([-math.inf, math.inf])), tpr=0.5)
def test_ood_metrics_match_brute_force(pair, tpr):
    in_scores, out_scores = pair
    m = ood_metrics(in_scores, out_scores, tpr=tpr)
    a, b = in_scores.tolist(), out_scores.tolist()
    tnr = tnr_at_tpr_sweep(a, b, tpr)
    expected = {
        "auroc": auroc_pairs(a, b),
        "aupr_in": average_precision_sweep(a, b),
        "aupr_out": average_precision_sweep([-s for s in b], [-s for s in a]),
        "tnr_at_tpr": tnr,
        "fpr_at_tpr": 1 - tnr,
        "detection_accuracy": detection_accuracy_sweep(a, b),
        "tnr_at_tpr95": tnr,
        "fpr_at_tpr95": 1 - tnr,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(float(value), rel=1e-12, abs=1e-12), key
        assert 0.0 <= m[key] <= 1.0


@FAST
@given(pair=score_pairs())
def test_ood_metrics_symmetries(pair):
    """Swapping the sets and negating the scores mirrors every metric."""
    in_scores, out_scores = pair
    m = ood_metrics(in_scores, out_scores)
    mirrored = ood_metrics(-out_scores, -in_scores)
    assert mirrored["auroc"] == pytest.approx(m["auroc"], abs=1e-12)
    assert mirrored["aupr_in"] == pytest.approx(m["aupr_out"], abs=1e-12)
    assert mirrored["aupr_out"] == pytest.approx(m["aupr_in"], abs=1e-12)
    assert mirrored["detection_accuracy"] == pytest.approx(m["detection_accuracy"], abs=1e-12)
    assert m["detection_accuracy"] >= 0.5
    # A shift or a positive scale of both sets changes nothing (exactly so
    # for integer scores; floats can merge under rounding, so only there).
    if in_scores.dtype == np.int64:
        shifted = ood_metrics(3 * in_scores + 7, 3 * out_scores + 7)
        assert shifted == m


@FAST
@given(pair=score_pairs())
def test_roc_curve_matches_a_threshold_sweep(pair):
    in_scores, out_scores = pair
    fpr, tpr, thresholds = roc_curve(in_scores, out_scores)
    a, b = in_scores.tolist(), out_scores.tolist()
    expected = _thresholds(a, b)  # +inf, then every distinct score, highest first.
    np.testing.assert_array_equal(thresholds, np.array(expected, np.float64))
    assert fpr[0] == tpr[0] == 0.0  # Accept none (even a score of +inf).
    for i, t in enumerate(expected[1:], start=1):
        assert tpr[i] == pytest.approx(_accepted(a, t) / len(a), abs=1e-15)
        assert fpr[i] == pytest.approx(_accepted(b, t) / len(b), abs=1e-15)


# ------------------------------------------------------ threshold_at_tpr alone


def test_threshold_at_tpr_defaults_to_95_percent(rng):
    scores = rng.permutation(np.arange(100.0))  # 95 accepted: 5.0 and above.
    assert threshold_at_tpr(scores) == 5.0
    assert threshold_at_tpr(scores, midpoint=True) == 4.5


def _smallest_acceptable(scores, tpr):
    """The fewest inputs a threshold can accept (ties go together) with >= tpr of them."""
    for t in sorted(set(scores), reverse=True):
        if _accepted(scores, t) / len(scores) >= tpr:
            return _accepted(scores, t), t
    raise AssertionError("unreachable: the lowest score accepts everything")


@FAST
@given(
    scores=st.one_of(_score_lists("float64"), _score_lists("float32")).map(np.array),
    tpr=_TPR,
    midpoint=st.booleans(),
)
@example(scores=np.array([1.0, 1.0 + 2.0**-23], "float32"), tpr=0.5, midpoint=True)
@example(scores=np.array([1.0, 1.0 + 2.0**-40]), tpr=0.5, midpoint=True)
@example(scores=np.array([1.0, 1.0 + 2.0**-22], "float32"), tpr=0.5, midpoint=True)
@example(scores=np.array([-3.0, 5.0, 5.0, 7.0]), tpr=0.5, midpoint=True)
def test_threshold_at_tpr_accepts_the_fewest_possible(scores, tpr, midpoint):
    threshold = threshold_at_tpr(scores, tpr, midpoint=midpoint)
    count, lowest = _smallest_acceptable(scores.tolist(), tpr)
    assert _accepted(scores.tolist(), threshold) == count
    lower = [s for s in scores.tolist() if s < lowest]
    if not midpoint or not lower:
        assert threshold == lowest
        return
    below = max(lower)
    assert below < threshold <= lowest
    middle = 0.5 * (lowest + below)
    float32_between = _float32_strictly_between(below, lowest)
    if not math.isfinite(middle):
        assert threshold == lowest
    elif float32_between:
        # Halfway, rounded to float32 (how thresholds are stored): it then
        # still separates the two scores once stored.
        assert abs(threshold - middle) <= float(np.spacing(np.float32(abs(middle))))
        assert below < float(np.float32(threshold)) <= lowest
    elif float(np.float32(lowest)) == lowest:
        assert threshold == lowest  # Adjacent float32 scores: nothing lies between.
    else:
        assert threshold == middle  # Finer than float32: the float64 midpoint.


def _float32_strictly_between(low, high):
    """Whether some float32 value v has low < v < high."""
    with np.errstate(over="ignore"):
        candidate = np.float32(low)  # The nearest float32; the next one up if not above.
        if float(candidate) <= low:
            candidate = np.nextafter(candidate, np.float32(np.inf))
    return low < float(candidate) < high


# ----------------------------------------- calibrate_threshold: acceptance rate


@pytest.fixture(scope="module")
def identity_classifier():
    """A SoftMax classifier whose logits are its inputs: score = max logit = max input."""
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(
                2, use_bias=False, kernel_initializer="identity", activation="softmax"
            ),
        ]
    )
    return model


@SLOW
@given(
    values=st.lists(
        st.one_of(st.integers(-3, 3).map(float), st.floats(-100, 100, width=32)),
        min_size=1,
        max_size=40,
    ),
    tpr=_TPR,
)
@example(values=[1.0, 1.0 + 2.0**-23], tpr=0.5)  # Adjacent float32 scores.
@example(values=[0.25] * 5, tpr=0.95)  # Constant scores: all accepted.
def test_calibrate_threshold_accepts_the_smallest_fraction_at_least_tpr(
    identity_classifier, values, tpr
):
    scores = np.array(values, "float32")
    x = np.stack([scores, scores], axis=1)  # Logits (s, s): max logit s, exactly.
    detector = detectors.MaxLogit()
    threshold = calibrate_threshold(identity_classifier, x, tpr=tpr, detector=detector)
    assert threshold == float(np.float32(threshold))  # As stored, float32.
    count, lowest = _smallest_acceptable(scores.tolist(), tpr)
    # The decision served everywhere: accepted when score >= threshold, float32.
    served = detector.score(x, identity_classifier)
    np.testing.assert_array_equal(served, scores)
    assert int(np.sum(scores >= np.float32(threshold))) == count, (threshold, lowest)


@SLOW
@given(
    n=st.integers(1, 60),
    tpr=_TPR,
    seed=st.integers(0, 2**32 - 1),
)
def test_calibrate_threshold_on_an_isomax_model(n, tpr, seed):
    """The layer's threshold accepts the smallest fraction >= tpr of its own data."""
    rng = np.random.default_rng(seed)
    model = _isomax_model()
    x = rng.normal(size=(n, 4)).astype("float32")
    head = model.layers[-1]
    score = testing.logits(x, keras.ops.convert_to_numpy(head.prototypes)).max(axis=-1)
    count, _ = _smallest_acceptable(score.tolist(), tpr)
    ordered = np.sort(score)[::-1]
    if count < n and ordered[count - 1] - ordered[count] < 1e-5:
        return  # Two scores closer than float32 rounding: no unambiguous count.
    threshold = calibrate_threshold(model, x, tpr=tpr)
    assert _float(head.ood_threshold) == threshold
    served = model.predict(x, verbose=0, batch_size=7).max(axis=-1)
    assert int(np.sum(served >= threshold)) == count


_MODEL = []


def _isomax_model():
    """One small IsoMax+ model for every example (fresh inputs each time)."""
    if not _MODEL:
        keras.utils.set_random_seed(1234)
        _MODEL.append(keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)]))
    return _MODEL[0]


def _float(variable):
    return float(keras.ops.convert_to_numpy(variable))
