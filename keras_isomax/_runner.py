"""The one model runner: a classifier's logits, features, labels and NaN flags over data.

Every function that runs a user's model over a data set (detectors, calibration,
evaluation, `predict_ood`, the OOD monitor callback) goes through `ModelRunner`:

* logits are the classifier's **pre-softmax** logits: the `IsoMaxPlusLayer`'s
  output when the model has one, else the pre-activation output of the linear
  classifier the model ends in (`Dense(C, activation="softmax")`, or a `Dense`
  followed by a `Softmax`), read live from its kernel and bias; any other model's
  output is taken as its logits;
* features are the classifier's input (or a named layer's output), flattened;
* labels and per-row NaN/Inf flags of the inputs are read in the same pass, so
  they stay aligned with a shuffling `tf.data.Dataset`;
* one runner (one traced prediction function) per model and feature choice, so
  repeated calls do not retrace.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NamedTuple

import keras
import numpy as np
from keras import ops

from keras_isomax import _data, _graph
from keras_isomax._typing import ArrayLike, Data, Tensor, Verbose
from keras_isomax.head import find_isomax_layer
from keras_isomax.layers import IsoMaxPlusLayer

VERBOSE_CHOICES = ("auto", 0, 1, 2)

_RUNNERS: weakref.WeakKeyDictionary[Any, dict[Any, ModelRunner]] = weakref.WeakKeyDictionary()


class Batch(NamedTuple):
    """One batch of a run: NumPy arrays (features/labels/logits `None` when not asked).

    Those three are typed `Any`: whether they are `None` depends on the arguments of
    the run (`need_logits`, `with_labels`, the runner's `need_features`), which a
    type checker cannot follow.
    """

    features: Any
    logits: Any
    labels: Any
    nonfinite: np.ndarray


def runner_for(
    model: Any, features: str | None = None, *, need_features: bool = False
) -> ModelRunner:
    """The cached `ModelRunner` of `model` (one per feature choice)."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model. Received: model={type(model).__name__}")
    key = (features, bool(need_features or features is not None))
    try:
        cache = _RUNNERS.setdefault(model, {})
    except TypeError:  # Not weak-referenceable: no caching.
        cache = {}
    runner = cache.get(key)
    if runner is None:
        runner = ModelRunner(model, features, need_features=key[1])
        cache[key] = runner
    return runner


