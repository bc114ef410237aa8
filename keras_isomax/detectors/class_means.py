"""Class-mean detector: the IsoMax+ minimum distance score with class-mean prototypes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_isomax import _checks
from keras_isomax._typing import Config, Tensor
from keras_isomax.detectors.base import ClassStats, Detector, FitContext
from keras_isomax.layers import l2_normalize, pairwise_distances


@keras.saving.register_keras_serializable(package="keras_isomax")
class ClassMeans(Detector):
    """Minus the distance from the normalised features to the nearest class mean.

    `score(z) = -min_c || z/||z|| - m_c ||_2` where `m_c` is the spherical mean
    of class `c`: the mean of the class's L2-normalised training features,
    normalised again. This is the IsoMax+ minimum distance score with
    class-mean prototypes (what `replace_head` initialises), without replacing
    the classifier: the model's predictions and accuracy stay as they are.
    Fitted in one streaming pass (per-class sums in float64); each example's
    nearest distance is computed exactly from the difference of the normalised
    vectors. Inputs `(B, F)`, scores `(B,)`.

    Args:
        num_classes: How many class means; every class needs examples.
            Defaults to `None`: the classifier's classes (`fit`), or the
            largest label + 1 (`fit_features`).
        **kwargs: `features`, `batch_size` and `keras.layers.Layer` arguments.

    Example:

    >>> import numpy as np
    >>> from keras_isomax import detectors
    >>> z = np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    >>> det = detectors.ClassMeans().fit_features(z, [0, 0, 1, 1], verbose=0)
    >>> det.score_features([[5.0, 0.1], [-1.0, -1.0]], verbose=0).round(3)
    array([-0.005, -1.854])
    """

    needs_labels = True

    _state_keys = ("num_classes", "feature_dim")

    def __init__(self, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = _checks.check_int(num_classes, "num_classes", allow_none=True)

    def _state_specs(self, state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"means": ((state["num_classes"], state["feature_dim"]), "float32")}

    def _accumulator(self, context: FitContext) -> ClassStats:
        return ClassStats(self.num_classes or context.num_classes, normalize=True)

    def _finish(self, stats: ClassStats, context: FitContext) -> None:
        stats.check_complete("ClassMeans")
        means = stats.sums / stats.counts[:, None]
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        self._make_state({"num_classes": means.shape[0], "feature_dim": means.shape[1]})
        self.means.assign(means.astype(np.float32))

    def call(self, inputs: Tensor) -> Tensor:
        # `call` runs on a fitted detector: `state` is set.
        feats = ops.cast(ops.reshape(inputs, (-1, self.state["feature_dim"])), "float32")  # type: ignore[index]
        distances = pairwise_distances(l2_normalize(feats), self.means)
        return self._nan_rows(feats, -ops.min(distances, axis=1))

    def get_config(self) -> Config:
        return {**super().get_config(), "num_classes": self.num_classes}
