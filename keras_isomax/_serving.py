"""The per-row rules of every serving path: non-finite inputs, class ids (backend-neutral).

A backbone may turn a NaN or Inf input into finite features (for example
oneDNN's ReLU maps NaN to 0 on some CPUs), and the input would then get a
finite, possibly confident score. The library does not rely on the backbone:
an example whose input holds any NaN or Inf gets `score` NaN, `is_ood` True,
`class_id` -1 (`NONFINITE_CLASS_ID`) and NaN `probabilities`, whatever the
model computed for it.

This module is the one implementation of that rule and of the class id rule
(`class_ids`), used by the exports (through `_served_outputs`), `predict_ood`
and the detectors. It is written with `keras.ops` in a form every converter
keeps exact, so that one graph serves TensorFlow, LiteRT and ONNX:

- no `isfinite`/`isnan` (no LiteRT builtin): an element is finite iff
  `|x| <= max(dtype)`, a comparison that is False for NaN and +-Inf;
- no `logical_not` of a float comparison (TensorFlow's Grappler rewrites
  `LogicalNot(LessEqual(a, b))` into `Greater(a, b)`, which is False for
  NaN): the per-row flag is cast to a 0/1 float and compared with 0.5;
- no float `where` (tf2onnx lowers it to `c * a + (1 - c) * b`, which turns
  every row NaN when one is): NaN is added as `sqrt(-1)`, `+0` elsewhere;
- no `argmax` (Keras' TensorFlow `argmax` bitcasts floats, which LiteRT and
  ONNX lack, and TensorFlow leaves the index on ties unspecified): the first
  index of the maximum is found with comparisons and an integer `max`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_isomax import _graph
from keras_isomax._typing import ArrayLike, Tensor
from keras_isomax.layers import IsoMaxPlusLayer

NONFINITE_CLASS_ID = -1
"""`class_id` of an example whose input holds NaN or Inf."""


def _float_max(dtype: Any) -> float:
    try:
        return float(np.finfo(dtype).max)
    except TypeError:  # bfloat16 and other ml_dtypes types.
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).max)


def finite_rows(x: ArrayLike) -> Tensor:
    """1.0 for each example (row along axis 0) whose elements are all finite, else 0.0.

    Args:
        x: A tensor or array `(B, ...)`. Integer, boolean and string inputs
            cannot hold NaN/Inf: the result is all 1.0.

    Returns:
        A float32 tensor of shape `(B,)` holding 0.0 and 1.0 only.
    """
    if not hasattr(x, "dtype"):
        x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    rank = len(x.shape)
    if rank == 0:
        raise ValueError(f"The input needs a batch dimension. Received: input of shape {x.shape}")
    if "float" not in dtype:
        return ops.ones((ops.shape(x)[0],), "float32")
    # `|x| <= max` is False for NaN and +-Inf (comparisons only).
    finite = ops.abs(x) <= _float_max(dtype)
    if rank > 1:
        finite = ops.all(finite, axis=tuple(range(1, rank)))
    return ops.cast(finite, "float32")


def nonfinite_rows(x: ArrayLike) -> Tensor:
    """True for each example (row along axis 0) with any NaN or Inf element.

    Args:
        x: A tensor or array `(B, ...)`. Integer, boolean and string inputs
            cannot hold NaN/Inf: the result is all False.

    Returns:
        A boolean tensor of shape `(B,)`.
    """
    return finite_rows(x) < 0.5


def nan_where(nonfinite: ArrayLike, values: ArrayLike) -> Tensor:
    """`values` with NaN in the rows where `nonfinite` is True.

    Adds `sqrt(-1)` (NaN) to those rows and `-0.0` to the others, so finite
    rows keep their exact values; no float `where` (see the module docstring).

    Args:
        nonfinite: Boolean `(B,)`.
        values: Float `(B,)` or `(B, ...)`.

    Returns:
        A tensor like `values`.
    """
    values = ops.convert_to_tensor(values)
    nan_or_zero = ops.sqrt(-ops.cast(nonfinite, values.dtype))
    rank = len(values.shape)
    if rank > 1:
        nan_or_zero = ops.reshape(nan_or_zero, (-1,) + (1,) * (rank - 1))
    return values + nan_or_zero


def decide(score: ArrayLike, threshold: ArrayLike) -> Tensor:
    """`is_ood = not (score >= threshold)`: a NaN score (or threshold) is OOD.

    Written as `cast(score >= threshold) < 0.5`, which no graph optimizer
    turns into `score < threshold` (False for NaN) and which needs no
    `isnan` (no LiteRT builtin).

    Args:
        score: Float `(B,)`.
        threshold: Float scalar or `(B,)`.

    Returns:
        A boolean tensor `(B,)`.
    """
    return ops.cast(score >= threshold, "float32") < 0.5


def class_ids(logits: ArrayLike) -> Tensor:
    """The class of each row: the first index of its maximum, -1 if it holds NaN.

    Exact under every converter (comparisons, integer products and an integer
    `max` reduction only): on ties the lowest index wins, and a row with a NaN
    logit (which has no maximum) gets `NONFINITE_CLASS_ID`, whether or not the
    runtime's `max` propagates NaN.

    Args:
        logits: Float `(B, C)`, with a static `C`.

    Returns:
        An int64 tensor `(B,)` (int32 on JAX without `jax_enable_x64`).
    """
    logits = ops.convert_to_tensor(logits)
    num_classes = logits.shape[-1]
    top = ops.max(logits, axis=-1, keepdims=True)
    at_top = ops.cast(logits >= top, "int32")
    # Every element compares with the maximum unless it (or the maximum) is NaN.
    compared = at_top + ops.cast(logits < top, "int32")
    ordered = ops.cast(ops.all(compared > 0, axis=-1), "int32")
    # C - i at each maximum i, 0 elsewhere: the largest is the first maximum's.
    weights = ops.arange(num_classes, 0, -1, dtype="int32")
    first = num_classes - ops.max(at_top * weights, axis=-1)
    return ops.cast(ordered * (first - NONFINITE_CLASS_ID) + NONFINITE_CLASS_ID, "int64")


def apply_nonfinite_rule(
    nonfinite: ArrayLike,
    score: ArrayLike | None = None,
    is_ood: ArrayLike | None = None,
    class_id: ArrayLike | None = None,
    probabilities: ArrayLike | None = None,
) -> dict[str, Tensor]:
    """Applies the non-finite rule to the outputs of one batch.

    Args:
        nonfinite: Boolean `(B,)`, from `nonfinite_rows`.
        score: Float `(B,)` scores, or `None`. Defaults to `None`.
        is_ood: Boolean `(B,)` decisions, or `None`. Defaults to `None`.
        class_id: Integer `(B,)` classes, or `None`. Defaults to `None`.
        probabilities: Float `(B, C)` probabilities, or `None`. Defaults to
            `None`.

    Returns:
        A dict with the given keys among `score` (NaN where `nonfinite`),
        `is_ood` (True there), `class_id` (`NONFINITE_CLASS_ID` there) and
        `probabilities` (NaN rows there).
    """
    out: dict[str, Tensor] = {}
    if score is not None:
        out["score"] = nan_where(nonfinite, score)
    if is_ood is not None:
        out["is_ood"] = ops.logical_or(is_ood, nonfinite)
    if class_id is not None:
        class_id = ops.convert_to_tensor(class_id)
        out["class_id"] = ops.where(
            nonfinite, ops.cast(NONFINITE_CLASS_ID, class_id.dtype), class_id
        )
    if probabilities is not None:
        out["probabilities"] = nan_where(nonfinite, probabilities)
    return out


@contextlib.contextmanager
def inference_snapshots(model: Any) -> Iterator[None]:
    """`IsoMaxPlusLayer.inference_snapshot` of every built IsoMax+ layer in `model`:
    what the exporters trace under (graphs free of the layer's inference cache)."""
    with contextlib.ExitStack() as stack:
        for layer in _graph.all_layers(model):
            if isinstance(layer, IsoMaxPlusLayer) and layer.built:
                stack.enter_context(layer.inference_snapshot())
        yield
