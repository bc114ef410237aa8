"""The IsoMax+ output layer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_isomax._numerics import NORM_EPSILON as _NORM_EPSILON
from keras_isomax._numerics import SQUARED_FLOOR as _SQUARED_FLOOR

if keras.backend.backend() == "tensorflow":
    # The TensorFlow-only part (fused logits with one gradient, the inference
    # cache), chosen once, like Keras' own backend-specific code.
    from keras_isomax import _tf_layer
else:
    _tf_layer = None  # type: ignore[assignment]


def l2_normalize(x: Any, axis: int = -1, epsilon: float = _NORM_EPSILON) -> Any:
    """Divides `x` by `max(||x||_2, epsilon)` along `axis`, with finite gradients.

    Unlike `tf.math.l2_normalize` (epsilon on the squared norm), `epsilon` bounds
    the norm itself, like PyTorch's `F.normalize` used by the IsoMax+ authors. An
    all-zero vector maps to zeros, with zero (not NaN) gradients.

    Args:
        x: Tensor to normalise.
        axis: Axis along which to normalise. Defaults to `-1`.
        epsilon: Lower bound on the norm. Defaults to `1e-12`.

    Returns:
        Tensor of the same shape and dtype as `x`.
    """
    squared_norm = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared_norm, epsilon * epsilon))


def _safe_sqrt(x: Any) -> Any:
    """`sqrt(x)` for `x >= 0` with gradient 0 (not inf/NaN) at 0; NaN stays NaN."""
    positive = x > 0
    root = ops.sqrt(ops.where(positive, x, ops.ones_like(x)))
    return ops.where(positive, root, x * 0)


def _row_norms_squared(x: Any) -> Any:
    """`sum(x**2, axis=-1)` of a 2D tensor."""
    return ops.sum(ops.square(x), axis=-1)


def _first_argmin(squared: Any) -> Any:
    """`(N,)` int32: the index of each row's minimum of `squared` `(N, C)`.

    On TensorFlow its `ArgMin` kernel (one pass; a LiteRT and ONNX builtin).
    Elsewhere the first minimum from a comparison, not `ops.argmin` on
    floats: Keras' float argmin bitcasts to test the sign bit, which neither
    LiteRT builtins nor ONNX runtimes have. (On ties any of the tied indices
    does: their distances agree.)
    """
    if _tf_layer is not None:
        return _tf_layer.first_argmin(squared)
    if isinstance(squared.shape[0], int) and squared.shape[0] == 0:
        # An eager empty batch: Keras' `min` refuses empty tensors on torch
        # (`initial=` would fix that, but jax2onnx cannot export it).
        return ops.zeros((0,), "int32")
    smallest = ops.min(squared, axis=-1, keepdims=True)  # (N, 1)
    return ops.argmax(ops.cast(squared <= smallest, "int32"), axis=-1)


def _distances(
    features: Any,
    prototypes: Any,
    p_sq: Any,
    inverse_norm: Any = None,
    exact_nearest: bool = True,
    kernel: Any = None,
    x_sq: Any = None,
) -> Any:
    """Distances `(N, C)` between `features` `(N, F)` and the prototypes.

    With `inverse_norm` (the `(C,)` values `1 / max(||p||, eps)`), the
    prototypes are compared after L2 normalisation, without building a
    normalised `(C, F)` copy: the inverse norms scale the `(N, C)` matrix
    product, and the one gathered nearest prototype per row is normalised like
    the features (same rounding, which keeps tiny distances accurate). `p_sq`
    holds the `(C,)` squared norms of the raw prototypes. With `kernel` (the
    normalised prototypes, transposed to `(F, C)`), the product is
    `features @ kernel` (a `Dense` head's) and `p_sq` their squared norms.
    Rows with NaN or Inf are not guaranteed to be NaN here (callers multiply by
    a NaN guard).
    """
    if x_sq is None:
        x_sq = ops.sum(ops.square(features), axis=-1, keepdims=True)  # (N, 1)
    # (P @ x^T)^T rather than x @ P^T: TensorFlow's CPU kernel for a transposed
    # right operand is about 2x slower at large C (benchmarks/speed.py).
    if kernel is not None:
        cross = ops.matmul(features, kernel)  # (N, C)
    else:
        cross = ops.transpose(ops.matmul(prototypes, ops.transpose(features)))  # (N, C)
    if inverse_norm is None:
        squared = (x_sq + p_sq) - 2.0 * cross
    else:
        squared = (x_sq + p_sq * ops.square(inverse_norm)) - cross * (2.0 * inverse_norm)
    distances = ops.sqrt(ops.maximum(squared, _SQUARED_FLOOR))
    if not exact_nearest:
        return distances
    # The nearest prototype of each row, recomputed from the difference x - p.
    nearest = _first_argmin(squared)  # (N,)
    neighbor = ops.take(prototypes, nearest, axis=0)  # (N, F)
    if inverse_norm is not None or kernel is not None:
        neighbor = l2_normalize(neighbor)
    exact = _safe_sqrt(ops.sum(ops.square(features - neighbor), axis=-1, keepdims=True))
    columns = ops.convert_to_tensor(np.arange(prototypes.shape[0], dtype="int32"))
    # A comparison, not `ops.one_hot(..., dtype="bool")` (no ONNX OneHot on bool).
    is_nearest = ops.expand_dims(ops.cast(nearest, "int32"), -1) == columns  # (N, C)
    return ops.where(is_nearest, exact, distances)


def _nan_guard(x: Any) -> Any:
    """`(N, 1)`: 0 for finite rows of `x` `(N, F)`, NaN for rows with NaN or Inf."""
    return 0.0 * ops.sum(x, axis=-1, keepdims=True)


def pairwise_distances(features: Any, prototypes: Any, exact_nearest: bool = True) -> Any:
    """Euclidean distances between rows of `features` and rows of `prototypes`.

    Memory grows as `B*C + C*F` (not `B*C*F`): all squared distances come from
    one matrix product, `||x||^2 + ||p||^2 - 2 x.p`. That expansion loses
    precision when a distance is small (cancellation; on GPUs with TF32
    matmuls, much more), so the distance to the nearest prototype of every
    feature vector is recomputed exactly from the difference `x - p`, as the
    IsoMax+ authors do for all pairs: the minimum distance score depends only
    on it, and any other prototype that close would have to lie within twice
    that distance of it.

    Args:
        features: Tensor `(..., F)`.
        prototypes: Tensor `(C, F)`.
        exact_nearest: Whether the nearest prototype's distance is recomputed
            exactly; `False` uses the expansion only. Defaults to `True`.

    Returns:
        Tensor `(..., C)` of distances, with finite gradients (also at zero
        distance); NaN in the rows of `features` that hold NaN or Inf.
    """
    num_classes, feature_dim = prototypes.shape
    lead_shape = ops.shape(features)[:-1]
    x = features if len(features.shape) == 2 else ops.reshape(features, (-1, feature_dim))
    distances = _distances(
        x, prototypes, _row_norms_squared(prototypes), exact_nearest=exact_nearest
    )
    distances = distances + _nan_guard(x)
    if len(features.shape) == 2:
        return distances
    return ops.reshape(distances, (*lead_shape, num_classes))


@keras.saving.register_keras_serializable(package="keras_isomax")
class IsoMaxPlusLayer(keras.layers.Layer):
    """IsoMax+ output layer: logits from the distances to learned class prototypes.

    Replaces the final `Dense(num_classes)` (+ softmax) of a classifier; train
    it with `IsoMaxPlusLoss`. For features `x` and prototypes `p_c` it returns

        logits[..., c] = -|s| * || x / ||x|| - p_c / ||p_c|| ||_2 / T

    The prototypes `(num_classes, F)` and the distance scale `s` are trainable;
    the temperature `T` is a non-trainable weight, 1 unless set by
    `calibrate_temperature`. Norms are bounded below by `1e-12` (an all-zero
    feature vector is at distance 1 from every prototype).

    The out-of-distribution score is `scores.minimum_distance_score(logits)`
    (the largest logit): higher means more in-distribution. The non-trainable
    weight `ood_threshold` (NaN until `calibrate_threshold` sets it) is saved
    and exported with the model.

    The logits are float32 under a mixed precision policy too (the layer
    computes in the policy's variable dtype). NaN or Inf in a feature vector
    gives NaN logits for that example only.

    Args:
        num_classes: Number of classes `C`, a positive integer.
        prototype_initializer: Initializer of the prototypes. Defaults to
            `None`: `RandomNormal(mean=0.0, stddev=1.0)`, as in the paper.
        prototype_regularizer: Regularizer of the prototypes. Defaults to
            `None`.
        distance_scale_initializer: Initializer of the distance scale `s`.
            Defaults to `"ones"`.
        inference_cache: Whether inference calls (`training=False`, as in
            `predict` and `evaluate`) on the TensorFlow backend keep the
            normalised prototypes between calls, checked against the
            prototypes on every call (up to three more `num_classes x F`
            arrays). Defaults to `True`.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Input shape:
        N-D tensor with shape `(batch_size, ..., F)`, N >= 2.

    Output shape:
        N-D tensor with shape `(batch_size, ..., num_classes)`.

    Raises:
        ValueError: If `num_classes` is not a positive integer, or the input's
            last dimension is unknown or changes after the layer is built.

    Example:

    >>> import numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, scores
    >>> model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras.layers.Dense(16, activation="relu"),
    ...     IsoMaxPlusLayer(3),
    ... ])
    >>> model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
    >>> x = np.random.rand(32, 8).astype("float32")
    >>> y = np.random.randint(0, 3, size=32)
    >>> _ = model.fit(x, y, epochs=1, verbose=0)
    >>> logits = model.predict(x, verbose=0)
    >>> logits.shape
    (32, 3)
    >>> tuple(scores.minimum_distance_score(logits).shape)
    (32,)
    """

    def __init__(
        self,
        num_classes: int,
        prototype_initializer: Any = None,
        prototype_regularizer: Any = None,
        distance_scale_initializer: Any = "ones",
        inference_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        if (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, int | np.integer)
            or num_classes <= 0
        ):
            raise ValueError(
                f"`num_classes` must be a positive integer. Received: num_classes={num_classes!r}"
            )
        kwargs["dtype"] = _full_precision_policy(kwargs.get("dtype"))
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        if prototype_initializer is None:
            prototype_initializer = keras.initializers.RandomNormal(mean=0.0, stddev=1.0)
        self.prototype_initializer = keras.initializers.get(prototype_initializer)
        self.prototype_regularizer = keras.regularizers.get(prototype_regularizer)
        self.distance_scale_initializer = keras.initializers.get(distance_scale_initializer)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True
        self.inference_cache = bool(inference_cache)
        self._snapshot: _Snapshot | None = None
        self._inference_cache: Any = None

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        feature_dim = input_shape[-1]
        if feature_dim is None:
            raise ValueError(
                "The last dimension of the inputs to `IsoMaxPlusLayer` (the "
                f"feature dimension) must be defined. Received: input_shape={input_shape}"
            )
        self.prototypes = self.add_weight(
            name="prototypes",
            shape=(self.num_classes, feature_dim),
            initializer=self.prototype_initializer,
            regularizer=self.prototype_regularizer,
        )
        self.distance_scale = self.add_weight(
            name="distance_scale",
            shape=(),
            initializer=self.distance_scale_initializer,
        )
        self.temperature = self.add_weight(
            name="temperature", shape=(), initializer="ones", trainable=False
        )
        self.ood_threshold = self.add_weight(
            name="ood_threshold",
            shape=(),
            initializer=keras.initializers.Constant(math.nan),
            trainable=False,
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: feature_dim})
        if _tf_layer is not None and _tf_layer.cache_allowed():
            # Not in a `tf.distribute` scope: the variables would be mirrored on
            # every replica (and broadcast at creation), for a cache replicas skip.
            self._inference_cache = _tf_layer.InferenceCache(
                self.num_classes, feature_dim, self.prototypes.dtype
            )

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        prototypes = ops.cast(self.prototypes, self.compute_dtype)
        num_classes, feature_dim = prototypes.shape
        lead_shape = ops.shape(x)[:-1]
        if len(x.shape) != 2:
            x = ops.reshape(x, (-1, feature_dim))
        scale = ops.abs(ops.cast(self.distance_scale, self.compute_dtype)) / ops.cast(
            self.temperature, self.compute_dtype
        )
        if self._snapshot is not None:
            if training:
                raise ValueError(
                    "`inference_snapshot()` freezes the prototypes for inference; "
                    f"layer {self.name} cannot train inside it. Received: training={training!r}"
                )
            kernel, squared_norms = self._snapshot.variables
            features, x_sq = _normalized_features(x)
            distances = _distances(features, prototypes, squared_norms, kernel=kernel, x_sq=x_sq)
            # One (N, C) product: the scale, and NaN for rows with NaN or Inf.
            logits = distances * (_nan_guard(x) - scale)
        elif _tf_layer is not None:
            cache = self._inference_cache if self._uses_inference_cache(training) else None
            logits = _tf_layer.isomax_logits(x, prototypes, scale, cache)
        else:
            features, x_sq = _normalized_features(x)
            distances = _live_distances(features, x_sq, prototypes)
            logits = distances * (_nan_guard(x) - scale)
        if len(inputs.shape) == 2:
            return logits
        return ops.reshape(logits, (*lead_shape, num_classes))

    def _uses_inference_cache(self, training: Any) -> Any:
        # Only explicit inference (`training=False`: predict, evaluate, exports);
        # `training=None` may be a custom training loop's forward pass.
        return (
            training is False
            and self.inference_cache
            and self._inference_cache is not None
            and _tf_layer.cache_allowed()
        )

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape[:-1]) + (self.num_classes,)

    @contextlib.contextmanager
    def inference_snapshot(self) -> Iterator[tuple[keras.Variable, keras.Variable]]:
        """Freezes the normalised prototypes, for tracing a serving graph.

        Inside the context, calls read the prototypes normalised once, on
        entry, and stored in `(F, C)` order (a `Dense` kernel's): the graph
        traced there does a `Dense` head's matrix product and nothing that
        depends on the weights alone (the nearest prototype's exact distance
        still reads its row of `prototypes`). The weights must not change
        inside the context, and graphs traced there keep the snapshot: use it
        around an export (as `export_saved_model` does, so each export holds
        the weights of its time); outside it, every call reads the current
        weights. Enter it eagerly (it creates variables).

        Yields:
            `(kernel, squared_norms)`: the non-trainable snapshot variables,
            `(F, C)` and `(C,)`. Graphs traced inside the context capture
            them (a SavedModel saves them with the model).

        Raises:
            ValueError: If the layer is not built, or a snapshot is active.

        Example:

        >>> with layer.inference_snapshot():  # doctest: +SKIP
        ...     archive.add_endpoint("score", score_fn, input_signature=[spec])
        ...     archive.write_out(path)  # Traces `score_fn` here.
        """
        if not self.built:
            raise ValueError(
                f"The layer must be built before `inference_snapshot()`. Received: layer={self.name}"
            )
        if self._snapshot is not None:
            raise ValueError(
                f"`inference_snapshot()` is already active on layer {self.name}: "
                "the contexts do not nest."
            )
        normalized = l2_normalize(ops.cast(self.prototypes, self.compute_dtype))  # (C, F)
        kernel = keras.Variable(
            ops.transpose(normalized), trainable=False, name="prototypes_snapshot"
        )
        squared_norms = keras.Variable(
            _row_norms_squared(normalized), trainable=False, name="squared_norms_snapshot"
        )
        self._snapshot = _Snapshot((kernel, squared_norms))
        try:
            yield (kernel, squared_norms)
        finally:
            self._snapshot = None

    @property
    def is_calibrated(self) -> bool:
        """Whether `ood_threshold` holds a calibrated (finite) value."""
        return self.built and math.isfinite(float(self.ood_threshold.numpy()))

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "prototype_initializer": keras.initializers.serialize(self.prototype_initializer),
            "prototype_regularizer": keras.regularizers.serialize(self.prototype_regularizer),
            "distance_scale_initializer": keras.initializers.serialize(
                self.distance_scale_initializer
            ),
            "inference_cache": self.inference_cache,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> IsoMaxPlusLayer:
        # Configs saved before `exact_neighbors` was removed hold it: the
        # nearest prototype's distance is always exact now, so it is dropped.
        config = {key: value for key, value in config.items() if key != "exact_neighbors"}
        return super().from_config(config)


class _Snapshot:
    """Holds `inference_snapshot`'s variables (a plain object, so that neither
    Keras nor TensorFlow tracks them as the layer's weights)."""

    def __init__(self, variables: Any) -> None:
        self.variables = variables


def _normalized_features(x: Any) -> Any:
    """`(x / max(||x||, eps), ||that||^2)`: the normalised rows and their squared norms
    (1, or less for a clamped norm; 0 for a zero vector)."""
    squared_norm = ops.sum(ops.square(x), axis=-1, keepdims=True)
    inverse = ops.rsqrt(ops.maximum(squared_norm, _NORM_EPSILON * _NORM_EPSILON))
    return x * inverse, squared_norm * ops.square(inverse)


def _live_distances(features: Any, x_sq: Any, prototypes: Any) -> Any:
    """`_distances` with the prototypes normalised in the same call."""
    p_sq = _row_norms_squared(prototypes)  # (C,)
    inverse_norm = ops.rsqrt(ops.maximum(p_sq, _NORM_EPSILON * _NORM_EPSILON))
    return _distances(features, prototypes, p_sq, inverse_norm, x_sq=x_sq)


def _full_precision_policy(dtype: Any) -> Any:
    """Maps a mixed precision policy (or the global one) to its variable dtype.

    The distances of IsoMax+ need float32: in float16 the expansion and the
    normalisation lose too much, and logits feed a softmax scaled by 10.
    """
    policy = keras.dtype_policies.get(dtype) if dtype is not None else None
    if policy is None:
        policy = keras.config.dtype_policy()
    if policy.compute_dtype != policy.variable_dtype:
        return policy.variable_dtype
    return dtype
