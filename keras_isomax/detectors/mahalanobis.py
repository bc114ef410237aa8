"""Mahalanobis detector: minus the smallest squared Mahalanobis distance to a class mean."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_isomax import _checks
from keras_isomax._typing import Config, Tensor
from keras_isomax.detectors.base import ClassStats, Detector, FitContext


@keras.saving.register_keras_serializable(package="keras_isomax")
class Mahalanobis(Detector):
    """Minus the smallest squared Mahalanobis distance to a class mean.

    `score(z) = -min_c (z - mu_c)^T Sigma^-1 (z - mu_c)`, with class means
    `mu_c` and the shared covariance `Sigma` = pooled within-class scatter plus
    `ridge` times the identity, divided by the number of examples `N` (Lee et
    al., 2018; as pytorch-ood computes it). One streaming pass accumulates
    per-class sums and counts and the cross-product matrix in float64 (memory
    `O(C * F + F^2)`, not `O(N * F)`); `Sigma^-1` is stored as a whitening
    matrix, so scoring is one `(B, F) x (F, F)` product. Inputs `(B, F)`,
    scores `(B,)`.

    With fewer examples than `F + C` the pooled covariance is rank-deficient and
    `ridge` alone sets the missing directions' scale: a `UserWarning` says so.
    Labels of one class only give a one-class detector with `fit_features` (the
    distance to that class's mean) and an error through a model of more classes.

    Args:
        ridge: Added to the diagonal of the (un-normalised) pooled scatter
            matrix. Defaults to `1e-6`.
        num_classes: Number of classes; `None` takes the classifier's (or,
            with `fit_features`, the largest label + 1). Defaults to `None`.
        **kwargs: `features`, `batch_size` and `keras.layers.Layer` arguments.

    Example:

    >>> import numpy as np
    >>> from keras_isomax import detectors
    >>> rng = np.random.default_rng(0)
    >>> z, y = rng.normal(size=(300, 8)), rng.integers(0, 3, 300)
    >>> det = detectors.Mahalanobis().fit_features(z, y, verbose=0)
    >>> det.score_features(z[:4], verbose=0).shape
    (4,)
    """

    needs_labels = True

    _state_keys = ("num_classes", "feature_dim")

    def __init__(self, ridge: float = 1e-6, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not ridge >= 0:
            raise ValueError(f"`ridge` must be a number >= 0. Received: ridge={ridge!r}")
        self.ridge = float(ridge)
        self.num_classes = _checks.check_int(num_classes, "num_classes", allow_none=True)

    def _state_specs(self, state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
        c, f = state["num_classes"], state["feature_dim"]
        return {
            "center": ((f,), "float32"),
            "whitening": ((f, f), "float32"),
            "whitened_means": ((c, f), "float32"),
        }

    def _accumulator(self, context: FitContext) -> ClassStats:
        return ClassStats(self.num_classes or context.num_classes, second_moment=True)

    def _finish(self, stats: ClassStats, context: FitContext) -> None:
        stats.check_complete("Mahalanobis")
        c, f = stats.sums.shape
        counts, total = stats.counts, stats.total
        if total - c < f:
            warnings.warn(
                f"Mahalanobis was fitted on {total} examples of {c} classes in {f} "
                f"dimensions: the pooled covariance has rank at most {total - c} < {f}, so "
                f"`ridge` ({self.ridge}) alone sets the scale of the missing directions. "
                "Fit on more examples, or raise `ridge`.",
                stacklevel=3,
            )
        means = stats.sums / counts[:, None]  # Shifted class means.
        scatter = stats.cross - (means * counts[:, None]).T @ means
        covariance = (scatter + self.ridge * np.eye(f)) / total
        covariance = (covariance + covariance.T) / 2
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        if eigenvalues.min() <= f * np.finfo(np.float64).eps * max(eigenvalues.max(), 0.0):
            raise ValueError(
                "The pooled covariance is singular (constant features and `ridge=0`?). "
                f"Received: ridge={self.ridge}"
            )
        whitening = eigenvectors / np.sqrt(eigenvalues)  # W W^T = covariance^-1.
        center = (counts @ means) / total  # Centred (shifted) global mean.
        self._make_state({"num_classes": c, "feature_dim": f})
        self.center.assign((center + stats.shift).astype(np.float32))
        self.whitening.assign(whitening.astype(np.float32))
        self.whitened_means.assign(((means - center) @ whitening).astype(np.float32))

    def call(self, inputs: Tensor) -> Tensor:
        # `call` runs on a fitted detector: `state` is set.
        feats = ops.cast(ops.reshape(inputs, (-1, self.state["feature_dim"])), "float32")  # type: ignore[index]
        a = ops.matmul(feats - self.center, self.whitening)
        m = self.whitened_means
        d = (
            ops.sum(a * a, axis=1, keepdims=True)
            + ops.sum(m * m, axis=1)[None, :]
            - 2.0 * ops.matmul(a, ops.transpose(m))
        )
        score = -ops.maximum(ops.min(d, axis=1), 0.0)
        return self._nan_rows(feats, score)

    def get_config(self) -> Config:
        return {**super().get_config(), "ridge": self.ridge, "num_classes": self.num_classes}
