"""Exact OOD detection metrics against scikit-learn and brute-force references."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from keras_isomax.detection_metrics import (
    OOD_METRIC_NAMES,
    expected_calibration_error,
    ood_metrics,
    roc_curve,
    threshold_at_tpr,
)


def _brute_force(in_scores, out_scores, tpr=0.95):
    """TNR at TPR >= tpr and detection accuracy over every possible threshold."""
    in_scores = np.asarray(in_scores, np.float64)
    out_scores = np.asarray(out_scores, np.float64)
    candidates = np.concatenate([in_scores, out_scores, [np.inf, -np.inf]])
    best_tnr, best_acc = -1.0, -1.0
    for t in candidates:
        tpr_t = np.mean(in_scores >= t)
        fpr_t = np.mean(out_scores >= t)
        if tpr_t >= tpr:
            best_tnr = max(best_tnr, 1.0 - fpr_t)
        best_acc = max(best_acc, 0.5 * (tpr_t + 1.0 - fpr_t))
    return best_tnr, best_acc


def _sklearn(in_scores, out_scores):
    y = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    s = np.r_[in_scores, out_scores].astype(np.float64)
    return (
        roc_auc_score(y, s),
        average_precision_score(y, s),
        average_precision_score(1 - y, -s),
    )


def _random_case(rng, kind):
    n_in, n_out = rng.integers(1, 400, size=2)
    if kind == "ties":  # Few distinct values: many ties within and across sets.
        a = rng.integers(0, 12, n_in).astype(np.float64)
        b = rng.integers(-4, 8, n_out).astype(np.float64)
    elif kind == "float32":
        a = rng.normal(1.0, 1.0, n_in).astype(np.float32)
        b = rng.normal(0.0, 1.0, n_out).astype(np.float32)
        b[: n_out // 3] = rng.choice(a, n_out // 3)  # Exact cross-set ties.
    else:
        a = rng.normal(0.5, 1.0, n_in)
        b = rng.normal(0.0, 1.0, n_out)
    return a, b


@pytest.mark.parametrize("kind", ["ties", "float32", "continuous"])
def test_matches_sklearn_and_brute_force(rng, kind):
    for _ in range(25):
        a, b = _random_case(rng, kind)
        m = ood_metrics(a, b)
        assert set(m) == set(OOD_METRIC_NAMES)
        auroc, ap_in, ap_out = _sklearn(a, b)
        assert abs(m["auroc"] - auroc) <= 1e-9
        assert abs(m["aupr_in"] - ap_in) <= 1e-9
        assert abs(m["aupr_out"] - ap_out) <= 1e-9
        tnr, det = _brute_force(a, b)
        assert abs(m["tnr_at_tpr95"] - tnr) <= 1e-12
        assert abs(m["fpr_at_tpr95"] - (1.0 - tnr)) <= 1e-12
        assert abs(m["detection_accuracy"] - det) <= 1e-12


def _authors_sweep(known, novel):
    """The IsoMax+ authors' evaluation (Mahalanobis-detector `calculate_log.py`),
    re-implemented: a one-sample-at-a-time sweep over the merged sorted scores
    in which a tie removes the in-distribution ("known") sample first."""
    known, novel = np.sort(known), np.sort(novel)
    tp, fp, k, n = [len(known)], [len(novel)], 0, 0
    while k < len(known) or n < len(novel):
        if k < len(known) and (n == len(novel) or not novel[n] < known[k]):
            k += 1
            tp.append(tp[-1] - 1)
            fp.append(fp[-1])
        else:
            n += 1
            tp.append(tp[-1])
            fp.append(fp[-1] - 1)
    tpr, fpr = np.array(tp) / len(known), np.array(fp) / len(novel)
    auroc = -np.trapezoid(1.0 - np.r_[1.0, fpr, 0.0], np.r_[1.0, tpr, 0.0])
    detection = np.max(0.5 * (tpr + 1.0 - fpr))
    tnr = 1.0 - fpr[np.argmin(np.abs(tpr - 0.95))]
    return auroc, detection, tnr


def test_authors_code_agrees_without_ties_and_is_pessimistic_with_ties(rng):
    for _ in range(20):
        a, b = _random_case(rng, "continuous")
        ours = ood_metrics(a, b)
        auroc, detection, tnr = _authors_sweep(a, b)
        assert abs(ours["auroc"] - auroc) <= 1e-9
        assert abs(ours["detection_accuracy"] - detection) <= 1e-12
        # Their TNR differs: of the sweep points at the TPR nearest 95 % (maybe
        # below it) they take the first, which also accepts the OOD inputs
        # between that in-distribution score and the next lower one.
        assert 0.0 <= tnr <= 1.0
        a, b = _random_case(rng, "ties")
        assert _authors_sweep(a, b)[0] <= ood_metrics(a, b)["auroc"] + 1e-12


def test_auroc_is_mann_whitney_probability(rng):
    a = rng.integers(0, 5, 60).astype(float)
    b = rng.integers(0, 5, 40).astype(float)
    greater = (a[:, None] > b[None, :]).mean()
    equal = (a[:, None] == b[None, :]).mean()
    assert math.isclose(ood_metrics(a, b)["auroc"], greater + 0.5 * equal, abs_tol=1e-12)


@pytest.mark.parametrize("tpr", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_other_tpr_levels_against_brute_force(rng, tpr):
    a, b = _random_case(rng, "ties")
    tnr, _ = _brute_force(a, b, tpr=tpr)
    assert abs(ood_metrics(a, b, tpr=tpr)["tnr_at_tpr95"] - tnr) <= 1e-12


def test_tpr_exactly_95_percent_is_enough():
    # 100 in-distribution scores 1..100: the threshold 6 accepts exactly 95 %.
    a = np.arange(1, 101, dtype=np.float64)
    b = np.array([5.5, 6.0, 50.0, 200.0])
    m = ood_metrics(a, b)
    assert m["fpr_at_tpr95"] == 0.75  # 6.0, 50 and 200 are accepted.
    assert m["tnr_at_tpr95"] == 0.25


def test_perfect_reversed_and_constant_scores():
    good = ood_metrics(np.array([2.0, 3.0, 4.0]), np.array([0.0, 1.0]))
    assert good == {
        "auroc": 1.0,
        "aupr_in": 1.0,
        "aupr_out": 1.0,
        "tnr_at_tpr": 1.0,
        "fpr_at_tpr": 0.0,
        "tnr_at_tpr95": 1.0,
        "fpr_at_tpr95": 0.0,
        "detection_accuracy": 1.0,
    }
    bad = ood_metrics(np.array([0.0, 1.0]), np.array([2.0, 3.0, 4.0]))
    assert bad["auroc"] == 0.0
    assert bad["tnr_at_tpr95"] == 0.0
    assert bad["detection_accuracy"] == 0.5
    flat = ood_metrics(np.zeros(10), np.zeros(30))
    assert flat["auroc"] == 0.5
    assert flat["aupr_in"] == 0.25  # The positive rate.
    assert flat["aupr_out"] == 0.75
    assert flat["tnr_at_tpr95"] == 0.0
    assert flat["detection_accuracy"] == 0.5


def test_single_examples_and_integer_scores():
    m = ood_metrics(np.array([3]), np.array([1]))
    assert m["auroc"] == 1.0 and m["detection_accuracy"] == 1.0
    m = ood_metrics([1, 2, 3], [2, 2])  # Python lists of ints.
    assert math.isclose(m["auroc"], _sklearn([1, 2, 3], [2, 2])[0])


def test_infinite_scores_are_ranked():
    a = np.array([np.inf, 1.0, 0.5])
    b = np.array([-np.inf, 0.7])
    expected = ood_metrics(np.array([3.0, 1.0, 0.5]), np.array([-3.0, 0.7]))
    assert ood_metrics(a, b) == expected


def test_order_and_permutation_invariance(rng):
    a, b = _random_case(rng, "ties")
    m = ood_metrics(a, b)
    assert ood_metrics(rng.permutation(a), rng.permutation(b)) == m
    shifted = ood_metrics(3.0 * a - 7.0, 3.0 * b - 7.0)  # Monotone transform.
    for key in m:
        assert math.isclose(shifted[key], m[key], abs_tol=1e-12)


def test_swapping_sets_mirrors_metrics(rng):
    a, b = _random_case(rng, "continuous")
    m = ood_metrics(a, b)
    mirrored = ood_metrics(-b, -a)
    assert math.isclose(mirrored["auroc"], m["auroc"], abs_tol=1e-12)
    assert math.isclose(mirrored["aupr_in"], m["aupr_out"], abs_tol=1e-12)
    assert math.isclose(mirrored["aupr_out"], m["aupr_in"], abs_tol=1e-12)


@pytest.mark.parametrize(
    ("in_scores", "out_scores", "error", "match"),
    [
        (np.array([]), np.array([1.0]), ValueError, "in_scores.*empty"),
        (np.array([1.0]), np.zeros(0), ValueError, "out_scores.*empty"),
        (np.array([1.0, np.nan]), np.array([1.0]), ValueError, "in_scores.*NaN"),
        (np.array([1.0]), np.array([np.nan, 2.0]), ValueError, "out_scores.*NaN"),
        (
            np.array([1.0], np.float32),
            np.array([1.0], np.float64),
            TypeError,
            "same dtype.*in_scores.dtype=float32, out_scores.dtype=float64",
        ),
        (np.array([1, 2]), np.array([1.0]), TypeError, "same dtype"),
        (np.array(["a"]), np.array(["b"]), TypeError, "in_scores.dtype"),
        (np.array([True]), np.array([False]), TypeError, "in_scores.dtype=bool"),
        (np.ones((3, 2)), np.ones(3), ValueError, r"in_scores.shape=\(3, 2\)"),
        (np.array(1.0), np.ones(3), ValueError, "1-D"),
    ],
)
def test_bad_input_errors(in_scores, out_scores, error, match):
    with pytest.raises(error, match=match):
        ood_metrics(in_scores, out_scores)


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5, float("nan"), "x", True])
def test_bad_tpr(tpr):
    with pytest.raises(ValueError, match="Received: tpr="):
        ood_metrics(np.ones(3), np.ones(2), tpr=tpr)


def test_roc_curve_matches_sklearn(rng):
    a, b = _random_case(rng, "ties")
    fpr, tpr, thresholds = roc_curve(a, b)
    y = np.r_[np.ones(len(a)), np.zeros(len(b))]
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, np.r_[a, b], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thresholds[1:], sk_thr[1:])
    assert thresholds[0] == np.inf
    assert math.isclose(np.trapezoid(tpr, fpr), ood_metrics(a, b)["auroc"])


@pytest.mark.parametrize("tpr", [0.5, 0.9, 0.95, 1.0])
def test_threshold_at_tpr(rng, tpr):
    scores = rng.integers(0, 50, 501).astype(np.float64)
    t = threshold_at_tpr(scores, tpr)
    assert np.mean(scores >= t) >= tpr
    # The next higher distinct score accepts less than tpr: t is the highest.
    higher = scores[scores > t]
    if higher.size:
        assert np.mean(scores >= higher.min()) < tpr
    mid = threshold_at_tpr(scores, tpr, midpoint=True)
    assert np.array_equal(scores >= mid, scores >= t)
    assert mid <= t


# --------------------------------------------------------------------- ECE


def _reference_ece(probs, labels, num_bins=15):
    """Guo et al.'s loop: bins (lower, upper] over linspace(0, 1, B + 1)."""
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, num_bins + 1)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            ece += in_bin.mean() * gap
    return ece


