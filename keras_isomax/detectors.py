"""Feature-based OOD detectors (KNN, Mahalanobis, ViM) and logit scores as detectors.

A detector is a `keras.layers.Layer` whose variables hold its fitted state
(the KNN bank, the Mahalanobis means and whitening matrix, the ViM null space),
plus a `threshold` variable set by `calibrate_threshold(..., detector=det)`.

```python
det = detectors.KNN(k=50).fit(model, (x_train, y_train))  # one streaming pass
scores = det.score(x_test)  # NumPy, higher = more in-distribution
```

Features are the input of the classifier head (of the `IsoMaxPlusLayer`, or
of the final logits `Dense` or 1x1 `Conv2D` head of a SoftMax model);
`features="layer_name"` takes another layer's output. Every score is higher
for more in-distribution inputs. `det.save("det.keras")` writes the detector
alone; `detectors.load(path).attach(model)` restores it and checks that the
classifier's head is the one it was fitted on.

Definitions, their relation to pytorch-ood 0.4.0, memory and saving:
docs/evaluation.md ("Detectors: KNN, Mahalanobis, ViM").
"""

from __future__ import annotations

import hashlib
import math
import os

import keras
import numpy as np
from keras import ops

from keras_isomax import _inspect, _serving
from keras_isomax import scores as scores_lib
from keras_isomax.layers import l2_normalize

__all__ = [
    "KNN",
    "Detector",
    "Energy",
    "Entropic",
    "Mahalanobis",
    "MaxLogit",
    "MaxProbability",
    "MinimumDistance",
    "ViM",
    "get",
    "load",
]


# ---------------------------------------------------------------- the model


class _Extractor:
    """Features (B, F) and logits (B, C) of a classifier, from its head."""

    def __init__(self, model, features=None):
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"`model` must be a `keras.Model`. Received: model={type(model).__name__}"
            )
        self.model = model
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):
            inputs = None
        if not inputs:
            raise ValueError(
                "Detectors need a built Sequential or functional model with symbolic "
                f"inputs. Received: model={model.name!r}"
            )
        self.isomax = None
        self.dense = None
        try:
            self.isomax = _inspect.find_isomax_layer(model)
        except ValueError:
            pass
        if self.isomax is not None:
            head_features = self.isomax.input
            logits = self.isomax.output
            self.head_name = self.isomax.name
            self.num_classes = self.isomax.num_classes
        else:
            try:
                found = _inspect.find_classifier(model)
            except ValueError as error:
                raise ValueError(
                    "Detectors need a model with an `IsoMaxPlusLayer` or ending in a linear "
                    f"classifier (`Dense` + softmax), as `replace_head` does: {error}"
                ) from error
            self.dense = found.classifier
            head_features = found.features
            logits = None
            self.head_name = self.dense.name
            self.num_classes = int(found.kernel.shape[-1])
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
        if logits is None:  # SoftMax head: pre-activation logits from its input.
            logits = found.features
        self.runner = keras.Model(inputs, [head_features, logits])
        dims = head_features.shape[1:]
        if any(d is None for d in dims):
            raise ValueError(
                f"The features must have a known size. Received: features of shape "
                f"{tuple(head_features.shape)}"
            )
        self.feature_dim = int(np.prod(dims))
        self.fingerprint = self._fingerprint(features)

    def _fingerprint(self, features):
        kernel = self.isomax.prototypes if self.isomax is not None else self.dense.kernel
        digest = hashlib.sha1(np.ascontiguousarray(ops.convert_to_numpy(kernel)).tobytes())
        return f"{self.head_name}:{features or ''}:{self.feature_dim}:{digest.hexdigest()[:16]}"

    def dense_logits(self, flat):
        """Pre-activation logits of the SoftMax head, read live from its variables."""
        kernel = ops.reshape(self.dense.kernel, (-1, self.num_classes))
        logits = ops.matmul(flat, ops.cast(kernel, flat.dtype))
        if getattr(self.dense, "use_bias", False) and self.dense.bias is not None:
            logits = logits + ops.cast(self.dense.bias, flat.dtype)
        return logits

    def split(self, outputs):
        """`(features (B, F) float32, logits (B, C) float32)` from the runner's outputs."""
        feats = ops.reshape(ops.cast(outputs[0], "float32"), (-1, self.feature_dim))
        second = ops.cast(outputs[1], "float32")
        if self.isomax is not None:
            return feats, second
        return feats, self.dense_logits(ops.reshape(second, (ops.shape(second)[0], -1)))

    def symbolic(self, inputs):
        """Features and logits of a batch (eager tensors or inside a graph)."""
        return self.split(self.runner(inputs, training=False))

    def batches(self, data, batch_size, arg_name, with_labels):
        """Yields `(features, logits, labels or None)` NumPy batches: one streaming pass."""
        for x_batch, y_batch in _inspect.iter_batches(data, arg_name, batch_size):
            outputs = self.runner.predict_on_batch(x_batch)
            feats, logits = self.split(outputs)
            feats = np.asarray(ops.convert_to_numpy(feats))
            logits = None if logits is None else np.asarray(ops.convert_to_numpy(logits))
            # The library's non-finite rule: an input holding NaN/Inf has NaN
            # features, whatever the backbone made of it.
            bad = _inspect.nonfinite_flags(x_batch)
            if bad is not None and bad.any():
                feats = np.where(bad[:, None], np.float32(np.nan), feats).astype(feats.dtype)
            labels = None
            if with_labels:
                if y_batch is None:
                    raise ValueError(
                        f"`{arg_name}` must hold labels `(x, y)` for this detector. "
                        f"Received: {arg_name} without labels"
                    )
                labels = _inspect.class_ids(y_batch, arg_name)
                if len(labels) != len(feats):
                    raise ValueError(
                        f"Each `{arg_name}` batch needs one label per example. Received: "
                        f"{len(feats)} examples and {len(labels)} labels"
                    )
            yield feats, logits, labels