class ModelRunner:
    """Runs a classifier over data; see the module docstring.

    Args:
        model: The classifier (`keras.Model`).
        features: Name of the layer whose output is used as features, or
            `None` for the input of the classifier head.
        need_features: Whether features are needed (detectors) or logits only.
    """

    def __init__(
        self, model: keras.Model, features: str | None = None, *, need_features: bool = False
    ) -> None:
        # Weak: runners are cached per model (`runner_for`) and must not keep it alive.
        self._model = weakref.ref(model)
        self.features_layer = features
        self.isomax: IsoMaxPlusLayer | None = None
        self.classifier: Any = None  # `_graph.Classifier` of a SoftMax head.
        self._net: Any = None
        self.output_index: int | None = None
        self.feature_dim: int | None = None
        self.num_classes: int | None
        self.head_name: str | None
        try:
            self.isomax = find_isomax_layer(model)
        except ValueError:
            pass
        inputs = _symbolic_inputs(model)
        if self.isomax is None and inputs:
            try:
                self.classifier = _graph.find_classifier(model)
            except ValueError as error:
                classifier_error = error
        head_features = None
        if self.isomax is not None:
            self.num_classes = self.isomax.num_classes
            self.head_name = self.isomax.name
            if need_features:
                head_features = _symbolic(self.isomax, "input")
                logits = _symbolic(self.isomax, "output")
                self.net = keras.Model(inputs, [head_features, logits]) if inputs else None
            else:
                self.net, self.output_index = _graph.logits_model(model, self.isomax)
        elif self.classifier is not None:
            self.num_classes = int(self.classifier.kernel.shape[-1])
            self.head_name = self.classifier.classifier.name
            head_features = self.classifier.features
            self.net = keras.Model(inputs, [head_features])
        else:
            if need_features:
                reason = classifier_error if inputs else "it has no symbolic inputs"
                raise ValueError(
                    "Detectors need a built Sequential or functional model with an "
                    "`IsoMaxPlusLayer` or ending in a linear classifier (`Dense` + softmax), "
                    f"as `replace_head` does: {reason}. Received: model={model.name!r}"
                )
            self.num_classes = None  # Read from the outputs.
            self.head_name = None
            self.net = model
        if need_features:
            if self._net is None:
                raise ValueError(
                    "Detectors need a built Sequential or functional model with symbolic "
                    f"inputs. Received: model={model.name!r}"
                )
            if features is not None:
                if not isinstance(features, str):
                    raise TypeError(
                        f"`features` must be a layer name or None. Received: features={features!r}"
                    )
                try:
                    head_features = model.get_layer(features).output
                except ValueError as error:
                    raise ValueError(
                        f"Model {model.name!r} has no layer named {features!r}. "
                        f"Received: features={features!r}"
                    ) from error
                outputs = list(self.net.outputs)
                self.net = keras.Model(inputs, [head_features, *outputs[len(outputs) - 1 :]])
            dims = tuple(head_features.shape[1:])
            if any(d is None for d in dims):
                raise ValueError(
                    "The features must have a known size. Received: features of shape "
                    f"{tuple(head_features.shape)}"
                )
            self.feature_dim = int(np.prod(dims))
        # Features that are the model's (single) input need no forward pass when the
        # logits are not asked for (`batches(..., need_logits=False)`).
        self.features_are_input = bool(
            need_features and inputs and len(inputs) == 1 and head_features is inputs[0]
        )
        self._features_net: Any = None
        self.need_features = bool(need_features)
        self._warned_probabilities = False
        if self._net is model:
            self._net = None  # `net` then reads the model through the weak reference.

    @property
    def model(self) -> Any:
        return self._model()

    @property
    def net(self) -> Any:
        return self._net if self._net is not None else self.model

    @net.setter
    def net(self, value: Any) -> None:
        self._net = value

    # ------------------------------------------------------------- the head

    def fingerprint(self) -> str | None:
        """Identity of the classifier head (its name, features and weights' hash)."""
        if self.isomax is not None:
            kernel = self.isomax.prototypes
        elif self.classifier is not None:
            kernel = self.classifier.classifier.kernel
        else:
            return None
        digest = hashlib.sha1(np.ascontiguousarray(ops.convert_to_numpy(kernel)).tobytes())
        return (
            f"{self.head_name}:{self.features_layer or ''}:{self.feature_dim}:"
            f"{digest.hexdigest()[:16]}"
        )

    def linear_head(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """`(kernel (F, C), bias (C,), normalize)` of the classifier as float64 NumPy.

        For an `IsoMaxPlusLayer` the equivalent linear head on L2-normalised
        features: `(|s| / T) * normalised prototypes`, no bias.
        """
        if self.isomax is not None:
            layer = self.isomax
            protos = np.asarray(ops.convert_to_numpy(layer.prototypes), np.float64)
            protos = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
            scale = abs(float(ops.convert_to_numpy(layer.distance_scale))) / float(
                ops.convert_to_numpy(layer.temperature)
            )
            return scale * protos.T, np.zeros(protos.shape[0]), True
        dense = self.classifier.classifier
        kernel = np.asarray(ops.convert_to_numpy(self.classifier.kernel), np.float64)
        # A SoftMax head: `num_classes` is its kernel's width (an int).
        kernel = kernel.reshape(-1, self.num_classes)  # type: ignore[arg-type]
        bias = np.zeros(self.num_classes)  # type: ignore[arg-type]
        if getattr(dense, "use_bias", False) and dense.bias is not None:
            bias = np.asarray(ops.convert_to_numpy(dense.bias), np.float64)
        return kernel, bias, False

    def _dense_logits(self, flat: Tensor) -> Tensor:
        """Pre-activation logits of the SoftMax head, read live from its variables."""
        dense = self.classifier.classifier
        kernel = ops.reshape(self.classifier.kernel, (-1, self.num_classes))
        logits = ops.matmul(flat, ops.cast(kernel, flat.dtype))
        if getattr(dense, "use_bias", False) and dense.bias is not None:
            logits = logits + ops.cast(dense.bias, flat.dtype)
        return logits

    # ---------------------------------------------------------- one batch

    def symbolic(self, inputs: ArrayLike) -> tuple[Tensor | None, Tensor]:
        """`(features or None, logits)` of a batch as tensors (eager or in a traced graph)."""
        return self._split(self.net(inputs, training=False))

    def _split(self, outputs: Any) -> tuple[Any, Tensor]:
        if self.isomax is not None and not self.need_features:
            logits = _pick(outputs, self.output_index)
            return None, ops.cast(logits, "float32")
        if self.isomax is None and self.classifier is None:
            return None, ops.cast(_pick(outputs, None), "float32")
        outputs = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
        feats = outputs[0]
        flat = ops.reshape(ops.cast(feats, "float32"), (ops.shape(feats)[0], -1))
        if self.isomax is not None:
            logits = ops.cast(outputs[-1], "float32")
        else:
            head_input = outputs[-1] if len(outputs) > 1 else feats
            head_flat = ops.reshape(ops.cast(head_input, "float32"), (ops.shape(head_input)[0], -1))
            logits = self._dense_logits(head_flat)
        return (flat if self.need_features else None), logits

    # ------------------------------------------------------------ the data

    def batches(
        self,
        data: Data,
        *,
        batch_size: int = 256,
        arg_name: str = "data",
        with_labels: bool = False,
        label_classes: int | None = None,
        verbose: Verbose = 0,
        stage: str | None = None,
        need_logits: bool = True,
        distribution: Any = None,
    ) -> Iterator[Batch]:
        """Yields a `Batch` per batch of `data`: one streaming pass.

        Args:
            data: Arrays (`x`, `(x,)`, `(x, y)`, `(x, y, w)`), sliced into
                `batch_size` rows, or a batched dataset / iterable of those.
            batch_size: Rows per batch for arrays.
            arg_name: The argument's name in error messages.
            with_labels: Whether to read labels (`None` in a batch without).
            label_classes: If given, labels must be class ids in
                `[0, label_classes)` or one-hot rows of that width.
            verbose: `"auto"`, 0, 1 or 2 (see `resolve_verbose`).
            stage: What the progress line says (defaults to `arg_name`).
            need_logits: Whether to compute the logits. Without them (detectors'
                fitting and scoring) features that are the model's input are
                read as they are (no forward pass) and other features come from
                a features-only model; `Batch.logits` is then `None`.
            distribution: A `keras.distribution` distribution (JAX) that shards
                each batch of the features-only pass over its devices, or `None`.
        """

        def labels_of(y: Any, examples: int) -> np.ndarray | None:
            if not with_labels or y is None:
                return None
            labels = _data.class_ids(y, arg_name, label_classes)
            if len(labels) != examples:
                raise ValueError(
                    f"Each `{arg_name}` batch needs one label per example. "
                    f"Received: {examples} examples and {len(labels)} labels"
                )
            return labels

        progress = Progress(stage or arg_name, num_batches(data, batch_size), verbose)
        checked = False
        features_only = self.need_features and not need_logits
        with progress:
            for x, y in _data.iter_batches(data, arg_name, batch_size):
                if not checked:
                    _data.check_batched(self.model, x, arg_name)
                    checked = True
                if features_only:
                    feats = self._features_of(x, distribution)
                    labels = labels_of(y, len(feats))
                    progress.add(len(feats))
                    yield Batch(feats, None, labels, ~np.isfinite(feats).all(axis=1))
                    continue
                outputs = _predict_batch(self.net, x)
                feats, logits = self._split(outputs)
                logits = np.asarray(ops.convert_to_numpy(logits))
                if logits.ndim != 2:
                    raise ValueError(
                        "The model must return logits of shape (batch, classes). "
                        f"Received: model output of shape {logits.shape}"
                    )
                if self.isomax is not None and logits.shape[-1] != self.num_classes:
                    raise ValueError(
                        f"Could not read the logits of IsoMaxPlusLayer '{self.isomax.name}' "
                        f"({self.num_classes} classes) from the model's output of shape "
                        f"{logits.shape}; make the layer's output a model output. "
                        f"Received: model={self.model.name!r}"
                    )
                if self.num_classes is None:
                    self._check_probabilities(logits)
                nonfinite = _data.nonfinite_flags(x)
                if nonfinite is None:
                    nonfinite = np.zeros(len(logits), bool)
                if nonfinite.shape != (len(logits),):
                    raise ValueError(
                        f"`{arg_name}` gave {len(logits)} outputs for {nonfinite.size} inputs. "
                        f"Received: {arg_name} with mismatched outputs"
                    )
                if feats is not None:
                    feats = np.asarray(ops.convert_to_numpy(feats), np.float32)
                    if nonfinite.any():
                        # The library's non-finite rule: an input holding NaN/Inf has
                        # NaN features, whatever the backbone made of it.
                        feats = np.where(nonfinite[:, None], np.float32(np.nan), feats)
                labels = labels_of(y, len(logits))
                progress.add(len(logits))
                yield Batch(feats, logits, labels, nonfinite)

    def _features_of(self, x: Any, distribution: Any = None) -> np.ndarray:
        """Flat float32 features `(B, F)` of a batch, NaN rows where `x` has NaN/Inf."""
        if self.features_are_input and _data.is_array_like(x):
            feats = np.asarray(x if isinstance(x, np.ndarray) else ops.convert_to_numpy(x))
            return feats.reshape(len(feats), -1).astype(np.float32, copy=False)
        if self._features_net is None:
            outputs = self.net.outputs
            self._features_net = keras.Model(self.net.inputs, outputs[0])
        sharded = _distributed_input(x, distribution)
        if sharded is not None:  # Each device runs the forward pass on its share.
            out = self._features_net(sharded, training=False)
        else:
            out = _predict_batch(self._features_net, x)
        feats = np.asarray(ops.convert_to_numpy(out))
        feats = feats.reshape(len(feats), -1).astype(np.float32, copy=False)
        nonfinite = _data.nonfinite_flags(x)
        if nonfinite is not None and nonfinite.any():
            feats = np.where(nonfinite[:, None], np.float32(np.nan), feats)
        return feats

    def collect(self, data: Data, **kwargs: Any) -> Batch:
        """All batches of `batches(data, **kwargs)` concatenated (labels `None` if any
        batch has none).

        Raises:
            ValueError: If `data` holds no examples.
        """
        arg_name = kwargs.get("arg_name", "data")
        feats, logits, labels, flags = [], [], [], []
        missing_labels = False
        for batch in self.batches(data, **kwargs):
            logits.append(batch.logits)
            flags.append(batch.nonfinite)
            if batch.features is not None:
                feats.append(batch.features)
            if batch.labels is None:
                missing_labels = True
            else:
                labels.append(batch.labels)
        if not logits or sum(len(b) for b in logits) == 0:
            raise ValueError(f"`{arg_name}` holds no examples. Received: empty {arg_name}")
        return Batch(
            np.concatenate(feats) if feats else None,
            np.concatenate(logits),
            None if missing_labels or not labels else np.concatenate(labels),
            np.concatenate(flags),
        )

    def _check_probabilities(self, logits: np.ndarray) -> None:
        """Warns once when a model whose head could not be found outputs probabilities."""
        if self._warned_probabilities or logits.shape[-1] < 2 or len(logits) == 0:
            return
        if (
            np.all(logits >= 0)
            and np.all(logits <= 1)
            and np.allclose(logits.sum(axis=-1), 1.0, atol=1e-3)
        ):
            self._warned_probabilities = True
            warnings.warn(
                f"Model {self.model.name!r} seems to output probabilities and does not end "
                "in a `Dense` classifier whose pre-softmax logits could be read (a "
                "subclassed model?); its output is scored as logits. Give it a `Dense` "
                "head, or score a model that outputs logits.",
                stacklevel=4,
            )


def _predict_batch(net: Any, x: Any) -> Any:
    """`net.predict_on_batch(x)`, or `net.predict` for a model made under a
    `tf.distribute` strategy with several replicas: Keras' `predict_on_batch`
    runs the whole batch on every replica there and concatenates the copies."""
    strategy = getattr(net, "distribute_strategy", None)
    if strategy is not None and getattr(strategy, "num_replicas_in_sync", 1) > 1:
        rows = len(keras.tree.flatten(x)[0])
        return net.predict(x, batch_size=rows, verbose=0)
    if keras.backend.backend() == "torch":
        # Keras' PyTorch `predict_on_batch` passes NumPy arrays to the model as they
        # are: a model whose inputs are a 1-list then warns on every batch that the
        # input structures differ (the other backends convert to tensors first).
        x = keras.tree.map_structure(ops.convert_to_tensor, x)
    return net.predict_on_batch(x)


def _distributed_input(x: Any, distribution: Any) -> Any:
    """`x` laid out by `distribution` (batch split over its devices), or None."""
    if distribution is None or not _data.is_array_like(x):
        return None
    shape = tuple(x.shape)
    devices = int(np.prod(distribution.device_mesh.shape))
    if not shape or shape[0] % devices:
        return None  # A batch that does not split evenly runs as usual.
    layout = distribution.get_data_layout(shape)
    return keras.distribution.distribute_tensor(np.asarray(x), layout)


def _symbolic_inputs(model: Any) -> Any:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    return inputs or None


def _symbolic(layer: Any, which: str) -> Any:
    try:
        return getattr(layer, which)
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"The features of layer {layer.name!r} cannot be read: it is not called once "
            f"on symbolic inputs ({error}). Received: layer={layer.name!r}"
        ) from error


