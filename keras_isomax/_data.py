"""Data iteration: arrays, tuples and batched datasets as `(x, y)` batches; labels.

Private helpers of the package: every function that streams over user data
(detectors, calibration, evaluation, `replace_head`) uses these.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import keras
import numpy as np

from keras_isomax import _serving
from keras_isomax._typing import ArrayLike, Data


def is_array_like(x: Any) -> bool:
    """Whether `x` is one array or tensor (not a structure of them)."""
    return isinstance(x, np.ndarray) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)
    )


def is_in_memory(data: Any) -> bool:
    """Whether `data` is arrays (`x`, or a tuple/list/dict of arrays), not a stream."""
    return is_array_like(data) or isinstance(data, Mapping | tuple | list)


def num_rows(x: Any) -> int:
    """The batch size of an array or of the first array of a structure."""
    if isinstance(x, Mapping):
        return num_rows(next(iter(x.values())))
    if isinstance(x, list | tuple):
        return num_rows(x[0])
    return int(x.shape[0])


def split_element(element: Any, arg_name: str) -> tuple[Any, Any]:
    """`x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)` -> `(x, y or None)`."""
    if isinstance(element, tuple | list) and not is_array_like(element):
        if len(element) in (1, 2, 3):
            return element[0], (element[1] if len(element) > 1 else None)
        raise ValueError(
            f"`{arg_name}` must hold `x`, `(x,)`, `(x, y)` or `(x, y, "
            f"sample_weight)`; got a tuple of {len(element)} items. "
            f"Received: {arg_name} element of length {len(element)}"
        )
    return element, None


def check_rows(x: Any, y: Any, arg_name: str) -> int:
    """The number of rows of `x`; raises if `y` (when given) has another number."""
    n = num_rows(x)
    if y is not None and int(np.shape(y)[0]) != n:
        m = int(np.shape(y)[0])
        raise ValueError(
            f"`{arg_name}` has {n} inputs but {m} labels (x and y must have the same "
            f"length). Received: {arg_name} with x of {n} rows, y of {m} rows"
        )
    return n


def iter_elements(data: Data, arg_name: str) -> Iterator[Any]:
    """Yields the elements of a dataset or other iterable of batches, as they are."""
    if isinstance(data, str | bytes) or not isinstance(data, Iterable):
        raise TypeError(
            f"`{arg_name}` must be a NumPy array, a tuple `(x, y)`, a batched "
            f"`tf.data.Dataset` or another iterable of batches. "
            f"Received: {arg_name}={type(data).__name__}"
        )
    yield from data  # tf.data.Dataset, PyDataset, generators.


def iter_batches(
    data: Data, arg_name: str, batch_size: int | None = None
) -> Iterator[tuple[Any, Any]]:
    """Yields `(x_batch, y_batch or None)` from arrays or an iterable of batches.

    Args:
        data: In-memory arrays (`x`, `(x,)`, `(x, y)`, `(x, y, w)`), sliced
            into `batch_size` rows; or a batched dataset / iterable of such
            elements, yielded batch by batch.
        arg_name: Name of the argument in error messages.
        batch_size: Rows per batch for arrays. Defaults to `None` (arrays
            are then treated as one element of an iterable: not sliced).
    """
    if batch_size is not None and is_in_memory(data):
        x, y = split_element(data, arg_name)
        n = check_rows(x, y, arg_name)
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            yield (
                keras.tree.map_structure(lambda a, rows=rows: a[rows], x),
                None if y is None else y[rows],
            )
        return
    convert = keras.backend.backend() != "tensorflow"
    for element in iter_elements(data, arg_name):
        x, y = split_element(element, arg_name)
        if convert:  # A `tf.data.Dataset` feeding a JAX or PyTorch model.
            x, y = _from_tensorflow(x), _from_tensorflow(y)
        yield x, y


def _from_tensorflow(structure: Any) -> Any:
    """TensorFlow tensors in `structure` as NumPy arrays (other leaves unchanged)."""
    if structure is None:
        return None
    return keras.tree.map_structure(
        lambda leaf: leaf.numpy() if type(leaf).__module__.startswith("tensorflow") else leaf,
        structure,
    )


def class_ids(y: ArrayLike, arg_name: str, num_classes: int | None = None) -> np.ndarray:
    """Labels (class ids or one-hot rows) as an int64 array `(N,)` of class ids.

    Args:
        y: Labels: class ids `(N,)`/`(N, 1)` or one-hot / soft rows `(N, C)`.
        arg_name: Name of the argument in error messages.
        num_classes: If given, the labels are checked against it: one-hot rows
            must have `num_classes` columns and ids must be in
            `[0, num_classes)`. Defaults to `None` (any width, no range check).

    Raises:
        ValueError: If the labels are not integer class ids or one-hot rows
            (or out of range, with `num_classes`).
    """
    y = np.asarray(keras.ops.convert_to_numpy(y))
    if num_classes is None:
        if y.ndim >= 2 and y.shape[-1] > 1:  # One-hot or soft targets.
            return np.argmax(y, axis=-1).reshape(-1)
        y = y.reshape(-1)
        if y.size and (not np.issubdtype(y.dtype, np.number) or np.any(np.floor(y) != y)):
            raise ValueError(
                f"Labels of `{arg_name}` must be integer class ids or one-hot rows. "
                f"Received: labels of dtype {y.dtype}"
            )
        return y.astype(np.int64)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        return np.argmax(y, axis=1)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"Labels in `{arg_name}` must be class ids `(N,)`/`(N, 1)` or one-hot "
            f"`(N, {num_classes})`. Received: labels of shape {y.shape}"
        )
    bad = ~np.isfinite(y.astype(np.float64)) | (y < 0) | (y >= num_classes)
    bad |= np.floor(y) != y
    if bad.any():
        raise ValueError(
            f"Labels in `{arg_name}` must be integers in [0, {num_classes}). "
            f"Received: labels {np.unique(y[bad])[:5].tolist()}"
        )
    return y.astype(np.int64)


def nonfinite_flags(x: Any) -> np.ndarray | None:
    """Per-row NaN/Inf flags (NumPy bool) over every array of an input structure."""
    flags = None
    for leaf in keras.tree.flatten(x):
        rows = np.asarray(keras.ops.convert_to_numpy(_serving.nonfinite_rows(leaf)), bool)
        flags = rows if flags is None else flags | rows
    return flags


def check_batched(model: Any, x: Any, arg_name: str) -> None:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return
    if not inputs or isinstance(x, Mapping | list | tuple) or len(inputs) != 1:
        return
    expected = len(inputs[0].shape)
    rank = len(x.shape)
    if rank == expected - 1:
        raise ValueError(
            f"`{arg_name}` yields single examples of shape {tuple(x.shape)}, but the "
            f"model expects batches of rank {expected}; call `.batch(...)` on the "
            f"dataset first. Received: {arg_name} element shape {tuple(x.shape)}"
        )


def label_width(y: Any) -> int | None:
    """The width of one-hot labels `(B, C)`, or None for class ids / no labels."""
    shape = getattr(y, "shape", None)
    if shape is None and y is not None:
        shape = np.shape(y)
    if shape is None or len(shape) < 2 or shape[-1] in (None, 1):
        return None
    return int(shape[-1])
