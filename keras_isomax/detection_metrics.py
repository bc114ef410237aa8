"""Exact detection metrics (NumPy, float64) for evaluation after training.

`ood_metrics`, `roc_curve`, `threshold_at_tpr` and `expected_calibration_error`.
The streaming Keras metric for `model.compile` is `keras_isomax.metrics.OODScore`.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from keras_isomax import _checks
from keras_isomax._typing import ArrayLike

# ------------------------------------------------------------------------------
# Exact detection metrics (NumPy, float64): in-distribution is the positive class
# and a higher score means more in-distribution. An input is accepted as
# in-distribution at threshold `t` when `score >= t`.
# ------------------------------------------------------------------------------

OOD_METRIC_NAMES = (
    "auroc",
    "aupr_in",
    "aupr_out",
    "tnr_at_tpr",
    "fpr_at_tpr",
    "detection_accuracy",
    "tnr_at_tpr95",
    "fpr_at_tpr95",
)
"""Keys of `ood_metrics`. `tnr_at_tpr95`/`fpr_at_tpr95` are aliases of
`tnr_at_tpr`/`fpr_at_tpr` (same values, at the `tpr` passed, 0.95 by default),
kept so that code written against the earlier keys keeps working."""


def _check_scores(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(keras.ops.convert_to_numpy(values) if hasattr(values, "shape") else values)
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise TypeError(
            f"`{name}` must hold real numbers (a float or integer array). "
            f"Received: {name}.dtype={array.dtype}"
        )
    if array.ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D array of scores, one per example. "
            f"Received: {name}.shape={array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"`{name}` must not be empty. Received: {name}.shape={array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        nan = np.isnan(array)
        if nan.any():
            raise ValueError(
                f"`{name}` holds {int(nan.sum())} NaN scores out of {array.size}; "
                "a NaN cannot be ranked (drop or fix those inputs first). "
                f"Received: {name} with NaN at indices "
                f"{np.flatnonzero(nan)[:5].tolist()}"
            )
    return array


def _check_pair(in_scores: ArrayLike, out_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    in_scores = _check_scores(in_scores, "in_scores")
    out_scores = _check_scores(out_scores, "out_scores")
    if in_scores.dtype != out_scores.dtype:
        raise TypeError(
            "`in_scores` and `out_scores` must have the same dtype (scores of "
            "different precision cannot be compared tie-for-tie; cast both to "
            f"one dtype). Received: in_scores.dtype={in_scores.dtype}, "
            f"out_scores.dtype={out_scores.dtype}"
        )
    return in_scores, out_scores


def _accept_counts(
    in_scores: np.ndarray, out_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative counts accepted at each distinct threshold, highest first.

    Returns `(tp, fp, values)`: `tp` and `fp` are int64 arrays of length
    `m + 1` for `m` distinct score values; entry `i > 0` counts the
    in-distribution (`tp`) and OOD (`fp`) scores `>=` the `i`-th largest
    distinct value, entry 0 is "accept none". `values` holds the `m` distinct
    scores, highest first (`values[i - 1]` is the threshold of entry `i`).
    """
    values, inverse = np.unique(np.concatenate([in_scores, out_scores]), return_inverse=True)
    n_in = in_scores.shape[0]
    m = values.shape[0]
    in_counts = np.bincount(inverse[:n_in], minlength=m)[::-1]
    out_counts = np.bincount(inverse[n_in:], minlength=m)[::-1]
    tp = np.concatenate([[0], np.cumsum(in_counts)]).astype(np.int64)
    fp = np.concatenate([[0], np.cumsum(out_counts)]).astype(np.int64)
    return tp, fp, values[::-1]


def _average_precision(tp: np.ndarray, fp: np.ndarray) -> float:
    """Average precision (sklearn's step-wise sum) from cumulative counts."""
    delta = np.diff(tp)
    keep = delta > 0
    precision = tp[1:][keep] / (tp[1:][keep] + fp[1:][keep])
    return float(np.sum(delta[keep] * precision) / tp[-1])