def _pick(outputs: Any, index: int | None) -> Any:
    if isinstance(outputs, Mapping):
        outputs = list(outputs.values())
    if isinstance(outputs, list | tuple):
        if index is None:
            if len(outputs) != 1:
                raise TypeError(
                    f"The model returns {len(outputs)} outputs; expected one "
                    "(the logits). Received: model with several outputs"
                )
            return outputs[0]
        return outputs[index]
    return outputs


def num_batches(data: Data, batch_size: int) -> int | None:
    """The number of batches of `data` when known cheaply, else `None`."""
    try:
        if _data.is_in_memory(data):
            x, _ = _data.split_element(data, "data")
            return math.ceil(_data.num_rows(x) / batch_size)
        cardinality = getattr(data, "cardinality", None)
        if callable(cardinality):
            value = int(cardinality())
            return value if value >= 0 else None
        return len(data)
    except Exception:  # Unknown size: the progress bar counts without a target.
        return None


# ---------------------------------------------------------------- progress


def resolve_verbose(verbose: Verbose) -> int:
    """Keras' convention: `"auto"` is a progress bar in a terminal, else one line per
    stage; 0 silent; 1 progress bar; 2 one line per stage.

    Raises:
        ValueError: If `verbose` is not one of `"auto"`, 0, 1, 2.
    """
    if isinstance(verbose, bool) or verbose not in VERBOSE_CHOICES:
        raise ValueError(
            f"`verbose` must be one of {VERBOSE_CHOICES}. Received: verbose={verbose!r}"
        )
    if verbose == "auto":
        return 1 if getattr(sys.stdout, "isatty", lambda: False)() else 2
    return int(verbose)


