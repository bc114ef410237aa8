"""Argument checks shared by the public functions (messages end `Received: ...`)."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from keras_isomax._data import is_array_like


def check_int(
    value: Any,
    name: str,
    *,
    minimum: int = 1,
    allow_none: bool = False,
    what: str | None = None,
) -> Any:
    """`value` as a Python int if it is an integer `>= minimum` (or `None` when allowed).

    NumPy integers are accepted and converted (a stored argument stays JSON-serialisable).

    Args:
        value: The argument.
        name: Its name, for the message.
        minimum: The smallest value allowed. Defaults to `1`.
        allow_none: Whether `None` is allowed. Defaults to `False`.
        what: The message's description of a valid value. Defaults to
            `None` ("a positive integer", "a non-negative integer", ...).

    Raises:
        ValueError: If `value` is not valid (booleans are not integers).
    """
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        if what is None:
            what = {0: "a non-negative integer", 1: "a positive integer"}.get(
                minimum, f"an integer >= {minimum}"
            ) + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return int(value)


def check_exportable(model: Any) -> None:
    """Raises unless `model` is a built `keras.Model` (what every exporter needs)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: model={type(model).__name__}")
    if not model.built:
        raise ValueError(
            "The model must be built (called once or created with an Input) "
            f"before export. Received: model={model.name}"
        )


def check_tpr(tpr: Any, name: str = "tpr") -> float:
    """`tpr` as a float in (0, 1], or a ValueError naming the argument `name`."""
    try:
        value = float(tpr)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(tpr, bool) or not 0.0 < value <= 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1]. Received: {name}={tpr!r}")
    return value


def parse_threshold(threshold: Any, *, finite: bool = False) -> float:
    """A decision threshold as a Python float.

    Accepts Python and NumPy real numbers and 0-d real arrays or tensors.

    Args:
        threshold: The threshold (not `None`: callers handle the default).
        finite: Whether +-Inf is refused too. Defaults to `False` (only NaN).

    Raises:
        TypeError: If `threshold` is not a real number (strings, booleans and
            sequences are refused).
        ValueError: If it is NaN (or not finite, with `finite=True`).
    """
    value = None
    if not isinstance(threshold, bool | np.bool_ | str | bytes):
        if isinstance(threshold, int | float | np.integer | np.floating):
            value = float(threshold)
        elif is_array_like(threshold) and tuple(threshold.shape) == ():
            array = np.asarray(keras.ops.convert_to_numpy(threshold))
            if np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
                value = float(array)
    if value is None:
        raise TypeError(f"`threshold` must be a float or None. Received: threshold={threshold!r}")
    if math.isnan(value):
        raise ValueError(
            "`threshold` must be a number, not NaN (every input would be OOD). "
            f"Received: threshold={threshold!r}"
        )
    if finite and not math.isfinite(value):
        raise ValueError(f"`threshold` must be finite. Received: threshold={threshold!r}")
    return value
