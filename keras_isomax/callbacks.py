"""Keras callbacks: OOD detection quality watched during `model.fit`.

`OODMonitor` scores held-out in-distribution data and OOD sets at the end of
an epoch and puts the exact detection metrics into the epoch's `logs`, where
`EarlyStopping`, `ModelCheckpoint`, `CSVLogger`, `TensorBoard`, `History` and
the progress bar read them like `val_accuracy`; optionally it writes the
metrics and the score histograms as TensorBoard summaries.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from keras_isomax import scores as scores_lib
from keras_isomax._typing import Data, ScoreFunction
from keras_isomax.detection_metrics import threshold_at_tpr
from keras_isomax.detectors import Detector
from keras_isomax.evaluation import evaluate_ood

__all__ = ["OODMonitor"]

PREFIX = "val_ood"
"""Prefix of every key `OODMonitor` writes into the logs."""

IN_DISTRIBUTION = "in_distribution"
"""Name of the in-distribution histogram (`val_ood_scores/in_distribution`)."""

RUN_NAME = "ood"
"""Subdirectory of `log_dir` that holds `OODMonitor`'s event files."""

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_MODEL_KEY = "model"


class OODMonitor(keras.callbacks.Callback):
    """Scores held-out and OOD data during `fit`; logs AUROC, TNR and the threshold.

    Every `every` epochs (and after the last epoch) the model scores
    `validation_data` (in-distribution, held out from training) and each OOD
    set with `score`, and the exact metrics of
    `keras_isomax.detection_metrics.ood_metrics` (in-distribution positive,
    higher score = more in-distribution, ties counted exactly) are added to the
    epoch's `logs`:

    * `val_ood_auroc`: the AUROC averaged over the OOD sets;
    * `val_ood_auroc_<name>`: the AUROC against OOD set `<name>`;
    * `val_ood_tnr_<name>`: the fraction of set `<name>` rejected at the
      threshold that accepts `tpr` of `validation_data` (TNR at TPR `tpr`);
    * `val_ood_threshold`: that threshold (the highest score accepting at
      least `tpr` of `validation_data`, as `calibrate_threshold` computes it).

    All are fractions (AUROC 0.5 = chance). With a list of scores the first
    one writes the keys above and each further score `s` writes the same keys
    with `val_ood_<s>_` in place of `val_ood_` (`val_ood_knn_auroc`,
    `val_ood_knn_auroc_digits`, ...).

    **Order of callbacks.** Keras calls the callbacks of a `fit` in the order
    of the `callbacks` list, passing one shared `logs` dict along, and appends
    its `History` and progress bar after them. Put `OODMonitor` *before*
    `EarlyStopping`, `ModelCheckpoint`, `CSVLogger`, `TensorBoard` or
    `ReduceLROnPlateau` that should see its keys; `History` (the result of
    `fit`) and the progress bar always see them.

    **Epochs without scoring.** With `every > 1`, the epochs scored are those
    whose 0-based index is a multiple of `every`, plus the first and the last
    epoch of each `fit` (so `CSVLogger` picks up the columns from its first
    row and the final model is always measured). Like with Keras'
    `validation_freq`, the other epochs carry no `val_ood_*` keys (`CSVLogger`
    writes `NA`; an `EarlyStopping` on them warns that the key is missing).

    **TensorBoard.** With `log_dir` (a directory, or a
    `keras.callbacks.TensorBoard` callback whose directory to use), the same
    values are written as scalar summaries with the same names as the keys,
    and the scores as histograms `val_ood_scores/in_distribution` and
    `val_ood_scores/<name>` (further scores: `val_ood_<s>_scores/...`), one
    per scored epoch (the step is the 0-based epoch, as the `TensorBoard`
    callback's epoch summaries), in the run `<log_dir>/ood`. Keras gives a
    callback no handle on the other callbacks of the same `fit`, so the
    `TensorBoard` callback's directory cannot be found without being passed:
    give the callback itself as `log_dir`. Writing needs the `tensorboard`
    package (`pip install keras-isomax[tensorboard]`), not TensorFlow: it works
    on every backend. A `log_dir` with a URL scheme (`gs://...`) is written
    through TensorFlow's file systems.

    **Fitted detectors** (`KNN`, `Mahalanobis`, `ViM`) read the model's
    features, which change as it trains: with `fit_data`, they are fitted on it
    at the first scored epoch and refitted every `refit_every` epochs (at every
    scored epoch by default); without it they must be fitted already and are
    used as they are (fitted once, on the features of the time). Logit scores
    and logit detectors need no fitting.

    **tf.distribute.** Only the chief scores and writes (the process whose
    strategy `should_checkpoint`, i.e. every process but the non-chief workers
    of a multi-worker strategy); a single-process `MirroredStrategy` is its
    own chief. Under a multi-worker strategy the other workers get no
    `val_ood_*` keys: do not stop or checkpoint on them there.

    Scoring runs the model over all the data each scored epoch (one pass per
    data set, plus one per fitted detector): keep the sets small (a few
    thousand examples) or raise `every`.

    Args:
        validation_data: Held-out in-distribution data: an array `x`, a tuple
            `(x,)` or `(x, y)` of arrays, or a batched `tf.data.Dataset` (or
            other iterable of batches) yielding them. Labels, when given, must
            be class ids of the model's classes (they are not needed).
        ood_data: A dict name -> OOD data (arrays, `(x, ...)` tuples or
            batched datasets; labels are ignored), or one such data set, named
            `"ood"`. Names may hold letters, digits, `_`, `.` and `-`.
        score: A score name of `keras_isomax.scores` (`"minimum_distance"`,
            `"entropic"`, `"max_probability"`, `"max_logit"`, `"energy"`), a
            callable `logits -> scores`, a `keras_isomax.detectors.Detector`,
            or a list of them (the first one writes the unprefixed keys).
            Defaults to `"minimum_distance"`.
        every: Score every `every` epochs (0-based epochs 0, every,
            2 * every, ..., plus the first and last of the `fit`). Defaults to
            `1`.
        tpr: True positive rate of the TNR and of the threshold, in `(0, 1]`.
            Defaults to `0.95`.
        log_dir: Directory for TensorBoard summaries, or a
            `keras.callbacks.TensorBoard` callback (its `log_dir` is used), or
            `None` for logs only. Defaults to `None`.
        fit_data: Labelled in-distribution training data `(x, y)` (or a
            batched dataset of them) to fit the feature detectors of `score`
            on. Defaults to `None` (detectors are used as they are).
        refit_every: With `fit_data`, refit the feature detectors when at
            least this many epochs have passed since their last fit. Defaults
            to `1` (at every scored epoch).
        histogram_bins: Buckets of each score histogram. Defaults to `30`.
        batch_size: Batch size for array data. Defaults to `256`.

    Raises:
        ValueError: If an argument is invalid: empty data, data whose inputs
            and labels differ in length or whose example shape is not the
            model's (checked when training starts), an unknown score, a bad
            OOD set name, a feature detector that is neither fitted nor given
            `fit_data`, `every`/`refit_every`/`histogram_bins` < 1, `tpr` not
            in `(0, 1]`.
        TypeError: If `ood_data`, `score` or `log_dir` has the wrong type.
        ImportError: If `log_dir` is set and the `tensorboard` package is not
            installed.

    Example:

    >>> import numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss
    >>> from keras_isomax.callbacks import OODMonitor
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(256, 8)).astype("float32")
    >>> y = (x[:, 0] > 0).astype("int64")
    >>> noise = rng.uniform(-4, 4, size=(128, 8)).astype("float32")
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), IsoMaxPlusLayer(2)])
    >>> model.compile("adam", IsoMaxPlusLoss())
    >>> monitor = OODMonitor((x[:64], y[:64]), {"noise": noise})
    >>> stop = keras.callbacks.EarlyStopping(monitor="val_ood_auroc", mode="max", patience=2)
    >>> history = model.fit(x[64:], y[64:], epochs=2, callbacks=[monitor, stop], verbose=0)
    >>> sorted(k for k in history.history if k.startswith("val_ood"))
    ['val_ood_auroc', 'val_ood_auroc_noise', 'val_ood_threshold', 'val_ood_tnr_noise']
    """

    def __init__(
        self,
        validation_data: Data,
        ood_data: Mapping[str, Data] | Data,
        score: str | ScoreFunction | Detector | Sequence[str | ScoreFunction | Detector] = (
            "minimum_distance"
        ),
        every: int = 1,
        tpr: float = 0.95,
        log_dir: str | os.PathLike | keras.callbacks.TensorBoard | None = None,
        *,
        fit_data: Data | None = None,
        refit_every: int = 1,
        histogram_bins: int = 30,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.validation_data = validation_data
        self.ood_data = ood_data
        self.score = score
        self.every = _check_count(every, "every")
        self.tpr = _check_tpr(tpr)
        self.log_dir = log_dir
        self.fit_data = fit_data
        self.refit_every = _check_count(refit_every, "refit_every")
        self.histogram_bins = _check_count(histogram_bins, "histogram_bins")
        self.batch_size = _check_count(batch_size, "batch_size")

        self._validation = _check_data(validation_data, "validation_data", labels="optional")
        self._ood = _ood_dict(ood_data)
        self._scores = _score_list(score)
        self._feature_detectors = [
            item for _, item in self._scores if isinstance(item, Detector) and _needs_fit(item)
        ]
        if fit_data is not None:
            _check_data(fit_data, "fit_data", labels="required")
        elif self._feature_detectors:
            unfitted = [det.name for det in self._feature_detectors if not det.is_fitted]
            if unfitted:
                raise ValueError(
                    f"The detectors {unfitted} read the model's features and are not fitted: "
                    "pass `fit_data=(x_train, y_train)` to fit (and refit) them during "
                    "training, or fit them first. Received: fit_data=None"
                )
        self._log_dir = _resolve_log_dir(log_dir)
        if self._log_dir is not None:
            _EventFile.check_available(self._log_dir)
        self._writer: _EventFile | None = None
        self._scored_in_this_fit = False
        self._last_fit: int | None = None
        self._epochs: int | None = None
        self.last_logs: dict[str, float] = {}
        """The `val_ood_*` values of the last scored epoch."""

    # -- Keras hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        self._epochs = (self.params or {}).get("epochs")
        self._last_fit = None
        self._scored_in_this_fit = False
        _check_shapes(self.model, self._validation, "validation_data")
        for name, data in self._ood.items():
            _check_shapes(
                self.model, _check_data(data, f"ood_data[{name!r}]"), f"ood_data[{name!r}]"
            )
        if self._log_dir is not None and self._is_chief():
            self._writer = _EventFile(_join(self._log_dir, RUN_NAME))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self._due(epoch) or not self._is_chief():
            return
        values, histograms = self.evaluate(epoch)
        self._scored_in_this_fit = True
        if logs is not None:
            logs.update(values)
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.scalar(tag, value, epoch)
            for tag, data in histograms.items():
                self._writer.histogram(tag, data, epoch, self.histogram_bins)
            self._writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- scoring
    def evaluate(self, epoch: int | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Scores the data now; returns `(values, histograms)`.

        Args:
            epoch: The 0-based epoch, for refitting detectors and error
                messages. Defaults to `None` (refit any due detector).

        Returns:
            `values`: dict key -> float, the keys written into the logs;
            `histograms`: dict TensorBoard tag -> float64 array of scores.

        Raises:
            ValueError: If the data cannot be scored (empty, wrong shape, NaN
                scores); the message names the argument and the epoch.
        """
        when = "" if epoch is None else f" at the end of epoch {epoch + 1}"
        self._refit_detectors(epoch)
        try:
            result = evaluate_ood(
                {_MODEL_KEY: self.model},
                self.validation_data,
                self._ood,
                score=[item for _, item in self._scores],
                batch_size=self.batch_size,
                tpr=self.tpr,
                **_quiet(evaluate_ood),
            )
        except ValueError as error:
            raise ValueError(
                f"OODMonitor could not score `validation_data` (evaluate_ood's `in_data`) or "
                f"`ood_data`{when}: {error}"
            ) from error
        values: dict[str, float] = {}
        histograms: dict[str, np.ndarray] = {}
        for index, (name, _) in enumerate(self._scores):
            key = PREFIX if index == 0 else f"{PREFIX}_{name}"
            in_scores, ood_scores = result.scores(_MODEL_KEY, name)
            rows = {row["ood"]: row for row in result if row["score"] == name}
            aurocs = [rows[ood]["auroc"] for ood in self._ood]
            values[f"{key}_auroc"] = float(np.mean(aurocs))
            for ood in self._ood:
                values[f"{key}_auroc_{ood}"] = float(rows[ood]["auroc"])
                values[f"{key}_tnr_{ood}"] = float(rows[ood]["tnr_at_tpr"])
            values[f"{key}_threshold"] = float(threshold_at_tpr(in_scores, self.tpr))
            histograms[f"{key}_scores/{IN_DISTRIBUTION}"] = np.asarray(in_scores, np.float64)
            for ood, out in ood_scores.items():
                histograms[f"{key}_scores/{ood}"] = np.asarray(out, np.float64)
        self.last_logs = dict(values)
        return values, histograms

    def _due(self, epoch: int) -> bool:
        last = self._epochs is not None and epoch == self._epochs - 1
        return epoch % self.every == 0 or last or not self._scored_in_this_fit

    def _refit_detectors(self, epoch: int | None) -> None:
        if self.fit_data is None or not self._feature_detectors:
            return
        if (
            self._last_fit is not None
            and epoch is not None
            and epoch - self._last_fit < self.refit_every
        ):
            return
        for detector in self._feature_detectors:
            detector.fit(self.model, self.fit_data, **_quiet(detector.fit))
        self._last_fit = epoch

    def _is_chief(self) -> bool:
        strategy = getattr(self.model, "distribute_strategy", None)
        extended = getattr(strategy, "extended", None)
        return bool(getattr(extended, "should_checkpoint", True))


# ----------------------------------------------------------------------------- checks


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    return int(value)


def _check_tpr(tpr: Any) -> float:
    if isinstance(tpr, bool) or not isinstance(tpr, int | float | np.number):
        raise ValueError(f"`tpr` must be a number in (0, 1]. Received: tpr={tpr!r}")
    if not (math.isfinite(float(tpr)) and 0.0 < float(tpr) <= 1.0):
        raise ValueError(f"`tpr` must be a number in (0, 1]. Received: tpr={tpr!r}")
    return float(tpr)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, type)


def _check_data(data: Any, name: str, labels: str = "ignored") -> Any:
    """In-memory data: non-empty, inputs and labels of one length. Datasets pass."""
    if data is None:
        raise ValueError(f"`{name}` must hold data. Received: {name}=None")
    if isinstance(data, str | bytes | Mapping):
        raise TypeError(
            f"`{name}` must be an array, a tuple `(x, y)` of arrays or a batched dataset. "
            f"Received: {name} of type {type(data).__name__}"
        )
    parts = tuple(data) if isinstance(data, tuple | list) else (data,)
    if not parts or not all(_is_array(p) for p in parts):
        if isinstance(data, tuple | list):
            raise TypeError(
                f"`{name}` as a tuple must hold arrays `(x,)`, `(x, y)` or `(x, y, w)`. "
                f"Received: {name} = tuple of {[type(p).__name__ for p in parts]}"
            )
        return data  # A dataset or other iterable of batches: checked when scored.
    if len(parts) > 3:
        raise ValueError(
            f"`{name}` must be `x`, `(x,)`, `(x, y)` or `(x, y, w)`. "
            f"Received: a tuple of {len(parts)} arrays"
        )
    shapes = [tuple(p.shape) for p in parts]
    if any(len(s) == 0 for s in shapes):
        raise ValueError(
            f"`{name}` must hold batches of examples (a leading example axis). "
            f"Received: {name} shapes {shapes}"
        )
    rows = [s[0] for s in shapes]
    if rows[0] == 0:
        raise ValueError(f"`{name}` holds no examples. Received: {name}[0].shape={shapes[0]}")
    if len(set(rows)) > 1:
        raise ValueError(
            f"`{name}` must have as many labels (and weights) as inputs. "
            f"Received: {name} with lengths {rows}"
        )
    if labels == "required" and len(parts) < 2:
        raise ValueError(
            f"`{name}` must hold labels, `(x, y)`: detectors such as Mahalanobis fit per "
            f"class. Received: {name} with inputs only, shape {shapes[0]}"
        )
    return data


def _check_shapes(model: Any, data: Any, name: str) -> None:
    """The example shape of in-memory `data` against the model's input shape."""
    parts = tuple(data) if isinstance(data, tuple | list) else (data,)
    if not parts or not _is_array(parts[0]):
        return
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return
    if not inputs or len(inputs) != 1:
        return
    expected = tuple(inputs[0].shape)[1:]
    got = tuple(parts[0].shape)[1:]
    if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got)):
        raise ValueError(
            f"`{name}` holds examples of shape {got}, but the model takes inputs of shape "
            f"{expected}. Received: {name} of shape {tuple(parts[0].shape)}"
        )


