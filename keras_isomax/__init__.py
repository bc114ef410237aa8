"""keras-isomax: IsoMax+ out-of-distribution detection for Keras 3.

Swap the classifier's last `Dense` + softmax for `IsoMaxPlusLayer`, its loss for
`IsoMaxPlusLoss`, train with `model.fit` as before, and score inputs with
`scores.minimum_distance_score(logits)` (higher = more in-distribution).
"""

import keras as _keras

from keras_isomax import detectors, scores
from keras_isomax.calibration import (
    calibrate_temperature,
    calibrate_threshold,
    predict_ood,
)
from keras_isomax.detection_metrics import ood_metrics
from keras_isomax.evaluation import evaluate_ood
from keras_isomax.export import export_litert, export_onnx, export_saved_model, serving_function
from keras_isomax.head import find_isomax_layer, replace_head
from keras_isomax.layers import IsoMaxPlusLayer
from keras_isomax.losses import IsoMaxPlusLoss, isomax_plus_loss
from keras_isomax.metrics import OODScore
from keras_isomax.plots import plot_roc, plot_score_histograms

__version__ = "0.1.0"

__all__ = [
    "IsoMaxPlusLayer",
    "IsoMaxPlusLoss",
    "OODScore",
    "calibrate_temperature",
    "detectors",
    "calibrate_threshold",
    "evaluate_ood",
    "export_litert",
    "export_onnx",
    "export_saved_model",
    "find_isomax_layer",
    "isomax_plus_loss",
    "ood_metrics",
    "plot_roc",
    "plot_score_histograms",
    "predict_ood",
    "replace_head",
    "scores",
    "serving_function",
]

if _keras.backend.backend() == "tensorflow":
    # keras-team/keras#20585: Keras' `fit` fails under MultiWorkerMirroredStrategy.
    # Version-gated (see keras_isomax.distribute); a no-op for unaffected versions and
    # for every other strategy.
    from keras_isomax import distribute

    distribute.enable_multi_worker_fit()
    __all__ += ["distribute"]
