"""The non-finite input rule shared by every serving path (backend-neutral).

A backbone may turn a NaN or Inf input into finite features (for example
oneDNN's ReLU maps NaN to 0 on some CPUs), and the input would then get a
finite, possibly confident score. The library does not rely on the backbone:
an example whose input holds any NaN or Inf gets `score` NaN, `is_ood` True
and `class_id` -1 (`NONFINITE_CLASS_ID`), whatever the model computed for it.

The SavedModel signatures (`export.py`) and `predict_ood` apply this rule with
the two functions below, written with `keras.ops` only so that other exporters
can reuse them.
"""

from __future__ import annotations

import math

import keras
from keras import ops

NONFINITE_CLASS_ID = -1
"""`class_id` of an example whose input holds NaN or Inf."""


def nonfinite_rows(x):
    """True for each example (row along axis 0) with any NaN or Inf element.

    Args:
        x: A tensor or array `(B, ...)`. Integer, boolean and string inputs
            cannot hold NaN/Inf: the result is all False.

    Returns:
        A boolean tensor of shape `(B,)`.
    """
    if not hasattr(x, "dtype"):
        x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    rank = len(x.shape)
    if rank == 0:
        raise ValueError(f"The input needs a batch dimension. Received: input of shape {x.shape}")
    if "float" not in dtype:
        return ops.zeros((ops.shape(x)[0],), "bool")
    bad = ops.logical_not(ops.isfinite(x))
    if rank > 1:
        bad = ops.any(bad, axis=tuple(range(1, rank)))
    return bad


def apply_nonfinite_rule(nonfinite, score=None, is_ood=None, class_id=None):
    """Applies the non-finite rule to the outputs of one batch.

    Args:
        nonfinite: Boolean `(B,)`, from `nonfinite_rows`.
        score: Float `(B,)` scores, or `None`. Defaults to `None`.
        is_ood: Boolean `(B,)` decisions, or `None`. Defaults to `None`.
        class_id: Integer `(B,)` classes, or `None`. Defaults to `None`.

    Returns:
        A dict with the given keys among `score` (NaN where `nonfinite`),
        `is_ood` (True there) and `class_id` (`NONFINITE_CLASS_ID` there).
    """
    out = {}
    if score is not None:
        out["score"] = ops.where(nonfinite, ops.cast(math.nan, score.dtype), score)
    if is_ood is not None:
        out["is_ood"] = ops.logical_or(is_ood, nonfinite)
    if class_id is not None:
        out["class_id"] = ops.where(
            nonfinite, ops.cast(NONFINITE_CLASS_ID, class_id.dtype), class_id
        )
    return out