def ood_metrics(in_scores: ArrayLike, out_scores: ArrayLike, tpr: float = 0.95) -> dict[str, float]:
    """Exact OOD detection metrics from in-distribution and OOD scores.

    In-distribution is the positive class and a higher score means more
    in-distribution (the convention of `keras_isomax.scores`, and of the
    IsoMax+ authors' evaluation code); an input is accepted at threshold `t`
    when `score >= t`. All metrics use every score (no bucketing) and treat
    ties exactly: tied scores are accepted or rejected together.

    * `auroc`: area under the ROC curve, `P(s_in > s_out) + P(s_in = s_out) / 2`;
      equal to `sklearn.metrics.roc_auc_score` with in-distribution as label 1.
    * `aupr_in`: average precision with in-distribution as positive,
      `sum_k (R_k - R_{k-1}) P_k` over thresholds (no interpolation); equal to
      `sklearn.metrics.average_precision_score(is_in, score)`.
    * `aupr_out`: the same with OOD as positive and `-score` as its score.
    * `tnr_at_tpr`: fraction of OOD inputs rejected at the highest threshold
      that accepts at least `tpr` (95% by default) of in-distribution inputs.
    * `fpr_at_tpr`: `1 - tnr_at_tpr`, the fraction of OOD inputs accepted
      there (not pytorch-ood's `FPR95TPR`, which takes OOD as positive).
    * `detection_accuracy`: `max_t 0.5 * (TPR(t) + 1 - FPR(t))`, the best
      balanced accuracy over all thresholds (at least 0.5).

    How these relate to the IsoMax+ authors' code and to pytorch-ood:
    docs/evaluation.md.

    Args:
        in_scores: 1-D array of scores of in-distribution inputs.
        out_scores: 1-D array of scores of OOD inputs, same dtype.
        tpr: The true positive rate of `tnr_at_tpr`/`fpr_at_tpr`, in
            `(0, 1]`. Defaults to `0.95`.

    Returns:
        A dict of Python floats with keys `auroc`, `aupr_in`, `aupr_out`,
        `tnr_at_tpr`, `fpr_at_tpr` and `detection_accuracy` (fractions in
        `[0, 1]`), plus `tnr_at_tpr95`/`fpr_at_tpr95`: the same two values
        under their earlier names (at the `tpr` passed, whatever it is).

    Raises:
        ValueError: If either array is empty, not 1-D or holds NaN, or `tpr`
            is not in `(0, 1]`.
        TypeError: If the arrays are not real numbers or their dtypes differ.

    Example:

    >>> import numpy as np
    >>> from keras_isomax.detection_metrics import ood_metrics
    >>> m = ood_metrics(np.array([0.9, 0.8, 0.7]), np.array([0.75, 0.1]))
    >>> round(m["auroc"], 4)
    0.8333
    """
    tpr = _checks.check_tpr(tpr)
    in_scores, out_scores = _check_pair(in_scores, out_scores)
    tp, fp, _ = _accept_counts(in_scores, out_scores)
    n_in, n_out = int(tp[-1]), int(fp[-1])
    # Trapezoids between consecutive ROC points, in integer arithmetic.
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    auroc = twice_area / (2.0 * n_in * n_out)
    aupr_in = _average_precision(tp, fp)
    # OOD positive: accept-as-OOD when score <= t, i.e. the counts from below.
    tn = fp[-1] - fp[::-1]
    fn = tp[-1] - tp[::-1]
    aupr_out = _average_precision(tn, fn)
    first = int(np.argmax(tp / n_in >= tpr))
    fpr_at = float(fp[first] / n_out)
    detection = float(np.max(0.5 * (tp / n_in + 1.0 - fp / n_out)))
    return {
        "auroc": float(auroc),
        "aupr_in": aupr_in,
        "aupr_out": aupr_out,
        "tnr_at_tpr": 1.0 - fpr_at,
        "fpr_at_tpr": fpr_at,
        "detection_accuracy": detection,
        "tnr_at_tpr95": 1.0 - fpr_at,  # Aliases: the earlier names.
        "fpr_at_tpr95": fpr_at,
    }