def _check_finite(feats, arg_name):
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        raise ValueError(
            f"The model gives non-finite features for {int(bad.sum())} examples of "
            f"`{arg_name}` (NaN or Inf inputs?); remove them before fitting. "
            f"Received: {arg_name} with non-finite features"
        )


class _Reservoir:
    """A seeded uniform sample of at most `size` rows of a stream (algorithm R).

    The draws depend only on the row order, not on how the stream is batched.
    """

    def __init__(self, size, seed):
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.rows = None
        self.seen = 0

    def add(self, batch):
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

    def sample(self):
        return self.rows[: min(self.seen, self.size)]


# ----------------------------------------------------------------- base class


class Detector(keras.layers.Layer):
    """Base class: a layer that scores features or logits, fitted on a model.

    Subclasses implement `_fit_stream` (host-side fitting, float64) and
    `call` (keras.ops scoring of a batch of features, or of logits when
    `input_kind == "logits"`).

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

    def __init__(self, features=None, batch_size=256, state=None, model_fingerprint=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if features is not None and not isinstance(features, str):
            raise TypeError(
                f"`features` must be a layer name or None. Received: features={features!r}"
            )
        _inspect.check_int(batch_size, "batch_size", numpy=False)
        self.features = features
        self.batch_size = batch_size
        self.state = dict(state) if state else None  # Shapes of the fitted state.
        self.model_fingerprint = model_fingerprint
        self._extractor = None
        self.threshold = self.add_weight(
            name="threshold",
            shape=(),
            initializer=keras.initializers.Constant(math.nan),
            trainable=False,
            dtype="float32",
        )

    # -- state
    def _state_specs(self, state):
        """`{name: (shape, dtype)}` of the fitted variables for `state`."""
        return {}

    def _make_state(self, state):
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

    def build(self, input_shape):
        if self.state and self._state_specs(self.state):
            self._make_state(self.state)  # A reloaded detector: variables, then weights.
        self.built = True

    @property
    def is_fitted(self):
        """Whether the detector holds fitted state."""
        return self.state is not None or self.input_kind == "logits"

    @property
    def is_calibrated(self):
        """Whether `threshold` holds a calibrated (finite) value."""
        return math.isfinite(float(ops.convert_to_numpy(self.threshold)))

    # -- fitting and binding
    def fit(self, model, data=None):
        """Fits the detector on in-distribution data in one streaming pass.

        Args:
            model: The trained classifier (`keras.Model`).
            data: `(x, y)` arrays, or a batched `tf.data.Dataset` (or other
                iterable) of `(x, y)` batches. Labels are needed by
                `Mahalanobis` only. Logit detectors need no data. Defaults to
                `None`.

        Returns:
            The detector itself.

        Raises:
            ValueError: If the data is empty, has non-finite features or
                misses labels or classes, or the detector's arguments do not
                fit the data (see each detector).
        """
        extractor = _Extractor(model, self.features)
        if self.input_kind != "logits":
            if data is None:
                raise ValueError(
                    f"{type(self).__name__}.fit needs in-distribution data. Received: data=None"
                )
            stream = extractor.batches(data, self.batch_size, "data", self.needs_labels)
            self._fit_stream(extractor, stream)
        self.model_fingerprint = extractor.fingerprint
        self._extractor = extractor
        self.built = True  # The state variables exist now (export needs a built layer).
        return self

    def attach(self, model):
        """Binds a fitted (e.g. reloaded) detector to its classifier.

        Args:
            model: The classifier the detector was fitted on.

        Returns:
            The detector itself.

        Raises:
            ValueError: If the model's head differs from the one the detector
                was fitted on.
        """
        extractor = _Extractor(model, self.features)
        if self.model_fingerprint is not None and extractor.fingerprint != self.model_fingerprint:
            raise ValueError(
                f"This {type(self).__name__} was fitted on a different model (head "
                f"{self.model_fingerprint!r}); fit it on this one. "
                f"Received: model={model.name!r} with head {extractor.fingerprint!r}"
            )
        self._extractor = extractor
        return self

    def _check_fitted(self):
        if not self.is_fitted:
            raise ValueError(
                f"{type(self).__name__} is not fitted; call `.fit(model, data)` first. "
                f"Received: detector={self.name!r}"
            )

    def _bound(self, model):
        self._check_fitted()
        if model is not None and (self._extractor is None or self._extractor.model is not model):
            self.attach(model)
        if self._extractor is None:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} is not bound to a model (reloaded?); "
                "call `.attach(model)` or pass `model=`. Received: model=None"
            )
        return self._extractor

    def bind_for_export(self, model, threshold=None):
        """Binds the detector to `model` and checks it has a threshold to export.

        A logit detector is first fitted on `model` (it needs no data).

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
        if self.input_kind == "logits" and not self.state:
            self.fit(model)
        self._check_fitted()
        self.attach(model)  # Raises if fitted on another model.
        if threshold is None and not self.is_calibrated:
            raise ValueError(
                f"Detector {self.name!r} has no calibrated threshold. Call "
                "`calibrate_threshold(model, in_val_data, detector=det)` before exporting, "
                "or pass `threshold=` explicitly. Received: threshold=None"
            )
        return self._extractor.num_classes

    def _fit_stream(self, extractor, stream):
        """Fits the state from `(features, logits, labels)` batches; each feature detector
        (`KNN`, `Mahalanobis`, `ViM`) defines it. The base class cannot be fitted."""
        raise TypeError(
            "`Detector` is the base class; fit one of KNN, Mahalanobis, ViM or a logit "
            f"detector. Received: detector of type {type(self).__name__}"
        )

    # -- scoring
    def score_batch(self, feats, logits):
        """Scores one batch given features and logits (keras.ops; traceable)."""
        if self.input_kind == "logits":
            return self(logits)
        return self(feats)

    def score_inputs(self, inputs, model=None):
        """`(score, logits)` of a batch of model inputs, as tensors (traceable)."""
        extractor = self._bound(model)
        feats, logits = extractor.symbolic(inputs)
        return self.score_batch(feats, logits), logits

    def score(self, x, model=None):
        """Scores inputs: higher means more in-distribution.

        Args:
            x: Inputs: an array, a tuple `(x, ...)` or a batched dataset.
            model: The classifier, if the detector is not bound to it yet
                (after `load`). Defaults to `None`.

        Returns:
            A float NumPy array `(N,)`. Inputs with non-finite features score NaN.

        Raises:
            ValueError: If the detector is not fitted or is used with another
                model than the one it was fitted on.
        """
        return self.score_and_logits(x, model)[0]

    def score_and_logits(self, x, model=None, arg_name="x"):
        """`(scores (N,), logits (N, C))` as NumPy arrays, one pass over `x`."""
        extractor = self._bound(model)
        values, all_logits = [], []
        for feats, logits, _ in extractor.batches(x, self.batch_size, arg_name, False):
            out = self._score_host(feats, logits)
            values.append(np.asarray(ops.convert_to_numpy(out), np.float64).reshape(-1))
            all_logits.append(logits)
        if not values or sum(len(v) for v in values) == 0:
            raise ValueError(f"`{arg_name}` holds no examples. Received: empty {arg_name}")
        return np.concatenate(values), np.concatenate(all_logits)

    def _score_host(self, feats, logits):
        """Scores NumPy batches on the host (`score`); `call` is the traceable twin."""
        return self.score_batch(ops.convert_to_tensor(feats), logits)

    def _nan_rows(self, feats, score):
        # The library's non-finite rule in its converter-friendly form (no
        # `isfinite`, no float `where`: the LiteRT/ONNX exports trace this).
        return _serving.nan_where(_serving.nonfinite_rows(feats), score)

    # -- saving
    def get_config(self):
        return {
            **super().get_config(),
            "features": self.features,
            "batch_size": self.batch_size,
            "state": self.state,
            "model_fingerprint": self.model_fingerprint,
        }

    def save(self, filepath):
        """Writes the fitted detector (state, threshold, config) to a `.keras` file."""
        filepath = os.fspath(filepath)
        if not filepath.endswith(".keras"):
            raise ValueError(f"`filepath` must end in `.keras`. Received: filepath={filepath!r}")
        size = self._input_size()
        inputs = keras.Input((size,), dtype="float32")
        wrapper = keras.Model(inputs, self(inputs), name=f"{self.name}_detector")
        wrapper.save(filepath)

    def _input_size(self):
        if not self.is_fitted or not self.state:
            if self.input_kind == "logits" and self.state:
                return self.state["num_classes"]
            raise ValueError(
                f"Only a fitted detector can be saved. Received: detector={self.name!r}"
            )
        return self.state.get("feature_dim") or self.state["num_classes"]