def _ood_dict(ood_data: Any) -> dict[str, Any]:
    if isinstance(ood_data, Mapping):
        if not ood_data:
            raise ValueError("`ood_data` must name at least one OOD set. Received: ood_data={}")
        sets = dict(ood_data)
    else:
        sets = {"ood": ood_data}
    for name, data in sets.items():
        if not isinstance(name, str) or not _NAME.match(name) or name == IN_DISTRIBUTION:
            raise ValueError(
                "OOD set names become log keys and TensorBoard tags: letters, digits, "
                f"'_', '.', '-' only, and not {IN_DISTRIBUTION!r}. Received: ood_data key {name!r}"
            )
        _check_data(data, f"ood_data[{name!r}]")
    return sets


def _needs_fit(detector: Detector) -> bool:
    return getattr(detector, "input_kind", "features") != "logits"


def _score_list(score: Any) -> list[tuple[str, Any]]:
    items = list(score) if isinstance(score, list | tuple) else [score]
    if not items:
        raise ValueError("`score` must name at least one score. Received: score=[]")
    named = []
    for item in items:
        if isinstance(item, Detector):
            name = item.name
        elif isinstance(item, str) or callable(item):
            try:
                fn = scores_lib.get(item)
            except ValueError as error:
                raise ValueError(f"Unknown `score`: {error}") from None
            name = scores_lib.name_of(fn)
        else:
            raise TypeError(
                "`score` must be a score name, a callable, a Detector or a list of them. "
                f"Received: score={item!r}"
            )
        if not _NAME.match(name):
            raise ValueError(
                "Score names become log keys: give the function a name (`def`), not a lambda. "
                f"Received: score named {name!r}"
            )
        named.append((name, item))
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"Each score must have its own name. Received: score names {names}")
    return named