def roc_curve(
    in_scores: ArrayLike, out_scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC curve (in-distribution positive), one point per distinct score.

    Args:
        in_scores: 1-D array of scores of in-distribution inputs.
        out_scores: 1-D array of scores of OOD inputs, same dtype.

    Returns:
        `(fpr, tpr, thresholds)`: float64 arrays; point `i` accepts inputs with
        `score >= thresholds[i]`. The first point `(0, 0)` has threshold
        `+inf` (accept none), the last `(1, 1)` the lowest score.

    Raises:
        ValueError: See `ood_metrics`.
        TypeError: See `ood_metrics`.
    """
    in_scores, out_scores = _check_pair(in_scores, out_scores)
    tp, fp, values = _accept_counts(in_scores, out_scores)
    thresholds = np.concatenate([[np.inf], values.astype(np.float64)])
    return fp / fp[-1], tp / tp[-1], thresholds


def threshold_at_tpr(in_scores: ArrayLike, tpr: float = 0.95, *, midpoint: bool = False) -> float:
    """The highest threshold accepting at least `tpr` of `in_scores`.

    Args:
        in_scores: 1-D array of in-distribution scores (no NaN).
        tpr: Target fraction to accept (`score >= threshold`), in `(0, 1]`.
            Defaults to `0.95`.
        midpoint: If `True`, return the midpoint between that score and the
            next lower distinct score (the same inputs are accepted, with a
            margin for recomputed scores). Defaults to `False`.

    Returns:
        The threshold, a Python float. With `midpoint=True` it is rounded to
        the nearest float32 (the precision in which the library stores and
        serves thresholds) when that value still separates the two scores;
        when the two scores are adjacent float32 numbers no float32 lies
        between them, and the accepted score itself is returned, so that a
        float32 threshold accepts the same inputs.

    Raises:
        ValueError: If `in_scores` is empty, not 1-D or holds NaN, or `tpr`
            is not in `(0, 1]`.
        TypeError: If `in_scores` is not real numbers.
    """
    tpr = _checks.check_tpr(tpr)
    in_scores = _check_scores(in_scores, "in_scores")
    values, counts = np.unique(in_scores, return_counts=True)
    values, counts = values[::-1].astype(np.float64), counts[::-1]
    accepted = np.cumsum(counts) / in_scores.shape[0]
    index = int(np.argmax(accepted >= tpr))
    threshold = float(values[index])
    if midpoint and index + 1 < values.shape[0]:
        threshold = _separating_midpoint(threshold, float(values[index + 1]))
    return threshold


def _separating_midpoint(upper: float, lower: float) -> float:
    """A threshold `t` with `lower < t <= upper`, halfway if possible, in float32 if possible.

    Thresholds are stored in float32 variables: the float64 midpoint of two
    close float32 scores can round down to the lower one, which would then be
    accepted too.
    """
    middle = 0.5 * (upper + lower)
    if not math.isfinite(middle):
        return upper
    with np.errstate(over="ignore"):
        rounded = float(np.float32(middle))
        upper_is_float32 = float(np.float32(upper)) == upper
    if lower < rounded <= upper:
        return rounded
    if upper_is_float32:
        return upper  # Adjacent float32 scores: nothing lies between them.
    return middle  # Scores finer than float32: only a float64 threshold separates them.


def expected_calibration_error(
    probabilities: ArrayLike, labels: ArrayLike, num_bins: int = 15
) -> float:
    """Expected calibration error of class probabilities (Guo et al., 2017).

    Confidences (the largest probability of each row) fall into `num_bins`
    equal-width bins `(k/B, (k+1)/B]`; the ECE is the average over bins of
    `|accuracy - mean confidence|`, weighted by the fraction of examples in
    each bin.

    Args:
        probabilities: Array `(N, C)` of class probabilities.
        labels: Array `(N,)` of integer class ids (or one-hot `(N, C)`).
        num_bins: Number of bins. Defaults to `15`.

    Returns:
        The ECE as a Python float in `[0, 1]`.

    Raises:
        ValueError: If the shapes disagree, the arrays are empty, the
            probabilities are outside `[0, 1]` or not finite, a label is not
            a class id in `[0, C)`, or `num_bins` is not a positive integer.

    Example:

    >>> import numpy as np
    >>> from keras_isomax.detection_metrics import expected_calibration_error
    >>> p = np.array([[0.9, 0.1], [0.6, 0.4]])
    >>> round(expected_calibration_error(p, np.array([0, 1])), 4)
    0.35
    """
    _checks.check_int(num_bins, "num_bins")
    probs = np.asarray(keras.ops.convert_to_numpy(probabilities), dtype=np.float64)
    labels = np.asarray(keras.ops.convert_to_numpy(labels))
    if labels.ndim == 2 and labels.shape == probs.shape and probs.shape[-1] > 1:
        labels = np.argmax(labels, axis=-1)
    labels = labels.reshape(-1)
    if probs.ndim != 2 or probs.size == 0 or probs.shape[0] != labels.shape[0]:
        raise ValueError(
            "`probabilities` must be a non-empty (N, C) array with one label per "
            f"row. Received: probabilities.shape={probs.shape}, "
            f"labels.shape={labels.shape}"
        )
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise ValueError(
            "`probabilities` must be finite and in [0, 1] (pass softmax "
            "outputs, not logits). Received: probabilities in "
            f"[{np.nanmin(probs)}, {np.nanmax(probs)}]"
        )
    classes = probs.shape[1]
    invalid = ~np.isin(labels, np.arange(classes))
    if invalid.any():
        raise ValueError(
            f"`labels` must be class ids in [0, {classes}) (or one-hot rows); "
            f"{int(invalid.sum())} of {labels.shape[0]} are not. Received: labels such as "
            f"{labels[invalid][:5].tolist()}"
        )
    confidence = probs.max(axis=-1)
    correct = np.argmax(probs, axis=-1) == labels
    # Bin k holds confidences in (k/B, (k+1)/B] (edges from `linspace`, as in
    # Guo et al.'s code); a confidence of exactly 0 joins bin 0. The last upper
    # edge is exactly 1.0, so every confidence in [0, 1] gets a bin below B.
    uppers = np.linspace(0.0, 1.0, num_bins + 1)[1:]
    bins = np.searchsorted(uppers, confidence, side="left")
    n = confidence.shape[0]
    conf_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
    acc_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=num_bins)
    return float(np.sum(np.abs(acc_sum - conf_sum)) / n)