@pytest.mark.parametrize("num_bins", [15, 10, 1])
def test_ece_matches_reference(rng, num_bins):
    logits = rng.normal(size=(2000, 7)) * rng.uniform(0.1, 5, size=(2000, 1))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = rng.integers(0, 7, 2000)
    got = expected_calibration_error(probs, labels, num_bins=num_bins)
    assert math.isclose(got, _reference_ece(probs, labels, num_bins), abs_tol=1e-12)
    one_hot = np.eye(7)[labels]
    assert got == expected_calibration_error(probs, one_hot, num_bins=num_bins)


@pytest.mark.parametrize("rows", [1, 2, 40])
def test_ece_binary_one_hot_labels_and_exact_probabilities(rng, rows):
    # Two classes, confidences 1.0, 0.5 and on bin edges: one-hot labels equal class ids.
    p = rng.choice([0.5, 0.6, 0.75, 0.9, 1.0, 0.0, 0.1, 0.3], size=rows)
    probs = np.stack([p, 1.0 - p], axis=1)
    labels = rng.integers(0, 2, rows)
    expected = _reference_ece(probs, labels, num_bins=10)
    for targets in (labels, np.eye(2, dtype="int64")[labels], np.eye(2)[labels]):
        got = expected_calibration_error(probs, targets, num_bins=10)
        assert math.isclose(got, expected, abs_tol=1e-12)