class Progress:
    """Progress of one stage over batches: a `keras.utils.Progbar` or one line."""

    def __init__(self, stage: str, target: int | None, verbose: Verbose) -> None:
        self.stage = stage
        self.target = target
        self.verbose = resolve_verbose(verbose)
        self.examples = 0
        self.batches = 0
        self.bar: Any = None
        self.start: Any = None

    def __enter__(self) -> Progress:
        self.start = time.perf_counter()
        if self.verbose == 1:
            print(self.stage, flush=True)
            self.bar = keras.utils.Progbar(self.target, unit_name="batch")
        return self

    def add(self, examples: int) -> None:
        self.examples += examples
        self.batches += 1
        if self.bar is not None:
            self.bar.update(self.batches, finalize=False)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        if exc_type is not None:
            return False
        if self.bar is not None:
            self.bar.update(self.batches, finalize=True)
        elif self.verbose == 2:
            seconds = time.perf_counter() - self.start
            print(f"{self.stage}: {self.examples} examples, {seconds:.1f} s", flush=True)
        return False


def check_isomax(model: Any, what: str, *, detector_hint: bool = True) -> IsoMaxPlusLayer:
    """The model's `IsoMaxPlusLayer`, or an error that says what to do with a SoftMax model.

    Args:
        model: The model.
        what: What needs the layer (e.g. "`calibrate_threshold`").
        detector_hint: Whether the caller also takes `detector=`.
    """
    try:
        return find_isomax_layer(model)
    except ValueError as error:
        if "has no `IsoMaxPlusLayer`" not in str(error):
            raise
        name = getattr(model, "name", type(model).__name__)
        hint = (
            ", or score it with a detector: pass `detector=` (e.g. "
            "`keras_isomax.detectors.ClassMeans().fit(model, (x, y))`)"
            if detector_hint
            else ""
        )
        raise ValueError(
            f"{what} needs a model with an `IsoMaxPlusLayer`; model {name!r} has none (a "
            "SoftMax classifier?). Swap its head with `keras_isomax.replace_head(model, "
            f"init_data=(x, y))`{hint}. Received: model={name!r}"
        ) from None
