"""Calibration of a trained IsoMax+ model: OOD threshold and temperature.

Two post-training steps, each stored in a non-trainable weight of the model's
`IsoMaxPlusLayer`, so both travel with `model.save("m.keras")` and with an
exported SavedModel:

* `calibrate_threshold(model, in_val_data, tpr=0.95)` sets `ood_threshold` so
  that a fraction `tpr` of in-distribution validation inputs is accepted
  (`score >= threshold`) by the minimum distance score.
* `calibrate_temperature(model, val_data)` sets `temperature` to the value that
  minimises the negative log-likelihood of `softmax(logits)` on labelled
  validation data (temperature scaling, Guo et al. 2017). The minimum distance
  score is divided by the temperature, so its ranking does not change; a
  threshold that was calibrated before is rescaled to accept the same inputs.

`predict_ood(model, x)` then returns the score, the OOD decision and the
predicted class of every example.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING

import keras
import numpy as np

from keras_isomax import _checks, _runner, _serving
from keras_isomax import detection_metrics as metrics_lib
from keras_isomax import scores as scores_lib
from keras_isomax._typing import ArrayLike, Data, ScoreFunction, Verbose

if TYPE_CHECKING:
    from keras_isomax.detectors import Detector

_TEMPERATURE_RANGE = (1e-4, 1e4)


# ------------------------------------------------------------- threshold


def calibrate_threshold(
    model: keras.Model,
    in_val_data: Data,
    tpr: float = 0.95,
    *,
    batch_size: int = 256,
    detector: Detector | str | None = None,
    verbose: Verbose = "auto",
) -> float:
    """Sets the layer's `ood_threshold` so that `tpr` of `in_val_data` is accepted.

    The threshold applies to the minimum distance score (the largest logit of
    the `IsoMaxPlusLayer`); an input is accepted as in-distribution when
    `score >= ood_threshold`. It is placed halfway between the smallest accepted
    validation score and the next lower one, so the accepted fraction on
    `in_val_data` is the smallest one `>= tpr` (exactly `tpr` up to ties and
    rounding of `tpr * N`), with a margin against rounding noise when scores are
    recomputed. Use held-out in-distribution data, not training data: on the
    training set features sit closer to their prototypes.

    Args:
        model: A trained Keras model with one `IsoMaxPlusLayer`.
        in_val_data: In-distribution validation inputs: an array, a tuple
            `(x, y)` (labels are ignored) or a batched `tf.data.Dataset`.
        tpr: Target fraction of in-distribution inputs to accept, in `(0, 1]`.
            Defaults to `0.95`.
        batch_size: Batch size for arrays. Defaults to `256`.
        detector: A fitted `keras_isomax.detectors.Detector` (or a logit
            detector's name, e.g. `"energy"`): its score is calibrated and the
            threshold stored in its `threshold` variable (the model needs no
            `IsoMaxPlusLayer`: this is how a SoftMax model is calibrated).
            Defaults to `None`.
        verbose: `"auto"`, 0, 1 or 2, as in `keras.Model.predict`. Defaults
            to `"auto"`.

    Returns:
        The threshold (a Python float), also stored in the layer (or detector).

    Raises:
        ValueError: If `tpr` is not in `(0, 1]`, the data is empty or yields
            NaN scores, or the model has no single `IsoMaxPlusLayer`.

    Example:

    >>> import numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer
    >>> from keras_isomax.calibration import calibrate_threshold
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    >>> x = np.random.default_rng(0).normal(size=(1000, 4)).astype("float32")
    >>> t = calibrate_threshold(model, x, tpr=0.9, verbose=0)
    >>> scores = model.predict(x, verbose=0).max(axis=-1)
    >>> float(np.mean(scores >= t))
    0.9
    """
    tpr = _checks.check_tpr(tpr)
    batch_size = _checks.check_int(batch_size, "batch_size")
    if detector is not None:
        return _calibrate_detector(model, in_val_data, tpr, detector, verbose)
    layer = _runner.check_isomax(model, "`calibrate_threshold` without `detector=`")
    run = _runner.runner_for(model).collect(
        in_val_data,
        batch_size=batch_size,
        arg_name="in_val_data",
        verbose=verbose,
        stage="calibrate_threshold",
    )
    scores = run.logits.max(axis=-1)  # The minimum distance score.
    scores = np.where(run.nonfinite, np.nan, scores)  # NaN/Inf inputs.
    bad = np.isnan(scores)
    if bad.any():
        raise ValueError(
            f"The model gives NaN scores on {int(bad.sum())} of {bad.size} examples "
            "of `in_val_data` (NaN or Inf inputs?); remove them before calibrating. "
            f"Received: in_val_data with NaN scores at {np.flatnonzero(bad)[:5].tolist()}"
        )
    threshold = metrics_lib.threshold_at_tpr(scores, tpr, midpoint=True)
    layer.ood_threshold.assign(threshold)
    return float(layer.ood_threshold.numpy())


def _calibrate_detector(
    model: keras.Model, in_val_data: Data, tpr: float, detector: Detector | str, verbose: Verbose
) -> float:
    from keras_isomax import detectors as detectors_lib

    detector = detectors_lib.get(detector)
    scores, _ = detector.score_and_logits(
        in_val_data, model=model, arg_name="in_val_data", verbose=verbose
    )
    bad = np.isnan(scores)
    if bad.any():
        raise ValueError(
            f"The detector gives NaN scores on {int(bad.sum())} of {bad.size} examples "
            "of `in_val_data` (NaN or Inf inputs?); remove them before calibrating. "
            f"Received: in_val_data with NaN scores at {np.flatnonzero(bad)[:5].tolist()}"
        )
    detector.threshold.assign(metrics_lib.threshold_at_tpr(scores, tpr, midpoint=True))
    return float(detector.threshold.numpy())


# ----------------------------------------------------------- temperature


@dataclasses.dataclass(frozen=True)
class TemperatureCalibration:
    """Result of `calibrate_temperature` (NLL and ECE in nats / fractions).

    Attributes:
        temperature: The fitted temperature, now stored in the layer.
        previous_temperature: The layer's temperature before calibration.
        nll_before: Mean negative log-likelihood of `softmax(logits)` before.
        nll_after: The same after calibration.
        ece_before: Expected calibration error (15 equal-width bins) before.
        ece_after: The same after calibration.
        accuracy: Accuracy on the validation data (unchanged by temperature).
        num_examples: Number of validation examples.
        threshold_rescaled: Whether a calibrated `ood_threshold` was rescaled.
    """

    temperature: float
    previous_temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    accuracy: float
    num_examples: int
    threshold_rescaled: bool = False

    def __str__(self) -> str:
        return (
            f"temperature {self.previous_temperature:.4g} -> {self.temperature:.4g} "
            f"on {self.num_examples} examples (accuracy {100 * self.accuracy:.2f}%): "
            f"NLL {self.nll_before:.4f} -> {self.nll_after:.4f}, "
            f"ECE {100 * self.ece_before:.2f}% -> {100 * self.ece_after:.2f}%"
        )


def calibrate_temperature(
    model: keras.Model,
    val_data: Data,
    *,
    batch_size: int = 256,
    num_bins: int = 15,
    verbose: Verbose = "auto",
) -> TemperatureCalibration:
    """Fits the layer's `temperature` by minimising the NLL on `val_data`.

    IsoMax+ trains `softmax(entropic_scale * logits)` but, as in the paper,
    predicts with `softmax(logits)`, whose probabilities are deliberately
    soft. Temperature scaling finds the `T` for which `softmax(logits)`, with
    `logits = -|s| * distance / T`, has the lowest negative log-likelihood on
    labelled validation data. The NLL is convex in `1/T`; it is minimised
    exactly (bisection on its derivative, float64) over `T` in `[1e-4, 1e4]`.

    The temperature divides every logit by the same positive number, so the
    predicted classes and the ranking of the minimum distance score do not
    change. If the layer's `ood_threshold` is calibrated, it is rescaled by
    `T_old / T_new` so that it accepts the same inputs as before.

    Args:
        model: A trained Keras model with one `IsoMaxPlusLayer`.
        val_data: Labelled in-distribution validation data: a tuple `(x, y)` of
            arrays or a batched `tf.data.Dataset` yielding `(x, y)`; `y` holds
            class ids or one-hot rows.
        batch_size: Batch size for arrays. Defaults to `256`.
        num_bins: Number of equal-width confidence bins of the expected
            calibration error. Defaults to `15`.
        verbose: `"auto"`, 0, 1 or 2, as in `keras.Model.predict`. Defaults
            to `"auto"`.

    Returns:
        A `TemperatureCalibration` with the new temperature and the NLL and
        ECE before and after (print it for a one-line report).

    Raises:
        ValueError: If `val_data` has no labels, is empty, has labels out of
            range, or the model has no single `IsoMaxPlusLayer`.

    Example:

    >>> import numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer
    >>> from keras_isomax.calibration import calibrate_temperature
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    >>> prototypes = model.layers[-1].prototypes.numpy()
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 300)
    >>> x = (prototypes[y] + 0.3 * rng.normal(size=(300, 4))).astype("float32")
    >>> result = calibrate_temperature(model, (x, y), verbose=0)
    >>> bool(result.temperature < 1 and result.nll_after < result.nll_before)
    True
    """
    layer = _runner.check_isomax(model, "`calibrate_temperature`", detector_hint=False)
    batch_size = _checks.check_int(batch_size, "batch_size")
    run = _runner.runner_for(model).collect(
        val_data,
        batch_size=batch_size,
        arg_name="val_data",
        with_labels=True,
        label_classes=layer.num_classes,
        verbose=verbose,
        stage="calibrate_temperature",
    )
    logits, labels = run.logits, run.labels
    if labels is None:
        raise ValueError(
            "`val_data` must hold labels: pass `(x, y)` or a dataset yielding "
            "`(x, y)`. Received: val_data without labels"
        )
    # Labels were checked against the layer's classes while collecting. An input
    # holding NaN/Inf is refused even where the backbone maps it to finite logits.
    bad = run.nonfinite | ~np.all(np.isfinite(logits), axis=-1)
    if bad.any():
        raise ValueError(
            f"The model gives non-finite logits on {int(bad.sum())} of {bad.size} "
            "examples of `val_data` (NaN or Inf inputs?); remove them before calibrating. "
            f"Received: val_data with NaN/Inf at {np.flatnonzero(bad)[:5].tolist()}"
        )
    old_t = float(layer.temperature.numpy())
    base = logits.astype(np.float64) * old_t  # The logits at temperature 1.
    beta = _fit_inverse_temperature(base, labels)
    new_t = 1.0 / beta
    low, high = _TEMPERATURE_RANGE
    if new_t <= low * (1 + 1e-9) or new_t >= high * (1 - 1e-9):
        warnings.warn(
            f"The fitted temperature {new_t:.3g} is at the end of the search range "
            f"{_TEMPERATURE_RANGE}: the NLL keeps falling (e.g. validation data "
            "classified perfectly, or a degenerate model). Check `val_data`.",
            stacklevel=2,
        )
    nll_before = _nll(base / old_t, labels)
    nll_after = _nll(base / new_t, labels)
    ece_before = metrics_lib.expected_calibration_error(
        _softmax(base / old_t), labels, num_bins=num_bins
    )
    ece_after = metrics_lib.expected_calibration_error(
        _softmax(base / new_t), labels, num_bins=num_bins
    )
    rescaled = False
    if layer.is_calibrated:
        threshold = float(layer.ood_threshold.numpy())
        layer.ood_threshold.assign(threshold * old_t / new_t)
        rescaled = True
    layer.temperature.assign(new_t)
    return TemperatureCalibration(
        temperature=float(layer.temperature.numpy()),
        previous_temperature=old_t,
        nll_before=nll_before,
        nll_after=nll_after,
        ece_before=ece_before,
        ece_after=ece_after,
        accuracy=float(np.mean(np.argmax(base, axis=-1) == labels)),
        num_examples=int(labels.shape[0]),
        threshold_rescaled=rescaled,
    )


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(z))


def _nll(z: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.take_along_axis(_log_softmax(z), labels[:, None], -1)))


def _nll_slope(beta: float, z: np.ndarray, labels: np.ndarray) -> float:
    """d/d(beta) of mean NLL of softmax(beta * z): E_p[z] - z_y (non-decreasing)."""
    p = _softmax(beta * z)
    expected = np.sum(p * z, axis=-1)
    picked = np.take_along_axis(z, labels[:, None], -1)[:, 0]
    return float(np.mean(expected - picked))


def _fit_inverse_temperature(z: np.ndarray, labels: np.ndarray, iterations: int = 200) -> float:
    """Minimiser of the convex mean NLL over beta = 1/T in the allowed range."""
    low, high = (
        math.log(1.0 / _TEMPERATURE_RANGE[1]),
        math.log(1.0 / _TEMPERATURE_RANGE[0]),
    )
    if _nll_slope(math.exp(low), z, labels) >= 0:
        return math.exp(low)
    if _nll_slope(math.exp(high), z, labels) <= 0:
        return math.exp(high)
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        if _nll_slope(math.exp(mid), z, labels) > 0:
            high = mid
        else:
            low = mid
        if high - low < 1e-12:
            break
    return math.exp(0.5 * (low + high))


# ------------------------------------------------------------ prediction


def predict_ood(
    model: keras.Model,
    x: Data,
    *,
    threshold: float | None = None,
    score: str | ScoreFunction = "minimum_distance",
    batch_size: int = 256,
    detector: Detector | str | None = None,
    verbose: Verbose = "auto",
) -> dict[str, np.ndarray]:
    """OOD score, decision and predicted class for every input.

    An input is accepted as in-distribution when `score >= threshold`, so
    `is_ood = not (score >= threshold)`: a NaN score counts as OOD.

    Args:
        model: A Keras model. With `threshold=None` and no `detector` it must
            contain a calibrated `IsoMaxPlusLayer` (see `calibrate_threshold`),
            whose logits are scored. A SoftMax classifier works with a
            calibrated `detector` or an explicit `threshold`: its pre-softmax
            logits are scored.
        x: Inputs: an array, a tuple `(x, ...)` or a batched dataset.
        threshold: Decision threshold on `score`. Defaults to `None`, which
            uses the layer's calibrated `ood_threshold` (minimum distance score
            only).
        score: Name of a score in `keras_isomax.scores` or a callable
            `logits -> scores`. Defaults to `"minimum_distance"`.
        batch_size: Batch size for arrays. Defaults to `256`.
        detector: A fitted `keras_isomax.detectors.Detector` whose score is
            used instead of `score`; `threshold=None` then uses the
            detector's calibrated `threshold`. Defaults to `None`.
        verbose: `"auto"`, 0, 1 or 2, as in `keras.Model.predict`. Defaults
            to `"auto"`.

    Returns:
        A dict of NumPy arrays of length `N`: `"score"` (float), `"is_ood"`
        (bool) and `"class"` (int64: the first index of the largest logit, -1 where
        the logits hold NaN; whatever the decision).
        An input holding any NaN or Inf gets score NaN, `is_ood` True and
        class -1, whatever the model computes for it (the library checks the
        inputs itself; some backbones turn NaN into finite features).

    Raises:
        ValueError: If `threshold` is `None` and the model's layer is not
            calibrated or `score` is not the minimum distance score, or if
            `threshold` is NaN.

    Example:

    >>> import numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer
    >>> from keras_isomax.calibration import calibrate_threshold, predict_ood
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    >>> x = np.random.default_rng(0).normal(size=(100, 4)).astype("float32")
    >>> _ = calibrate_threshold(model, x, verbose=0)
    >>> out = predict_ood(model, x[:5], verbose=0)
    >>> sorted(out)
    ['class', 'is_ood', 'score']
    """
    if threshold is not None:
        threshold = _checks.parse_threshold(threshold)
    batch_size = _checks.check_int(batch_size, "batch_size")
    if detector is not None:
        return _predict_with_detector(model, x, threshold, detector, verbose)
    score_fn = scores_lib.get(score)
    if threshold is None:
        if score_fn is not scores_lib.minimum_distance_score:
            raise ValueError(
                "The layer's `ood_threshold` applies to the minimum distance "
                "score; pass `threshold=` for another score. "
                f"Received: score={score!r}, threshold=None"
            )
        layer = _runner.check_isomax(model, "`predict_ood` without `threshold=` or `detector=`")
        if not layer.is_calibrated:
            raise ValueError(
                f"IsoMaxPlusLayer '{layer.name}' has no calibrated `ood_threshold`; "
                "call `calibrate_threshold(model, in_val_data)` first or pass "
                "`threshold=`. Received: threshold=None"
            )
        threshold = float(layer.ood_threshold.numpy())
    run = _runner.runner_for(model).collect(
        x, batch_size=batch_size, arg_name="x", verbose=verbose, stage="predict_ood"
    )
    logits, nonfinite = run.logits, run.nonfinite
    values = np.asarray(keras.ops.convert_to_numpy(score_fn(logits)))
    if values.shape != nonfinite.shape:
        raise ValueError(
            f"`score` must map logits (N, C) to one value per example, shape "
            f"({len(nonfinite)},). Received: score output of shape {values.shape}"
        )
    with np.errstate(invalid="ignore"):
        is_ood = ~(values >= threshold)
    # The library's one non-finite rule (the SavedModel and edge files use it too).
    out = _serving.apply_nonfinite_rule(
        nonfinite,
        score=values,
        is_ood=is_ood,
        class_id=_class_ids(logits),
    )
    out = {key: np.asarray(keras.ops.convert_to_numpy(value)) for key, value in out.items()}
    return {
        "score": out["score"],
        "is_ood": out["is_ood"].astype(bool),
        "class": out["class_id"].astype(np.int64),
    }


def _predict_with_detector(
    model: keras.Model,
    x: Data,
    threshold: float | None,
    detector: Detector | str,
    verbose: Verbose,
) -> dict[str, np.ndarray]:
    from keras_isomax import detectors as detectors_lib

    detector = detectors_lib.get(detector)
    if threshold is None:
        if not detector.is_calibrated:
            raise ValueError(
                f"Detector {detector.name!r} has no calibrated `threshold`; call "
                "`calibrate_threshold(model, in_val_data, detector=det)` first or pass "
                "`threshold=`. Received: threshold=None"
            )
        threshold = float(keras.ops.convert_to_numpy(detector.threshold))
    values, logits = detector.score_and_logits(x, model=model, verbose=verbose)
    # NaN scores come from inputs holding NaN/Inf (the detector's feature pass
    # applies the library's non-finite rule) or from non-finite features.
    nonfinite = np.isnan(values)
    with np.errstate(invalid="ignore"):
        is_ood = ~(values >= threshold)
    classes = _class_ids(logits)
    return {
        "score": values,
        "is_ood": is_ood,
        "class": np.where(nonfinite, _serving.NONFINITE_CLASS_ID, classes),
    }


def _class_ids(logits: ArrayLike) -> np.ndarray:
    """The exports' class rule (first index of the maximum, -1 for rows with NaN)."""
    return np.asarray(keras.ops.convert_to_numpy(_serving.class_ids(logits))).astype(np.int64)