def test_ece_default_has_15_bins(rng):
    logits = rng.normal(size=(500, 4)) * 3.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 4, 500)
    expected = _reference_ece(probs, labels, num_bins=15)
    assert math.isclose(expected_calibration_error(probs, labels), expected, abs_tol=1e-12)
    assert not math.isclose(expected, _reference_ece(probs, labels, num_bins=16), abs_tol=1e-6)


@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (3,), (2, 2, 2)])
def test_ece_needs_a_non_empty_matrix(shape):
    probs = np.full(shape, 0.5)
    labels = np.zeros(shape[0] if len(shape) else 0, "int64")
    with pytest.raises(ValueError, match=r"non-empty \(N, C\) array.*Received"):
        expected_calibration_error(probs, labels)


def test_ece_of_one_example_and_one_class():
    assert expected_calibration_error(np.array([[1.0]]), np.array([0])) == 0.0
    assert expected_calibration_error(np.array([[0.75]]), np.array([0]), num_bins=4) == 0.25


@pytest.mark.parametrize("num_bins", [15, 4])
def test_ece_low_confidences_fill_the_first_bins(rng, num_bins):
    # 40 classes, nearly flat: confidences around 1/40 to 1/5, in the first bins.
    logits = rng.normal(size=(3000, 40)) * rng.uniform(0.0, 2.0, size=(3000, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    confidence = probs.max(axis=1)
    assert (confidence <= 1 / num_bins).any() and (confidence > 1 / num_bins).any()
    # Right in the first bin (accuracy above confidence), wrong above it: the
    # bins' gaps have opposite signs, so merging bins would change the ECE.
    predicted = probs.argmax(axis=1)
    labels = np.where(confidence <= 1 / num_bins, predicted, (predicted + 1) % 40)
    expected = _reference_ece(probs, labels, num_bins=num_bins)
    got = expected_calibration_error(probs, labels, num_bins=num_bins)
    assert math.isclose(got, expected, abs_tol=1e-12)


@pytest.mark.parametrize("labels", [[0, 2], [-1, 0], [0, 0.5]])
def test_ece_rejects_labels_that_are_not_class_ids(labels):
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])
    with pytest.raises(ValueError, match=r"class ids in \[0, 2\).*Received: labels"):
        expected_calibration_error(probs, np.array(labels))


