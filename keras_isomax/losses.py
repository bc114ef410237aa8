"""The IsoMax+ loss: cross-entropy over entropy-scaled distance logits."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_isomax import _utils
from keras_isomax._typing import ArrayLike, Config, Tensor

DEFAULT_ENTROPIC_SCALE = 10.0


@keras.saving.register_keras_serializable(package="keras_isomax")
def isomax_plus_loss(
    y_true: ArrayLike, y_pred: ArrayLike, entropic_scale: float = DEFAULT_ENTROPIC_SCALE
) -> Tensor:
    """Per-example IsoMax+ loss: `-log softmax(entropic_scale * logits)[y]`.

    Computed stably from logits with a log-sum-exp (never the log of a softmax
    that can underflow). The entropic scale applies during training only: the
    layer's logits and the OOD scores do not use it.

    Labels are either sparse class ids, shape `(...)` or `(..., 1)`, or one-hot
    (or soft) targets of shape `(..., C)`, the shape of `y_pred`.

    A sparse label outside `[0, C)` (or not an integer) raises a `ValueError`
    when the loss runs eagerly. Inside a traced function (`model.fit`, XLA) no
    Python check can run, so such an example's loss is NaN instead of a silently
    wrong number (`keras.callbacks.TerminateOnNaN` stops training on it).

    Args:
        y_true: Sparse labels `(...)`/`(..., 1)`, or one-hot targets `(..., C)`.
        y_pred: Logits `(..., C)` of an `IsoMaxPlusLayer`.
        entropic_scale: Multiplier of the logits inside the softmax. Defaults
            to `10.0`, the paper's value.

    Returns:
        Tensor of shape `(...)`: one loss value per example.

    Integer targets of shape `(..., C)` must be one-hot (checked eagerly); soft
    targets must be floats. Registered as serializable: a model compiled with
    `loss=isomax_plus_loss` saves and reloads (after `import keras_isomax`).

    Raises:
        ValueError: If `y_pred` has no classes axis (a scalar, or a last
            dimension that is 0 or unknown), the shapes of `y_true` and
            `y_pred` do not match,
            `entropic_scale` is not a positive finite number, or (in eager
            mode) a sparse label is out of range or not an integer, or integer
            `(..., C)` labels are not one-hot.

    Example:

    >>> import numpy as np
    >>> from keras_isomax import isomax_plus_loss
    >>> logits = -np.array([[0.1, 1.2, 1.3], [1.0, 0.2, 1.4]], "float32")
    >>> loss = isomax_plus_loss(np.array([0, 1]), logits)
    >>> tuple(loss.shape)
    (2,)
    """
    entropic_scale = _check_entropic_scale(entropic_scale)
    y_pred = ops.convert_to_tensor(y_pred)
    if keras.backend.standardize_dtype(y_pred.dtype) not in ("float32", "float64"):
        y_pred = ops.cast(y_pred, "float32")
    y_true = ops.convert_to_tensor(y_true)
    if len(y_pred.shape) < 1 or y_pred.shape[-1] is None or y_pred.shape[-1] < 1:
        raise ValueError(
            "`y_pred` must have a defined, non-zero last dimension (the classes). "
            f"Received: y_pred.shape={y_pred.shape}"
        )
    num_classes = y_pred.shape[-1]
    log_probs = ops.log_softmax(entropic_scale * y_pred, axis=-1)

    if _is_one_hot(y_true.shape, y_pred.shape):
        if _utils.is_eager(y_true):
            _check_one_hot(y_true)
        targets = ops.cast(y_true, log_probs.dtype)
        return -ops.sum(targets * log_probs, axis=-1)

    labels = y_true
    if len(labels.shape) == len(y_pred.shape) and labels.shape[-1] == 1:
        labels = ops.squeeze(labels, axis=-1)
    if len(labels.shape) != len(y_pred.shape) - 1 or not _compatible(
        labels.shape, y_pred.shape[:-1]
    ):
        raise ValueError(
            "`y_true` must hold sparse labels of shape `y_pred.shape[:-1]` "
            "(or with a trailing 1), or one-hot targets of the shape of `y_pred`. "
            f"Received: y_true.shape={y_true.shape}, y_pred.shape={y_pred.shape}"
        )
    if _utils.is_eager(labels):
        _check_labels(labels, num_classes)
    labels_f = ops.cast(labels, log_probs.dtype)
    valid = (labels_f >= 0) & (labels_f < num_classes) & (ops.floor(labels_f) == labels_f)
    safe_labels = ops.where(valid, ops.cast(labels_f, "int32"), 0)
    picked = ops.take_along_axis(log_probs, ops.expand_dims(safe_labels, -1), axis=-1)
    loss = -ops.squeeze(picked, axis=-1)
    return ops.where(valid, loss, ops.cast(math.nan, loss.dtype))


def _check_entropic_scale(entropic_scale: Any) -> Any:
    """A positive finite Python float (or a tensor, checked when eager)."""
    if hasattr(entropic_scale, "shape") and not _utils.is_eager(entropic_scale):
        return entropic_scale  # Traced: the class and eager calls check it.
    try:
        scale = float(ops.convert_to_numpy(entropic_scale))
    except (TypeError, ValueError):
        scale = math.nan
    if isinstance(entropic_scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            "`entropic_scale` must be a positive finite number. "
            f"Received: entropic_scale={entropic_scale!r}"
        )
    return scale


def _check_one_hot(y_true: Tensor) -> None:
    """Integer `(..., C)` targets must be one-hot rows (float ones may be soft)."""
    if "int" not in keras.backend.standardize_dtype(y_true.dtype):
        return
    values = np.asarray(ops.convert_to_numpy(y_true))
    rows = values.reshape(-1, values.shape[-1])
    bad = np.any((rows != 0) & (rows != 1), axis=-1) | (rows.sum(axis=-1) != 1)
    if bad.any():
        raise ValueError(
            "Integer labels of shape `(..., C)` must be one-hot rows (a single 1); "
            f"{int(bad.sum())} of {len(rows)} rows are not (sparse class ids have "
            "shape `(...)` or `(..., 1)`; soft targets must be floats). "
            f"Received: y_true rows such as {rows[bad][0].tolist()}"
        )


def _is_one_hot(true_shape: Any, pred_shape: Any) -> bool:
    """Whether labels of `true_shape` are `(..., C)` targets for logits of `pred_shape`."""
    return (
        len(true_shape) == len(pred_shape) > 0
        and pred_shape[-1] != 1
        and true_shape[-1] == pred_shape[-1]
    )


def _compatible(shape_a: Any, shape_b: Any) -> bool:
    return all(a is None or b is None or a == b for a, b in zip(shape_a, shape_b))


def _check_labels(labels: Tensor, num_classes: int) -> None:
    values = np.asarray(ops.convert_to_numpy(labels))
    bad = ~np.isfinite(values) | (values < 0) | (values >= num_classes)
    bad |= np.isfinite(values) & (np.floor(values) != values)
    if bad.any():
        examples = np.unique(values[bad])[:5].tolist()
        raise ValueError(
            f"Sparse labels must be integers in [0, {num_classes}) for "
            f"{num_classes} classes; {int(bad.sum())} of {values.size} are not. "
            f"Received: y_true with invalid values {examples}"
        )


@keras.saving.register_keras_serializable(package="keras_isomax")
class IsoMaxPlusLoss(keras.losses.Loss):
    """IsoMax+ loss: cross-entropy of `softmax(entropic_scale * logits)`.

    Use with an `IsoMaxPlusLayer` output in place of a softmax + cross-entropy.
    Accepts sparse integer labels (`(B,)` or `(B, 1)`) and one-hot targets
    (`(B, C)`); sample weights, every Keras reduction and the loss scaling of
    `tf.distribute` come from `keras.losses.Loss`. See `isomax_plus_loss` for
    the behaviour on labels out of range.

    Args:
        entropic_scale: Multiplier of the logits inside the softmax (the
            paper's entropic scale). Defaults to `10.0`.
        reduction: Type of reduction to apply to the loss. Defaults to
            `"sum_over_batch_size"`.
        name: Name of the loss instance. Defaults to `"isomax_plus_loss"`.
        dtype: Dtype of the loss computation. Defaults to `None` (floatx).

    Raises:
        ValueError: If `entropic_scale` is not a positive finite number; when
            called eagerly, on the labels `isomax_plus_loss` rejects (sparse
            labels out of range, integer `(B, C)` targets that are not one-hot
            rows).

    Example:

    >>> import keras
    >>> from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    >>> model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
    """

    def __init__(
        self,
        entropic_scale: float = DEFAULT_ENTROPIC_SCALE,
        reduction: str | None = "sum_over_batch_size",
        name: str = "isomax_plus_loss",
        dtype: Any = None,
    ) -> None:
        scale = _check_entropic_scale(entropic_scale)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.entropic_scale = scale

    def __call__(
        self, y_true: ArrayLike, y_pred: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> Tensor:
        # `keras.losses.Loss.__call__` casts `y_true` to the loss dtype before
        # `call`: integer `(..., C)` targets are checked here, while they are
        # still integers (as floats they would pass as soft targets).
        if not isinstance(y_true, dict) and _utils.is_eager(y_true):
            labels = ops.convert_to_tensor(y_true)
            if _is_one_hot(labels.shape, ops.shape(y_pred)):
                _check_one_hot(labels)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true: ArrayLike, y_pred: ArrayLike) -> Tensor:
        return isomax_plus_loss(y_true, y_pred, entropic_scale=self.entropic_scale)

    def get_config(self) -> Config:
        return {**super().get_config(), "entropic_scale": self.entropic_scale}
