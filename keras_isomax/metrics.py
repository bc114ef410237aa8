"""The streaming Keras metric for out-of-distribution detection: `OODScore`.

The exact NumPy detection metrics (`ood_metrics`, `roc_curve`,
`threshold_at_tpr`, `expected_calibration_error`) live in
`keras_isomax.detection_metrics`.
"""

from __future__ import annotations

from typing import Any

import keras

from keras_isomax import scores as scores_lib
from keras_isomax._typing import ArrayLike, Config


@keras.saving.register_keras_serializable(package="keras_isomax")
class OODScore(keras.metrics.Mean):
    """Streaming mean of an OOD score of the model's logits.

    A `keras.metrics.Mean` over `scores.get(score)(y_pred)`, so it is weighted,
    resettable and reduced correctly across replicas under `tf.distribute`.
    Labels are ignored. It is a running average of the score, not a measure of
    detection quality: on an IsoMax+ head it also moves with the learned
    distance scale (it typically falls while accuracy rises). To watch OOD
    detection during training use `keras_isomax.callbacks.OODMonitor`.

    Args:
        score: Name of a score in `keras_isomax.scores` (`"minimum_distance"`,
            `"entropic"`, `"max_probability"`, `"max_logit"`, `"energy"`).
            Defaults to `"minimum_distance"`.
        name: Name of the metric. Defaults to `None`, which gives
            `"<score>_score"` (e.g. `"minimum_distance_score"`).
        dtype: Dtype of the metric's state. Defaults to `None` (floatx).

    Example:

    >>> import numpy as np
    >>> from keras_isomax import OODScore
    >>> m = OODScore()
    >>> m.update_state(None, np.array([[-0.5, -1.0], [-2.0, -0.1]], "float32"))
    >>> round(float(m.result()), 3)
    -0.3
    """

    def __init__(
        self, score: str = "minimum_distance", name: str | None = None, dtype: Any = None
    ) -> None:
        if not isinstance(score, str):
            raise TypeError(
                "`score` must be the name of a score in `keras_isomax.scores`. "
                f"Received: score={score!r}"
            )
        self._score_fn = scores_lib.get(score)
        self.score = score.removesuffix("_score")
        super().__init__(name=name or f"{self.score}_score", dtype=dtype)

    def update_state(
        self, y_true: ArrayLike, y_pred: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> None:
        values = self._score_fn(keras.ops.cast(y_pred, self.dtype))
        return super().update_state(values, sample_weight=sample_weight)

    def get_config(self) -> Config:
        return {**super().get_config(), "score": self.score}