def load(filepath):
    """Loads a detector written by `Detector.save`; bind it with `.attach(model)`.

    Args:
        filepath: Path of the `.keras` file.

    Returns:
        The `Detector`.
    """
    wrapper = keras.saving.load_model(filepath)
    found = [layer for layer in wrapper.layers if isinstance(layer, Detector)]
    if len(found) != 1:
        raise ValueError(
            f"{filepath!r} does not hold one keras_isomax detector. Received: filepath={filepath!r}"
        )
    return found[0]


# ---------------------------------------------------------------------- KNN


@keras.saving.register_keras_serializable(package="keras_isomax")
class KNN(Detector):
    """Distance to the k-th nearest training feature, on L2-normalised features.

    The bank of normalised training features is kept as float32 (optionally a
    seeded uniform subset of `max_bank` rows), in variables of `chunk_size`
    rows each, filled while streaming (fitting holds one bank plus one chunk).
    Scoring searches it chunk by chunk by one matrix product and a running
    top-k, so memory is `O(batch_size * (chunk_size + k))` on top of the bank,
    whatever its size.

    Args:
        k: Which nearest neighbour. Defaults to `50`.
        max_bank: Keep at most this many training features (a seeded uniform
            random subset of the stream), or `None` for all. Defaults to `None`.
        seed: Seed of the subset. Defaults to `0`.
        chunk_size: Bank rows per variable and per matrix product when
            scoring. Defaults to `32768`.
        **kwargs: `features`, `batch_size` and `keras.layers.Layer` arguments.

    Example:

    >>> import numpy as np, keras
    >>> from keras_isomax import detectors
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
    ...                           keras.layers.Dense(3, activation="softmax")])
    >>> x = np.random.default_rng(0).normal(size=(200, 4)).astype("float32")
    >>> det = detectors.KNN(k=5).fit(model, (x, np.zeros(200)))
    >>> det.score(x[:3]).shape
    (3,)
    """

    def __init__(self, k=50, max_bank=None, seed=0, chunk_size=32768, **kwargs):
        super().__init__(**kwargs)
        _inspect.check_int(k, "k")
        _inspect.check_int(max_bank, "max_bank", allow_none=True)
        _inspect.check_int(chunk_size, "chunk_size", numpy=False)
        self.k = int(k)
        self.max_bank = None if max_bank is None else int(max_bank)
        self.seed = seed
        self.chunk_size = chunk_size

    def _state_specs(self, state):
        n, f, rows = state["bank_size"], state["feature_dim"], state["chunk_rows"]
        return {
            f"bank_{i}": ((min(rows, n - start), f), "float32")
            for i, start in enumerate(range(0, n, rows))
        }

    @property
    def bank(self):
        """The whole bank `(bank_size, F)` as one tensor (for inspection)."""
        return ops.concatenate(self._bank_chunks(), axis=0)

    def _bank_chunks(self):
        return [getattr(self, name) for name in self._state_specs(self.state)]

    def _store_chunk(self, index, rows):
        """Creates (or, when refitting, reuses) variable `bank_{index}`: memory ~ one bank."""
        name = f"bank_{index}"
        existing = getattr(self, name, None)
        if isinstance(existing, keras.Variable):
            if tuple(existing.shape) != rows.shape:
                raise ValueError(
                    f"This KNN was fitted on a bank of another size; create a new detector to "
                    f"refit. Received: data giving bank chunk of shape {rows.shape}"
                )
            existing.assign(rows)
            return
        variable = self.add_weight(
            name=name, shape=rows.shape, initializer="zeros", trainable=False, dtype="float32"
        )
        variable.assign(rows)
        setattr(self, name, variable)

    def _fit_stream(self, extractor, stream):
        rows = self.chunk_size
        reservoir = None if self.max_bank is None else _Reservoir(self.max_bank, self.seed)
        buffer, filled, stored, total = None, 0, 0, 0
        for feats, _, _ in stream:
            _check_finite(feats, "data")
            normed = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
            normed = normed.astype(np.float32)
            total += len(normed)
            if reservoir is not None:
                reservoir.add(normed)
                continue
            if buffer is None:
                buffer = np.empty((rows, normed.shape[1]), np.float32)
            while len(normed):
                take = min(rows - filled, len(normed))
                buffer[filled : filled + take] = normed[:take]
                filled, normed = filled + take, normed[take:]
                if filled == rows:  # A full chunk becomes a variable right away.
                    self._store_chunk(stored, buffer)
                    stored, filled = stored + 1, 0
        if total == 0:
            raise ValueError("`data` holds no examples. Received: empty data")
        size = total if reservoir is None else min(total, self.max_bank)
        if self.k > size:
            raise ValueError(
                f"`k` must not exceed the number of bank features ({size}). Received: k={self.k}"
            )
        if reservoir is not None:
            sample = reservoir.sample()
            for index, start in enumerate(range(0, size, rows)):
                self._store_chunk(index, sample[start : start + rows])
        elif filled:
            self._store_chunk(stored, buffer[:filled].copy())
        self._make_state(
            {"bank_size": size, "feature_dim": extractor.feature_dim, "chunk_rows": rows}
        )

    def _score_host(self, feats, logits):
        # NumPy BLAS on the host: ~3x faster than TF's CPU matmul measured here (AMD EPYC);
        # same arithmetic as `call` (float32 product, k-th largest cosine, sqrt(2 - 2 cos)).
        feats = np.asarray(feats, np.float32).reshape(-1, self.state["feature_dim"])
        norms = np.sqrt(np.sum(feats * feats, axis=1, keepdims=True))
        query = feats / np.maximum(norms, np.float32(1e-12))
        top = None
        for variable in self._bank_chunks():
            block = ops.convert_to_numpy(variable)  # A copy of one chunk at a time (bounded).
            sims = query @ block.T
            merged = sims if top is None else np.concatenate([top, sims], axis=1)
            width = merged.shape[1]
            top = (
                merged
                if width <= self.k
                else np.partition(merged, width - self.k, axis=1)[:, width - self.k :]
            )
        kth = top.min(axis=1).astype(np.float64)
        score = -np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
        score[~np.isfinite(feats).all(axis=1)] = np.nan
        return score

    def call(self, inputs):
        feats = ops.cast(ops.reshape(inputs, (-1, self.state["feature_dim"])), "float32")
        query = l2_normalize(feats)
        top = None
        for block in self._bank_chunks():  # Memory: batch x chunk similarities at a time.
            sims = ops.matmul(query, ops.transpose(block))
            merged = sims if top is None else ops.concatenate([top, sims], axis=1)
            top = merged if merged.shape[1] < self.k else ops.top_k(merged, self.k)[0]
        kth = ops.min(top, axis=1)  # The k-th largest cosine similarity.
        score = -ops.sqrt(ops.maximum(2.0 - 2.0 * kth, 0.0))
        return self._nan_rows(feats, score)

    def get_config(self):
        return {
            **super().get_config(),
            "k": self.k,
            "max_bank": self.max_bank,
            "seed": self.seed,
            "chunk_size": self.chunk_size,
        }


