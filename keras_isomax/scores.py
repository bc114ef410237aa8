"""Out-of-distribution scores computed from logits.

Sign convention, for every score here: **higher means more in-distribution**.
A detector accepts an input as in-distribution when its score is at or above a
threshold (see `calibrate_threshold`).

For an `IsoMaxPlusLayer` the paper's scores are `minimum_distance_score` (MDS)
and `entropic_score` (ES). `max_probability_score`, `max_logit_score` and
`energy_score` are the usual baselines for softmax classifiers; they accept any
logits. No score applies the loss's entropic scale: that scale is a training
device only.

Every score takes float logits `(..., C)` with `C >= 1`; integer logits raise
a `TypeError` and an empty class axis a `ValueError`, naming the score.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import keras
from keras import ops

from keras_isomax._typing import ArrayLike, ScoreFunction, Tensor


def _check_logits(logits: ArrayLike, name: str) -> Tensor:
    """Float logits `(..., C)` with at least one class, or a clear error."""
    if not hasattr(logits, "dtype") or not hasattr(logits, "shape"):
        logits = ops.convert_to_tensor(logits)
    dtype = keras.backend.standardize_dtype(logits.dtype)
    if "float" not in dtype:
        raise TypeError(
            f"`{name}` needs float logits (cast them, e.g. `logits.astype('float32')`). "
            f"Received: logits.dtype={dtype}"
        )
    shape = tuple(logits.shape)
    if len(shape) == 0 or shape[-1] == 0:
        raise ValueError(
            f"`{name}` needs logits of shape (..., C) with C >= 1 classes. "
            f"Received: logits.shape={shape}"
        )
    return logits


def _checked(score: ScoreFunction) -> ScoreFunction:
    """Checks the logits of a score function; an empty batch gives an empty result."""

    @functools.wraps(score)
    def checked(logits: ArrayLike) -> Tensor:
        logits = _check_logits(logits, score.__name__)
        shape = tuple(logits.shape)
        if None not in shape and math.prod(shape) == 0:
            return ops.zeros(shape[:-1], logits.dtype)  # ops.max fails on no rows.
        return score(logits)

    return checked


@_checked
def minimum_distance_score(logits: ArrayLike) -> Tensor:
    """The paper's minimum distance score (MDS): the largest logit.

    For IsoMax+ logits `-|s| * d_c / T` this is `-|s| * min_c d_c / T`, the
    (scaled, negated) distance to the nearest prototype. Higher means more
    in-distribution; the maximum possible value is 0 (a feature vector on a
    prototype).

    Args:
        logits: Tensor `(..., C)` of an `IsoMaxPlusLayer`.

    Returns:
        Tensor `(...)`.
    """
    return ops.max(logits, axis=-1)


@_checked
def entropic_score(logits: ArrayLike) -> Tensor:
    """The paper's entropic score (ES): negative entropy of `softmax(logits)`.

    `sum_c p_c log p_c` with `p = softmax(logits)`, in `[-log C, 0]`; higher
    (lower entropy) means more in-distribution. Computed from `log_softmax`, so
    it stays finite when probabilities underflow to zero.

    Args:
        logits: Tensor `(..., C)`.

    Returns:
        Tensor `(...)`.
    """
    log_probs = ops.log_softmax(logits, axis=-1)
    return ops.sum(ops.exp(log_probs) * log_probs, axis=-1)


@_checked
def max_probability_score(logits: ArrayLike) -> Tensor:
    """Maximum softmax probability (MPS), `max_c softmax(logits)_c`.

    The SoftMax baseline of Hendrycks & Gimpel; higher means more
    in-distribution. Range `[1/C, 1]`.

    Args:
        logits: Tensor `(..., C)`.

    Returns:
        Tensor `(...)`.
    """
    return ops.max(ops.softmax(logits, axis=-1), axis=-1)


@_checked
def max_logit_score(logits: ArrayLike) -> Tensor:
    """Maximum logit, the MaxLogit baseline for softmax classifiers.

    Numerically the same as `minimum_distance_score`; kept under its own name
    for softmax models. Higher means more in-distribution.

    Args:
        logits: Tensor `(..., C)`.

    Returns:
        Tensor `(...)`.
    """
    return ops.max(logits, axis=-1)


@_checked
def energy_score(logits: ArrayLike) -> Tensor:
    """Negative free energy, `logsumexp_c logits_c` (temperature 1).

    The energy baseline of Liu et al. (2020), with the sign flipped so that
    higher means more in-distribution.

    Args:
        logits: Tensor `(..., C)`.

    Returns:
        Tensor `(...)`.
    """
    return ops.logsumexp(logits, axis=-1)


SCORES: dict[str, ScoreFunction] = {
    "minimum_distance": minimum_distance_score,
    "entropic": entropic_score,
    "max_probability": max_probability_score,
    "max_logit": max_logit_score,
    "energy": energy_score,
}


def get(identifier: str | ScoreFunction) -> ScoreFunction:
    """Returns the score function for a name (or a callable, unchanged).

    Args:
        identifier: One of `"minimum_distance"`, `"entropic"`,
            `"max_probability"`, `"max_logit"`, `"energy"` (a trailing
            `"_score"` is accepted), or a callable `logits -> scores`.

    Returns:
        The score function.

    Raises:
        ValueError: If the name is unknown.
    """
    if callable(identifier):
        return identifier
    if isinstance(identifier, str):
        name = identifier.removesuffix("_score")
        if name in SCORES:
            return SCORES[name]
    raise ValueError(
        f"Unknown OOD score; expected one of {sorted(SCORES)} or a callable. "
        f"Received: score={identifier!r}"
    )


def name_of(score: Any) -> str:
    """The registered name of a score function (or its `__name__`)."""
    for name, fn in SCORES.items():
        if fn is score:
            return name
    return getattr(score, "__name__", str(score))
