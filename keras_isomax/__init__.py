"""keras-isomax: IsoMax+ out-of-distribution detection for Keras 3.

Swap the classifier's last `Dense` + softmax for `IsoMaxPlusLayer`, its loss for
`IsoMaxPlusLoss`, train with `model.fit` as before, and score inputs with
`scores.minimum_distance_score(logits)` (higher = more in-distribution).
"""

from keras_isomax import scores
from keras_isomax.layers import IsoMaxPlusLayer
from keras_isomax.losses import IsoMaxPlusLoss, isomax_plus_loss
from keras_isomax.metrics import OODScore

__version__ = "0.1.0"

__all__ = [
    "IsoMaxPlusLayer",
    "IsoMaxPlusLoss",
    "OODScore",
    "isomax_plus_loss",
    "scores",
]