def _quiet(fn: Callable) -> dict[str, Any]:
    """`{"verbose": 0}` for library functions that take it: no progress output inside fit."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {"verbose": 0} if "verbose" in parameters else {}


# -------------------------------------------------------------------------- TensorBoard


def _resolve_log_dir(log_dir: Any) -> str | None:
    if log_dir is None:
        return None
    if isinstance(log_dir, keras.callbacks.TensorBoard):
        log_dir = log_dir.log_dir
    if not isinstance(log_dir, str | os.PathLike):
        raise TypeError(
            "`log_dir` must be a directory path or a `keras.callbacks.TensorBoard`. "
            f"Received: log_dir={log_dir!r}"
        )
    path = os.fspath(log_dir)
    if not path:
        raise ValueError("`log_dir` must not be empty. Received: log_dir=''")
    return path


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)


class _EventFile:
    """One TensorBoard event file, written with the `tensorboard` package alone.

    Local directories are written with plain Python files (no TensorFlow, so
    it works on every backend); a URL (`gs://...`) through TensorFlow's file
    systems.
    """

    _count = 0
    _MISSING = (
        "OODMonitor(log_dir=...) writes TensorBoard summaries with the `tensorboard` "
        "package: `pip install tensorboard` (or `keras-isomax[tensorboard]`), or pass "
        "log_dir=None. Received: log_dir={!r}"
    )

    @staticmethod
    def check_available(log_dir: str = "") -> None:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ImportError(_EventFile._MISSING.format(log_dir))

    def __init__(self, directory: str) -> None:
        try:
            from tensorboard.compat.proto import event_pb2
            from tensorboard.plugins.histogram import summary_v2 as histogram_v2
            from tensorboard.plugins.scalar import summary_v2 as scalar_v2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError as error:
            raise ImportError(_EventFile._MISSING.format(directory)) from error
        self._event_pb2 = event_pb2
        self._scalar_pb = scalar_v2.scalar_pb
        self._histogram_pb = histogram_v2.histogram_pb
        _EventFile._count += 1
        name = (
            f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
            f"{os.getpid()}.{_EventFile._count}.oodmonitor.v2"
        )
        if "://" in directory:
            import tensorflow as tf

            tf.io.gfile.makedirs(directory)
            self._file = tf.io.gfile.GFile(directory.rstrip("/") + "/" + name, "wb")
        else:
            os.makedirs(directory, exist_ok=True)
            self._file = open(os.path.join(directory, name), "wb")  # noqa: SIM115
        self.path = os.path.join(directory, name)
        self._records = RecordWriter(self._file)
        self._write(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def scalar(self, tag: str, value: float, step: int) -> None:
        summary = self._scalar_pb(tag, float(value))
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def histogram(self, tag: str, values: np.ndarray, step: int, buckets: int) -> None:
        finite = np.asarray(values, np.float64)
        finite = finite[np.isfinite(finite)]
        summary = self._histogram_pb(tag, finite, buckets=buckets)
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
