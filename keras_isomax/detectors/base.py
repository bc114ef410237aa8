"""The `Detector` base class: a Keras layer that scores features or logits."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import keras
import numpy as np
from keras import ops

from keras_isomax import _checks, _data, _runner, _serving
from keras_isomax._typing import ArrayLike, Config, Data, Tensor, Verbose

_Stream = Iterable[tuple[np.ndarray, Any]]
_T = TypeVar("_T")


class FitContext:
    """What a detector's fit knows besides the data.

    Attributes:
        feature_dim: Width of the features, or `None` (read from the data).
        num_classes: The classifier's number of classes, or `None`.
        runner: The model runner when fitted on a model (`fit`), else `None`.
    """

    def __init__(
        self,
        feature_dim: int | None = None,
        num_classes: int | None = None,
        runner: _runner.ModelRunner | None = None,
    ) -> None:
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.runner = runner


class Detector(keras.layers.Layer):
    """Base class of the OOD detectors: a layer that scores features or logits.

    A detector is fitted on in-distribution data, either through a model
    (`fit(model, data)`: the features are the input of the classifier head)
    or on precomputed features (`fit_features(features, labels)`); it then
    scores inputs (`score(x)`) or features (`score_features(z)`), higher
    meaning more in-distribution. Its fitted state and its calibrated
    `threshold` are Keras variables, so `save`/`load` and the exporters carry
    them.

    Subclasses implement `_fit(stream, context)` (host-side fitting from
    `(features, labels)` NumPy batches) and `call` (keras.ops scoring of a
    batch of features, or of logits when `input_kind == "logits"`).

    Args:
        features: Name of the layer whose output is used as features, or
            `None` for the input of the classifier head. Defaults to `None`.
        batch_size: Batch size for array data in `fit` and `score`. Defaults
            to `256`.
        state: Shapes of the fitted state, written by `fit` (set only when
            restoring from a config). Defaults to `None`.
        model_fingerprint: Identity of the classifier head it was fitted on,
            written by `fit` and checked by `attach`. Defaults to `None`.
        **kwargs: Passed to `keras.layers.Layer`.
    """

    input_kind = "features"
    needs_labels = False
    _state_keys: tuple[str, ...] = ()  # The keys of `state` (its layout), checked when restoring.

    def __init__(
        self,
        features: str | None = None,
        batch_size: int = 256,
        state: dict | None = None,
        model_fingerprint: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if features is not None and not isinstance(features, str):
            raise TypeError(
                f"`features` must be a layer name or None. Received: features={features!r}"
            )
        self.features = features
        self.batch_size = _checks.check_int(batch_size, "batch_size")
        if state is not None and not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict or None. Received: state={state!r}")
        if state and self._state_keys and set(state) != set(self._state_keys):
            raise ValueError(
                f"`state` of a {type(self).__name__} holds {sorted(self._state_keys)} (a file "
                "written by another keras_isomax version?). "
                f"Received: state with keys {sorted(state)}"
            )
        self.state = dict(state) if state else None  # Shapes of the fitted state.
        self.model_fingerprint = model_fingerprint
        self._runner: _runner.ModelRunner | None = None
        self.threshold = self.add_weight(
            name="threshold",
            shape=(),
            initializer=keras.initializers.Constant(math.nan),
            trainable=False,
            dtype="float32",
        )

    # ------------------------------------------------------------------ state

    def _state_specs(self, state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
        """`{name: (shape, dtype)}` of the fitted variables for `state`."""
        return {}

    def _make_state(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)
        for name, (shape, dtype) in self._state_specs(self.state).items():
            existing = getattr(self, name, None)
            if isinstance(existing, keras.Variable):
                if tuple(existing.shape) != tuple(shape):
                    raise ValueError(
                        f"This {type(self).__name__} was fitted with state {name} of shape "
                        f"{tuple(existing.shape)}; refitting needs shape {tuple(shape)}. Create a "
                        f"new detector instead. Received: data giving shape {tuple(shape)}"
                    )
                continue
            setattr(
                self,
                name,
                self.add_weight(
                    name=name, shape=shape, initializer="zeros", trainable=False, dtype=dtype
                ),
            )

    def build(self, input_shape: Any) -> None:
        if self.state and self._state_specs(self.state):
            self._make_state(self.state)  # A reloaded detector: variables, then weights.
        self.built = True

    @property
    def is_fitted(self) -> bool:
        """Whether the detector holds fitted state."""
        return self.state is not None or self.input_kind == "logits"

    @property
    def is_calibrated(self) -> bool:
        """Whether `threshold` holds a calibrated (finite) value."""
        return math.isfinite(float(ops.convert_to_numpy(self.threshold)))

    @property
    def feature_dim(self) -> int | None:
        """The width of the features (logits for logit detectors) it scores, once fitted."""
        if not self.state:
            return None
        return self.state.get("feature_dim") or self.state.get("num_classes")

    # ---------------------------------------------------------------- fitting

    def fit(
        self,
        model: keras.Model,
        data: Data = None,
        *,
        verbose: Verbose = "auto",
        strategy: Any = None,
    ) -> Detector:
        """Fits the detector on in-distribution data in one streaming pass.

        The features are the input of the model's classifier head (its
        `IsoMaxPlusLayer`, or the final `Dense` of a SoftMax model), or the
        output of the layer named by `features`.

        Called inside `strategy.scope()` of a `tf.distribute.MirroredStrategy`
        or `MultiWorkerMirroredStrategy` (or given `strategy=`), every replica
        runs the feature pass on its share of `data` and the sufficient
        statistics are summed (and the KNN bank gathered) with the strategy's
        collectives: the fitted state equals a one-device fit on the same data
        (see docs/distributed.md). On JAX, a `keras.distribution.DataParallel`
        distribution set in this (single) process shards each batch's forward
        pass over its devices.

        Args:
            model: The trained classifier (`keras.Model`).
            data: `(x, y)` arrays, or a batched `tf.data.Dataset` (or other
                iterable) of `(x, y)` batches; under a strategy, a batched
                `tf.data.Dataset` (global batch size) or arrays. Labels are
                needed by `Mahalanobis` and `ClassMeans` only. Logit detectors
                need no data. Defaults to `None`.
            verbose: `"auto"`, 0, 1 or 2, as in `keras.Model.predict`.
                Defaults to `"auto"`.
            strategy: A `tf.distribute` strategy to fit with, or `None` for the
                strategy whose scope is active (none: one device); logit
                detectors, which only bind to `model`, ignore it. Defaults
                to `None`.

        Returns:
            The detector itself.

        Raises:
            ValueError: If the data is empty, has non-finite features or
                misses labels or classes, or the detector's arguments do not
                fit the data (see each detector).
        """
        runner = self._model_runner(model)
        self.model_fingerprint = self._fit_model(runner, data, verbose, strategy)
        self._runner = runner
        self.built = True  # The state variables exist now (export needs a built layer).
        return self

    def _fit_model(
        self,
        runner: _runner.ModelRunner,
        data: Data,
        verbose: Verbose,
        strategy: Any,
    ) -> str | None:
        """Fits the state on `model`'s features of `data`; the fingerprint to keep."""
        if data is None:
            raise ValueError(
                f"{type(self).__name__}.fit needs in-distribution data. Received: data=None"
            )
        strategy = _active_strategy(strategy)
        context = FitContext(runner.feature_dim, runner.num_classes, runner)
        if strategy is not None:
            from keras_isomax import distribute  # TensorFlow only.

            distribute.fit_detector(self, runner, data, strategy, context, verbose=verbose)
        else:
            batches = runner.batches(
                data,
                batch_size=self.batch_size,
                arg_name="data",
                with_labels=self.needs_labels,
                label_classes=self._label_classes(runner.num_classes),
                verbose=verbose,
                stage=f"{type(self).__name__}.fit",
                need_logits=False,
                distribution=_jax_distribution(),
            )
            stream = ((batch.features, batch.labels) for batch in batches)
            self._fit(self._checked(stream, "data"), context)
        return runner.fingerprint()

    def fit_features(
        self, features: Data, labels: ArrayLike | None = None, *, verbose: Verbose = "auto"
    ) -> Detector:
        """Fits the detector on precomputed features (no model pass).

        Gives the state `fit(model, data)` gives when `features` are the
        model's features of `data`. Bind the fitted detector to a model with
        `attach(model)` to calibrate or export it with that model.

        Args:
            features: Features `(N, F)` (an array), or a batched
                `tf.data.Dataset` / iterable yielding feature batches or
                `(features, labels)` batches.
            labels: Class ids `(N,)` or one-hot rows, for array `features`
                (needed by `Mahalanobis` and `ClassMeans`). Defaults to `None`.
            verbose: `"auto"`, 0, 1 or 2. Defaults to `"auto"`.

        Returns:
            The detector itself.

        Raises:
            ValueError: As `fit`.
        """
        stream = self._feature_stream(features, labels, "features", verbose, "fit_features")
        self._fit(self._checked(stream, "features"), FitContext(num_classes=self._num_classes()))
        self.model_fingerprint = None
        self._runner = None
        self.built = True
        return self

    def _fit(self, stream: _Stream, context: FitContext) -> None:
        """Fits the state from `(features, labels)` NumPy batches: accumulate, then finish."""
        acc = self._accumulator(context)
        for feats, labels in stream:
            acc.update(feats, labels)
        self._finish(acc, context)

    def _accumulator(self, context: FitContext) -> Any:
        """The running sufficient statistics of a fit (each detector defines it)."""
        raise TypeError(
            "`Detector` is the base class; fit one of its subclasses (KNN, Mahalanobis, ViM, "
            f"ClassMeans, ...). Received: detector of type {type(self).__name__}"
        )

    def _finish(self, acc: Any, context: FitContext) -> None:
        """Sets the fitted state from the (merged) statistics."""
        raise NotImplementedError

    def _num_classes(self) -> int | None:
        """The classes the detector was told (`num_classes=`), if any."""
        return getattr(self, "num_classes", None)

    def _label_classes(self, model_classes: int | None) -> int | None:
        return self._num_classes() or model_classes

    def _checked(self, stream: _Stream, arg_name: str) -> Iterator[tuple[np.ndarray, Any]]:
        """The stream with the checks every fit needs (labels present, finite features)."""
        for feats, labels in stream:
            self._check_batch(feats, labels, arg_name)
            yield feats, labels

    def _check_batch(self, feats: np.ndarray, labels: Any, arg_name: str) -> None:
        if self.needs_labels and labels is None:
            raise ValueError(
                f"`{arg_name}` must hold labels `(x, y)` for {type(self).__name__}. "
                f"Received: {arg_name} without labels"
            )
        bad = ~np.isfinite(feats).all(axis=1)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} examples of `{arg_name}` have non-finite features (NaN "
                f"or Inf inputs?); remove them before fitting. "
                f"Received: {arg_name} with non-finite features"
            )

    def _feature_stream(
        self, features: Data, labels: ArrayLike | None, arg_name: str, verbose: Verbose, what: str
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """`(features (B, F) float32, labels or None)` batches of precomputed features."""
        if isinstance(features, list):
            features = np.asarray(features, np.float32)
        if isinstance(labels, list):
            labels = np.asarray(labels)
        if labels is not None and not _data.is_in_memory(features):
            raise ValueError(
                "`labels` goes with array `features`; a dataset yields `(features, labels)` "
                f"batches itself. Received: labels with {arg_name} of type "
                f"{type(features).__name__}"
            )
        data = features if labels is None else (features, labels)
        progress = _runner.Progress(
            f"{type(self).__name__}.{what}",
            _runner.num_batches(data, self.batch_size),
            verbose,
        )
        with progress:
            for x, y in _data.iter_batches(data, arg_name, self.batch_size):
                feats = np.asarray(ops.convert_to_numpy(x), np.float32)
                if feats.ndim < 2:
                    raise ValueError(
                        f"`{arg_name}` must be feature batches `(N, F)`. "
                        f"Received: {arg_name} batch of shape {feats.shape}"
                    )
                if len(feats) == 0:
                    continue  # An empty batch (e.g. a dataset's last): no rows to lose.
                feats = feats.reshape(len(feats), -1)
                expected = self.feature_dim if self.is_fitted and what != "fit_features" else None
                if expected is not None and feats.shape[1] != expected:
                    raise ValueError(
                        f"{type(self).__name__} was fitted on {expected} features. "
                        f"Received: {arg_name} of width {feats.shape[1]}"
                    )
                ids = None
                if y is not None:
                    ids = _data.class_ids(y, "labels", self._num_classes())
                    if len(ids) != len(feats):
                        raise ValueError(
                            f"`labels` must hold one label per row of `{arg_name}`. Received: "
                            f"{len(feats)} rows and {len(ids)} labels"
                        )
                progress.add(len(feats))
                yield feats, ids

    # ---------------------------------------------------------------- binding

    def _model_runner(self, model: keras.Model) -> _runner.ModelRunner:
        return _runner.runner_for(model, self.features, need_features=True)

    def attach(self, model: keras.Model) -> Detector:
        """Binds a fitted (e.g. reloaded, or `fit_features`-fitted) detector to a model.

        A detector fitted with `fit(model, ...)` must be attached to that
        model's classifier head (same weights); one fitted on features needs
        a model whose features have the width it was fitted on.

        Args:
            model: The classifier.

        Returns:
            The detector itself.

        Raises:
            ValueError: If the detector is not fitted, or the model's head or
                feature width differs from what it was fitted on.
        """
        self._check_fitted()
        if self._runner is not None and self._runner.model is model:
            return self  # Already bound: the model may have trained on since (a monitor).
        runner = self._model_runner(model)
        if self.model_fingerprint is not None:
            fingerprint = runner.fingerprint()
            if fingerprint != self.model_fingerprint:
                raise ValueError(
                    f"This {type(self).__name__} was fitted on a different model (head "
                    f"{self.model_fingerprint!r}); fit it on this one. "
                    f"Received: model={model.name!r} with head {fingerprint!r}"
                )
        else:
            width = self._runner_width(runner)
            if self.feature_dim is not None and width != self.feature_dim:
                raise ValueError(
                    f"This {type(self).__name__} was fitted on {self.feature_dim} features; "
                    f"model {model.name!r} gives {width}. "
                    f"Received: model={model.name!r} with feature width {width}"
                )
        self._runner = runner
        return self

    def _runner_width(self, runner: _runner.ModelRunner) -> int | None:
        return runner.feature_dim

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError(
                f"{type(self).__name__} is not fitted; call `.fit(model, data)` or "
                f"`.fit_features(features)` first. Received: detector={self.name!r}"
            )

    def _bound(self, model: keras.Model | None) -> _runner.ModelRunner:
        self._check_fitted()
        if model is not None and (self._runner is None or self._runner.model is not model):
            self.attach(model)
        if self._runner is None or self._runner.model is None:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} is not bound to a model (reloaded, or "
                "fitted on features?); call `.attach(model)` or pass `model=`. "
                "Received: model=None"
            )
        return self._runner

    def bind_for_export(self, model: keras.Model, threshold: Any = None) -> int:
        """Binds the detector to `model` and checks it has a threshold to export.

        Args:
            model: The classifier the detector was fitted on.
            threshold: The explicit threshold the export uses, or `None` for
                the detector's calibrated `threshold`. Defaults to `None`.

        Returns:
            The number of classes of the model's logits.

        Raises:
            ValueError: If the detector is not fitted, was fitted on another
                model, or has no calibrated threshold and `threshold` is `None`.
        """
        self.attach(model)  # Raises if not fitted or fitted on another model.
        if threshold is None and not self.is_calibrated:
            raise ValueError(
                f"Detector {self.name!r} has no calibrated threshold. Call "
                "`calibrate_threshold(model, in_val_data, detector=det)` before exporting, "
                "or pass `threshold=` explicitly. Received: threshold=None"
            )
        # `attach` set `_runner`, to a runner with a classifier head (else it raised).
        return self._runner.num_classes  # type: ignore[union-attr,return-value]

    # ---------------------------------------------------------------- scoring

    def score(
        self, x: Data, model: keras.Model | None = None, *, verbose: Verbose = "auto"
    ) -> np.ndarray:
        """Scores inputs: higher means more in-distribution.

        Args:
            x: Inputs: an array, a tuple `(x, ...)` or a batched dataset.
            model: The classifier, if the detector is not bound to it yet
                (after `load` or `fit_features`). Defaults to `None`.
            verbose: `"auto"`, 0, 1 or 2. Defaults to `"auto"`.

        Returns:
            A float64 NumPy array `(N,)`. Inputs holding NaN or Inf score NaN.

        Raises:
            ValueError: If the detector is not fitted or is used with another
                model than the one it was fitted on.
        """
        runner = self._bound(model)
        batches = runner.batches(
            x,
            batch_size=self.batch_size,
            arg_name="x",
            verbose=verbose,
            stage=f"{type(self).__name__}.score",
            need_logits=self.input_kind == "logits",
        )
        return self._score_batches(batches, "x")[0]

    def score_and_logits(
        self,
        x: Data,
        model: keras.Model | None = None,
        arg_name: str = "x",
        *,
        verbose: Verbose = 0,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`(scores (N,), logits (N, C))` as NumPy arrays, one pass over `x`."""
        runner = self._bound(model)
        batches = runner.batches(
            x,
            batch_size=self.batch_size,
            arg_name=arg_name,
            verbose=verbose,
            stage=f"{type(self).__name__}.score",
        )
        return self._score_batches(batches, arg_name)

    # Rows scored together (batches are joined up to this many): a detector whose
    # scoring sweeps a large state (the KNN bank) reads it once per block.
    _score_rows = 0

    def _score_batches(
        self, batches: Iterable[_runner.Batch], arg_name: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        values, all_logits = [], []
        for block in _blocks(batches, lambda batch: len(batch.nonfinite), self._score_rows):
            values.append(self._score_batch(_join(block)))
            all_logits += [batch.logits for batch in block if batch.logits is not None]
        if sum(len(v) for v in values) == 0:
            raise ValueError(f"`{arg_name}` holds no examples. Received: empty {arg_name}")
        return np.concatenate(values), (np.concatenate(all_logits) if all_logits else None)

    def _score_batch(self, batch: _runner.Batch) -> np.ndarray:
        return self._score_array(batch.features)

    def score_features(self, features: Data, *, verbose: Verbose = "auto") -> np.ndarray:
        """Scores precomputed features (logits for the logit detectors).

        Gives the scores `score(x)` gives for inputs whose features are
        `features`.

        Args:
            features: Features `(N, F)`, or a batched dataset / iterable of them.
            verbose: `"auto"`, 0, 1 or 2. Defaults to `"auto"`.

        Returns:
            A float64 NumPy array `(N,)`; rows with NaN or Inf score NaN.
        """
        self._check_fitted()
        stream = self._feature_stream(features, None, "features", verbose, "score_features")
        arrays = (feats for feats, _ in stream)
        values = [
            self._score_array(np.concatenate(block))
            for block in _blocks(arrays, len, self._score_rows)
        ]
        if sum(len(v) for v in values) == 0:
            raise ValueError("`features` holds no examples. Received: empty features")
        return np.concatenate(values)

    def _score_array(self, feats: np.ndarray) -> np.ndarray:
        """Scores a NumPy batch on the host; `call` is the traceable twin."""
        out = self(ops.convert_to_tensor(np.asarray(feats, np.float32)))
        return np.asarray(ops.convert_to_numpy(out), np.float64).reshape(-1)

    def score_inputs(
        self, inputs: ArrayLike, model: keras.Model | None = None
    ) -> tuple[Tensor, Tensor]:
        """`(score, logits)` of a batch of model inputs, as tensors (traceable)."""
        runner = self._bound(model)
        feats, logits = runner.symbolic(inputs)
        return self(logits if self.input_kind == "logits" else feats), logits

    def _nan_rows(self, feats: Tensor, score: Tensor) -> Tensor:
        # The library's non-finite rule in its converter-friendly form (no
        # `isfinite`, no float `where`: the LiteRT/ONNX exports trace this).
        return _serving.nan_where(_serving.nonfinite_rows(feats), score)

    # ----------------------------------------------------------------- saving

    def get_config(self) -> Config:
        return {
            **super().get_config(),
            "features": self.features,
            "batch_size": self.batch_size,
            "state": self.state,
            "model_fingerprint": self.model_fingerprint,
        }

    def save(self, filepath: str | os.PathLike, overwrite: bool = True) -> None:
        """Writes the fitted detector (state, threshold, config) to a `.keras` file.

        The file is written next to `filepath` first and moved into place when
        complete, so a failure part-way leaves an existing file intact.

        Args:
            filepath: Path ending in `.keras`.
            overwrite: Whether to replace an existing file. Defaults to `True`.

        Raises:
            ValueError: If the path does not end in `.keras` or the detector is
                not fitted.
            FileExistsError: If the file exists and `overwrite` is `False`.
        """
        filepath = os.fspath(filepath)
        if not filepath.endswith(".keras"):
            raise ValueError(f"`filepath` must end in `.keras`. Received: filepath={filepath!r}")
        if os.path.exists(filepath) and not overwrite:
            raise FileExistsError(
                f"{filepath!r} exists; pass overwrite=True to replace it. Received: overwrite=False"
            )
        size = self._input_size()
        inputs = keras.Input((size,), dtype="float32")
        wrapper = keras.Model(inputs, self(inputs), name=f"{self.name}_detector")
        directory = os.path.dirname(os.path.abspath(filepath))
        fd, staging = tempfile.mkstemp(prefix=".keras-isomax-", suffix=".keras", dir=directory)
        os.close(fd)
        try:
            wrapper.save(staging)
            os.replace(staging, filepath)
        finally:
            if os.path.exists(staging):
                os.remove(staging)  # Only the staging file this call created.

    def _input_size(self) -> int | None:
        if not self.state:
            raise ValueError(
                f"Only a fitted detector can be saved. Received: detector={self.name!r}"
            )
        return self.feature_dim


def _active_strategy(strategy: Any) -> Any:
    """The tf.distribute strategy to fit with (`None`: one device)."""
    backend = keras.backend.backend()
    if strategy is not None:
        if backend != "tensorflow":
            raise ValueError(
                "`strategy=` takes a `tf.distribute` strategy and needs the TensorFlow "
                "backend; on JAX set a `keras.distribution.DataParallel` distribution "
                f"instead. Received: strategy={type(strategy).__name__} on backend {backend!r}"
            )
        return strategy
    if backend != "tensorflow":
        return None
    import tensorflow as tf  # The backend is TensorFlow: already imported.

    if not tf.distribute.has_strategy():
        return None
    active = tf.distribute.get_strategy()
    if active.num_replicas_in_sync <= 1 and not isinstance(
        active, tf.distribute.MultiWorkerMirroredStrategy
    ):
        return None
    return active


def _jax_distribution() -> Any:
    """The `keras.distribution` distribution to run the feature pass with (JAX), or None.

    Raises:
        ValueError: For a multi-process JAX distribution (each process would hold
            only its own features).
    """
    if keras.backend.backend() != "jax":
        return None
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    import jax  # The backend is JAX: already imported.

    if jax.process_count() > 1:
        raise ValueError(
            "Fitting a detector across JAX processes is not supported: fit it in one "
            "process (a `keras.distribution.DataParallel` over that process's devices "
            "shards the feature pass), or use the TensorFlow backend's "
            "`MultiWorkerMirroredStrategy` (docs/distributed.md). "
            f"Received: jax.process_count()={jax.process_count()}"
        )
    return distribution


def _blocks(items: Iterable[_T], rows: Callable[[_T], int], min_rows: int) -> Iterator[list[_T]]:
    """`items` in consecutive groups of at least `min_rows` rows (the last may hold fewer).

    Scores are computed row by row, so the grouping changes no score: it lets a
    detector that sweeps a large state (the KNN bank) read it once per group.
    """
    group: list[_T] = []
    count = 0
    for item in items:
        group.append(item)
        count += rows(item)
        if count >= min_rows:
            yield group
            group, count = [], 0
    if group:
        yield group


def _join(batches: Sequence[_runner.Batch]) -> _runner.Batch:
    """One `Batch` from several (features, logits, labels, flags concatenated)."""
    if len(batches) == 1:
        return batches[0]
    fields: list[Any] = []
    for values in zip(*batches, strict=True):
        fields.append(None if values[0] is None else np.concatenate(values))
    return _runner.Batch(*fields)


def float64_rows(feats: np.ndarray, normalize: bool) -> np.ndarray:
    """`feats` in float64, each row L2-normalised (epsilon 1e-12) when `normalize`."""
    z = feats.astype(np.float64)
    if normalize:
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return z


def host_array(variable: Any) -> np.ndarray:
    """A NumPy view of a variable's value on the host, without a copy where the backend
    allows it (TensorFlow and PyTorch CPU tensors, JAX CPU arrays); read it, never write."""
    value = getattr(variable, "value", variable)
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow" and hasattr(value, "value"):
            return np.asarray(value.value())  # The variable's tensor; copy-on-write in TF.
        if backend == "torch":
            return value.detach().cpu().numpy()
        if backend == "jax":
            return np.asarray(value)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        pass
    return np.asarray(ops.convert_to_numpy(value))


class Reservoir:
    """A seeded uniform sample of at most `size` rows of a stream (algorithm R).

    The draws depend only on the row order, not on how the stream is batched.
    """

    def __init__(self, size: int, seed: Any) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.rows: np.ndarray | None = None
        self.seen = 0

    def add(self, batch: np.ndarray) -> None:
        n = len(batch)
        if n == 0:
            return
        if self.rows is None:
            self.rows = np.empty((self.size, batch.shape[1]), np.float32)
        fill = max(0, min(n, self.size - self.seen))
        if fill:
            self.rows[self.seen : self.seen + fill] = batch[:fill]
        rest = n - fill
        if rest:
            index = self.seen + fill + np.arange(rest)  # Global row numbers.
            slots = np.floor(self.rng.random(rest) * (index + 1)).astype(np.int64)
            keep = slots < self.size
            slots, rows = slots[keep], batch[fill:][keep]
            # Later rows win when two draw the same slot, as in the sequential algorithm.
            _, last = np.unique(slots[::-1], return_index=True)
            last = len(slots) - 1 - last
            self.rows[slots[last]] = rows[last]
        self.seen += n

    def sample(self, feature_dim: int = 0) -> np.ndarray:
        if self.rows is None:
            return np.zeros((0, feature_dim), np.float32)
        return self.rows[: min(self.seen, self.size)]

    @staticmethod
    def merge(
        reservoirs: Sequence[Reservoir], comm: Any, size: int, seed: Any, feature_dim: int
    ) -> np.ndarray:
        """A uniform sample of at most `size` rows of the union of the replicas' streams.

        Every replica holds a uniform sample of its own stream (`seen` rows). The
        number of rows each replica gives is drawn once, from the multivariate
        hypergeometric law of a uniform `size`-subset of the union (seeded: every
        worker draws the same); each replica then gives a seeded uniform subset of
        its sample of that size, and the pieces are gathered. When the union has at
        most `size` rows, the result is all of them.

        Args:
            reservoirs: This worker's replicas' `Reservoir`s, in replica order.
            comm: The collectives (`sum`, `gather`, `local_ids`).
            size: The sample size.
            seed: The seed.
            feature_dim: The row width.

        Returns:
            `(min(size, total), feature_dim)` float32.
        """
        seen = comm.gather([np.array([r.seen], np.int64) for r in reservoirs]).astype(np.int64)
        take = int(min(size, seen.sum()))
        alloc = np.random.default_rng(seed).multivariate_hypergeometric(seen, take)
        picks = []
        for reservoir, replica in zip(reservoirs, comm.local_ids, strict=True):
            kept = reservoir.sample(feature_dim)
            rng = np.random.default_rng([seed, replica])
            index = np.sort(rng.choice(len(kept), int(alloc[replica]), replace=False))
            picks.append(np.asarray(kept[index], np.float32).reshape(-1, feature_dim))
        return comm.gather(picks)


class ClassStats:
    """Per-class counts and float64 sums of feature rows, streamed batch by batch.

    Args:
        num_classes: Number of classes, or `None` to grow with the largest
            label seen.
        normalize: Whether each row is L2-normalised before it is summed.
        second_moment: Whether to also accumulate the cross-product matrix
            `sum (z - shift)^T (z - shift)` about `shift`, the mean of the
            first batch (no cancellation for features far from the origin).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        normalize: bool = False,
        second_moment: bool = False,
    ) -> None:
        self.num_classes = num_classes
        self.normalize = normalize
        self.second_moment = second_moment
        self.sums: Any = None  # NumPy arrays once rows arrived.
        self.counts: Any = None
        self.cross: Any = None
        self.shift: Any = None
        self.total = 0

    def update(self, feats: np.ndarray, labels: ArrayLike, arg_name: str = "data") -> None:
        if len(feats) == 0:
            return
        labels = np.asarray(labels, np.int64)
        bad = (labels < 0) | (labels >= self.num_classes if self.num_classes is not None else False)
        if bad.any():
            upper = self.num_classes if self.num_classes is not None else "C"
            raise ValueError(
                f"Labels of `{arg_name}` must be class ids in [0, {upper}). "
                f"Received: labels {np.unique(labels[bad])[:5].tolist()}"
            )
        z = float64_rows(feats, self.normalize)
        width = max(int(labels.max()) + 1, self.num_classes or 0)
        if self.sums is None:
            self.sums = np.zeros((width, z.shape[1]), np.float64)
            self.counts = np.zeros(width, np.int64)
            if self.second_moment:
                self.shift = z.mean(axis=0)
                self.cross = np.zeros((z.shape[1], z.shape[1]), np.float64)
        elif width > len(self.sums):
            grow = width - len(self.sums)
            self.sums = np.concatenate([self.sums, np.zeros((grow, self.sums.shape[1]))])
            self.counts = np.concatenate([self.counts, np.zeros(grow, np.int64)])
        if self.second_moment:
            z = z - self.shift
            self.cross += z.T @ z
        np.add.at(self.sums, labels, z)
        self.counts += np.bincount(labels, minlength=len(self.counts))
        self.total += len(z)

    @staticmethod
    def merge(stats: Sequence[ClassStats], comm: Any, context: FitContext) -> ClassStats:
        """The statistics of all replicas' streams (this worker's `stats` + collectives)."""
        first = stats[0]
        width = int(
            comm.gather(
                [np.array([len(a.counts) if a.counts is not None else 0]) for a in stats]
            ).max()
        )
        width = max(width, first.num_classes or 0)
        f: int = context.feature_dim  # type: ignore[assignment]  # Set in distributed fits.
        for a in stats:  # Replicas that saw no rows, and fewer classes than others.
            if a.sums is None:
                a.sums = np.zeros((width, f))
                a.counts = np.zeros(width, np.int64)
                if a.second_moment:
                    a.shift, a.cross = np.zeros(f), np.zeros((f, f))
            elif len(a.sums) < width:
                grow = width - len(a.sums)
                a.sums = np.concatenate([a.sums, np.zeros((grow, f))])
                a.counts = np.concatenate([a.counts, np.zeros(grow, np.int64)])
        merged = ClassStats(
            first.num_classes, normalize=first.normalize, second_moment=first.second_moment
        )
        totals = comm.sum([np.array([float(a.total)]) for a in stats])
        merged.total = int(round(float(totals[0])))
        if first.second_moment:
            # One common shift (the mean of the replicas' shifts, weighted by rows),
            # then each replica's sums and cross-products re-centred on it, exactly.
            weighted = comm.sum([a.total * a.shift for a in stats])
            shift = weighted / max(merged.total, 1)
            for a in stats:
                d = a.shift - shift
                s_a = a.sums.sum(axis=0)
                a.cross = a.cross + np.outer(s_a, d) + np.outer(d, s_a) + a.total * np.outer(d, d)
                a.sums = a.sums + a.counts[:, None] * d
            merged.shift = shift
            merged.cross = comm.sum([a.cross for a in stats])
        merged.sums = comm.sum([a.sums for a in stats])
        counts = comm.sum([a.counts.astype(np.float64) for a in stats])
        merged.counts = np.rint(counts).astype(np.int64)
        return merged

    def check_complete(self, detector_name: str, arg_name: str = "data") -> None:
        """Raises unless every class has examples (and there are examples at all)."""
        if self.total == 0:
            raise ValueError(f"`{arg_name}` holds no examples. Received: empty {arg_name}")
        missing = np.flatnonzero(self.counts == 0)
        if missing.size:
            raise ValueError(
                f"{detector_name} needs examples of every class; {missing.size} of "
                f"{len(self.counts)} classes have none. "
                f"Received: {arg_name} without classes {missing[:10].tolist()}"
            )
