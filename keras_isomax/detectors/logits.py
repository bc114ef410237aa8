"""Logit detectors: the scores of `keras_isomax.scores` as detectors (nothing to fit)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_isomax import _runner
from keras_isomax import scores as scores_lib
from keras_isomax._typing import ArrayLike, Data, Tensor, Verbose
from keras_isomax.detectors.base import Detector


class LogitDetector(Detector):
    """A score of `keras_isomax.scores` on the classifier's logits, as a detector.

    The logits are the pre-softmax logits: the `IsoMaxPlusLayer`'s output, or
    the pre-activation output of a SoftMax model's final `Dense`. There is
    nothing to fit: `fit(model)` binds the detector to a model (for
    `calibrate_threshold(..., detector=det)` and the exporters);
    `score_features(logits)` scores logits directly.
    """

    input_kind = "logits"
    score_name: str = ""
    _state_keys = ("num_classes",)

    def _model_runner(self, model: keras.Model) -> _runner.ModelRunner:
        return _runner.runner_for(model)

    def _runner_width(self, runner: _runner.ModelRunner) -> int | None:
        return runner.num_classes

    def _fit_model(self, runner: _runner.ModelRunner, *_: Any) -> str | None:
        """Binds the detector to the model (no fitting needed; `data` and `strategy` are
        ignored)."""
        if runner.num_classes is None:
            raise ValueError(
                "Logit detectors need a model with an `IsoMaxPlusLayer` or ending in a "
                f"`Dense` classifier. Received: model={runner.model.name!r}"
            )
        self.state = {"num_classes": runner.num_classes}
        return None

    def fit_features(
        self, features: Data = None, labels: ArrayLike | None = None, *, verbose: Verbose = "auto"
    ) -> Detector:
        """Nothing to fit: returns the detector (`score_features` takes logits)."""
        return self

    def attach(self, model: keras.Model) -> Detector:
        if not self.state:
            return self.fit(model)
        return super().attach(model)

    def _score_batch(self, batch: _runner.Batch) -> np.ndarray:
        values = self._score_array(batch.logits)
        # NaN where the input held NaN/Inf, even when the backbone turned it into
        # finite logits (the library's non-finite rule).
        return np.where(batch.nonfinite, np.nan, values)

    def _score_array(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, np.float32)
        values = np.asarray(ops.convert_to_numpy(self.call(logits)), np.float64).reshape(-1)
        return np.where(np.isfinite(logits).all(axis=1), values, np.nan)

    def call(self, inputs: Tensor) -> Tensor:
        return scores_lib.get(self.score_name)(ops.cast(inputs, "float32"))

    def _input_size(self) -> int | None:
        if not self.state:
            raise ValueError(
                f"Bind the detector with `.fit(model)` before saving. Received: detector={self.name!r}"
            )
        return self.state["num_classes"]


class MinimumDistance(LogitDetector):
    """The minimum distance score as a detector: `max_c logits[c]`.

    On an IsoMax+ head the largest logit is minus the (scaled) distance to the
    nearest prototype, the paper's score; see `scores.minimum_distance_score`.
    """

    score_name = "minimum_distance"


class Entropic(LogitDetector):
    """The entropic score as a detector: `sum_c p_c log p_c`, `p = softmax(logits)`."""

    score_name = "entropic"


class MaxProbability(LogitDetector):
    """The maximum softmax probability (Hendrycks & Gimpel, 2017) as a detector:
    `max_c softmax(logits)[c]`."""

    score_name = "max_probability"


class MaxLogit(LogitDetector):
    """The maximum logit as a detector: `max_c logits[c]` (on any head)."""

    score_name = "max_logit"


class Energy(LogitDetector):
    """The energy score (Liu et al., 2020) as a detector: `logsumexp_c logits[c]`.

    Higher for more in-distribution inputs (minus the free energy at temperature 1).
    """

    score_name = "energy"


for _detector in (MinimumDistance, Entropic, MaxProbability, MaxLogit, Energy):
    keras.saving.register_keras_serializable(package="keras_isomax")(_detector)