def test_ece_one_class_labels_of_shape_n_1_are_class_ids():
    probs = np.array([[0.9], [0.7]])
    assert math.isclose(expected_calibration_error(probs, np.array([[0], [0]])), 0.2)
    with pytest.raises(ValueError, match=r"class ids in \[0, 1\)"):
        expected_calibration_error(probs, np.array([[0], [1]]))


@pytest.mark.parametrize("bad", [1.5, -0.25, np.nan, np.inf])
def test_ece_rejects_values_that_are_not_probabilities(bad):
    probs = np.array([[0.2, 0.8], [bad, 0.5]])
    with pytest.raises(ValueError, match=r"finite and in \[0, 1\]"):
        expected_calibration_error(probs, np.array([1, 0]))


def test_ece_edge_values_and_errors():
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == 0.0
    assert expected_calibration_error(perfect, np.array([1, 0])) == 1.0
    with pytest.raises(ValueError, match="logits"):
        expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="labels.shape"):
        expected_calibration_error(perfect, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="num_bins=0"):
        expected_calibration_error(perfect, np.array([0, 1]), num_bins=0)


_PYTORCH_OOD_CHECK = """
import json, sys
import numpy as np
import torch  # torch and torchvision before TensorFlow: the reverse order segfaults.
from _pytorch_ood_ref import install_torchvision_stand_in

install_torchvision_stand_in()  # pytorch-ood's metrics do not need torchvision.
from pytorch_ood.metrics import functional
from keras_isomax.detection_metrics import ood_metrics

a, b = (np.array(v) for v in json.loads(sys.stdin.read()))
outlier = torch.as_tensor(np.r_[-a, -b])
labels = torch.as_tensor(np.r_[np.zeros(len(a)), -np.ones(len(b))]).long()
print(json.dumps({
    "theirs_auroc": float(functional.auroc(outlier, labels)),
    "theirs_fpr95tpr": float(functional.fpr_at_tpr(outlier, labels, tpr=0.95)),
    "ours": ood_metrics(a, b),
    "ours_swapped": ood_metrics(-b, -a),
}))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("pytorch_ood") is None,
    reason="pytorch-ood (optional [bench] extra) is not installed",
)
def test_relation_to_pytorch_ood(rng):
    """pytorch-ood takes OOD as positive with outlier scores (higher = more OOD).

    Its AUROC equals ours; its FPR95TPR is our `fpr_at_tpr95` with the two sets
    swapped and the scores negated, not our `fpr_at_tpr95`. Runs in a fresh
    process because importing torchvision after TensorFlow crashes.
    """
    a, b = _random_case(rng, "ties")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = os.path.join(repo, "tests")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, tests]), TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.run(
        [sys.executable, "-c", _PYTORCH_OOD_CHECK],
        input=json.dumps([a.tolist(), b.tolist()]),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert abs(result["theirs_auroc"] - result["ours"]["auroc"]) <= 1e-9
    swapped = result["ours_swapped"]["fpr_at_tpr95"]
    assert abs(result["theirs_fpr95tpr"] - swapped) <= 1e-12


@pytest.mark.parametrize("tpr", [0.9, 0.95, 0.5])
def test_tpr_keys_and_their_95_aliases_hold_the_value_at_the_tpr_passed(tpr):
    rng = np.random.default_rng(11)
    in_scores = rng.normal(1.0, 1.0, 300)
    out_scores = rng.normal(0.0, 1.0, 200)
    m = ood_metrics(in_scores, out_scores, tpr=tpr)
    tnr, _ = _brute_force(in_scores, out_scores, tpr=tpr)
    assert m["tnr_at_tpr"] == pytest.approx(tnr, abs=1e-12)
    assert m["fpr_at_tpr"] == pytest.approx(1.0 - tnr, abs=1e-12)
    assert m["tnr_at_tpr95"] == m["tnr_at_tpr"]
    assert m["fpr_at_tpr95"] == m["fpr_at_tpr"]