# -------------------------------------------------------------- Mahalanobis


@keras.saving.register_keras_serializable(package="keras_isomax")
class Mahalanobis(Detector):
    """Minus the smallest squared Mahalanobis distance to a class mean.

    One streaming pass accumulates, in float64, per-class sums and counts and
    the total cross-product matrix (memory `O(C * F + F^2)`, not `O(N * F)`).
    The shared covariance is the pooled within-class scatter plus `ridge`
    times the identity, divided by the number of examples N. It is stored as
    a whitening matrix, so a score is one `(B, F) x (F, F)` product and a
    distance to every whitened class mean.

    Args:
        ridge: Added to the diagonal of the (un-normalised) pooled scatter
            matrix, as pytorch-ood does. Defaults to `1e-6`.
        num_classes: Number of classes; `None` takes the classifier's.
            Defaults to `None`.
        **kwargs: `features`, `batch_size` and `keras.layers.Layer` arguments.
    """

    needs_labels = True

    def __init__(self, ridge=1e-6, num_classes=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not ridge >= 0:
            raise ValueError(f"`ridge` must be a number >= 0. Received: ridge={ridge!r}")
        _inspect.check_int(num_classes, "num_classes", allow_none=True, numpy=False)
        self.ridge = float(ridge)
        self.num_classes = num_classes

    def _state_specs(self, state):
        c, f = state["num_classes"], state["feature_dim"]
        return {
            "center": ((f,), "float32"),
            "whitening": ((f, f), "float32"),
            "whitened_means": ((c, f), "float32"),
        }

    def _fit_stream(self, extractor, stream):
        c = self.num_classes or extractor.num_classes
        f = extractor.feature_dim
        shift = None
        sums = np.zeros((c, f), np.float64)
        counts = np.zeros(c, np.int64)
        cross = np.zeros((f, f), np.float64)
        for feats, _, labels in stream:
            _check_finite(feats, "data")
            if len(feats) == 0:
                continue
            if labels.size and (labels.min() < 0 or labels.max() >= c):
                raise ValueError(
                    f"Labels of `data` must be class ids in [0, {c}). "
                    f"Received: labels {np.unique(labels[(labels < 0) | (labels >= c)])[:5].tolist()}"
                )
            z = feats.astype(np.float64)
            if shift is None:
                shift = z.mean(axis=0)  # Shifted sums: no cancellation for large means.
            z = z - shift
            onehot = np.zeros((len(z), c), np.float64)
            onehot[np.arange(len(z)), labels] = 1.0
            sums += onehot.T @ z
            counts += np.bincount(labels, minlength=c)
            cross += z.T @ z
        total = int(counts.sum())
        if total == 0:
            raise ValueError("`data` holds no examples. Received: empty data")
        missing = np.flatnonzero(counts == 0)
        if missing.size:
            raise ValueError(
                f"Mahalanobis needs examples of every class; {missing.size} of {c} classes "
                f"have none. Received: data without classes {missing[:10].tolist()}"
            )
        means = sums / counts[:, None]
        scatter = cross - (means * counts[:, None]).T @ means
        covariance = (scatter + self.ridge * np.eye(f)) / total
        covariance = (covariance + covariance.T) / 2
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        if eigenvalues.min() <= 0:
            raise ValueError(
                "The pooled covariance is singular (constant features and `ridge=0`?). "
                f"Received: ridge={self.ridge}"
            )
        whitening = eigenvectors / np.sqrt(eigenvalues)  # W W^T = covariance^-1.
        center = (counts @ means) / total  # Centred (shifted) global mean.
        self._make_state({"num_classes": c, "feature_dim": f})
        self.center.assign((center + shift).astype(np.float32))
        self.whitening.assign(whitening.astype(np.float32))
        self.whitened_means.assign(((means - center) @ whitening).astype(np.float32))

    def call(self, inputs):
        feats = ops.cast(ops.reshape(inputs, (-1, self.state["feature_dim"])), "float32")
        a = ops.matmul(feats - self.center, self.whitening)
        m = self.whitened_means
        d = (
            ops.sum(a * a, axis=1, keepdims=True)
            + ops.sum(m * m, axis=1)[None, :]
            - 2.0 * ops.matmul(a, ops.transpose(m))
        )
        score = -ops.maximum(ops.min(d, axis=1), 0.0)
        return self._nan_rows(feats, score)

    def get_config(self):
        return {**super().get_config(), "ridge": self.ridge, "num_classes": self.num_classes}


# ---------------------------------------------------------------------- ViM


@keras.saving.register_keras_serializable(package="keras_isomax")
class ViM(Detector):
    """Virtual-logit matching (Wang et al., 2022) on the classifier's linear head.

    For a `Dense` head `W`, `b` are its kernel and bias. For an
    `IsoMaxPlusLayer` the equivalent linear head on L2-normalised features is
    used: `W = (|s| / T) * normalised prototypes`, `b = 0` (see the module
    docstring). The second moment about `u` is accumulated in float64 in one
    pass; `alpha`'s mean residual norm is taken over a seeded uniform sample of
    at most `alpha_samples` training features (exact when the data has fewer
    rows).

    Args:
        dim: Dimension of the principal subspace, `1 <= dim < F`.
        alpha_samples: Rows kept to compute `alpha`. Defaults to `50000`.
        seed: Seed of that sample. Defaults to `0`.
        **kwargs: `features`, `batch_size` and `keras.layers.Layer` arguments.
    """

    def __init__(self, dim, alpha_samples=50000, seed=0, **kwargs):
        super().__init__(**kwargs)
        _inspect.check_int(dim, "dim")
        _inspect.check_int(alpha_samples, "alpha_samples", numpy=False)
        self.dim = int(dim)
        self.alpha_samples = alpha_samples
        self.seed = seed

    def _state_specs(self, state):
        f, c = state["feature_dim"], state["num_classes"]
        return {
            "kernel": ((f, c), "float32"),
            "bias": ((c,), "float32"),
            "origin": ((f,), "float32"),
            "null_space": ((f, f - self.dim), "float32"),
            "alpha": ((), "float32"),
        }

    def _head(self, extractor):
        if self.features is not None:
            raise ValueError(
                "ViM needs the input of the classifier head as features (its W and b act "
                f"on them). Received: features={self.features!r}"
            )
        if extractor.isomax is not None:
            layer = extractor.isomax
            protos = np.asarray(ops.convert_to_numpy(layer.prototypes), np.float64)
            protos /= np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
            scale = abs(float(ops.convert_to_numpy(layer.distance_scale))) / float(
                ops.convert_to_numpy(layer.temperature)
            )
            return scale * protos.T, np.zeros(protos.shape[0]), True
        kernel = np.asarray(ops.convert_to_numpy(extractor.dense.kernel), np.float64)
        kernel = kernel.reshape(-1, extractor.num_classes)
        bias = np.zeros(extractor.num_classes)
        if getattr(extractor.dense, "use_bias", False) and extractor.dense.bias is not None:
            bias = np.asarray(ops.convert_to_numpy(extractor.dense.bias), np.float64)
        return kernel, bias, False

    def _fit_stream(self, extractor, stream):
        kernel, bias, normalize = self._head(extractor)
        f, c = kernel.shape
        if self.dim >= f:
            raise ValueError(
                f"`dim` must be smaller than the feature dimension {f}. Received: dim={self.dim}"
            )
        origin = -(np.linalg.pinv(kernel.T) @ bias)
        moment = np.zeros((f, f), np.float64)
        reservoir = _Reservoir(self.alpha_samples, self.seed)
        max_logit_sum, total = 0.0, 0
        for feats, _, _ in stream:
            _check_finite(feats, "data")
            z = feats.astype(np.float64)
            if normalize:
                z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
            max_logit_sum += float((z @ kernel + bias).max(axis=1).sum())
            z = z - origin
            moment += z.T @ z
            reservoir.add(z.astype(np.float32))
            total += len(z)
        if total == 0:
            raise ValueError("`data` holds no examples. Received: empty data")
        _, eigenvectors = np.linalg.eigh(moment / total)
        null_space = eigenvectors[:, : f - self.dim]
        residual = np.linalg.norm(reservoir.sample().astype(np.float64) @ null_space, axis=1)
        alpha = (max_logit_sum / total) / residual.mean()
        if not np.isfinite(alpha):
            raise ValueError(
                "ViM's alpha is not finite (all training features inside the principal "
                f"subspace?). Received: dim={self.dim}"
            )
        self._make_state({"feature_dim": f, "num_classes": c, "normalize": normalize})
        self.kernel.assign(kernel.astype(np.float32))
        self.bias.assign(bias.astype(np.float32))
        self.origin.assign(origin.astype(np.float32))
        self.null_space.assign(null_space.astype(np.float32))
        self.alpha.assign(np.float32(alpha))

    def call(self, inputs):
        feats = ops.cast(ops.reshape(inputs, (-1, self.state["feature_dim"])), "float32")
        z = l2_normalize(feats) if self.state["normalize"] else feats
        logits = ops.matmul(z, self.kernel) + self.bias
        residual = ops.matmul(z - self.origin, self.null_space)
        norm = ops.sqrt(ops.sum(residual * residual, axis=1))
        score = ops.logsumexp(logits, axis=1) - self.alpha * norm
        return self._nan_rows(feats, score)

    def get_config(self):
        return {
            **super().get_config(),
            "dim": self.dim,
            "alpha_samples": self.alpha_samples,
            "seed": self.seed,
        }


# --------------------------------------------------------- logit detectors


class _LogitDetector(Detector):
    """A score of `keras_isomax.scores` on the classifier's logits, as a detector."""

    input_kind = "logits"
    score_name = None

    def fit(self, model, data=None):
        """Binds the detector to `model` (no fitting needed; `data` is ignored)."""
        extractor = _Extractor(model, self.features)
        self.state = {"num_classes": extractor.num_classes}
        return super().fit(model, None)

    def _input_size(self):
        if not self.state:
            raise ValueError(
                f"Bind the detector with `.fit(model)` before saving. Received: detector={self.name!r}"
            )
        return self.state["num_classes"]

    def _score_host(self, feats, logits):
        # NaN where the input held NaN/Inf (`batches` made those features NaN),
        # even when the backbone turned it into finite logits.
        return self._nan_rows(ops.convert_to_tensor(feats), self.score_batch(feats, logits))

    def call(self, inputs):
        return scores_lib.get(self.score_name)(ops.cast(inputs, "float32"))


def _logit_detector(class_name, score_name, doc):
    cls = type(class_name, (_LogitDetector,), {"score_name": score_name, "__doc__": doc})
    cls.__module__ = __name__
    return keras.saving.register_keras_serializable(package="keras_isomax")(cls)


MinimumDistance = _logit_detector(
    "MinimumDistance", "minimum_distance", "The minimum distance score (MDS) as a detector."
)
Entropic = _logit_detector("Entropic", "entropic", "The entropic score (ES) as a detector.")
MaxProbability = _logit_detector(
    "MaxProbability", "max_probability", "The maximum softmax probability as a detector."
)
MaxLogit = _logit_detector("MaxLogit", "max_logit", "The maximum logit as a detector.")
Energy = _logit_detector("Energy", "energy", "The energy score (logsumexp) as a detector.")

DETECTORS = {
    "knn": KNN,
    "mahalanobis": Mahalanobis,
    "vim": ViM,
    "minimum_distance": MinimumDistance,
    "entropic": Entropic,
    "max_probability": MaxProbability,
    "max_logit": MaxLogit,
    "energy": Energy,
}


def get(identifier, **kwargs):
    """Returns a new detector for a name (or a detector instance, unchanged).

    Args:
        identifier: One of `"knn"`, `"mahalanobis"`, `"vim"`,
            `"minimum_distance"`, `"entropic"`, `"max_probability"`,
            `"max_logit"`, `"energy"` (case-insensitive), or a `Detector`.
        **kwargs: Arguments of the detector's constructor (e.g. `k=10`,
            `dim=64`).

    Returns:
        A `Detector`.

    Raises:
        ValueError: If the name is unknown.
    """
    if isinstance(identifier, Detector):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower().removesuffix("_score")
        if key in DETECTORS:
            return DETECTORS[key](**kwargs)
    raise ValueError(
        f"Unknown detector; expected one of {sorted(DETECTORS)} or a Detector. "
        f"Received: detector={identifier!r}"
    )
